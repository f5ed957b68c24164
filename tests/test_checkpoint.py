"""Rolling checkpoints: atomic under SIGKILL, weights_only, RNG round trip."""

import argparse
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from muscle_hpc import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_round_trip_and_absent(tmp_path):
    assert checkpoint.load(tmp_path / "none.pth") is None
    state = {"step": 3, "w": torch.arange(5.0), "nested": {"queue": torch.ones(2, 4)}}
    checkpoint.save(tmp_path / "checkpoint.pth", state)
    back = checkpoint.load(tmp_path / "checkpoint.pth")
    assert back["step"] == 3 and torch.equal(back["w"], state["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_code_in_a_checkpoint_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(checkpoint.UnsafeFileError) as refused:
        checkpoint.load(tmp_path / "evil.pth")
    assert str(refused.value) == (f"{tmp_path / 'evil.pth'} holds objects other than tensors "
                                  f"(print) and is refused for safety: loading them "
                                  f"could run code")


def test_export_refuses_a_file_with_objects_in_one_line_without_suggesting_to_run_them(
        tmp_path, capsys):
    """torch's own refusal tells the user to retry with weights_only=False, i.e. to run
    whatever the file holds; the export says why it refuses and nothing more."""
    from muscle_hpc import export

    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {}, "config": argparse.Namespace(arch="resnet18")}, path)
    assert export.main([str(path), "--out", str(tmp_path / "b.pth")]) == 2
    err = capsys.readouterr().err
    assert err == (f"export: error: {path} holds objects other than tensors "
                   f"(argparse.Namespace) and is refused for safety: loading them could run "
                   f"code\n")
    assert not (tmp_path / "b.pth").exists()


def test_an_export_onto_a_full_file_system_is_one_line(tmp_path, tmpfs, capsys):
    from muscle_hpc import export
    from muscle_hpc.models.backbone import build_backbone

    trunk = build_backbone("resnet18", in_chans=1).state_dict()
    path = tmp_path / "checkpoint.pth"
    checkpoint.save(path, {"model": {f"encoder_q.{k}": v for k, v in trunk.items()},
                           "config": {"model": {"arch": "resnet18"},
                                      "data": {"mean": 122.786, "std": 18.39}}, "step": 3})
    out = tmpfs.mount("1m") / "backbone.pth"  # a ResNet-18 is ~45 MB
    assert export.main([str(path), "--out", str(out), "--size", "80x50"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"export: error: {out}: No space left on "
                                                    "device on the tmpfs file system"), err
    assert not list(out.parent.iterdir())


def test_a_full_file_system_says_so_in_one_line_and_keeps_the_last_file(tmpfs):
    """A save that does not fit names the file system and the bytes, leaves the previous file
    as it was and no part of the new one."""
    fs = tmpfs.mount("1m")
    path = fs / "checkpoint.pth"
    checkpoint.save(path, {"version": 1, "x": torch.zeros(150_000)})  # 600 KB of 1 MiB
    with pytest.raises(checkpoint.NoSpaceError) as full:
        checkpoint.save(path, {"version": 2, "x": torch.ones(150_000)})
    message = str(full.value)
    found = re.fullmatch(rf"{re.escape(str(path))}: No space left on device on the tmpfs file "
                         rf"system mounted at {re.escape(str(fs))}: the file needs "
                         rf"([\d.]+) KiB, ([\d.]+) KiB free", message)
    assert found, message
    need, free = (float(x) * 1024 for x in found.groups())
    assert need == pytest.approx(path.stat().st_size, abs=52)  # the same shapes
    assert free == pytest.approx(shutil.disk_usage(fs).free, abs=52) and free < need
    assert [p.name for p in fs.iterdir()] == ["checkpoint.pth"]  # no temporary file left
    back = checkpoint.load(path)
    assert back["version"] == 1 and torch.equal(back["x"], torch.zeros(150_000))


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    checkpoint.save(tmp_path / "c.pth", {"rng": checkpoint.rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "c.pth")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_saved_state_dicts_keep_their_metadata_and_containers(tmp_path):
    """Tensors are written from host memory (a GPU run's files load on a CPU-only host); the
    containers around them come back as they were, a state dict's version metadata included."""
    state = torch.nn.BatchNorm2d(3).state_dict()
    rng = checkpoint.rng_state()
    checkpoint.save(tmp_path / "c.pth", {"model": state, "rng": rng, "steps": [1, (2, 3)]})
    back = checkpoint.load(tmp_path / "c.pth", map_location=None)
    assert type(back["model"]) is type(state) and back["model"]._metadata == state._metadata
    assert all(torch.equal(back["model"][k], v) for k, v in state.items())
    assert back["steps"] == [1, (2, 3)] and back["rng"]["python"] == rng["python"]
    assert all(t.device.type == "cpu" for t in back["model"].values())


WRITER = """
import sys, torch
from muscle_hpc import checkpoint
path = sys.argv[1]
checkpoint.save(path, {"version": 1, "x": torch.zeros(10)})
print("first", flush=True)
while True:  # keep rewriting a large checkpoint until killed
    checkpoint.save(path, {"version": 2, "x": torch.rand(40_000_000)})
"""


def test_kill_during_save_keeps_the_last_complete_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first"
    deadline = time.time() + 60
    while not list(tmp_path.glob(".checkpoint.pth.tmp-*")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = checkpoint.load(path)
    assert state["version"] in (1, 2)
    assert state["x"].numel() in (10, 40_000_000)
