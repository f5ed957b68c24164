import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from muscle_hpc import dist
from muscle_hpc.dist import DistEnv, dist_env, expand_nodelist


@pytest.fixture(autouse=True)
def no_scontrol(monkeypatch):
    # the fallback parser is what is tested, also on a host that has Slurm
    monkeypatch.setattr(dist.shutil, "which", lambda name: None)


def test_torchrun_vars_win_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2",
           "MASTER_PORT": "29400", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert dist_env(env) == DistEnv(3, 8, 1, "10.0.0.2", 29400)


def test_slurm_vars():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "node[1-3,5]", "SLURM_JOB_ID": "123456"}
    assert dist_env(env) == DistEnv(5, 8, 1, "node1", 15000 + 123456 % 20000)
    env.update(SLURM_JOB_NODELIST="node7,node2", MASTER_PORT="40000")
    assert dist_env(env) == DistEnv(5, 8, 1, "node7", 40000)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[1-3,5]", ["node1", "node2", "node3", "node5"]),
    ("node1,node2", ["node1", "node2"]),
    ("gpu[08-10],cpu7", ["gpu08", "gpu09", "gpu10", "cpu7"]),
    ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
    ("solo", ["solo"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_no_launcher_is_a_single_process():
    env = dist_env({})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (0, 1, 0, "127.0.0.1")
    assert 0 < env.master_port < 65536


def _worker(rank: int, port: int, world: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = dist.init_distributed(dist_env(), backend="gloo", timeout_s=30)
    t = torch.tensor([float(rank + 1)])
    torch_dist.all_reduce(t)
    dist.barrier()
    with open(f"{out}/{rank}", "w") as f:
        f.write(f"{env.rank} {env.world_size} {t.item()} {dist.is_main()}")
    dist.shutdown()


def test_two_process_gloo_all_reduce(tmp_path):
    mp.spawn(_worker, args=(dist.free_port(), 2, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "0").read_text() == "0 2 3.0 True"
    assert (tmp_path / "1").read_text() == "1 2 3.0 False"


def test_backend_is_gloo_for_cpu_tensors_and_nccl_for_cuda_ones():
    assert dist.default_backend(cuda=True, environ={}) == "cpu:gloo,cuda:nccl"
    assert dist.default_backend(cuda=False, environ={}) == "gloo"
    mpi = {"MUSCLE_DIST_BACKEND": "mpi"}
    assert dist.default_backend(cuda=True, environ=mpi) == "mpi"


@pytest.mark.parametrize("local_rank, visible, index", [
    (0, 8, 0), (5, 8, 5),  # every task sees the node's GPUs: its local rank
    (0, 1, 0), (5, 1, 0),  # --gpus-per-task=1 or a GPU binding: the one it sees
])
def test_each_rank_picks_a_gpu_it_can_see(local_rank, visible, index):
    assert dist.cuda_device_index(local_rank, visible) == index


def test_a_rank_that_cannot_tell_its_gpu_says_so():
    with pytest.raises(RuntimeError, match="local rank 5 sees 2 GPUs"):
        dist.cuda_device_index(5, 2)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        dist.cuda_device_index(0, 0)


def test_on_a_gpu_host_the_group_has_both_backends_and_deepspeed_gets_the_device_index(
        monkeypatch):
    """What init_distributed asks of torch where CUDA is present (there is none here, so
    torch's CUDA calls are stood in for): the two-backend group string, the GPU this rank
    sees, and LOCAL_RANK set to that GPU's index for DeepSpeed, with one GPU per task."""
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("device", i))
    monkeypatch.setattr(torch_dist, "init_process_group",
                        lambda backend, **kw: calls.setdefault("backend", backend))
    monkeypatch.delenv("MUSCLE_DIST_BACKEND", raising=False)
    dist.init_distributed(DistEnv(5, 8, 3, "127.0.0.1", 29999))
    assert calls == {"backend": "cpu:gloo,cuda:nccl", "device": 0}
    assert (os.environ["LOCAL_RANK"], os.environ["RANK"]) == ("0", "5")


def test_a_stage_on_a_rank_that_cannot_tell_its_gpu_stops_in_one_line(monkeypatch, capsys):
    from muscle_hpc.stages import common

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    env = DistEnv(5, 8, 5, "127.0.0.1", 29999)
    assert common.main("mdmoco", lambda: common.join(env, deterministic=False)) == 2
    assert capsys.readouterr().err.splitlines() == [
        "mdmoco: error: local rank 5 sees 2 GPUs: give every task one GPU "
        "(--gpus-per-task=1) or all of the node's, one per task"]
