"""Write a stage checkpoint's backbone as a torchvision ResNet state dict.

    python -m muscle_hpc.export RUN_DIR_OR_CHECKPOINT [--out FILE] [--encoder query|key]

The file loads with ``torchvision.models.resnet50().load_state_dict(torch.load(FILE))``
(strict): ``conv1`` is written for 3 channels (the 1-channel weight / 3 on each, so a gray
image repeated on 3 channels gives the network's outputs) and ``fc`` is a fresh 1000-class
layer in place of MoCo's projection head. The MD-MoCo stage writes this file itself when it
finishes (``backbone_torchvision.pth``); this command does it for any checkpoint, e.g. one
taken mid-run. MoCo's query encoder is the backbone that transfers (as in MoCo's own linear
evaluation); ``--encoder key`` exports the momentum encoder instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from muscle_hpc import checkpoint, registry
from muscle_hpc.models.backbone import ARCHS, build_backbone, export_torchvision

PREFIXES = {"query": "encoder_q.", "key": "encoder_k."}


def backbone_state(ckpt: dict, encoder: str = "query") -> dict:
    """The torchvision state dict of ``encoder`` in a loaded MD-MoCo checkpoint."""
    try:
        arch = ckpt["config"]["model"]["arch"]
        model = ckpt["model"]
    except (KeyError, TypeError):
        raise ValueError("not a muscle-hpc stage checkpoint (no model/config in it)") from None
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r} in the checkpoint's config")
    prefix = PREFIXES[encoder]
    trunk = {k[len(prefix):]: v for k, v in model.items()
             if k.startswith(prefix) and not k[len(prefix):].startswith("fc.")}
    backbone = build_backbone(arch, in_chans=1)
    missing, unexpected = backbone.load_state_dict(trunk, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"the checkpoint's {encoder} encoder does not match {arch}: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return export_torchvision(backbone)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m muscle_hpc.export",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a run directory or its checkpoint.pth")
    p.add_argument("--out", help=f"output file (default: SOURCE_DIR/{registry.EXPORTED_BACKBONE})")
    p.add_argument("--encoder", choices=tuple(PREFIXES), default="query")
    args = p.parse_args(argv)
    src = Path(args.source)
    path = src / "checkpoint.pth" if src.is_dir() else src
    try:
        ckpt = checkpoint.load(path)
        if ckpt is None:
            raise ValueError("no such checkpoint")
        state = backbone_state(ckpt, args.encoder)
    except checkpoint.UnsafeFileError as e:  # names the file itself
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - unreadable files included: one line, not a trace
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"export: error: {path}: {reason}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else registry.exported_backbone(path.parent)
    try:
        checkpoint.save(out, state)
    except checkpoint.NoSpaceError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    print(f"export: {args.encoder} encoder of {path} (step {ckpt.get('step')}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
