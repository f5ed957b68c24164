"""Task heads over a shared ResNet trunk: FC classification, DeepLab-V3 segmentation, Faster R-CNN
detection. Every head takes the trunk's feature maps ``{"layer1": ..., "layer4": ...}`` and
owns none of the trunk's parameters, so freezing, regularising or exporting the backbone never
has to tell its weights apart from a head's. Each head says at which ``output_stride`` the trunk
must run for it (dilated, with the same weights); ``MultiTaskNet`` runs it so per call.

Each head has ``loss(features, images, targets) -> scalar`` (training) and
``predict(features, images) -> outputs`` (evaluation, CPU tensors).

- ``ClassifierHead``: global average pool + one linear layer; softmax cross-entropy, softmax
  probabilities (B, C).
- ``MultiLabelHead``: the same layer with one logit per finding; binary cross-entropy of each,
  sigmoid probabilities (B, C).
- ``RegressionHead``: the same layer with one output, the standardized target; an L1 (or MSE)
  loss on that scale, predictions (B,) in the target's unit.
- ``SegmentationHead``: torchvision's DeepLab-V3 head (ASPP) on ``layer4`` of the trunk run at
  ``output_stride`` 8 by default, as torchvision's ``deeplabv3_resnet50`` (ASPP rates 12/24/36;
  they scale with the stride), upsampled bilinearly to the input size; class probabilities
  (B, C, H, W). Its two bilinear resizes and its loss are written so that their CUDA kernels
  are deterministic (``resize_bilinear``, ``_ImagePooling``, a per-pixel 1-D cross-entropy):
  the same functions as torchvision's, whose CUDA backward adds with atomics.
- ``DetectionHead``: torchvision's Faster R-CNN (FPN over layer1-4, RPN, RoI heads) on the
  trunk's features, without its transform (the images are Z-scored and of one size already).
  Anchors sit at the pyramid's true strides 4/8/16/32/64 at any input size
  (``FixedStrideAnchorGenerator``). It runs in fp32 under autocast: its anchors take the
  features' dtype, and bf16 would put box coordinates on a 2-4 px grid before NMS.
  Predictions: per image a dict of ``boxes`` (xyxy pixels), ``scores``, ``labels``.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.segmentation.deeplabv3 import ASPPPooling, DeepLabHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from muscle_hpc.models.backbone import set_output_stride

LAYERS = ("layer1", "layer2", "layer3", "layer4")
# DeepLab-V3's ASPP rates by output stride: the same reach in input pixels at every stride
# (Chen et al. 2017 use 6/12/18 at 16 and double them at 8).
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


def trunk_channels(arch: str) -> dict[str, int]:
    """Output channels of each ResNet stage."""
    widths = {"resnet18": 1, "resnet50": 4}[arch]
    return {name: 64 * 2**i * widths for i, name in enumerate(LAYERS)}


class ClassifierHead(nn.Module):
    output_stride = 32

    def __init__(self, channels: dict[str, int], num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels["layer4"], num_classes)

    def forward(self, features, images=None):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(features["layer4"], 1), 1))

    def loss(self, features, images, targets):
        return F.cross_entropy(self(features).float(), targets)

    @torch.no_grad()
    def predict(self, features, images):
        return self(features).float().softmax(dim=1).cpu()


class MultiLabelHead(ClassifierHead):
    """One logit per finding, each its own binary problem (findings co-occur)."""

    def loss(self, features, images, targets):
        return F.binary_cross_entropy_with_logits(self(features).float(), targets.float())

    @torch.no_grad()
    def predict(self, features, images):
        return self(features).float().sigmoid().cpu()


REGRESSION_LOSSES = ("l1", "mse")


class RegressionHead(ClassifierHead):
    """One output: the target standardized with the training split's ``mean`` and ``std``
    (buffers, so a saved head predicts in the target's unit on its own). Standardizing keeps
    the output near the range a freshly initialised linear layer gives, whatever the unit
    (months of bone age run to 228), so the task's learning rate means the same as for the
    other heads.

    ``loss``: ``l1`` (default), the mean absolute error of the standardized target: the MAE
    that is reported (up to the scale ``std``) and robust to outliers (mislabelled ages), with
    a constant-size gradient that does not shrink near the optimum; ``mse``: the squared error,
    smooth near the optimum (the mean rather than the median) but dominated by outliers."""

    def __init__(self, channels: dict[str, int], mean: float = 0.0, std: float = 1.0,
                 loss: str = "l1"):
        super().__init__(channels, 1)
        if loss not in REGRESSION_LOSSES:
            raise ValueError(f"regression loss must be one of {', '.join(REGRESSION_LOSSES)}, "
                             f"not {loss!r}")
        if not std > 0:
            raise ValueError(f"the target's std must be > 0, not {std}")
        self.loss_name = loss
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def loss(self, features, images, targets):
        out = self(features).float().squeeze(1)
        z = (targets.float() - self.mean) / self.std
        return (F.l1_loss if self.loss_name == "l1" else F.mse_loss)(out, z)

    @torch.no_grad()
    def predict(self, features, images):
        return (self(features).float().squeeze(1) * self.std + self.mean).cpu()


@functools.lru_cache(maxsize=32)
def bilinear_matrix(n_out: int, n_in: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear interpolation as ``F.interpolate`` computes it with
    ``align_corners=False`` and an output size (no antialiasing): source ``(i + ½)·n_in/n_out − ½``,
    clamped at 0, between its two neighbours (the last one repeated at the edge). Cached: a
    training run resizes between the same sizes every step, and building the matrix on the host
    and copying it to the GPU each time would make every step wait for that copy."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    w.index_put_((rows, lo), 1 - frac, accumulate=True)
    w.index_put_((rows, hi), frac, accumulate=True)
    return w.to(device=device, dtype=dtype)


def resize_bilinear(x: torch.Tensor, size) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` as two matrix products.
    Same values up to rounding; unlike torch's CUDA kernel, whose backward scatters with
    atomic adds, its gradient is deterministic, so a resumed run can repeat a GPU run."""
    h, w = size
    a_h = bilinear_matrix(h, x.shape[-2], x.device, x.dtype)
    a_w = bilinear_matrix(w, x.shape[-1], x.device, x.dtype)
    return a_h @ x @ a_w.T


class _ImagePooling(ASPPPooling):
    """torchvision's ASPP image-pooling branch with its bilinear resize of a 1x1 map, which is
    a broadcast, written as one (its backward is then a deterministic sum)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        return x.expand(-1, -1, *size)


class SegmentationHead(nn.Module):
    def __init__(self, channels: dict[str, int], num_classes: int, output_stride: int = 8):
        super().__init__()
        if output_stride not in ASPP_RATES:
            raise ValueError(f"output stride must be one of {tuple(ASPP_RATES)}, "
                             f"not {output_stride}")
        self.output_stride = output_stride
        self.deeplab = DeepLabHead(channels["layer4"], num_classes, ASPP_RATES[output_stride])
        for m in self.deeplab.modules():
            if type(m) is ASPPPooling:
                m.__class__ = _ImagePooling  # same modules and weights, another forward

    def forward(self, features, images):
        return resize_bilinear(self.deeplab(features["layer4"]), images.shape[-2:])

    def loss(self, features, images, targets):
        # Per pixel as rows of a 1-D cross-entropy: the same mean, without the 2-D CUDA
        # kernel's atomic-add reduction.
        logits = self(features, images).float()
        return F.cross_entropy(logits.movedim(1, -1).reshape(-1, logits.shape[1]),
                               targets.reshape(-1))

    @torch.no_grad()
    def predict(self, features, images):
        return self(features, images).float().softmax(dim=1).cpu()


class _FPN(FeaturePyramidNetwork):
    """torchvision's FPN over the trunk's stages, with the extra max-pooled level Faster R-CNN's
    default anchors expect, and the ``out_channels`` its constructor asks of a backbone."""

    def __init__(self, channels: dict[str, int], out_channels: int = 256):
        super().__init__([channels[n] for n in LAYERS], out_channels,
                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, features):
        return super().forward(OrderedDict((str(i), features[n]) for i, n in enumerate(LAYERS)))


class FixedStrideAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` (its default sizes 32-512 and ratios 0.5/1/2, one size
    per pyramid level) with each level's stride fixed to the network's, 4/8/16/32/64.

    torchvision derives a level's stride as ``image_size // feature_size``, which is the true
    stride only when every level's size divides the image: at 800x500 the levels have
    125/63/32/16/8 rows, so rows would get strides 4, 7, 15, 31, 62, and even torchvision's own
    padding to a multiple of 32 leaves the last level (P6, 13 columns at width 800) at
    800 // 13 = 61. A strided conv's cell i is centred at i * stride whatever the size, which
    is where these anchors are, and at sizes that are multiples of 64 they equal torchvision's."""

    STRIDES = (4, 8, 16, 32, 64)

    def __init__(self):
        super().__init__(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]):
        grids = [f.shape[-2:] for f in feature_maps]
        device = feature_maps[0].device
        strides = [[torch.tensor(s, device=device)] * 2 for s in self.STRIDES[:len(grids)]]
        self.set_cell_anchors(feature_maps[0].dtype, device)
        anchors = torch.cat(self.grid_anchors(grids, strides))
        return [anchors] * len(image_list.image_sizes)


class DetectionHead(nn.Module):
    """Faster R-CNN without a backbone of its own: ``rcnn.backbone`` is the FPN, fed with the
    shared trunk's features (what ``GeneralizedRCNN.forward`` would do, with the trunk moved
    out). ``num_classes`` counts the background."""

    output_stride = 32

    def __init__(self, channels: dict[str, int], num_classes: int, rois_per_image: int = 512,
                 test_proposals: int = 1000):
        super().__init__()
        self.rcnn = FasterRCNN(_FPN(channels), num_classes=num_classes,
                               rpn_anchor_generator=FixedStrideAnchorGenerator(),
                               box_batch_size_per_image=rois_per_image,
                               rpn_post_nms_top_n_test=test_proposals)

    def _run(self, features, images, targets=None):
        r = self.rcnn
        images = ImageList(images, [tuple(images.shape[-2:])] * len(images))
        with torch.autocast(images.tensors.device.type, enabled=False):
            pyramid = r.backbone({k: v.float() for k, v in features.items()})
            proposals, rpn_losses = r.rpn(images, pyramid, targets)
            detections, roi_losses = r.roi_heads(pyramid, proposals, images.image_sizes,
                                                 targets)
        return detections, {**rpn_losses, **roi_losses}

    def loss(self, features, images, targets):
        _, losses = self._run(features, images, targets)
        return sum(v.float() for v in losses.values())

    @torch.no_grad()
    def predict(self, features, images):
        detections, _ = self._run(features, images)
        return [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in d.items()}
                for d in detections]


class MultiTaskNet(nn.Module):
    """One trunk (a torchvision ResNet whose ``fc`` is dropped) and a head per task, of any
    kind above: each head computes its own loss (cross-entropy, binary cross-entropy, L1/MSE,
    per-pixel cross-entropy, Faster R-CNN's losses) from the targets its task makes.

    ``forward(task, images, targets)`` is the task's training loss, so a DeepSpeed engine wraps
    the whole net and each step runs one task; ``predict(task, images)`` evaluates. Each call
    runs the trunk at the output stride the task's head asks for (dilated for segmentation),
    and no call leaves the trunk changed for another task's."""

    def __init__(self, trunk: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        trunk.fc = nn.Identity()
        self.backbone = trunk
        self.heads = nn.ModuleDict(heads)

    def features(self, images, output_stride: int = 32) -> dict[str, torch.Tensor]:
        """Every stage's output; the trunk is a stock ResNet again when this returns (a
        convolution's backward keeps the stride and dilation its forward ran with)."""
        t = self.backbone
        set_output_stride(t, output_stride)
        try:
            x = t.maxpool(t.relu(t.bn1(t.conv1(images))))
            out = {}
            for name in LAYERS:
                x = out[name] = getattr(t, name)(x)
            return out
        finally:
            set_output_stride(t, 32)

    def task_features(self, task: str, images) -> dict[str, torch.Tensor]:
        """The trunk's features at the output stride ``task``'s head runs on."""
        return self.features(images, self.heads[task].output_stride)

    def forward(self, task: str, images, targets):
        return self.heads[task].loss(self.task_features(task, images), images, targets)

    @torch.no_grad()
    def predict(self, task: str, images):
        return self.heads[task].predict(self.task_features(task, images), images)
