"""The models the stages train, each built in one place.

The three stages and the benchmarks (``bench.stages``, ``bench.moco_step``, ``bench.cl_step``)
call these and nothing else, so a benchmark times the model a stage trains, not a copy of it
that has drifted (the stages' tests compare the two with each stage's checkpoint:
``tests/conftest.py``, ``assert_same_model``).

Neither function seeds the random generator: the caller does (``run.seed`` in the stages), and
the order in which modules draw from it (trunk first, then each head in the order given) is
part of a run's reproducibility.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from muscle_hpc.models.backbone import build_backbone, load_imagenet_into
from muscle_hpc.models.heads import MultiTaskNet, trunk_channels
from muscle_hpc.models.moco import MoCo
from muscle_hpc.models.multimix import MultiMixNet

if TYPE_CHECKING:
    from muscle_hpc.config.mdmoco import MocoModelConfig
    from muscle_hpc.config.multimix import MultiMixSection
    from muscle_hpc.config.sections import HeadsConfig


class HasHead(Protocol):
    """What a task contributes to the model: its head over the trunk's stage channels."""

    def head(self, channels: dict[str, int], heads: HeadsConfig) -> nn.Module: ...


def build_moco(model: MocoModelConfig) -> MoCo:
    """MD-MoCo's MoCo v2 from the stage's ``model`` section: two 1-channel ResNet encoders
    (Kaiming init), the MLP projection head when ``model.mlp``, the key queue of ``model.K``
    and the batch-norm mode. ``model.bn_groups`` is the number of shuffle-BN groups over the
    global batch; a benchmark that runs one rank of a larger world passes that rank's share
    (``dataclasses.replace(model, bn_groups=splits_per_rank(...))``)."""
    return MoCo(partial(build_backbone, model.arch), dim=model.dim, K=model.K, m=model.m,
                T=model.T, mlp=model.mlp, bn=model.bn, bn_groups=model.bn_groups)


def build_multitask(arch: str, tasks: Mapping[str, HasHead], heads: HeadsConfig,
                    init: dict[str, torch.Tensor] | None = None) -> MultiTaskNet:
    """A 1-channel ``arch`` trunk with one head per task (in ``tasks``' order), as the continual
    and fine-tune stages train it.

    Args:
        arch: ``resnet18`` or ``resnet50``.
        tasks: task name to the task that makes its head (``muscle_hpc.tasks.TaskKind``).
        heads: the heads' settings (the stage's ``model`` section).
        init: a torchvision state dict loaded into the trunk before the heads are made (an
            MD-MoCo or MUSCLE export, ImageNet weights); ``None``: Kaiming init.
    """
    trunk = build_backbone(arch)
    if init is not None:
        load_imagenet_into(trunk, init)
    channels = trunk_channels(arch)
    return MultiTaskNet(trunk, {name: task.head(channels, heads) for name, task in tasks.items()})


def build_multimix(arch: str, section: MultiMixSection, num_classes: int, seg_classes: int,
                   init: dict[str, torch.Tensor] | None = None) -> MultiMixNet:
    """MultiMix (``muscle_hpc.models.multimix``) on a 1-channel ``arch`` trunk: the trunk
    first (Kaiming init, or ``init`` loaded into it), then the classification branch and the
    decoder, from the stage's ``multimix`` section (its two tasks, the bridge, the dropout)."""
    trunk = build_backbone(arch)
    if init is not None:
        load_imagenet_into(trunk, init)
    return MultiMixNet(trunk, arch, (section.cls_task, section.seg_task), num_classes,
                       seg_classes, bridge=section.bridge, dropout=section.dropout)
