"""Fine-tuning (MUSCLE stage 3): one task, one initial backbone, one architecture.

    python -m muscle_hpc.stages.finetune --task pneumonia|mura|lung|tbx|YOURS
        --init scratch|imagenet|mdmoco|muscle--|muscle --backbone r18|r50
        [--protocol finetune|linear] [--fraction F] [--config F] [key=value ...]
    python -m muscle_hpc.stages.finetune --grid-index N [...]   (one element of the config's grid)
    python -m muscle_hpc.stages.finetune --list [--config F]    (the grid, index by index)

A task is one of the config's ``tasks``: the paper's four (their definitions in the registry)
or any the config defines (dataset, kind, classes; see the README, Your own data). The backbone
(Kaiming init, torchvision's ImageNet weights, or the earlier stages' exports found under
``run.root``) gets the task's head and is trained with SGD, weight decay and a step LR decay:
the whole network, or with ``--protocol linear`` the head alone on the frozen backbone (a
linear probe), on all of the training split or on a patient-grouped ``--fraction`` of it.
After every epoch the valid split is scored; the best epoch by the task's headline metric
(AUC, Dice, mAP, MAE) is kept in ``best.pth``, and at the end it is scored once on the test
split, with bootstrap 95% CIs where the kind has them. Everything lands in
``run.root/finetune/<task>_<backbone>_<init>[_linear][_<N>pct]/``: ``results.json``,
``best.pth``, the rolling ``checkpoint.pth``, TensorBoard events, and for segmentation
``samples.npz`` (a few test images with true and predicted masks, for the report's overlays).
``--check`` resolves the inputs and says what would run, without training. Resume and exit
status as for the other stages.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from muscle_hpc import checkpoint, config, dist, registry, schedule, tasks
from muscle_hpc.data.loaders import task_loader, train_subset
from muscle_hpc.data.shards import open_shard
from muscle_hpc.ds_engine import bf16_enabled, deepspeed_config, deepspeed_engine
from muscle_hpc.engine import TrainLoop
from muscle_hpc.evaluate import evaluate, evaluate_records
from muscle_hpc.models.build import build_multitask
from muscle_hpc.models.norm import sync_batchnorm
from muscle_hpc.registry import FinetuneRun
from muscle_hpc.results import record
from muscle_hpc.stages import common
from muscle_hpc.tasks.base import TaskKind

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "finetune.yaml"
RESUMABLE_CHANGES = ("run.", "data.num_workers", "eval.")


def grid(cfg) -> list[FinetuneRun]:
    """The config's grid (``grid`` section), in array-index order: backbone-major, then
    protocol, fraction, task, init (the paper's defaults give ``registry.GRID``)."""
    g = cfg.grid
    return [FinetuneRun(t, i, b, p, f) for b in g.backbones for p in g.protocols
            for f in g.fractions for t in g.tasks for i in g.inits]


def add_arguments(p) -> None:
    p.add_argument("--task", help="a task of the config: the paper's "
                                  f"({', '.join(registry.TASK_NAMES)}) or one under tasks")
    p.add_argument("--init", choices=registry.INIT_NAMES)
    p.add_argument("--backbone", choices=registry.BACKBONE_NAMES)
    p.add_argument("--protocol", choices=registry.PROTOCOLS, default="finetune",
                   help="finetune: train the whole network (default); linear: a linear probe, "
                        "the backbone frozen (batch-norm statistics too), only the head trained")
    p.add_argument("--fraction", type=float, default=1.0, metavar="F",
                   help="train on this share of the training split, 0 < F <= 1 (a seeded, "
                        "patient-grouped subset, the same for every init; nested: 0.01 lies "
                        "in 0.1); valid and test stay whole")
    p.add_argument("--grid-index", type=int, metavar="N",
                   help="element N of the config's grid (see --list) instead of --task, "
                        "--init, --backbone, --protocol, --fraction: what a Slurm array index "
                        "selects")
    p.add_argument("--list", action="store_true", help="print the grid and exit")
    p.add_argument("--check", action="store_true",
                   help="resolve the config, shards and initial weights, say what would run")


def parse_args(argv):
    return common.parse_args("finetune", __doc__, argv, "tasks.lung.epochs=10",
                             config_default=str(DEFAULT_CONFIG), add_arguments=add_arguments)


def selection(args, cfg) -> FinetuneRun:
    """What the arguments name, in ``cfg``'s grid for ``--grid-index``. Raises
    ``ConfigError``."""
    flags = (args.task, args.init, args.backbone)
    if args.grid_index is not None:
        elements = grid(cfg)
        if any(flags) or args.protocol != "finetune" or args.fraction != 1:
            raise config.ConfigError("--grid-index selects task, init, backbone, protocol and "
                                     "fraction; do not also give them")
        if not 0 <= args.grid_index < len(elements):
            raise config.ConfigError(f"--grid-index: {args.grid_index} is not in "
                                     f"0-{len(elements) - 1} (see --list)")
        return elements[args.grid_index]
    if not all(flags):
        raise config.ConfigError("give --task, --init and --backbone, or --grid-index")
    if not 0 < args.fraction <= 1:
        raise config.ConfigError(f"--fraction: must be in (0, 1], got {args.fraction}")
    return FinetuneRun(*flags, args.protocol, args.fraction)


def output_dir(cfg, sel: FinetuneRun) -> Path:
    return sel.dir(cfg.run.root)


def load(config_path, overrides):
    """The fine-tune config, its tasks' definitions and its grid checked. Raises
    ``ConfigError``."""
    cfg = config.load(config_path, overrides, config.FinetuneConfig)
    config.check_finetune(cfg)
    return cfg


@dataclass(frozen=True)
class FinetuneInputs(common.Prepared):
    """``shards``: ``{split: Shard}`` of the selected task; ``task``: its behaviour (its classes
    taken from the shards where the config lists none); ``init_path`` and ``init_weights``: the
    backbone file ('' and None: Kaiming init; None alone: a file made later, not read yet)."""

    task: TaskKind
    init_path: str
    init_weights: dict | None


def prepare(cfg, world_size: int, on_cuda: bool, sel: FinetuneRun,
            produced_later: bool = False) -> FinetuneInputs:
    """The selected grid element's inputs from a config ``load`` checked, for ``world_size``
    ranks.
    ``produced_later``: the earlier stages' backbones are outputs of jobs not yet run; check
    only what exists now. Raises ``ConfigError`` or ``ShardError``."""
    config.check_finetune_task(cfg, sel.task, world_size)
    batch = cfg.task(sel.task).batch_size
    ds_config = deepspeed_config(cfg.run, batch, world_size, on_cuda)
    defn = cfg.definition(sel.task)
    shards = dict.fromkeys(("train", "valid", "test"))
    if not cfg.data.synthetic:
        shards = {s: open_shard(Path(cfg.data.root), defn.dataset, s) for s in shards}
    names = None if cfg.data.synthetic else shards["train"].class_names(defn.kind)
    if names is None and not defn.classes and defn.kind != "regression":
        raise config.ConfigError(f"tasks.{sel.task}.classes: list them (its "
                                 f"{'synthetic data has' if cfg.data.synthetic else 'shards have'}"
                                 f" no class names to take)")
    task = tasks.build(config.with_classes(defn, names))
    config.check_flips(task.definition, cfg.data.flip_prob)
    if not cfg.data.synthetic:
        task.checked(shards)
        kept = len(train_subset(shards["train"], sel.fraction, cfg.data.seed))
        if sel.fraction < 1 and kept < batch:
            raise config.ConfigError(
                f"--fraction: {sel.fraction:g} of the {shards['train'].count} {sel.task} "
                f"training images is {kept}, less than one batch of {batch}")
    path = common.init_path(cfg, sel)
    weights = None
    if path and not (produced_later and sel.init in common.MADE_BY):
        weights = common.init_weights(path, sel)
    return FinetuneInputs(cfg, ds_config, shards, task, path, weights)


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.main("finetune", lambda: print_grid(args) if args.list else run(args))


def print_grid(args) -> int:
    elements = grid(load(args.config, args.overrides))
    for i, sel in enumerate(elements):
        print(f"{i:3d} {sel.task:12s} {sel.init:8s} {sel.backbone:4s} {sel.protocol:8s} "
              f"{sel.fraction:g}")
    for bb in dict.fromkeys(sel.backbone for sel in elements):
        indices = [i for i, sel in enumerate(elements) if sel.backbone == bb]
        print(f"# {bb}: --array={indices[0]}-{indices[-1]}")
    return 0


def run(args) -> int:
    env, on_cuda = dist.dist_env(), torch.cuda.is_available()
    cfg = load(args.config, args.overrides)
    sel = selection(args, cfg)
    inputs = prepare(cfg, env.world_size, on_cuda, sel)
    task, shards, path = inputs.task, inputs.shards, inputs.init_path
    out = output_dir(cfg, sel)
    if args.check:
        where = f"index {args.grid_index}: " if args.grid_index is not None else ""
        images = cfg.data.synthetic or len(train_subset(shards["train"], sel.fraction,
                                                        cfg.data.seed))
        print(f"finetune: {where}task {sel.task}, init {sel.init} ({path or 'Kaiming'}), "
              f"backbone {sel.backbone}, {sel.protocol}, fraction {sel.fraction:g} "
              f"({images} training images), {env.world_size} rank(s), output {out}",
              flush=True)
        return 0
    with common.started("finetune", cfg, env, on_cuda, out, RESUMABLE_CHANGES) as start:
        per_rank = cfg.task(sel.task).batch_size // env.world_size
        loaders = {split: task_loader(shard, per_rank, task, cfg.data, train=split == "train",
                                      device=dist.train_device(),
                                      fraction=sel.fraction if split == "train" else 1)
                   for split, shard in shards.items()}
        return train(cfg, start, sel, task, loaders, (path, inputs.init_weights),
                     inputs.ds_config)


def train(cfg, start, sel, task, loaders, init, ds_config) -> int:
    out, rank, tcfg = start.ckpt.run_dir, start.env.rank, cfg.task(sel.task)
    linear = sel.protocol == "linear"
    n_train = cfg.data.synthetic or loaders["train"].examples  # over all ranks
    device, on_cuda = dist.train_device(), start.on_cuda
    bf16 = bf16_enabled(cfg.run, on_cuda)
    torch.manual_seed(cfg.run.seed)
    init_file, init_state = init
    net = build_multitask(sel.arch, {task.name: task}, cfg.model, init_state).to(device)
    if linear:  # the probe: no gradient, no weight decay, no batch statistics reach it
        net.backbone.requires_grad_(False)
    elif start.env.world_size > 1 and cfg.model.sync_bn:
        sync_batchnorm(net, on_cuda)
    trained = [p for p in net.parameters() if p.requires_grad]
    engine = deepspeed_engine(net, [{"params": trained}], ds_config,
                              momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)

    steps, = common.steps_per_epoch({f"{sel.task}'s training split": loaders["train"]}).values()
    per_epoch = min(steps, cfg.run.max_steps_per_epoch or steps)
    total = tcfg.epochs * per_epoch
    history, best = [], None
    loop = TrainLoop("finetune", cfg, start, engine, net, {"per_epoch": per_epoch},
                     total=total, end=total, state=lambda: {"history": history, "best": best})
    history += loop.shared.get("history", [])
    best = loop.shared.get("best")
    loop.say(f"finetune: {sel.task} from {sel.init} ({init_file or 'Kaiming init'}), "
             f"{sel.arch}, {'linear probe' if linear else 'whole network'}, "
             f"{n_train} training images"
             f"{f' ({sel.fraction:g} of the split)' if sel.fraction < 1 else ''}, "
             f"{start.env.world_size} rank(s), {tcfg.epochs} epochs x {per_epoch} "
             f"steps, {'resuming at step ' + str(loop.step) if loop.resumed else 'new run'} in "
             f"{out}")
    if not cfg.data.synthetic and (note := task.ignored(loaders["train"].shard)):
        loop.say(f"finetune: {note}")

    with loop:
        for epoch in range(tcfg.epochs):
            first, last = epoch * per_epoch, (epoch + 1) * per_epoch
            lr = tcfg.lr * cfg.optim.lr_gamma ** (epoch // tcfg.lr_step_epochs)
            if loop.step < last:
                schedule.set_lr(engine.optimizer, lr)
                net.train()
                if linear:
                    net.backbone.eval()
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
                if common.better(scores[task.headline], best,
                                 task.headline in registry.LOWER_IS_BETTER):
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
            results = record(sel, task.definition, {**scores, "n": len(records)},
                             best_epoch=best["epoch"], epochs=tcfg.epochs, train_images=n_train,
                             valid=best["valid"], **extra, init_weights=init_file,
                             history=history)
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
