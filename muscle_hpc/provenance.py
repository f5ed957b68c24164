"""What ran in a run directory: ``RUN/provenance.json``, one entry per start of a stage.

Each entry holds the code version (git commit and dirty flag when the package runs from a git
checkout, and the installed package version), the versions of Python, torch (and the CUDA it was
built for), torchvision, deepspeed, ffcv and numpy, the world size, the sorted hosts, the GPU
models counted, the time and the Slurm job. The resolved config is already in ``config.yaml``.
The file is a JSON list that only grows: a run resumed on other nodes or with other software
keeps the record of each start. Nothing about the data goes in, so no patient identifier can.

Use, once per stage start, after the process group is up and each rank has chosen its GPU::

    from muscle_hpc import provenance

    ranks = [None] * world_size
    torch.distributed.all_gather_object(ranks, provenance.this_rank())  # or [this_rank()] alone
    if rank == 0:
        provenance.record(cfg.run.dir, ranks, world_size, "mdmoco")

Only rank 0 writes (``record``); the run lock (``runlock``) keeps a second launch from writing
the same file at once, so the read-append-replace needs no lock of its own.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import time
import warnings
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from muscle_hpc.checkpoint import save_json

# torch is imported where it is used (~4 s): record() and the git lookup need none of it.

FILE_NAME = "provenance.json"
PACKAGES = ("torch", "torchvision", "deepspeed", "ffcv", "numpy")
GIT_TIMEOUT_S = 10.0  # a hung network file system must not hold up the start of training
_SOURCE_DIR = Path(__file__).resolve().parent


def this_rank() -> dict:
    """This process's part of the record: ``host``, ``pid`` and ``gpu`` (the model of the
    current CUDA device, None without one). Call it after the rank has chosen its device
    (``torch.cuda.set_device``), or it names device 0. Cheap: no subprocess."""
    import torch

    gpu = torch.cuda.get_device_name(torch.cuda.current_device()) \
        if torch.cuda.is_available() else None
    return {"host": socket.gethostname(), "pid": os.getpid(), "gpu": gpu}


def _git(args: list[str], cwd: Path) -> str:
    # GIT_* variables of the caller (GIT_DIR in a hook, say) would point git at another
    # repository; GIT_OPTIONAL_LOCKS=0 keeps ``git status`` from rewriting the index, which
    # other jobs of a shared checkout may be reading.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_OPTIONAL_LOCKS"] = "0"
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          check=True, timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL).stdout


def package_version() -> str | None:
    """The installed version of muscle-hpc, or the imported package's ``__version__`` when it
    runs from a source tree that was never installed."""
    try:
        return importlib.metadata.version("muscle-hpc")
    except importlib.metadata.PackageNotFoundError:
        from muscle_hpc import __version__

        return __version__


def code_version(source_dir: str | os.PathLike | None = None) -> dict:
    """``{"commit", "dirty", "version"}`` of the code in ``source_dir`` (default: this
    package's directory). ``commit`` is ``git rev-parse HEAD`` and ``dirty`` whether
    ``git status --porcelain --untracked-files=no`` lists anything (untracked files, like
    run outputs, do not make code dirty), both over the whole repository; both are None, and
    ``git_error`` says why, when git is missing, times out, or ``source_dir`` holds no file
    tracked by a repository (an installed copy in a virtualenv that lives in some other
    checkout must not report that checkout's commit). ``version`` is ``package_version()``."""
    cwd = Path(source_dir) if source_dir is not None else _SOURCE_DIR
    out: dict = {"commit": None, "dirty": None, "version": package_version()}
    try:
        if not _git(["ls-files", "-z", "--", "."], cwd):
            out["git_error"] = f"{cwd} holds no file tracked by git"
            return out
        commit = _git(["rev-parse", "HEAD"], cwd).strip()
        dirty = bool(_git(["status", "--porcelain", "--untracked-files=no"], cwd).strip())
    except subprocess.CalledProcessError as e:
        lines = (e.stderr or "").strip().splitlines()
        out["git_error"] = lines[0] if lines else f"git {e.cmd[1]} exited with {e.returncode}"
        return out
    except (OSError, subprocess.TimeoutExpired) as e:  # no git, no such directory, hung
        out["git_error"] = f"{type(e).__name__}: {e}"
        return out
    out["commit"], out["dirty"] = commit, dirty
    return out


def software_versions() -> dict:
    """Versions of Python and of ``PACKAGES`` as installed (None when one is not), plus
    ``cuda``, the CUDA version torch was built for (None for a CPU build)."""
    versions: dict = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    versions["cuda"] = torch.version.cuda
    return versions


def build(ranks: list[dict], world_size: int, stage: str,
          source_dir: str | os.PathLike | None = None) -> dict:
    """The entry ``record`` appends, from ``this_rank()`` of every rank (in rank order)."""
    if len(ranks) != world_size:
        raise ValueError(f"provenance of {len(ranks)} ranks for a world of {world_size}: gather "
                         f"this_rank() from every rank")
    return {
        "stage": stage,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "code": code_version(source_dir),
        "versions": software_versions(),
        "world_size": world_size,
        "hosts": sorted({r["host"] for r in ranks}),
        # ranks without a GPU are counted under "cpu"
        "gpus": dict(sorted(Counter(r["gpu"] or "cpu" for r in ranks).items())),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
    }


def record(run_dir: str | os.PathLike, ranks: list[dict], world_size: int, stage: str, *,
           source_dir: str | os.PathLike | None = None) -> dict:
    """Append the entry for this start of ``stage`` to ``RUN/provenance.json`` and return it.

    Arguments: ``run_dir``, the run directory (created if needed); ``ranks``, ``this_rank()``
    of every rank in rank order (``ValueError`` unless there are ``world_size`` of them);
    ``stage``, the stage's name; ``source_dir``, where to ask git (default: this package).
    The file is replaced atomically, so a kill leaves the old list or the new one. A file that
    is not a JSON list (edited by hand) is kept beside it as ``provenance.json.unreadable-<time>``
    and a new list is started, with a warning: a start is not refused for its history."""
    entry = build(ranks, world_size, stage, source_dir)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / FILE_NAME
    save_json(path, [*read(path), entry])
    return entry


def read(path: str | os.PathLike, move_unreadable: bool = True) -> list[dict]:
    """The entries of a ``provenance.json`` (``[]`` when there is none yet); an unreadable file is
    moved aside as ``record`` says, or with ``move_unreadable`` off (a reader that is not
    about to record, such as a model card) left where it is and read as ``[]``."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except OSError:
        if move_unreadable:
            raise
        return []
    except ValueError:
        entries = None
    if isinstance(entries, list):
        return entries
    if not move_unreadable:
        return []
    aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    warnings.warn(f"{path} was not a JSON list; kept as {aside.name}, starting a new one",
                  stacklevel=3)
    return []
