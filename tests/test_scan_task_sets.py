"""Scanners of the task sets (pneumonia, mura, chestmasks, tbx11k) on hand-built download trees
that carry each quirk of ``data_prep/LAYOUTS.md``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.datasets import get_spec
from data_prep.datasets.base import LayoutError
from data_prep.datasets.mura import BODY_PARTS

TASK = ("pneumonia", "mura", "chestmasks", "tbx11k")


def img(path: Path, mode: str = "L", size=(8, 6), dtype=np.uint8) -> Path:
    """A tiny real image (the format follows the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], 90, dtype)).convert(mode).save(path)
    return path


def write(path: Path, text: str | bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def rel(root: Path, paths) -> list[str]:
    return [Path(p).relative_to(root).as_posix() for p in paths]


def rejects(scan) -> list[tuple[str, str]]:
    return [(r.path, r.reason.split(":")[0]) for r in scan.rejects]


@pytest.mark.parametrize("name", TASK)
def test_specs_follow_the_contract(name):
    spec = get_spec(name)
    assert spec.name == name and spec.role == "task"
    fields = {"pneumonia": ("label",), "mura": ("label", "body_part"),
              "chestmasks": ("label", "mask"), "tbx11k": ("label", "boxes")}
    names = {"pneumonia": ("normal", "pneumonia"), "mura": ("negative", "positive"),
             "chestmasks": ("normal", "tb"), "tbx11k": ("health", "sick", "tb")}
    first = {"pneumonia": "chest_xray", "mura": "MURA-v1.1", "chestmasks": "Lung Segmentation",
             "tbx11k": "TBX11K"}
    assert spec.fields == fields[name]
    assert spec.label_names == names[name]
    assert spec.folder_names[0] == first[name]
    assert spec.has_official_split == (name != "chestmasks")
    assert spec.box_categories == ((
        "ActiveTuberculosis", "ObsoletePulmonaryTuberculosis", "PulmonaryTuberculosis")
        if name == "tbx11k" else ())


@pytest.mark.parametrize("name", TASK)
def test_foreign_folder_is_a_layout_error(name, tmp_path):
    img(tmp_path / "something" / "else.png")
    img(tmp_path / "test" / "NORMAL.png")
    with pytest.raises(LayoutError, match=rf"^{name}: "):
        get_spec(name).scan(tmp_path)


@pytest.mark.parametrize("name", TASK)
def test_empty_folder_is_a_layout_error(name, tmp_path):
    with pytest.raises(LayoutError, match=rf"^{name}: "):
        get_spec(name).scan(tmp_path)


# --- pneumonia ---------------------------------------------------------------------------------

def test_pneumonia_top_tree_splits_groups_junk_and_rejects(tmp_path):
    root = tmp_path / "chest-xray-pneumonia"
    top = root / "chest_xray"
    for p in ("train/NORMAL/IM-0115-0001.jpeg", "train/NORMAL/NORMAL2-IM-1427-0001.jpeg",
              "train/PNEUMONIA/person1_bacteria_1.jpeg", "val/NORMAL/NORMAL2-IM-1430-0001.jpeg",
              "val/PNEUMONIA/person1946_bacteria_4874.jpeg", "test/NORMAL/IM-0001-0001.jpeg",
              "test/PNEUMONIA/person100_virus_184.jpeg"):
        img(top / p)
    img(top / "train/PNEUMONIA/person1_virus_6.jpeg", "RGB")
    # the duplicate nested tree, ignored because the top tree exists
    img(top / "chest_xray/train/NORMAL/IM-0115-0001.jpeg")
    img(top / "chest_xray/test/PNEUMONIA/person9_bacteria_1.jpeg")
    # junk
    write(top / "__MACOSX/train/NORMAL/._IM-0115-0001.jpeg", b"junk")
    write(root / "__MACOSX/chest_xray/._train", b"junk")
    write(top / ".DS_Store", b"junk")
    write(top / "train/.DS_Store", b"junk")
    write(top / "train/NORMAL/._IM-0115-0001.jpeg", b"junk")
    # rejects
    img(top / "train/PNEUMONIA/scan.jpeg")
    write(top / "train/notes.txt", "x")
    write(top / "test/NORMAL/readme.txt", "x")
    img(top / "val/OTHER/IM-0200-0001.jpeg")

    scan = get_spec("pneumonia").scan(root)
    assert rel(root, (r.image for r in scan.records)) == [
        "chest_xray/test/NORMAL/IM-0001-0001.jpeg",
        "chest_xray/test/PNEUMONIA/person100_virus_184.jpeg",
        "chest_xray/train/NORMAL/IM-0115-0001.jpeg",
        "chest_xray/train/NORMAL/NORMAL2-IM-1427-0001.jpeg",
        "chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg",
        "chest_xray/train/PNEUMONIA/person1_virus_6.jpeg",
        "chest_xray/val/NORMAL/NORMAL2-IM-1430-0001.jpeg",
        "chest_xray/val/PNEUMONIA/person1946_bacteria_4874.jpeg",
    ]
    assert [r.label for r in scan.records] == [0, 1, 0, 0, 1, 1, 0, 1]
    assert [r.group for r in scan.records] == [
        "IM-0001", "person100", "IM-0115", "NORMAL2-IM-1427", "person1", "person1",
        "NORMAL2-IM-1430", "person1946"]
    assert [r.split for r in scan.records] == ["test"] * 2 + ["train"] * 4 + ["valid"] * 2
    assert all(r.task and r.masks == () and r.boxes is None for r in scan.records)
    assert rejects(scan) == [
        ("chest_xray/test/NORMAL/readme.txt", "bad name"),
        ("chest_xray/train/PNEUMONIA/scan.jpeg", "bad name"),
        ("chest_xray/train/notes.txt", "label missing"),
        ("chest_xray/val/OTHER/IM-0200-0001.jpeg", "label missing"),
    ]


def test_pneumonia_nested_tree_is_used_when_it_is_the_only_one(tmp_path):
    root = tmp_path / "chest_xray"
    img(root / "chest_xray/train/NORMAL/IM-0115-0001.jpeg")
    img(root / "chest_xray/val/PNEUMONIA/person3_virus_15.jpeg")
    img(root / "chest_xray/val/NORMAL/NORMAL2-IM-0872-0001-0002.jpeg")
    write(root / "__MACOSX/chest_xray/train/NORMAL/._IM-0115-0001.jpeg", b"junk")
    scan = get_spec("pneumonia").scan(root)
    assert rel(root, (r.image for r in scan.records)) == [
        "chest_xray/train/NORMAL/IM-0115-0001.jpeg",
        "chest_xray/val/NORMAL/NORMAL2-IM-0872-0001-0002.jpeg",
        "chest_xray/val/PNEUMONIA/person3_virus_15.jpeg"]
    assert [(r.label, r.group, r.split) for r in scan.records] == [
        (0, "IM-0115", "train"), (0, "NORMAL2-IM-0872", "valid"), (1, "person3", "valid")]
    assert scan.rejects == []


def test_pneumonia_root_is_the_split_folder_parent(tmp_path):
    root = tmp_path / "chest_xray"  # what --dataset all passes
    img(root / "test/normal/IM-0003-0001.jpg")  # lower-case class folder, .jpg
    img(root / "chest_xray/test/NORMAL/IM-0099-0001.jpeg")
    scan = get_spec("pneumonia").scan(root)
    assert [(rel(root, [r.image])[0], r.label, r.split) for r in scan.records] == [
        ("test/normal/IM-0003-0001.jpg", 0, "test")]


# --- mura --------------------------------------------------------------------------------------

MURA_TRAIN = [
    "train/XR_SHOULDER/patient00001/study1_positive/image1.png",
    "train/XR_SHOULDER/patient00001/study1_positive/image2.png",
    "train/XR_HAND/patient00001/study1_negative/image1.png",
    "train/XR_WRIST/patient00002/study1_positive/image1.png",  # CSV says negative
    "train/XR_ELBOW/patient00003/study2_negative/image1.png",  # absent
]
MURA_VALID = [
    "valid/XR_FINGER/patient11185/study1_positive/image1.png",
    "valid/XR_HUMERUS/patient11186/study1_negative/image3.png",
    "valid/XR_HAND/patient11188/study1/image1.png",  # label from the CSV only
]


def make_mura(root: Path) -> Path:
    base = root / "MURA-v1.1"
    for p in MURA_TRAIN[:4] + MURA_VALID:
        img(base / p, "RGB" if "FINGER" in p else "L")
    img(base / "valid/XR_FOREARM/patient11187/study1_positive/image1.png")  # not listed
    img(base / "valid/XR_HAND/patient11189/study1/image1.png")  # no label anywhere
    img(base / "train/XR_KNEE/patient00004/study1_positive/image1.png")  # unknown body part
    write(base / "train/XR_HAND/patient00001/study1_negative/notes.txt", "x")
    write(base / "train/XR_SHOULDER/patient00001/study1_positive/._image1.png", b"junk")
    write(base / "train/.DS_Store", b"junk")
    write(root / "__MACOSX/MURA-v1.1/._train", b"junk")
    write(base / "train_image_paths.csv",
          "\ufeff" + "\r\n".join("MURA-v1.1/" + p for p in MURA_TRAIN) + "\r\n\r\n")
    write(base / "valid_image_paths.csv", "\n".join("MURA-v1.1/" + p for p in MURA_VALID) + "\n")
    write(base / "train_labeled_studies.csv", "\ufeff" + "\n".join([
        "MURA-v1.1/train/XR_SHOULDER/patient00001/study1_positive/,1",
        "MURA-v1.1/train/XR_HAND/patient00001/study1_negative/,0",
        "",
        "MURA-v1.1/train/XR_WRIST/patient00002/study1_positive/,0",
        "MURA-v1.1/train/XR_ELBOW/patient00003/study2_negative/,0",
    ]) + "\n")
    write(base / "valid_labeled_studies.csv", "\n".join([
        "MURA-v1.1/valid/XR_FINGER/patient11185/study1_positive/,1",
        "MURA-v1.1/valid/XR_HUMERUS/patient11186/study1_negative,0",  # no trailing '/'
        "MURA-v1.1/valid/XR_HAND/patient11188/study1/,1",
    ]))
    return base


MURA_RECORDS = [  # (path under MURA-v1.1, label, body_part, group, split)
    ("train/XR_HAND/patient00001/study1_negative/image1.png", 0, 3, "patient00001", "train"),
    ("train/XR_SHOULDER/patient00001/study1_positive/image1.png", 1, 5, "patient00001", "train"),
    ("train/XR_SHOULDER/patient00001/study1_positive/image2.png", 1, 5, "patient00001", "train"),
    ("valid/XR_FINGER/patient11185/study1_positive/image1.png", 1, 1, "patient11185", "valid"),
    ("valid/XR_FOREARM/patient11187/study1_positive/image1.png", 1, 2, "patient11187", "valid"),
    ("valid/XR_HAND/patient11188/study1/image1.png", 1, 3, "patient11188", "valid"),
    ("valid/XR_HUMERUS/patient11186/study1_negative/image3.png", 0, 4, "patient11186", "valid"),
]
MURA_REJECTS = [
    ("train/XR_ELBOW/patient00003/study2_negative/image1.png", "file missing"),
    ("train/XR_HAND/patient00001/study1_negative/notes.txt", "bad name"),
    ("train/XR_KNEE/patient00004/study1_positive/image1.png", "bad name"),
    ("train/XR_WRIST/patient00002/study1_positive/image1.png", "label conflict"),
    ("valid/XR_HAND/patient11189/study1/image1.png", "label missing"),
]


@pytest.mark.parametrize("at", ["parent", "mura"])
def test_mura_labels_parts_groups_splits_and_rejects(tmp_path, at):
    downloads = tmp_path / "downloads"
    base = make_mura(downloads)
    root = downloads if at == "parent" else base
    pre = "MURA-v1.1/" if at == "parent" else ""

    scan = get_spec("mura").scan(root)
    got = [(rel(root, [r.image])[0], r.label, r.body_part, r.group, r.split)
           for r in scan.records]
    assert got == [(pre + p, *rest) for p, *rest in MURA_RECORDS]
    assert all(r.task and r.boxes is None for r in scan.records)
    assert rejects(scan) == [(pre + p, why) for p, why in MURA_REJECTS]


def test_mura_csv_paths_resolve_under_a_renamed_folder(tmp_path):
    base = make_mura(tmp_path / "x")
    root = tmp_path / "MURA"
    base.rename(root)
    scan = get_spec("mura").scan(root)
    assert [(rel(root, [r.image])[0], r.label) for r in scan.records] == [
        (p, label) for p, label, *_ in MURA_RECORDS]
    assert rejects(scan) == MURA_REJECTS


# --- chestmasks --------------------------------------------------------------------------------

def test_chestmasks_masks_labels_groups_and_rejects(tmp_path):
    root = tmp_path / "chest-xray-masks-and-labels"
    seg = root / "data" / "Lung Segmentation"
    for stem in ("MCUCXR_0001_0", "MCUCXR_0002_1", "CHNCXR_0001_0", "CHNCXR_0327_1",
                 "CHNCXR_0005_1", "MCUCXR_0003_0", "bad_scan"):
        img(seg / "CXR_png" / f"{stem}.png", "RGB" if stem.startswith("CHN") else "L")
    write(seg / "CXR_png/Thumbs.db", b"junk")
    write(seg / "CXR_png/CHNCXR_0009_0.txt", "x")
    img(seg / "masks/MCUCXR_0001_0.png", "I;16", size=(4, 3), dtype=np.uint16)  # 16-bit, small
    img(seg / "masks/MCUCXR_0002_1.png")
    img(seg / "masks/CHNCXR_0001_0_mask.png")
    img(seg / "masks/CHNCXR_0327_1_mask.png")
    img(seg / "masks/CHNCXR_0999_0_mask.png")  # orphan: not read
    write(seg / "masks/._CHNCXR_0005_1_mask.png", b"junk")  # junk does not count as a mask
    img(seg / "test/CHNCXR_0002_0.png")
    img(seg / "test/0003.png")
    write(seg / "test/Thumbs.db", b"junk")
    write(seg / "ClinicalReadings/CHNCXR_0001_0.txt", "male 45yrs\nnormal\n")
    write(root / "__MACOSX/data/._Lung Segmentation", b"junk")

    scan = get_spec("chestmasks").scan(root)
    pre = "data/Lung Segmentation/"
    assert [(rel(root, [r.image])[0], r.label, r.group, rel(root, r.masks)) for r in
            scan.records] == [
        (pre + "CXR_png/CHNCXR_0001_0.png", 0, "CHNCXR_0001_0",
         [pre + "masks/CHNCXR_0001_0_mask.png"]),
        (pre + "CXR_png/CHNCXR_0327_1.png", 1, "CHNCXR_0327_1",
         [pre + "masks/CHNCXR_0327_1_mask.png"]),
        (pre + "CXR_png/MCUCXR_0001_0.png", 0, "MCUCXR_0001_0", [pre + "masks/MCUCXR_0001_0.png"]),
        (pre + "CXR_png/MCUCXR_0002_1.png", 1, "MCUCXR_0002_1", [pre + "masks/MCUCXR_0002_1.png"]),
    ]
    assert all(r.split is None and r.task and r.boxes is None for r in scan.records)
    assert rejects(scan) == [
        (pre + "CXR_png/CHNCXR_0005_1.png", "mask missing"),
        (pre + "CXR_png/CHNCXR_0009_0.txt", "bad name"),
        (pre + "CXR_png/MCUCXR_0003_0.png", "mask missing"),
        (pre + "CXR_png/bad_scan.png", "bad name"),
        (pre + "test/0003.png", "mask missing"),
        (pre + "test/CHNCXR_0002_0.png", "mask missing"),
    ]


def test_chestmasks_without_masks_folder_is_a_layout_error(tmp_path):
    img(tmp_path / "Lung Segmentation/CXR_png/CHNCXR_0001_0.png")
    with pytest.raises(LayoutError, match="^chestmasks: .*masks"):
        get_spec("chestmasks").scan(tmp_path / "Lung Segmentation")


# --- tbx11k ------------------------------------------------------------------------------------

def coco(images: list[tuple[int, str, int, int]], anns: list[tuple[int, int, list]]) -> str:
    return json.dumps({
        "images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
        "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": b, "area": 1.0,
                         "iscrowd": 0} for k, (i, c, b) in enumerate(anns)],
        "categories": [{"id": 1, "name": "ActiveTuberculosis"},
                       {"id": 2, "name": "ObsoletePulmonaryTuberculosis"},
                       {"id": 3, "name": "PulmonaryTuberculosis"}],
    })


def make_tbx(root: Path) -> None:
    imgs = root / "imgs"
    for p in ("health/h0001.png", "health/h0002.png", "sick/s0001.png", "tb/tb0003.png",
              "tb/tb0004.png", "tb/tb0005.png", "tb/tb0006.png", "tb/tb0007.png",
              "extra/da/tb/x0001.png", "extra/db/y0001.png", "test/t0001.png"):
        img(imgs / p, size=(16, 16))
    img(imgs / "other/o0001.png")
    img(imgs / "stray.png")
    write(imgs / "tb/notes.txt", "x")
    write(imgs / "Thumbs.db", b"junk")
    write(imgs / "tb/._tb0003.png", b"junk")
    write(root / "__MACOSX/imgs/tb/._tb0004.png", b"junk")
    write(root / "lists/TBX11K_train.txt", "tb/tb0003.png\n")
    write(root / "annotations/json/TBX11K_train.json", coco(
        [(1, "health/h0001.png", 512, 512), (2, "sick/s0001.png", 512, 512),
         (3, "tb/tb0003.png", 512, 512), (4, "tb/tb0005.png", 512, 512),
         (5, "tb/tb0099.png", 512, 512)],
        [(3, 1, [10.5, 20.0, 100.0, 50.25]), (3, 3, [200, 210, 40, 30])]))
    write(root / "annotations/json/TBX11K_val.json", "\ufeff" + coco(
        [(7, "tb/tb0004.png", 512, 480), (8, "health/h0002.png", 512, 512),
         (9, "tb/tb0007.png", 512, 512)],
        [(7, 2, [1, 2, 3, 4]), (9, 1, [1, 2, 3])]))


def test_tbx11k_task_boxes_extra_and_rejects(tmp_path):
    root = tmp_path / "TBX11K"
    make_tbx(root)
    scan = get_spec("tbx11k").scan(root)
    got = [(rel(root, [r.image])[0], r.label, r.group, r.task, r.split, r.boxes, r.box_space)
           for r in scan.records]
    assert got == [
        ("imgs/extra/da/tb/x0001.png", None, "extra/da/tb/x0001.png", False, None, None, None),
        ("imgs/extra/db/y0001.png", None, "extra/db/y0001.png", False, None, None, None),
        ("imgs/health/h0001.png", 0, "health/h0001.png", False, None, None, None),
        ("imgs/health/h0002.png", 0, "health/h0002.png", False, None, None, None),
        ("imgs/sick/s0001.png", 1, "sick/s0001.png", False, None, None, None),
        ("imgs/tb/tb0003.png", 2, "tb/tb0003.png", True, "train",
         ((10.5, 20.0, 100.0, 50.25, 1), (200.0, 210.0, 40.0, 30.0, 3)), (512, 512)),
        ("imgs/tb/tb0004.png", 2, "tb/tb0004.png", True, "valid",
         ((1.0, 2.0, 3.0, 4.0, 2),), (512, 480)),
        ("imgs/tb/tb0005.png", 2, "tb/tb0005.png", False, None, None, None),  # no boxes
        ("imgs/tb/tb0006.png", 2, "tb/tb0006.png", False, None, None, None),  # in no JSON
        ("imgs/test/t0001.png", None, "test/t0001.png", False, None, None, None),
    ]
    assert rejects(scan) == [
        ("imgs/other/o0001.png", "label missing"),
        ("imgs/stray.png", "label missing"),
        ("imgs/tb/notes.txt", "bad name"),
        ("imgs/tb/tb0007.png", "label missing"),  # malformed box
        ("imgs/tb/tb0099.png", "file missing"),
    ]


def test_tbx11k_one_level_deeper_and_without_json_is_a_layout_error(tmp_path):
    make_tbx(tmp_path / "tbx11k" / "TBX11K")
    scan = get_spec("tbx11k").scan(tmp_path / "tbx11k")
    assert sum(r.task for r in scan.records) == 2
    assert scan.rejects[-1].path == "TBX11K/imgs/tb/tb0099.png"
    img(tmp_path / "bare/imgs/tb/tb0001.png")
    with pytest.raises(LayoutError, match="^tbx11k: .*TBX11K_train.json"):
        get_spec("tbx11k").scan(tmp_path / "bare")


# --- the synthetic demo downloads --------------------------------------------------------------

@pytest.fixture(scope="module")
def synth_tiny(tmp_path_factory):
    synth = pytest.importorskip("data_prep.synth")
    if not hasattr(synth, "generate"):
        pytest.skip("data_prep.synth.generate is not written yet")
    out = tmp_path_factory.mktemp("synth") / "downloads"
    synth.generate(out, scale="tiny", seed=0)
    return out, json.loads((out / "synth_manifest.json").read_text())


@pytest.mark.parametrize("name", TASK)
def test_scan_of_synth_tiny_matches_its_manifest(synth_tiny, name):
    from data_prep.convert import find_dataset_folder

    out, truth = synth_tiny
    spec, t = get_spec(name), truth[name]
    root = find_dataset_folder(spec, out)
    assert root is not None, f"none of {spec.folder_names} under the synth output"
    scan = get_spec(name).scan(root)
    # "unreadable" files are rejected by the converter when it decodes; the scanner lists them
    unreadable = {p["path"] for p in t["planted_rejects"] if p["reason"].startswith("unreadable")}
    planted = {p["path"]: p["reason"] for p in t["planted_rejects"] if p["path"] not in unreadable}
    got = {r.path: r.reason for r in scan.rejects}
    assert set(got) == set(planted)
    for path, reason in planted.items():
        assert got[path].startswith(reason), (path, got[path], reason)
    paths = {r.image.relative_to(root).as_posix(): r for r in scan.records}
    assert unreadable <= set(paths)
    for junk in t["junk"]:
        assert junk not in got and junk not in paths
    usable = [r for p, r in paths.items() if p not in unreadable]
    assert len(usable) == t["usable"]
    assert sum(r.label is None for r in usable) == t.get("unlabeled", 0)
    if t.get("label_counts"):
        counts: dict[str, int] = {}
        for r in usable:
            if r.label is not None:
                counts[spec.label_names[r.label]] = counts.get(spec.label_names[r.label], 0) + 1
        want = {(spec.label_names[int(k)] if str(k).isdigit() else k): v
                for k, v in t["label_counts"].items() if v}
        assert counts == want
    if name == "tbx11k":
        task = [r for r in usable if r.task]
        assert len(task) == t["task_images"]
        assert sum(len(r.boxes) for r in task) == t["boxes"]
        assert all(r.split in ("train", "valid") and r.boxes and r.box_space for r in task)
        assert all(r.boxes is None for r in usable if not r.task)
        cats: dict[str, int] = {}
        for r in task:
            for b in r.boxes:
                cats[str(b[4])] = cats.get(str(b[4]), 0) + 1
        assert cats == {k: v for k, v in t["box_counts"].items() if v}
    else:
        assert all(r.task for r in scan.records)
    if name == "mura":
        parts: dict[str, int] = {}
        for r in usable:
            part = BODY_PARTS[r.body_part]
            parts[part] = parts.get(part, 0) + 1
        assert parts == {k: v for k, v in t["body_part_counts"].items() if v}
    if name == "chestmasks":
        assert sum(len(r.masks) == 1 and r.masks[0].is_file() for r in usable) == t["masks"]
