"""``python -m bench.stages``: the GPU check, run here on the CPU. ``--smoke`` takes every stage
through torchrun on 1 and 2 ranks (the two-backend group string on gloo), stops one by SIGTERM,
resumes it and compares it with an uninterrupted run, and loads every export on a host
without CUDA; the timing mode measures every step kind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


@pytest.mark.timeout(1200)  # 18 stage runs: ~3.5 min on 2 free cores, more on a busy machine
def test_smoke_runs_every_stage_resumes_bit_for_bit_and_exports_load_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.stages", "--smoke", "--dir",
                          str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "2 ranks on cpu:gloo,cuda:gloo" in out.stdout
    checks = {}
    for line in out.stdout.splitlines():
        if line.startswith("smoke: "):
            _, status, rest = line.split(maxsplit=2)
            checks[rest.split(" -- ")[0]] = status
    for stage in ("mdmoco", "continual", "finetune lung"):
        for what in ("2 ranks", "2 ranks, SIGTERM", "2 ranks, resumed"):
            assert checks[f"{stage} {what}"] == "ok"
        assert checks[f"{stage} resumed = uninterrupted"] == "ok"
    for alone in ("mdmoco 1 rank", "continual muscle-- 1 rank", "finetune lung 1 rank"):
        assert checks[alone] == "ok"
    loads = [k for k in checks if k.startswith("torch.load on CPU: ")]
    assert len(loads) == 3 and all(checks[k] == "ok" for k in loads)
    assert "0 check(s) failed" in out.stdout


@pytest.mark.timeout(900)
def test_timing_measures_every_step_kind():
    out = subprocess.run([sys.executable, "-m", "bench.stages", "--steps", "1", "--warmup", "1"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {line[:32].strip(): line[32:].split() for line in out.stdout.splitlines()}
    for step in ("mdmoco resnet18", "continual pneumonia resnet18", "continual lung resnet18",
                 "continual tbx resnet18", "finetune pneumonia resnet18",
                 "mdmoco resnet18 real shards"):
        batch, resident, fed = rows[step][:3]
        assert int(batch) >= 1 and float(resident) > 0 and float(fed) > 0
    assert "real shards / synthetic inputs" in out.stdout
