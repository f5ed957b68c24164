"""The launchers on a real Slurm: the local 4-node cluster of tools/local_slurm.sh (CPU, gloo).

tools/test.sh starts the cluster and sets MUSCLE_SLURM=1; without a cluster these tests skip,
unless MUSCLE_SLURM=1 says one was expected.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import moco_overrides

from muscle_hpc.tblog import read_scalars

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "mdmoco_demo.yaml"
# The scripts and the launcher ask for GPUs by default; this cluster has none.
CPU_SBATCH = ["--gpus-per-node=0"]
CPU_LAUNCH = ["--gpus-per-node", "0"]


def _cluster_up() -> bool:
    if not shutil.which("scontrol"):
        return False
    return subprocess.run(["scontrol", "ping"], capture_output=True).returncode == 0


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if not _cluster_up():
        if os.environ.get("MUSCLE_SLURM") == "1":
            pytest.fail("MUSCLE_SLURM=1 but no Slurm answers (bash tools/local_slurm.sh start)")
        pytest.skip("no Slurm cluster (bash tools/local_slurm.sh start)")


def sbatch(log: Path, *args: str, script: str = "slurm/mdmoco.sh", config: Path = DEMO) -> str:
    # Submitted from a shell that still holds torchrun's variables (a user's dev session):
    # the script must let Slurm, not these, define the ranks.
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
    out = subprocess.run(["sbatch", "--parsable", *CPU_SBATCH, "--nodes=2", "--ntasks-per-node=1",
                          "--cpus-per-task=1", f"--output={log}", script,
                          str(config), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().split(";")[0]


def state(job: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"],
                         capture_output=True, text=True).stdout.split()
    return out[0] if out else "PENDING"


def wait_done(job: str, timeout: float = 240) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = state(job)
        if s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return s
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not end in {timeout} s (state {state(job)})")


def wait_for_step(log: Path, step: int, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = log.read_text() if log.exists() else ""
        steps = [int(line.split()[1].split("/")[0]) for line in text.splitlines()
                 if line.startswith("step ")]
        if steps and max(steps) >= step:
            return
        time.sleep(0.5)
    raise AssertionError(f"no step {step} in {log} after {timeout} s:\n{text[-2000:]}")


def jobs() -> set[str]:
    """Every job id Slurm knows of (running or ended)."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-a", "-o", "JobID", "-S", "now-1days"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def final_model(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pth", weights_only=True)


@pytest.fixture(scope="module")
def reference(moco_shards, tmp_path_factory):
    """An uninterrupted sbatch run on 2 nodes: the other tests compare with it."""
    base = tmp_path_factory.mktemp("slurm_ref")
    job = sbatch(base / "log", *moco_overrides(moco_shards, base / "run"))
    assert wait_done(job) == "COMPLETED", (base / "log").read_text()[-3000:]
    return base


def test_sbatch_runs_the_stage_on_two_nodes(reference):
    log = (reference / "log").read_text()
    assert "on node[1-2], 2 tasks" in log and "2 rank(s)" in log
    ckpt = final_model(reference / "run")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 24
    loss = read_scalars(reference / "run" / "tb")["train/loss"]
    assert [s for s, _ in loss] == list(range(1, 25))


def test_time_limit_signal_checkpoints_requeues_and_resumes_exactly(moco_shards, reference,
                                                                     tmp_path):
    job = sbatch(tmp_path / "log", *moco_overrides(moco_shards, tmp_path / "run"))
    wait_for_step(tmp_path / "log", 5)
    # What Slurm does before the time limit with --signal=B:USR2@120: signal the batch shell.
    subprocess.run(["scancel", "--signal=USR2", "--batch", job], check=True)
    assert wait_done(job, timeout=300) == "COMPLETED"
    log = (tmp_path / "log").read_text()
    assert "requeueing job" in log and "(restart 1)" in log, log[-3000:]
    stopped = int(log.split("stopped by signal 12 after step ")[1].split(";")[0])
    assert 5 <= stopped < 24 and f"resuming at step {stopped}" in log
    assert_same_weights(tmp_path / "run", reference)


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    got, ref = final_model(run_dir), final_model(reference / "run")
    assert got["step"] == ref["step"] == 24
    for k in ref["model"]:
        assert torch.equal(got["model"][k], ref["model"][k]), k


def test_preemption_by_scontrol_requeue_resumes_exactly(moco_shards, reference, tmp_path):
    job = sbatch(tmp_path / "log", *moco_overrides(moco_shards, tmp_path / "run"))
    wait_for_step(tmp_path / "log", 5)
    subprocess.run(["scontrol", "requeue", job], check=True)  # SIGTERM, then requeued
    assert wait_done(job, timeout=300) == "COMPLETED"
    log = (tmp_path / "log").read_text()
    stopped = int(log.split("stopped by signal 15 after step ")[1].split(";")[0])
    assert 5 <= stopped < 24 and f"resuming at step {stopped}" in log, log[-3000:]
    assert_same_weights(tmp_path / "run", reference)


def test_a_killed_rank_fails_the_job_within_a_minute(moco_shards, tmp_path):
    run_dir = tmp_path / "run"
    job = sbatch(tmp_path / "log", *moco_overrides(moco_shards, run_dir, "optim.epochs=100"))
    wait_for_step(tmp_path / "log", 3)
    victims = []
    for pid in subprocess.run(["pgrep", "-f", f"run.dir={run_dir}"], capture_output=True,
                              text=True).stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"SLURM_PROCID=1" in environ and b"muscle_hpc.stages.mdmoco" in cmdline \
                and b"srun" not in cmdline:
            victims.append(int(pid))
    assert victims, "rank 1 not found"
    t0 = time.monotonic()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    assert wait_done(job, timeout=60) == "FAILED"
    assert time.monotonic() - t0 < 60


def test_launch_submits_through_submitit_on_four_nodes(moco_shards, tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "muscle_hpc.launch", "--stage", "mdmoco",
                        "--config", str(DEMO), *CPU_LAUNCH, "--nodes", "4", "--time", "10",
                        "--wait",
                        *moco_overrides(moco_shards, tmp_path / "run", "data.batch_size=8",
                                        "optim.epochs=2")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "on Slurm: 4 node(s) x 1 task(s)" in p.stdout and "finished (4 tasks)" in p.stdout
    ckpt = final_model(tmp_path / "run")
    assert ckpt["world_size"] == 4 and ckpt["step"] == 2 * ckpt["steps_per_epoch"]
    assert "train/loss" in read_scalars(tmp_path / "run" / "tb")


def test_launch_refuses_a_bad_config_before_submitting(moco_shards, tmp_path):
    before = jobs()
    p = subprocess.run([sys.executable, "-m", "muscle_hpc.launch", "--stage", "mdmoco",
                        "--config", str(DEMO), *CPU_LAUNCH, "--nodes", "3",
                        *moco_overrides(moco_shards, tmp_path / "run")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == ("launch: error: data.batch_size: global batch 8 is not "
                                "divisible by the world size 3")
    assert jobs() <= before  # nothing was submitted
    assert not (tmp_path / "run").exists()


def test_launch_requeues_after_the_time_limit_signal_and_resumes_exactly(moco_shards, reference,
                                                                         tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    run_dir = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "muscle_hpc.launch", "--stage", "mdmoco",
                          "--config", str(DEMO), *CPU_LAUNCH, "--nodes", "2", "--time", "10",
                          "--wait",
                          *moco_overrides(moco_shards, run_dir)],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    first = p.stdout.readline()
    job = first.split(" job ")[1].split()[0]
    wait_for_step(run_dir / "submitit" / job / f"{job}_0_log.out", 5)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what --signal=USR2@120 does
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and "finished (2 tasks)" in out, first + out
    log = (run_dir / "submitit" / job / f"{job}_0_log.out").read_text()
    stopped = int(log.split("stopped by signal 12 after step ")[1].split(";")[0])
    assert 5 <= stopped < 24 and f"resuming at step {stopped}" in log, log[-3000:]
    assert_same_weights(run_dir, reference)


def test_sbatch_cl_runs_the_continual_stage_on_two_nodes(task_shards, tmp_path):
    run_dir = tmp_path / "run"
    job = sbatch(tmp_path / "log", f"data.root={task_shards}", "model.init=''",
                 "run.visit_steps=2", "cl.rounds=1", "run.log_every_steps=1",
                 f"run.dir={run_dir}", script="slurm/cl.sh",
                 config=ROOT / "configs" / "continual_demo.yaml")
    assert wait_done(job) == "COMPLETED", (tmp_path / "log").read_text()[-3000:]
    log = (tmp_path / "log").read_text()
    assert "continual: muscle, 2 rank(s), 4 visits" in log
    matrix = json.loads((run_dir / "validation.json").read_text())
    assert len(matrix) == 4
    scalars = read_scalars(run_dir / "tb")
    assert [s for s, _ in scalars["train/lr"]] == list(range(1, 9))
    assert final_model(run_dir)["step"] == 8


def test_scripts_and_launcher_ask_for_gpus_unless_told_cpu(moco_shards, tmp_path):
    """This cluster has no GPUs: the defaults are refused by Slurm, --gpus-per-node=0 is not."""
    for script, tasks in (("mdmoco", 2), ("cl", 2), ("finetune_array", 1)):
        default = subprocess.run(["sbatch", "--test-only", f"slurm/{script}.sh"], cwd=ROOT,
                                 capture_output=True, text=True)
        assert default.returncode == 1 and "generic resource" in default.stderr, default.stderr
        cpu = subprocess.run(["sbatch", "--test-only", *CPU_SBATCH, "--ntasks-per-node=1",
                              "--cpus-per-task=1", f"slurm/{script}.sh"], cwd=ROOT,
                             capture_output=True, text=True)
        assert cpu.returncode == 0 and f"using {tasks} processors" in cpu.stderr, cpu.stderr
    p = subprocess.run([sys.executable, "-m", "muscle_hpc.launch", "--stage", "mdmoco",
                        "--config", str(DEMO),
                        *moco_overrides(moco_shards, tmp_path / "run", "data.batch_size=16")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.splitlines()[-1] == (
        "launch: error: sbatch refused the mdmoco job: sbatch: error: Invalid generic resource "
        "(gres) specification (it asked for 8 GPU(s) per node; on a cluster without GPUs give "
        "--gpus-per-node 0)"), p.stderr
