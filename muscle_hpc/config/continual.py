"""The continual-learning stage's config: its schema (``ContinualConfig``) and what a loaded
one must also satisfy on a number of ranks (``check_continual``)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from muscle_hpc import registry
from muscle_hpc.config.loader import ConfigError, opt
from muscle_hpc.config.sections import (
    DataConfig,
    HeadsConfig,
    MetricsConfig,
    RunConfig,
    check_task_batch,
    check_world_size,
)

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
class ClDataConfig(DataConfig):
    # The tasks visited; MUSCLE⁻⁻ visits them in this order.
    tasks: list[str] = opt(list(registry.TASK_NAMES), choices=registry.TASK_NAMES)


@dataclass(frozen=True)
class ClModelConfig(HeadsConfig):
    arch: str = opt("resnet50", choices=registry.ARCHS)
    # The MD-MoCo backbone (its export); empty: Kaiming init (no pre-training).
    init: str = opt(str(registry.exported_backbone(registry.mdmoco_dir("runs", "r50"))),
                    empty="no pre-training, Kaiming init")


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
class ClRunConfig(RunConfig):
    dir: str = str(registry.continual_dir("runs", "r50"))
    checkpoint_every_steps: int = opt(500, lo=1)
    log_every_steps: int = opt(20, lo=1)
    # Steps per visit (0: one epoch of the task's training set, the paper's): demos and tests.
    visit_steps: int = opt(0, lo=0)
    max_steps: int = opt(0, lo=0)  # end early after this many steps (0: the whole stage)
    validate: bool = True  # every task after every visit
    zero_stage: int = opt(0, lo=0, hi=2, refuse={3: _CL_ZERO3_WHY})


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



def check_continual(cfg: ContinualConfig, world_size: int) -> None:
    """What a loaded continual config must also satisfy on ``world_size`` ranks."""
    check_world_size(world_size)
    for task in cfg.data.tasks:
        check_task_batch(f"tasks.{task}.batch_size", cfg.batch_size(task), world_size,
                         cfg.model.sync_bn)
    if cfg.optim.lr_min > cfg.optim.lr_max:
        raise ConfigError(f"optim.lr_min: {cfg.optim.lr_min} is above optim.lr_max "
                          f"{cfg.optim.lr_max}")

