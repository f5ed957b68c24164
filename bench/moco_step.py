"""MoCo training step: DeepSpeed engine vs. plain PyTorch, weak scaling over gloo ranks, and
MoCo's own traffic against the gradient all-reduce.

    python -m bench.moco_step [--arch resnet18] [--size 400x250] [--batch 8] [--steps 6]

Every rank is a fresh process with one thread, fed a fixed random batch (the loader has its
own benchmark, ``bench.loader``), on the stage's model (1-channel ResNet, MoCo v2 MLP head,
shuffle-BN) and DeepSpeed config (fp32 on CPU, ZeRO 0).

- 1 rank: the same model and batch stepped by plain PyTorch (``loss.backward()``,
  ``SGD.step()``) and by the DeepSpeed engine, alternating, median step time of each.
- 1 vs 2 ranks, the same batch per rank (weak scaling): images/s of the engine step.
- Bytes each rank sends per step (ring-algorithm bus bytes, ``moco.bus_bytes``): MoCo's own
  collectives as recorded while stepping on 2 ranks, and the gradient all-reduce. The same
  for the paper's setting (ResNet-50, 8 ranks × 32 images of 800×500, bf16 gradients) and for
  the reference's image-gathering shuffle-BN, from the byte formulas.

Ratios are printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from muscle_hpc import config, dist
from muscle_hpc.ds_engine import deepspeed_config, deepspeed_engine
from muscle_hpc.models.backbone import ARCHS, build_backbone
from muscle_hpc.models.build import build_moco
from muscle_hpc.models.moco import MoCo, bn_channels, bus_bytes, moco_collective_bytes


def make_moco(arch: str, K: int) -> MoCo:
    """The stage's MoCo (the default config's model section) at ``arch`` and queue ``K``, with
    one shuffle-BN group per rank: the reference's layout, whose collectives the byte
    formulas count."""
    torch.manual_seed(0)
    return build_moco(replace(config.MocoConfig().model, arch=arch, K=K, bn_groups=1))


def batch(rank: int, b: int, w: int, h: int):
    g = torch.Generator().manual_seed(rank)
    return torch.randn(b, 1, h, w, generator=g), torch.randn(b, 1, h, w, generator=g)


def timed(step, n: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    dist.init_distributed(dist.DistEnv(rank, world, rank, "127.0.0.1", port))
    try:
        w, h = args.size
        b = args.batch
        cfg = config.load_config(None, [f"data.batch_size={b * world}", f"model.arch={args.arch}",
                                        "run.zero_stage=0", "run.precision=fp32"])
        K = b * world * 4
        im_q, im_k = batch(rank, b, w, h)

        moco = make_moco(args.arch, K)
        engine = deepspeed_engine(moco, list(moco.trainable_parameters()),
                                  deepspeed_config(cfg.run, b * world, world, on_cuda=False),
                                  momentum=0.9, weight_decay=1e-4)

        def ds_step():
            logits, labels = engine(im_q, im_k)
            engine.backward(F.cross_entropy(logits, labels))
            engine.step()

        result = {}
        if world == 1:
            plain = make_moco(args.arch, K)
            opt = torch.optim.SGD(plain.trainable_parameters(), lr=0.03, momentum=0.9,
                                  weight_decay=1e-4)

            def plain_step():
                logits, labels = plain(im_q, im_k)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(logits, labels).backward()
                opt.step()

            result["plain"], result["deepspeed"] = [], []
            for _ in range(args.rounds):  # alternate, so drifts of the machine hit both
                result["plain"] += timed(plain_step, args.steps, args.warmup)
                result["deepspeed"] += timed(ds_step, args.steps, args.warmup)
        else:
            result["deepspeed"] = timed(ds_step, args.steps * args.rounds, args.warmup)
            moco.traffic = []
            ds_step()
            result["moco_traffic"] = moco.traffic
            result["grad_elems"] = sum(p.numel() for p in moco.trainable_parameters())
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.shutdown()


def run_ranks(world: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(world, dist.free_port(), args, out), nprocs=world)
        return json.loads(Path(out).read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.moco_step",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18", choices=ARCHS)
    p.add_argument("--size", default="400x250", help="WxH of the views")
    p.add_argument("--batch", type=int, default=8, help="images per rank")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    args.size = tuple(int(v) for v in args.size.lower().split("x"))
    w, h = args.size
    print(f"MoCo step, {args.arch}, {w}x{h} views, {args.batch} images per rank, one thread per "
          f"rank, fp32, ZeRO 0, shuffle-BN")

    one = run_ranks(1, args)
    two = run_ranks(2, args)
    t_plain = statistics.median(one["plain"])
    t_ds1 = statistics.median(one["deepspeed"])
    t_ds2 = statistics.median(two["deepspeed"])
    ips = {"plain": args.batch / t_plain, "ds1": args.batch / t_ds1, "ds2": 2 * args.batch / t_ds2}
    print(f"1 rank, plain PyTorch : {ips['plain']:8.2f} img/s  (median step {t_plain:.3f} s)")
    print(f"1 rank, DeepSpeed     : {ips['ds1']:8.2f} img/s  (median step {t_ds1:.3f} s)")
    print(f"2 ranks, DeepSpeed    : {ips['ds2']:8.2f} img/s  (median step {t_ds2:.3f} s)")

    moco_bytes = sum(bus_bytes(op, n, 2) for op, n in two["moco_traffic"])
    grad_bytes = bus_bytes("all_reduce", two["grad_elems"] * 4, 2)
    ops = sorted({op for op, _ in two["moco_traffic"]})
    print(f"2 ranks, bytes sent per rank per step: MoCo {moco_bytes / 1e6:.3f} MB "
          f"({len(two['moco_traffic'])} collectives: {', '.join(ops)}), "
          f"gradient all-reduce {grad_bytes / 1e6:.1f} MB (fp32)")

    r50 = build_backbone("resnet50")
    channels, layers = bn_channels(r50)
    paper = moco_collective_bytes((32, 1, 500, 800), world=8, dim=128, bn_channels=channels,
                                  n_bn=layers)
    r50_grads = sum(p.numel() for p in make_moco("resnet50", 65536).trainable_parameters())
    paper_grad = bus_bytes("all_reduce", r50_grads * 2, 8)  # bf16 gradients
    print(f"paper setting (ResNet-50, 8 ranks x 32 images 800x500, bf16 gradients), per rank "
          f"per step: ours {paper['ours']['total'] / 1e6:.2f} MB, reference shuffle-BN "
          f"{paper['reference']['total'] / 1e6:.1f} MB, gradient all-reduce "
          f"{paper_grad / 1e6:.1f} MB")

    print(f"ratio DeepSpeed / plain PyTorch, 1 rank      : {ips['ds1'] / ips['plain']:.3f} "
          f"(goal >= 0.97)")
    print(f"weak scaling efficiency, 2 vs 1 rank         : {ips['ds2'] / (2 * ips['ds1']):.3f} "
          f"(goal >= 0.90)")
    print(f"MoCo bytes / gradient bytes, 2 ranks measured: {moco_bytes / grad_bytes:.4f} "
          f"(goal <= 0.10)")
    print(f"MoCo bytes / gradient bytes, paper setting   : "
          f"{paper['ours']['total'] / paper_grad:.4f} (reference design: "
          f"{paper['reference']['total'] / paper_grad:.2f})")


if __name__ == "__main__":
    main()
