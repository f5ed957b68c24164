"""Typed YAML configs with ``a.b=value`` overrides, checked before anything runs.

A config is a tree of frozen dataclasses (a *schema*); ``load(path, overrides, schema)`` reads
the YAML, applies the overrides (each value parsed by ``yaml.safe_load``, so ``model.K=4096``,
``model.mlp=false`` and ``data.datasets=[nih,mura]`` mean what they say) and converts every
value to its field's type. Any mistake is a ``ConfigError`` of one line naming the key: a typo
in a key fails here, with the closest valid key suggested, instead of silently using a default
hours into a Slurm job. Fields declare ranges and choices with ``opt()``; later stages reuse
the loader with their own schemas. Checks that relate fields to each other or to the world size
(``check_moco``, ``deepspeed_config``) come after loading, since overrides may change either.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from muscle_hpc import registry

# The registry's names, as this module's readers have always imported them.
DATASETS = registry.DATASETS
TASK_NAMES = registry.TASK_NAMES
KNN_TASKS = registry.KNN_TASKS
INITS = registry.INIT_NAMES
BACKBONES = {b.name: b.arch for b in registry.BACKBONES.values()}  # r18 -> resnet18

# What a name that becomes a directory may be (a task of the user's).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

# Values that look valid but are refused, each with its one-line reason.
_FP16_WHY = ("fp16 is not supported: its loss scaler skips overflowing steps, which would still "
             "update MoCo's key encoder and queue; use bf16")
_ZERO3_WHY = ("ZeRO stage 3 is not supported: it shards the query encoder's weights, which the "
              "momentum update of MoCo's key encoder reads whole on every rank; use 0-2")


class ConfigError(ValueError):
    """A config mistake, said in one line that names the key."""


def opt(default: Any = dataclasses.MISSING, *, lo: float | None = None, hi: float | None = None,
        gt: float | None = None, choices: tuple | None = None, refuse: dict | None = None,
        empty: str | None = None):
    """A dataclass field with checks: ``lo <= v <= hi``, ``v > gt``, ``v in choices`` (for a
    list, every item), and ``refuse``: values refused with their own reason. ``empty``: what
    the empty string means, for the message when a string key is given no value."""
    meta = {"lo": lo, "hi": hi, "gt": gt, "choices": choices, "refuse": refuse or {},
            "empty": empty}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    root: str = "shards"
    # The paper's nine by default; any dataset converted under root may be added (one of the
    # user's: python -m data_prep.convert --layout ...). A name with no shards is refused at
    # start, naming the conversion that would make them.
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    # Also read each dataset's ``extra`` shard (images of no task, e.g. TBX11K's ~10k healthy,
    # sick and test images): not the paper's Table 1, which pre-trains on the training sets.
    pretrain_extra: bool = False
    batch_size: int = opt(256, lo=1)  # global, over all ranks
    num_workers: int = opt(2, lo=1)  # FFCV decoding threads per rank
    max_degrees: float = opt(10.0, lo=0.0, hi=180.0)  # each view's rotation: +-this many degrees
    flip_prob: float = opt(0.5, lo=0.0, hi=1.0)  # each view's horizontal flip
    # The two views' recipe (muscle_hpc/data/augment.py; README, fidelity): paper (flip and
    # rotation: the views share their gray-level histogram and position, cues MoCo can match
    # instead of anatomy), mococxr (MoCo-CXR's: + a random square crop of side min(H, W),
    # views min(H, W) square), mocov2 (MoCo v2's: resized crop, brightness/contrast/gamma,
    # blur, flip). max_degrees is the paper's and mococxr's rotation; flip_prob every recipe's.
    views: str = opt("paper", choices=("paper", "mococxr", "mocov2"))
    # The Z-score of every image's uint8 gray levels (the paper's values).
    mean: float = 122.786
    std: float = opt(18.390, gt=0.0)
    seed: int = 0  # the loader's shuffling and views
    # N > 0: no shards are read; N random images per split are made in memory instead
    # (data/synthetic.py), to check GPUs, NCCL, Slurm and checkpoints before any dataset is
    # converted, or where FFCV is not installed. Nothing is learned from them.
    synthetic: int = opt(0, lo=0)
    synthetic_width: int = opt(800, lo=32)
    synthetic_height: int = opt(500, lo=32)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = opt("resnet50", choices=registry.ARCHS)
    dim: int = opt(128, lo=1)  # the embedding's size (MoCo's feature dimension)
    K: int = opt(65536, lo=1)  # keys in the queue: the negatives; the global batch divides it
    m: float = opt(0.999, lo=0.0, hi=1.0)  # the key encoder's momentum
    T: float = opt(0.2, gt=0.0)  # the softmax temperature (MoCo v2's)
    mlp: bool = True  # MoCo v2's 2-layer projection head; false: MoCo v1's linear one
    # Batch norm across ranks: shuffle (the reference's shuffle-BN over bn_groups groups) or
    # sync (SyncBatchNorm over the global batch, GPU only; needs bn_groups=1).
    bn: str = opt("shuffle", choices=("shuffle", "sync"))
    # Shuffle-BN groups over the global batch, at least (rounded up to a whole number per rank:
    # 8 groups on 1, 2, 4 or 8 ranks, 16 on 16). Each key is normalised with a random group's
    # statistics, which are its query's with probability 1/groups: with one group (one rank,
    # bn_groups=1) MoCo can match a query to its key through the batch statistics alone (MoCo
    # 3.3). 8: MoCo's 8-GPU reference (8 groups of 32) and its one-GPU demo (8 SplitBatchNorm
    # groups). 1: one group per rank, the reference on any number of GPUs.
    bn_groups: int = opt(8, lo=1)


@dataclass(frozen=True)
class OptimConfig:
    lr_base: float = opt(0.03, gt=0.0)  # per 256 images; see MocoConfig.effective_lr
    momentum: float = opt(0.9, lo=0.0, hi=1.0)
    weight_decay: float = opt(1e-4, lo=0.0)
    epochs: int = opt(200, lo=1)
    warmup_epochs: int = opt(0, lo=0)
    schedule: str = opt("cosine", choices=("cosine",))


_KNN_WHY = "{} is a {} task; the kNN monitor needs one class label per image: use {}"


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/mdmoco"
    checkpoint_every_steps: int = opt(1000, lo=1)
    log_every_steps: int = opt(50, lo=1)
    image_grid_every_steps: int = opt(1000, lo=0)  # 0: never
    # End after this many steps (0: run the whole schedule, which still spans optim.epochs):
    # smoke tests and demos. A later start with a larger cap continues the same run.
    max_steps: int = opt(0, lo=0)
    precision: str = opt("auto", choices=("auto", "fp32", "bf16"), refuse={"fp16": _FP16_WHY})
    zero_stage: int = opt(0, lo=0, hi=2, refuse={3: _ZERO3_WHY})
    # GPU kernels that repeat bit for bit, so a resumed run equals an uninterrupted one (CPU
    # runs always do); costs speed (README, "Exact resume"). Off: cuDNN autotunes instead.
    deterministic: bool = False
    # Train on CPU when this host has no GPU. Off: such a start is refused, since a GPU job
    # that landed without its GPUs (no --gpus in sbatch) would otherwise train the paper's
    # 800x500 ResNet-50 on CPU for weeks, silently. The demo and the tests turn it on.
    allow_cpu: bool = False
    seed: int = 0
    # Representation monitors (README, "Is pre-training working?"). Every this many steps, at
    # step 0 of a new run and at the end: a weighted kNN (k, T: the InstDisc/DINO protocol) of
    # each monitored task set's valid images over its training images, on the query encoder's
    # pooled features. Embedding an image is a forward pass, ~1/4 of what a training image
    # costs in MoCo, so N images every S steps of global batch B cost ~N/(4·S·B) of training:
    # 2 tasks x 2 splits x 1000 every 1000 steps of 256 is ~0.4 % (reading each split up to
    # its last picked image adds a little). 0: never.
    monitor_every_steps: int = opt(1000, lo=0)
    monitor_tasks: list[str] = opt(
        list(KNN_TASKS), choices=KNN_TASKS,
        refuse={t.name: _KNN_WHY.format(t.name, t.kind, ", ".join(KNN_TASKS))
                for t in registry.TASKS.values() if t.name not in KNN_TASKS})
    # Images embedded per split and task: that many spread evenly over the split (the same
    # ones at every step; not its first ones, which run class by class), all if fewer.
    monitor_max_images: int = opt(1000, lo=1)
    monitor_knn_k: int = opt(20, lo=1)
    monitor_knn_t: float = opt(0.07, gt=0.0)
    # Warn when collapse_std x sqrt(model.dim) is below this: ~1 for embeddings spread over the
    # sphere, 0 when all images get one embedding, sqrt(r/dim) when they span r of dim
    # dimensions. A Kaiming-initialised ResNet already maps X-rays to nearly one direction
    # (0.18-0.25 measured, ResNet-18 and -50): 0.05, 4x below that, is a collapse, not a start.
    monitor_collapse_warn: float = opt(0.05, lo=0.0)


@dataclass(frozen=True)
class MocoConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def effective_lr(self) -> float:
        """MoCo's linear scaling rule: ``lr_base`` is per 256 images of global batch."""
        return self.optim.lr_base * self.data.batch_size / 256


# --- the continual-learning stage ----------------------------------------------------------

_CL_ZERO3_WHY = ("ZeRO stage 3 is not supported: it shards the backbone's weights, which L2-SP "
                 "reads whole on every rank; use 0-2")


def per_task_section(name: str, entry: type, doc: str) -> type:
    """A frozen section with one ``entry`` per registry task, in its order, each defaulting to
    ``entry(task's default batch)``. Built rather than written out so that a new task gets its
    config keys from its registry entry alone; the price is a class that editors and type
    checkers see without fields (``tasks.<name>`` is read through ``getattr`` everywhere)."""
    cls = dataclasses.make_dataclass(
        name, [(t.name, entry, field(default_factory=functools.partial(entry, t.batch_size)))
               for t in registry.TASKS.values()], frozen=True)
    cls.__module__, cls.__doc__ = __name__, doc  # so that pickle finds it, and help() says
    return cls


@dataclass(frozen=True)
class TaskBatch:
    batch_size: int = opt(16, lo=1)  # global, over all ranks


TasksConfig = per_task_section("TasksConfig", TaskBatch, "Each task's global batch.")


@dataclass(frozen=True)
class TaskDataConfig:
    """The task shards and their loading, shared by the continual and fine-tune stages."""
    root: str = "shards"
    num_workers: int = opt(2, lo=1)
    flip_prob: float = opt(0.5, lo=0.0, hi=1.0)
    mean: float = 122.786
    std: float = opt(18.390, gt=0.0)
    seed: int = 0
    # as DataConfig.synthetic: random images instead of the shards
    synthetic: int = opt(0, lo=0)
    synthetic_width: int = opt(800, lo=32)
    synthetic_height: int = opt(500, lo=32)


@dataclass(frozen=True)
class ClDataConfig(TaskDataConfig):
    tasks: list[str] = opt(list(TASK_NAMES), choices=TASK_NAMES)  # MUSCLE⁻⁻ visits this order


@dataclass(frozen=True)
class HeadsConfig:
    rois_per_image: int = opt(512, lo=1)  # Faster R-CNN's box-head sample (torchvision's)
    test_proposals: int = opt(1000, lo=1)  # proposals scored per image in evaluation (same)
    # The trunk's output stride under the DeepLab-V3 head (segmentation batches only; the
    # weights are the same at every stride): 8 as torchvision's deeplabv3 (ASPP 12/24/36),
    # 16 (6/12/18) or 32 (3/6/9, the undilated trunk: cheapest, coarsest masks).
    seg_output_stride: int = opt(8, choices=(8, 16, 32))
    # Regression heads' loss on the standardized target: l1, the reported MAE's own measure and
    # robust to outliers, or mse (smooth near the optimum, outliers weigh more).
    regression_loss: str = opt("l1", choices=("l1", "mse"))
    # With more than one rank: batch-norm statistics over the global batch (torch's
    # SyncBatchNorm on GPU, an all-reduce of the sums on CPU), so a rank may hold one image
    # and the statistics stay those of the task's global batch.
    sync_bn: bool = True


@dataclass(frozen=True)
class ClModelConfig(HeadsConfig):
    arch: str = opt("resnet50", choices=registry.ARCHS)
    # The MD-MoCo backbone (its export); empty: Kaiming init (no pre-training).
    init: str = opt(str(registry.exported_backbone(registry.mdmoco_dir("runs", "r50"))),
                    empty="no pre-training, Kaiming init")


@dataclass(frozen=True)
class MetricsConfig:
    """Readings of the paper's metrics where it does not say which (README, fidelity)."""
    # Lung Dice: the mean of every image's Dice, or one Dice over all pixels of the split.
    dice: str = opt("per_image", choices=("per_image", "pooled"))
    # TB AP: interpolated precision averaged at 101 recalls (COCO, pycocotools) or 11 (VOC07).
    ap_recall_points: int = opt(101, choices=(11, 101))


@dataclass(frozen=True)
class ClMethodConfig:
    # muscle--: fixed task order, one plain cosine decay over the stage, no L2-SP (the ablation).
    method: str = opt("muscle", choices=registry.CL_METHODS)
    rounds: int = opt(10, lo=1)
    # Eq. 2, λ(α‖w - w⁰‖² + (1 - α)‖w‖²), has no ½: its gradient is 2λα(w - w⁰) + 2λ(1 - α)w.
    # λ = 0.05, α = 0.999 give 0.0999(w - w⁰) + 1e-4 w: the L2-SP paper's pull (its α = 0.1 on
    # ½‖w - w⁰‖²) and SGD's weight decay 1e-4, the decay MUSCLE-- gives the backbone too.
    l2sp_alpha: float = opt(0.999, lo=0.0, hi=1.0)
    l2sp_weight: float = opt(0.05, lo=0.0)


@dataclass(frozen=True)
class ClOptimConfig:
    lr_max: float = opt(0.01, gt=0.0)
    lr_min: float = opt(1e-4, lo=0.0)
    # Eq. 1's period T, in steps of the visit: 2 = each visit falls from lr_max to lr_min
    # (half a period) and the next restarts at lr_max; 1 = down and back up within a visit.
    period_visits: float = opt(2.0, gt=0.0)
    momentum: float = opt(0.9, lo=0.0, hi=1.0)
    weight_decay: float = opt(1e-4, lo=0.0)  # heads; the backbone too under muscle--


@dataclass(frozen=True)
class ClRunConfig:
    dir: str = str(registry.continual_dir("runs", "r50"))
    checkpoint_every_steps: int = opt(500, lo=1)
    log_every_steps: int = opt(20, lo=1)
    # Steps per visit (0: one epoch of the task's training set, the paper's): demos and tests.
    visit_steps: int = opt(0, lo=0)
    max_steps: int = opt(0, lo=0)  # end early after this many steps (0: the whole stage)
    validate: bool = True  # every task after every visit
    precision: str = opt("auto", choices=("auto", "fp32", "bf16"), refuse={"fp16": _FP16_WHY})
    zero_stage: int = opt(0, lo=0, hi=2, refuse={3: _CL_ZERO3_WHY})
    # as RunConfig.deterministic and RunConfig.allow_cpu
    deterministic: bool = False
    allow_cpu: bool = False
    seed: int = 0


@dataclass(frozen=True)
class ContinualConfig:
    data: ClDataConfig = field(default_factory=ClDataConfig)
    model: ClModelConfig = field(default_factory=ClModelConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    cl: ClMethodConfig = field(default_factory=ClMethodConfig)
    optim: ClOptimConfig = field(default_factory=ClOptimConfig)
    eval: MetricsConfig = field(default_factory=MetricsConfig)
    run: ClRunConfig = field(default_factory=ClRunConfig)

    @property
    def muscle(self) -> bool:
        """The full method (reshuffled cyclic schedule and L2-SP), not the MUSCLE⁻⁻ ablation."""
        return self.cl.method == "muscle"

    def batch_size(self, task: str) -> int:
        return getattr(self.tasks, task).batch_size


def check_task_batch(key: str, batch: int, world_size: int, sync_bn: bool) -> None:
    """A task's global ``batch`` must split evenly into at least one image per rank, and batch
    norm needs two values per channel: two images in all (an ASPP pooling branch sees one value
    per image), on one rank unless ``sync_bn`` pools the statistics over ranks."""
    if batch < 2:
        raise ConfigError(f"{key}: a global batch of {batch}; batch norm needs at least 2 images")
    if batch < world_size:
        raise ConfigError(f"{key}: global batch {batch} over {world_size} ranks is less than one "
                          f"image per rank; run this task on at most {batch} ranks, or give it a "
                          f"global batch that {world_size} ranks divide")
    if batch % world_size:
        raise ConfigError(f"{key}: global batch {batch} is not divisible by the world size "
                          f"{world_size}")
    if batch // world_size < 2 and not sync_bn:
        raise ConfigError(f"{key}: {batch} over {world_size} ranks is 1 image per rank, which "
                          f"batch norm can use only with model.sync_bn=true (statistics over "
                          f"the global batch)")


def check_continual(cfg: ContinualConfig, world_size: int) -> None:
    """What a loaded continual config must also satisfy on ``world_size`` ranks."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    for task in cfg.data.tasks:
        check_task_batch(f"tasks.{task}.batch_size", cfg.batch_size(task), world_size,
                         cfg.model.sync_bn)
    if cfg.optim.lr_min > cfg.optim.lr_max:
        raise ConfigError(f"optim.lr_min: {cfg.optim.lr_min} is above optim.lr_max "
                          f"{cfg.optim.lr_max}")


# --- the fine-tuning stage -----------------------------------------------------------------

_FT_ZERO3_WHY = ("ZeRO stage 3 is not supported: evaluation runs the model outside DeepSpeed's "
                 "forward, on whole weights; use 0-2")


@dataclass(frozen=True)
class FtTask:
    """One task of the fine-tune stage: how it trains, and, for a task that is not one of the
    paper's four, what it is (its *definition*: the keys of ``registry.Task``). A paper task
    takes its definition from the registry; any key given here replaces the registry's."""
    batch_size: int = opt(16, lo=1)  # global, over all ranks
    epochs: int = opt(20, lo=1)
    lr: float = opt(0.01, gt=0.0)
    lr_step_epochs: int = opt(10, lo=1)  # the LR is multiplied by optim.lr_gamma this often
    # The definition (registry.Task): the converted dataset it reads, its kind and classes.
    dataset: str = ""
    kind: str = opt("", choices=("", *registry.KINDS))
    # label order (segmentation: background first); left out: its dataset's, as converted
    classes: list[str] | None = None
    title: str = ""  # the report's name for it (default: the task's name)
    headline: str = ""  # the metric that selects the best epoch (default: the kind's)
    box_categories: list[int] | None = None  # detection: the shard category id of each class
    target: str = ""  # regression: the shard field it predicts (default: value)
    # {class: its mirror class}: what a horizontal flip (data.flip_prob) turns into what. Left
    # out: read from the class names (registry.lateral_partners, left_x <-> right_x); {}: none.
    flip_pairs: dict[str, str] | None = None


def _default_ft_tasks() -> dict[str, FtTask]:
    return {t.name: FtTask(batch_size=t.batch_size) for t in registry.TASKS.values()}


_DEFINITION_KEYS = ("dataset", "kind", "classes", "title", "headline", "box_categories",
                    "target")


def task_definition(name: str, entry: FtTask) -> registry.Task:
    """``tasks.<name>`` as a ``registry.Task``: the paper's definition with the keys the entry
    sets, or the entry's own for a new task. Raises ``ConfigError`` on one that is incomplete
    or contradicts itself (a kind without its classes, a headline the kind does not report)."""
    given = {k: getattr(entry, k) for k in _DEFINITION_KEYS if getattr(entry, k)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    if entry.flip_pairs is not None:  # {} is a statement too: no class mirrors another
        given["flip_pairs"] = tuple(entry.flip_pairs.items())
    key = f"tasks.{name}"
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"{key}: a task name is letters, digits, '_' and '-' (it names run "
                          f"directories), not {name!r}")
    if name in registry.TASKS:
        defn = dataclasses.replace(registry.TASKS[name], batch_size=entry.batch_size, **given)
    else:
        missing = [k for k in ("dataset", "kind") if k not in given]
        if missing:
            raise ConfigError(f"{key}: not one of the paper's tasks "
                              f"({', '.join(registry.TASK_NAMES)}), so it needs "
                              f"{' and '.join(missing)} (see the README, your own data)")
        defn = registry.Task(name=name, title=given.pop("title", name),
                             classes=given.pop("classes", ()), batch_size=entry.batch_size,
                             **given)
    if defn.classes or defn.kind == "regression":
        check_definition(defn)
    return defn


def with_classes(defn: registry.Task, names) -> registry.Task:
    """``defn`` with the class names its dataset's manifest gives, for a task of the user's
    that lists none (``tasks.<name>.classes`` may be left out: the converter recorded them)."""
    if defn.classes or defn.kind == "regression":
        return defn
    defn = dataclasses.replace(defn, classes=tuple(names))
    check_definition(defn, " (from its dataset's manifest)")
    return defn


def check_definition(defn: registry.Task, where: str = "") -> None:
    """A definition must hold together: enough classes for its kind, distinct names, one box
    category per detection class, a headline among its metrics. Raises ``ConfigError``."""
    key = f"tasks.{defn.name}"
    least = {"classification": 2, "multilabel": 1, "regression": 0, "segmentation": 2,
             "detection": 1}[defn.kind]
    if len(defn.classes) < least:
        raise ConfigError(f"{key}.classes: a {defn.kind} task needs at least {least} "
                          f"(segmentation: the background first), got {list(defn.classes)}"
                          f"{where}")
    if defn.kind == "regression" and defn.classes:
        raise ConfigError(f"{key}.classes: a regression task has none (it predicts the "
                          f"shard field {defn.target!r})")
    if len(set(defn.classes)) != len(defn.classes) or any(
            not c or "/" in c or "\n" in c for c in defn.classes):
        raise ConfigError(f"{key}.classes: names must be distinct, non-empty, without '/': "
                          f"{list(defn.classes)}{where}")
    if defn.kind == "detection" and len(defn.box_categories) != len(defn.classes):
        raise ConfigError(f"{key}.box_categories: one shard category id per class "
                          f"({len(defn.classes)}), got {list(defn.box_categories)}")
    if defn.headline not in defn.metrics:
        raise ConfigError(f"{key}.headline: {defn.headline!r} is not one of its metrics "
                          f"({', '.join(defn.metrics)})")
    paired = [c for pair in defn.flip_pairs or () for c in pair]
    foreground = defn.classes[1:] if defn.kind == "segmentation" else defn.classes
    if set(paired) - set(foreground) or len(set(paired)) != len(paired):
        raise ConfigError(f"{key}.flip_pairs: {{class: its mirror class}}, each of "
                          f"{list(foreground)} at most once and never its own mirror; got "
                          f"{dict(defn.flip_pairs or ())}{where}")


def check_flips(defn: registry.Task, flip_prob: float) -> None:
    """A task whose classes name a side and have no mirror class cannot be flipped: the
    flip would put each on the other side of the body under its own name. Raises
    ``ConfigError``."""
    lonely = defn.unpaired_sides
    if flip_prob > 0 and lonely:
        which = (f"class {lonely[0]} names a side and has" if len(lonely) == 1 else
                 f"classes {', '.join(lonely)} name a side and have")
        raise ConfigError(f"tasks.{defn.name}.flip_pairs: {which} no mirror class among "
                          f"{list(defn.classes)}, so a flip (data.flip_prob={flip_prob:g}) "
                          f"would show it on the other side under its own name; give "
                          f"tasks.{defn.name}.flip_pairs ({{class: its mirror}}, {{}} if none "
                          f"mirrors) or set data.flip_prob=0")


@dataclass(frozen=True)
class PretrainedConfig:
    """Where each init's backbone is. ``{root}`` is ``run.root``, ``{backbone}`` r18 or r50.
    One field per ``registry.Init.pretrained_key``; the defaults are the registry's layout."""
    mdmoco: str = registry.pretrained_template("mdmoco")
    muscle: str = registry.pretrained_template("muscle")
    muscle_minus: str = registry.pretrained_template("muscle--")
    # A torchvision ImageNet state dict; empty: torchvision's file in the torch hub cache.
    imagenet: str = ""


@dataclass(frozen=True)
class FtOptimConfig:
    momentum: float = opt(0.9, lo=0.0, hi=1.0)
    weight_decay: float = opt(1e-4, lo=0.0)
    lr_gamma: float = opt(0.1, gt=0.0, hi=1.0)


@dataclass(frozen=True)
class FtEvalConfig(MetricsConfig):
    bootstrap: int = opt(100, lo=0)  # resamples for the 95% CIs of the test metrics (0: none)
    seed: int = 0
    samples: int = opt(8, lo=0, hi=64)  # test images kept for the segmentation overlays


@dataclass(frozen=True)
class FtRunConfig:
    root: str = "runs"  # the pipeline's run directory: inputs and finetune/<task>_<bb>_<init>
    checkpoint_every_steps: int = opt(500, lo=1)
    log_every_steps: int = opt(20, lo=1)
    max_steps_per_epoch: int = opt(0, lo=0)  # 0: whole epochs (the paper's); demos and tests
    precision: str = opt("auto", choices=("auto", "fp32", "bf16"), refuse={"fp16": _FP16_WHY})
    zero_stage: int = opt(0, lo=0, hi=2, refuse={3: _FT_ZERO3_WHY})
    # as RunConfig.deterministic and RunConfig.allow_cpu
    deterministic: bool = False
    allow_cpu: bool = False
    seed: int = 0


PROTOCOLS = registry.PROTOCOLS


@dataclass(frozen=True)
class GridConfig:
    """The fine-tune grid (``--list``, ``--grid-index``, the Slurm array): every combination,
    backbone-major, then protocol, fraction, task, init. The defaults are the paper's 40 runs.
    ``protocols``: ``finetune`` trains the whole network; ``linear`` is the linear probe (the
    backbone frozen with its batch-norm statistics, only the head trained: MoCo's test of a
    representation). ``fractions``: the share of each training split used (patient-grouped,
    nested, the same for every init: 0.01 is part of 0.1)."""
    tasks: list[str] = field(default_factory=lambda: list(TASK_NAMES))
    inits: list[str] = opt(list(INITS), choices=INITS)
    backbones: list[str] = opt(list(BACKBONES), choices=tuple(BACKBONES))
    protocols: list[str] = opt(["finetune"], choices=PROTOCOLS)
    fractions: list[float] = opt([1.0], gt=0.0, hi=1.0)


@dataclass(frozen=True)
class FinetuneConfig:
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    model: HeadsConfig = field(default_factory=HeadsConfig)
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    tasks: dict[str, FtTask] = field(default_factory=_default_ft_tasks)
    grid: GridConfig = field(default_factory=GridConfig)
    optim: FtOptimConfig = field(default_factory=FtOptimConfig)
    eval: FtEvalConfig = field(default_factory=FtEvalConfig)
    run: FtRunConfig = field(default_factory=FtRunConfig)

    def task(self, name: str) -> FtTask:
        return self.tasks[name]

    def definition(self, name: str) -> registry.Task:
        return task_definition(name, self.tasks[name])


def check_finetune(cfg: FinetuneConfig, task: str | None = None, world_size: int = 1) -> None:
    """What a loaded fine-tune config must also satisfy: every task defined and the grid's
    tasks among them, and for ``task`` on ``world_size`` ranks, its batch."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    for name in cfg.tasks:
        cfg.definition(name)
    for key, names in (("grid.tasks", cfg.grid.tasks), ("--task", [task] if task else [])):
        unknown = [t for t in names if t not in cfg.tasks]
        if unknown:
            raise ConfigError(f"{key}: {unknown[0]!r} is not a task of this config "
                              f"({', '.join(cfg.tasks)}; define it under tasks)")
    if task:
        check_task_batch(f"tasks.{task}.batch_size", cfg.task(task).batch_size, world_size,
                         cfg.model.sync_bn)


def expand_path(key: str, template: str, **values: str) -> str:
    """``template`` with ``{name}`` filled from ``values``; any other placeholder is refused."""
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{key}: {template!r} has a placeholder other than "
                          f"{', '.join('{' + k + '}' for k in values)} ({e})") from None


# --- loading -------------------------------------------------------------------------------

def load(path: str | Path | None, overrides: list[str] = (), schema: type = MocoConfig):
    """``schema`` filled from the YAML at ``path`` (``None``: defaults only), then overrides.
    A file may start from another: ``base: finetune.yaml`` (relative to the file) reads that
    one first and lays this one's sections over it, key by key."""
    data = {} if path is None else _read(Path(path), ())
    for item in overrides:
        _apply_override(data, item, schema)
    return _build(schema, data, "")


def _read(p: Path, including: tuple[Path, ...]) -> dict:
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found"
                          + (f" (the base of {including[-1]})" if including else "")) from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: YAML syntax error{_where(e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, "
                          f"not {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{p}: base: expected the path of a config file, got {base!r}")
    base_path = p.parent / base
    if base_path.resolve() in {q.resolve() for q in (*including, p)}:
        raise ConfigError(f"{p}: base: {base} includes itself")
    return _merged(_read(base_path, (*including, p)), data)


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out


def load_config(path: str | Path | None, overrides: list[str] = ()) -> MocoConfig:
    return load(path, overrides, MocoConfig)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg, path: str | Path | None = None) -> str:
    """The resolved config as YAML (what ``load`` reads back to an equal config); written to
    ``path`` when given, so a run dir records exactly what ran."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two ``to_dict`` trees."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return keys


def _where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{at}: {problem}"


def _entries(tp) -> type | None:
    """The entry schema of a mapping section (``dict[str, Schema]``: entries named by the
    user, such as ``tasks.my_task``), else None."""
    if typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
        return typing.get_args(tp)[1]
    return None


def _keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of ``schema``, sections included (a mapping section's: those of its
    default entries, for suggestions)."""
    out = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        out.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            out += _keys(hints[f.name], key + ".")
        elif _entries(hints[f.name]) and f.default_factory is not dataclasses.MISSING:
            for name in f.default_factory():
                out += [f"{key}.{name}", *_keys(_entries(hints[f.name]), f"{key}.{name}.")]
    return out


def _leaf_type(schema: type, key: str):
    """The type of ``key``'s value (a section's schema for a section), or None if ``schema``
    has no such key; any name is an entry of a mapping section."""
    tp, parts = schema, key.split(".")
    for part in parts:
        entry = _entries(tp)
        if entry is not None:  # ``part`` names an entry
            tp = entry
            continue
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _unknown(key: str, schema: type) -> ConfigError:
    keys = {k.lower(): k for k in _keys(schema)}  # model.k is a typo of model.K, not model.m
    close = difflib.get_close_matches(key.lower(), keys, n=1, cutoff=0.6)
    if not close:  # a wrong section name hides a right leaf name: compare leaves alone
        leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
        close = [leaves[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1].lower(),
                                                               leaves, n=1, cutoff=0.8)]
    hint = f" (did you mean {keys[close[0]]}?)" if close else ""
    return ConfigError(f"{key}: unknown key{hint}")


def _apply_override(data: dict, item: str, schema: type) -> None:
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"{item!r}: an override must be key=value, e.g. model.K=4096")
    leaf = _leaf_type(schema, key)
    if leaf is None:
        raise _unknown(key, schema)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if leaf is not str:
            raise ConfigError(f"{key}: value {text!r} is not valid YAML{_where(e)}") from None
        value = text  # a path template such as {root}/x.pth is not YAML, and need not be
    if isinstance(value, dict) and leaf is str:
        value = text
    *sections, name = key.split(".")
    node = data
    for depth, s in enumerate(sections):
        nxt = node.setdefault(s, {})
        if nxt is None:
            nxt = node[s] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(sections[:depth + 1])}: expected a section (mapping), "
                              f"got {type(nxt).__name__}")
        node = nxt
    node[name] = value


def _build(schema: type, data: Any, prefix: str, root: type | None = None, base=None):
    """``schema`` from ``data``; a key ``data`` lacks takes ``base``'s value (a default
    entry of a mapping section), else the field's default."""
    root = root or schema  # unknown keys are matched against the whole tree
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a section (mapping), "
                          f"got {type(data).__name__}")
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    for k in data:
        if k not in names:
            raise _unknown(f"{prefix}{k}", root)
    values = {}
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        if f.name not in data:
            if base is not None:
                values[f.name] = getattr(base, f.name)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: missing (no default)")
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            values[f.name] = _build(tp, data[f.name], key + ".", root)
        elif _entries(tp):
            values[f.name] = _build_entries(_entries(tp), data[f.name], key, root,
                                            f.default_factory())
        elif data[f.name] is None and tp is str:
            raise ConfigError(_no_value(key, f.metadata))
        else:
            values[f.name] = _check(key, _convert(key, tp, data[f.name]), f.metadata)
    return schema(**values)


def _no_value(key: str, meta) -> str:
    # Often a shell's doing: it turns key='' into key= before we see it.
    empty = meta.get("empty") or "an empty string"
    return (f"{key}: no value given: give one, or {key}='' for {empty} (on a shell command "
            f"line: {key}=\"''\")")


def _build_entries(entry: type, data: Any, key: str, root: type, defaults: dict) -> dict:
    """A mapping section: its default entries, each updated by the YAML's keys for it, then
    the YAML's new entries in its order."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: expected a mapping of names to sections, "
                          f"got {type(data).__name__}")
    out = dict(defaults)
    for name, section in data.items():
        if not isinstance(name, str):
            raise ConfigError(f"{key}: entry names are strings, got {name!r}")
        out[name] = _build(entry, section, f"{key}.{name}.", root, defaults.get(name))
    return out


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(key: str, tp, v):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _convert(key, tp, v)
    if origin is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(v).__name__} {v!r}")
        return {_convert(f"{key} key", args[0], k): _convert(f"{key}.{k}", args[1], x)
                for k, x in v.items()}
    if origin is list:
        if isinstance(v, str):  # data.datasets=nih,mura
            v = [s.strip() for s in v.split(",") if s.strip()]
        if not isinstance(v, list):
            raise ConfigError(f"{key}: expected a list, got {type(v).__name__} {v!r}")
        return [_convert(f"{key}[{i}]", args[0], x) for i, x in enumerate(v)]
    if tp is bool:
        if isinstance(v, bool):
            return v
    elif tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
    elif tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(v)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(v, str):
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
    else:
        raise ConfigError(f"{key}: unsupported field type {_type_name(tp)} in the schema")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(v).__name__} {v!r}")


def _check(key: str, v, meta):
    if isinstance(v, dict):  # a mapping's checks are its reader's (check_definition)
        return v
    if isinstance(v, list):
        for x in v:
            _check(key, x, meta)
        if len(set(v)) != len(v):
            raise ConfigError(f"{key}: duplicate entries in {v}")
        if not v:
            raise ConfigError(f"{key}: must not be empty")
        return v
    refuse = meta.get("refuse") or {}
    if v in refuse and not isinstance(v, bool):
        raise ConfigError(f"{key}: {refuse[v]}")
    choices = meta.get("choices")
    if choices is not None and v not in choices:
        raise ConfigError(f"{key}: {v!r} is not one of {', '.join(map(str, choices))}")
    lo, hi, gt = meta.get("lo"), meta.get("hi"), meta.get("gt")
    if v is not None and ((lo is not None and v < lo) or (hi is not None and v > hi)):
        bounds = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{key}: must be {bounds}, got {v}")
    if v is not None and gt is not None and not v > gt:
        raise ConfigError(f"{key}: must be > {gt}, got {v}")
    return v


# --- checks against the world size, and the DeepSpeed config -------------------------------

def resolve_precision(precision: str, on_cuda: bool) -> str:
    """``auto`` is bf16 on CUDA and fp32 on CPU (CPU bf16 is slow on most hosts)."""
    if precision == "fp16":
        raise ConfigError(f"run.precision: {_FP16_WHY}")
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"run.precision: {precision!r} is not one of auto, fp32, bf16")
    if precision == "auto":
        return "bf16" if on_cuda else "fp32"
    return precision


def _check_batch(cfg, world_size: int) -> int:
    batch = cfg.data.batch_size
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if batch % world_size:
        raise ConfigError(f"data.batch_size: global batch {batch} is not divisible by the world "
                          f"size {world_size}")
    return batch // world_size


def check_moco(cfg: MocoConfig, world_size: int) -> None:
    """What a loaded MD-MoCo config must also satisfy on ``world_size`` ranks."""
    for name in cfg.data.datasets:
        if not NAME_PATTERN.fullmatch(name):
            raise ConfigError(f"data.datasets: {name!r} is not a dataset name (letters, digits, "
                              f"'_', '-': a folder under data.root)")
    per_rank = _check_batch(cfg, world_size)
    if per_rank < 2:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} over {world_size} ranks is "
                          f"{per_rank} image per rank; BatchNorm needs at least 2")
    if cfg.model.K % cfg.data.batch_size:
        raise ConfigError(f"model.K: queue size {cfg.model.K} is not a multiple of the global "
                          f"batch {cfg.data.batch_size} (MoCo enqueues whole batches of keys)")
    if cfg.model.bn not in ("shuffle", "sync"):
        raise ConfigError(f"model.bn: {cfg.model.bn!r} is not one of shuffle, sync")
    if cfg.model.bn == "sync" and cfg.model.bn_groups != 1:
        raise ConfigError(f"model.bn_groups: {cfg.model.bn_groups} groups are shuffle-BN's; "
                          f"model.bn=sync normalises over the whole global batch (set "
                          f"model.bn_groups=1)")
    from muscle_hpc.models.moco import splits_per_rank

    splits = splits_per_rank(cfg.model.bn_groups, world_size)
    if cfg.model.bn == "shuffle" and (per_rank % splits or per_rank // splits < 2):
        raise ConfigError(f"model.bn_groups: {cfg.model.bn_groups} groups over {world_size} "
                          f"rank(s) are {splits} per rank, which do not cut the {per_rank} "
                          f"images of each rank into equal groups of at least 2 (batch norm); "
                          f"change data.batch_size or model.bn_groups")
    if cfg.optim.warmup_epochs >= cfg.optim.epochs:
        raise ConfigError(f"optim.warmup_epochs: {cfg.optim.warmup_epochs} must be less than "
                          f"optim.epochs {cfg.optim.epochs}")
    if not cfg.data.datasets:
        raise ConfigError("data.datasets: must not be empty")


def check_device(cfg, on_cuda: bool) -> None:
    """A stage without a GPU starts only when ``run.allow_cpu`` says CPU is intended."""
    if not on_cuda and not cfg.run.allow_cpu:
        raise ConfigError("run.allow_cpu: no GPU (none visible here, or none requested) and "
                          "the config does not say CPU is intended; request GPUs (sbatch or "
                          "launch --gpus-per-node), or set run.allow_cpu=true to train on CPU")


def deepspeed_config(cfg, world_size: int, on_cuda: bool, batch_size: int | None = None) -> dict:
    """The DeepSpeed JSON for ``cfg``. The optimizer and LR schedule are not in it: the stage
    builds SGD itself and sets the LR per step (``schedule.py``), so a resume needs only the
    step. No gradient accumulation or clipping, as in MoCo v2.

    bf16 is DeepSpeed's ``torch_autocast`` (bf16 compute, bf16 gradient all-reduce for conv
    and linear weights, fp32 weights), not its ``bf16`` mode, which stores the module in bf16:
    MoCo's key encoder is not in the optimizer, so it would have no fp32 master copy, and its
    momentum update (a step of 0.001 of the weight for m = 0.999) is below bf16's resolution
    (2^-8): the key encoder would freeze. The price is fp32 weight memory, small for ResNets.

    ``batch_size`` (global) replaces ``cfg.data.batch_size`` for stages whose batch varies by
    task; DeepSpeed only books it (no gradient accumulation), the loader sets the real one."""
    if batch_size is None:
        per_rank = _check_batch(cfg, world_size)
        batch_size = cfg.data.batch_size
    else:
        per_rank = batch_size // world_size
    if cfg.run.zero_stage == 3:
        raise ConfigError(f"run.zero_stage: {_ZERO3_WHY}")
    if cfg.run.zero_stage not in (0, 1, 2):
        raise ConfigError(f"run.zero_stage: must be in [0, 2], got {cfg.run.zero_stage}")
    bf16 = resolve_precision(cfg.run.precision, on_cuda) == "bf16"
    return {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.run.zero_stage},
        # MoCo's SGD is not on DeepSpeed's ZeRO list; it shards it correctly all the same
        # (measured: ZeRO 1 and 2 initialise and step on CPU with torch.optim.SGD).
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,  # quiet; we log ourselves
        "wall_clock_breakdown": False,
    }


# --- describing the schemas ----------------------------------------------------------------

SCHEMAS = {"mdmoco": MocoConfig, "continual": ContinualConfig, "finetune": FinetuneConfig}


def field_comments(schema: type) -> dict[str, str]:
    """Each field of ``schema`` (a dataclass) to the comment that explains it in the source:
    the comment lines right above the field and the one at the end of its line, joined. A
    subclass's fields come from its own source, inherited ones from the base that declares
    them; a class made at run time (``per_task_section``) has no source and no comments."""
    out: dict[str, str] = {}
    for cls in reversed(schema.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(cls))
        except (OSError, TypeError):
            continue
        out.update(_comments_by_field(source))
    return {name: out.get(name, "") for name in (f.name for f in dataclasses.fields(schema))}


def _comments_by_field(class_source: str) -> dict[str, str]:
    out: dict[str, str] = {}
    above: list[str] = []  # comment lines since the last statement
    statement: list[tokenize.TokenInfo] = []  # the logical line read so far, comments aside
    trailing: list[str] = []  # comments within it
    body_col = None  # the class body's indentation: its first statement's
    for tok in tokenize.generate_tokens(io.StringIO(class_source).readline):
        if tok.type == tokenize.COMMENT:
            (trailing if statement else above).append(tok.string.lstrip("#").strip())
        elif tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            if statement:
                first = statement[0]
                if body_col is None and first.start[1] > 0:
                    body_col = first.start[1]
                if (first.type == tokenize.NAME and first.start[1] == body_col
                        and len(statement) > 1 and statement[1].string == ":"):
                    out[first.string] = " ".join(above + trailing)
            above, statement, trailing = [], [], []
        elif tok.type not in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENCODING):
            statement.append(tok)
    return out


def _shown(v) -> str:
    """A default as it would be written in a config file."""
    if isinstance(v, str):
        return v if v else "''"
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...").strip()


def _bounds(meta) -> str:
    parts = []
    lo, hi = meta.get("lo"), meta.get("hi")
    if meta.get("choices") is not None:
        parts.append("one of " + ", ".join(map(_shown, meta["choices"])))
    if lo is not None or hi is not None:
        parts.append(f"in [{lo:g}, {hi:g}]" if lo is not None and hi is not None
                     else f">= {lo:g}" if lo is not None else f"<= {hi:g}")
    if meta.get("gt") is not None:
        parts.append(f"> {meta['gt']:g}")
    if meta.get("refuse"):
        parts.append("not " + ", ".join(map(str, meta["refuse"])))
    return "; ".join(parts)


def describe(schema: type, prefix: str = "", default: Any = None) -> list[str]:
    """Every key of ``schema``: ``key (type) = default  [bounds]`` and, indented below, the
    comment that explains it. A mapping section (``tasks``, entries named by the user) is
    described once as ``<prefix>.<name>.*`` and its default entries listed."""
    lines: list[str] = []
    default = schema() if default is None else default
    hints, comments = typing.get_type_hints(schema), field_comments(schema)
    for f in dataclasses.fields(schema):
        key, tp, value = prefix + f.name, hints[f.name], getattr(default, f.name)
        entry = _entries(tp)
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, key + ".", value)
            continue
        if entry is not None:
            lines.append(f"{key}.<name>: one entry per task, the paper's by default: "
                         f"{', '.join(value)}")
            lines += ["    " + t for t in textwrap.wrap(comments[f.name], 92)]
            lines += describe(entry, key + ".<name>.", entry())
            continue
        bounds = _bounds(f.metadata)
        type_text = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
        lines.append(f"{key} ({type_text}) = {_shown(value)}"
                     + (f"  [{bounds}]" if bounds else ""))
        lines += ["    " + t for t in textwrap.wrap(comments[f.name], 92)]
    return lines


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m muscle_hpc.config",
                                description="The config keys of a stage: type, default, "
                                            "bounds and what each means.")
    p.add_argument("--describe", required=True, choices=list(SCHEMAS), metavar="STAGE",
                   help=f"one of {', '.join(SCHEMAS)}")
    args = p.parse_args(argv)
    print(f"# {args.describe}: every key, as a config file sets it or key=value on the command "
          f"line overrides it")
    print("\n".join(describe(SCHEMAS[args.describe])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
