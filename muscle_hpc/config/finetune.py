"""The fine-tune stage's config: its schema (``FinetuneConfig``: the tasks, where each init's
backbone is, the grid) and what a loaded one must also satisfy (``check_finetune``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from muscle_hpc import registry
from muscle_hpc.config.definitions import task_definition
from muscle_hpc.config.loader import ConfigError, opt
from muscle_hpc.config.sections import (
    DataConfig,
    HeadsConfig,
    MetricsConfig,
    RunConfig,
    check_task_batch,
    check_world_size,
)

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
class FtRunConfig(RunConfig):
    root: str = "runs"  # the pipeline's run directory: inputs and finetune/<task>_<bb>_<init>
    checkpoint_every_steps: int = opt(500, lo=1)
    log_every_steps: int = opt(20, lo=1)
    max_steps_per_epoch: int = opt(0, lo=0)  # 0: whole epochs (the paper's); demos and tests
    zero_stage: int = opt(0, lo=0, hi=2, refuse={3: _FT_ZERO3_WHY})





@dataclass(frozen=True)
class GridConfig:
    """The fine-tune grid (``--list``, ``--grid-index``, the Slurm array): every combination,
    backbone-major, then protocol, fraction, task, init. The defaults are the paper's 40 runs.
    ``protocols``: ``finetune`` trains the whole network; ``linear`` is the linear probe (the
    backbone frozen with its batch-norm statistics, only the head trained: MoCo's test of a
    representation). ``fractions``: the share of each training split used (patient-grouped,
    nested, the same for every init: 0.01 is part of 0.1)."""
    tasks: list[str] = field(default_factory=lambda: list(registry.TASK_NAMES))
    inits: list[str] = opt(list(registry.INIT_NAMES), choices=registry.INIT_NAMES)
    backbones: list[str] = opt(list(registry.BACKBONE_NAMES), choices=registry.BACKBONE_NAMES)
    protocols: list[str] = opt(["finetune"], choices=registry.PROTOCOLS)
    fractions: list[float] = opt([1.0], gt=0.0, hi=1.0)


@dataclass(frozen=True)
class FinetuneConfig:
    data: DataConfig = field(default_factory=DataConfig)
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


def check_finetune(cfg: FinetuneConfig) -> None:
    """What a loaded fine-tune config must also satisfy: every task defined, and the grid's
    tasks among them."""
    for name in cfg.tasks:
        cfg.definition(name)
    _check_known("grid.tasks", cfg.grid.tasks, cfg)


def check_finetune_task(cfg: FinetuneConfig, task: str, world_size: int) -> None:
    """What the one ``task`` a fine-tune runs needs of a config ``check_finetune`` passed, on
    ``world_size`` ranks: to be one of its tasks, with a batch that splits over the ranks."""
    check_world_size(world_size)
    _check_known("--task", [task], cfg)
    check_task_batch(f"tasks.{task}.batch_size", cfg.task(task).batch_size, world_size,
                     cfg.model.sync_bn)


def _check_known(key: str, names: list[str], cfg: FinetuneConfig) -> None:
    unknown = [t for t in names if t not in cfg.tasks]
    if unknown:
        raise ConfigError(f"{key}: {unknown[0]!r} is not a task of this config "
                          f"({', '.join(cfg.tasks)}; define it under tasks)")

