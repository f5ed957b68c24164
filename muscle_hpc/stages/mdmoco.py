"""MD-MoCo (MUSCLE stage 1): MoCo v2 over the training images of all nine X-ray datasets.

    python -m muscle_hpc.stages.mdmoco --config configs/mdmoco_r50.yaml [key=value ...]

Runs the same under torchrun, srun and submitit (``dist.py`` reads rank and world from the
environment) and alone. Everything is checked before training starts; a bad config or a missing
shard is one line on stderr and exit status 2. ``run.dir`` gets the resolved ``config.yaml``,
the rolling checkpoint, TensorBoard events under ``tb/`` (``train/`` curves, and the
``monitor/`` ones of ``monitor.py``: kNN accuracy and AUC on the classification task sets, and
the collapse spread) and, when training ends, ``backbone_torchvision.pth``. Started again on a
run directory with a checkpoint, it resumes exactly where that stopped. SIGTERM, SIGUSR1/2 or
Ctrl-C: checkpoint after the current step, exit with 128 + the signal number.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import closing
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from muscle_hpc import checkpoint, config, dist, monitor, schedule
from muscle_hpc.data.loaders import two_view_loader
from muscle_hpc.data.shards import ShardError, pretrain_shards
from muscle_hpc.engine import (
    RollingCheckpoint,
    StepTimer,
    StopOnSignal,
    deepspeed_engine,
    grad_norm,
)
from muscle_hpc.models.backbone import build_backbone, export_torchvision
from muscle_hpc.models.moco import MoCo, all_gather_cat
from muscle_hpc.stages import common
from muscle_hpc.tblog import RunLogger

# Config sections that may change between a run and its resume; anything else would make the
# resumed run a different experiment.
RESUMABLE_CHANGES = ("run.", "data.num_workers")


def parse_args(argv):
    return common.parse_args("mdmoco", __doc__, argv, "model.K=4096")


def fail(message: str) -> int:
    return common.fail("mdmoco", message)


def prepare(config_path, overrides, world_size: int, on_cuda: bool):
    """The config and shards, checked for ``world_size`` ranks before any process group or
    Slurm job exists (the launcher calls this too). Raises ``ConfigError`` or ``ShardError``."""
    cfg = config.load_config(config_path, overrides)
    config.check_moco(cfg, world_size)
    if cfg.model.bn == "sync" and not on_cuda:
        raise config.ConfigError("model.bn: sync needs GPUs (torch's SyncBatchNorm is GPU-only); "
                                 "use model.bn=shuffle")
    config.deepspeed_config(cfg, world_size, on_cuda)
    if cfg.data.synthetic:
        return cfg, None
    shards = pretrain_shards(Path(cfg.data.root), cfg.data.datasets, cfg.data.pretrain_extra)
    knn_shards(cfg)
    return cfg, shards


def knn_shards(cfg) -> dict | None:
    """The train and valid shards of the kNN monitor's task sets; None where it reads none
    (never monitoring, or ``data.synthetic``). Raises ``ShardError``."""
    if not cfg.run.monitor_every_steps or cfg.data.synthetic:
        return None
    try:
        return monitor.task_shards(Path(cfg.data.root), cfg.run.monitor_tasks)
    except ShardError as e:
        raise ShardError(f"run.monitor_tasks: {e} (run.monitor_every_steps=0: no kNN "
                         f"monitor)") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    env = dist.dist_env()
    on_cuda = torch.cuda.is_available()
    try:
        cfg, shards = prepare(args.config, args.overrides, env.world_size, on_cuda)
        watched = knn_shards(cfg)
    except (config.ConfigError, ShardError) as e:
        return fail(str(e))
    ds_config = config.deepspeed_config(cfg, env.world_size, on_cuda)
    ckpt = RollingCheckpoint(Path(cfg.run.dir), env.rank, env.world_size)
    try:
        resumed = ckpt.load(config.to_dict(cfg), RESUMABLE_CHANGES)
    except ValueError as e:
        return fail(str(e))

    common.join("mdmoco", env, cfg.run.deterministic)
    per_rank = cfg.data.batch_size // env.world_size
    try:
        loader = two_view_loader(shards, per_rank, cfg.data, device=dist.train_device())
    except ValueError as e:
        dist.shutdown()
        return fail(f"data.batch_size: {e}")
    knn = monitor.knn_loaders(watched, cfg.run.monitor_tasks, cfg.data, per_rank,
                              dist.train_device()) if cfg.run.monitor_every_steps else None
    try:
        return train(cfg, env, loader, knn, ds_config, ckpt, resumed, on_cuda)
    finally:
        dist.shutdown()


def train(cfg, env, loader, knn, ds_config, ckpt, resumed, on_cuda) -> int:
    run_dir, rank = ckpt.run_dir, env.rank
    device = dist.train_device()
    torch.manual_seed(cfg.run.seed)
    m = cfg.model
    moco = MoCo(partial(build_backbone, m.arch), dim=m.dim, K=m.K, m=m.m, T=m.T, mlp=m.mlp,
                bn=m.bn).to(device)
    engine = deepspeed_engine(moco, list(moco.trainable_parameters()), ds_config,
                              momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    sharded_optimizer = engine.zero_optimization_stage() > 0

    steps_per_epoch = len(loader)
    (lo, hi), = dist.spread([steps_per_epoch])
    if lo != hi:
        raise SystemExit(fail(f"ranks disagree on steps per epoch ({lo} to {hi}): the loader "
                              f"must give every rank as many"))
    total = cfg.optim.epochs * steps_per_epoch
    layout = {"steps_per_epoch": steps_per_epoch}
    step = common.resume_or_start("mdmoco", ckpt, resumed, engine, moco, layout, cfg).get("step", 0)
    if rank == 0:
        print(f"mdmoco: {env.world_size} rank(s), {cfg.data.batch_size} images/step, "
              f"{steps_per_epoch} steps/epoch, {total} steps, "
              f"{'resuming at step ' + str(step) if resumed else 'new run'} in {run_dir}",
              flush=True)
        if cfg.data.pretrain_extra and not cfg.data.synthetic:
            extra = [s for s in loader.shards if s.split == "extra"]
            print(f"mdmoco: data.pretrain_extra is on: also {sum(s.count for s in extra)} "
                  f"images of no task ({', '.join(f'{s.dataset} {s.count}' for s in extra)}), "
                  f"beyond the paper's training sets", flush=True)

    def save():
        ckpt.save_training(step, engine, {"model": moco.state_dict(), "config": config.to_dict(cfg),
                                          **layout})
        log.flush()

    log = RunLogger(run_dir / "tb", rank, purge_step=step + 1 if resumed else None)
    stop = StopOnSignal()
    per_rank = cfg.data.batch_size // env.world_size

    def knn_report(step):
        """The kNN monitor (README, "Is pre-training working?"), to TensorBoard and stdout."""
        run, t0 = cfg.run, time.perf_counter()
        results = monitor.knn_eval(moco.encoder_q, knn, device, run.monitor_max_images,
                                   run.monitor_knn_k, run.monitor_knn_t, per_rank,
                                   ds_config["torch_autocast"]["enabled"])
        seconds = time.perf_counter() - t0
        for task, r in results.items():
            log.scalars(step, f"monitor/knn/{task}/", accuracy=r["accuracy"], auc=r["auc"])
        log.scalars(step, "monitor/", knn_seconds=seconds)
        if rank == 0:
            print(f"monitor step {step}: kNN " + ", ".join(
                f"{t} acc {r['accuracy']:.3f} auc {r['auc']:.3f} ({r['valid_images']} valid "
                f"over {r['train_images']} train)" for t, r in results.items())
                + f" in {seconds:.1f}s", flush=True)

    if knn and not resumed:  # the Kaiming init's baseline
        knn_report(0)
    timer = StepTimer()

    def report(step, lr, loss, logits, norm):
        """Loss, top-1 and the mean cosines of positive pairs and queue negatives averaged over
        ranks, and the collapse spread of the global batch's queries, to TensorBoard and stdout
        (rank 0)."""
        top1 = (logits.argmax(dim=1) == 0).float().mean()
        cos = logits.detach() * moco.T  # MoCo's logits are cosines over T
        stats = torch.stack([loss.detach().float(), top1, cos[:, 0].mean(),
                             cos[:, 1:].mean()]).cpu()
        if env.world_size > 1:
            torch.distributed.all_reduce(stats)
            stats /= env.world_size
        spread = monitor.collapse_std(all_gather_cat(moco.last_q))
        spread_x_sqrt_dim = spread * math.sqrt(m.dim)
        images_per_s, wait = timer.window(cfg.data.batch_size)
        log.scalars(step, "train/", loss=stats[0], lr=lr, top1=stats[1],
                    images_per_s=images_per_s, data_wait=wait, grad_norm=norm,
                    epoch=step / steps_per_epoch)
        log.scalars(step, "monitor/", collapse_std=spread,
                    collapse_std_x_sqrt_dim=spread_x_sqrt_dim, cos_positive=stats[2],
                    cos_negative=stats[3])
        if rank == 0:
            print(f"epoch {(step - 1) // steps_per_epoch} step {step}/{total} "
                  f"loss {stats[0]:.4f} top1 {stats[1]:.3f} lr {lr:.5f} "
                  f"img/s {images_per_s:.1f} wait {wait:.0%} "
                  f"spread {spread_x_sqrt_dim:.3f}", flush=True)
            warning = monitor.collapse_warning(spread_x_sqrt_dim, cfg.run.monitor_collapse_warn)
            if warning:
                print(f"mdmoco: {warning}", flush=True)
    lr_peak = cfg.effective_lr
    warmup = cfg.optim.warmup_epochs * steps_per_epoch
    end = min(total, cfg.run.max_steps or total)
    engine.train()
    try:
        while step < end:
            epoch, start = divmod(step, steps_per_epoch)
            with closing(timer.timed(loader.epoch_batches(epoch, start))) as batches:
                for im_q, im_k in batches:
                    im_q = im_q.to(device, non_blocking=True)
                    im_k = im_k.to(device, non_blocking=True)
                    lr = schedule.cosine(step, total, lr_peak, warmup)
                    schedule.set_lr(engine.optimizer, lr)
                    logits, labels = engine(im_q, im_k)
                    loss = F.cross_entropy(logits.float(), labels)
                    engine.backward(loss)
                    logging_now = (step + 1) % cfg.run.log_every_steps == 0
                    norm = grad_norm(engine) if logging_now and not sharded_optimizer else None
                    engine.step()
                    step += 1
                    if logging_now:
                        report(step, lr, loss, logits,
                               engine.get_global_grad_norm() if norm is None else norm)
                    if knn and (step % cfg.run.monitor_every_steps == 0 or step == end):
                        knn_report(step)
                    every = cfg.run.image_grid_every_steps
                    if every and step % every == 0:
                        n = min(8, im_q.shape[0])
                        log.image_grid("train/views_query_top_key_bottom",
                                       torch.cat([im_q[:n], im_k[:n]]), step, nrow=n)
                    due = step % cfg.run.checkpoint_every_steps == 0 \
                        or step % steps_per_epoch == 0 or step == end
                    code = stop.save_or_stop(due, save, "mdmoco", step, ckpt.path)
                    if code:
                        return code
                    if step == end:
                        break
    finally:
        stop.restore()
        log.close()
    if rank == 0:
        checkpoint.save(run_dir / "backbone_torchvision.pth", export_torchvision(moco.encoder_q))
        print(f"mdmoco: {'done' if step == total else 'reached run.max_steps'}, {step} of "
              f"{total} steps; torchvision backbone in "
              f"{run_dir / 'backbone_torchvision.pth'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
