"""What a cluster user relies on around every stage's loop (engine.TrainLoop and the prelude in
stages.common): one run per run directory, a stop without a checkpoint on NaN/Inf, the record
of what ran where, and step lines that say how far along the stage is. Real ranks, real
processes, real signals."""

import json
import os
import re
import signal
import socket
import subprocess

import pytest
import torch
from conftest import ROOT, finish_ranks, run_ranks, start_ranks

from muscle_hpc import config
from muscle_hpc.tblog import read_scalars


def ft_args(shards, root, *extra, epochs=3):
    return ["--config", str(ROOT / "configs/finetune_demo.yaml"), "--task", "pneumonia",
            "--init", "scratch", "--backbone", "r18", f"data.root={shards}", f"run.root={root}",
            "run.max_steps_per_epoch=3", "run.log_every_steps=1", "data.num_workers=1",
            f"tasks.pneumonia.epochs={epochs}", "tasks.pneumonia.batch_size=4",
            "eval.bootstrap=0", *extra]


def out_dir(root):
    return root / "finetune" / "pneumonia_r18_scratch"


def saved_step(run_dir) -> int:
    return torch.load(run_dir / "checkpoint.pth", weights_only=True)["step"]


def test_a_second_launch_on_a_run_directory_in_use_is_refused_and_a_killed_ones_lock_is_taken_over(
        task_shards, tmp_path):
    """Two launches of two ranks on one directory at once: the second stops on every rank with
    one line naming the holder. After the holder's ranks are SIGKILLed (a lost node: its lock
    stays behind), a relaunch takes the lock over and resumes from the last checkpoint."""
    args = ft_args(task_shards, tmp_path, "run.checkpoint_every_steps=1", epochs=50)
    holder = start_ranks("finetune", 2, args)
    for line in holder[0].stdout:
        if line.startswith("step 2/"):
            break
    lock = json.loads((out_dir(tmp_path) / "run.lock").read_text())
    assert lock["pid"] == holder[0].pid and lock["host"] == socket.gethostname()
    # Paused (its lock stays fresh for 15 minutes), the holder leaves the 2 cores to the second
    # launch, whose start would otherwise compete with two training ranks.
    for p in holder:
        p.send_signal(signal.SIGSTOP)

    codes, outs = finish_ranks(start_ranks("finetune", 2, args), timeout=300)
    assert codes == [2, 2], outs
    for out in outs:
        refusal = [line for line in out.splitlines() if "error" in line]
        assert len(refusal) == 1, out
        assert re.search(rf"in use by pid {holder[0].pid} on {re.escape(socket.gethostname())}",
                         refusal[0]), refusal
    assert all(p.poll() is None for p in holder)  # the refused launch left the holder alone

    for p in holder:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    killed_at = saved_step(out_dir(tmp_path))
    resumed = start_ranks("finetune", 2, args)
    text = ""
    for line in resumed[0].stdout:
        text += line
        if line.startswith(f"step {killed_at + 1}/"):
            break
    resumed[1].send_signal(signal.SIGTERM)
    codes, outs = finish_ranks(resumed, timeout=120)
    text += outs[0]
    assert codes == [128 + signal.SIGTERM] * 2, text
    assert f"took over the lock of pid {holder[0].pid}" in text, text
    assert f"resuming at step {killed_at}" in text, text
    assert not (out_dir(tmp_path) / "run.lock").exists()  # released at the stop


def test_a_nan_loss_stops_every_rank_in_one_line_without_saving_it(task_shards, tmp_path):
    """An LR that blows the weights up: the first non-finite step stops both ranks with one
    line, and the checkpoint on disk is the last finite step's."""
    args = ft_args(task_shards, tmp_path, "tasks.pneumonia.lr=1e30",
                   "run.checkpoint_every_steps=1")
    codes, outs = finish_ranks(start_ranks("finetune", 2, args), timeout=300)
    assert codes == [1, 1], outs
    lines = [line for line in outs[0].splitlines() if "non-finite" in line]
    assert len(lines) == 1 and not any("non-finite" in line for line in outs[1].splitlines())
    step = int(re.search(r"at step (\d+)", lines[0]).group(1))
    assert step >= 2, lines  # step 1 ran from finite weights
    assert f"the last checkpoint, of step {step - 1}," in lines[0]
    ckpt = torch.load(out_dir(tmp_path) / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == step - 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out_dir(tmp_path) / "results.json").exists()


def test_provenance_eta_and_position_of_a_run(task_shards, tmp_path):
    """provenance.json records the code, the packages, the world and its hosts (one entry per
    start); step lines and TensorBoard carry the ETA and where in the stage the run is."""
    args = ft_args(task_shards, tmp_path, epochs=2)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    out = run_ranks("finetune", 2, args)
    run_dir = out_dir(tmp_path)
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(steps) == 6 and steps[0].startswith("step 1/6 epoch 0 ")
    assert re.search(r" eta \d+s$", steps[0]) and steps[-1].endswith(" eta 0s"), steps
    eta = read_scalars(run_dir / "tb")["train/eta_s"]
    assert [s for s, _ in eta] == list(range(1, 7)) and eta[-1][1] == 0

    record, = json.loads((run_dir / "provenance.json").read_text())
    assert record["code"]["commit"] == head
    assert record["world_size"] == 2 and record["hosts"] == [socket.gethostname()]
    assert record["versions"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    assert record["stage"] == "finetune"


def test_without_a_gpu_a_stage_starts_only_when_cpu_is_intended(task_shards, tmp_path, capsys):
    from muscle_hpc.stages import finetune

    args = ft_args(task_shards, tmp_path, "run.allow_cpu=false")
    assert finetune.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.allow_cpu" in err and "no GPU" in err
    assert not out_dir(tmp_path).exists()
    paper = config.load(ROOT / "configs/finetune.yaml", [], config.FinetuneConfig)
    assert not paper.run.allow_cpu  # the paper's configs refuse; the demo's allow it
    assert config.load(ROOT / "configs/finetune_demo.yaml", [], config.FinetuneConfig
                       ).run.allow_cpu


@pytest.mark.parametrize("stage", ["mdmoco", "continual"])
def test_every_stage_takes_the_lock(stage, tmp_path, capsys):
    """The prelude is shared: a held lock refuses each stage before it trains."""
    from muscle_hpc import runlock
    from muscle_hpc.stages import continual, mdmoco

    run_dir = tmp_path / "run"
    demo = ROOT / "configs" / f"{stage}_demo.yaml"
    common = [f"run.dir={run_dir}", "run.allow_cpu=true"]
    synthetic = {"mdmoco": ["data.synthetic=16", "data.batch_size=4", "model.K=16",
                            "model.bn_groups=2",
                            "run.monitor_every_steps=0"],
                 "continual": ["data.synthetic=8", "model.init=''"]}[stage]
    main = {"mdmoco": mdmoco.main, "continual": continual.main}[stage]
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        with runlock.acquire(run_dir, log=None):
            assert main(["--config", str(demo), *common, *synthetic]) == 2
    finally:
        os.environ.update(env)
    err = capsys.readouterr().err
    assert f"in use by pid {os.getpid()}" in err and err.count("\n") == 1
    assert not (run_dir / "checkpoint.pth").exists()


SYNTHETIC_MOCO = ["--config", str(ROOT / "configs" / "mdmoco_demo.yaml"), "data.synthetic=16",
                  "data.batch_size=4", "model.K=16", "model.bn_groups=2",
                  "run.monitor_every_steps=0", "run.allow_cpu=true"]


def test_a_checkpoint_that_fills_the_disk_stops_every_rank_in_one_line(tmpfs):
    """Two ranks on a real tmpfs with room for one checkpoint (~138 MB at ZeRO 0) but not
    two: step 1's is saved, step 2's does not fit. Both ranks stop with one status; rank 0
    says in one line which file system, how much the file needs and how much is free; step 1
    stays the checkpoint and nothing of step 2 is left (a stray rank file would look like
    part of a checkpoint)."""
    fs = tmpfs.mount("200m")
    run_dir = fs / "run"
    codes, outs = finish_ranks(start_ranks("mdmoco", 2, [
        *SYNTHETIC_MOCO, f"run.dir={run_dir}", "run.checkpoint_every_steps=1",
        "run.max_steps=3"]))
    assert codes == [4, 4], outs
    assert not any("Traceback" in out for out in outs), outs
    errors = [line for line in outs[0].splitlines() if "error" in line]
    assert len(errors) == 1 and "error" not in outs[1], outs
    saved = run_dir / "checkpoint.pth"
    found = re.fullmatch(rf"mdmoco: error: checkpoint of step 2 not saved: {re.escape(str(saved))}"
                         rf": No space left on device on the tmpfs file system mounted at "
                         rf"{re.escape(str(fs))}: the file needs ([\d.]+) MiB, ([\d.]+) MiB "
                         rf"free; the last checkpoint, of step 1, is in "
                         rf"{re.escape(str(saved))}", errors[0])
    assert found, errors[0]
    need, free = (float(x) * 2**20 for x in found.groups())
    assert need == pytest.approx(saved.stat().st_size, abs=0.06 * 2**20)  # the same shapes
    assert free < need
    assert torch.load(saved, weights_only=True)["step"] == 1
    assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == [
        "step000000001-rank0.pth", "step000000001-rank1.pth"]
    assert not [p for p in run_dir.rglob(".*tmp*")]


def test_a_run_dir_that_cannot_be_one_is_refused_in_one_line(tmp_path, tmpfs, capsys):
    """A run.dir that is a file, or on a read-only file system (new, or a finished run's):
    status 2 and one line naming the path and the problem, not an OSError's traceback."""
    from muscle_hpc.stages import mdmoco

    def error(run_dir) -> str:
        env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
        try:
            assert mdmoco.main([*SYNTHETIC_MOCO, f"run.dir={run_dir}"]) == 2
        finally:
            os.environ.update(env)
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    afile = tmp_path / "notes.txt"
    afile.write_text("mine\n")
    assert error(afile) == (f"mdmoco: error: {afile} exists and is not a directory: move it "
                            f"away or choose another run directory\n")
    assert error(afile / "run") == (f"mdmoco: error: {afile / 'run'}: cannot create the run "
                                    f"directory: {afile} is not a directory\n")
    assert afile.read_text() == "mine\n"

    fs = tmpfs.mount("1m")
    (fs / "finished").mkdir()
    tmpfs.read_only(fs)
    assert error(fs / "new" / "run") == (f"mdmoco: error: {fs / 'new' / 'run'}: cannot create "
                                         f"the run directory: Read-only file system "
                                         f"({fs / 'new'})\n")
    assert error(fs / "finished") == (f"mdmoco: error: {fs / 'finished'}: cannot write in the "
                                      f"run directory: Read-only file system; a run needs it "
                                      f"writable\n")
