"""The MultiMix stage's config: a classification task and a segmentation task (any of the
config's ``tasks``, the paper's or the user's), the paper's loss weights and threshold, its
optimiser, and what a loaded config must also satisfy (``check_multimix``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from muscle_hpc import registry
from muscle_hpc.config.definitions import task_definition
from muscle_hpc.config.finetune import (
    FtEvalConfig,
    FtRunConfig,
    FtTask,
    PretrainedConfig,
    _default_ft_tasks,
)
from muscle_hpc.config.loader import ConfigError, opt
from muscle_hpc.config.sections import DataConfig, check_task_batch, check_world_size


@dataclass(frozen=True)
class MultiMixSection:
    """What MultiMix is made of, and its losses: ``cls_weight`` x cross-entropy (labelled
    images) + ``dice_weight`` x Dice (labelled masks; the paper's alpha) + ``pseudo_weight`` x
    the pseudo-label cross-entropy (unlabelled images, weak view's label on the strong view;
    lambda) + ``kl_weight`` x the KL between labelled and unlabelled mask predictions (beta).
    The values are the paper's (ISBI 2021, sec. 3.1), which the authors' code uses too."""
    cls_task: str = "pneumonia"  # a classification task of ``tasks``
    seg_task: str = "lung"  # a segmentation task of ``tasks``
    # Images per stream and step, global: labelled masks, unlabelled seg images, labelled
    # classes, unlabelled classes (weak and strong views of the same images): the authors' 10.
    batch_size: int = opt(10, lo=1)
    threshold: float = opt(0.7, gt=0.0, hi=1.0)  # the pseudo-label's confidence, t
    cls_weight: float = opt(1.0, lo=0.0)
    dice_weight: float = opt(5.0, lo=0.0)  # alpha
    pseudo_weight: float = opt(0.25, lo=0.0)  # lambda
    # beta. The authors' code computes this KL over one channel, which makes it 0; the paper's
    # 0.01 over our K-class masks is what its eq. 2 says (0: the code's effect).
    kl_weight: float = opt(0.01, lo=0.0)
    # saliency: the paper's bridge; image: zeros for the map (is it the saliency or the image
    # that helps?); none: no bridge (the paper's UMTL baseline).
    bridge: str = opt("saliency", choices=registry.MULTIMIX_BRIDGES)
    dropout: float = opt(0.25, lo=0.0, hi=1.0)  # each decoder block's (the authors')


@dataclass(frozen=True)
class MmOptimConfig:
    """Adam at ``lr``, multiplied by ``lr_gamma`` every ``lr_step_epochs`` (the authors'
    StepLR(8, 0.1)); an epoch is one pass over the unlabelled classification images."""
    lr: float = opt(1e-4, gt=0.0)
    lr_step_epochs: int = opt(8, lo=1)
    lr_gamma: float = opt(0.1, gt=0.0, hi=1.0)
    epochs: int = opt(100, lo=1)  # the authors' (the LR is below 1e-7 after 24 of them)
    weight_decay: float = opt(0.0, lo=0.0)  # torch Adam's default, as theirs


@dataclass(frozen=True)
class MultiMixConfig:
    data: DataConfig = field(default_factory=DataConfig)
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    tasks: dict[str, FtTask] = field(default_factory=_default_ft_tasks)
    multimix: MultiMixSection = field(default_factory=MultiMixSection)
    optim: MmOptimConfig = field(default_factory=MmOptimConfig)
    eval: FtEvalConfig = field(default_factory=FtEvalConfig)
    run: FtRunConfig = field(default_factory=FtRunConfig)


def check_multimix(cfg: MultiMixConfig, world_size: int) -> None:
    """The two tasks defined, of the kinds MultiMix joins, and a batch that splits over the
    ranks (every stream's)."""
    check_world_size(world_size)
    m = cfg.multimix
    for key, name, kind in (("cls_task", m.cls_task, "classification"),
                            ("seg_task", m.seg_task, "segmentation")):
        if name not in cfg.tasks:
            raise ConfigError(f"multimix.{key}: {name!r} is not one of the config's tasks "
                              f"({', '.join(cfg.tasks)})")
        got = task_definition(name, cfg.tasks[name]).kind
        if got != kind:
            raise ConfigError(f"multimix.{key}: {name} is a {got} task, not {kind}")
    if cfg.data.synthetic:
        raise ConfigError("data.synthetic: MultiMix reads converted shards (its unlabelled "
                          "streams are the rest of each training split)")
    check_task_batch("multimix.batch_size", m.batch_size, world_size, sync_bn=True)
