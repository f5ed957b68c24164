"""Rolling checkpoints that are never half-written, and the RNG state that exact resume needs.

``save(path, state)`` writes beside ``path`` and renames over it, so ``path`` always holds the
last complete checkpoint, even if the job is killed mid-write (Slurm preemption, OOM). Files
hold only tensors and plain Python containers so they load with ``weights_only=True``: loading
a checkpoint can never run code. Tensors are written from host memory, whatever device they
trained on, so every file loads with a plain ``torch.load`` on a host without a GPU.
"""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path

import numpy as np
import torch


def on_cpu(obj):
    """``obj`` with every tensor in its containers in host memory (the rest as it is)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device.type == "cpu" else obj.detach().cpu()
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the type and attributes (a state dict's _metadata)
        for k, v in obj.items():
            out[k] = on_cpu(v)
        return out
    if isinstance(obj, list):
        return [on_cpu(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(on_cpu(v) for v in obj)
    return obj


def save(path: Path, state: dict) -> None:
    state = on_cpu(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def save_json(path: Path, obj) -> None:
    """``obj`` as JSON at ``path``, atomically (a reader never sees half a file)."""
    import json

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def load(path: Path, map_location="cpu") -> dict | None:
    """The checkpoint at ``path``, or None when there is none yet."""
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location=map_location, weights_only=True)


def rng_state() -> dict:
    """Every random generator a training step may draw from, in a weights_only-safe form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # This rank's GPU only: the one it draws from, and a resume that sees one GPU per
        # task (or fewer than the writer saw) can still restore it.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(x):
    # random.setstate wants the nested tuples back; some serialisers hand lists.
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
