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
