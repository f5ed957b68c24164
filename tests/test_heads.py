"""The task heads against their references: Faster R-CNN against torchvision's own FasterRCNN
(anchors at the trunk's true strides), the segmentation trunk against torchvision's dilated
ResNet-50 and the à trous identity, and the detection head and MoCo's logits under bf16
autocast against fp32."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from muscle_hpc.models.backbone import build_backbone, export_torchvision, set_output_stride
from muscle_hpc.models.heads import (
    ClassifierHead,
    DetectionHead,
    MultiTaskNet,
    SegmentationHead,
    trunk_channels,
)
from muscle_hpc.models.moco import contrastive_logits

STRIDES = (4, 8, 16, 32, 64)


def detection_net(arch="resnet18", rois=64, proposals=100) -> MultiTaskNet:
    torch.manual_seed(0)
    head = DetectionHead(trunk_channels(arch), 3, rois, proposals)
    return MultiTaskNet(build_backbone(arch), {"tbx": head})


def image_list(images):
    return ImageList(images, [tuple(images.shape[-2:])] * len(images))


def anchors_per_level(net, images):
    """The RPN's anchors for ``images``, split by pyramid level, and each level's grid."""
    pyramid = list(net.heads["tbx"].rcnn.backbone(net.task_features("tbx", images)).values())
    generator = net.heads["tbx"].rcnn.rpn.anchor_generator
    anchors = generator(image_list(images), pyramid)[0]
    per_cell = generator.num_anchors_per_location()
    grids = [tuple(p.shape[-2:]) for p in pyramid]
    sizes = [h * w * a for (h, w), a in zip(grids, per_cell)]
    return list(zip(anchors.split(sizes), grids, per_cell))


@pytest.mark.parametrize("width, height", [(800, 500), (400, 250)])
def test_anchor_centres_lie_on_each_levels_feature_grid(width, height):
    net = detection_net().eval()
    with torch.no_grad():
        levels = anchors_per_level(net, torch.zeros(1, 1, height, width))
    for (anchors, (rows, cols), per_cell), stride in zip(levels, STRIDES):
        assert (rows, cols) == (-(-height // stride), -(-width // stride))  # strided convs
        centres = ((anchors[:, :2] + anchors[:, 2:]) / 2).view(rows, cols, per_cell, 2)
        ys, xs = torch.meshgrid(torch.arange(rows) * stride, torch.arange(cols) * stride,
                                indexing="ij")
        grid = torch.stack([xs, ys], -1)[:, :, None].float().expand_as(centres)
        assert torch.equal(centres, grid), stride


def test_a_box_in_the_bottom_rows_is_matched_as_well_as_at_the_top():
    net = detection_net().eval()
    with torch.no_grad():
        levels = anchors_per_level(net, torch.zeros(1, 1, 500, 800))
    anchors = torch.cat([a for a, _, _ in levels])
    top = torch.tensor([[200.0, 52.0, 264.0, 116.0], [300.0, 116.0, 428.0, 244.0]])
    down = torch.tensor([[384.0], [256.0]])  # whole cells of the coarsest level (64 px)
    bottom = top + down * torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert (bottom[:, 3] == 500).all()  # down to the last row
    iou_top, iou_bottom = box_iou(top, anchors), box_iou(bottom, anchors)
    assert torch.allclose(iou_top.max(dim=1).values, iou_bottom.max(dim=1).values)
    assert torch.equal((iou_top >= 0.7).sum(dim=1), (iou_bottom >= 0.7).sum(dim=1))
    assert (iou_bottom.max(dim=1).values > 0.85).all()


class _TrunkWithFPN(nn.Module):
    """The reference's backbone: our trunk's features through the head's own FPN."""

    def __init__(self, net: MultiTaskNet):
        super().__init__()
        self.net, self.out_channels = net, 256

    def forward(self, x):
        return self.net.heads["tbx"].rcnn.backbone(self.net.features(x))


def torchvision_reference(net: MultiTaskNet, rois=64, proposals=100) -> FasterRCNN:
    """torchvision's FasterRCNN with the same weights (the very same FPN, RPN head and RoI
    heads) and its own anchor generator, behind a transform that neither resizes nor normalises
    (it still pads to a multiple of 32)."""
    rcnn = net.heads["tbx"].rcnn
    ref = FasterRCNN(_TrunkWithFPN(net), num_classes=3, image_mean=[0.0], image_std=[1.0],
                     box_batch_size_per_image=rois, rpn_post_nms_top_n_test=proposals)
    ref.rpn.head, ref.roi_heads = rcnn.rpn.head, rcnn.roi_heads
    ref.transform.resize = lambda image, target=None: (image, target)
    return ref


@pytest.mark.parametrize("height, width", [(128, 256), (192, 320)])
def test_detection_equals_torchvision_faster_rcnn_on_the_reference_path(height, width):
    """At sizes whose every pyramid level divides the image (multiples of 64): at an odd
    multiple of 32 torchvision's own last level is off its grid (see the anchor generator)."""
    net = detection_net()
    ref = torchvision_reference(net)
    torch.manual_seed(1)
    images = torch.randn(2, 1, height, width)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[40.0, 30.0, 120.0, 140.0], [5.0, 5.0, 60.0, 40.0]]),
                "labels": torch.tensor([2, 1])}]

    net.train(), ref.train()
    torch.manual_seed(2)  # the RPN's and RoI heads' samplers draw at random
    _, ours = net.heads["tbx"]._run(net.task_features("tbx", images), images, targets)
    torch.manual_seed(2)
    theirs = ref(list(images), targets)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6), k

    net.eval(), ref.eval()
    with torch.no_grad():
        pyramid = net.heads["tbx"].rcnn.backbone(net.task_features("tbx", images))
        proposals, _ = net.heads["tbx"].rcnn.rpn(image_list(images), pyramid)
        ref_batch, _ = ref.transform(list(images))
        ref_proposals, _ = ref.rpn(ref_batch, ref.backbone(ref_batch.tensors))
        assert ref_batch.tensors.shape == images.shape  # nothing padded, nothing resized
        for a, b in zip(proposals, ref_proposals):
            assert torch.allclose(a, b, atol=1e-4)
        detections = net.predict("tbx", images)
        for a, b in zip(detections, ref(list(images))):
            assert a.keys() == b.keys()
            for k in a:
                assert torch.allclose(a[k], b[k], atol=1e-4), k


def close(a, b, tol=1e-4):
    """Equal up to float rounding, relative to the tensors' scale: a 1-channel conv1 and
    torchvision's 3-channel one on the gray image x3 differ by ~1e-6, which 50 layers of
    training-mode batch norm on small maps carry up to ~1e-4 (as much undilated)."""
    assert a.shape == b.shape
    assert (a - b).abs().max() <= tol * b.abs().max(), (a - b).abs().max()


def trunk_at(arch: str, output_stride: int):
    """torchvision's ``arch`` dilated to ``output_stride``, as its DeepLab-V3 builds it."""
    replace = [False, output_stride == 8, output_stride <= 16]
    return getattr(torchvision.models, arch)(replace_stride_with_dilation=replace)


def tv_features(model, x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


@pytest.mark.parametrize("output_stride", [8, 16])
def test_lung_features_equal_torchvisions_dilated_resnet50(output_stride):
    torch.manual_seed(0)
    heads = {"lung": SegmentationHead(trunk_channels("resnet50"), 2, output_stride)}
    net = MultiTaskNet(build_backbone("resnet50"), heads)
    ref = trunk_at("resnet50", output_stride)
    ref.load_state_dict(export_torchvision(net.backbone))
    gray = torch.randn(2, 1, 72, 104)
    for mode in (True, False):  # batch statistics and running statistics
        net.train(mode), ref.train(mode)
        features = net.task_features("lung", gray)
        expected = tv_features(ref, gray.expand(-1, 3, -1, -1))
        assert features["layer4"].shape[-2:] == (-(-72 // output_stride),
                                                 -(-104 // output_stride))
        close(features["layer4"], expected, 1e-3 if mode else 1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilated_trunk_subsampled_is_the_strided_trunk(arch, output_stride):
    """The à trous identity, with eval-mode BN: the dilated layer4, taken every 32/os cells,
    is the undilated layer4 (odd sizes included). torchvision has no dilated BasicBlock, so
    this is ResNet-18's reference."""
    torch.manual_seed(0)
    trunk = build_backbone(arch).eval()
    x = torch.randn(2, 1, 100, 136)  # 25x34 after the stem: odd at layer2
    with torch.no_grad():
        strided = tv_features(trunk, x)
        set_output_stride(trunk, output_stride)
        dilated = tv_features(trunk, x)
        set_output_stride(trunk, 32)
        step = 32 // output_stride
        close(dilated[..., ::step, ::step], strided)
        assert torch.equal(tv_features(trunk, x), strided)


def test_other_tasks_see_the_undilated_trunk_after_a_lung_step_and_the_export_is_unchanged():
    torch.manual_seed(0)
    channels = trunk_channels("resnet18")
    net = MultiTaskNet(build_backbone("resnet18"), {
        "lung": SegmentationHead(channels, 2, 8), "pneumonia": ClassifierHead(channels, 2)})
    exported = export_torchvision(net.backbone)
    stock = {n: (m.stride, m.dilation, m.padding) for n, m in net.backbone.named_modules()
             if isinstance(m, nn.Conv2d)}
    x = torch.randn(2, 1, 64, 96)
    net.eval()
    with torch.no_grad():
        assert net.predict("lung", x).shape == (2, 2, 64, 96)
    assert {n: (m.stride, m.dilation, m.padding) for n, m in net.backbone.named_modules()
            if isinstance(m, nn.Conv2d)} == stock
    after = export_torchvision(net.backbone)
    assert all(torch.equal(exported[k], after[k]) for k in exported if not k.startswith("fc."))

    net.train()
    net("lung", x, torch.randint(0, 2, (2, 64, 96))).backward()  # backward after the reset
    assert net.backbone.layer4[0].conv1.weight.grad is not None
    net.eval()
    plain = torchvision.models.resnet18()
    plain.load_state_dict(export_torchvision(net.backbone))
    plain.eval()
    with torch.no_grad():
        features = net.task_features("pneumonia", x)
        close(features["layer4"], tv_features(plain, x.expand(-1, 3, -1, -1)))


def test_aspp_rates_follow_the_output_stride():
    rates = {}
    for output_stride in (8, 16, 32):
        head = SegmentationHead(trunk_channels("resnet18"), 2, output_stride)
        rates[output_stride] = [m.dilation[0] for m in head.deeplab[0].convs.modules()
                                if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert rates == {8: [12, 24, 36], 16: [6, 12, 18], 32: [3, 6, 9]}
    with pytest.raises(ValueError, match="output stride must be one of"):
        SegmentationHead(trunk_channels("resnet18"), 2, 4)


def test_detections_under_bf16_autocast_equal_fp32_on_the_same_features():
    net = detection_net().eval()
    torch.manual_seed(3)
    images = torch.randn(2, 1, 160, 256)
    with torch.no_grad():
        features = net.task_features("tbx", images)
        head = net.heads["tbx"]
        fp32 = head.predict(features, images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = head.predict(features, images)
    assert sum(len(d["boxes"]) for d in fp32) > 0
    for a, b in zip(fp32, bf16):
        assert b["boxes"].dtype == torch.float32 and torch.equal(a["labels"], b["labels"])
        for k in ("boxes", "scores"):
            assert torch.allclose(a[k], b[k], rtol=1e-3, atol=0), k

    net.train()
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0]]), "labels": torch.tensor([1])}
               ] * 2
    torch.manual_seed(4)
    _, fp32_losses = head._run(features, images, targets)
    torch.manual_seed(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, bf16_losses = head._run(features, images, targets)
    for k in fp32_losses:
        assert bf16_losses[k].dtype == torch.float32
        assert torch.allclose(fp32_losses[k], bf16_losses[k], rtol=1e-3), k


def test_moco_logits_under_bf16_autocast_equal_fp32():
    torch.manual_seed(0)
    q = nn.functional.normalize(torch.randn(8, 128), dim=1)
    k = nn.functional.normalize(torch.randn(8, 128), dim=1)
    queue = nn.functional.normalize(torch.randn(128, 4096), dim=0)
    fp32 = contrastive_logits(q, k, queue, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = contrastive_logits(q, k, queue, 0.2)
        reference_in_bf16 = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], 1) / 0.2
    assert bf16.dtype == torch.float32
    assert torch.allclose(bf16, fp32, rtol=1e-3, atol=1e-6)
    # what it guards against: the same matmul under autocast is off by far more
    assert not torch.allclose(reference_in_bf16.float(), fp32, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("src, out", [((63, 100), (500, 800)), ((7, 5), (13, 29)),
                                      ((4, 6), (2, 3)), ((1, 1), (9, 7))])
def test_the_segmentation_resize_is_torchs_bilinear_in_value_and_gradient(src, out):
    """The matrix-product resize the head uses (its CUDA backward is deterministic) against
    ``F.interpolate(mode="bilinear", align_corners=False)``, up- and downsampling."""
    from muscle_hpc.models.heads import resize_bilinear

    x = torch.randn(2, 3, *src, dtype=torch.float64, requires_grad=True)
    ours, ref = resize_bilinear(x, out), nn.functional.interpolate(
        x, out, mode="bilinear", align_corners=False)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x, grad)[0],
                               torch.autograd.grad(ref, x, grad)[0])


def test_the_segmentation_head_is_torchvisions_deeplab_head_and_loss():
    """Same weights, same logits and same loss as torchvision's DeepLabHead + F.interpolate +
    2-D cross-entropy, with the ASPP pooling branch's broadcast and the per-pixel loss."""
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead

    torch.manual_seed(0)
    head = SegmentationHead(trunk_channels("resnet18"), 2, output_stride=8).double().eval()
    ref = DeepLabHead(512, 2, (12, 24, 36)).double().eval()
    ref.load_state_dict(head.deeplab.state_dict())
    images = torch.zeros(2, 1, 50, 70, dtype=torch.float64)
    features = {"layer4": torch.randn(2, 512, 7, 9, dtype=torch.float64)}
    target = torch.randint(0, 2, (2, 50, 70))
    logits = nn.functional.interpolate(ref(features["layer4"]), (50, 70), mode="bilinear",
                                       align_corners=False)
    torch.testing.assert_close(head(features, images), logits)
    torch.testing.assert_close(head.loss(features, images, target),
                               nn.functional.cross_entropy(logits.float(), target))


def test_multilabel_and_regression_heads_are_torchs_losses_on_one_linear_layer():
    from muscle_hpc.models.heads import MultiLabelHead, RegressionHead

    torch.manual_seed(0)
    channels = trunk_channels("resnet18")
    features = {"layer4": torch.randn(5, 512, 2, 2)}
    pooled = features["layer4"].mean(dim=(2, 3))
    ml = MultiLabelHead(channels, 3)
    y = torch.randint(0, 2, (5, 3)).float()
    logits = pooled @ ml.fc.weight.T + ml.fc.bias
    torch.testing.assert_close(ml.loss(features, None, y),
                               nn.BCEWithLogitsLoss()(logits, y))
    torch.testing.assert_close(ml.predict(features, None), logits.sigmoid())
    months = torch.tensor([30.0, 100.0, 128.0, 200.0, 12.0])
    for name, ref in (("l1", nn.L1Loss()), ("mse", nn.MSELoss())):
        reg = RegressionHead(channels, 120.0, 40.0, name)
        z = (pooled @ reg.fc.weight.T + reg.fc.bias).squeeze(1)
        torch.testing.assert_close(reg.loss(features, None, months), ref(z, (months - 120) / 40))
        torch.testing.assert_close(reg.predict(features, None), z * 40 + 120)
        assert {"mean", "std"} <= set(reg.state_dict())  # a saved head predicts in months
    with pytest.raises(ValueError, match="l1, mse"):
        RegressionHead(channels, loss="huber")
