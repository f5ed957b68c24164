"""A shard is the one its manifest describes, or nothing reads it: sizes and sample counts are
checked whenever a shard is opened, SHA-256s by ``data_prep.verify`` and ``convert --verify``.
Real shards, cut, swapped and rewritten on disk."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import ROOT

from data_prep import convert, shard, verify
from muscle_hpc.data import ShardError, open_shard


@pytest.fixture
def shards(task_shards, tmp_path):
    """A private copy of the tiny demo's task shards, free to damage."""
    out = tmp_path / "shards"
    for name in ("pneumonia", "mura"):
        shutil.copytree(task_shards / name, out / name)
    return out


def one_line_refusal(shards, dataset="mura", split="train") -> str:
    with pytest.raises(ShardError) as e:
        open_shard(shards, dataset, split)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_the_beton_header_is_read_as_ffcv_reads_it(shards):
    from ffcv.reader import Reader
    from ffcv.types import HeaderType

    assert shard.BETON_HEADER == HeaderType
    path = shards / "mura" / "train.beton"
    assert shard.beton_count(path) == Reader(str(path)).num_samples == 28


def test_a_shard_cut_short_is_refused_on_opening_and_by_verify(shards, capsys):
    path = shards / "mura" / "train.beton"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 40)  # it used to train, its last sample read as an all-zero image
    assert one_line_refusal(shards) == (
        f"mura/train: {path} is {size - 40:,} bytes, its manifest says {size:,} (cut short, "
        "replaced or changed since it was converted: convert it again)")
    assert verify.main([str(shards)]) == 1
    out = capsys.readouterr()
    assert f"mura/train: MISMATCH: {path} is {size - 40:,} bytes" in out.out
    assert "pneumonia/train: ok (32 images)" in out.out and "mura/test: ok" in out.out
    assert out.err.strip().splitlines() == [
        "error: 1 split(s) differ from their manifest; convert them again (--force)"]


def test_another_datasets_shard_in_its_place_is_refused(shards):
    """mura/train.beton replaced by pneumonia's: the fine-tune said "28 training images" and
    trained on pneumonia's 32."""
    shutil.copy(shards / "pneumonia" / "train.beton", shards / "mura" / "train.beton")
    assert "its manifest says" in one_line_refusal(shards)


def test_a_count_or_bytes_that_differ_at_the_same_size_are_caught(shards, capsys):
    path = shards / "mura" / "train.beton"
    header = np.fromfile(path, dtype=shard.BETON_HEADER, count=1)
    header["num_samples"] += 1
    with open(path, "r+b") as f:
        f.write(header.tobytes())
    assert f"{path} holds 29 samples, its manifest says 28" in one_line_refusal(shards)
    header["num_samples"] -= 1
    with open(path, "r+b") as f:
        f.write(header.tobytes())
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    open_shard(shards, "mura", "train")  # the cheap check cannot see it
    assert verify.main([str(shards / "mura")]) == 1
    assert f"mura/train: MISMATCH: {path}: SHA-256 differs" in capsys.readouterr().out
    groups = shards / "pneumonia" / "valid.groups.npy"
    np.save(groups, np.load(groups)[::-1].copy())
    assert verify.main([str(shards / "pneumonia")]) == 1
    assert f"pneumonia/valid: MISMATCH: {groups} is missing or differs" in \
        capsys.readouterr().out


def test_a_manifest_from_before_the_checks_is_refused_with_what_to_do(shards):
    manifest_path = shards / "mura" / "manifest.json"
    m = json.loads(manifest_path.read_text())
    for info in m["splits"].values():
        del info["bytes"], info["sha256"]
    manifest_path.write_text(json.dumps(m))
    assert one_line_refusal(shards) == ("mura/train: its manifest predates shard checks "
                                        "(converter format < 3): convert it again, the "
                                        "converter redoes it")


def test_stages_refuse_a_cut_shard_in_one_line_naming_it(shards, tmp_path, capsys):
    """MD-MoCo used to blame ``data.batch_size: negative dimensions are not allowed`` and the
    fine-tune showed FFCV's traceback."""
    from muscle_hpc.stages import finetune, mdmoco

    path = shards / "pneumonia" / "train.beton"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        assert mdmoco.main(["--config", str(ROOT / "configs/mdmoco_demo.yaml"),
                            f"data.root={shards}", "data.datasets=pneumonia",
                            f"run.dir={tmp_path / 'moco'}", "run.allow_cpu=true",
                            "run.monitor_every_steps=0"]) == 2
        moco_err = capsys.readouterr().err
        assert finetune.main(["--config", str(ROOT / "configs/finetune_demo.yaml"), "--task",
                              "pneumonia", "--init", "scratch", "--backbone", "r18",
                              f"data.root={shards}", f"run.root={tmp_path / 'ft'}"]) == 2
        ft_err = capsys.readouterr().err
    finally:
        os.environ.update(env)
    for stage, err in (("mdmoco", moco_err), ("finetune", ft_err)):
        assert err.count("\n") == 1 and err.startswith(f"{stage}: error: pneumonia/train: "
                                                       f"{path} is "), err
    assert "batch_size" not in moco_err


def test_convert_verify_checks_a_finished_conversion(tmp_path, capsys):
    from conftest import make_flat_dataset

    spec = make_flat_dataset(tmp_path / "src", "flat", 12, 90)
    convert.convert_dataset(spec, tmp_path / "src" / "flat", tmp_path / "out", size=(40, 24),
                            log=lambda *_: 0)
    assert verify.main([str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip().splitlines() == ["flat/train: ok (12 images)"]
    m = json.loads((tmp_path / "out/flat/manifest.json").read_text())
    beton = tmp_path / "out/flat/train.beton"
    assert m["splits"]["train"]["bytes"] == beton.stat().st_size
    assert m["splits"]["train"]["sha256"] == shard.sha256(beton)
    assert verify.main([str(tmp_path / "src")]) == 2
    assert "no converted dataset (manifest.json)" in capsys.readouterr().err
    args = ["--dataset", "flat", "--layout", "folders", "--root", str(tmp_path / "src2/flat"),
            "--out", str(tmp_path / "out2"), "--size", "40x24", "--workers", "1", "--role",
            "pretrain", "--verify"]
    make_flat_dataset(tmp_path / "src2" / "flat", "gray", 6, 90)  # one class folder, "gray"
    assert convert.main(args) == 0
    assert "flat/train: ok (6 images)" in capsys.readouterr().out
    with open(tmp_path / "out2/flat/train.beton", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01" if f.read(1) != b"\x01" else b"\x02")
    assert convert.main(args) == 2  # already converted, but its shard changed since
    out = capsys.readouterr()
    assert "flat/train: MISMATCH" in out.out
    assert out.err.strip() == (f"error: flat: shards in {tmp_path / 'out2/flat'} differ from "
                               "their manifest; convert again with --force")
