"""Rolling checkpoints that are never half-written, and the RNG state that exact resume needs.

``save(path, state)`` writes beside ``path`` and renames over it, so ``path`` always holds the
last complete checkpoint, even if the job is killed mid-write (Slurm preemption, OOM). Files
hold only tensors and plain Python containers so they load with ``weights_only=True``: loading
a checkpoint can never run code. Tensors are written from host memory, whatever device they
trained on, so every file loads with a plain ``torch.load`` on a host without a GPU.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import pickle
import random
import re
import shutil
from contextlib import suppress
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


class NoSpaceError(OSError):
    """A file not written for want of space (or quota); the message is one line naming the
    file system, what the file needs and what is free. Nothing of the file is left behind."""


class UnsafeFileError(ValueError):
    """A file ``load`` refuses because unpickling it could run code; the message is one line."""


def save(path: Path, state: dict) -> None:
    """``state`` at ``path``, atomically. A full file system raises ``NoSpaceError`` and leaves
    ``path`` as it was."""
    state = on_cpu(state)

    def size() -> int:
        need = _CountingSink()
        torch.save(state, need)  # again, into nothing: only a failed write pays for it
        return need.bytes

    _write_atomic(Path(path), lambda f: torch.save(state, f), size)


def save_bytes(path: Path, data: bytes) -> None:
    """``data`` at ``path``, atomically, as ``save`` writes a checkpoint (``NoSpaceError``
    included): for files other libraries serialise, such as safetensors."""
    _write_atomic(Path(path), lambda f: f.write(data), lambda: len(data))


def _write_atomic(path: Path, write, size) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        full = _out_of_space(e)
        if full is None:
            raise
        tmp.unlink(missing_ok=True)  # first: the space it held is free again
        raise NoSpaceError(_no_space(path, size(), full)) from None
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def save_json(path: Path, obj) -> None:
    """``obj`` as JSON at ``path``, atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _out_of_space(e: BaseException) -> OSError | None:
    # torch.save reports a failed write as its own RuntimeError; the OSError is in the chain.
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


def _no_space(path: Path, need: int, error: OSError) -> str:
    mount, kind = _file_system(path.parent)
    free = shutil.disk_usage(path.parent).free
    return (f"{path}: {error.strerror} on the {kind} file system mounted at {mount}: the file "
            f"needs {_size_text(need)}, {_size_text(free)} free")


class _CountingSink:
    def __init__(self):
        self.bytes = 0

    def write(self, data) -> int:
        self.bytes += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _file_system(path: Path) -> tuple[Path, str]:
    """The mount point that holds ``path`` and its type (``?`` where /proc does not say)."""
    mount = Path(os.path.realpath(path))
    while not os.path.ismount(mount):
        mount = mount.parent
    kind = "?"
    with suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[1] == str(mount):
                kind = fields[2]  # no break: the last mount on a point is the one in use
    return mount, kind


def _size_text(n: float) -> str:
    """``812 bytes``, ``3.4 MiB``."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} bytes" if i == 0 else f"{n:.1f} {units[i]}"


def load(path: Path, map_location="cpu") -> dict | None:
    """The checkpoint at ``path``, or None when there is none yet. Raises ``UnsafeFileError``
    for a file that holds more than tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise
        # torch's own message offers weights_only=False, i.e. running the file's code: not
        # advice to repeat for a file from elsewhere.
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise UnsafeFileError(f"{path} holds objects other than tensors{what} and is refused "
                              f"for safety: loading them could run code") from None


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
