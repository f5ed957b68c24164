import math

import pytest
import torch

from muscle_hpc.schedule import cosine, cyclic_cosine, set_lr


def test_cosine_end_points_and_monotone():
    lrs = [cosine(s, 100, 0.03) for s in range(101)]
    assert lrs[0] == pytest.approx(0.03) and lrs[50] == pytest.approx(0.015)
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cosine_warmup_is_linear_then_decays():
    assert [cosine(s, 100, 1.0, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(4, 100, 1.0, warmup_steps=4) == pytest.approx(1.0)
    assert cosine(52, 100, 1.0, warmup_steps=4) == pytest.approx(0.5)


def test_cyclic_cosine_is_eq_1():
    lr_max, lr_min, period = 0.1, 0.001, 40
    for t in range(0, 120, 7):
        by_hand = lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(2 * math.pi * t / period))
        assert cyclic_cosine(t, period, lr_max, lr_min) == pytest.approx(by_hand, rel=1e-12)
    assert cyclic_cosine(0, period, lr_max, lr_min) == pytest.approx(lr_max)
    assert cyclic_cosine(20, period, lr_max, lr_min) == pytest.approx(lr_min)
    assert cyclic_cosine(40, period, lr_max, lr_min) == pytest.approx(lr_max)


def test_set_lr_sets_every_group():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1]}, {"params": [p2], "lr": 5.0}], lr=1.0)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
