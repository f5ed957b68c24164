"""MultiMix's parts against hand computations: the saliency map, the pseudo-label mask and
loss, the Dice and KL terms, and the network's shapes and bridge."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from muscle_hpc.models.backbone import build_backbone
from muscle_hpc.models.multimix import (
    MultiMixNet,
    pseudo_label_loss,
    saliency,
    seg_kl,
    soft_dice_loss,
)


def test_saliency_is_the_absolute_weight_row_of_the_predicted_class_on_a_linear_net():
    """For logits = W x + b, d(max logit)/dx is W's row of the argmax class: taken per image,
    as an absolute value, shaped as the image."""
    torch.manual_seed(0)
    w = torch.randn(3, 1 * 2 * 4)
    b = torch.tensor([0.0, 5.0, -5.0])  # image-dependent argmax comes from x below
    x = torch.randn(4, 1, 2, 4) * 3
    logits = x.flatten(1) @ w.T + b
    got = saliency(lambda im: im.flatten(1) @ w.T + b, x)
    want = w[logits.argmax(dim=1)].abs().reshape(x.shape)
    assert torch.equal(got, want)
    assert not got.requires_grad


def test_saliency_of_a_tiny_conv_net_matches_the_chain_rule_and_restores_the_mode():
    """A 1x1 conv (weight a) + ReLU + global sum + linear (rows v_c): d s_c / d x_ij =
    v_c * a * 1[a x_ij > 0], hand-computed; the net comes back in the mode it was in, and
    dropout is off during the pass (eval), so two calls agree."""
    net = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU(), nn.Dropout(0.9),
                        nn.Flatten(), nn.Linear(6, 2, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(2.0)
        net[4].weight.copy_(torch.tensor([[1.0, -1, 2, 0, 1, 1], [0.5, 0.5, 0.5, 0.5, 0.5, 3]]))
    x = torch.tensor([[[[1.0, -1.0, 2.0], [0.5, -2.0, 1.0]]]])
    net.train()
    got = saliency(net, x, net)
    assert net.training
    logits = net.eval()(x)
    c = int(logits.argmax())
    v = net[4].weight[c].reshape(1, 1, 2, 3)
    want = (v * 2.0 * (x > 0)).abs()
    assert torch.equal(got, want)
    assert torch.equal(saliency(net, x, net), got)


def test_the_pseudo_label_mask_and_loss_on_crafted_logits():
    # Weak softmax max: 0.9 (label 1), 0.6 (below 0.7), exactly 0.7 (label 0: kept, ">=").
    weak = torch.log(torch.tensor([[0.1, 0.9], [0.6, 0.4], [0.7, 0.3]]))
    strong = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    loss, mask = pseudo_label_loss(weak, strong, 0.7)
    assert mask.tolist() == [True, False, True]
    ce0 = -math.log(math.exp(0.0) / (math.exp(2.0) + math.exp(0.0)))  # label 1
    ce2 = -math.log(0.5)  # label 0, equal logits
    assert loss.item() == pytest.approx((ce0 + 0 + ce2) / 3)  # the whole batch's mean
    # No gradient reaches the weak view; the strong view gets one.
    weak.requires_grad_(True)
    strong.requires_grad_(True)
    pseudo_label_loss(weak, strong, 0.7)[0].backward()
    assert weak.grad is None and strong.grad.abs().sum() > 0


def test_soft_dice_is_the_authors_formula_on_the_foreground():
    masks = torch.tensor([[[0, 1], [1, 1]]])
    p1 = torch.tensor([[0.2, 0.9], [0.6, 0.5]])
    logits = torch.stack([torch.zeros(2, 2), torch.logit(p1)])[None]  # softmax fg = sigmoid
    inter, total = 0.9 + 0.6 + 0.5, p1.sum() + 3
    assert soft_dice_loss(logits, masks).item() == pytest.approx(
        1 - (2 * inter + 1) / (total.item() + 1), rel=1e-5)
    perfect = torch.stack([-20 * masks[0].float() + 10, 20 * masks[0].float() - 10])[None]
    assert soft_dice_loss(perfect, masks).item() < 1e-4


def test_seg_kl_pairs_images_by_position_and_is_zero_for_equal_predictions():
    a = torch.randn(3, 2, 4, 4)
    assert seg_kl(a, a).item() == pytest.approx(0, abs=1e-6)
    b = torch.randn(2, 2, 4, 4)
    p, q = a[:2].softmax(1), b.softmax(1)
    want = (p * (p.log() - q.log())).sum(1).mean()
    assert seg_kl(a, b).item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("bridge", ["saliency", "image", "none"])
def test_the_net_gives_class_and_mask_logits_at_odd_sizes(bridge):
    torch.manual_seed(0)
    net = MultiMixNet(build_backbone("resnet18"), "resnet18", ("pneumonia", "lung"), 2, 2,
                      bridge=bridge)
    x = torch.randn(2, 1, 80, 128)
    logits, masks = net(x)
    assert logits.shape == (2, 2) and masks.shape == (2, 2, 80, 128)
    (F.cross_entropy(logits, torch.tensor([0, 1])) + masks.mean()).backward()
    assert net.backbone.conv1.weight.grad.abs().sum() > 0
    probs = net.predict("lung", x)
    assert probs.shape == (2, 2, 80, 128) and torch.allclose(probs.sum(1), torch.ones(1))
    with pytest.raises(KeyError, match="no task 'mura'"):
        net.predict("mura", x)


def test_the_bridge_carries_the_saliency_into_the_decoder():
    """With the bridge, the masks depend on the saliency: the same image and net give other
    masks when the map is replaced by zeros (``image``), and equal ones without a bridge
    whatever the map."""
    torch.manual_seed(0)
    sal = MultiMixNet(build_backbone("resnet18"), "resnet18", ("c", "s"), 2, 2).eval()
    img = MultiMixNet(build_backbone("resnet18"), "resnet18", ("c", "s"), 2, 2,
                      bridge="image").eval()
    img.load_state_dict(sal.state_dict())
    x = torch.randn(1, 1, 64, 96)
    with torch.no_grad():
        assert not torch.allclose(sal(x)[1], img(x)[1])
        assert torch.equal(sal(x)[0], img(x)[0])  # the classification branch is the same


def test_weak_and_strong_views_are_the_authors_and_the_same_for_the_same_draw():
    """A view depends on (seed, epoch, index, kind) alone; the weak view is a flip and a crop
    of the reflect-padded image (every value is one of the image's, in its own row when not
    shifted vertically); each pool operation runs as PIL runs it."""
    import numpy as np
    from PIL import Image, ImageOps

    from muscle_hpc.data import randaugment

    img = (np.arange(40 * 64) % 251).astype(np.uint8).reshape(40, 64)
    for kind in ("weak", "strong"):
        a = randaugment.view(img, kind, 0, 3, 7)
        assert a.shape == img.shape and a.dtype == np.uint8
        assert np.array_equal(a, randaugment.view(img, kind, 0, 3, 7))
        assert not np.array_equal(a, randaugment.view(img, kind, 0, 4, 7))
    weak = randaugment.view(img, "weak", 0, 3, 7)
    assert set(np.unique(weak)) <= set(np.unique(img))
    rng = np.random.default_rng(0)
    pil = Image.fromarray(img)
    assert np.array_equal(np.asarray(randaugment.apply("solarize", pil, 5, 256, 0, rng)),
                          np.asarray(ImageOps.solarize(pil, 256 - 128)))
    assert np.array_equal(np.asarray(randaugment.apply("posterize", pil, 5, 4, 4, rng)),
                          np.asarray(ImageOps.posterize(pil, 6)))
    assert len(randaugment.POOL) == 13  # FixMatch's pool; Cutout off, as the authors have it
