"""Horizontal flips and classes that name a side of the body (issue 27, item 5).

A flipped radiograph puts the patient's left femoral head where the unflipped ones have the
right one; the training loader must rename it (``flip_pairs``, read from the class names by
``registry.lateral_partners``), or the task must not be flipped: otherwise the demo's hip task
learns each head on both sides. Checked on real shards: the demo's hip data converted by the
demo's own entry of ``configs/external_datasets.yaml`` and fine-tuned by its task in
``configs/external_demo.yaml``, and small classification and detection sets whose labels say a
side.
"""

import json

import numpy as np
import pytest
import yaml
from conftest import ROOT
from PIL import Image

from data_prep import convert
from data_prep.datasets import NAMES, get_spec
from data_prep.synth import external
from muscle_hpc import config, registry
from muscle_hpc.data.loaders import task_loader
from muscle_hpc.data.shards import open_shard
from muscle_hpc.stages import finetune
from muscle_hpc.tasks import build

DEMO = ROOT / "configs" / "external_demo.yaml"


def convert_ok(*args) -> None:
    assert convert.main([*map(str, args), "--workers", "1"]) == 0


@pytest.fixture(scope="module")
def hip_shards(tmp_path_factory):
    """The demo's hip data (tiny scale), converted by the demo's own dataset entry."""
    base = tmp_path_factory.mktemp("hip")
    external.hip(base / "downloads" / external.FOLDERS["hip"],
                 external.EXTERNAL_SCALES["tiny"], 0)
    entries = yaml.safe_load((ROOT / "configs" / "external_datasets.yaml").read_text())
    (base / "hip.yaml").write_text(yaml.safe_dump(
        {"datasets": [e for e in entries["datasets"] if e["name"] == "hip"]}))
    convert_ok("--datasets", base / "hip.yaml", "--root", base / "downloads", "--out",
               base / "shards", "--size", "64x40")
    return base / "shards"


def by_index(loader, field: str) -> dict[int, np.ndarray]:
    out = {}
    for batch in loader:
        for i, value in zip(batch["index"].tolist(), batch[field]):
            out[i] = value.numpy().copy() if hasattr(value, "numpy") else value
    return out


def loaders(shard, task, data_cfg):
    """One epoch of the training loader that flips every image, and the unflipped images."""
    flipped = task_loader(shard, 4, task, data_cfg, train=True, distributed=False)
    plain = task_loader(shard, 4, task, data_cfg, train=False, distributed=False)
    return flipped, plain


def image_side(columns: np.ndarray, width: int) -> str:
    """Which half of the image (as viewed) the mean column lies in."""
    return "image right" if columns.mean() > (width - 1) / 2 else "image left"


def test_lateral_partners_pair_names_that_differ_by_side_alone():
    lp = registry.lateral_partners
    assert lp(("background", "left_femoral_head", "right_femoral_head")) == {
        "left_femoral_head": "right_femoral_head", "right_femoral_head": "left_femoral_head"}
    assert lp(("Left lung", "right_lung", "heart")) == {"Left lung": "right_lung",
                                                        "right_lung": "Left lung"}
    assert lp(("LeftKnee", "RIGHT knee")) == {"LeftKnee": "RIGHT knee",
                                              "RIGHT knee": "LeftKnee"}
    assert lp(("L_hip", "R_hip", "pelvis")) == {"L_hip": "R_hip", "R_hip": "L_hip"}
    # a lone letter is no side; a side word without its mirror is one, unpaired
    assert lp(("background", "l", "grade_r")) == {}
    assert lp(("background", "left_knee", "right_hip")) == {"left_knee": None,
                                                           "right_hip": None}
    assert lp(("left_or_right", "none")) == {}
    # two spellings of one name: which is the mirror is ambiguous
    assert lp(("Left lung", "left_lung", "right_lung")) == dict.fromkeys(
        ("Left lung", "left_lung", "right_lung"))
    assert lp(("mild", "normal", "severe")) == {}


def test_the_nine_datasets_and_the_papers_tasks_name_no_side():
    for name in NAMES:
        spec = get_spec(name)
        for names in (spec.label_names, spec.box_categories, spec.mask_classes):
            assert registry.lateral_partners(names) == {}, (name, names)
    for task in registry.TASKS.values():
        assert task.mirrored == {} and task.unpaired_sides == ()


def test_a_flipped_hip_keeps_each_femoral_head_on_its_side(hip_shards):
    cfg = config.load(DEMO, [f"data.root={hip_shards}", "data.num_workers=1",
                             "data.flip_prob=1"], config.FinetuneConfig)
    shard = open_shard(hip_shards, "hip", "train")
    task = build(config.with_classes(cfg.definition("hip"), shard.class_names("segmentation")))
    assert task.classes == ("background", "left_femoral_head", "right_femoral_head")
    flipped, plain = (by_index(ld, "mask") for ld in loaders(shard, task, cfg.data))
    assert len(flipped) >= 8
    width = shard.size[0]
    for i, mask in flipped.items():
        for k, side in ((1, "image right"), (2, "image left")):
            # the patient's left is on the image's right (as viewed), flipped or not
            assert image_side(np.nonzero(plain[i] == k)[1], width) == side
            assert image_side(np.nonzero(mask == k)[1], width) == side, (i, task.classes[k])
        assert np.array_equal(mask, np.array([0, 2, 1])[plain[i][:, ::-1]]), i


@pytest.fixture(scope="module")
def side_sets(tmp_path_factory):
    """A classification set whose labels say the side of a bright spot (left, none, right)
    and a detection set of one box a image, of category left_nodule or right_nodule: each on
    the image's right for the patient's left."""
    base = tmp_path_factory.mktemp("sides")
    rng = np.random.default_rng(0)
    doc = {"images": [], "annotations": [],
           "categories": [{"id": 1, "name": "left_nodule"}, {"id": 2, "name": "right_nodule"}]}
    for i in range(24):
        label = ("left", "none", "right")[i % 3]
        img = rng.integers(0, 40, (32, 32), dtype=np.uint8)
        if label != "none":
            x = 22 if label == "left" else 4
            img[12:18, x:x + 6] = 250
        (base / "cls" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(base / "cls" / label / f"{i:03d}.png")
        (base / "det" / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(base / "det" / "images" / f"{i:03d}.png")
        doc["images"].append({"id": i, "file_name": f"{i:03d}.png", "width": 32,
                              "height": 32})
        side = 1 + i % 2
        doc["annotations"].append({"id": i, "image_id": i, "category_id": side,
                                   "bbox": [22 if side == 1 else 4, 10, 6, 6]})
    (base / "det" / "boxes.json").write_text(json.dumps(doc))
    out = base / "shards"
    convert_ok("--dataset", "spot", "--layout", "folders", "--root", base / "cls", "--out", out,
               "--size", "32x32")
    convert_ok("--dataset", "nodules", "--layout", "coco", "--root", base / "det", "--images",
               "images", "--coco", "boxes.json", "--out", out, "--size", "32x32")
    return out


def task_of(shards, name: str, kind: str):
    cfg = config.load(None, [f"data.root={shards}", "data.num_workers=1", "data.flip_prob=1",
                             f"tasks.{name}={{dataset: {name}, kind: {kind}}}"],
                      config.FinetuneConfig)
    shard = open_shard(shards, name, "train")
    task = build(config.with_classes(cfg.definition(name), shard.class_names(kind)))
    task.check(shard)
    return cfg, shard, task


def test_a_flipped_label_that_says_a_side_is_swapped(side_sets):
    cfg, shard, task = task_of(side_sets, "spot", "classification")
    assert task.classes == ("left", "none", "right")
    flipped_loader, plain_loader = loaders(shard, task, cfg.data)
    labels = by_index(flipped_loader, "label")
    images = by_index(flipped_loader, "image")
    assert len(labels) >= 16
    plain = by_index(plain_loader, "label")
    for i, label in labels.items():
        name = task.classes[int(label)]
        assert name == {"left": "right", "right": "left", "none": "none"}[
            task.classes[int(plain[i])]], i
        if name != "none":
            spot = np.nonzero(images[i][0] == images[i][0].max())[1]
            assert image_side(spot, 32) == ("image right" if name == "left" else "image left")


def test_a_flipped_box_of_a_side_keeps_its_side(side_sets):
    cfg, shard, task = task_of(side_sets, "nodules", "detection")
    assert task.classes == ("left_nodule", "right_nodule")
    flipped = task_loader(shard, 4, task, cfg.data, train=True, distributed=False)
    seen = 0
    for batch in flipped:
        for boxes, cats in zip(batch["boxes"], batch["box_labels"]):
            for box, cat in zip(boxes.numpy(), cats.tolist()):
                centre = np.array([(box[0] + box[2]) / 2])
                assert image_side(centre, 32) == (
                    "image right" if task.classes[cat - 1] == "left_nodule" else "image left")
                seen += 1
    assert seen >= 16


def test_a_side_without_its_mirror_is_refused_before_training(hip_shards, tmp_path, capsys):
    (tmp_path / "tasks.yaml").write_text(
        f"base: {DEMO}\ntasks:\n  lefty: {{dataset: hip, kind: segmentation, "
        f"classes: [background, left_femoral_head, other_head], batch_size: 4}}\n")
    args = ["--config", str(tmp_path / "tasks.yaml"), "--init", "scratch", "--backbone",
            "r18", "--check", f"data.root={hip_shards}", f"run.root={tmp_path}"]
    assert finetune.main([*args, "--task", "lefty"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert ("tasks.lefty.flip_pairs: class left_femoral_head names a side and has no mirror "
            "class") in err
    assert "or set data.flip_prob=0" in err
    for fix in ("data.flip_prob=0", "tasks.lefty.flip_pairs={left_femoral_head: other_head}",
                "tasks.lefty.flip_pairs={}"):
        assert finetune.main([*args, "--task", "lefty", fix]) == 0, capsys.readouterr().err
    assert finetune.main([*args, "--task", "lefty",
                          "tasks.lefty.flip_pairs={left_femoral_head: right}"]) == 2
    assert "tasks.lefty.flip_pairs: {class: its mirror class}" in capsys.readouterr().err
    assert finetune.main([*args, "--task", "hip"]) == 0  # the demo's: pairs from its names
    assert not (tmp_path / "finetune").exists()
