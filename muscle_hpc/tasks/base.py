"""What a task is to the stages, by kind: its shard check, its head, its targets and its metrics.

``build(definition)`` makes the object of a ``registry.Task`` definition, whatever its kind
(``KINDS``). Every task object has the definition's ``name``, ``dataset``, ``kind``,
``classes``, ``headline`` and ``metrics`` (the keys of its test metrics, ``registry.task_metrics``)
and these methods:

- ``head(channels, heads)`` builds its head for a trunk with ``channels`` per stage, sized by the
  ``model`` section of the stage's config (``HeadsConfig``);
- ``check(shard)`` refuses, in one line (``ShardError``), a shard whose manifest does not match
  the definition (its fields, its number of classes);
- ``targets(batch, device)`` is what the head's loss takes;
- ``records(outputs, batch)`` turns one evaluated batch into small per-sample records (ranks
  evaluate shards of a split and gather these, never images);
- ``score(records, m)`` turns all records into the validation numbers as the ``eval`` section
  ``m`` reads the paper's metrics (every key of ``metrics``);
- ``test_metrics(records, m)`` returns ``(scores, extra)``: the same keys plus bootstrap CIs
  where the kind has them (``<metric>_ci`` = [lo, hi], ``ci_resamples``, ``auc_ci_skipped``),
  and extra results for ``results.json`` (the binary ROC curve).

The metric method is ``score``, not ``metrics``: ``metrics`` is the tuple of keys, as on the
registry's definition, which the report reads.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from muscle_hpc import metrics, registry
from muscle_hpc.config.finetune import FtEvalConfig
from muscle_hpc.config.sections import HeadsConfig, MetricsConfig
from muscle_hpc.data.shards import Shard, ShardError, open_shard
from muscle_hpc.models.heads import (
    ClassifierHead,
    DetectionHead,
    MultiLabelHead,
    RegressionHead,
    SegmentationHead,
)

KINDS = registry.KINDS


def _unzip(records) -> tuple[tuple, tuple]:
    return tuple(zip(*records)) if records else ((), ())


def _names(names) -> str:
    return ", ".join(str(n) for n in names)


class TaskKind:
    """The behaviour every kind shares: the definition's names, and the shard check of a field
    that names its classes."""

    kind = ""

    def __init__(self, definition: registry.Task):
        if definition.kind != self.kind:
            raise ValueError(f"{definition.name} is a {definition.kind} task, not {self.kind}")
        self.definition = definition
        self.name, self.dataset = definition.name, definition.dataset
        self.classes: tuple[str, ...] = tuple(definition.classes)
        self.headline = definition.headline
        self.metrics: tuple[str, ...] = definition.metrics

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.definition!r})"

    def _field(self, shard: Shard, field: str, what: str) -> dict:
        if field not in shard.fields:
            raise ShardError(f"{shard.dataset}/{shard.split}: no {field!r} field ({what}) for "
                             f"the {self.name} task (has {_names(shard.fields)})")
        return shard.fields[field]

    def _check_count(self, shard: Shard, field: str, names, what: str) -> None:
        if names is not None and len(names) != len(self.classes):
            raise ShardError(f"{shard.dataset}/{shard.split}: {len(names)} {what} in its "
                             f"{field!r} field ({_names(names)}), the {self.name} task defines "
                             f"{len(self.classes)} ({_names(self.classes)})")

    def test_metrics(self, records, m: FtEvalConfig) -> tuple[dict, dict]:
        return self.score(records, m), {}

    def checked(self, shards: dict[str, Shard]) -> dict[str, Shard]:
        """``shards`` (split name to shard), each checked against the task (``check``)."""
        for shard in shards.values():
            self.check(shard)
        return shards

    def open_splits(self, data_root: Path, splits) -> dict[str, Shard]:
        """Each of ``splits`` of the task's dataset under ``data_root``, opened and checked.
        Raises ``ShardError`` naming what is missing or does not fit."""
        return self.checked({s: open_shard(Path(data_root), self.dataset, s) for s in splits})

    def ignored(self, shard: Shard) -> str | None:
        """What of ``shard``'s labels this task neither learns nor scores, in words (the stages
        say it at start), or None."""
        return None

    def _stored(self, name: str) -> int:
        """The value or column that stands for class ``name`` in the shard's field."""
        return self.classes.index(name)

    def flip_swap(self) -> dict[int, int]:
        """What a horizontal flip turns each stored class value (mask value, label, label
        column, box category) into, for the classes it mirrors (``definition.mirrored``)."""
        return {self._stored(a): self._stored(b) for a, b in self.definition.mirrored.items()}


class ClassificationTask(TaskKind):
    """One label of K >= 2 classes per image (shard field ``label``): a linear head, softmax
    cross-entropy. Records: ``(label, [p_0, ..., p_K-1])``. Two classes: acc, sen, spe (class
    1 is positive, predicted at p_1 >= 0.5), auc, as ``metrics.classification``; more:
    ``metrics.multiclass`` (argmax)."""

    kind = "classification"

    def head(self, channels, heads: HeadsConfig):
        return ClassifierHead(channels, len(self.classes))

    def check(self, shard: Shard) -> None:
        field = self._field(shard, "label", "class labels")
        self._check_count(shard, "label", field.get("names"), "classes")

    def targets(self, batch, device):
        return batch["label"].to(device)

    def records(self, outputs, batch):
        return list(zip(batch["label"].tolist(), outputs.tolist()))

    def _metrics(self, records, resamples: int = 0, seed: int = 0) -> dict:
        labels, probs = _unzip(records)
        if len(self.classes) == 2:
            return metrics.classification(labels, probs, resamples=resamples, seed=seed)
        return metrics.multiclass(labels, np.asarray(probs).reshape(-1, len(self.classes)),
                                  self.classes, resamples=resamples, seed=seed)

    def score(self, records, m: MetricsConfig) -> dict[str, float]:
        return self._metrics(records)

    def test_metrics(self, records, m: FtEvalConfig) -> tuple[dict, dict]:
        """The final metrics with bootstrap CIs, and (two classes) the ROC curve."""
        scores = self._metrics(records, m.bootstrap, m.seed)
        if len(self.classes) != 2:
            return scores, {}
        labels, probs = _unzip(records)
        return scores, {"roc": metrics.roc_curve(labels, probs)}


class MultilabelTask(TaskKind):
    """Any number of the C findings per image (shard field ``labels``, multi-hot): C logits,
    binary cross-entropy of each. Records: ``([y_0, ..., y_C-1], [p_0, ..., p_C-1])``;
    metrics: ``metrics.multilabel`` (per-finding AUC and their mean)."""

    kind = "multilabel"
    columns: list[int] | None = None  # the shard's findings this task learns, by name

    def head(self, channels, heads: HeadsConfig):
        return MultiLabelHead(channels, len(self.classes))

    def check(self, shard: Shard) -> None:
        """Also picks the task's findings among the shard's by name: NIH's shards hold 15
        (the 14 findings and No Finding); a task listing the 14 learns those columns."""
        field = self._field(shard, "labels", "multi-hot findings")
        names = field.get("names")
        if names is not None and set(self.classes) <= set(names):
            self.columns = [list(names).index(c) for c in self.classes]
            return
        self._check_count(shard, "labels", names, "findings")

    def _stored(self, name: str) -> int:
        k = self.classes.index(name)
        return k if self.columns is None else self.columns[k]

    def _labels(self, batch) -> torch.Tensor:
        labels = batch["labels"]
        return labels if self.columns is None else labels[:, self.columns]

    def targets(self, batch, device):
        return self._labels(batch).to(device)

    def records(self, outputs, batch):
        return list(zip(self._labels(batch).to(torch.int64).tolist(), outputs.tolist()))

    def _metrics(self, records, resamples: int = 0, seed: int = 0) -> dict:
        labels, probs = _unzip(records)
        c = len(self.classes)
        return metrics.multilabel(np.asarray(labels).reshape(-1, c),
                                  np.asarray(probs).reshape(-1, c), self.classes,
                                  resamples=resamples, seed=seed)

    def score(self, records, m: MetricsConfig) -> dict[str, float]:
        return self._metrics(records)

    def test_metrics(self, records, m: FtEvalConfig) -> tuple[dict, dict]:
        return self._metrics(records, m.bootstrap, m.seed), {}


def target_stats(shard: Shard, target: str) -> tuple[float, float]:
    """The mean and (population) standard deviation of ``target`` over the *training* split of
    ``shard``'s dataset, whichever split ``shard`` is.

    From the manifest's summary of the train split, ``splits.train.<target>``, when it holds
    both ``mean`` and ``std``; otherwise computed from the train shard's values, read from its
    FFCV metadata table (where FFCV keeps scalar fields: no image is read). Bone age's summary
    (``boneage_months``: min, max and a rounded mean, no std) is therefore not used: both
    numbers come from the same place, the data. NaN values (unlabelled images) are left out."""
    train = shard.manifest["splits"].get("train")
    if train is None:
        raise ShardError(f"{shard.dataset}: no train split to standardize {target!r} with")
    summary = train.get(target)
    if isinstance(summary, dict) and "mean" in summary and "std" in summary:
        return float(summary["mean"]), float(summary["std"])
    values = open_shard(shard.path.parents[1], shard.dataset, "train").scalar_values(target)
    values = values[~np.isnan(values)]
    if not values.size:
        raise ShardError(f"{shard.dataset}/train: no {target!r} value to standardize with")
    return float(values.mean()), float(values.std())


class RegressionTask(TaskKind):
    """One number per image (the shard field ``definition.target``, a FloatField; batches
    carry it as ``value``): one output, trained on the standardized target and reported in
    the target's unit (``RegressionHead``). Records: ``(target, prediction)`` in that unit;
    metrics: ``metrics.regression`` (mae, rmse).

    ``standardization`` is the (mean, std) of the train split (``target_stats``): ``check``
    reads it from the shard it is given (any split of the dataset) and ``head`` builds the
    head with it; (0, 1), no change, until a shard is checked (synthetic data)."""

    kind = "regression"

    def __init__(self, definition: registry.Task):
        super().__init__(definition)
        self.target = definition.target
        self.standardization: tuple[float, float] = (0.0, 1.0)
        self._checked = None

    def head(self, channels, heads: HeadsConfig):
        mean, std = self.standardization
        return RegressionHead(channels, mean, std, heads.regression_loss)

    def check(self, shard: Shard) -> None:
        field = self._field(shard, self.target, "the regression target")
        if field.get("type") != "FloatField":
            raise ShardError(f"{shard.dataset}/{shard.split}: {self.target!r} is stored as "
                             f"{field.get('type')}, the {self.name} task regresses a FloatField")
        if self._checked == shard.path.parent:
            return
        mean, std = target_stats(shard, self.target)
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ShardError(f"{shard.dataset}/train: {self.target!r} has mean {mean} and std "
                             f"{std}; the {self.name} task cannot standardize it")
        self.standardization, self._checked = (mean, std), shard.path.parent

    def targets(self, batch, device):
        return batch["value"].to(device)

    def records(self, outputs, batch):
        return list(zip(batch["value"].tolist(), outputs.reshape(-1).tolist()))

    def _metrics(self, records, resamples: int = 0, seed: int = 0) -> dict:
        targets, predictions = _unzip(records)
        return metrics.regression(targets, predictions, resamples=resamples, seed=seed)

    def score(self, records, m: MetricsConfig) -> dict[str, float]:
        return self._metrics(records)

    def test_metrics(self, records, m: FtEvalConfig) -> tuple[dict, dict]:
        return self._metrics(records, m.bootstrap, m.seed), {}


class SegmentationTask(TaskKind):
    """A class index per pixel (shard field ``mask``, ``classes[0]`` the background):
    DeepLab-V3 with K outputs. Records: each image's (K, K) confusion matrix; metrics:
    ``metrics.segmentation`` (dice of the foreground classes, miou, and dice_C with K > 2)."""

    kind = "segmentation"

    def head(self, channels, heads: HeadsConfig):
        return SegmentationHead(channels, len(self.classes), heads.seg_output_stride)

    def check(self, shard: Shard) -> None:
        field = self._field(shard, "mask", "masks")
        names = field.get("names")
        if names is None and len(self.classes) > 2:
            # Shards written before masks named their classes hold binary masks only.
            raise ShardError(f"{shard.dataset}/{shard.split}: its masks do not name their "
                             f"classes (a binary shard), the {self.name} task defines "
                             f"{len(self.classes)} ({_names(self.classes)}); convert it again")
        self._check_count(shard, "mask", names, "mask classes")

    def targets(self, batch, device):
        return batch["mask"].to(device, non_blocking=True)

    def records(self, outputs, batch):
        pred = outputs.argmax(dim=1).numpy()
        return [metrics.confusion(t, p, len(self.classes))
                for t, p in zip(batch["mask"].numpy(), pred)]

    def score(self, records, m: MetricsConfig) -> dict[str, float]:
        return metrics.segmentation(records, m.dice, self.classes)


class DetectionTask(TaskKind):
    """Boxes of K classes (shard fields ``boxes``, ``box_labels``): Faster R-CNN with K + 1
    classes (the background). ``definition.box_categories[k]``, a shard box category id, is
    detector class k + 1, ``classes[k]``; boxes of other categories are neither learned nor
    scored (``unused_categories``; ``ignored`` says so, as the stages do at start). Records:
    per image ``((gt boxes, gt classes), (boxes, scores, classes))``; metrics:
    ``metrics.detection`` (ap_C of each class, map their mean)."""

    kind = "detection"

    def __init__(self, definition: registry.Task):
        super().__init__(definition)
        self.box_categories = tuple(definition.box_categories)
        if len(self.box_categories) != len(self.classes):
            raise ValueError(f"{self.name}: {len(self.box_categories)} box categories for "
                             f"{len(self.classes)} classes")
        # shard category id -> (detector class, name)
        self.categories = {int(c): (k + 1, n)
                           for k, (c, n) in enumerate(zip(self.box_categories, self.classes))}

    def head(self, channels, heads: HeadsConfig):
        return DetectionHead(channels, len(self.classes) + 1,  # + background
                             heads.rois_per_image, heads.test_proposals)

    def check(self, shard: Shard) -> None:
        names = shard.fields.get("box_labels", {}).get("names")
        if names is None:
            raise ShardError(f"{shard.dataset}/{shard.split}: no boxes for the {self.name} task")
        missing = [c for c in self.box_categories if not 1 <= c <= len(names)]
        if missing:
            raise ShardError(f"{shard.dataset}/{shard.split}: box categories "
                             f"{_names(f'{i} {n}' for i, n in enumerate(names, 1))}, the "
                             f"{self.name} task's box_categories {_names(missing)} are not "
                             f"among them")

    def _stored(self, name: str) -> int:
        return self.box_categories[self.classes.index(name)]

    def unused_categories(self, shard: Shard) -> list[str]:
        names = shard.fields["box_labels"]["names"]
        return [n for i, n in enumerate(names, 1) if i not in self.categories]

    def ignored(self, shard: Shard) -> str | None:
        unused = self.unused_categories(shard)
        if not unused:
            return None
        return (f"{self.name}: boxes of {', '.join(unused)} are not learned or scored (not one "
                f"of {', '.join(self.classes)})")

    def _mapped(self, boxes, labels):
        keep = torch.tensor([int(c) in self.categories for c in labels], dtype=torch.bool)
        mapped = torch.tensor([self.categories[int(c)][0] for c in labels[keep]],
                              dtype=torch.int64)
        return boxes[keep].reshape(-1, 4), mapped

    def targets(self, batch, device):
        out = []
        for boxes, labels in zip(batch["boxes"], batch["box_labels"]):
            b, c = self._mapped(boxes, labels)
            out.append({"boxes": b.to(device), "labels": c.to(device)})
        return out

    def records(self, outputs, batch):
        recs = []
        for det, boxes, labels in zip(outputs, batch["boxes"], batch["box_labels"]):
            b, c = self._mapped(boxes, labels)
            recs.append(((b.numpy(), c.numpy()),
                         (det["boxes"].numpy(), det["scores"].numpy(), det["labels"].numpy())))
        return recs

    def score(self, records, m: MetricsConfig) -> dict[str, float]:
        gt = [r[0] for r in records]
        det = [r[1] for r in records]
        return metrics.detection(gt, det, dict(self.categories.values()),
                                 recall_points=m.ap_recall_points)


BY_KIND = {t.kind: t for t in (ClassificationTask, MultilabelTask, RegressionTask,
                                SegmentationTask, DetectionTask)}
assert tuple(BY_KIND) == KINDS


def build(definition: registry.Task) -> TaskKind:
    """The task object of ``definition``, by its kind."""
    try:
        cls = BY_KIND[definition.kind]
    except KeyError:
        raise ValueError(f"{definition.name}: kind {definition.kind!r} is not one of "
                         f"{_names(KINDS)}") from None
    return cls(definition)
