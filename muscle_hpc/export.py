"""Write a run's backbone in the formats users load: torchvision, safetensors, a hub folder.

    python -m muscle_hpc.export RUN_DIR_OR_CHECKPOINT [--format torchvision|safetensors|hub ...]
        [--out FILE] [--hub-dir DIR] [--encoder query|key] [--size WxH]

Default: ``backbone_torchvision.pth`` and ``backbone_torchvision.safetensors`` in the run
directory, the same tensors twice (``muscle_hpc.weights`` says what each format holds);
``--format hub`` writes the hub folder (``RUN_DIR/hub``: weights, timm's ``config.json`` and a
``README.md`` model card written from what the run knows, ``muscle_hpc.modelcard``).

The source is any stage's checkpoint: MD-MoCo's (the query encoder, the backbone that
transfers, as in MoCo's own linear evaluation; ``--encoder key`` for the momentum encoder),
the continual stage's (MUSCLE, MUSCLE⁻⁻) or a fine-tune's (its trunk, without the task's
head). The stages write the two files themselves when they finish; this command does it for
any checkpoint, e.g. one taken mid-run, and writes the hub folder.

The preprocessing recorded with the weights is the run's: the Z-score of its config and the
image size of the shards it read (their manifests under ``data.root``); ``--size`` states the
size where those shards are not reachable from here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from muscle_hpc import checkpoint, registry, weights
from muscle_hpc.data.shards import ShardError, read_manifest
from muscle_hpc.models.backbone import build_backbone, export_torchvision
from muscle_hpc.models.heads import trunk_channels
from muscle_hpc.provenance import read as provenance_entries
from muscle_hpc.weights import Preprocessing, Published, WeightsError

PREFIXES = {"query": "encoder_q.", "key": "encoder_k."}
TRUNK_PREFIX = "backbone."  # MultiTaskNet's (continual, fine-tune) and MultiMixNet's
FORMATS = ("torchvision", "safetensors", "hub")
DEFAULT_FORMATS = ("torchvision", "safetensors")


def stage_of(ckpt: dict) -> str:
    """Which stage wrote ``ckpt``, from what its config holds."""
    cfg = ckpt["config"]
    if "cl" in cfg:
        return "continual"
    if "multimix" in cfg:
        return "multimix"
    if "grid" in cfg:
        return "finetune"
    return "mdmoco"


def method_of(stage: str, cfg: dict) -> str:
    """The method's name as the report and the fine-tune inits say it."""
    if stage == "continual":
        return cfg["cl"]["method"]
    return {"mdmoco": "mdmoco", "finetune": "fine-tune", "multimix": "multimix"}[stage]


def trunk_state(ckpt: dict, encoder: str = "query") -> dict:
    """The trunk's tensors (torchvision names, 1-channel ``conv1``, no ``fc``) in a loaded
    stage checkpoint."""
    try:
        model, cfg = ckpt["model"], ckpt["config"]
    except (KeyError, TypeError):
        raise WeightsError("not a muscle-hpc stage checkpoint (no model/config in it)") from None
    if not isinstance(cfg, dict) or not isinstance(model, dict):
        raise WeightsError("not a muscle-hpc stage checkpoint (its model or config is not a "
                           "mapping)")
    prefix = PREFIXES[encoder] if stage_of(ckpt) == "mdmoco" else TRUNK_PREFIX
    if not any(k.startswith(prefix) for k in model):
        raise WeightsError(f"the checkpoint holds no {prefix[:-1]} weights")
    # float32 whatever the run trained in (bf16 keeps bf16 module weights): what users expect.
    return {k[len(prefix):]: v.float() if v.is_floating_point() else v for k, v in model.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith("fc.")}


def size_arg(text: str) -> tuple[int, int]:
    """``--size``: W×H as the converter reads its own ``--size`` (``convert.parse_size``)."""
    from data_prep.convert import ConvertError, parse_size  # the converter's imports: only here

    try:
        return parse_size(text)
    except ConvertError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run_datasets(cfg: dict) -> list[str]:
    """The datasets a stage's config reads: MD-MoCo's ``data.datasets``, the continual
    stage's tasks' (``data.tasks``), the fine-tune config's tasks', MultiMix's two tasks'."""
    data = cfg["data"]
    names = list(data.get("datasets") or [])
    names += [registry.TASKS[t].dataset for t in data.get("tasks") or [] if t in registry.TASKS]
    defined = cfg.get("tasks") or {}
    joined = cfg.get("multimix") or {}
    for task in (joined.get("cls_task"), joined.get("seg_task")) if joined else defined:
        entry = defined.get(task) or {}
        dataset = entry.get("dataset") if isinstance(entry, dict) else None
        names += [dataset or (registry.TASKS[task].dataset if task in registry.TASKS else None)]
    return [n for n in dict.fromkeys(names) if n]


def trained_size(cfg: dict) -> tuple[int, int]:
    """The image size the run's loaders read: the synthetic images' or the shards' (every
    manifest of the run's datasets under ``data.root`` agreeing on one)."""
    data = cfg["data"]
    if data.get("synthetic"):
        return int(data["synthetic_width"]), int(data["synthetic_height"])
    sizes = {}
    for name in run_datasets(cfg):
        try:
            sizes[name] = tuple(read_manifest(Path(data["root"]), name)["size"])
        except ShardError:
            continue
    if not sizes:
        raise WeightsError(f"the run's shards are not under data.root={data['root']} here, so "
                           f"the input size it trained at is unknown: give --size WxH")
    if len(set(sizes.values())) > 1:
        said = ", ".join(f"{n} {w}x{h}" for n, (w, h) in sizes.items())
        raise WeightsError(f"the run's datasets have different sizes ({said}): give --size WxH")
    return next(iter(sizes.values()))


def published(ckpt: dict, trunk: dict, encoder: str, size: tuple[int, int] | None,
              provenance: list[dict]) -> Published:
    """What goes with ``trunk`` (from ``trunk_state(ckpt, encoder)``): its architecture, the
    run's preprocessing (``size`` if given, else ``trained_size``) and its provenance."""
    cfg = ckpt["config"]
    if not isinstance(cfg.get("data"), dict):
        raise WeightsError("the checkpoint's config has no data section (not a stage's?)")
    w, h = size or trained_size(cfg)
    stage = stage_of(ckpt)
    code = provenance[-1].get("code", {}) if provenance else {}
    source = {"stage": stage, "method": method_of(stage, cfg), "step": ckpt.get("step"),
              "commit": code.get("commit"), "dirty": code.get("dirty")}
    if stage == "mdmoco":
        source["encoder"] = encoder
    data = cfg["data"]
    return Published(weights.trunk_arch(trunk),
                     Preprocessing(w, h, float(data["mean"]), float(data["std"])), source)


def write_hub(folder: Path, trunk: dict, info: Published, card: str) -> None:
    """The hub folder: the trunk as trained (``model.safetensors``), timm's ``config.json``,
    the model card; each file atomic, the card last and an old one removed first, so that a
    folder whose card exists is complete and of one export."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / weights.HUB_CARD).unlink(missing_ok=True)
    weights.save_safetensors(folder / weights.HUB_WEIGHTS, trunk, info)
    checkpoint.save_bytes(folder / weights.HUB_CONFIG,
                          json.dumps(hub_config(info), indent=2).encode())
    checkpoint.save_bytes(folder / weights.HUB_CARD, card.encode())


def hub_config(info: Published) -> dict:
    """timm's hub ``config.json`` for the trunk (``timm.create_model("local-dir:DIR",
    pretrained=True)`` reads it), with our exact preprocessing beside timm's: timm's mean and
    std are on the 0-1 scale, and its ``squash`` resize at crop 1.0 is a plain resize to the
    size (PIL's box filter, where the converter shrinks by OpenCV's area averaging)."""
    p = info.preprocessing
    return {
        "architecture": info.arch,
        "num_classes": 0,
        "num_features": trunk_channels(info.arch)["layer4"],
        "global_pool": "avg",
        "model_args": {"in_chans": 1},
        "pretrained_cfg": {
            "input_size": [1, p.height, p.width],
            "fixed_input_size": False,
            "interpolation": "box",
            "crop_pct": 1.0,
            "crop_mode": "squash",
            "mean": [p.mean / 255],
            "std": [p.std / 255],
            "num_classes": 0,
            "first_conv": "conv1",
            "classifier": "fc",
        },
        weights.METADATA_KEY: json.loads(info.to_json()),
    }


def export_run(ckpt: dict, run_dir: Path, formats=DEFAULT_FORMATS, *, out: Path | None = None,
               hub_dir: Path | None = None, encoder: str = "query",
               size: tuple[int, int] | None = None) -> tuple[Published, list[Path]]:
    """Write the trunk of ``ckpt`` (a stage checkpoint's ``model``, ``config``, ``step``) in
    ``formats``; returns what was published and the paths written. ``out``: the files' path,
    suffix aside (default ``RUN_DIR/backbone_torchvision``); ``hub_dir``: the hub folder
    (default ``RUN_DIR/hub``). Raises ``WeightsError`` before anything is written, and
    ``checkpoint.NoSpaceError`` for a file that did not fit."""
    trunk = trunk_state(ckpt, encoder)
    provenance = provenance_entries(run_dir / "provenance.json", move_unreadable=False)
    info = published(ckpt, trunk, encoder, size, provenance)
    card = None
    if "hub" in formats:
        from muscle_hpc import modelcard  # tensorboard and the report: only for a card

        card = modelcard.card(info, ckpt["config"], run_dir, provenance)
    base = Path(out) if out else registry.exported_backbone(run_dir)
    if base.suffix in (".pth", weights.SAFETENSORS_SUFFIX):
        base = base.with_suffix("")
    backbone = build_backbone(info.arch, in_chans=1)
    backbone.load_state_dict(trunk, strict=False)  # trunk_arch checked every name and shape
    tv = export_torchvision(backbone)
    pth = base.with_name(base.name + ".pth")
    safetensors = base.with_name(base.name + weights.SAFETENSORS_SUFFIX)
    if {"torchvision", "safetensors"} & set(formats):
        # The pair at one path holds one export's tensors: an older twin goes first (readers
        # of a run directory take the .safetensors), and the .safetensors comes last.
        pth.unlink(missing_ok=True)
        safetensors.unlink(missing_ok=True)
    written = []
    if "torchvision" in formats:
        written.append(pth)
        checkpoint.save(pth, tv)
    if "safetensors" in formats:
        written.append(safetensors)
        weights.save_safetensors(safetensors, tv, info)
    if "hub" in formats:
        written.append(Path(hub_dir) if hub_dir else run_dir / "hub")
        write_hub(written[-1], trunk, info, card)
    return info, written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m muscle_hpc.export",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a run directory or a stage checkpoint (.pth)")
    p.add_argument("--format", action="append", choices=FORMATS, dest="formats",
                   help="repeat for several (default: torchvision and safetensors)")
    p.add_argument("--out", help="the .pth / .safetensors path, suffix aside (default: "
                                 f"SOURCE_DIR/{registry.EXPORTED_BACKBONE})")
    p.add_argument("--hub-dir", help="the hub folder (default: SOURCE_DIR/hub)")
    p.add_argument("--encoder", choices=tuple(PREFIXES), default="query",
                   help="MD-MoCo's query encoder (default) or its momentum encoder")
    p.add_argument("--size", type=size_arg, help="the input size WxH the run trained at "
                                                   "(default: its shards' size)")
    args = p.parse_args(argv)
    formats = tuple(dict.fromkeys(args.formats or DEFAULT_FORMATS))
    src = Path(args.source)
    path = src / "checkpoint.pth" if src.is_dir() else src
    try:
        ckpt = checkpoint.load(path)
        if ckpt is None:
            raise WeightsError("no such checkpoint")
        info, written = export_run(ckpt, path.parent, formats, out=args.out,
                                   hub_dir=args.hub_dir, encoder=args.encoder, size=args.size)
    except (checkpoint.UnsafeFileError, checkpoint.NoSpaceError) as e:  # they name the file
        print(f"export: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, checkpoint.UnsafeFileError) else 1
    except Exception as e:  # noqa: BLE001 - unreadable files included: one line, not a trace
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"export: error: {path}: {reason}", file=sys.stderr)
        return 2
    what = f"{args.encoder} encoder" if info.source["stage"] == "mdmoco" else "trunk"
    print(f"export: {info.arch} {what} of {path} (step {ckpt.get('step')}) -> "
          f"{', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
