"""Multi-task continual learning (MUSCLE stage 2): the MD-MoCo backbone trained on four tasks
in turn, each with its own head, over ``cl.rounds`` rounds.

    python -m muscle_hpc.stages.continual --config configs/continual_r50.yaml [key=value ...]

Each round visits every task once, in a fresh order (the same on every rank), for one epoch of
its training set. A visit starts with SGD's momentum cleared and the backbone's weights kept
as L2-SP's anchor (eq. 2, ``regularizers.L2SP``); its LR follows eq. 1 within the visit.
``cl.method=muscle--`` is the ablation: fixed order, one cosine decay over the whole stage, no
L2-SP. All ranks train the same task at once; the heads of the other tasks are frozen for the
visit (no gradient, no traffic, no update). Every visit ends by logging how far the backbone
moved from its anchor (``visits.json``); then every task is validated (``validation.json``, the
task x visit matrix). Started again on a run directory with a checkpoint, it resumes in the same
round, visit and step, with the same anchor. Exit status as for ``mdmoco``.
"""

from __future__ import annotations

import json
import sys
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from muscle_hpc import checkpoint, config, dist, schedule
from muscle_hpc.data.loaders import task_loader
from muscle_hpc.ds_engine import (
    base_optimizer,
    bf16_enabled,
    deepspeed_config,
    deepspeed_engine,
    reset_optimizer_state,
)
from muscle_hpc.engine import StageError, TrainLoop
from muscle_hpc.evaluate import evaluate
from muscle_hpc.models.build import build_multitask
from muscle_hpc.models.norm import sync_batchnorm
from muscle_hpc.regularizers import L2SP
from muscle_hpc.stages import common
from muscle_hpc.tasks import PAPER_TASKS

RESUMABLE_CHANGES = ("run.", "data.num_workers")
# Except run.seed: it draws every round's visit order, which a resume recomputes; another seed
# would revisit tasks the interrupted round has visited and skip others.
KEPT_ON_RESUME = ("run.seed",)


def parse_args(argv):
    return common.parse_args("continual", __doc__, argv, "cl.rounds=5")


def init_weights(cfg) -> dict | None:
    """The backbone state dict named by ``model.init`` (None: Kaiming init)."""
    if not cfg.model.init:
        return None
    return common.backbone_weights(cfg.model.init, cfg.model.arch, "model.init",
                                   "run MD-MoCo first, or set model.init='' to start from "
                                   "Kaiming init; on a shell: model.init=\"''\"")


@dataclass(frozen=True)
class ContinualInputs(common.Prepared):
    """``shards``: ``{task: {split: Shard}}``; ``init``: the backbone's initial weights (a
    torchvision state dict; None: Kaiming init)."""

    init: dict | None


def load(config_path, overrides) -> config.ContinualConfig:
    """The stage's config, from its file and overrides. Raises ``ConfigError``."""
    return config.load(config_path, overrides, config.ContinualConfig)


def prepare(cfg: config.ContinualConfig, world_size: int, on_cuda: bool) -> ContinualInputs:
    """The stage's inputs from a loaded config, checked for ``world_size`` ranks. Raises
    ``ConfigError`` or ``ShardError``."""
    config.check_continual(cfg, world_size)
    ds_config = deepspeed_config(cfg.run, max(cfg.batch_size(t) for t in cfg.data.tasks),
                                 world_size, on_cuda)
    shards = {}
    for name in cfg.data.tasks:
        task = PAPER_TASKS[name]
        if cfg.data.synthetic:
            shards[name] = {"train": None, "valid": None}
            continue
        shards[name] = task.open_splits(cfg.data.root, ("train", "valid"))
    return ContinualInputs(cfg, ds_config, shards, init_weights(cfg))


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.main("continual", lambda: run(args))


def run(args) -> int:
    env, on_cuda = dist.dist_env(), torch.cuda.is_available()
    inputs = prepare(load(args.config, args.overrides), env.world_size, on_cuda)
    cfg = inputs.cfg
    with common.started("continual", cfg, env, on_cuda, Path(cfg.run.dir),
                        RESUMABLE_CHANGES, KEPT_ON_RESUME) as start:
        def loader(t, split):
            return task_loader(inputs.shards[t][split], cfg.batch_size(t) // env.world_size,
                               PAPER_TASKS[t], cfg.data, train=split == "train",
                               device=dist.train_device())

        loaders = {t: loader(t, "train") for t in cfg.data.tasks}
        val = {t: loader(t, "valid") for t in cfg.data.tasks} if cfg.run.validate else {}
        return train(cfg, start, loaders, val, inputs.init, inputs.ds_config)


def plan(cfg, loaders) -> list[dict]:
    """Every visit of the stage in order: round, task, first global step, number of steps."""
    visits, start = [], 0
    for rnd in range(cfg.cl.rounds):
        for task in schedule.visit_order(cfg.data.tasks, rnd, cfg.run.seed, cfg.muscle):
            n = len(loaders[task])
            n = min(n, cfg.run.visit_steps) if cfg.run.visit_steps else n
            visits.append({"round": rnd, "task": task, "start": start, "steps": n})
            start += n
    return visits


def train(cfg, start, loaders, val, init, ds_config) -> int:
    tasks, device, on_cuda = cfg.data.tasks, dist.train_device(), start.on_cuda
    bf16 = bf16_enabled(cfg.run, on_cuda)
    torch.manual_seed(cfg.run.seed)
    net = build_multitask(cfg.model.arch, {t: PAPER_TASKS[t] for t in tasks}, cfg.model, init)
    net = net.to(device)
    if start.env.world_size > 1 and cfg.model.sync_bn:
        sync_batchnorm(net, on_cuda)
    wd = cfg.optim.weight_decay
    # Each group's LR and weight decay are set before every step (set_lr).
    groups = [{"params": list(net.backbone.parameters()), "role": "backbone"}]
    groups += [{"params": list(net.heads[t].parameters()), "role": t} for t in tasks]
    engine = deepspeed_engine(net, groups, ds_config, momentum=cfg.optim.momentum,
                              weight_decay=wd)
    # MUSCLE--'s anchor (λ = 0) pulls nothing; it measures the drift the ablation lets happen.
    l2sp = L2SP(base_optimizer(engine), cfg.cl.l2sp_alpha,
                cfg.cl.l2sp_weight if cfg.muscle else 0.0,
                partitioned=engine.zero_optimization_stage() > 0)
    # Under MUSCLE, eq. 2's (1 - α)‖w‖² is the backbone's weight decay.
    decay = {"backbone": l2sp.weight_decay if cfg.muscle else wd, **{t: wd for t in tasks}}

    common.steps_per_epoch({t: loaders[t] for t in tasks})
    visits = plan(cfg, loaders)
    # Every rank derives the plan alone (no broadcast); nodes with another numpy could draw
    # other orders and then deadlock in mismatched collectives, so compare once.
    (lo, hi), = dist.spread([zlib.crc32(json.dumps(visits).encode())])
    if lo != hi:
        raise StageError("ranks computed different visit orders (different numpy versions on "
                         "the nodes?)")
    total = sum(v["steps"] for v in visits)
    end = min(total, cfg.run.max_steps or total)
    steps_of = {t: min(len(loaders[t]), cfg.run.visit_steps or len(loaders[t])) for t in tasks}
    matrix, ended = [], []
    # the anchor is in the optimizer state
    loop = TrainLoop("continual", cfg, start, engine, net, {"steps_of": steps_of},
                     total=total, end=end, state=lambda: {"matrix": matrix, "ended": ended})
    matrix += loop.shared.get("matrix", [])
    ended += loop.shared.get("ended", [])
    loop.say(f"continual: {cfg.cl.method}, {start.env.world_size} rank(s), {len(visits)} visits "
             f"({cfg.cl.rounds} round{'s' * (cfg.cl.rounds > 1)} x {len(tasks)} tasks), "
             f"{total} steps, "
             f"{'resuming at step ' + str(loop.step) if loop.resumed else 'new run'} in "
             f"{start.ckpt.run_dir}")
    for t in [] if cfg.data.synthetic else tasks:
        if note := PAPER_TASKS[t].ignored(loaders[t].shard):
            loop.say(f"continual: {note}")

    def set_lr(visit, task):
        if cfg.muscle:  # eq. 1 within the visit
            lr = schedule.cyclic_cosine(loop.step - visit["start"], cfg.optim.period_visits *
                                        visit["steps"], cfg.optim.lr_max, cfg.optim.lr_min)
        else:
            lr = schedule.cosine(loop.step, total, cfg.optim.lr_max, final_lr=cfg.optim.lr_min)
        for g in engine.optimizer.param_groups:
            active = g["role"] in ("backbone", task)
            g["lr"] = lr if active else 0.0
            # from the config, not the group: a resumed group holds its last step's value
            g["weight_decay"] = decay[g["role"]] if active else 0.0
        return lr

    def report(index: int, visit: dict) -> str:
        parts = l2sp.parts() if cfg.muscle else None
        penalty = parts["pull"] + parts["decay"] if parts else None
        loop.log.scalars(loop.step, "train/", l2sp=penalty, round=visit["round"] + 1,
                         visit=index + 1)
        return f"l2sp {penalty:.4f} " if cfg.muscle else ""

    def end_visit(index, visit):
        """How far the visit moved the backbone from its anchor, and eq. 2's two terms."""
        parts = l2sp.parts() if cfg.muscle else {"drift": l2sp.norms()[0]}
        ended.append({"visit": index, "round": visit["round"], "task": visit["task"],
                      "step": loop.step, **parts})
        loop.log.scalars(index + 1, "visit/", **parts)
        if start.env.rank == 0:
            checkpoint.save_json(start.ckpt.run_dir / "visits.json", ended)
        loop.say(f"continual: visit {index + 1} ({visit['task']}) ended: backbone drift "
                 f"|w - w0| {parts['drift']:.4f}" + (
                     f", L2-SP pull {parts['pull']:.4g}, decay {parts['decay']:.4g}"
                     if cfg.muscle else ""))

    def validate(index, visit):
        row = {"visit": index, "round": visit["round"], "trained": visit["task"],
               "step": loop.step}
        for t in val:
            row[t] = evaluate(net, PAPER_TASKS[t], val[t], device, cfg.eval, bf16)
            loop.log.scalars(loop.step, f"val/{t}/", **row[t])
            loop.log.scalars(index + 1, "forgetting/", **{t: row[t][PAPER_TASKS[t].headline]})
        matrix.append(row)
        if start.env.rank == 0:
            loop.log.text("val/matrix", matrix_markdown(matrix, val), index + 1)
            checkpoint.save_json(start.ckpt.run_dir / "validation.json", matrix)
        loop.say(f"continual: after visit {index + 1} ({visit['task']}): " + ", ".join(
            f"{t} {PAPER_TASKS[t].headline} {row[t][PAPER_TASKS[t].headline]:.3f}" for t in val))

    with loop:
        for index, visit in enumerate(visits):
            task, first = PAPER_TASKS[visit["task"]], visit["start"]
            last = first + visit["steps"]
            if first < end and loop.step < last:
                net.train()
                for name, head in net.heads.items():
                    head.requires_grad_(name == task.name)
                if loop.step == first:  # a new visit; a resumed one keeps momentum and anchor
                    reset_optimizer_state(engine)
                    l2sp.set_anchor()
                loop.position = (f"round {visit['round'] + 1}/{cfg.cl.rounds} visit "
                                 f"{index + 1}/{len(visits)} {task.name} ")
                batches = loaders[task.name].epoch_batches(visit["round"], loop.step - first)
                with loop.batches(batches) as batches:
                    for batch in batches:
                        lr = set_lr(visit, task.name)
                        images = batch["image"].to(device, non_blocking=True)
                        loss = engine(task.name, images, task.targets(batch, device))
                        # eq. 2's gradient is added in the optimizer step
                        loop.train_step(loss, lr, cfg.batch_size(task.name),
                                        partial(report, index, visit), f"train/{task.name}/")
                        code = loop.end_step()
                        if code:
                            return code
                        if loop.step in (last, end):
                            break
            if loop.step == last and len(ended) == index:
                end_visit(index, visit)
                if val:
                    validate(index, visit)
                loop.save()
            if loop.step >= end:
                break
        if loop.saved_at != loop.step:
            loop.save()
    if start.env.rank == 0:
        paths = common.export_backbone(net, cfg, loop.step, start.ckpt.run_dir)
        loop.say(f"continual: {'done' if loop.step == total else 'reached run.max_steps'}, "
                 f"{loop.step} of {total} steps; the backbone in "
                 f"{', '.join(map(str, paths))}")
    return 0


def matrix_markdown(matrix, val) -> str:
    """The task x visit matrix as a Markdown table: one row per visit, the headline metric of
    every task after it (so a task's column shows what later visits did to it)."""
    names = list(val)
    lines = ["| visit | round | trained | " + " | ".join(
        f"{t} {PAPER_TASKS[t].headline}" for t in names) + " |",
        "|" + "---|" * (3 + len(names))]
    for row in matrix:
        lines.append(f"| {row['visit'] + 1} | {row['round'] + 1} | {row['trained']} | " +
                     " | ".join(f"{row[t][PAPER_TASKS[t].headline]:.4f}" for t in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
