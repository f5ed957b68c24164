"""What every stage's entry point does the same way: its command line, its one-line errors, its
prelude (checkpoint, rendezvous, lock, provenance), reading a pre-trained backbone."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sized
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torchvision

from data_prep.datasets.base import printable
from muscle_hpc import checkpoint, config, dist, export, provenance, registry, runlock
from muscle_hpc.config import ConfigError
from muscle_hpc.data.shards import ShardError
from muscle_hpc.ds_engine import check_device
from muscle_hpc.engine import NO_SPACE_EXIT, RollingCheckpoint, StageError, Start, select_kernels
from muscle_hpc.models.backbone import build_backbone, load_imagenet_into

T = TypeVar("T")


@dataclass(frozen=True)
class Prepared:
    """What a stage's ``prepare`` checked before any process group or Slurm job exists (the
    launcher calls it too, to refuse a bad input before submitting): the stage's config, its
    DeepSpeed config for the world size, and its ``shards``, opened and checked (``None`` in
    place of each with ``data.synthetic``). Each stage's subclass adds the rest of its inputs."""

    cfg: Any
    ds_config: dict
    shards: Any


def parse_args(stage: str, doc: str, argv, example: str, *, config_default=None,
               add_arguments=None):
    p = argparse.ArgumentParser(prog=f"python -m muscle_hpc.stages.{stage}",
                                description=doc.split("\n\n")[0])
    p.add_argument("--config", required=config_default is None, default=config_default,
                   help=f"YAML file (configs/{stage}_*.yaml)")
    if add_arguments is not None:
        add_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"e.g. {example}; every key, its default and meaning: python -m "
                        f"muscle_hpc.config --describe {stage}")
    return p.parse_intermixed_args(argv)  # key=value before and after options alike


def fail(stage: str, message: str) -> int:
    """Say ``message`` on stderr as the stage's error; the exit status of a refused start."""
    print(f"{stage}: error: {printable(message)}", file=sys.stderr)
    return 2


def main(stage: str, body: Callable[[], int]) -> int:
    """``body()``, the stage's start and run; a refused start (config, shards, checkpoint, GPU,
    run-directory lock) is one line on stderr and exit status 2, never a traceback, and so is
    a file that did not fit on its file system (``NO_SPACE_EXIT``)."""
    try:
        return body()
    except (ConfigError, ShardError, StageError) as e:
        return fail(stage, str(e))
    except checkpoint.NoSpaceError as e:
        fail(stage, str(e))
        return NO_SPACE_EXIT
    except BrokenPipeError:
        # The reader of our output left (``--list | head``): nothing to report. Python's
        # recipe: stdout to /dev/null, so the interpreter's last flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


@contextmanager
def started(stage: str, cfg, env: dist.DistEnv, on_cuda: bool, run_dir: Path,
            may_change: tuple[str, ...], kept: tuple[str, ...] = ()) -> Iterator[Start]:
    """The prelude every stage runs once its config and inputs are checked: a start without a
    GPU refused unless ``run.allow_cpu``, the run directory's rolling checkpoint read and
    checked against ``cfg`` (keys starting with one of ``may_change`` may differ, those in
    ``kept`` not) before any
    rendezvous, the GPU kernels chosen (``run.deterministic``), the process group joined, the
    run directory locked by rank 0 (``runlock``: refused while another live run holds it, on
    every rank, so all stop at once instead of waiting in a collective for a rank 0 that
    left), and every rank's host and GPU gathered for the provenance record. Leaving it
    releases the lock and the process group."""
    check_device(cfg.run, on_cuda)
    ckpt = RollingCheckpoint(run_dir, env.rank, env.world_size)
    try:
        resumed = ckpt.load(config.to_dict(cfg), may_change, kept)
    except ValueError as e:
        raise StageError(str(e)) from None
    join(env, cfg.run.deterministic)
    lock, new_dir = None, not run_dir.exists()
    try:
        lock = agreed(lambda: runlock.acquire(run_dir, log=lambda s: print(s, flush=True))
                      if env.rank == 0 else None)
        if lock is not None:
            lock.keep_alive()
        ranks = dist.gather_objects([provenance.this_rank()])
        yield Start(stage, env, on_cuda, ckpt, resumed, lock, ranks)
    finally:
        if lock is not None:
            lock.release()
            if new_dir:  # a start refused after the lock leaves no empty run directory behind
                with suppress(OSError):
                    run_dir.rmdir()
        dist.shutdown()


def steps_per_epoch(loaders: Mapping[str, Sized]) -> dict[str, int]:
    """Each loader's steps per epoch, checked to be the same on every rank (one all-reduce): a
    rank with a step more would wait in a collective until the timeout. ``loaders``: each
    loader under what it feeds (a task, pre-training), which the error names."""
    names = list(loaders)
    spread = dist.spread([len(loaders[n]) for n in names])
    for name, (lo, hi) in zip(names, spread):
        if lo != hi:
            raise StageError(f"ranks disagree on the steps per epoch of {name} ({lo} to {hi}): "
                             f"the loader must give every rank as many")
    return {name: lo for name, (lo, _) in zip(names, spread)}


def agreed(action: Callable[[], T]) -> T:
    """``action()`` on every rank; when it refuses (``ValueError``, e.g. a lock held by another
    run) on any rank, every rank raises that rank's one line as a ``StageError``."""
    result, refused = None, ""
    try:
        result = action()
    except ValueError as e:
        refused = str(e)
    refusals = [r for r in dist.gather_objects([refused]) if r]
    if refusals:
        raise StageError(refusals[0])
    return result


def better(score: float, best: dict | None, lower: bool = False) -> bool:
    """Model selection: higher is better (``lower``: an error such as MAE, lower is), and any
    number beats NaN (an undefined AUC)."""
    if best is None:
        return True
    if math.isnan(score):
        return False
    return math.isnan(best["score"]) or (score < best["score"] if lower else
                                         score > best["score"])


def join(env, deterministic: bool) -> None:
    """Choose the GPU kernels (``run.deterministic``) and join the process group; a rank that
    cannot tell its GPU refuses the start (``StageError``)."""
    select_kernels(deterministic)
    try:
        dist.init_distributed(env)
    except dist.DeviceError as e:
        raise StageError(str(e)) from None


def backbone_weights(path: str, arch: str, key: str, missing_hint: str) -> dict:
    """The torchvision state dict at ``path`` (the ``key`` of the config or the CLI that named
    it), checked to load into an ``arch`` backbone. Raises ``ConfigError`` in one line."""
    if Path(path).is_dir():
        inside = Path(path) / registry.EXPORTED_BACKBONE
        raise ConfigError(f"{key}: {path} is a directory; give a file, a torchvision {arch} "
                          f"state dict (.pth)"
                          + (f": {inside} is one" if inside.is_file() else f"; {missing_hint}"))
    try:
        state = checkpoint.load(Path(path))
    except checkpoint.UnsafeFileError as e:
        raise ConfigError(f"{key}: {e}") from None
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


# The inits that earlier stages write under run.root: their pretrained.<key>, their maker.
PRETRAINED_KEY = {i.name: i.pretrained_key for i in registry.INITS.values() if i.made_by}
MADE_BY = {i.name: i.made_by for i in registry.INITS.values() if i.made_by}


def init_path(cfg, run) -> str | None:
    """The file ``run.init`` starts from (None: Kaiming init), as ``cfg.pretrained`` and
    ``cfg.run.root`` say, for a run of ``run.backbone`` (a ``FinetuneRun`` or
    ``MultiMixRun``). Raises ``ConfigError``."""
    if run.init == "scratch":
        return None
    if run.init == "imagenet":
        configured = config.expand_path("pretrained.imagenet", cfg.pretrained.imagenet,
                                        root=cfg.run.root, backbone=run.backbone)
        return imagenet_weights_path(run.arch, configured)
    key = PRETRAINED_KEY[run.init]
    return config.expand_path(f"pretrained.{key}", getattr(cfg.pretrained, key),
                              root=cfg.run.root, backbone=run.backbone)


def init_weights(path: str, run) -> dict:
    """The backbone at ``path`` (``init_path``'s), checked to load into ``run.arch``."""
    key = f"pretrained.{PRETRAINED_KEY.get(run.init, 'imagenet')}"
    hint = f"run {MADE_BY[run.init]} first" if run.init in MADE_BY else "see its docs"
    return backbone_weights(path, run.arch, key, hint)


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


def export_backbone(model: torch.nn.Module, cfg, step: int, run_dir: Path) -> list[Path]:
    """The trunk of ``model`` (MoCo, or the continual stage's net) as users load it:
    ``muscle_hpc.export``'s default files in ``run_dir``, with the preprocessing and provenance
    recorded; the paths written."""
    ckpt = {"model": model.state_dict(), "config": config.to_dict(cfg), "step": step}
    return export.export_run(ckpt, Path(run_dir))[1]
