"""Every converter on the demo layouts, checked against what the generator planted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep import convert
from data_prep.datasets import NAMES, get_spec
from muscle_hpc.data import TaskLoader, open_shard

ROOT = Path(__file__).resolve().parents[1]
SIZE = (64, 40)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    from data_prep.synth import generate

    base = tmp_path_factory.mktemp("demo")
    truth = generate(base / "downloads", scale="tiny", seed=0)
    rc = convert.main(["--dataset", "all", "--root", str(base / "downloads"), "--out",
                       str(base / "shards"), "--size", "64x40", "--workers", "2"])
    assert rc == 0
    return base, truth


def _manifest(base, name):
    return json.loads((base / "shards" / name / "manifest.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_counts_labels_and_rejects(demo, name):
    base, truth = demo
    t, m = truth[name], _manifest(base, name)
    assert m["dataset"] == name and m["size"] == list(SIZE)
    assert sum(s["count"] for s in m["splits"].values()) == t["usable"]
    rejects = {r["path"]: r["reason"] for r in m["rejects"]}
    for planted in t["planted_rejects"]:
        assert planted["path"] in rejects, f"{planted} not rejected"
        assert rejects[planted["path"]].startswith(planted["reason"]), rejects[planted["path"]]
    assert len(rejects) == len(t["planted_rejects"])
    for junk in t["junk"]:
        assert junk not in rejects
    if "label_counts" in t and t["label_counts"]:
        got = {}
        for s in m["splits"].values():
            for k, v in s.get("label_counts", {}).items():
                got[k] = got.get(k, 0) + v
        names = get_spec(name).label_names
        want = {(names[int(k)] if k.isdigit() and name != "nih" else k): v
                for k, v in t["label_counts"].items() if v}
        assert {k: v for k, v in got.items() if v and k != "unlabeled"} == want
    if "masks" in t:
        assert sum(s.get("masks", 0) for s in m["splits"].values()) == t["masks"]


def test_task_sets_split_80_10_10_and_tbx_task(demo):
    base, truth = demo
    for name in ("pneumonia", "mura", "chestmasks", "tbx11k"):
        splits = _manifest(base, name)["splits"]
        counts = {s: splits[s]["count"] for s in ("train", "valid", "test")}
        assert all(counts.values()), (name, counts)
        assert counts["train"] > counts["valid"] + counts["test"]
    m = _manifest(base, "tbx11k")
    task = sum(m["splits"][s]["count"] for s in ("train", "valid", "test"))
    assert task == truth["tbx11k"]["task_images"]
    assert sum(m["splits"][s]["boxes"] for s in ("train", "valid", "test")) == \
        truth["tbx11k"]["boxes"]
    assert m["splits"]["extra"]["count"] == truth["tbx11k"]["usable"] - task
    for s in ("train", "valid", "test"):
        assert m["splits"][s]["images_with_boxes"] == m["splits"][s]["count"]


def test_pretraining_sets_go_to_train(demo):
    base, _ = demo
    for name in ("nih", "shenzhen", "montgomery", "indiana", "boneage"):
        assert set(_manifest(base, name)["splits"]) == {"train"}


def test_masks_and_boxes_are_stored_at_the_shard_size(demo):
    base, _ = demo
    seg = TaskLoader(open_shard(base / "shards", "chestmasks", "train"), 4, "segmentation",
                     train=False, num_workers=1)
    batch = next(iter(seg))
    assert batch["mask"].shape == (4, SIZE[1], SIZE[0])
    assert set(batch["mask"].unique().tolist()) <= {0, 1} and batch["mask"].any()
    det = TaskLoader(open_shard(base / "shards", "tbx11k", "train"), 4, "detection",
                     train=False, num_workers=1)
    for batch in det:
        for boxes, labels in zip(batch["boxes"], batch["box_labels"]):
            assert len(boxes) == len(labels) >= 1
            assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 1] < boxes[:, 3]).all()
            assert boxes[:, 2].max() <= SIZE[0] and boxes[:, 3].max() <= SIZE[1]
            assert set(labels.tolist()) <= {1, 2, 3}


def test_second_run_is_a_no_op_and_bad_arguments_are_one_line(demo, capsys):
    base, _ = demo
    before = (base / "shards" / "mura" / "train.beton").stat().st_mtime_ns
    args = ["--dataset", "mura", "--root", str(base / "downloads" / "MURA-v1.1"), "--out",
            str(base / "shards"), "--size", "64x40"]
    assert convert.main(args) == 0
    assert "already converted" in capsys.readouterr().out
    assert (base / "shards" / "mura" / "train.beton").stat().st_mtime_ns == before
    assert convert.main([*args[:-1], "64by40"]) == 2
    assert convert.main(["--dataset", "nih", "--root", str(base / "nowhere"), "--out",
                         str(base / "x")]) == 2
    assert convert.main(["--dataset", "chestmasks", "--root",
                         str(base / "downloads" / "Lung Segmentation"), "--out",
                         str(base / "x"), "--split", "official"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)


def _run_cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "data_prep.convert", *args], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def _shard_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.beton"))}


def test_killed_run_leaves_nothing_complete_and_rerun_finishes(demo, tmp_path):
    base, _ = demo
    root = base / "downloads" / "ChestX-ray14"
    args = ["--dataset", "nih", "--root", str(root), "--size", "800x500", "--workers", "1"]
    clean = tmp_path / "clean"
    assert _run_cli([*args, "--out", str(clean)]).wait(timeout=300) == 0

    out = tmp_path / "killed"
    proc = _run_cli([*args, "--out", str(out)])
    deadline = time.time() + 120
    while not list(out.glob(".nih.partial-*/.train.images.npy")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "nih").exists()  # nothing that looks complete
    assert list(out.glob(".nih.partial-*"))  # the kill really happened mid-run

    assert _run_cli([*args, "--out", str(out)]).wait(timeout=300) == 0
    assert not list(out.glob(".nih.*"))
    assert _shard_bytes(out / "nih") == _shard_bytes(clean / "nih")
    m_clean, m_rerun = (json.loads((d / "nih/manifest.json").read_text()) for d in (clean, out))
    assert m_clean == m_rerun

    # SIGTERM (scancel) cleans up after itself, decode pool included
    proc = _run_cli([*args[:-1], "2", "--out", str(tmp_path / "term"), "--force"])
    deadline = time.time() + 120
    while not list((tmp_path / "term").glob(".nih.partial-*")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not list((tmp_path / "term").glob("*"))


def test_a_second_conversion_into_the_same_out_is_refused_while_the_first_runs(demo, tmp_path):
    """It used to delete the staging folder the first was writing (FileNotFoundError there)."""
    base, _ = demo
    args = ["--dataset", "nih", "--root", str(base / "downloads" / "ChestX-ray14"), "--size",
            "800x500", "--workers", "1", "--out", str(tmp_path / "out")]
    first = _run_cli(args)
    try:
        deadline = time.time() + 120
        while not list((tmp_path / "out").glob(".nih.partial-*/.train.images.npy")) \
                and time.time() < deadline:
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # a live conversion, mid-way
        (staging,) = (tmp_path / "out").glob(".nih.partial-*")
        second = subprocess.run([sys.executable, "-m", "data_prep.convert", *args], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)},
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"error: nih: another conversion into {tmp_path / 'out'} is running ("), err
        assert f"pid {first.pid}" in err[0]
        assert staging.is_dir()
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    assert (tmp_path / "out/nih/manifest.json").is_file()
    assert not list((tmp_path / "out").glob(".nih.*"))


def test_stored_pixels_are_the_decoded_image(demo):
    """A shard holds exactly what imaging.decode makes of the file (no silent re-encoding)."""
    from data_prep.imaging import decode

    base, _ = demo
    spec = get_spec("shenzhen")
    records = spec.scan(base / "downloads" / "ChinaSet_AllFiles").records
    loader = TaskLoader(open_shard(base / "shards", "shenzhen", "train"), 1, "classification",
                        train=False, num_workers=1, mean=0.0, std=1.0)
    first = next(iter(loader))["image"][0, 0].numpy()
    np.testing.assert_array_equal(first, decode(records[0], SIZE).image.astype(np.float32))


def test_malformed_annotation_file_is_one_line(demo, tmp_path, capsys):
    import shutil

    base, _ = demo
    broken = tmp_path / "TBX11K"
    shutil.copytree(base / "downloads" / "TBX11K", broken)
    ann = broken / "annotations" / "json" / "TBX11K_train.json"
    ann.write_text(ann.read_text()[:200])
    assert convert.main(["--dataset", "tbx11k", "--root", str(broken), "--out",
                         str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: tbx11k: cannot read")
