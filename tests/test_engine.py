import os
import signal
import time

import pytest
import torch

from muscle_hpc import checkpoint
from muscle_hpc.engine import RollingCheckpoint, StepTimer, StopOnSignal


def test_stop_on_signal_raises_a_flag_and_restores_handlers():
    previous = signal.getsignal(signal.SIGUSR1)
    stop = StopOnSignal()
    try:
        assert stop.agreed() == (0,)
        assert stop.agreed(0, 1) == (0, 0, 1)  # one rank: its own flags
        os.kill(os.getpid(), signal.SIGUSR1)  # Slurm's warning before the time limit
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one reported
        assert stop.agreed() == (signal.SIGUSR1,)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_rolling_checkpoint_keeps_one_complete_step(tmp_path):
    ckpt = RollingCheckpoint(tmp_path, rank=0, world=1)
    assert ckpt.load() is None
    for step in (3, 6):
        ckpt.save(step, {"model": {"w": torch.full((2,), float(step))}},
                  {"rng": torch.tensor([step])})
    shared, own = ckpt.load()
    assert shared["step"] == 6 and shared["world_size"] == 1
    assert torch.equal(shared["model"]["w"], torch.full((2,), 6.0))
    assert own["step"] == 6 and int(own["rng"]) == 6
    assert [p.name for p in (tmp_path / "checkpoint").iterdir()] == ["step000000006-rank0.pth"]

    ckpt.save(6, {"model": {}, "config": {"model": {"K": 8}, "run": {"dir": "a"}}}, {})
    assert ckpt.load({"model": {"K": 8}, "run": {"dir": "b"}}, may_change=("run.",))
    with pytest.raises(ValueError, match=r"another config \(model.K: 8 -> 16\)"):
        ckpt.load({"model": {"K": 16}, "run": {"dir": "a"}}, may_change=("run.",))
    with pytest.raises(ValueError, match="written by 1 ranks; resume it with 1, not 4"):
        RollingCheckpoint(tmp_path, rank=0, world=4).load()
    (tmp_path / "checkpoint" / "step000000006-rank0.pth").unlink()
    with pytest.raises(ValueError, match="checkpoint of step 6 is incomplete"):
        ckpt.load()
    (tmp_path / "checkpoint.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        ckpt.load()


def test_step_timer_splits_waiting_from_the_rest():
    def slow_batches():
        for i in range(3):
            time.sleep(0.05)
            yield i

    timer = StepTimer()
    for _ in timer.timed(slow_batches()):
        time.sleep(0.05)
    images_per_s, wait, seconds_per_step = timer.window(images_per_step=10)
    assert 0.2 < wait < 0.8  # about half the time went to waiting for batches
    assert 0 < images_per_s <= 30 / 0.3  # 3 steps of 10 images took at least 0.3 s
    assert seconds_per_step >= 0.1  # each step waited 0.05 s and worked 0.05 s
    assert timer.window().seconds_per_step < 0.1  # a new window, with no step in it yet


def test_deterministic_kernels_on_and_off():
    from muscle_hpc.engine import select_kernels

    try:
        select_kernels(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        select_kernels(False)
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic


def test_a_checkpoint_that_does_not_fit_leaves_the_previous_one_and_no_file_of_its_own(tmpfs):
    """Step 2's own file fits, its checkpoint.pth does not: the one line says why, step 1
    stays the checkpoint, and no file of step 2 remains to be taken for part of it."""
    fs = tmpfs.mount("1m")
    ckpt = RollingCheckpoint(fs / "run", rank=0, world=1)
    ckpt.save(1, {"model": {"w": torch.zeros(150_000)}}, {"rng": torch.tensor([1])})
    with pytest.raises(checkpoint.NoSpaceError, match=rf"^{fs}/run/checkpoint.pth: No space "
                                                      rf"left on device on the tmpfs file "
                                                      rf"system mounted at {fs}: "):
        ckpt.save(2, {"model": {"w": torch.ones(150_000)}}, {"rng": torch.tensor([2])})
    assert sorted(p.name for p in (fs / "run").iterdir()) == ["checkpoint", "checkpoint.pth"]
    assert [p.name for p in (fs / "run" / "checkpoint").iterdir()] == ["step000000001-rank0.pth"]
    shared, own = ckpt.load()
    assert shared["step"] == own["step"] == 1 and not shared["model"]["w"].any()


def test_a_resume_refuses_what_would_change_the_checkpoints_layout_or_meaning(tmp_path):
    """ZeRO 0 keeps the optimizer state whole in checkpoint.pth, ZeRO 1 and 2 split over the
    ranks' files: a resume may move between 1 and 2, not across. A key the stage keeps (the
    continual stage's run.seed, which draws its visit order) is refused though run.* may
    change."""
    ckpt = RollingCheckpoint(tmp_path, rank=0, world=1)
    ckpt.save(4, {"config": {"run": {"zero_stage": 0, "seed": 0}}}, {})

    def resume(zero_stage, seed=0):
        return ckpt.load({"run": {"zero_stage": zero_stage, "seed": seed}}, ("run.",),
                         kept=("run.seed",))

    assert resume(0)
    with pytest.raises(ValueError) as refused:
        resume(1)
    assert str(refused.value) == (
        f"run.zero_stage: {tmp_path / 'checkpoint.pth'} was written with run.zero_stage=0, not "
        f"1: ZeRO 1 and 2 save the optimizer state split over the ranks, stage 0 whole, so "
        f"neither resumes the other; resume with run.zero_stage=0, or use a new run.dir")
    with pytest.raises(ValueError, match=r"another config \(run.seed: 0 -> 1\)"):
        resume(0, seed=1)

    ckpt.save(5, {"config": {"run": {"zero_stage": 2, "seed": 0}}}, {})
    assert resume(1) and resume(2)
    with pytest.raises(ValueError, match="resume with run.zero_stage=1 or 2, or use a new"):
        resume(0)
