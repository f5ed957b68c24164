"""What every stage's entry point does the same way: its command line, its one-line errors,
reading a pre-trained backbone, and going on from a rolling checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision

from muscle_hpc import checkpoint, config, dist
from muscle_hpc.config import ConfigError
from muscle_hpc.engine import select_kernels
from muscle_hpc.models.backbone import build_backbone, load_imagenet_into


def parse_args(stage: str, doc: str, argv, example: str, *, config_default=None,
               add_arguments=None):
    p = argparse.ArgumentParser(prog=f"python -m muscle_hpc.stages.{stage}",
                                description=doc.split("\n\n")[0])
    p.add_argument("--config", required=config_default is None, default=config_default,
                   help=f"YAML file (configs/{stage}_*.yaml)")
    if add_arguments is not None:
        add_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"e.g. {example}")
    return p.parse_args(argv)


def fail(stage: str, message: str) -> int:
    """Say ``message`` on stderr as the stage's error; the exit status of a refused start."""
    print(f"{stage}: error: {message}", file=sys.stderr)
    return 2


def join(stage: str, env, deterministic: bool) -> None:
    """Choose the GPU kernels (``run.deterministic``) and join the process group; a rank that
    cannot tell its GPU stops the stage with one line and status 2."""
    select_kernels(deterministic)
    try:
        dist.init_distributed(env)
    except dist.DeviceError as e:
        raise SystemExit(fail(stage, str(e))) from None


def resume_or_start(stage: str, ckpt, resumed, engine, model, layout: dict, cfg) -> dict:
    """The shared state of ``ckpt`` (a ``RollingCheckpoint``) that training goes on from:
    for a resumed run, restored into ``engine``, ``model`` and the RNGs once ``layout`` (how the
    data splits into steps, saved with every checkpoint) is found unchanged; ``{}`` for a new
    run, whose directory rank 0 creates with its ``config.yaml``. A changed layout (other shards,
    another step limit) cannot go on from the checkpoint: the stage exits with status 2 and one
    line."""
    if not resumed:
        if ckpt.rank == 0:
            ckpt.run_dir.mkdir(parents=True, exist_ok=True)
            config.dump_yaml(cfg, ckpt.run_dir / "config.yaml")
        return {}
    for key, now in layout.items():
        if resumed[0][key] != now:
            raise SystemExit(fail(stage, f"{ckpt.path}: {key} was {resumed[0][key]}, is {now} "
                                         f"now (the shards or a step limit changed); undo that "
                                         f"or use a new run directory"))
    shared = ckpt.restore_training(engine, resumed)
    model.load_state_dict(shared["model"])
    return shared


def backbone_weights(path: str, arch: str, key: str, missing_hint: str) -> dict:
    """The torchvision state dict at ``path`` (the ``key`` of the config or the CLI that named
    it), checked to load into an ``arch`` backbone. Raises ``ConfigError`` in one line."""
    try:
        state = checkpoint.load(Path(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file, in one line
        raise ConfigError(f"{key}: {path} cannot be read ({type(e).__name__})") from None
    if state is None:
        raise ConfigError(f"{key}: {path} not found ({missing_hint})")
    try:
        load_imagenet_into(build_backbone(arch), state)
    except (RuntimeError, KeyError) as e:
        raise ConfigError(f"{key}: {path} is not a {arch} backbone "
                          f"({str(e).splitlines()[0][:120]})") from None
    return state


def imagenet_weights_path(arch: str, configured: str = "") -> str:
    """torchvision's ImageNet ``arch`` weights: ``configured`` if set, else the first of
    torchvision's files (IMAGENET1K_V1, then V2) found in the torch hub cache. Nothing is
    downloaded: cluster nodes are often offline, and a silent 100 MB download per array
    element is not what anyone wants. Raises ``ConfigError`` saying where to put the file."""
    if configured:
        return configured
    weights = torchvision.models.get_model_weights(arch)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    names = [w.url.rsplit("/", 1)[-1] for w in weights]
    for name in names:
        if (cache / name).is_file():
            return str(cache / name)
    url = weights.IMAGENET1K_V1.url
    raise ConfigError(f"pretrained.imagenet: no ImageNet {arch} weights: put {names[0]} "
                      f"(from {url}) in {cache}/ (or $TORCH_HOME/hub/checkpoints), or set "
                      f"pretrained.imagenet=FILE")
