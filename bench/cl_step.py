"""Continual-stage step costs: the lung visit's step at output stride 8 vs 16 vs 32, and eq. 2's
L2-SP through autograd vs as the decoupled gradient term the stage uses.

    python -m bench.cl_step [--arch resnet18] [--size 400x250] [--batch 4] [--steps 5]

One process, the stage's model (1-channel ResNet trunk, the task heads), torch SGD with
momentum, a fixed random batch; on GPU (if any) under bf16 autocast as the stage runs there.
Each variant is stepped in turn, round after round, and its median step time is reported, so
slow drifts of the machine hit all variants alike.

- Lung (DeepLab-V3): forward, backward and SGD step with the trunk at output stride 8 (the
  default, torchvision's deeplabv3), 16 and 32 (undilated), on the same input.
- L2-SP on a pneumonia step: none; λΩ(w) added to the loss (``regularizers.omega``,
  autograd); the decoupled term (``regularizers.L2SP``, one ``_foreach`` op in the optimizer
  step, and SGD's weight decay).

Ratios against stride 32 and against the step without L2-SP are printed last.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from muscle_hpc.config import HeadsConfig
from muscle_hpc.models.backbone import ARCHS
from muscle_hpc.models.build import build_multitask
from muscle_hpc.models.heads import MultiTaskNet
from muscle_hpc.regularizers import L2SP, omega
from muscle_hpc.tasks import PAPER_TASKS


def size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h)


def make_net(arch: str, tasks, heads: HeadsConfig, device) -> MultiTaskNet:
    torch.manual_seed(0)
    return build_multitask(arch, {t: PAPER_TASKS[t] for t in tasks}, heads).to(device)


def sgd(net, backbone_decay: float = 1e-4) -> torch.optim.SGD:
    return torch.optim.SGD([{"params": list(net.backbone.parameters()), "role": "backbone",
                             "weight_decay": backbone_decay},
                            {"params": list(net.heads.parameters()), "role": "heads"}],
                           lr=1e-3, momentum=0.9, weight_decay=1e-4)


def stepper(net, opt, task, images, targets, autocast, penalty=None):
    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = net(task, images, targets)
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        opt.step()
    return step


def timed_rounds(steps: dict, rounds: int, sync) -> dict[str, float]:
    """Median seconds per step of each variant, stepped in turn (one warm-up round)."""
    times = {name: [] for name in steps}
    for r in range(rounds + 1):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cl_step", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18", choices=ARCHS)
    p.add_argument("--size", type=size, default=(400, 250), help="W x H (default 400x250)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed rounds per variant")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    w, h = args.size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 1, h, w, generator=g).to(device)
    masks = torch.randint(0, 2, (args.batch, h, w), generator=g).to(device)
    labels = torch.randint(0, 2, (args.batch,), generator=g).to(device)
    where = f"{args.arch}, {args.batch} x {w}x{h}, {device.type}{' bf16' if cuda else ' fp32'}"

    lung = {}
    for stride in (8, 16, 32):
        net = make_net(args.arch, ["lung"], HeadsConfig(seg_output_stride=stride), device)
        lung[f"stride {stride}"] = stepper(net, sgd(net), "lung", images, masks, autocast)
    lung_s = timed_rounds(lung, args.steps, sync)

    variants = {}
    net = make_net(args.arch, ["pneumonia"], HeadsConfig(), device)
    variants["no L2-SP"] = stepper(net, sgd(net), "pneumonia", images, labels, autocast)
    net = make_net(args.arch, ["pneumonia"], HeadsConfig(), device)
    anchors = [p.detach().clone() for p in net.backbone.parameters()]
    params = list(net.backbone.parameters())
    variants["autograd"] = stepper(net, sgd(net, 0.0), "pneumonia", images, labels, autocast,
                                   penalty=lambda: 0.05 * omega(params, anchors, 0.999))
    net = make_net(args.arch, ["pneumonia"], HeadsConfig(), device)
    opt = sgd(net)
    l2sp = L2SP(opt, 0.999, 0.05)
    opt.param_groups[0]["weight_decay"] = l2sp.weight_decay
    l2sp.set_anchor()
    variants["decoupled"] = stepper(net, opt, "pneumonia", images, labels, autocast)
    l2sp_s = timed_rounds(variants, args.steps, sync)

    print(f"lung step ({where}), median of {args.steps}:")
    for name, s in lung_s.items():
        print(f"  {name:10s} {s * 1000:9.1f} ms")
    print(f"pneumonia step with L2-SP ({where}), median of {args.steps}:")
    for name, s in l2sp_s.items():
        print(f"  {name:10s} {s * 1000:9.1f} ms")
    print("ratios:")
    for stride in (8, 16):
        print(f"  lung step, stride {stride} / stride 32: "
              f"{lung_s[f'stride {stride}'] / lung_s['stride 32']:.2f}")
    base = l2sp_s["no L2-SP"]
    print(f"  L2-SP through autograd / no L2-SP: {l2sp_s['autograd'] / base:.3f}")
    print(f"  L2-SP decoupled / no L2-SP: {l2sp_s['decoupled'] / base:.3f}")
    print(f"  L2-SP autograd / decoupled: {l2sp_s['autograd'] / l2sp_s['decoupled']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
