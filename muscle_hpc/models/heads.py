"""Task heads over a shared ResNet trunk: FC classification, DeepLab-V3 segmentation, Faster R-CNN
detection. Every head takes the trunk's feature maps ``{"layer1": ..., "layer4": ...}`` and
owns none of the trunk's parameters, so freezing, regularising or exporting the backbone never
has to tell its weights apart from a head's.

Each head has ``loss(features, images, targets) -> scalar`` (training) and
``predict(features, images) -> outputs`` (evaluation, CPU tensors):

- ``ClassifierHead``: global average pool + one linear layer; softmax probabilities (B, C).
- ``SegmentationHead``: torchvision's DeepLab-V3 head (ASPP) on ``layer4``, upsampled
  bilinearly to the input size; class probabilities (B, C, H, W). The trunk is shared with the
  other tasks, so it keeps its stride 32 (DeepLab-V3's own backbone dilates layer3/4 to
  stride 8): masks are coarser, and no task pays the 4-16x compute of dilated layers.
- ``DetectionHead``: torchvision's Faster R-CNN (FPN over layer1-4, RPN, RoI heads), run on
  the trunk's features. Images are already Z-scored and all of one size, so its own
  transform (normalise, resize, pad) is skipped. Predictions: per image a dict of
  ``boxes`` (xyxy pixels), ``scores``, ``labels``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

LAYERS = ("layer1", "layer2", "layer3", "layer4")


def trunk_channels(arch: str) -> dict[str, int]:
    """Output channels of each ResNet stage."""
    widths = {"resnet18": 1, "resnet50": 4}[arch]
    return {name: 64 * 2**i * widths for i, name in enumerate(LAYERS)}


class ClassifierHead(nn.Module):
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


class SegmentationHead(nn.Module):
    def __init__(self, channels: dict[str, int], num_classes: int):
        super().__init__()
        self.deeplab = DeepLabHead(channels["layer4"], num_classes)

    def forward(self, features, images):
        logits = self.deeplab(features["layer4"])
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def loss(self, features, images, targets):
        return F.cross_entropy(self(features, images).float(), targets)

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


class DetectionHead(nn.Module):
    """Faster R-CNN without a backbone of its own: ``rcnn.backbone`` is the FPN, fed with the
    shared trunk's features (what ``GeneralizedRCNN.forward`` would do, with the trunk moved
    out). ``num_classes`` counts the background."""

    def __init__(self, channels: dict[str, int], num_classes: int, rois_per_image: int = 512,
                 test_proposals: int = 1000):
        super().__init__()
        self.rcnn = FasterRCNN(_FPN(channels), num_classes=num_classes,
                               box_batch_size_per_image=rois_per_image,
                               rpn_post_nms_top_n_test=test_proposals)

    def _run(self, features, images, targets=None):
        # Skips rcnn.transform: the images are normalised already and must keep the size the
        # trunk saw (its padding to a multiple of 32 would shift the anchors' strides).
        r = self.rcnn
        batch = ImageList(images, [tuple(images.shape[-2:])] * len(images))
        pyramid = r.backbone(features)
        proposals, rpn_losses = r.rpn(batch, pyramid, targets)
        detections, roi_losses = r.roi_heads(pyramid, proposals, batch.image_sizes, targets)
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
    """One trunk (a torchvision ResNet whose ``fc`` is dropped) and a head per task.

    ``forward(task, images, targets)`` is the task's training loss, so a DeepSpeed engine wraps
    the whole net and each step runs one task; ``predict(task, images)`` evaluates."""

    def __init__(self, trunk: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        trunk.fc = nn.Identity()
        self.backbone = trunk
        self.heads = nn.ModuleDict(heads)

    def features(self, images) -> dict[str, torch.Tensor]:
        t = self.backbone
        x = t.maxpool(t.relu(t.bn1(t.conv1(images))))
        out = {}
        for name in LAYERS:
            x = out[name] = getattr(t, name)(x)
        return out

    def forward(self, task: str, images, targets):
        return self.heads[task].loss(self.features(images), images, targets)

    @torch.no_grad()
    def predict(self, task: str, images):
        return self.heads[task].predict(self.features(images), images)
