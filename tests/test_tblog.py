"""TensorBoard events are written on rank 0 only and read back; resume purges the tail."""

import torch

from muscle_hpc.tblog import RunLogger, read_image_tags, read_scalars


def test_scalars_and_images_read_back(tmp_path):
    log = RunLogger(tmp_path, rank=0)
    for step in range(5):
        log.scalars(step, prefix="train/", loss=1.0 / (step + 1), lr=0.03, skipped=None)
    log.image_grid("views", torch.randn(4, 1, 16, 24), step=4)
    log.close()
    scalars = read_scalars(tmp_path)
    assert set(scalars) == {"train/loss", "train/lr"}
    assert [s for s, _ in scalars["train/loss"]] == list(range(5))
    assert abs(scalars["train/loss"][2][1] - 1 / 3) < 1e-6
    assert read_image_tags(tmp_path) == ["views"]


def test_other_ranks_write_nothing(tmp_path):
    log = RunLogger(tmp_path / "r1", rank=1)
    log.scalars(0, loss=1.0)
    log.image_grid("v", torch.zeros(1, 1, 4, 4), 0)
    log.close()
    assert not (tmp_path / "r1").exists()


def test_resume_purges_steps_logged_after_the_checkpoint(tmp_path):
    first = RunLogger(tmp_path, rank=0)
    for step in range(10):
        first.scalars(step, loss=float(step))
    first.close()
    resumed = RunLogger(tmp_path, rank=0, purge_step=6)  # checkpoint was at step 6
    for step in range(6, 12):
        resumed.scalars(step, loss=100.0 + step)
    resumed.close()
    loss = read_scalars(tmp_path)["loss"]
    assert [s for s, _ in loss] == list(range(12))
    assert [v for s, v in loss if s >= 6] == [100.0 + s for s in range(6, 12)]
