"""Fine-tuning (MUSCLE stage 3): one task, one initial backbone, one architecture.

    python -m muscle_hpc.stages.finetune --task pneumonia|mura|lung|tbx
        --init scratch|imagenet|mdmoco|muscle--|muscle --backbone r18|r50
        [--config F] [key=value ...]
    python -m muscle_hpc.stages.finetune --grid-index N [...]   (one element of the 40-job grid)
    python -m muscle_hpc.stages.finetune --list                 (the grid, index by index)

The backbone (Kaiming init, torchvision's ImageNet weights, or the earlier stages' exports found
under ``run.root``) gets the task's head and is trained with SGD, weight decay and a step LR
decay. After every epoch the valid split is scored; the best epoch by the task's headline metric
(AUC, Dice, mAP) is kept in ``best.pth``, and at the end it is scored once on the test split,
with bootstrap 95% CIs for classification. Everything lands in
``run.root/finetune/<task>_<backbone>_<init>/``: ``results.json``, ``best.pth``, the rolling
``checkpoint.pth``, TensorBoard events, and for segmentation ``samples.npz`` (a few test images
with true and predicted masks, for the report's overlays). ``--check`` resolves the inputs and
says what would run, without training. Resume and exit status as for the other stages.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from muscle_hpc import checkpoint, config, dist, registry, schedule
from muscle_hpc.data.loaders import subset_size, task_loader
from muscle_hpc.data.shards import open_shard
from muscle_hpc.engine import StageError, TrainLoop, deepspeed_engine
from muscle_hpc.evaluate import evaluate, evaluate_records
from muscle_hpc.models.backbone import build_backbone, load_imagenet_into
from muscle_hpc.models.heads import MultiTaskNet, trunk_channels
from muscle_hpc.models.norm import sync_batchnorm
from muscle_hpc.stages import common
from muscle_hpc.tasks import TASKS

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "finetune.yaml"
RESUMABLE_CHANGES = ("run.", "data.num_workers", "eval.")
GRID = list(registry.GRID)
# The inits that earlier stages write under run.root: their pretrained.<key>, their maker.
PRETRAINED_KEY = {i.name: i.pretrained_key for i in registry.INITS.values() if i.made_by}
MADE_BY = {i.name: i.made_by for i in registry.INITS.values() if i.made_by}


class Selection(NamedTuple):
    task: str
    init: str
    backbone: str

    @property
    def arch(self) -> str:
        return registry.BACKBONES[self.backbone].arch

    @property
    def name(self) -> str:
        return registry.finetune_name(self.task, self.backbone, self.init)


def add_arguments(p) -> None:
    p.add_argument("--task", choices=registry.TASK_NAMES)
    p.add_argument("--init", choices=registry.INIT_NAMES)
    p.add_argument("--backbone", choices=registry.BACKBONE_NAMES)
    p.add_argument("--grid-index", type=int, metavar="N",
                   help=f"element N of the grid (0-{len(GRID) - 1}; see --list) instead of "
                        f"--task/--init/--backbone: what a Slurm array index selects")
    p.add_argument("--list", action="store_true", help="print the grid and exit")
    p.add_argument("--check", action="store_true",
                   help="resolve the config, shards and initial weights, say what would run")


def parse_args(argv):
    return common.parse_args("finetune", __doc__, argv, "tasks.lung.epochs=10",
                             config_default=str(DEFAULT_CONFIG), add_arguments=add_arguments)


def selection(args) -> Selection:
    """The (task, init, backbone) the arguments name. Raises ``ConfigError``."""
    flags = (args.task, args.init, args.backbone)
    if args.grid_index is not None:
        if any(flags):
            raise config.ConfigError("--grid-index selects task, init and backbone; do not also "
                                     "give --task/--init/--backbone")
        if not 0 <= args.grid_index < len(GRID):
            raise config.ConfigError(f"--grid-index: {args.grid_index} is not in "
                                     f"0-{len(GRID) - 1} (see --list)")
        return Selection(*GRID[args.grid_index])
    if not all(flags):
        raise config.ConfigError("give --task, --init and --backbone, or --grid-index")
    return Selection(*flags)


def output_dir(cfg, sel: Selection) -> Path:
    return registry.finetune_dir(cfg.run.root, sel.task, sel.backbone, sel.init)


def init_path(cfg, sel: Selection) -> str | None:
    """The file ``sel.init`` starts from (None: Kaiming init). Raises ``ConfigError``."""
    if sel.init == "scratch":
        return None
    if sel.init == "imagenet":
        configured = config.expand_path("pretrained.imagenet", cfg.pretrained.imagenet,
                                        root=cfg.run.root, backbone=sel.backbone)
        return common.imagenet_weights_path(sel.arch, configured)
    key = PRETRAINED_KEY[sel.init]
    return config.expand_path(f"pretrained.{key}", getattr(cfg.pretrained, key),
                              root=cfg.run.root, backbone=sel.backbone)


def prepare(config_path, overrides, world_size: int, on_cuda: bool, sel: Selection,
            produced_later: bool = False):
    """Config, shards (``{split: Shard}``), the init's path and weights, and the DeepSpeed
    config, checked for ``world_size`` ranks before any process group or Slurm job exists.
    ``produced_later``: the earlier stages' backbones are outputs of jobs not yet run; check
    only what exists now."""
    cfg = config.load(config_path, overrides, config.FinetuneConfig)
    config.check_finetune(cfg, sel.task, world_size)
    ds_config = config.deepspeed_config(cfg, world_size, on_cuda,
                                        batch_size=cfg.task(sel.task).batch_size)
    task = TASKS[sel.task]
    shards = dict.fromkeys(("train", "valid", "test"))
    if not cfg.data.synthetic:
        shards = {s: open_shard(Path(cfg.data.root), task.dataset, s) for s in shards}
        for shard in shards.values():
            task.check(shard)
        kept = subset_size(shards["train"].count, cfg.data.train_fraction)
        if cfg.data.train_fraction < 1 and kept < cfg.task(sel.task).batch_size:
            raise config.ConfigError(
                f"data.train_fraction: {cfg.data.train_fraction} of the {shards['train'].count} "
                f"{sel.task} training images is {kept}, less than one batch of "
                f"{cfg.task(sel.task).batch_size}")
    path = init_path(cfg, sel)
    weights = None
    if path and not (produced_later and sel.init in MADE_BY):
        key = f"pretrained.{PRETRAINED_KEY.get(sel.init, 'imagenet')}"
        hint = f"run {MADE_BY[sel.init]} first" if sel.init in MADE_BY else "see its docs"
        weights = common.backbone_weights(path, sel.arch, key, hint)
    return cfg, shards, path, weights, ds_config


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for i, (t, init, b) in enumerate(GRID):
            print(f"{i:2d} {t:9s} {init:8s} {b}")
        return 0
    return common.main("finetune", lambda: run(args))


def run(args) -> int:
    env, on_cuda = dist.dist_env(), torch.cuda.is_available()
    sel = selection(args)
    cfg, shards, path, init, ds_config = prepare(args.config, args.overrides, env.world_size,
                                                 on_cuda, sel)
    out = output_dir(cfg, sel)
    if args.check:
        where = f"index {GRID.index(tuple(sel))}: " if args.grid_index is not None else ""
        print(f"finetune: {where}task {sel.task}, init {sel.init} ({path or 'Kaiming'}), "
              f"backbone {sel.backbone}, {env.world_size} rank(s), output {out}", flush=True)
        return 0
    with common.started("finetune", cfg, env, on_cuda, out, RESUMABLE_CHANGES) as start:
        per_rank = cfg.task(sel.task).batch_size // env.world_size
        loaders = {split: task_loader(shard, per_rank, TASKS[sel.task], cfg.data,
                                      train=split == "train", device=dist.train_device(),
                                      fraction=cfg.data.train_fraction if split == "train" else 1)
                   for split, shard in shards.items()}
        return train(cfg, start, sel, loaders, (path, init), ds_config)


def better(score: float, best: dict | None) -> bool:
    """Model selection: higher is better, and any number beats NaN (an undefined AUC)."""
    if best is None:
        return True
    return not math.isnan(score) and (math.isnan(best["score"]) or score > best["score"])


def train(cfg, start, sel, loaders, init, ds_config) -> int:
    out, rank, task, tcfg = start.ckpt.run_dir, start.env.rank, TASKS[sel.task], cfg.task(sel.task)
    device, on_cuda = dist.train_device(), start.on_cuda
    bf16 = config.resolve_precision(cfg.run.precision, on_cuda) == "bf16"
    torch.manual_seed(cfg.run.seed)
    trunk = build_backbone(sel.arch)
    init_file, init_state = init
    if init_state is not None:
        load_imagenet_into(trunk, init_state)
    channels = trunk_channels(sel.arch)
    net = MultiTaskNet(trunk, {task.name: task.head(channels, cfg.model)}).to(device)
    if start.env.world_size > 1 and cfg.model.sync_bn:
        sync_batchnorm(net, on_cuda)
    engine = deepspeed_engine(net, [{"params": list(net.parameters())}], ds_config,
                              momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)

    (lo, hi), = dist.spread([len(loaders["train"])])
    if lo != hi:
        raise StageError(f"ranks disagree on steps per epoch ({lo} vs {hi})")
    per_epoch = min(lo, cfg.run.max_steps_per_epoch or lo)
    total = tcfg.epochs * per_epoch
    history, best = [], None
    loop = TrainLoop("finetune", cfg, start, engine, net, {"per_epoch": per_epoch},
                     total=total, end=total, state=lambda: {"history": history, "best": best})
    history += loop.shared.get("history", [])
    best = loop.shared.get("best")
    loop.say(f"finetune: {sel.task} from {sel.init} ({init_file or 'Kaiming init'}), "
             f"{sel.arch}, {start.env.world_size} rank(s), {tcfg.epochs} epochs x {per_epoch} "
             f"steps, {'resuming at step ' + str(loop.step) if loop.resumed else 'new run'} in "
             f"{out}")
    unused = [] if cfg.data.synthetic else getattr(
        task, "unused_categories", lambda _: [])(loaders["train"].shard)
    if unused:
        loop.say(f"finetune: {task.name}: boxes of {', '.join(unused)} are not learned or "
                 f"scored (not one of {', '.join(task.classes)})")

    with loop:
        for epoch in range(tcfg.epochs):
            first, last = epoch * per_epoch, (epoch + 1) * per_epoch
            lr = tcfg.lr * cfg.optim.lr_gamma ** (epoch // tcfg.lr_step_epochs)
            if loop.step < last:
                schedule.set_lr(engine.optimizer, lr)
                net.train()
                loop.position = f"epoch {epoch} "
                batches = loaders["train"].epoch_batches(epoch, loop.step - first)
                with loop.batches(batches) as batches:
                    for batch in batches:
                        images = batch["image"].to(device, non_blocking=True)
                        loss = engine(task.name, images, task.targets(batch, device))
                        loop.train_step(loss, lr, tcfg.batch_size)
                        code = loop.end_step()
                        if code:
                            return code
                        if loop.step == last:
                            break
            if len(history) == epoch:  # not yet validated (also after a kill right here)
                scores = evaluate(net, task, loaders["valid"], device, cfg.eval, bf16)
                history.append({"epoch": epoch, "step": loop.step, **scores})
                loop.log.scalars(loop.step, "valid/", **scores)
                if better(scores[task.headline], best):
                    best = {"epoch": epoch, "score": scores[task.headline], "valid": scores}
                    if rank == 0:
                        checkpoint.save(out / "best.pth", net.state_dict())
                loop.say(f"finetune: epoch {epoch} valid " + ", ".join(
                    f"{k} {v:.4f}" for k, v in scores.items()) +
                    (" (best)" if best["epoch"] == epoch else ""))
                loop.save()
        dist.barrier()
        net.load_state_dict(checkpoint.load(out / "best.pth"))
        keeper = (SampleKeeper(cfg.eval.samples, cfg.data.mean, cfg.data.std)
                  if task.kind == "segmentation" and cfg.eval.samples and rank == 0 else None)
        records = evaluate_records(net, task, loaders["test"], device, bf16, keeper)
        scores, extra = task.test_metrics(records, cfg.eval)
        if rank == 0:
            results = {"task": sel.task, "kind": task.kind, "init": sel.init,
                       "backbone": sel.backbone, "arch": sel.arch, "best_epoch": best["epoch"],
                       "epochs": tcfg.epochs, "train_fraction": cfg.data.train_fraction,
                       "selected_by": task.headline, "valid": best["valid"],
                       "test": {**scores, "n": len(records)}, **extra,
                       "init_weights": init_file, "history": history}
            checkpoint.save_json(out / "results.json", results)
            loop.log.scalars(loop.step, "test/", **{k: v for k, v in scores.items()
                                                    if isinstance(v, float)})
            loop.log.text("test/results", "```\n" + json.dumps(results["test"], indent=1) +
                          "\n```", loop.step)
            if keeper is not None and keeper.kept["images"]:
                keeper.save(out / "samples.npz")
        loop.say(f"finetune: {sel.name} test " + ", ".join(
            f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)) +
            f" (best epoch {best['epoch']}); {out / 'results.json'}")
    return 0


class SampleKeeper:
    """The first ``n`` images this rank evaluates, with true and predicted masks, as uint8 (for
    the report's overlays; kept during the test pass rather than by a second one)."""

    def __init__(self, n: int, mean: float, std: float):
        self.n, self.mean, self.std = n, mean, std
        self.kept = {"images": [], "masks": [], "preds": []}

    def __call__(self, batch, probs) -> None:
        room = self.n - len(self.kept["images"])
        if room <= 0:
            return
        gray = batch["image"][:room, 0].float().cpu().numpy() * self.std + self.mean
        self.kept["images"] += list(np.clip(np.rint(gray), 0, 255).astype(np.uint8))
        self.kept["masks"] += list(batch["mask"][:room].cpu().numpy().astype(np.uint8))
        self.kept["preds"] += list(probs[:room].argmax(dim=1).cpu().numpy().astype(np.uint8))

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez_compressed(tmp, **{k: np.stack(v) for k, v in self.kept.items() if v})
        tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
