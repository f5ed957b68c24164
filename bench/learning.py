"""Does pre-training help? The paper's comparison (Tables 2-3) at CPU scale, through the real
stages, for each MD-MoCo view recipe side by side.

    python -m bench.learning [--work DIR] [--views paper,mocov2] [--seeds 3]
                             [--fractions 0.1,0.05] [--protocols finetune,linear]
                             [--size 128x80] [--moco-epochs 4] [--mdmoco KEY=VALUE ...] [--quick]
                             [--resume]

Makes the demo data (``data_prep.synth --scale small``) in the real download layouts, converts
it at ``--size``, and runs the stages users run, through their own entry points. For each view
recipe of ``--views`` (``data.views``): MD-MoCo on all nine training sets, then the continual
stage as MUSCLE and as MUSCLE-- from that MD-MoCo backbone (each task visited for whole epochs,
every task validated after every visit). Then the fine-tune stage for every task x init x seed x
training fraction x protocol: Scratch, and each recipe's MD-MoCo, MUSCLE-- and MUSCLE (not
ImageNet: the question is what pre-training on X-rays adds to a label-scarce task). A fraction
below 1 trains on that share of each task's training split (the stage's ``--fraction``; the same
patients for every init of a seed), the label-scarce setting where pre-training shows
(MoCo-CXR). ``linear`` is the stage's linear probe (the backbone frozen with its batch-norm
statistics); its Scratch row is a Kaiming net whose statistics are 0/1 (identity batch norm,
unnormalised features), so the probe also gets a **Scratch-BN** row: the same Kaiming weights
(the same seed) with batch-norm statistics estimated on the task's training images (precise BN:
a cumulative average over one pass in training mode), which compares representations rather than
batch-norm initialisation.

The scale: a ResNet-18 pre-trained for ``--moco-epochs`` epochs of a few thousand images is a
short run, so MD-MoCo uses the settings MoCo's own short CIFAR-10 demo uses where the paper's
assume 200 epochs: key-encoder momentum ``--moco-m`` 0.99 (at 0.999, after ~400 steps two
thirds of the key encoder would still be its Kaiming start) and the shuffle-BN groups of the
config (8; MoCo's demo: 8). Everything else is ``mdmoco_demo.yaml``'s (the paper's T, lr per
256, cosine) at ``--moco-batch``. The header prints every setting; ``--mdmoco KEY=VALUE``
(repeatable) changes one for every recipe.

Prints, per recipe, protocol and fraction, the headline test metric (AUC, Dice, mAP) of each
task as mean and standard deviation over seeds for every init; a line per comparison saying
whether the first is better *beyond the seed spread* (mean - sd above the other's mean + sd);
the MD-MoCo monitors of each recipe (kNN AUC from the Kaiming start to the end, collapse, MoCo's
top-1, its top-1 among the step's own keys, and the histograms' top-1 on the same task: the
shortcut monitor) and the continual stage's per-visit validation; and the verdict on the goal:
with the recommended recipe (``RECOMMENDED``), whole-network fine-tuning on 10 % of the labels,
MD-MoCo and MUSCLE beat Scratch beyond the spread on at least 3 of the 4 tasks and MUSCLE >=
MUSCLE-- on the mean over tasks. Also ``learning.json`` and ``learning.png`` in ``--work``.
``--quick``: the tiny data and a few steps of each stage, to test the benchmark itself (its
numbers mean nothing). Fine-tunes run two at a time, one thread each.

The full default takes hours on a CPU machine, longer than many sessions and jobs are allowed:
``--resume`` goes on with an interrupted benchmark in ``--work`` (the same options, else a
one-line error): each stage resumes from its run directory's checkpoint (the stages' own exact
resume), a fine-tune that wrote its results is not run again, and the wall times printed are
this invocation's.

Why one module over ~450 lines: a benchmark is one command, read top to bottom as the
experiment it runs (plan, stages, fine-tunes, verdict).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from muscle_hpc import registry
from muscle_hpc import results as results_json
from muscle_hpc.checkpoint import save_json

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BACKBONE = "r18"  # the demo configs' model.arch, resnet18
ARCH = "resnet18"
PRETRAINED = ("mdmoco", "muscle--", "muscle")  # the inits each view recipe makes
# The view recipe the project recommends for X-rays (README, fidelity): the goal is judged on it.
RECOMMENDED = "mocov2"
GOAL_FRACTION, GOAL_PROTOCOL = 0.1, "finetune"
COMPARISONS = (("mdmoco", "scratch"), ("muscle", "muscle--"), ("muscle", "scratch"))
# Fine-tune batch and epochs per task (the demo config's learning rates); label-scarce runs see
# few images, so epochs are many and cheap.
FT_BATCH = {"pneumonia": 8, "mura": 8, "lung": 4, "tbx": 4}
PROTOCOLS = ("finetune", "linear")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.learning",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "bench_learning",
                   help="data, runs and results (default: bench_learning/)")
    p.add_argument("--views", default=f"paper,{RECOMMENDED}",
                   help="comma-separated MD-MoCo view recipes (data.views), side by side")
    p.add_argument("--seeds", type=int, default=3, help="fine-tune seeds per init")
    p.add_argument("--fractions", default="0.1,0.05",
                   help="comma-separated training fractions for the fine-tunes")
    p.add_argument("--protocols", default=",".join(PROTOCOLS),
                   help="comma-separated: finetune (whole network), linear (probe)")
    p.add_argument("--size", default=None,
                   help="image size WxH of the shards (default 128x80; 64x40 with --quick)")
    p.add_argument("--tasks", default=",".join(registry.TASK_NAMES),
                   help="comma-separated tasks to fine-tune")
    p.add_argument("--moco-epochs", type=int, default=4)
    p.add_argument("--moco-batch", type=int, default=32)
    p.add_argument("--moco-m", type=float, default=0.99,
                   help="key-encoder momentum at this scale (MoCo's CIFAR-10 demo; paper 0.999)")
    p.add_argument("--cl-rounds", type=int, default=2)
    p.add_argument("--ft-epochs", type=int, default=15)
    p.add_argument("--mdmoco", action="append", default=[], metavar="KEY=VALUE",
                   help="an MD-MoCo config override for every recipe (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny data, few steps: tests")
    p.add_argument("--resume", action="store_true",
                   help="go on with the interrupted benchmark in --work (same options): stages "
                        "resume from their checkpoints, finished fine-tunes are kept")
    args = p.parse_args(argv)
    try:
        args.fractions = [float(f) for f in args.fractions.split(",")]
        args.size = args.size or ("64x40" if args.quick else "128x80")
        w, _, h = args.size.lower().partition("x")
        args.size = (int(w), int(h))
    except ValueError:
        p.error(f"--fractions {args.fractions!r} / --size {args.size!r}: numbers expected")
    if not all(0 < f <= 1 for f in args.fractions):
        p.error("--fractions: each in (0, 1]")
    if args.seeds < 1:
        p.error("--seeds: at least 1")
    args.tasks = args.tasks.split(",")
    if not args.tasks or set(args.tasks) - set(registry.TASK_NAMES):
        p.error(f"--tasks: some of {', '.join(registry.TASK_NAMES)}")
    args.protocols = args.protocols.split(",")
    if not args.protocols or set(args.protocols) - set(PROTOCOLS):
        p.error(f"--protocols: some of {', '.join(PROTOCOLS)}")
    from muscle_hpc.data.augment import RECIPES

    args.views = args.views.split(",")
    if not args.views or set(args.views) - set(RECIPES) or \
            len(set(args.views)) < len(args.views):
        p.error(f"--views: some of {', '.join(RECIPES)}, each once")
    return args


def run(cmd: list[str], log: Path, threads: int | None = None,
        diverged: Path | None = None) -> None:
    """``python -m <cmd>`` with its output appended to ``log`` (a resumed stage keeps what it
    logged before the interruption); a failure ends the benchmark with the log's last lines
    (never a silent gap in the tables). With ``diverged``: a run the stage stopped on a
    non-finite loss (``NONFINITE_EXIT``, its last line saying so) is an outcome, not a failure:
    that line goes to ``diverged`` and the benchmark goes on (its cell reads nan, and the
    report lists it)."""
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        code = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=env, stdout=f,
                              stderr=subprocess.STDOUT).returncode
    if code:
        from muscle_hpc.engine import NONFINITE_EXIT

        tail = log.read_text().splitlines()[-5:]
        if diverged is not None and code == NONFINITE_EXIT and tail and \
                ": error: non-finite" in tail[-1]:
            diverged.parent.mkdir(parents=True, exist_ok=True)
            diverged.write_text(json.dumps({"stopped": tail[-1]}))
            return
        raise SystemExit(f"bench.learning: {' '.join(cmd[:2])} failed (exit {code}), "
                         f"see {log}:\n" + "\n".join(tail))


class Plan:
    """Every stage's command line for one benchmark setting. A fine-tune row ("init" of the
    tables) is ``scratch``, ``scratch-bn`` (linear probe only) or one of ``PRETRAINED`` made
    under a view recipe."""

    def __init__(self, args):
        self.args, self.work = args, args.work.resolve()
        self.shards, self.runs = self.work / "shards", self.work / "runs"
        self.ft_epochs = 1 if args.quick else args.ft_epochs
        self.moco_batch = 8 if args.quick else args.moco_batch

    def settings(self) -> dict:
        """The options that make this benchmark what it is (all but where and whether to
        resume), as JSON values: a resumed run must have the same."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.args).items()
                if k not in ("work", "resume")}

    def settings_file(self) -> Path:
        return self.runs / "settings.json"

    def recipe_root(self, views: str) -> Path:
        return self.runs / views

    def moco(self, views: str) -> Path:
        return registry.mdmoco_dir(self.recipe_root(views), BACKBONE)

    def continual(self, views: str, method: str) -> Path:
        return registry.continual_dir(self.recipe_root(views), BACKBONE, method)

    def data(self) -> list[list[str]]:
        w, h = self.args.size
        scale = "tiny" if self.args.quick else "small"
        return [["data_prep.synth", "--out", str(self.work / "downloads"), "--scale", scale,
                 "--workers", "2"],
                ["data_prep.convert", "--dataset", "all", "--root", str(self.work / "downloads"),
                 "--out", str(self.shards), "--size", f"{w}x{h}", "--workers", "2"]]

    def moco_settings(self) -> list[str]:
        """The MD-MoCo overrides of this scale, the same for every recipe."""
        a, b = self.args, self.moco_batch
        return [f"data.batch_size={b}", f"model.K={b * (4 if a.quick else 32)}",
                f"model.m={a.moco_m}", *(["model.bn_groups=4"] if a.quick else []),
                f"optim.epochs={1 if a.quick else a.moco_epochs}", *a.mdmoco]

    def mdmoco(self, views: str) -> list[str]:
        q = self.args.quick
        return ["muscle_hpc.stages.mdmoco", "--config", str(CONFIGS / "mdmoco_demo.yaml"),
                f"data.root={self.shards}", f"run.dir={self.moco(views)}", f"data.views={views}",
                "data.num_workers=1", f"run.max_steps={2 if q else 0}",
                f"run.log_every_steps={1 if q else 5}",
                "run.checkpoint_every_steps=100000", "run.image_grid_every_steps=0",
                f"run.monitor_every_steps={2 if q else 50}",
                f"run.monitor_max_images={40 if q else 400}", *self.moco_settings()]

    def continual_stage(self, views: str, method: str) -> list[str]:
        q = self.args.quick
        return ["muscle_hpc.stages.continual", "--config", str(CONFIGS / "continual_demo.yaml"),
                f"data.root={self.shards}", f"run.dir={self.continual(views, method)}",
                f"cl.method={method}", f"model.init={registry.exported_backbone(self.moco(views))}",
                f"cl.rounds={1 if q else self.args.cl_rounds}",
                f"run.visit_steps={2 if q else 0}", "run.checkpoint_every_steps=100000",
                "run.log_every_steps=10", "data.num_workers=1",
                # all four tasks pre-train the backbone; --quick visits only those it tests
                *([f"data.tasks=[{','.join(self.args.tasks)}]"] if q else [])]

    def scratch_bn(self, task: str, seed: int) -> Path:
        """The Scratch-BN init of ``task`` and ``seed`` (``write_scratch_bn``)."""
        return self.runs / "scratch_bn" / f"{task}_s{seed}.pth"

    def init_file(self, row: str, views: str | None, task: str, seed: int) -> Path | None:
        if row == "scratch":
            return None
        if row == "scratch-bn":
            return self.scratch_bn(task, seed)
        if row == "mdmoco":
            return registry.exported_backbone(self.moco(views))
        return registry.exported_backbone(self.continual(views, row))

    def ft_root(self, row: str, views: str | None, seed: int, fraction: float) -> Path:
        """One run root per row, recipe, fraction and seed: the rows that start from a file all
        run as the stage's ``mdmoco`` init, so they need roots of their own."""
        return self.runs / "finetune" / (f"{row}_{views}" if views else row) / \
            f"f{fraction:g}_s{seed}"

    def finetune(self, task: str, row: str, views: str | None, seed: int, fraction: float,
                 protocol: str) -> list[str]:
        """The fine-tune of one row. A row with a file (``init_file``) runs as the stage's
        ``mdmoco`` init reading that file: the stage builds any torchvision ResNet file the
        same way, and each row has a run root of its own."""
        e, init = self.ft_epochs, self.init_file(row, views, task, seed)
        return ["muscle_hpc.stages.finetune", "--task", task,
                "--init", "scratch" if init is None else "mdmoco",
                "--backbone", BACKBONE, "--fraction", f"{fraction:g}", "--protocol", protocol,
                "--config", str(CONFIGS / "finetune_demo.yaml"),
                f"data.root={self.shards}", f"run.root={self.ft_root(row, views, seed, fraction)}",
                *([f"pretrained.mdmoco={init}"] if init is not None else []),
                f"tasks.{task}.epochs={e}", f"tasks.{task}.lr_step_epochs={max(1, e * 2 // 3)}",
                f"tasks.{task}.batch_size={FT_BATCH[task]}", "run.max_steps_per_epoch=0",
                f"run.seed={seed}", f"data.seed={seed}",
                "eval.bootstrap=0", "eval.samples=0", "data.num_workers=1",
                "run.checkpoint_every_steps=100000", "run.log_every_steps=50"]

    def diverged(self, *job) -> Path:
        """Where a fine-tune the stage stopped on a non-finite loss says so (beside where its
        results would be)."""
        return self.result(*job).with_name("diverged.json")

    def finished(self, *job) -> bool:
        return self.result(*job).exists() or self.diverged(*job).exists()

    def score(self, *job, metric: str) -> float:
        """The test ``metric`` of a fine-tune; nan for one that diverged (a missing result is
        an error, never a gap)."""
        if self.diverged(*job).exists():
            return math.nan
        path = self.result(*job)
        return results_json.parse(json.loads(path.read_text()), path).test[metric]

    def result(self, task: str, row: str, views: str | None, seed: int, fraction: float,
               protocol: str) -> Path:
        init = "scratch" if row == "scratch" else "mdmoco"
        run = registry.FinetuneRun(task, init, BACKBONE, protocol, fraction)
        return run.dir(self.ft_root(row, views, seed, fraction)) / "results.json"

    def rows(self, protocol: str) -> list[str]:
        return ["scratch", *(["scratch-bn"] if protocol == "linear" else []), *PRETRAINED]

    def jobs(self) -> list[tuple]:
        """Every fine-tune: Scratch rows once, pre-trained rows per recipe."""
        a, out = self.args, []
        for fraction in a.fractions:
            for protocol in a.protocols:
                for seed in range(a.seeds):
                    for task in a.tasks:
                        for row in self.rows(protocol):
                            for views in ([None] if row.startswith("scratch") else a.views):
                                out.append((task, row, views, seed, fraction, protocol))
        return out


def check_resumable(plan: Plan) -> None:
    """Exit with one line unless ``--work`` holds a benchmark begun with the same options."""
    path = plan.settings_file()
    if not path.exists():
        sys.exit(f"bench.learning: --resume: no benchmark begun in {plan.work} (no {path.name})")
    before, now = json.loads(path.read_text()), plan.settings()
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        sys.exit(f"bench.learning: --resume: {plan.work} holds a benchmark begun with other "
                 f"options ({', '.join(f'{k} was {before.get(k)!r}' for k in changed)}); run "
                 f"without --resume to start again")


def write_scratch_bn(plan: Plan, task_name: str, seed: int) -> None:
    """Scratch's Kaiming trunk for ``seed`` (the fine-tune stage seeds ``torch`` with
    ``run.seed`` and builds the trunk first), its batch-norm running statistics estimated on
    ``task_name``'s training split (unflipped, Z-scored as the stage reads it): momentum None
    (a cumulative average) over one pass in training mode, no gradient. Written as a torchvision
    file, so the probe's only difference from Scratch is the statistics."""
    import torch

    from muscle_hpc import config
    from muscle_hpc.checkpoint import save
    from muscle_hpc.data.loaders import task_loader
    from muscle_hpc.data.shards import open_shard
    from muscle_hpc.models.backbone import build_backbone, export_torchvision
    from muscle_hpc.tasks import PAPER_TASKS

    torch.manual_seed(seed)
    trunk = build_backbone(ARCH)
    task = PAPER_TASKS[task_name]
    data = config.load(CONFIGS / "finetune_demo.yaml", [f"data.root={plan.shards}"],
                       config.FinetuneConfig).data
    loader = task_loader(open_shard(plan.shards, task.dataset, "train"), 32, task, data,
                         train=False, distributed=False)
    for m in trunk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    trunk.train()
    with torch.no_grad():
        for batch in loader.epoch_batches(0):
            trunk(batch["image"])
    path = plan.scratch_bn(task_name, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(path, export_torchvision(trunk))


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value). A NaN (an undefined metric, a
    diverged fine-tune) makes both NaN, which no comparison beats or loses to; ``statistics``
    itself cannot take one (its exact sums fail on a float NaN)."""
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` better than ``b`` beyond the seed spread: the mean ± sd intervals do not overlap."""
    return a[0] - a[1] > b[0] + b[1]


def summarise(plan: Plan) -> dict:
    """Per recipe, protocol and fraction: every row's test headline per task over seeds, the
    comparisons (the linear probe's against Scratch-BN too) and whether the goal's rule holds."""
    from muscle_hpc.tasks import PAPER_TASKS

    a, tasks = plan.args, plan.args.tasks
    needed = max(1, round(0.75 * len(tasks)))  # 3 of the paper's 4
    out = {}
    for views in a.views:
        for protocol in a.protocols:
            rows = plan.rows(protocol)
            baselines = ["scratch", *(["scratch-bn"] if protocol == "linear" else [])]
            comparisons = [*COMPARISONS, *(("mdmoco", "scratch-bn"), ("muscle", "scratch-bn"))
                           * (protocol == "linear")]
            for fraction in a.fractions:
                per_task = {}
                for task in tasks:
                    metric = PAPER_TASKS[task].headline
                    scores = {row: [plan.score(
                        task, row, None if row in baselines else views, s, fraction,
                        protocol, metric=metric) for s in range(a.seeds)] for row in rows}
                    stats = {row: spread(v) for row, v in scores.items()}
                    per_task[task] = {"metric": metric, "scores": scores, "mean_sd": stats,
                                      "beats": {f"{x} > {y}": beats(stats[x], stats[y])
                                                for x, y in comparisons}}
                mean_over_tasks = {row: statistics.fmean(per_task[t]["mean_sd"][row][0]
                                                         for t in tasks) for row in rows}
                base = baselines[-1]  # the probe's fair baseline is Scratch-BN
                wins = {x: sum(per_task[t]["beats"][f"{x} > {base}"] for t in tasks)
                        for x in ("mdmoco", "muscle")}
                rule = (wins["mdmoco"] >= needed and wins["muscle"] >= needed
                        and mean_over_tasks["muscle"] >= mean_over_tasks["muscle--"])
                out[f"{views}/{protocol}/{fraction:g}"] = {
                    "views": views, "protocol": protocol, "fraction": fraction,
                    "tasks": per_task, "mean_over_tasks": mean_over_tasks, "baseline": base,
                    "wins_over_baseline": wins, "wins_needed": needed, "rule_holds": rule}
    return out


def goal(plan: Plan, summary: dict) -> tuple[str, bool] | None:
    """The summary key the goal is judged on, and whether it is met; None when this run does
    not include that setting (another recipe, fraction or protocol)."""
    key = f"{RECOMMENDED}/{GOAL_PROTOCOL}/{GOAL_FRACTION:g}"
    return (key, summary[key]["rule_holds"]) if key in summary else None


def monitors(plan: Plan) -> dict:
    """Each recipe's MD-MoCo curves, first, last and best, from its TensorBoard."""
    from muscle_hpc.tblog import read_scalars

    out = {}
    for views in plan.args.views:
        scalars = read_scalars(plan.moco(views) / "tb")
        out[views] = {}
        for tag, values in sorted(scalars.items()):
            if tag.startswith("monitor/knn/") and tag.endswith("/auc") or tag in (
                    "monitor/collapse_std_x_sqrt_dim", "monitor/shortcut_top1",
                    "monitor/top1_in_batch", "train/loss", "train/top1"):
                pick = min if tag == "train/loss" else max  # the loss is best low
                out[views][tag] = {"first": values[0], "last": values[-1],
                                   "best": pick(values, key=lambda sv: sv[1])}
    return out


def header(plan: Plan) -> str:
    a = plan.args
    return (f"bench.learning: ResNet-18 at {a.size[0]}x{a.size[1]}, view recipes "
            f"{', '.join(a.views)} (recommended: {RECOMMENDED}), {a.seeds} seed(s), fractions "
            f"{', '.join(f'{f:g}' for f in a.fractions)}, protocols {', '.join(a.protocols)}; "
            f"MD-MoCo from {CONFIGS.name}/mdmoco_demo.yaml with "
            f"{' '.join(plan.moco_settings())} (m: MoCo's CIFAR-10 demo for short runs; the "
            f"paper's 0.999 is kept in the paper configs), continual {a.cl_rounds} rounds of "
            f"whole-epoch visits, fine-tunes {plan.ft_epochs} epochs")


def report(plan: Plan, summary: dict, mon: dict, seconds: dict) -> str:
    from muscle_hpc.stages.continual import matrix_markdown

    lines = [header(plan)]
    stopped = [(job, json.loads(plan.diverged(*job).read_text())["stopped"])
               for job in plan.jobs() if plan.diverged(*job).exists()]
    if stopped:
        lines.append(f"\n{len(stopped)} fine-tune(s) stopped by the stage on a non-finite loss "
                     f"(a seed's nan makes its cell nan):")
        lines += [f"  {task} {row}{f' [{views}]' if views else ''} seed {seed} "
                  f"{fraction:.0%} {protocol}: {line}"
                  for (task, row, views, seed, fraction, protocol), line in stopped]
    for s in summary.values():
        rows = list(next(iter(s["tasks"].values()))["mean_sd"])
        what = "whole-network fine-tunes" if s["protocol"] == "finetune" else "linear probes"
        lines.append(f"\n[{s['views']}] {what} on {s['fraction']:.0%} of each training split "
                     f"(test metric, mean ± sd over seeds):")
        lines.append("| task | metric | " + " | ".join(rows) + " |")
        lines.append("|" + "---|" * (2 + len(rows)))
        for task, t in s["tasks"].items():
            best = max(rows, key=lambda r: t["mean_sd"][r][0])
            lines.append(f"| {task} | {t['metric']} | " + " | ".join(
                ("**" if r == best else "") + f"{t['mean_sd'][r][0]:.3f} ± {t['mean_sd'][r][1]:.3f}"
                + ("**" if r == best else "") for r in rows) + " |")
        for comparison in next(iter(s["tasks"].values()))["beats"]:
            won = [task for task, t in s["tasks"].items() if t["beats"][comparison]]
            lines.append(f"  {comparison.replace(' > ', ' better than ')} beyond the seed spread "
                         f"on {len(won)} of {len(s['tasks'])} tasks"
                         f"{': ' + ', '.join(won) if won else ''}")
        m = s["mean_over_tasks"]
        lines.append("  mean over tasks: " + ", ".join(f"{r} {m[r]:.3f}" for r in rows))
        lines.append(f"  MD-MoCo and MUSCLE beat {s['baseline']} on >= {s['wins_needed']} tasks "
                     f"and MUSCLE >= MUSCLE-- on the mean: "
                     f"{'yes' if s['rule_holds'] else 'no'}")
    for views, tags in mon.items():
        lines.append(f"\nMD-MoCo monitors [{views}]: first -> last (best: lowest loss, highest "
                     f"others)")
        for tag, v in tags.items():
            lines.append(f"  {tag}: {v['first'][1]:.3f} @ {v['first'][0]} -> {v['last'][1]:.3f} "
                         f"@ {v['last'][0]} (best {v['best'][1]:.3f} @ {v['best'][0]})")
    for views in plan.args.views:
        for method in registry.CL_METHODS:
            matrix = json.loads((plan.continual(views, method) / "validation.json").read_text())
            lines.append(f"\nContinual stage [{views}] ({method}): every task's validation after "
                         f"every visit")
            lines.append(matrix_markdown(matrix,
                                         [t for t in registry.TASK_NAMES if t in matrix[0]]))
    verdict = goal(plan, summary)
    if verdict is None:
        lines.append(f"\nGoal ({RECOMMENDED}, {GOAL_PROTOCOL}, {GOAL_FRACTION:.0%} of the "
                     f"labels): not judged, this run does not include that setting")
    else:
        lines.append(f"\nGoal ({RECOMMENDED} views, whole-network fine-tuning on "
                     f"{GOAL_FRACTION:.0%} of the labels: MD-MoCo and MUSCLE beat Scratch beyond "
                     f"the seed spread on >= 3 of 4 tasks, MUSCLE >= MUSCLE-- on the mean): "
                     f"{'MET' if verdict[1] else 'NOT MET'}")
    lines.append("Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()))
    lines.append("Demo-scale numbers on synthetic data: they test that the method learns, "
                 "they are not the paper's.")
    return "\n".join(lines)


def bar_chart(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(summary)
    cols = min(4, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        tasks = summary[key]["tasks"]
        rows = list(next(iter(tasks.values()))["mean_sd"])
        width = 0.8 / len(rows)
        for k, row in enumerate(rows):
            means = [t["mean_sd"][row][0] for t in tasks.values()]
            sds = [t["mean_sd"][row][1] for t in tasks.values()]
            ax.bar([i + k * width for i in range(len(tasks))], means, width, yerr=sds,
                   capsize=3, label=row)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))])
        ax.set_xticklabels([f"{name}\n{t['metric']}" for name, t in tasks.items()])
        ax.set_ylim(0, 1)
        s = summary[key]
        ax.set_title(f"{s['views']}, {s['protocol']}, {s['fraction']:.0%} of the labels")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}")
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = Plan(args)
    if args.resume:
        check_resumable(plan)
    print(header(plan) + (" (resumed)" if args.resume else ""), flush=True)
    seconds = {}
    start = time.monotonic()
    logs = plan.work / "logs"
    if not args.resume:
        shutil.rmtree(logs, ignore_errors=True)
    marker = plan.shards / f"done_{args.size[0]}x{args.size[1]}_{'tiny' if args.quick else 'small'}"
    if not marker.exists():
        for cmd in plan.data():
            print(f"bench.learning: {cmd[0]}", flush=True)
            run(cmd, logs / f"{cmd[0]}.log")
        marker.touch()
    seconds["data"] = time.monotonic() - start
    for task in args.tasks:  # a fraction too small for a batch must stop us now, not in an hour
        for fraction in args.fractions:
            run([*plan.finetune(task, "scratch", None, 0, fraction, "finetune"), "--check"],
                logs / f"check_{task}_f{fraction:g}.log")
    if not args.resume:
        # Stages resume from what they find: a fresh benchmark must not pick up an earlier one.
        shutil.rmtree(plan.runs, ignore_errors=True)
        plan.runs.mkdir(parents=True)
        save_json(plan.settings_file(), plan.settings())
    for views in args.views:
        t = time.monotonic()
        print(f"bench.learning: MD-MoCo [{views}]", flush=True)
        run(plan.mdmoco(views), logs / f"mdmoco_{views}.log")
        seconds[f"mdmoco {views}"] = time.monotonic() - t
        t = time.monotonic()
        print(f"bench.learning: continual stage [{views}], MUSCLE and MUSCLE-- side by side",
              flush=True)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda m, v=views: run(plan.continual_stage(v, m),
                                                 logs / f"continual_{v}_{m}.log", 1),
                          registry.CL_METHODS))
        seconds[f"continual {views}"] = time.monotonic() - t
    t = time.monotonic()
    if "linear" in args.protocols:
        for task in args.tasks:
            for seed in range(args.seeds):
                if not plan.scratch_bn(task, seed).exists():
                    write_scratch_bn(plan, task, seed)
    jobs = plan.jobs()
    done = [job for job in jobs if plan.finished(*job)] if args.resume else []
    jobs = [job for job in jobs if job not in done]
    print(f"bench.learning: {len(jobs)} fine-tunes, two at a time"
          + (f" ({len(done)} finished before, kept)" if args.resume else ""), flush=True)

    def finetune(job):
        task, row, views, seed, fraction, protocol = job
        run(plan.finetune(*job), logs / f"ft_{task}_{row}_{views}_s{seed}_f{fraction:g}_"
                                        f"{protocol}.log", 1, diverged=plan.diverged(*job))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(finetune, jobs))
    seconds["finetune"] = time.monotonic() - t
    seconds["total"] = time.monotonic() - start
    summary = summarise(plan)
    mon = monitors(plan)
    text = report(plan, summary, mon, seconds)
    print(text, flush=True)
    verdict = goal(plan, summary)
    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "header": header(plan), "summary": summary, "monitors": mon, "seconds": seconds,
               "goal": None if verdict is None else {"setting": verdict[0], "met": verdict[1]}}
    tmp = plan.work / ".learning.json"
    tmp.write_text(json.dumps(results, indent=1, default=float))
    tmp.replace(plan.work / "learning.json")
    bar_chart(summary, plan.work / "learning.png")
    print(f"bench.learning: {plan.work / 'learning.json'}, {plan.work / 'learning.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
