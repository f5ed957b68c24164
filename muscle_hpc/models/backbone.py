"""ResNet-18/50 backbones for 1-channel X-rays, and their exchange with torchvision.

The backbone is torchvision's ``resnet18``/``resnet50`` (``weights=None``) with torchvision's
own initialisation kept (Kaiming normal, fan_out, ReLU gain for every conv; BN weight 1, bias 0)
and torchvision's parameter names, so checkpoints map one to one. Only ``conv1`` differs: it
takes one input channel, which makes the first layer (the costliest per pixel on 800×500
images) 3× cheaper than feeding a gray image replicated on three channels.

The two are exactly equivalent: a 3-channel conv applied to a gray image repeated on 3 channels
equals a 1-channel conv whose weight is the *sum* of the 3-channel weight over its input
channels. So ImageNet weights load by summing ``conv1`` over channels
(``load_imagenet_into``), and ``export_torchvision`` writes ``conv1`` back as weight/3 repeated
on 3 channels: a stock torchvision ResNet then gives the same outputs on the gray image ×3.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

ARCHS = ("resnet18", "resnet50")
OUTPUT_STRIDES = (8, 16, 32)


def build_backbone(arch: str, in_chans: int = 1, num_classes: int = 1000) -> nn.Module:
    """torchvision ``arch`` with a ``in_chans``-channel ``conv1``, freshly Kaiming-initialised."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, not {arch!r}")
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        # Same init torchvision gives every other conv (its __init__ ran before this swap).
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def load_imagenet_into(backbone: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load a torchvision (3-channel) state dict into ``backbone``; returns the skipped keys.

    ``conv1`` is summed over input channels when the backbone takes one channel. ``fc`` is
    skipped when its shape differs (an MLP head or another class count): only the trunk is
    pre-trained knowledge worth keeping; everything else must match exactly."""
    sd = dict(state_dict)
    w = sd["conv1.weight"]
    if backbone.conv1.in_channels == 1 and w.shape[1] == 3:
        sd["conv1.weight"] = w.sum(dim=1, keepdim=True)
    own = backbone.state_dict()
    skipped = [k for k in sd
               if k.startswith("fc.") and (k not in own or own[k].shape != sd[k].shape)]
    skipped += [k for k in own if k.startswith("fc.") and k not in sd]
    for k in skipped:
        sd.pop(k, None)
    backbone.load_state_dict(sd, strict=not skipped)
    return sorted(set(skipped))


def export_torchvision(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict that ``torchvision.models.<arch>().load_state_dict(sd)`` loads strictly.

    ``conv1`` becomes weight/3 on 3 channels (same outputs on the gray image ×3). If ``fc`` is
    not a torchvision ``Linear(features, 1000)`` (e.g. the MoCo MLP head), a freshly initialised
    one is written instead: the trunk is what transfers, and a strict load beats a partial
    state dict whose missing keys every user would have to special-case."""
    sd = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    w = sd["conv1.weight"]
    if w.shape[1] == 1:
        sd["conv1.weight"] = (w / 3).repeat(1, 3, 1, 1)
    fc = backbone.fc
    if not (isinstance(fc, nn.Linear) and fc.out_features == 1000):
        for k in [k for k in sd if k.startswith("fc.")]:
            del sd[k]
        features = backbone.layer4[-1].conv1.in_channels
        fresh = nn.Linear(features, 1000)
        sd["fc.weight"], sd["fc.bias"] = fresh.weight.detach(), fresh.bias.detach()
    return sd


def set_output_stride(backbone: nn.Module, output_stride: int) -> None:
    """Run ``backbone``'s ``layer3``/``layer4`` strided (32) or dilated (16: layer4, 8: both),
    with the same weights: ``Conv2d`` reads ``stride``, ``dilation`` and ``padding`` at every
    call, so this only rewrites those attributes, and 32 restores a stock ResNet exactly.

    The rule is torchvision's ``replace_stride_with_dilation`` (``resnet50(
    replace_stride_with_dilation=[False, True, True])`` is output stride 8, as its DeepLab-V3
    uses): a dilated stage's first block drops its stride and keeps the previous dilation in the
    convolution that had the stride; every later 3x3 convolution of the stage runs at twice
    that dilation. torchvision refuses dilation in ``BasicBlock``; the same rule there (the
    strided ``conv1`` at the previous dilation, ``conv2`` and later blocks at the new one, as
    in Dilated Residual Networks, Yu et al. 2017) is what keeps the à trous identity: the
    dilated map, subsampled at the stride it replaced, is the strided map."""
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output stride must be one of {OUTPUT_STRIDES}, not {output_stride}")
    dilation = 1
    for name, dilate in (("layer3", output_stride == 8), ("layer4", output_stride <= 16)):
        previous = dilation
        if dilate:
            dilation *= 2
        for i, block in enumerate(getattr(backbone, name)):
            bottleneck = hasattr(block, "conv3")
            strided = block.conv2 if bottleneck else block.conv1
            later = [] if bottleneck else [block.conv2]
            if i == 0:
                _set_conv(strided, 1 if dilate else 2, previous)
                if block.downsample is not None:
                    block.downsample[0].stride = (1, 1) if dilate else (2, 2)
            else:
                later.append(strided)
            for conv in later:
                _set_conv(conv, 1, dilation)


def _set_conv(conv: nn.Conv2d, stride: int, dilation: int) -> None:
    conv.stride, conv.dilation, conv.padding = (stride,) * 2, (dilation,) * 2, (dilation,) * 2
