"""Every stage's real training step on this machine's device, and (``--smoke``) every stage end
to end on 1 and 2 ranks.

    python -m bench.stages [--world 8] [--steps 10] [--size 800x500] [--shards DIR]
                           [--deterministic]
    python -m bench.stages --smoke [--arch resnet18] [--size 96x64] [--dir DIR]

Timing: one rank, the device it finds (CUDA, bf16, 800x500 by default; else the CPU, fp32, at a
small size and at most 4 images a step), the stages' own modules, DeepSpeed engine and configs
(``configs/*.yaml``): the MD-MoCo step (ResNet-18 and -50), the continual step of each task kind
(classification, segmentation at ``model.seg_output_stride``, detection; with L2-SP) and the
fine-tune step, each at the config's global batch over ``--world`` GPUs. Per step kind:
images/s with the inputs already on the device; images/s fed by the stage's loader path on
random images (``data.synthetic``: its thread, pinned memory, the copy to the device) and the
share of time the step waited for it; peak memory (the GPU's, or the process's peak RSS on CPU);
TFLOP/s counted by ``torch.utils.flop_counter`` and, on a GPU of known bf16 peak, its fraction.
Where FFCV imports, MD-MoCo is also fed by the real two-view loader from a shard (``--shards``,
or tiny shards built here): real-data vs synthetic-input throughput. ``--deterministic``
times the kernels of ``run.deterministic``; its cost is the ratio to a run without.

Smoke: each stage on random images (no FFCV, no dataset needed) for a few steps: alone (plain
``python``); on 2 ranks through ``torchrun``, stopped by SIGTERM mid-run, resumed, and compared
bit for bit with an uninterrupted run (``run.deterministic=true``); the continual stage alone as
MUSCLE--, on 2 ranks as MUSCLE; every exported file loaded by ``torch.load`` in a process that
cannot see a GPU. Two ranks use the CUDA backend string (``cpu:gloo,cuda:nccl``) where there are
two GPUs, gloo for both device types where there is one (NCCL refuses two ranks on one GPU), and
``cpu:gloo,cuda:gloo`` on CPU, so the two-backend group is exercised there too. One line per
check; exit status 1 if any failed.

Why one module over ~450 lines: a benchmark is one command; its timing and its smoke run share
the workloads they measure.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from muscle_hpc import registry

ROOT = Path(__file__).resolve().parents[1]
SHORT = {b.arch: b.name for b in registry.BACKBONES.values()}  # resnet18 -> r18
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets (SXM parts).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


# --- timing --------------------------------------------------------------------------------

def to_device(batch, device):
    """A loader batch (tuple or dict of tensors and lists of tensors) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return type(batch)(to_device(v, device) for v in batch)


class Workload:
    """One stage's training step: ``step(batch)`` as the stage runs it, a ``loader`` of the
    stage's loader path, the images per step, and the ``model`` stepped (the stage's builder's,
    ``muscle_hpc.models.build``)."""

    def __init__(self, name: str, step, loader, images: int, model: torch.nn.Module):
        self.name, self.step, self.loader, self.images = name, step, loader, images
        self.model = model


def _synthetic(overrides: list[str], count: int, size) -> list[str]:
    return [*overrides, f"data.synthetic={count}", f"data.synthetic_width={size[0]}",
            f"data.synthetic_height={size[1]}"]


def moco_workload(arch: str, per_gpu: int, size, count: int, device, shards=None,
                  world: int = 1):
    from dataclasses import replace

    import torch.nn.functional as F

    from muscle_hpc import config
    from muscle_hpc.data.loaders import TwoViewLoader, two_view_loader
    from muscle_hpc.ds_engine import deepspeed_config, deepspeed_engine
    from muscle_hpc.models.build import build_moco
    from muscle_hpc.models.moco import splits_per_rank

    cfg = config.load(ROOT / registry.default_config("mdmoco", SHORT[arch]),
                      _synthetic([f"data.batch_size={per_gpu}"], count, size), config.MocoConfig)
    m = cfg.model
    torch.manual_seed(0)
    # One GPU of ``world``: its share of the config's shuffle-BN groups.
    moco = build_moco(replace(m, bn_groups=splits_per_rank(m.bn_groups, world))).to(device)
    engine = deepspeed_engine(moco, list(moco.trainable_parameters()),
                              deepspeed_config(cfg.run, per_gpu, 1, device.type == "cuda"),
                              momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)

    def step(batch):
        im_q, im_k = to_device(batch, device)
        logits, labels = engine(im_q, im_k)
        engine.backward(F.cross_entropy(logits.float(), labels))
        engine.step()

    if shards is not None:
        loader = TwoViewLoader(shards, per_gpu, mean=cfg.data.mean, std=cfg.data.std,
                               num_workers=max(1, min(8, (os.cpu_count() or 2) - 1)),
                               device=device)
    else:
        loader = two_view_loader(None, per_gpu, cfg.data, distributed=False, device=device)
    return Workload(f"mdmoco {arch}", step, loader, per_gpu, moco)


def task_workload(stage: str, task_name: str, arch: str, per_gpu: int, size, count: int,
                  device):
    """The continual stage's step (with L2-SP) or the fine-tune stage's on one task."""
    from muscle_hpc import config
    from muscle_hpc.data.loaders import task_loader
    from muscle_hpc.ds_engine import base_optimizer, deepspeed_config, deepspeed_engine
    from muscle_hpc.models.build import build_multitask
    from muscle_hpc.regularizers import L2SP
    from muscle_hpc.tasks import PAPER_TASKS

    task = PAPER_TASKS[task_name]
    if stage == "continual":
        cfg = config.load(ROOT / registry.default_config("continual", SHORT[arch]),
                          _synthetic([f"tasks.{task_name}.batch_size={per_gpu}", "model.init=''"],
                                     count, size), config.ContinualConfig)
    else:
        cfg = config.load(ROOT / registry.default_config("finetune", SHORT[arch]),
                          _synthetic([f"tasks.{task_name}.batch_size={per_gpu}"], count, size),
                          config.FinetuneConfig)
    torch.manual_seed(0)
    net = build_multitask(arch, {task_name: task}, cfg.model).to(device)
    groups = [{"params": list(net.backbone.parameters()), "role": "backbone"},
              {"params": list(net.heads.parameters()), "role": task_name}]
    engine = deepspeed_engine(net, groups,
                              deepspeed_config(cfg.run, per_gpu, 1, device.type == "cuda"),
                              momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    for g in engine.optimizer.param_groups:
        g["lr"] = 1e-3
    if stage == "continual":
        l2sp = L2SP(base_optimizer(engine), cfg.cl.l2sp_alpha, cfg.cl.l2sp_weight)
        engine.optimizer.param_groups[0]["weight_decay"] = l2sp.weight_decay
        l2sp.set_anchor()

    def step(batch):
        batch = to_device(batch, device)
        loss = engine(task_name, batch["image"], task.targets(batch, device))
        engine.backward(loss)
        engine.step()

    loader = task_loader(None, per_gpu, task, cfg.data, train=True, distributed=False,
                         device=device)
    return Workload(f"{stage} {task_name} {arch}", step, loader, per_gpu, net)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(step, batch) -> float | None:
    """FLOPs of one step (forward and backward) as torch's flop counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            step(batch)
    except Exception:  # noqa: BLE001 - an op the counter cannot follow: no FLOP figure
        return None
    return float(counter.get_total_flops())


def measure(w: Workload, device, steps: int, warmup: int) -> dict:
    """Steps/s of ``w`` on one resident batch and fed by its loader, with the loader's wait."""
    from muscle_hpc.engine import StepTimer

    batches = w.loader.epoch_batches(0)
    resident = to_device(next(batches), device)
    batches.close()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        w.step(resident)
    flops = count_flops(w.step, resident)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        w.step(resident)
    synchronize(device)
    seconds = (time.perf_counter() - t0) / steps
    timer = StepTimer()
    done = 0
    batches = timer.timed(w.loader.epoch_batches(1))
    try:
        for batch in batches:
            w.step(batch)
            done += 1
            if done == warmup:
                synchronize(device)
                timer.window()
            if done == warmup + steps:
                break
    finally:
        batches.close()
    synchronize(device)
    fed, wait, _ = timer.window(w.images)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"resident": w.images / seconds, "fed": fed, "wait": wait, "peak": peak,
            "tflops": flops / seconds / 1e12 if flops else None}


def bf16_peak(device, override: float | None) -> float | None:
    if override or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def tiny_shards(folder: Path, n: int, size) -> list | None:
    """A pre-training shard of ``n`` X-ray-like images, or None where FFCV does not import."""
    from data_prep.shard import import_ffcv

    try:
        import_ffcv()
    except ImportError:
        return None
    from bench.loader import convert_to_shard, make_images
    from muscle_hpc.data import pretrain_shards

    make_images(folder / "png", n, size)
    convert_to_shard(folder / "png", folder / "shards", size, workers=2)
    return pretrain_shards(folder / "shards", ["bench"])


def given_shards(root: Path) -> list:
    from muscle_hpc.data import pretrain_shards

    names = sorted(p.parent.name for p in root.glob("*/manifest.json"))
    return pretrain_shards(root, names)


def timing(args) -> int:
    from muscle_hpc import dist
    from muscle_hpc.config import ContinualConfig, FinetuneConfig, MocoConfig, load
    from muscle_hpc.engine import select_kernels

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    select_kernels(args.deterministic)
    dist.init_distributed(dist.dist_env())
    device = dist.train_device()
    cuda = device.type == "cuda"
    size = args.size or ((800, 500) if cuda else (160, 100))
    cap = None if cuda else 4  # a CPU step of a GPU's batch takes minutes

    def per_gpu(global_batch: int) -> int:
        b = max(1, global_batch // args.world)
        return min(b, cap) if cap else b

    moco_batch = load(ROOT / registry.default_config("mdmoco", "r50"), [],
                      MocoConfig).data.batch_size
    cl = load(ROOT / registry.default_config("continual", "r50"), [], ContinualConfig)
    ft = load(ROOT / registry.default_config("finetune", "r50"), [], FinetuneConfig)

    def count(batch: int) -> int:  # images for the resident pass (one batch) and the fed one
        return batch * (args.steps + args.warmup + 1)

    archs = args.arch or (list(registry.ARCHS) if cuda else ["resnet18"])
    task_arch = archs[-1]
    plans = [lambda a=a: moco_workload(a, per_gpu(moco_batch), size, count(per_gpu(moco_batch)),
                                       device, world=args.world) for a in archs]
    for t in ("pneumonia", "lung", "tbx"):
        b = per_gpu(cl.batch_size(t))
        plans.append(lambda t=t, b=b: task_workload("continual", t, task_arch, b, size, count(b),
                                                    device))
    b = per_gpu(ft.task("pneumonia").batch_size)
    plans.append(lambda b=b: task_workload("finetune", "pneumonia", task_arch, b, size,
                                           count(b), device))
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    peak = bf16_peak(device, args.peak_tflops)
    print(f"bench.stages: {name}, {'bf16' if cuda else 'fp32'}, "
          f"run.deterministic {'on' if args.deterministic else 'off'}, "
          f"{size[0]}x{size[1]}, per-GPU "
          f"batch = config's global batch / {args.world}" + (f" (at most {cap} on CPU)" if cap
                                                             else "") +
          f", {args.steps} timed steps after {args.warmup}", flush=True)
    print(f"{'step':32s} {'batch':>5s} {'img/s':>8s} {'fed':>8s} {'wait':>5s} {'peak mem':>9s} "
          f"{'TFLOP/s':>8s}" + (f" {'of peak':>7s}" if peak else ""), flush=True)
    results = {}
    for plan in plans:
        w = plan()
        r = results[w.name] = measure(w, device, args.steps, args.warmup)
        print(f"{w.name:32s} {w.images:5d} {r['resident']:8.1f} {r['fed']:8.1f} "
              f"{r['wait']:5.0%} {r['peak'] / 2**30:7.2f}Gi "
              + (f"{r['tflops']:8.2f}" if r["tflops"] else f"{'n/a':>8s}")
              + (f" {r['tflops'] / peak:7.1%}" if peak and r["tflops"] else ""), flush=True)
        del w
    real = None
    with tempfile.TemporaryDirectory() as tmp:
        b = per_gpu(moco_batch)
        shards = (given_shards(args.shards) if args.shards
                  else tiny_shards(Path(tmp), count(b), size))
        if shards is None:
            print("real two-view loader: ffcv does not import here; skipped (bench.loader "
                  "measures it on CPU)", flush=True)
        else:
            w = moco_workload(archs[0], b, size, count(b), device, shards=shards,
                              world=args.world)
            real = measure(w, device, args.steps, args.warmup)
            print(f"{'mdmoco ' + archs[0] + ' real shards':32s} {b:5d} {real['resident']:8.1f} "
                  f"{real['fed']:8.1f} {real['wait']:5.0%}", flush=True)
    print("ratios:")
    for n, r in results.items():
        print(f"  {n}: fed / resident {r['fed'] / r['resident']:.3f}")
    if real is not None:
        synthetic = results[f"mdmoco {archs[0]}"]
        print(f"  mdmoco {archs[0]}: real shards / synthetic inputs "
              f"{real['fed'] / synthetic['fed']:.3f}")
    dist.shutdown()
    return 0


# --- smoke ---------------------------------------------------------------------------------

STEP = re.compile(r"\bstep (\d+)/(\d+)")


class Smoke:
    """Launches stage runs and prints one line per check; counts the failed ones."""

    def __init__(self, cuda: bool, gpus: int):
        self.failed = 0
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
                        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        if not cuda:
            self.env["DS_ACCELERATOR"] = "cpu"
        self.env.pop("MUSCLE_DIST_BACKEND", None)
        # Two ranks: NCCL where there are two GPUs; it refuses two ranks on one GPU, so gloo
        # serves both device types there; on CPU the two-backend string, gloo for both.
        self.two_rank_backend = (None if gpus >= 2 else "gloo") if cuda else "cpu:gloo,cuda:gloo"

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.failed += not ok
        print(f"smoke: {'ok  ' if ok else 'FAIL'} {name}" + (f" -- {detail}" if detail else ""),
              flush=True)
        return ok

    def launch(self, stage: str, world: int, args: list[str], stop_at: int = 0):
        """Run ``stage`` alone or on ``world`` > 1 ranks through torchrun; with ``stop_at``,
        SIGTERM it once rank 0 logs that step. Returns (exit status, output, seconds)."""
        env = dict(self.env)
        if world > 1 and self.two_rank_backend:
            env["MUSCLE_DIST_BACKEND"] = self.two_rank_backend
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
        cmd = [sys.executable, *(launcher if world > 1 else []), "-m",
               f"muscle_hpc.stages.{stage}", *args]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            m = STEP.search(line)
            if stop_at and m and int(m.group(1)) >= stop_at:
                proc.send_signal(signal.SIGTERM)
                stop_at = 0
        proc.wait()
        return proc.returncode, "".join(lines), time.perf_counter() - t0

    def run(self, name: str, stage: str, world: int, args: list[str]) -> bool:
        code, out, seconds = self.launch(stage, world, args)
        return self.check(name, code == 0, f"{seconds:.0f}s" if code == 0 else
                          f"exit {code}: {out.strip()[-1500:]}")

    def resume(self, name: str, stage: str, args, run_dir, reference_dir, stop_at: int,
               within: str = "") -> None:
        """Stopped by SIGTERM at ``stop_at``, resumed, and compared with ``reference_dir``'s
        uninterrupted run, on 2 ranks, deterministic kernels. ``within``: where the stage
        puts its checkpoint under the run directory."""
        args = [*args, "run.deterministic=true"]
        ok = self.run(f"{name} 2 ranks", stage, 2, self.dirs(args, reference_dir))
        code, out, _ = self.launch(stage, 2, self.dirs(args, run_dir), stop_at=stop_at)
        stopped = re.search(r"stopped by signal \d+ after step (\d+)", out)
        if not self.check(f"{name} 2 ranks, SIGTERM", code != 0 and bool(stopped),
                          f"checkpoint after step {stopped.group(1)}" if stopped else
                          f"exit {code}, not stopped: {out.strip()[-1500:]}"):
            return
        code, out, _ = self.launch(stage, 2, self.dirs(args, run_dir))
        if not self.check(f"{name} 2 ranks, resumed", code == 0 and "resuming at step" in out,
                          "" if code == 0 else f"exit {code}: {out.strip()[-1500:]}") or not ok:
            return
        diff = compare_checkpoints(Path(run_dir) / within, Path(reference_dir) / within)
        self.check(f"{name} resumed = uninterrupted", diff is None,
                   "bit for bit" if diff is None else diff)

    @staticmethod
    def dirs(args, run_dir):
        """``args`` with their run directory placeholder filled."""
        return [a.replace("{RUN}", str(run_dir)) for a in args]


def compare_checkpoints(a: Path, b: Path) -> str | None:
    """None when the two runs' final weights are equal, else what differs."""
    from muscle_hpc import checkpoint

    ma, mb = (checkpoint.load(d / "checkpoint.pth")["model"] for d in (a, b))
    for key in ma:
        if not torch.equal(ma[key], mb[key]):
            diff = (ma[key].double() - mb[key].double()).abs().max().item()
            return f"{key} differs (max |diff| {diff:.3g})"
    return None


LOAD_ON_CPU = """
import json, sys, torch, torchvision
out = {}
for path, arch in json.loads(sys.argv[1]):
    try:
        state = torch.load(path)  # no map_location: as a user on a CPU-only host
        if arch:
            getattr(torchvision.models, arch)().load_state_dict(state)
        out[path] = "ok"
    except Exception as e:
        out[path] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
print(json.dumps({"cuda": torch.cuda.is_available(), "files": out}))
"""


def smoke(args) -> int:
    import json

    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    arch = (args.arch or ["resnet18"])[0]
    w, h = args.size or ((800, 500) if cuda else (96, 64))
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="muscle-smoke-"))
    folder.mkdir(parents=True, exist_ok=True)
    s = Smoke(cuda, gpus)
    where = f"{gpus} GPU(s), {torch.cuda.get_device_name(0)}" if cuda else "CPU"
    print(f"bench.stages --smoke: {where}, {arch}, {w}x{h}, random images (data.synthetic), "
          f"2 ranks on {s.two_rank_backend or 'cpu:gloo,cuda:nccl'}; in {folder}", flush=True)
    t0 = time.perf_counter()
    # the smoke also runs where there is no GPU (CI)
    size = [f"data.synthetic_width={w}", f"data.synthetic_height={h}", "run.allow_cpu=true"]

    def moco(world):
        return ["--config", str(ROOT / registry.default_config("mdmoco", SHORT[arch])),
                f"model.arch={arch}",
                f"data.synthetic={16 * world}", *size, f"data.batch_size={4 * world}",
                f"model.K={32 * world}", "model.bn_groups=2", "optim.epochs=2",
                "run.log_every_steps=1",
                "run.checkpoint_every_steps=3", "run.image_grid_every_steps=0",
                "run.dir={RUN}"]

    def continual(world, init):
        return ["--config", str(ROOT / registry.default_config("continual", SHORT[arch])),
                f"model.arch={arch}", f"model.init={init}", f"data.synthetic={4 * world}",
                *size, *(f"tasks.{t}.batch_size={2 * world}" for t in registry.TASK_NAMES),
                "model.rois_per_image=64", "model.test_proposals=100", "cl.rounds=1",
                "run.log_every_steps=1", "run.checkpoint_every_steps=3", "run.dir={RUN}"]

    def finetune(world, init):
        return ["--task", "lung", "--init", "mdmoco", "--backbone", SHORT[arch],
                f"pretrained.mdmoco={init}", f"data.synthetic={4 * world}", *size,
                f"tasks.lung.batch_size={2 * world}", "tasks.lung.epochs=3", "eval.bootstrap=10",
                "run.log_every_steps=1", "run.checkpoint_every_steps=2", "run.root={RUN}"]

    moco1 = folder / "mdmoco-1"
    export = registry.exported_backbone(moco1)
    s.run("mdmoco 1 rank", "mdmoco", 1, Smoke.dirs(moco(1), moco1))
    s.resume("mdmoco", "mdmoco", moco(2), folder / "mdmoco-2", folder / "mdmoco-2-ref", 3)
    cl1 = folder / "continual-1"
    s.run("continual muscle-- 1 rank", "continual", 1,
          Smoke.dirs([*continual(1, export), "cl.method=muscle--"], cl1))
    # MUSCLE on 2 ranks, its anchor restored on resume; every task is validated after every
    # visit on 1 rank already.
    s.resume("continual", "continual", [*continual(2, export), "run.validate=false"],
             folder / "continual-2", folder / "continual-2-ref", 3)
    ft1 = folder / "finetune-1"
    s.run("finetune lung 1 rank", "finetune", 1, Smoke.dirs(finetune(1, export), ft1))
    within = registry.FinetuneRun("lung", "mdmoco", SHORT[arch]).dir("")  # under a run root
    s.resume("finetune lung", "finetune", finetune(2, export), folder / "finetune-2",
             folder / "finetune-2-ref", 3, within=str(within))
    files = [(str(export), arch), (str(registry.exported_backbone(cl1)), arch),
             (str(ft1 / within / "best.pth"), "")]
    env = dict(s.env, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", LOAD_ON_CPU, json.dumps(files)], env=env,
                         capture_output=True, text=True, cwd=ROOT)
    try:
        loaded = json.loads(out.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        loaded = {"cuda": None, "files": {}}
        s.check("exports load on a CPU-only host", False, out.stderr.strip()[-800:])
    for path, result in loaded["files"].items():
        s.check(f"torch.load on CPU: {Path(path).parent.name}/{Path(path).name}",
                result == "ok" and loaded["cuda"] is False, "" if result == "ok" else result)
    print(f"bench.stages --smoke: {s.failed} check(s) failed, {time.perf_counter() - t0:.0f}s",
          flush=True)
    if not args.dir and not s.failed:
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if s.failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="every stage end to end instead")
    p.add_argument("--world", type=int, default=8,
                   help="GPUs the configs' global batches are split over (default 8, a node)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per step kind")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--size", type=parse_size, help="W x H (default 800x500 on GPU; small on CPU)")
    p.add_argument("--arch", action="append", choices=tuple(SHORT),
                   help="MD-MoCo trunk(s) to time (repeatable), the smoke's trunk")
    p.add_argument("--shards", type=Path, help="converted pre-training shards for the real "
                                               "loader (default: tiny ones built here)")
    p.add_argument("--deterministic", action="store_true",
                   help="time with run.deterministic's kernels (its cost: compare with without)")
    p.add_argument("--peak-tflops", type=float, help="the device's bf16 peak, if not known")
    p.add_argument("--dir", help="smoke: keep the runs in this folder")
    args = p.parse_args(argv)
    return smoke(args) if args.smoke else timing(args)


if __name__ == "__main__":
    sys.exit(main())
