"""bench.learning: the real stages end to end at --quick size, and its comparison rules."""

import json
import math
import subprocess
import sys

import pytest

from bench import learning


def test_beyond_the_seed_spread_means_the_mean_sd_intervals_do_not_overlap():
    assert learning.spread([0.7, 0.8, 0.9]) == pytest.approx((0.8, 0.1))
    assert learning.spread([0.5]) == (0.5, 0.0)
    assert learning.beats((0.9, 0.05), (0.7, 0.1))
    assert not learning.beats((0.9, 0.1), (0.75, 0.1))  # 0.8 < 0.85: within the spread
    assert not learning.beats((0.7, 0.0), (0.7, 0.0))


def test_a_diverged_seed_makes_its_cell_nan_and_it_neither_beats_nor_loses():
    # The full run's summary ended in statistics.stdev on Scratch's diverged TBX probe (NaN).
    mean, sd = learning.spread([0.2, math.nan, 0.3])
    assert math.isnan(mean) and math.isnan(sd)
    assert not learning.beats((mean, sd), (0.1, 0.0))
    assert not learning.beats((0.9, 0.0), (mean, sd))


def test_a_fraction_smaller_than_a_batch_stops_before_any_training(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.learning", "--quick", "--fractions",
                           "0.01", "--tasks", "lung", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "--fraction: 0.01 of the 24 lung training images is 1" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_options_are_one_line(capsys):
    with pytest.raises(SystemExit):
        learning.parse_args(["--tasks", "pneumonia,knee"])
    assert "--tasks: some of pneumonia, mura, lung, tbx" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        learning.parse_args(["--fractions", "0.1,2"])
    assert "--fractions: each in (0, 1]" in capsys.readouterr().err


def test_a_fine_tune_stopped_on_a_non_finite_loss_is_an_outcome_other_failures_end_it(
        task_shards, tmp_path):
    """The full benchmark once ended (exit 1) when Scratch's linear probe of TBX (identity
    batch norm, unnormalised features under Faster R-CNN) hit a NaN at step 24."""
    cmd = ["muscle_hpc.stages.finetune", "--task", "pneumonia", "--init", "scratch",
           "--backbone", "r18", "--config", str(learning.CONFIGS / "finetune_demo.yaml"),
           f"data.root={task_shards}", f"run.root={tmp_path / 'runs'}", "tasks.pneumonia.epochs=1",
           "run.max_steps_per_epoch=3", "data.num_workers=1"]
    marker = tmp_path / "diverged.json"
    learning.run([*cmd, "tasks.pneumonia.lr=1e30"], tmp_path / "nan.log", 1, diverged=marker)
    assert json.loads(marker.read_text())["stopped"].startswith("finetune: error: non-finite")
    with pytest.raises(SystemExit, match="failed \\(exit 2\\)"):  # a refused start still ends it
        learning.run([*cmd, "tasks.pneumonia.lr=-1"], tmp_path / "bad.log", 1,
                      diverged=tmp_path / "no.json")
    assert not (tmp_path / "no.json").exists()


@pytest.mark.timeout(1500)
def test_quick_run_prints_every_row_resumes_and_writes_json_and_chart(tmp_path):
    """The linear probe's rows (Scratch, Scratch-BN and the recipe's three inits) through the
    real stages at --quick size; the Scratch-BN init is Scratch's Kaiming trunk with batch-norm
    statistics of the task's training images. ``--resume`` on the finished benchmark runs no
    fine-tune again, keeps the stages' logs and gives the same tables; with other options it is
    refused in one line."""
    import torch

    from muscle_hpc.models.backbone import build_backbone, export_torchvision

    work = tmp_path / "bl"
    cmd = [sys.executable, "-m", "bench.learning", "--quick", "--seeds", "1", "--fractions", "1",
           "--tasks", "pneumonia,lung", "--views", "paper", "--protocols", "linear", "--work",
           str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    for line in ("model.m=0.99", "| task | metric | scratch | scratch-bn | mdmoco | muscle-- | "
                 "muscle |", "| pneumonia | auc | ", "| lung | dice | ",
                 "mdmoco better than scratch beyond", "mdmoco better than scratch-bn beyond",
                 "muscle better than muscle-- beyond", "MD-MoCo and MUSCLE beat scratch-bn on >= 2",
                 "monitor/knn/pneumonia/auc: ", "monitor/shortcut_top1: ",
                 "monitor/top1_in_batch: ",
                 "Continual stage [paper] (muscle--)", "not judged, this run does not include"):
        assert line in out, line
    results = json.loads((work / "learning.json").read_text())
    scores = results["summary"]["paper/linear/1"]["tasks"]["lung"]["scores"]
    assert set(scores) == {"scratch", "scratch-bn", "mdmoco", "muscle--", "muscle"}
    assert all(len(v) == 1 and 0 <= v[0] <= 1 for v in scores.values())
    assert results["goal"] is None
    assert (work / "learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    torch.manual_seed(0)
    scratch = export_torchvision(build_backbone("resnet18"))
    bn = torch.load(work / "runs" / "scratch_bn" / "pneumonia_s0.pth", weights_only=True)
    assert torch.equal(bn["layer4.1.conv2.weight"], scratch["layer4.1.conv2.weight"])
    assert torch.equal(scratch["bn1.running_var"], torch.ones(64))
    assert not torch.allclose(bn["bn1.running_var"], torch.ones(64), atol=1e-2)

    # Resumed on the finished run: no fine-tune again, the same tables; other options refused.
    stage_log = work / "logs" / "mdmoco_paper.log"
    before = stage_log.read_text()
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    after = stage_log.read_text()  # what a stage logged before the interruption is kept
    assert after.startswith(before) and len(after) > len(before)
    assert "bench.learning: 0 fine-tunes, two at a time (10 finished before, kept)" \
        in resumed.stdout
    again = json.loads((work / "learning.json").read_text())
    assert again["summary"] == results["summary"]
    other = subprocess.run([*cmd, "--seeds", "2", "--resume"], capture_output=True, text=True,
                           timeout=120)
    assert other.returncode == 1
    assert other.stderr.strip().splitlines() == [
        f"bench.learning: --resume: {work} holds a benchmark begun with other options (seeds was "
        f"1); run without --resume to start again"]
