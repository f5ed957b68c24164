"""The one place that says which datasets, tasks, inits and backbones there are, and where each
stage's run lives under a run root.

Config (choices, defaults, the paper's task definitions), report (rows, columns, titles), the
loaders' summary, the launcher, the fine-tune grid and the sbatch pipeline all read this module;
``tests/test_registry.py`` fails when a copy it cannot read from here (YAMLs, data_prep's
plug-ins, the task objects, the scripts' comments) disagrees with it.

Trade-offs:

- Datasets are data_prep's list (``data_prep.datasets.NAMES``), not a second one: a dataset
  exists once its converter does, and reading it here follows the data's direction (converter
  -> shard -> loader); data_prep never imports muscle_hpc. Datasets of the user's (converted by
  ``data_prep.convert --layout``) are named in configs, not here.
- A task is a definition (``Task``: dataset, kind, classes, headline), the same keys a user's
  task has under ``tasks.<name>`` of a fine-tune config; the paper's four are defined here
  because the launcher, config and the shell scripts need them in milliseconds, while
  ``muscle_hpc.tasks.build`` (torch, ~2 s to import) turns any definition into its behaviour
  (head, targets, metrics) by kind.
- Standard library only, so ``python -m muscle_hpc.registry`` runs on a login node with any
  python3, before (or without) the training stack is installed.

Run layout under a run root ``ROOT``, backbone ``BB`` (r18, r50)::

    ROOT/mdmoco_BB/                    MD-MoCo; its export backbone_torchvision.pth
    ROOT/continual_BB/                 MUSCLE (cl.method=muscle), from MD-MoCo's export
    ROOT/continual_BB_muscle--/        MUSCLE⁻⁻ (cl.method=muscle--), the same
    ROOT/finetune/TASK_BB_INIT/        one fine-tune of the grid

For shell scripts, ``python -m muscle_hpc.registry layout --root ROOT --backbone BB`` prints
that layout (and the backbone's default configs and grid indices) as ``KEY=VALUE`` lines:
the value is the rest of the line, verbatim, so a script splits on the first ``=`` and never
evaluates anything.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data_prep.datasets import NAMES

KINDS = ("classification", "multilabel", "regression", "segmentation", "detection")
# A kind's headline metric unless a task names another: what picks the best epoch and init.
HEADLINES = {"classification": "auc", "multilabel": "auc", "regression": "mae",
             "segmentation": "dice", "detection": "map"}
# Headline metrics where less is better (errors); every other metric is a score.
LOWER_IS_BETTER = frozenset({"mae", "rmse"})
# How the fine-tune stage trains: the whole network, or a linear probe of a frozen backbone.
PROTOCOLS = ("finetune", "linear")


def task_metrics(kind: str, classes: tuple[str, ...]) -> tuple[str, ...]:
    """A task's test metrics, in its report columns' order, from its kind and class names
    (``muscle_hpc.metrics`` returns these keys):

    - classification, two classes: acc, sen, spe (of class 1, the finding), auc; more classes:
      acc, auc (one-vs-rest, macro), then sen_C and spe_C of each class C;
    - multilabel: auc (the mean over findings), then auc_C of each finding;
    - regression: mae, rmse (in the target's unit);
    - segmentation: dice and miou; with more than one foreground class, dice is their mean,
      then dice_C of each (``classes[0]`` is the background);
    - detection: map (the mean over box classes), then ap_C of each.
    """
    if kind == "classification":
        if len(classes) == 2:
            return ("acc", "sen", "spe", "auc")
        return ("acc", "auc", *(f"{m}_{c}" for c in classes for m in ("sen", "spe")))
    if kind == "multilabel":
        return ("auc", *(f"auc_{c}" for c in classes))
    if kind == "regression":
        return ("mae", "rmse")
    if kind == "segmentation":
        return ("dice", "miou", *((f"dice_{c}" for c in classes[1:]) if len(classes) > 2 else ()))
    if kind == "detection":
        return ("map", *(f"ap_{c}" for c in classes))
    raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")


# A name's words: split at anything but letters and digits, and at a lower-to-upper case turn
# (leftLung), so "Left lung", "left_lung" and "LeftLung" are the same three words apart.
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_SIDE = {"left": "right", "right": "left"}
_SIDE_LETTER = {"l": "r", "r": "l"}


def lateral_partners(classes: Sequence[str]) -> dict[str, str | None]:
    """The classes whose names say a side of the body, each mapped to its mirror image among
    ``classes``, or to None when there is none. The one place this rule lives.

    Rule: names are compared as their words, case-insensitively (words split at anything but a
    letter or digit and at a lower-to-upper case turn). A name says a side when a word of it is
    ``left`` or ``right`` and it does not hold both (``left_or_right`` is no side); its mirror
    is the one class whose words are the same with every such word swapped
    (``left_femoral_head`` and ``right_femoral_head``, "Left lung" and "Right lung"); two
    classes of the same words (``Left lung`` and ``left_lung``) have no mirror: ambiguous.
    The single letters ``l`` and ``r`` count as sides only where that swap finds exactly one
    class (``L_hip`` and ``R_hip``): a lone ``l`` may mean anything else, so without a partner
    it is no side."""
    words = {c: tuple(w.lower() for w in _WORDS.findall(c)) for c in classes}
    by_words: dict[tuple[str, ...], list[str]] = {}
    for c, ws in words.items():
        by_words.setdefault(ws, []).append(c)
    out: dict[str, str | None] = {}
    for c, ws in words.items():
        for sides in (_SIDE, _SIDE_LETTER):
            if len({w for w in ws if w in sides}) != 1:  # no side word, or both
                continue
            partners = by_words.get(tuple(sides.get(w, w) for w in ws), [])
            if len(partners) == 1 and len(by_words[ws]) == 1:
                out[c] = partners[0]
                break
            if sides is _SIDE:
                out[c] = None
                break
    return out


@dataclass(frozen=True)
class Task:
    """A task definition: the same keys a user's task has under ``tasks.<name>`` of a fine-tune
    config (the four below are the paper's). ``dataset``: the converted dataset whose shards it
    reads; ``classes``: class names in label order (segmentation: background first; detection:
    the box classes, detector class k+1 = ``classes[k]``; regression: none); ``box_categories``:
    detection only, the shard's box category id of each class (default 1..K: a box category not
    listed is not learned); ``target``: regression only, the shard field it predicts;
    ``batch_size``: the default global batch of the continual and fine-tune stages (memory
    differs by kind: a detector's images cost most); ``flip_pairs``: the classes a horizontal
    flip turns into each other, as pairs (None: ``lateral_partners`` of the class names; an
    empty tuple: the user says none does)."""

    name: str
    dataset: str
    kind: str
    title: str
    classes: tuple[str, ...]
    batch_size: int = 16
    headline: str = ""  # empty: the kind's (HEADLINES)
    box_categories: tuple[int, ...] = ()
    target: str = "value"
    flip_pairs: tuple[tuple[str, str], ...] | None = None

    def __post_init__(self):
        if not self.headline:
            object.__setattr__(self, "headline", HEADLINES.get(self.kind, ""))
        if self.kind == "detection" and not self.box_categories:
            object.__setattr__(self, "box_categories", tuple(range(1, len(self.classes) + 1)))

    @property
    def metrics(self) -> tuple[str, ...]:
        """Its test metrics in the report's column order (``task_metrics``)."""
        return task_metrics(self.kind, self.classes)

    @property
    def mirrored(self) -> dict[str, str]:
        """Each class a horizontal flip turns into another, mapped to that one (both ways)."""
        if self.flip_pairs is None:
            return {c: p for c, p in lateral_partners(self.classes).items() if p is not None}
        return {**dict(self.flip_pairs), **{b: a for a, b in self.flip_pairs}}

    @property
    def unpaired_sides(self) -> tuple[str, ...]:
        """Classes whose names say a side and that have no mirror class: a flip would teach
        each on the other side. None when ``flip_pairs`` is given (the user's word)."""
        if self.flip_pairs is not None:
            return ()
        return tuple(c for c, p in lateral_partners(self.classes).items() if p is None)


@dataclass(frozen=True)
class Init:
    """A fine-tune starting point. ``pretrained_key``: the ``pretrained.<key>`` field of the
    fine-tune config that names its file (the init's own name is not an identifier for
    ``muscle--``); ``made_by``: the stage that writes it under the run root, for inits that
    this pipeline produces."""

    name: str
    title: str
    pretrained_key: str | None = None
    made_by: str | None = None


@dataclass(frozen=True)
class Backbone:
    name: str  # what --backbone, run directories and results.json say
    arch: str  # torchvision's builder, model.arch
    title: str


# Every dataset, in data_prep's order: MD-MoCo's pre-training sets (the paper's all nine).
DATASETS: tuple[str, ...] = NAMES
# The paper's Z-score of every image's uint8 gray levels, over its training sets.
PIXEL_MEAN, PIXEL_STD = 122.786, 18.390
# In the order of the grid, of the continual stage's fixed (MUSCLE⁻⁻) visits and of the report.
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("pneumonia", "pneumonia", "classification", "Pneumonia", ("normal", "pneumonia"), 32),
    Task("mura", "mura", "classification", "MURA", ("negative", "positive"), 32),
    Task("lung", "chestmasks", "segmentation", "Lung", ("background", "lung"), 16),
    # TBX11K's third category (PulmonaryTuberculosis: activity undetermined) is neither class
    # the paper scores: not learned, not evaluated, and the stages say so at start.
    Task("tbx", "tbx11k", "detection", "TBX", ("active", "latent"), 8, box_categories=(1, 2)),
)}
# In the paper's row order (Tables 2-3).
INITS: dict[str, Init] = {i.name: i for i in (
    Init("scratch", "Scratch"),
    Init("imagenet", "ImageNet", "imagenet"),
    Init("mdmoco", "MD-MoCo", "mdmoco", "the MD-MoCo stage"),
    Init("muscle--", "MUSCLE⁻⁻", "muscle_minus", "the continual stage with cl.method=muscle--"),
    Init("muscle", "MUSCLE", "muscle", "the continual stage"),
)}
BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("r18", "resnet18", "ResNet-18"),
    Backbone("r50", "resnet50", "ResNet-50"),
)}

TASK_NAMES = tuple(TASKS)
INIT_NAMES = tuple(INITS)
BACKBONE_NAMES = tuple(BACKBONES)
ARCHS = tuple(b.arch for b in BACKBONES.values())
# The kNN monitor votes one class label per image: the classification tasks.
KNN_TASKS = tuple(t.name for t in TASKS.values() if t.kind == "classification")
# The continual stage's methods; the fine-tune inits of the same names start from their exports.
CL_METHODS = ("muscle", "muscle--")

# The fine-tune grid, (task, init, backbone) by array index: backbone-major, then task, then
# init, so each backbone's elements are one contiguous range of Slurm array indices.
GRID: tuple[tuple[str, str, str], ...] = tuple(
    (t, i, b) for b in BACKBONE_NAMES for t in TASK_NAMES for i in INIT_NAMES)

EXPORTED_BACKBONE = "backbone_torchvision.pth"  # a stage's torchvision state dict, in its run dir


def grid_index(task: str, init: str, backbone: str) -> int:
    """``backbone * len(TASKS) * len(INITS) + task * len(INITS) + init``, each by its
    position in this module's order (slurm/finetune_array.sh states it with the numbers)."""
    return ((BACKBONE_NAMES.index(backbone) * len(TASKS) + TASK_NAMES.index(task)) * len(INITS)
            + INIT_NAMES.index(init))


def grid_indices(backbone: str) -> range:
    """The array indices of ``backbone``'s part of the grid."""
    per_backbone = len(TASKS) * len(INITS)
    first = BACKBONE_NAMES.index(backbone) * per_backbone
    return range(first, first + per_backbone)


# --- the run layout: pure naming, no check of the names, so that templates can be built by
# passing "{root}" and "{backbone}" through (see pretrained_template).

def mdmoco_dir(root: str | Path, backbone: str) -> Path:
    return Path(root) / f"mdmoco_{backbone}"


def continual_dir(root: str | Path, backbone: str, method: str = "muscle") -> Path:
    """MUSCLE's run directory, or with ``method`` another method's, named after it."""
    suffix = "" if method == "muscle" else f"_{method}"
    return Path(root) / f"continual_{backbone}{suffix}"


def finetune_root(root: str | Path) -> Path:
    return Path(root) / "finetune"


@dataclass(frozen=True)
class FinetuneRun:
    """One fine-tune's identity: what ``--task --init --backbone --protocol --fraction`` select,
    what a grid index stands for, the folder it writes (``name``) and the keys its results.json
    records, read back by the report. One type from the launcher to the report, so that the
    name of a run is derived in one place."""

    task: str
    init: str
    backbone: str
    protocol: str = "finetune"
    fraction: float = 1.0

    @property
    def arch(self) -> str:
        return BACKBONES[self.backbone].arch

    @property
    def setting(self) -> tuple[str, float]:
        """How it trains, (protocol, fraction): what the report gives tables of their own."""
        return self.protocol, self.fraction

    @property
    def setting_suffix(self) -> str:
        """``_linear`` for a linear probe, then ``_Npct`` for a fraction of the training split;
        empty for the paper's setting (whole network, all labels)."""
        return (("" if self.protocol == "finetune" else f"_{self.protocol}")
                + ("" if self.fraction == 1 else f"_{self.fraction * 100:g}pct"))

    @property
    def name(self) -> str:
        """``TASK_BB_INIT`` and the setting's suffix (``mura_r18_mdmoco_linear_10pct``): the
        paper's runs keep their names."""
        return f"{self.task}_{self.backbone}_{self.init}{self.setting_suffix}"

    def dir(self, root: str | Path) -> Path:
        """Its run directory under the run root ``root``."""
        return finetune_root(root) / self.name

    def argv(self) -> list[str]:
        """The fine-tune stage's arguments that select it (``repr``: the fraction exactly)."""
        return ["--task", self.task, "--init", self.init, "--backbone", self.backbone,
                "--protocol", self.protocol, "--fraction", repr(self.fraction)]


# MultiMix's saliency bridge: the paper's, zeros in place of the map (the control), none.
MULTIMIX_BRIDGES = ("saliency", "image", "none")


def multimix_root(root: str | Path) -> Path:
    return Path(root) / "multimix"


@dataclass(frozen=True)
class MultiMixRun:
    """One MultiMix run's identity: the two tasks it joins, the init and backbone of its
    encoder, the share of each training split whose labels it uses (the rest unlabelled)."""

    init: str
    backbone: str
    fraction: float = 1.0
    cls_task: str = "pneumonia"
    seg_task: str = "lung"

    @property
    def arch(self) -> str:
        return BACKBONES[self.backbone].arch

    @property
    def name(self) -> str:
        """``CLS+SEG_BB_INIT``, and ``_Npct`` below all labels:
        ``pneumonia+lung_r18_muscle_10pct``."""
        pct = "" if self.fraction == 1 else f"_{self.fraction * 100:g}pct"
        return f"{self.cls_task}+{self.seg_task}_{self.backbone}_{self.init}{pct}"

    def dir(self, root: str | Path) -> Path:
        return multimix_root(root) / self.name


def exported_backbone(run_dir: str | Path) -> Path:
    return Path(run_dir) / EXPORTED_BACKBONE


def init_run_dir(root: str | Path, backbone: str, init: str) -> Path:
    """The run directory whose export the fine-tune ``init`` starts from (an init the pipeline
    makes: see ``Init.made_by``)."""
    if init == "mdmoco":
        return mdmoco_dir(root, backbone)
    if init in CL_METHODS:
        return continual_dir(root, backbone, init)
    raise ValueError(f"{init!r} is not made under the run root (one of mdmoco, "
                     f"{', '.join(CL_METHODS)})")


def pretrained_template(init: str) -> str:
    """The fine-tune config's default ``pretrained.<key>`` for ``init``, with the ``{root}``
    and ``{backbone}`` placeholders the stage fills from ``run.root`` and ``--backbone``."""
    return str(exported_backbone(init_run_dir("{root}", "{backbone}", init)))


def default_config(stage: str, backbone: str) -> str:
    """The config a stage of the pipeline uses for ``backbone`` unless told otherwise, relative
    to the repository root. ``stage``: mdmoco, continual or finetune (one file for both)."""
    if stage == "finetune":
        return "configs/finetune.yaml"
    if stage not in ("mdmoco", "continual"):
        raise ValueError(f"stage {stage!r} is not one of mdmoco, continual, finetune")
    return f"configs/{stage}_{backbone}.yaml"


def layout(root: str | Path, backbone: str) -> dict[str, str]:
    """What ``slurm/pipeline.sh`` needs for one backbone under ``root``: its run directories,
    MD-MoCo's export (the continual stage's ``model.init``), the fine-tune root, the default
    configs and the backbone's fine-tune array indices."""
    indices = grid_indices(backbone)
    return {
        "MDMOCO_DIR": str(mdmoco_dir(root, backbone)),
        "MDMOCO_EXPORT": str(exported_backbone(mdmoco_dir(root, backbone))),
        "MUSCLE_DIR": str(continual_dir(root, backbone, "muscle")),
        "MUSCLE_MINUS_DIR": str(continual_dir(root, backbone, "muscle--")),
        "FINETUNE_ROOT": str(finetune_root(root)),
        "FINETUNE_ARRAY": f"{indices.start}-{indices.stop - 1}",
        "FINETUNE_ELEMENTS": str(len(indices)),
        "MDMOCO_CONFIG": default_config("mdmoco", backbone),
        "CL_CONFIG": default_config("continual", backbone),
        "FINETUNE_CONFIG": default_config("finetune", backbone),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m muscle_hpc.registry",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    lay = sub.add_parser("layout", help="one backbone's run layout as KEY=VALUE lines")
    lay.add_argument("--root", default="runs")
    lay.add_argument("--backbone", default="r50")
    args = p.parse_args(argv)
    # One line on stderr, no usage: the shell scripts pass it on as their own error.
    if args.backbone not in BACKBONES:
        print(f"registry: error: --backbone: {args.backbone} is not one of "
              f"{', '.join(BACKBONE_NAMES)}", file=sys.stderr)
        return 2
    if "\n" in args.root:
        print("registry: error: --root: a line break in a path would end its line",
              file=sys.stderr)
        return 2
    for key, value in layout(args.root, args.backbone).items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
