"""Where am I? Rank, world and rendezvous from whatever launched this process.

torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``; ``srun`` and submitit set
``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` and a node list; a plain ``python`` sets
neither and runs alone. ``dist_env`` reads them in that order, so the stage runs the same way
under each. Slurm's world is ``SLURM_NTASKS``: run the stage through ``srun`` (one task per GPU),
not directly in the batch script, where that count is the allocation's and the ranks that never
start would make rank 0 wait until the init timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

# torch is imported where it is used (~4 s): the launcher reads dist_env on login nodes.


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm node list (``node[1-3,5]``, ``gpu[01-02],cpu7``, ``a,b``)."""
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        hosts += _expand_one(part)
    return hosts


def _expand_one(name: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if not m:
        return [name]
    head, tail = name[:m.start()], name[m.end():]
    out = []
    for r in m.group(1).split(","):
        lo, _, hi = r.partition("-")
        # zero padding is kept: gpu[08-10] is gpu08, gpu09, gpu10
        nums = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi or lo) + 1)]
        out += [h for n in nums for h in _expand_one(head + n + tail)]
    return out


def first_host(nodelist: str) -> str:
    """The first host of ``nodelist``, by ``scontrol`` where there is one (it knows every
    syntax Slurm does), else by ``expand_nodelist``."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)[0]


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or anything that mimics it)
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun, submitit
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "127.0.0.1")
        if "MASTER_PORT" in env:
            port = int(env["MASTER_PORT"])
        else:  # every rank derives the same port; jobs sharing a node rarely collide
            port = 15000 + int(env.get("SLURM_JOB_ID", 0)) % 20000
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                       int(env.get("SLURM_LOCALID", 0)), addr, port)
    return DistEnv(0, 1, 0, "127.0.0.1", free_port())


# Collectives on CPU tensors (the per-step stop flag, step-count checks, logged means,
# gathered evaluation records) go through gloo; CUDA tensors (gradients, MoCo's keys, batch
# norm statistics) through NCCL. A bare "nccl" group has no CPU backend at all.
CUDA_BACKEND = "cpu:gloo,cuda:nccl"
BACKEND_VARIABLE = "MUSCLE_DIST_BACKEND"


def default_backend(cuda: bool, environ: Mapping[str, str] | None = None) -> str:
    """The process group's backend string: ``$MUSCLE_DIST_BACKEND`` if set, else gloo and NCCL
    by device type on CUDA hosts, gloo elsewhere."""
    env = os.environ if environ is None else environ
    return env.get(BACKEND_VARIABLE) or (CUDA_BACKEND if cuda else "gloo")


class DeviceError(RuntimeError):
    """This rank cannot tell which GPU is its own, said in one line."""


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The GPU a rank trains on among the ``visible`` ones: its local rank where every rank
    sees all the node's GPUs (torchrun, a plain ``srun``), the only one where each task is
    bound to its own (``--gpus-per-task=1``, ``--gpu-bind``, a per-task CUDA_VISIBLE_DEVICES)."""
    if visible < 1:
        raise DeviceError("no CUDA device is visible to this rank")
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise DeviceError(f"local rank {local_rank} sees {visible} GPUs: give every task one GPU "
                       f"(--gpus-per-task=1) or all of the node's, one per task")


def init_distributed(env: DistEnv | None = None, backend: str | None = None,
                     timeout_s: float = 600.0) -> DistEnv:
    """Join the process group of ``env`` (default ``dist_env()``) with ``backend`` (default
    ``default_backend``), on this rank's GPU (``cuda_device_index``) where there is CUDA.

    ``timeout_s`` bounds the rendezvous and each collective, so a rank that died or never
    started fails the job instead of hanging it until Slurm's time limit."""
    import torch
    import torch.distributed as dist

    env = env or dist_env()
    cuda = torch.cuda.is_available()
    backend = backend or default_backend(cuda)
    device_index = env.local_rank
    if cuda:
        device_index = cuda_device_index(env.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(device_index)
    # DeepSpeed reads these rather than asking torch.distributed, and takes LOCAL_RANK for the
    # index of its device: with one visible GPU per task that is 0 on every rank.
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size),
                      LOCAL_RANK=str(device_index), MASTER_ADDR=env.master_addr,
                      MASTER_PORT=str(env.master_port))
    dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s))
    return env


def train_device():
    """The device this process trains on: its GPU (``init_distributed`` set it), else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the joined process group; (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0, or a process that never joined a group."""
    return rank_world()[0] == 0


def spread(values: list[int]) -> list[tuple[int, int]]:
    """(min, max) over ranks of each integer in ``values`` (the value twice outside a group):
    two ints per value in one all-reduce, for checks that every rank agrees (e.g. on the steps
    of an epoch: a rank with one step more would wait forever in a collective)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [(v, v) for v in values]
    t = torch.tensor([x for v in values for x in (v, -v)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [(-int(t[2 * i + 1]), int(t[2 * i])) for i in range(len(values))]


def mean(value) -> float:
    """The mean over ranks of a scalar tensor or number (itself outside a group)."""
    import torch
    import torch.distributed as dist

    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu().reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t)


def gather_objects(items: list) -> list:
    """The concatenation of every rank's ``items`` (picklable), on every rank, in rank order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
