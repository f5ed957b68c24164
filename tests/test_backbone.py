import math

import pytest
import torch
import torchvision
from torch import nn

from muscle_hpc.models import build_backbone, export_torchvision, load_imagenet_into


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_names_match_torchvision_and_gray_forward(arch):
    torch.manual_seed(0)
    model = build_backbone(arch)
    ref = getattr(torchvision.models, arch)(weights=None).state_dict()
    own = model.state_dict()
    assert list(own) == list(ref)
    assert [k for k in own if own[k].shape != ref[k].shape] == ["conv1.weight"]
    assert own["conv1.weight"].shape == (64, 1, 7, 7)
    assert model(torch.randn(2, 1, 32, 48)).shape == (2, 1000)


def test_kaiming_fan_out_init():
    torch.manual_seed(0)
    model = build_backbone("resnet50")
    for conv in (model.conv1, model.layer3[0].conv2, model.layer4[0].conv3):
        w = conv.weight
        fan_out = w.shape[0] * w.shape[2] * w.shape[3]
        assert w.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)


def test_imagenet_load_sums_conv1():
    torch.manual_seed(0)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    model = build_backbone("resnet18")
    assert load_imagenet_into(model, sd) == []
    torch.testing.assert_close(model.conv1.weight, sd["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])
    head = build_backbone("resnet18", num_classes=128)
    assert load_imagenet_into(head, sd) == ["fc.bias", "fc.weight"]


@pytest.mark.parametrize("mlp", [False, True])
def test_export_loads_strictly_and_matches_on_gray_x3(mlp):
    torch.manual_seed(0)
    model = build_backbone("resnet18")
    if mlp:
        model.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    for p in model.parameters():  # not just the init, so a wrong conv1 mapping would show
        p.data.add_(0.01 * torch.randn_like(p))
    tv = torchvision.models.resnet18(weights=None)
    tv.load_state_dict(export_torchvision(model), strict=True)
    model.eval(), tv.eval()
    x = torch.randn(2, 1, 32, 48)
    if mlp:  # the head is not exported: compare the trunk's features
        model.fc, tv.fc = nn.Identity(), nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(tv(x.repeat(1, 3, 1, 1)), model(x), atol=1e-5, rtol=1e-5)
