"""MultiMix (Haque et al., ISBI 2021 / MELBA 2021): pneumonia classification and lung
segmentation learned together, semi-supervised, from any of our backbones.

    python -m muscle_hpc.stages.multimix --init scratch|imagenet|mdmoco|muscle--|muscle
        --backbone r18|r50 [--fraction F] [--config F] [--check] [key=value ...]

Two sources, each with one kind of label: the classification task's training split (labels
on a patient-grouped ``--fraction`` of it, the fine-tune stage's subset; the rest used without
labels) and the segmentation task's (masks on the same fraction; the rest without). Every
step reads five streams of ``multimix.batch_size`` images each (labelled masks, unlabelled
segmentation images, labelled classes with the weak view, and the weak and strong views of
unlabelled classification images) and runs them through the network in one forward, as the
authors do; the loss is ``muscle_hpc.config.multimix.MultiMixSection``'s. An epoch is one pass
over the unlabelled classification images. After every epoch both tasks are scored on their
valid splits; the epoch with the best mean of the two headline metrics (AUC, Dice) is kept
in ``best.pth`` and scored once on the test splits, with bootstrap CIs. Everything lands in
``run.root/multimix/<cls>+<seg>_<backbone>_<init>[_<N>pct]/``: a ``results.json`` per task
(``<task>/results.json``, the fine-tune stage's schema, ``method`` ``multimix``), ``best.pth``,
the rolling ``checkpoint.pth``, TensorBoard events. Resume and exit status as for the other
stages.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from muscle_hpc import checkpoint, config, dist, registry, schedule, tasks
from muscle_hpc.config.multimix import MultiMixConfig, check_multimix
from muscle_hpc.data import semi
from muscle_hpc.data.loaders import task_loader
from muscle_hpc.data.prefetch import prefetch
from muscle_hpc.data.shards import open_shard
from muscle_hpc.ds_engine import bf16_enabled, deepspeed_config, deepspeed_engine
from muscle_hpc.engine import TrainLoop
from muscle_hpc.evaluate import evaluate, evaluate_records
from muscle_hpc.models.build import build_multimix
from muscle_hpc.models.multimix import pseudo_label_loss, seg_kl, soft_dice_loss
from muscle_hpc.models.norm import sync_batchnorm
from muscle_hpc.registry import MultiMixRun
from muscle_hpc.results import record
from muscle_hpc.stages import common
from muscle_hpc.tasks.base import TaskKind

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "multimix.yaml"
RESUMABLE_CHANGES = ("run.", "data.num_workers", "eval.")
STREAMS = ("seg_labelled", "seg_unlabelled", "cls_labelled", "cls_unlabelled")
SPLITS = ("train", "valid", "test")


def add_arguments(p) -> None:
    p.add_argument("--init", choices=registry.INIT_NAMES, required=True)
    p.add_argument("--backbone", choices=registry.BACKBONE_NAMES, required=True)
    p.add_argument("--fraction", type=float, default=1.0, metavar="F",
                   help="the share of each training split whose labels are used (0 < F <= 1; "
                        "the fine-tune stage's patient-grouped subsets); the rest is used "
                        "without labels")
    p.add_argument("--check", action="store_true",
                   help="resolve the config, shards and initial weights, say what would run")


def parse_args(argv):
    return common.parse_args("multimix", __doc__, argv, "multimix.threshold=0.9",
                             config_default=str(DEFAULT_CONFIG), add_arguments=add_arguments)


def load(config_path, overrides) -> MultiMixConfig:
    return config.load(config_path, overrides, MultiMixConfig)


@dataclass(frozen=True)
class MultiMixInputs(common.Prepared):
    """``shards``: ``{task: {split: Shard}}``; ``cls``/``seg``: the two tasks' behaviour;
    ``init_path``/``init_weights``: the encoder's starting backbone ('' and None: Kaiming)."""

    cls: TaskKind
    seg: TaskKind
    init_path: str
    init_weights: dict | None


def prepare(cfg: MultiMixConfig, world_size: int, on_cuda: bool, run: MultiMixRun
            ) -> MultiMixInputs:
    """The run's inputs, checked before any process group exists. Raises ``ConfigError`` or
    ``ShardError``."""
    if not 0 < run.fraction <= 1:
        raise config.ConfigError(f"--fraction: must be in (0, 1], got {run.fraction}")
    check_multimix(cfg, world_size)
    m = cfg.multimix
    ds_config = deepspeed_config(cfg.run, m.batch_size, world_size, on_cuda)
    shards, kinds = {}, {}
    for name in (m.cls_task, m.seg_task):
        defn = config.task_definition(name, cfg.tasks[name])
        shards[name] = {s: open_shard(Path(cfg.data.root), defn.dataset, s) for s in SPLITS}
        names = shards[name]["train"].class_names(defn.kind)
        kinds[name] = tasks.build(config.with_classes(defn, names))
        kinds[name].checked(shards[name])
        train = shards[name]["train"]
        kept = len(semi.labelled_indices(train, run.fraction, cfg.data.seed))
        rest = len(semi.unlabelled_indices(train, run.fraction, cfg.data.seed))
        if min(kept, rest) < m.batch_size:
            raise config.ConfigError(
                f"--fraction: {run.fraction:g} of the {train.count} {name} training images "
                f"leaves {kept} labelled and {rest} unlabelled, less than one batch of "
                f"{m.batch_size} (multimix.batch_size)")
    path = common.init_path(cfg, run)
    weights = common.init_weights(path, run) if path else None
    return MultiMixInputs(cfg, ds_config, shards, kinds[m.cls_task], kinds[m.seg_task],
                          path or "", weights)


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.main("multimix", lambda: start(args))


def start(args) -> int:
    env, on_cuda = dist.dist_env(), torch.cuda.is_available()
    cfg = load(args.config, args.overrides)
    m = cfg.multimix
    run = MultiMixRun(args.init, args.backbone, args.fraction, m.cls_task, m.seg_task)
    inputs = prepare(cfg, env.world_size, on_cuda, run)
    out = run.dir(cfg.run.root)
    if args.check:
        counts = {t: len(semi.labelled_indices(s["train"], run.fraction, cfg.data.seed))
                  for t, s in inputs.shards.items()}
        print(f"multimix: {m.cls_task} + {m.seg_task}, init {run.init} "
              f"({inputs.init_path or 'Kaiming'}), backbone {run.backbone}, fraction "
              f"{run.fraction:g} (labelled: " + ", ".join(f"{t} {n}" for t, n in counts.items())
              + f"), {env.world_size} rank(s), output {out}", flush=True)
        return 0
    with common.started("multimix", cfg, env, on_cuda, out, RESUMABLE_CHANGES) as started:
        return train(cfg, started, run, inputs)


def streams(cfg: MultiMixConfig, run: MultiMixRun, shards: dict, per_rank: int) -> dict:
    """The four training streams: labelled (with their labels or masks) and unlabelled (the
    image alone) of each task's training split."""
    m, seed, workers = cfg.multimix, cfg.data.seed, cfg.data.num_workers
    out = {}
    for prefix, task, field in (("seg", m.seg_task, "mask"), ("cls", m.cls_task, "label")):
        train = shards[task]["train"]
        out[f"{prefix}_labelled"] = semi.Stream(
            train, per_rank, (field,), semi.labelled_indices(train, run.fraction, seed), seed,
            workers)
        out[f"{prefix}_unlabelled"] = semi.Stream(
            train, per_rank, (), semi.unlabelled_indices(train, run.fraction, seed), seed,
            workers)
    return out


def step_batches(cfg: MultiMixConfig, streams: dict, step: int, end: int):
    """The steps ``step`` to ``end`` (exclusive): each a dict of Z-scored images (``seg_l``,
    ``seg_u``, ``cls_l`` weak, ``weak``, ``strong``) and the labelled ``mask`` and ``label``.
    The segmentation images are not augmented (the authors' choice)."""
    its = {name: s.batches(step) for name, s in streams.items()}
    mean, std, seed = cfg.data.mean, cfg.data.std, cfg.data.seed
    try:
        for _ in range(step, end):
            (_, seg_l), (_, seg_u), (pass_l, cls_l), (pass_u, cls_u) = (
                next(its[name]) for name in STREAMS)
            yield {"seg_l": semi.z_scored(seg_l["image"], mean, std),
                   "mask": torch.from_numpy(seg_l["mask"].astype(np.int64)),
                   "seg_u": semi.z_scored(seg_u["image"], mean, std),
                   "cls_l": semi.z_scored(semi.views(cls_l, "weak", seed, pass_l), mean, std),
                   "label": torch.from_numpy(cls_l["label"]),
                   "weak": semi.z_scored(semi.views(cls_u, "weak", seed, pass_u), mean, std),
                   "strong": semi.z_scored(semi.views(cls_u, "strong", seed, pass_u), mean,
                                           std)}
    finally:
        for it in its.values():
            it.close()


def losses(cfg: MultiMixConfig, engine, batch: dict, device) -> dict[str, torch.Tensor]:
    """One forward of the five streams, and each term of the loss (``total`` their weighted
    sum). Only the labelled streams' labels reach a loss; the unlabelled streams carry none."""
    m = cfg.multimix
    parts = [batch[k].to(device, non_blocking=True)
             for k in ("seg_l", "seg_u", "cls_l", "weak", "strong")]
    sizes = [len(p) for p in parts]
    logits, masks = engine(torch.cat(parts))
    seg_l, seg_u, _, _, _ = masks.split(sizes)
    _, _, cls_l, weak, strong = logits.split(sizes)
    out = {"ce": F.cross_entropy(cls_l.float(), batch["label"].to(device)),
           "dice": soft_dice_loss(seg_l, batch["mask"].to(device))}
    out["pseudo"], confident = pseudo_label_loss(weak, strong, m.threshold)
    out["kl"] = seg_kl(seg_l, seg_u)
    out["total"] = (m.cls_weight * out["ce"] + m.dice_weight * out["dice"]
                    + m.pseudo_weight * out["pseudo"] + m.kl_weight * out["kl"])
    out["confident"] = confident.float().mean()
    return out


def selection_score(scores: dict[str, dict], heads: dict[str, str]) -> float:
    """The mean of the two tasks' headline valid scores (both higher-better: AUC, Dice); NaN
    when either is."""
    return float(np.mean([scores[t][h] for t, h in heads.items()]))


def train(cfg: MultiMixConfig, start, run: MultiMixRun, inputs: MultiMixInputs) -> int:
    out, rank, world = start.ckpt.run_dir, start.env.rank, start.env.world_size
    m = cfg.multimix
    device, on_cuda = dist.train_device(), start.on_cuda
    bf16 = bf16_enabled(cfg.run, on_cuda)
    per_rank = m.batch_size // world
    cls, seg = inputs.cls, inputs.seg
    train_streams = streams(cfg, run, inputs.shards, per_rank)
    evals = {t.name: {s: task_loader(inputs.shards[t.name][s], per_rank, t, cfg.data,
                                     train=False, device=device) for s in ("valid", "test")}
             for t in (cls, seg)}
    torch.manual_seed(cfg.run.seed)
    net = build_multimix(run.arch, m, len(cls.classes), len(seg.classes),
                         inputs.init_weights).to(device)
    if world > 1:
        sync_batchnorm(net, on_cuda)
    engine = deepspeed_engine(net, [{"params": list(net.parameters())}], inputs.ds_config,
                              weight_decay=cfg.optim.weight_decay, adam=True)
    steps = len(train_streams["cls_unlabelled"])
    per_epoch = min(steps, cfg.run.max_steps_per_epoch or steps)
    total = cfg.optim.epochs * per_epoch
    history, best = [], None
    loop = TrainLoop("multimix", cfg, start, engine, net, {"per_epoch": per_epoch},
                     total=total, end=total, state=lambda: {"history": history, "best": best})
    history += loop.shared.get("history", [])
    best = loop.shared.get("best")
    heads = {cls.name: cls.headline, seg.name: seg.headline}
    counts = ", ".join(f"{k} {s.examples}" for k, s in train_streams.items())
    loop.say(f"multimix: {cls.name} + {seg.name} from {run.init} "
             f"({inputs.init_path or 'Kaiming init'}), {run.arch}, bridge {m.bridge}, "
             f"images: {counts}; {world} rank(s), {cfg.optim.epochs} epochs x {per_epoch} "
             f"steps, {'resuming at step ' + str(loop.step) if loop.resumed else 'new run'} "
             f"in {out}")
    last_terms: dict[str, torch.Tensor] = {}

    def report() -> str:
        """Each term of the loss and the share of confident pseudo-labels, averaged over
        ranks."""
        names = [k for k in last_terms if k != "total"]
        values = torch.stack([last_terms[k].detach().float() for k in names]).cpu()
        if world > 1:
            torch.distributed.all_reduce(values)
            values /= world
        scalars = dict(zip(names, values.tolist()))
        loop.log.scalars(loop.step, "train/", **scalars)
        return ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()) + " "

    with loop:
        for epoch in range(cfg.optim.epochs):
            last = (epoch + 1) * per_epoch
            lr = cfg.optim.lr * cfg.optim.lr_gamma ** (epoch // cfg.optim.lr_step_epochs)
            if loop.step < last:
                schedule.set_lr(engine.optimizer, lr)
                net.train()
                loop.position = f"epoch {epoch} "
                batches = prefetch(step_batches(cfg, train_streams, loop.step, last), 2, device)
                with loop.batches(batches) as batches:
                    for batch in batches:
                        last_terms = losses(cfg, engine, batch, device)
                        loop.train_step(last_terms["total"], lr, 5 * m.batch_size, report)
                        code = loop.end_step()
                        if code:
                            return code
                        if loop.step == last:
                            break
            if len(history) == epoch:
                scores = {t.name: evaluate(net, t, evals[t.name]["valid"], device, cfg.eval,
                                           bf16) for t in (cls, seg)}
                score = selection_score(scores, heads)
                history.append({"epoch": epoch, "step": loop.step, **scores})
                for name, s in scores.items():
                    loop.log.scalars(loop.step, f"valid/{name}/", **s)
                if common.better(score, best):
                    best = {"epoch": epoch, "score": score, "valid": scores}
                    if rank == 0:
                        checkpoint.save(out / "best.pth", net.state_dict())
                loop.say(f"multimix: epoch {epoch} valid " + "; ".join(
                    f"{t} " + ", ".join(f"{k} {v:.4f}" for k, v in s.items())
                    for t, s in scores.items()) + (" (best)" if best["epoch"] == epoch else ""))
                loop.save()
        dist.barrier()
        net.load_state_dict(checkpoint.load(out / "best.pth"))
        for task in (cls, seg):
            records = evaluate_records(net, task, evals[task.name]["test"], device, bf16)
            scores, extra = task.test_metrics(records, cfg.eval)
            if rank == 0:
                identity = registry.FinetuneRun(task.name, run.init, run.backbone, "finetune",
                                                run.fraction)
                results = record(identity, task.definition, {**scores, "n": len(records)},
                                 method="multimix", multimix=run.name, best_epoch=best["epoch"],
                                 epochs=cfg.optim.epochs, valid=best["valid"][task.name],
                                 **extra, init_weights=inputs.init_path or None,
                                 history=history)
                (out / task.name).mkdir(exist_ok=True)
                checkpoint.save_json(out / task.name / "results.json", results)
                loop.log.text(f"test/{task.name}", "```\n" + json.dumps(results["test"],
                                                                        indent=1) + "\n```",
                              loop.step)
            loop.say(f"multimix: {task.name} test " + ", ".join(
                f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))
        if rank == 0:
            common.export_backbone(net, cfg, loop.step, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
