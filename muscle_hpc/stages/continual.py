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
from contextlib import closing
from pathlib import Path

import torch

from muscle_hpc import checkpoint, config, dist, schedule
from muscle_hpc.data.loaders import task_loader
from muscle_hpc.data.shards import ShardError, open_shard
from muscle_hpc.engine import (
    RollingCheckpoint,
    StepTimer,
    StopOnSignal,
    base_optimizer,
    deepspeed_engine,
    grad_norm,
    reset_optimizer_state,
)
from muscle_hpc.evaluate import evaluate
from muscle_hpc.models.backbone import build_backbone, export_torchvision, load_imagenet_into
from muscle_hpc.models.heads import MultiTaskNet, trunk_channels
from muscle_hpc.models.norm import sync_batchnorm
from muscle_hpc.regularizers import L2SP
from muscle_hpc.stages import common
from muscle_hpc.tasks import TASKS
from muscle_hpc.tblog import RunLogger

RESUMABLE_CHANGES = ("run.", "data.num_workers")


def parse_args(argv):
    return common.parse_args("continual", __doc__, argv, "cl.rounds=5")


def fail(message: str) -> int:
    return common.fail("continual", message)


def init_weights(cfg) -> dict | None:
    """The backbone state dict named by ``model.init`` (None: Kaiming init)."""
    if not cfg.model.init:
        return None
    return common.backbone_weights(cfg.model.init, cfg.model.arch, "model.init",
                                   "run MD-MoCo first, or set model.init='' to start from "
                                   "Kaiming init")


def prepare(config_path, overrides, world_size: int, on_cuda: bool):
    """Config, shards (``{task: {split: Shard}}``) and initial backbone weights, checked for
    ``world_size`` ranks before any process group or Slurm job exists."""
    cfg = config.load(config_path, overrides, config.ContinualConfig)
    config.check_continual(cfg, world_size)
    config.deepspeed_config(cfg, world_size, on_cuda, batch_size=max_batch(cfg))
    shards = {}
    for name in cfg.data.tasks:
        task = TASKS[name]
        if cfg.data.synthetic:
            shards[name] = {"train": None, "valid": None}
            continue
        shards[name] = {s: open_shard(Path(cfg.data.root), task.dataset, s)
                        for s in ("train", "valid")}
        for shard in shards[name].values():
            task.check(shard)
    return cfg, shards, init_weights(cfg)


def max_batch(cfg) -> int:
    return max(cfg.batch_size(t) for t in cfg.data.tasks)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = dist.dist_env()
    on_cuda = torch.cuda.is_available()
    try:
        cfg, shards, init = prepare(args.config, args.overrides, env.world_size, on_cuda)
    except (config.ConfigError, ShardError) as e:
        return fail(str(e))
    ds_config = config.deepspeed_config(cfg, env.world_size, on_cuda, batch_size=max_batch(cfg))
    ckpt = RollingCheckpoint(Path(cfg.run.dir), env.rank, env.world_size)
    try:
        resumed = ckpt.load(config.to_dict(cfg), RESUMABLE_CHANGES)
    except ValueError as e:
        return fail(str(e))
    common.join("continual", env, cfg.run.deterministic)
    try:
        def loader(t, split):
            return task_loader(shards[t][split], cfg.batch_size(t) // env.world_size,
                               TASKS[t], cfg.data, train=split == "train",
                               device=dist.train_device())

        loaders = {t: loader(t, "train") for t in cfg.data.tasks}
        val = {t: loader(t, "valid") for t in cfg.data.tasks} if cfg.run.validate else {}
        return train(cfg, env, loaders, val, init, ds_config, ckpt, resumed, on_cuda)
    finally:
        dist.shutdown()


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


def train(cfg, env, loaders, val, init, ds_config, ckpt, resumed, on_cuda) -> int:
    run_dir, rank, tasks = ckpt.run_dir, env.rank, cfg.data.tasks
    device = dist.train_device()
    bf16 = config.resolve_precision(cfg.run.precision, on_cuda) == "bf16"
    torch.manual_seed(cfg.run.seed)
    trunk = build_backbone(cfg.model.arch)
    if init is not None:
        load_imagenet_into(trunk, init)
    channels = trunk_channels(cfg.model.arch)
    heads = {t: TASKS[t].head(channels, cfg.model) for t in tasks}
    net = MultiTaskNet(trunk, heads).to(device)
    if env.world_size > 1 and cfg.model.sync_bn:
        sync_batchnorm(net, on_cuda)
    wd = cfg.optim.weight_decay
    # Each group's LR and weight decay are set before every step (set_lr).
    groups = [{"params": list(net.backbone.parameters()), "role": "backbone"}]
    groups += [{"params": list(net.heads[t].parameters()), "role": t} for t in tasks]
    engine = deepspeed_engine(net, groups, ds_config, momentum=cfg.optim.momentum,
                              weight_decay=wd)
    sharded = engine.zero_optimization_stage() > 0
    # MUSCLE--'s anchor (λ = 0) pulls nothing; it measures the drift the ablation lets happen.
    l2sp = L2SP(base_optimizer(engine), cfg.cl.l2sp_alpha,
                cfg.cl.l2sp_weight if cfg.muscle else 0.0, partitioned=sharded)
    # Under MUSCLE, eq. 2's (1 - α)‖w‖² is the backbone's weight decay.
    decay = {"backbone": l2sp.weight_decay if cfg.muscle else wd, **{t: wd for t in tasks}}

    spread = dist.spread([len(loaders[t]) for t in tasks])
    if any(lo != hi for lo, hi in spread):
        raise SystemExit(fail(f"ranks disagree on steps per epoch ({spread}): the loader must "
                              f"give every rank as many"))
    visits = plan(cfg, loaders)
    # Every rank derives the plan alone (no broadcast); nodes with another numpy could draw
    # other orders and then deadlock in mismatched collectives, so compare once.
    (lo, hi), = dist.spread([zlib.crc32(json.dumps(visits).encode())])
    if lo != hi:
        raise SystemExit(fail("ranks computed different visit orders (different numpy "
                              "versions on the nodes?)"))
    total = sum(v["steps"] for v in visits)
    steps_of = {t: min(len(loaders[t]), cfg.run.visit_steps or len(loaders[t])) for t in tasks}
    layout = {"steps_of": steps_of}
    shared = common.resume_or_start("continual", ckpt, resumed, engine, net, layout, cfg)
    step, matrix, ended = shared.get("step", 0), shared.get("matrix", []), shared.get("ended", [])
    if rank == 0:
        print(f"continual: {cfg.cl.method}, {env.world_size} rank(s), {len(visits)} visits "
              f"({cfg.cl.rounds} rounds x {len(tasks)} tasks), {total} steps, "
              f"{'resuming at step ' + str(step) if resumed else 'new run'} in {run_dir}",
              flush=True)
        for t in tasks:
            if cfg.data.synthetic:
                break
            unused = getattr(TASKS[t], "unused_categories", lambda _: [])(loaders[t].shard)
            if unused:
                print(f"continual: {t}: boxes of {', '.join(unused)} are not learned or "
                      f"scored (not one of {', '.join(TASKS[t].classes.values())})", flush=True)

    saved_at = [step if resumed else -1]

    def save():
        saved_at[0] = step
        shared = {"model": net.state_dict(), "config": config.to_dict(cfg),
                  **layout, "matrix": matrix, "ended": ended}
        ckpt.save_training(step, engine, shared)  # the anchor is in the optimizer state
        log.flush()

    def set_lr(visit, task):
        if cfg.muscle:  # eq. 1 within the visit
            lr = schedule.cyclic_cosine(step - visit["start"], cfg.optim.period_visits *
                                        visit["steps"], cfg.optim.lr_max, cfg.optim.lr_min)
        else:
            lr = schedule.cosine(step, total, cfg.optim.lr_max, final_lr=cfg.optim.lr_min)
        for g in engine.optimizer.param_groups:
            active = g["role"] in ("backbone", task)
            g["lr"] = lr if active else 0.0
            # from the config, not the group: a resumed group holds its last step's value
            g["weight_decay"] = decay[g["role"]] if active else 0.0
        return lr

    log = RunLogger(run_dir / "tb", rank, purge_step=step + 1 if resumed else None)
    stop = StopOnSignal()
    timer = StepTimer()

    def report(task, lr, loss, norm, batch_size):
        loss = dist.mean(loss.detach().float())
        parts = l2sp.parts() if cfg.muscle else None
        penalty = parts["pull"] + parts["decay"] if parts else None
        images_per_s, wait = timer.window(batch_size)
        log.scalars(step, "train/", lr=lr, l2sp=penalty, images_per_s=images_per_s,
                    data_wait=wait, grad_norm=norm)
        log.scalars(step, f"train/{task}/", loss=loss)
        if rank == 0:
            print(f"step {step}/{total} {task} loss {loss:.4f} "
                  + (f"l2sp {penalty:.4f} " if cfg.muscle else "")
                  + f"lr {lr:.5f} img/s {images_per_s:.1f} wait {wait:.0%}", flush=True)

    def end_visit(index, visit):
        """How far the visit moved the backbone from its anchor, and eq. 2's two terms."""
        parts = l2sp.parts() if cfg.muscle else {"drift": l2sp.norms()[0]}
        ended.append({"visit": index, "round": visit["round"], "task": visit["task"],
                      "step": step, **parts})
        log.scalars(index + 1, "visit/", **parts)
        if rank == 0:
            checkpoint.save_json(run_dir / "visits.json", ended)
            print(f"continual: visit {index + 1} ({visit['task']}) ended: backbone drift "
                  f"|w - w0| {parts['drift']:.4f}" + (
                      f", L2-SP pull {parts['pull']:.4g}, decay {parts['decay']:.4g}"
                      if cfg.muscle else ""), flush=True)

    def validate(index, visit):
        row = {"visit": index, "round": visit["round"], "trained": visit["task"], "step": step}
        for t in val:
            row[t] = evaluate(net, TASKS[t], val[t], device, cfg.eval, bf16)
            log.scalars(step, f"val/{t}/", **row[t])
            log.scalars(index + 1, "forgetting/", **{t: row[t][TASKS[t].headline]})
        matrix.append(row)
        if rank == 0:
            log.text("val/matrix", matrix_markdown(matrix, val), index + 1)
            checkpoint.save_json(run_dir / "validation.json", matrix)
            print(f"continual: after visit {index + 1} ({visit['task']}): " + ", ".join(
                f"{t} {TASKS[t].headline} {row[t][TASKS[t].headline]:.3f}" for t in val),
                flush=True)

    end = min(total, cfg.run.max_steps or total)
    try:
        for index, visit in enumerate(visits):
            task, first = TASKS[visit["task"]], visit["start"]
            last = first + visit["steps"]
            if first < end and step < last:
                net.train()
                for name, head in net.heads.items():
                    head.requires_grad_(name == task.name)
                if step == first:  # a new visit; a resumed one keeps its momentum and anchor
                    reset_optimizer_state(engine)
                    l2sp.set_anchor()
                timer.window(1)  # a fresh window: validation time is not data wait
                batches = timer.timed(loaders[task.name].epoch_batches(visit["round"],
                                                                       step - first))
                with closing(batches):
                    for batch in batches:
                        lr = set_lr(visit, task.name)
                        images = batch["image"].to(device, non_blocking=True)
                        loss = engine(task.name, images, task.targets(batch, device))
                        engine.backward(loss)  # eq. 2's gradient is added in the step
                        logging_now = (step + 1) % cfg.run.log_every_steps == 0
                        norm = grad_norm(engine) if logging_now and not sharded else None
                        engine.step()
                        step += 1
                        if logging_now:
                            report(task.name, lr, loss,
                                   engine.get_global_grad_norm() if norm is None else norm,
                                   cfg.batch_size(task.name))
                        code = stop.save_or_stop(step % cfg.run.checkpoint_every_steps == 0,
                                                 save, "continual", step, ckpt.path)
                        if code:
                            return code
                        if step in (last, end):
                            break
            if step == last and len(ended) == index:
                end_visit(index, visit)
                if val:
                    validate(index, visit)
                save()
            if step >= end:
                break
        if saved_at[0] != step:
            save()
    finally:
        stop.restore()
        log.close()
    if rank == 0:
        checkpoint.save(run_dir / "backbone_torchvision.pth", export_torchvision(net.backbone))
        print(f"continual: {'done' if step == total else 'reached run.max_steps'}, {step} of "
              f"{total} steps; torchvision backbone in {run_dir / 'backbone_torchvision.pth'}",
              flush=True)
    return 0


def matrix_markdown(matrix, val) -> str:
    """The task x visit matrix as a Markdown table: one row per visit, the headline metric of
    every task after it (so a task's column shows what later visits did to it)."""
    names = list(val)
    lines = ["| visit | round | trained | " + " | ".join(
        f"{t} {TASKS[t].headline}" for t in names) + " |",
        "|" + "---|" * (3 + len(names))]
    for row in matrix:
        lines.append(f"| {row['visit'] + 1} | {row['round'] + 1} | {row['trained']} | " +
                     " | ".join(f"{row[t][TASKS[t].headline]:.4f}" for t in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
