"""bench.learning: the real stages end to end at --quick size, and its comparison rules."""

import json
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


@pytest.mark.timeout(900)
def test_quick_run_prints_every_init_and_writes_json_and_chart(tmp_path):
    work = tmp_path / "bl"
    proc = subprocess.run([sys.executable, "-m", "bench.learning", "--quick", "--seeds", "1",
                           "--fractions", "1", "--tasks", "pneumonia,lung", "--work", str(work)],
                          capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    for line in ("| pneumonia | auc | ", "| lung | dice | ", "mdmoco better than scratch",
                 "muscle better than muscle--", "goal (MD-MoCo and MUSCLE beat Scratch on >= 2",
                 "monitor/knn/pneumonia/auc: ", "Continual stage (muscle--)"):
        assert line in out
    results = json.loads((work / "learning.json").read_text())
    scores = results["summary"]["1"]["tasks"]["lung"]["scores"]
    assert set(scores) >= {"scratch", "mdmoco", "muscle--", "muscle"}
    assert all(len(v) == 1 and 0 <= v[0] <= 1 for v in scores.values())
    assert (work / "learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
