"""MultiMix (Haque, Imran, Wang, Terzopoulos; ISBI 2021, MELBA 2021) on our ResNet trunk: one
network that classifies (pneumonia) and segments (lungs), its classifier's saliency bridged
into the segmentation decoder, trained semi-supervised from two sources that each carry one
kind of label.

Read from the paper and the authors' code (github.com/ayaanzhaque/MultiMix, ``MultiMix.py``);
where they differ, or where our trunk forces a choice, the README's MultiMix fidelity rows say
which reading is taken and why:

- **Encoder**: our 1-channel ResNet-18/50 (any init) in place of the authors' 16-256-channel
  U-Net encoder; its stages (stem at /2, ``layer1``-``layer4`` at /4-/32) are the skips.
- **Classification branch**: off the bottleneck (``layer4``): max-pool 2, global average pool,
  one linear layer, as the authors' "two pooling layers and an FC layer".
- **Decoder**: U-Net stages, each ``upsample (bilinear, align_corners) -> concat skip ->
  (3x3 conv, InstanceNorm, LeakyReLU 0.2) x2 -> Dropout 0.25`` (the authors' block), from
  ``layer4`` up to the stem, then a 1x1 convolution to one logit per class and a bilinear
  upsampling to the input size (the stem is at /2).
- **Saliency bridge**: ``|d s_y / d x|``, the gradient of the predicted class's logit with
  respect to the input image, computed with the encoder in eval mode and detached (a fixed
  input, no gradient through it); the image and its map, resized bilinearly, are concatenated
  into the first decoder stage. ``bridge="image"`` passes zeros for the map (the control: is it
  the saliency or the image that helps?), ``"none"`` drops the bridge (the paper's UMTL).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from muscle_hpc.models.heads import LAYERS, trunk_channels
from muscle_hpc.registry import MULTIMIX_BRIDGES

BRIDGES = MULTIMIX_BRIDGES
# The decoder's widths at /16, /8, /4, /2: ResNet-18's stage widths (the authors halve theirs
# at each stage too); the same for ResNet-50, whose 1024-2048-channel skips it narrows.
DECODER_WIDTHS = (256, 128, 64, 64)
STEM_CHANNELS = 64


def saliency(classify: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
             module: nn.Module | None = None) -> torch.Tensor:
    """``|d s_y / d x|`` per image: the absolute gradient of each image's largest class logit
    (``classify(images)``, before softmax) with respect to its pixels, detached. ``module``
    (the network ``classify`` runs) is put in eval mode for the pass and restored after, as
    the authors compute it (dropout off; here batch-norm on its running statistics, so each
    image's map depends on that image alone). Computed under ``enable_grad``, so evaluation
    under ``no_grad`` gets it too; only the input's gradient is taken, no parameter's."""
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        with torch.enable_grad():
            x = images.detach().float().requires_grad_(True)
            logits = classify(x)
            grad, = torch.autograd.grad(logits.max(dim=1).values.sum(), x)
    finally:
        if module is not None:
            module.train(was_training)
    return grad.abs().to(images.dtype)


class DecoderBlock(nn.Sequential):
    """The authors' ``double_conv``: (3x3 conv, InstanceNorm, LeakyReLU 0.2) twice, then
    dropout."""

    def __init__(self, cin: int, cout: int, dropout: float, slope: float):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.LeakyReLU(slope),
            nn.Conv2d(cout, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.LeakyReLU(slope),
            nn.Dropout(dropout))


def up_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)


class MultiMixNet(nn.Module):
    """The trunk, the classification branch, the decoder and the bridge.

    Args:
        trunk: a 1-channel torchvision ResNet (its ``fc`` is dropped).
        arch: ``resnet18`` or ``resnet50`` (the skips' widths).
        tasks: the classification task's name and the segmentation task's, as ``predict``
            is asked for them.
        num_classes: classes of the classification task.
        seg_classes: classes of the segmentation task, the background included.
        bridge: ``saliency`` (the paper's), ``image`` (zeros for the map) or ``none``.
        dropout, slope: the decoder blocks' dropout and LeakyReLU slope.
    """

    def __init__(self, trunk: nn.Module, arch: str, tasks: tuple[str, str], num_classes: int,
                 seg_classes: int, bridge: str = "saliency", dropout: float = 0.25,
                 slope: float = 0.2):
        super().__init__()
        if bridge not in BRIDGES:
            raise ValueError(f"bridge must be one of {', '.join(BRIDGES)}, not {bridge!r}")
        trunk.fc = nn.Identity()
        self.backbone = trunk
        self.cls_task, self.seg_task = tasks
        self.bridge = bridge
        ch = trunk_channels(arch)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)  # ceil: a 1-pixel map at small inputs
        self.classifier = nn.Linear(ch["layer4"], num_classes)
        w16, w8, w4, w2 = DECODER_WIDTHS
        extra = 0 if bridge == "none" else 2
        self.decoder = nn.ModuleList([
            DecoderBlock(ch["layer4"] + ch["layer3"] + extra, w16, dropout, slope),
            DecoderBlock(w16 + ch["layer2"], w8, dropout, slope),
            DecoderBlock(w8 + ch["layer1"], w4, dropout, slope),
            DecoderBlock(w4 + STEM_CHANNELS, w2, dropout, slope)])
        self.seg_out = nn.Conv2d(w2, seg_classes, 1)

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The stem's output (before max-pooling, /2) and each stage's (/4 ... /32)."""
        t = self.backbone
        stem = t.relu(t.bn1(t.conv1(images)))
        out, x = [stem], t.maxpool(stem)
        for name in LAYERS:
            x = getattr(t, name)(x)
            out.append(x)
        return out

    def classify_features(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(bottleneck).mean(dim=(2, 3)))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """The class logits alone (what the saliency differentiates)."""
        return self.classify_features(self.encode(images)[-1])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (B, C) and mask logits (B, K, H, W) of every image."""
        stem, l1, l2, l3, l4 = self.encode(images)
        logits = self.classify_features(l4)
        x = torch.cat([up_to(l4, l3), l3], 1)
        if self.bridge != "none":
            sal = (saliency(self.classify, images, self) if self.bridge == "saliency"
                   else torch.zeros_like(images))
            x = torch.cat([x, up_to(torch.cat([images, sal], 1), l3)], 1)
        x = self.decoder[0](x)
        for block, skip in zip(self.decoder[1:], (l2, l1, stem)):
            x = block(torch.cat([up_to(x, skip), skip], 1))
        masks = F.interpolate(self.seg_out(x), size=images.shape[-2:], mode="bilinear",
                              align_corners=False)
        return logits, masks

    @torch.no_grad()
    def predict(self, task: str, images: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities for ``task``, on the CPU, as ``MultiTaskNet.predict`` gives
        them (so ``muscle_hpc.evaluate`` scores either net): (B, C) for the classification
        task, (B, K, H, W) for the segmentation task."""
        if task not in (self.cls_task, self.seg_task):
            raise KeyError(f"MultiMix has no task {task!r} (it has {self.cls_task}, "
                           f"{self.seg_task})")
        logits, masks = self(images)
        return (logits if task == self.cls_task else masks).float().softmax(dim=1).cpu()


def soft_dice_loss(mask_logits: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0
                   ) -> torch.Tensor:
    """1 - (2 sum pq + s) / (sum p + sum q + s), per image and foreground class, averaged:
    the authors' Dice loss (``dice_loss``: ``smooth`` 1, over the pixels of each image) on the
    softmax probabilities of the ``K - 1`` foreground classes (with two classes, the sigmoid
    of one logit, as theirs)."""
    k = mask_logits.shape[1]
    p = mask_logits.float().softmax(dim=1)[:, 1:]
    q = F.one_hot(masks.long(), k).permute(0, 3, 1, 2)[:, 1:].float()
    inter = (p * q).sum(dim=(2, 3))
    return (1 - (2 * inter + smooth) / (p.sum(dim=(2, 3)) + q.sum(dim=(2, 3)) + smooth)).mean()


def pseudo_label_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor,
                      threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch's term, as the authors compute it: the weak view's argmax is the pseudo-label
    where its softmax probability is at least ``threshold``; cross-entropy of the strong
    view against it there, averaged over the whole unlabelled batch (images below the
    threshold count as zeros). No gradient flows through the pseudo-label. Returns the loss
    and the mask of confident images."""
    probs = weak_logits.detach().float().softmax(dim=1)
    confidence, labels = probs.max(dim=1)
    confident = confidence >= threshold
    ce = F.cross_entropy(strong_logits.float(), labels, reduction="none")
    return (ce * confident).mean(), confident


def seg_kl(labelled_logits: torch.Tensor, unlabelled_logits: torch.Tensor) -> torch.Tensor:
    """The paper's unlabelled segmentation term (its eq. 2, weight beta): the KL divergence of
    the unlabelled images' per-pixel class distributions from the labelled ones', image ``i``
    of one batch against image ``i`` of the other (the authors' pairing), averaged over
    pixels. The authors' code takes a softmax over one channel, which makes it exactly 0;
    over our K classes it is what the paper writes."""
    n = min(len(labelled_logits), len(unlabelled_logits))
    log_p = labelled_logits[:n].float().log_softmax(dim=1)
    log_q = unlabelled_logits[:n].float().log_softmax(dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
