"""What a task is to the stages: its shard, its head, its targets and its validation metrics.

A task plug-in (one file per task in this package) is an instance of one of the three kinds
below. ``head(channels, heads)`` builds its head for a trunk with ``channels`` per stage, sized
by the ``model`` section of the stage's config (``HeadsConfig``). ``records`` turns one
evaluated batch into small per-sample records (ranks evaluate shards of a split and gather
these, never images), ``metrics(records, m)`` turns all records into numbers as the ``eval``
section ``m`` reads the paper's metrics, and ``headline`` names the number a one-line summary
or the forgetting matrix shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from muscle_hpc import metrics
from muscle_hpc.config import FtEvalConfig, HeadsConfig, MetricsConfig
from muscle_hpc.data.shards import Shard, ShardError
from muscle_hpc.models.heads import ClassifierHead, DetectionHead, SegmentationHead


@dataclass(frozen=True)
class ClassificationTask:
    name: str
    dataset: str
    classes: tuple[str, ...]
    kind: str = "classification"
    headline: str = "auc"

    def head(self, channels, heads: HeadsConfig):
        return ClassifierHead(channels, len(self.classes))

    def check(self, shard: Shard) -> None:
        names = shard.fields.get("label", {}).get("names")
        if names is not None and len(names) != len(self.classes):
            raise ShardError(f"{shard.dataset}/{shard.split}: {len(names)} classes {names}, "
                             f"the {self.name} task expects {len(self.classes)}")

    def targets(self, batch, device):
        return batch["label"].to(device)

    def records(self, outputs, batch):
        return list(zip(batch["label"].tolist(), outputs[:, 1].tolist()))

    def metrics(self, records, m: MetricsConfig) -> dict[str, float]:
        labels, probs = zip(*records) if records else ((), ())
        return metrics.classification(labels, probs)

    def test_metrics(self, records, m: FtEvalConfig) -> tuple[dict, dict]:
        """The final metrics with bootstrap CIs, and the ROC curve."""
        labels, probs = zip(*records) if records else ((), ())
        return (metrics.classification(labels, probs, resamples=m.bootstrap, seed=m.seed),
                {"roc": metrics.roc_curve(labels, probs)})


@dataclass(frozen=True)
class SegmentationTask:
    name: str
    dataset: str
    classes: tuple[str, ...] = ("background", "foreground")
    kind: str = "segmentation"
    headline: str = "dice"

    def head(self, channels, heads: HeadsConfig):
        return SegmentationHead(channels, len(self.classes), heads.seg_output_stride)

    def check(self, shard: Shard) -> None:
        if "mask" not in shard.fields:
            raise ShardError(f"{shard.dataset}/{shard.split}: no masks for the {self.name} task")

    def targets(self, batch, device):
        return batch["mask"].to(device, non_blocking=True)

    def records(self, outputs, batch):
        pred = outputs.argmax(dim=1).numpy()
        return [metrics.confusion(t, p, len(self.classes))
                for t, p in zip(batch["mask"].numpy(), pred)]

    def metrics(self, records, m: MetricsConfig) -> dict[str, float]:
        return metrics.segmentation(records, m.dice)

    def test_metrics(self, records, m: FtEvalConfig) -> tuple[dict, dict]:
        return self.metrics(records, m), {}


@dataclass(frozen=True)
class DetectionTask:
    """``categories``: the shard's box category id -> (detector class, name); shard categories
    not listed are not learned (their boxes are dropped from the targets, as stated at start)."""

    name: str
    dataset: str
    categories: dict[int, tuple[int, str]] = field(default_factory=dict)
    kind: str = "detection"
    headline: str = "map"

    @property
    def classes(self) -> dict[int, str]:
        return {c: n for c, n in self.categories.values()}

    def head(self, channels, heads: HeadsConfig):
        return DetectionHead(channels, len(self.categories) + 1,  # + background
                             heads.rois_per_image, heads.test_proposals)

    def check(self, shard: Shard) -> None:
        names = shard.fields.get("box_labels", {}).get("names")
        if names is None:
            raise ShardError(f"{shard.dataset}/{shard.split}: no boxes for the {self.name} task")

    def unused_categories(self, shard: Shard) -> list[str]:
        names = shard.fields["box_labels"]["names"]
        return [n for i, n in enumerate(names, 1) if i not in self.categories]

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

    def metrics(self, records, m: MetricsConfig) -> dict[str, float]:
        gt = [r[0] for r in records]
        det = [r[1] for r in records]
        return metrics.detection(gt, det, self.classes, recall_points=m.ap_recall_points)

    def test_metrics(self, records, m: FtEvalConfig) -> tuple[dict, dict]:
        return self.metrics(records, m), {}
