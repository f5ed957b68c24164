"""Does pre-training help? The paper's comparison (Tables 2-3) at CPU scale, through the real
stages.

    python -m bench.learning [--work DIR] [--seeds 3] [--fractions 0.1] [--size 128x80]
                             [--moco-epochs 4] [--mdmoco KEY=VALUE ...] [--quick]

Makes the demo data (``data_prep.synth --scale small``) in the real download layouts, converts
it at ``--size``, and runs the stages users run, through their own entry points: MD-MoCo on
all nine training sets, the continual stage as MUSCLE and as MUSCLE-- from the MD-MoCo backbone
(each task visited for whole epochs, every task validated after every visit), then the
fine-tune stage for every task x init x seed x training fraction: Scratch, MD-MoCo, MUSCLE--,
MUSCLE, and ImageNet when torchvision's weights are in the torch hub cache. A fraction below 1
trains on that share of each task's training split (the stage's ``--fraction``; the same subset
for every init of a seed), the label-scarce setting where pre-training shows (MoCo-CXR).

Prints, per task and fraction, the headline test metric (AUC, Dice, mAP) as mean and standard
deviation over seeds for every init; a line per comparison (MD-MoCo vs Scratch, MUSCLE vs
MUSCLE--, MUSCLE vs Scratch) saying whether the first is better *beyond the seed spread*
(mean - sd above the other's mean + sd); the MD-MoCo monitors (kNN AUC from the Kaiming start to
the end, the collapse signal) and the continual stage's per-visit validation; and whether the
goal is met: MD-MoCo and MUSCLE beat Scratch beyond the spread on at least 3 of the 4 tasks,
and MUSCLE >= MUSCLE-- on the mean over tasks. Also ``learning.json`` and ``learning.png``
(bars with error bars) in ``--work``. MD-MoCo runs the paper's settings (``mdmoco_demo.yaml``
at batch 32, K 1024); ``--mdmoco KEY=VALUE`` (repeatable) changes one for a comparison, e.g.
``--mdmoco data.brightness=0.4 --mdmoco data.contrast=0.4`` (MoCo v2's jitter). ``--quick``:
the tiny data and a few steps of each stage, to test the benchmark itself (its numbers mean
nothing). Fine-tunes run two at a time, one thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from muscle_hpc import registry

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TASKS = registry.TASK_NAMES
INITS = registry.INIT_NAMES
BACKBONE = "r18"  # the demo configs' model.arch, resnet18
COMPARISONS = (("mdmoco", "scratch"), ("muscle", "muscle--"), ("muscle", "scratch"))
# Fine-tune batch and epochs per task (the demo config's learning rates); label-scarce runs see
# few images, so epochs are many and cheap.
FT_BATCH = {"pneumonia": 8, "mura": 8, "lung": 4, "tbx": 4}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.learning",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "bench_learning",
                   help="data, runs and results (default: bench_learning/)")
    p.add_argument("--seeds", type=int, default=3, help="fine-tune seeds per init")
    p.add_argument("--fractions", default="0.1",
                   help="comma-separated training fractions for the fine-tunes")
    p.add_argument("--size", default=None,
                   help="image size WxH of the shards (default 128x80; 64x40 with --quick)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks to fine-tune")
    p.add_argument("--moco-epochs", type=int, default=4)
    p.add_argument("--moco-batch", type=int, default=32)
    p.add_argument("--cl-rounds", type=int, default=2)
    p.add_argument("--ft-epochs", type=int, default=15)
    p.add_argument("--mdmoco", action="append", default=[], metavar="KEY=VALUE",
                   help="an MD-MoCo config override (repeatable); default: the paper's settings")
    p.add_argument("--quick", action="store_true", help="tiny data, few steps: tests")
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
    if not args.tasks or set(args.tasks) - set(TASKS):
        p.error(f"--tasks: some of {', '.join(TASKS)}")
    return args


def run(cmd: list[str], log: Path, threads: int | None = None) -> None:
    """``python -m <cmd>`` with its output in ``log``; a failure ends the benchmark with the
    log's last lines (never a silent gap in the tables)."""
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=env, stdout=f,
                              stderr=subprocess.STDOUT).returncode
    if code:
        tail = log.read_text().splitlines()[-5:]
        raise SystemExit(f"bench.learning: {' '.join(cmd[:2])} failed (exit {code}), "
                         f"see {log}:\n" + "\n".join(tail))


class Plan:
    """Every stage's command line for one benchmark setting."""

    def __init__(self, args):
        self.args, self.work = args, args.work.resolve()
        self.shards, self.runs = self.work / "shards", self.work / "runs"
        q = args.quick
        self.moco = registry.mdmoco_dir(self.runs, BACKBONE)
        self.continual = {m: registry.continual_dir(self.runs, BACKBONE, m)
                          for m in registry.CL_METHODS}
        self.ft_epochs = 1 if q else args.ft_epochs

    def data(self) -> list[list[str]]:
        w, h = self.args.size
        scale = "tiny" if self.args.quick else "small"
        return [["data_prep.synth", "--out", str(self.work / "downloads"), "--scale", scale,
                 "--workers", "2"],
                ["data_prep.convert", "--dataset", "all", "--root", str(self.work / "downloads"),
                 "--out", str(self.shards), "--size", f"{w}x{h}", "--workers", "2"]]

    def mdmoco(self) -> list[str]:
        a = self.args
        batch = 8 if a.quick else a.moco_batch
        return ["muscle_hpc.stages.mdmoco", "--config", str(CONFIGS / "mdmoco_demo.yaml"),
                f"data.root={self.shards}", f"run.dir={self.moco}", f"data.batch_size={batch}",
                f"model.K={batch * (4 if a.quick else 32)}", "data.num_workers=1",
                f"optim.epochs={1 if a.quick else a.moco_epochs}",
                f"run.max_steps={2 if a.quick else 0}", "run.log_every_steps=5",
                "run.checkpoint_every_steps=100000", "run.image_grid_every_steps=0",
                f"run.monitor_every_steps={2 if a.quick else 50}",
                f"run.monitor_max_images={40 if a.quick else 400}", *a.mdmoco]

    def continual_stage(self, method: str) -> list[str]:
        q = self.args.quick
        return ["muscle_hpc.stages.continual", "--config", str(CONFIGS / "continual_demo.yaml"),
                f"data.root={self.shards}", f"run.dir={self.continual[method]}",
                f"cl.method={method}", f"model.init={registry.exported_backbone(self.moco)}",
                f"cl.rounds={1 if q else self.args.cl_rounds}",
                f"run.visit_steps={2 if q else 0}", "run.checkpoint_every_steps=100000",
                "run.log_every_steps=10", "data.num_workers=1",
                # all four tasks pre-train the backbone; --quick visits only those it tests
                *([f"data.tasks=[{','.join(self.args.tasks)}]"] if q else [])]

    def finetune(self, task: str, init: str, seed: int, fraction: float) -> list[str]:
        e = self.ft_epochs
        return ["muscle_hpc.stages.finetune", "--task", task, "--init", init,
                "--backbone", BACKBONE, "--fraction", f"{fraction:g}",
                "--config", str(CONFIGS / "finetune_demo.yaml"),
                f"data.root={self.shards}", f"run.root={self.ft_root(seed, fraction)}",
                *(f"pretrained.{registry.INITS[i].pretrained_key}="
                  f"{registry.exported_backbone(d)}"
                  for i, d in (("mdmoco", self.moco), *self.continual.items())),
                f"tasks.{task}.epochs={e}", f"tasks.{task}.lr_step_epochs={max(1, e * 2 // 3)}",
                f"tasks.{task}.batch_size={FT_BATCH[task]}", "run.max_steps_per_epoch=0",
                f"run.seed={seed}", f"data.seed={seed}",
                "eval.bootstrap=0", "eval.samples=0", "data.num_workers=1",
                "run.checkpoint_every_steps=100000", "run.log_every_steps=50"]

    def ft_root(self, seed: int, fraction: float) -> Path:
        return self.runs / f"finetune_f{fraction:g}_s{seed}"

    def result(self, task: str, init: str, seed: int, fraction: float) -> Path:
        return registry.finetune_dir(self.ft_root(seed, fraction), task, BACKBONE, init,
                                     fraction=fraction) / "results.json"


def imagenet_present(plan: Plan) -> bool:
    """Whether the fine-tune stage finds torchvision's ImageNet ResNet-18 (never downloaded)."""
    cmd = [sys.executable, "-m", *plan.finetune("pneumonia", "imagenet", 0, 1.0), "--check"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True,
                          env=dict(os.environ, DS_ACCELERATOR="cpu")).returncode == 0


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaNs (an undefined metric) kept."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` better than ``b`` beyond the seed spread: the mean ± sd intervals do not overlap."""
    return a[0] - a[1] > b[0] + b[1]


def summarise(plan: Plan, inits: list[str]) -> dict:
    """Per fraction and task, every init's test headline over seeds, and the comparisons."""
    from muscle_hpc.tasks import TASKS as TASK_DEFS

    tasks = plan.args.tasks
    needed = max(1, round(0.75 * len(tasks)))  # 3 of the paper's 4
    out = {}
    for fraction in plan.args.fractions:
        per_task = {}
        for task in tasks:
            metric = TASK_DEFS[task].headline
            scores = {init: [json.loads(plan.result(task, init, s, fraction).read_text())
                             ["test"][metric] for s in range(plan.args.seeds)] for init in inits}
            stats = {init: spread(v) for init, v in scores.items()}
            per_task[task] = {"metric": metric, "scores": scores,
                              "mean_sd": stats,
                              "beats": {f"{a} > {b}": beats(stats[a], stats[b])
                                        for a, b in COMPARISONS}}
        mean_over_tasks = {init: statistics.fmean(per_task[t]["mean_sd"][init][0] for t in tasks)
                           for init in inits}
        wins = {a: sum(per_task[t]["beats"][f"{a} > scratch"] for t in tasks)
                for a in ("mdmoco", "muscle")}
        goal = (wins["mdmoco"] >= needed and wins["muscle"] >= needed
                and mean_over_tasks["muscle"] >= mean_over_tasks["muscle--"])
        out[f"{fraction:g}"] = {"tasks": per_task, "mean_over_tasks": mean_over_tasks,
                                "wins_over_scratch": wins, "wins_needed": needed,
                                "goal_met": goal}
    return out


def monitors(plan: Plan) -> dict:
    """The MD-MoCo run's kNN AUC curve ends and its collapse signal, from its TensorBoard."""
    from muscle_hpc.tblog import read_scalars

    scalars = read_scalars(plan.moco / "tb")
    out = {}
    for tag, values in sorted(scalars.items()):
        if tag.startswith("monitor/knn/") and tag.endswith("/auc") or \
                tag in ("monitor/collapse_std_x_sqrt_dim", "train/loss", "train/top1"):
            pick = min if tag == "train/loss" else max  # the loss is best low
            out[tag] = {"first": values[0], "last": values[-1],
                        "best": pick(values, key=lambda sv: sv[1])}
    return out


def report(plan: Plan, summary: dict, mon: dict, inits: list[str], seconds: dict) -> str:
    from muscle_hpc.stages.continual import matrix_markdown

    changed = " ".join(plan.args.mdmoco) or "none (the paper's settings)"
    lines = [f"bench.learning: ResNet-18 at {plan.args.size[0]}x{plan.args.size[1]}, "
             f"{plan.args.seeds} seed(s), MD-MoCo overrides: {changed}"]
    for fraction, s in summary.items():
        lines.append(f"\nFine-tunes on {float(fraction):.0%} of each training split "
                     f"(test metric, mean ± sd over seeds):")
        lines.append("| task | metric | " + " | ".join(inits) + " |")
        lines.append("|" + "---|" * (2 + len(inits)))
        for task, t in s["tasks"].items():
            best = max(inits, key=lambda i: t["mean_sd"][i][0])
            lines.append(f"| {task} | {t['metric']} | " + " | ".join(
                ("**" if i == best else "") + f"{t['mean_sd'][i][0]:.3f} ± {t['mean_sd'][i][1]:.3f}"
                + ("**" if i == best else "") for i in inits) + " |")
        for a, b in COMPARISONS:
            won = [task for task, t in s["tasks"].items() if t["beats"][f"{a} > {b}"]]
            lines.append(f"  {a} better than {b} beyond the seed spread on {len(won)} of "
                         f"{len(s['tasks'])} tasks{': ' + ', '.join(won) if won else ''}")
        m = s["mean_over_tasks"]
        lines.append("  mean over tasks: " + ", ".join(f"{i} {m[i]:.3f}" for i in inits))
        lines.append(f"  goal (MD-MoCo and MUSCLE beat Scratch on >= {s['wins_needed']} "
                     f"tasks, MUSCLE >= MUSCLE-- on the mean): "
                     f"{'MET' if s['goal_met'] else 'NOT MET'}")
    lines.append("\nMD-MoCo monitors: first -> last (best: lowest loss, highest others)")
    for tag, v in mon.items():
        lines.append(f"  {tag}: {v['first'][1]:.3f} @ {v['first'][0]} -> {v['last'][1]:.3f} @ "
                     f"{v['last'][0]} (best {v['best'][1]:.3f} @ {v['best'][0]})")
    for method, folder in plan.continual.items():
        matrix = json.loads((folder / "validation.json").read_text())
        lines.append(f"\nContinual stage ({method}): every task's validation after every visit")
        lines.append(matrix_markdown(matrix, [t for t in TASKS if t in matrix[0]]))
    lines.append("\nWall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()))
    lines.append("Demo-scale numbers on synthetic data: they test that the method learns, "
                 "they are not the paper's.")
    return "\n".join(lines)


def bar_chart(summary: dict, inits: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = list(summary)
    fig, axes = plt.subplots(1, len(fractions), figsize=(7 * len(fractions), 4), squeeze=False)
    width = 0.8 / len(inits)
    for ax, fraction in zip(axes[0], fractions):
        tasks = summary[fraction]["tasks"]
        for k, init in enumerate(inits):
            means = [t["mean_sd"][init][0] for t in tasks.values()]
            sds = [t["mean_sd"][init][1] for t in tasks.values()]
            ax.bar([i + k * width for i in range(len(tasks))], means, width, yerr=sds,
                   capsize=3, label=init)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))])
        ax.set_xticklabels([f"{name}\n{t['metric']}" for name, t in tasks.items()])
        ax.set_ylim(0, 1)
        ax.set_title(f"{float(fraction):.0%} of the training labels")
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = Plan(args)
    seconds = {}
    start = time.monotonic()
    logs = plan.work / "logs"
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
            run([*plan.finetune(task, "scratch", 0, fraction), "--check"],
                logs / f"check_{task}_f{fraction:g}.log")
    # Stages resume from what they find: a fresh benchmark must not pick up an earlier one.
    shutil.rmtree(plan.runs, ignore_errors=True)
    t = time.monotonic()
    print("bench.learning: MD-MoCo", flush=True)
    run(plan.mdmoco(), logs / "mdmoco.log")
    seconds["mdmoco"] = time.monotonic() - t
    t = time.monotonic()
    print("bench.learning: continual stage, MUSCLE and MUSCLE-- side by side", flush=True)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda m: run(plan.continual_stage(m), logs / f"continual_{m}.log", 1),
                      plan.continual))
    seconds["continual"] = time.monotonic() - t
    t = time.monotonic()
    inits = [i for i in INITS if i != "imagenet" or imagenet_present(plan)]
    jobs = [(task, init, seed, f) for f in args.fractions for seed in range(args.seeds)
            for task in args.tasks for init in inits]
    print(f"bench.learning: {len(jobs)} fine-tunes ({', '.join(inits)}), two at a time",
          flush=True)

    def finetune(job):
        task, init, seed, fraction = job
        run(plan.finetune(*job), logs / f"ft_{task}_{init}_s{seed}_f{fraction:g}.log", 1)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(finetune, jobs))
    seconds["finetune"] = time.monotonic() - t
    seconds["total"] = time.monotonic() - start
    summary = summarise(plan, inits)
    mon = monitors(plan)
    text = report(plan, summary, mon, inits, seconds)
    print(text, flush=True)
    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "inits": inits, "summary": summary, "monitors": mon, "seconds": seconds}
    tmp = plan.work / ".learning.json"
    tmp.write_text(json.dumps(results, indent=1, default=float))
    tmp.replace(plan.work / "learning.json")
    bar_chart(summary, inits, plan.work / "learning.png")
    print(f"bench.learning: {plan.work / 'learning.json'}, {plan.work / 'learning.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
