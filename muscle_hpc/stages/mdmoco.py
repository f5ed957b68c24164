"""MD-MoCo (MUSCLE stage 1): MoCo v2 over the training images of all nine X-ray datasets.

    python -m muscle_hpc.stages.mdmoco --config configs/mdmoco_r50.yaml [key=value ...]

Runs the same under torchrun, srun and submitit (``dist.py`` reads rank and world from the
environment) and alone. Everything is checked before training starts; a bad config or a missing
shard is one line on stderr and exit status 2. ``run.dir`` gets the resolved ``config.yaml``,
the rolling checkpoint, TensorBoard events under ``tb/`` (``train/`` curves, and the
``monitor/`` ones of ``monitor.py``: kNN accuracy and AUC on the classification task sets, the
collapse spread, the top-1 among the step's own keys and the histograms' top-1 on MoCo's own
task, the shortcut) and, when training ends, ``backbone_torchvision.pth``. Started again on a
run directory with a checkpoint, it resumes exactly where that stopped. SIGTERM, SIGUSR1/2 or
Ctrl-C: checkpoint after the current step, exit with 128 + the signal number.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from muscle_hpc import config, dist, monitor, schedule
from muscle_hpc.data.loaders import BatchSizeError, two_view_loader
from muscle_hpc.data.shards import ShardError, pretrain_shards
from muscle_hpc.ds_engine import bf16_enabled, deepspeed_config, deepspeed_engine
from muscle_hpc.engine import StageError, TrainLoop
from muscle_hpc.models.build import build_moco
from muscle_hpc.models.moco import all_gather_cat, splits_per_rank
from muscle_hpc.stages import common

# Config sections that may change between a run and its resume; anything else would make the
# resumed run a different experiment.
RESUMABLE_CHANGES = ("run.", "data.num_workers")


def parse_args(argv):
    return common.parse_args("mdmoco", __doc__, argv, "model.K=4096")


@dataclass(frozen=True)
class MocoInputs(common.Prepared):
    """``shards``: the pre-training shards; ``knn_shards``: the kNN monitor's task sets (None
    where it reads none)."""

    knn_shards: dict | None


def load(config_path, overrides) -> config.MocoConfig:
    """The stage's config, from its file and overrides. Raises ``ConfigError``."""
    return config.load_config(config_path, overrides)


def prepare(cfg: config.MocoConfig, world_size: int, on_cuda: bool) -> MocoInputs:
    """The stage's inputs from a loaded config, checked for ``world_size`` ranks. Raises
    ``ConfigError`` or ``ShardError``."""
    config.check_moco(cfg, world_size)
    if cfg.model.bn == "sync" and not on_cuda:
        raise config.ConfigError("model.bn: sync needs GPUs (torch's SyncBatchNorm is GPU-only); "
                                 "use model.bn=shuffle")
    ds_config = deepspeed_config(cfg.run, cfg.data.batch_size, world_size, on_cuda)
    if cfg.data.synthetic:
        return MocoInputs(cfg, ds_config, None, None)
    shards = pretrain_shards(Path(cfg.data.root), cfg.data.datasets, cfg.data.pretrain_extra)
    return MocoInputs(cfg, ds_config, shards, knn_shards(cfg))


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
    return common.main("mdmoco", lambda: run(args))


def run(args) -> int:
    env, on_cuda = dist.dist_env(), torch.cuda.is_available()
    inputs = prepare(load(args.config, args.overrides), env.world_size, on_cuda)
    cfg = inputs.cfg
    with common.started("mdmoco", cfg, env, on_cuda, Path(cfg.run.dir),
                        RESUMABLE_CHANGES) as start:
        per_rank = cfg.data.batch_size // env.world_size
        try:
            loader = two_view_loader(inputs.shards, per_rank, cfg.data,
                                     device=dist.train_device())
        except BatchSizeError as e:
            raise StageError(f"data.batch_size: {e}") from None
        knn = monitor.knn_loaders(inputs.knn_shards, cfg.run.monitor_tasks, cfg.data, per_rank,
                                  dist.train_device()) if cfg.run.monitor_every_steps else None
        return train(cfg, start, loader, knn, inputs.ds_config)


def train(cfg, start, loader, knn, ds_config) -> int:
    device, m, world = dist.train_device(), cfg.model, start.env.world_size
    torch.manual_seed(cfg.run.seed)
    moco = build_moco(m).to(device)
    engine = deepspeed_engine(moco, list(moco.trainable_parameters()), ds_config,
                              momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    steps_per_epoch, = common.steps_per_epoch({"pre-training": loader}).values()
    total = cfg.optim.epochs * steps_per_epoch
    end = min(total, cfg.run.max_steps or total)
    shortcut = monitor.HistogramShortcut(m.K, device)
    loop = TrainLoop("mdmoco", cfg, start, engine, moco, {"steps_per_epoch": steps_per_epoch},
                     total=total, end=end, state=lambda: {"shortcut": shortcut.state_dict()})
    if "shortcut" in loop.shared:
        shortcut.load_state_dict(loop.shared["shortcut"])
    groups = world * splits_per_rank(m.bn_groups, world) if m.bn == "shuffle" else 1
    loop.say(f"mdmoco: {world} rank(s), {cfg.data.batch_size} images/step in {groups} "
             f"batch-norm group(s) ({m.bn}), {steps_per_epoch} steps/epoch, {total} steps, "
             f"{'resuming at step ' + str(loop.step) if loop.resumed else 'new run'} in "
             f"{start.ckpt.run_dir}")
    if cfg.data.pretrain_extra and not cfg.data.synthetic:
        extra = [s for s in loader.shards if s.split == "extra"]
        loop.say(f"mdmoco: data.pretrain_extra is on: also {sum(s.count for s in extra)} images "
                 f"of no task ({', '.join(f'{s.dataset} {s.count}' for s in extra)}), beyond "
                 f"the paper's training sets")

    def knn_report():
        """The kNN monitor (README, "Is pre-training working?"), to TensorBoard and stdout."""
        run, t0 = cfg.run, time.perf_counter()
        results = monitor.knn_eval(moco.encoder_q, knn, device, run.monitor_max_images,
                                   run.monitor_knn_k, run.monitor_knn_t,
                                   cfg.data.batch_size // world,
                                   bf16_enabled(cfg.run, start.on_cuda))
        seconds = time.perf_counter() - t0
        for task, r in results.items():
            loop.log.scalars(loop.step, f"monitor/knn/{task}/", accuracy=r["accuracy"],
                             auc=r["auc"])
        loop.log.scalars(loop.step, "monitor/", knn_seconds=seconds)
        loop.say(f"monitor step {loop.step}: kNN " + ", ".join(
            f"{t} acc {r['accuracy']:.3f} auc {r['auc']:.3f} ({r['valid_images']} valid over "
            f"{r['train_images']} train)" for t, r in results.items()) + f" in {seconds:.1f}s")
        loop.timer.window()  # a fresh timing window: the kNN pass is not step time

    def report(logits, shortcut_top1) -> str:
        """Top-1, the top-1 among the step's own keys (no stale queue keys), the histograms'
        top-1 on the same task (the shortcut monitor) and the mean cosines of positive pairs
        and queue negatives averaged over ranks, and the collapse spread of the global
        batch's queries."""
        top1 = (logits.argmax(dim=1) == 0).float().mean()
        in_batch = monitor.in_batch_top1(moco.last_q, moco.last_keys,
                                         start.env.rank * len(moco.last_q))
        cos = logits.detach() * moco.T  # MoCo's logits are cosines over T
        stats = torch.stack([top1, cos[:, 0].mean(), cos[:, 1:].mean(), shortcut_top1,
                             in_batch]).cpu()
        if world > 1:
            torch.distributed.all_reduce(stats)
            stats /= world
        spread = monitor.collapse_std(all_gather_cat(moco.last_q))
        spread_x_sqrt_dim = spread * math.sqrt(m.dim)
        loop.log.scalars(loop.step, "train/", top1=stats[0], epoch=loop.step / steps_per_epoch)
        loop.log.scalars(loop.step, "monitor/", collapse_std=spread,
                         collapse_std_x_sqrt_dim=spread_x_sqrt_dim, cos_positive=stats[1],
                         cos_negative=stats[2], shortcut_top1=stats[3],
                         top1_in_batch=stats[4])
        warning = monitor.collapse_warning(spread_x_sqrt_dim, cfg.run.monitor_collapse_warn)
        if warning:
            loop.say(f"mdmoco: {warning}")
        return (f"top1 {stats[0]:.3f} (in-batch {stats[4]:.3f}, histograms alone "
                f"{stats[3]:.3f}) spread {spread_x_sqrt_dim:.3f} ")

    if knn and not loop.resumed:  # the Kaiming init's baseline
        knn_report()
    lr_peak, warmup = cfg.effective_lr, cfg.optim.warmup_epochs * steps_per_epoch
    engine.train()
    with loop:
        while loop.step < end:
            epoch, first = divmod(loop.step, steps_per_epoch)
            loop.position = f"epoch {epoch} "
            with loop.batches(loader.epoch_batches(epoch, first)) as batches:
                for im_q, im_k in batches:
                    im_q = im_q.to(device, non_blocking=True)
                    im_k = im_k.to(device, non_blocking=True)
                    lr = schedule.cosine(loop.step, total, lr_peak, warmup)
                    schedule.set_lr(engine.optimizer, lr)
                    logits, labels = engine(im_q, im_k)
                    loss = F.cross_entropy(logits.float(), labels)
                    shortcut_top1 = shortcut.step(im_q, im_k)
                    loop.train_step(loss, lr, cfg.data.batch_size,
                                    partial(report, logits, shortcut_top1))
                    if knn and (loop.step % cfg.run.monitor_every_steps == 0 or loop.step == end):
                        knn_report()
                    every = cfg.run.image_grid_every_steps
                    if every and loop.step % every == 0:
                        n = min(8, im_q.shape[0])
                        loop.log.image_grid("train/views_query_top_key_bottom",
                                            torch.cat([im_q[:n], im_k[:n]]), loop.step, nrow=n)
                    code = loop.end_step(loop.step % steps_per_epoch == 0 or loop.step == end)
                    if code:
                        return code
                    if loop.step == end:
                        break
    if start.env.rank == 0:
        paths = common.export_backbone(moco, cfg, loop.step, start.ckpt.run_dir)
        loop.say(f"mdmoco: {'done' if loop.step == total else 'reached run.max_steps'}, "
                 f"{loop.step} of {total} steps; the backbone in "
                 f"{', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
