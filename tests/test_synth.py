"""The demo data generator: determinism, every planted quirk, and a manifest that agrees with
the files on disk (the converter tests trust that manifest as ground truth)."""

from __future__ import annotations

import csv
import json
import re
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from data_prep.datasets.base import is_image, is_junk, list_files
from data_prep.synth import FOLDERS, MANIFEST, NAMES, generate
from data_prep.synth.__main__ import main

# Folders that hold masks or annotations, not images a converter packs.
NOT_IMAGES = {"montgomery": ("ManualMask/",), "chestmasks": ("masks/",),
              "pneumonia": ("chest_xray/",)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "downloads"
    start = time.time()
    truth = generate(out, "tiny", seed=0)
    return out, truth, time.time() - start


def loads(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except OSError:
        return False


def images(base: Path, name: str) -> list[str]:
    """Relative paths of the image files a scanner would consider."""
    rels = [p.relative_to(base).as_posix() for p in list_files(base) if is_image(p)]
    return [r for r in rels if not r.startswith(NOT_IMAGES.get(name, ("\0",)))]


def test_tiny_is_fast_and_manifest_is_written(tiny):
    out, truth, seconds = tiny
    assert seconds < 20
    assert json.loads((out / MANIFEST).read_text()) == truth
    assert list(truth) == [*NAMES, "external"]
    assert list(truth["external"]) == ["knee", "hip"]
    for name in NAMES:
        assert truth[name]["folder"] == FOLDERS[name] and (out / FOLDERS[name]).is_dir()


def test_same_seed_same_bytes_any_workers(tiny, tmp_path):
    out, truth, _ = tiny
    again = tmp_path / "again"
    assert main(["--out", str(again), "--scale", "tiny", "--seed", "0", "--workers", "2"]) == 0
    assert json.loads((again / MANIFEST).read_text()) == truth
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    sample = files[::7] + [f for f in files if f.suffix in (".csv", ".json", ".xml", ".txt")]
    for rel in sample:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = generate(tmp_path / "seed1", "tiny", seed=1)
    shenzhen = "ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png"
    assert (out / shenzhen).read_bytes() != (tmp_path / "seed1" / shenzhen).read_bytes()
    assert other["nih"]["planted_rejects"] != truth["nih"]["planted_rejects"]


def test_never_overwrites_folders_it_did_not_write(tmp_path, capsys):
    real = tmp_path / "ChestX-ray14" / "Data_Entry_2017.csv"
    real.parent.mkdir()
    real.write_text("precious")
    assert main(["--out", str(tmp_path)]) == 2
    assert real.read_text() == "precious"
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("name", NAMES)
def test_manifest_agrees_with_disk(tiny, name):
    out, truth, _ = tiny
    t, base = truth[name], out / truth[name]["folder"]
    rels = images(base, name)
    missing = [r["path"] for r in t["planted_rejects"] if r["reason"] == "file missing"]
    present = [r["path"] for r in t["planted_rejects"] if r["reason"] != "file missing"]
    assert len(rels) == t["usable"] + len(present)
    for r in t["planted_rejects"]:
        assert r["reason"] in ("unreadable", "label missing", "file missing", "mask missing",
                               "no report", "bad name")
    assert all(not (base / p).exists() for p in missing)
    assert all((base / p).is_file() for p in present)
    unreadable = {r["path"] for r in t["planted_rejects"] if r["reason"] == "unreadable"}
    assert {r for r in rels if not loads(base / r)} == unreadable
    for j in t["junk"]:
        assert (base / j).is_file()
        assert is_junk(Path(j)) or j.startswith("chest_xray/")
    counts = t.get("label_counts", {})
    if name == "nih":
        assert counts["No Finding"] > 0 and all(v > 0 for v in counts.values())
    elif name != "boneage":
        assert sum(counts.values()) + t.get("unlabeled", 0) == t["usable"]
        assert len([v for v in counts.values() if v]) >= 2
    if name in ("montgomery", "chestmasks"):
        assert t["masks"] == t["usable"]
    if name in ("pneumonia", "mura", "chestmasks"):
        assert t["task_images"] == t["usable"] >= 20


def _digit_counts(rels, rejected) -> dict:
    return dict(Counter(Path(r).stem[-1] for r in rels if r not in rejected))


def test_labels_follow_file_names(tiny):
    """Where the label is in the path, re-derive label_counts from the files themselves."""
    out, truth, _ = tiny
    for name, pattern in (("shenzhen", r"CXR_png/CHNCXR_\d{4}_[01]\.png"),
                          ("montgomery", r"CXR_png/MCUCXR_\d{4}_[01]\.png"),
                          ("chestmasks", r"CXR_png/\w+\.png")):
        t = truth[name]
        rejected = {r["path"] for r in t["planted_rejects"]}
        rels = [r for r in images(out / t["folder"], name) if re.fullmatch(pattern, r)]
        assert _digit_counts(rels, rejected) == t["label_counts"]
    t = truth["pneumonia"]
    rejected = {r["path"] for r in t["planted_rejects"]}
    rels = [r for r in images(out / t["folder"], "pneumonia") if r not in rejected]
    assert dict(Counter(str(int("PNEUMONIA" in r)) for r in rels)) == t["label_counts"]
    t = truth["mura"]
    rels = images(out / t["folder"], "mura")
    assert dict(Counter(str(int("_positive/" in r)) for r in rels)) == t["label_counts"]
    t = truth["tbx11k"]
    rejected = {r["path"] for r in t["planted_rejects"]}
    rels = [r for r in images(out / t["folder"], "tbx11k") if r not in rejected]
    folders = Counter(r.split("/")[1] for r in rels)
    assert t["label_counts"] == {"0": folders["health"], "1": folders["sick"],
                                 "2": folders["tb"]}
    assert t["unlabeled"] == folders["extra"] + folders["test"] > 0


# --- per-dataset quirks --------------------------------------------------------------------------

def test_nih_quirks(tiny):
    out, truth, _ = tiny
    t, base = truth["nih"], out / "ChestX-ray14"
    assert Image.open(base / t["quirks"]["rgba"]).mode == "RGBA"
    assert list(base.glob("images_001/images/*.png")) and list(base.glob("images_002/images/*.png"))
    lines = (base / "Data_Entry_2017.csv").read_text().splitlines()
    assert lines[0] == ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
                        "Patient Gender,View Position,OriginalImage[Width,Height],"
                        "OriginalImagePixelSpacing[x,y],")
    assert all(line.endswith(",") for line in lines)
    rows = {r[0]: r for r in csv.reader(lines[1:])}
    on_disk = {p.name for p in base.glob("images_*/images/*.png")}
    reasons = {r["reason"]: r["path"] for r in t["planted_rejects"]}
    assert Path(reasons["label missing"]).name in on_disk - set(rows)
    assert set(rows) - on_disk == {reasons["file missing"]}
    counts = Counter(f for name, r in rows.items() if name in on_disk for f in r[1].split("|"))
    assert {k: v for k, v in t["label_counts"].items() if v} == dict(counts)
    listed = set((base / "train_val_list.txt").read_text().split()) | set(
        (base / "test_list.txt").read_text().split())
    assert listed == set(rows) and (base / "test_list.txt").read_text().strip()


def test_shenzhen_quirks(tiny):
    out, truth, _ = tiny
    base = out / "ChinaSet_AllFiles"
    pngs = sorted((base / "CXR_png").glob("*.png"))
    assert {Image.open(p).mode for p in pngs} == {"RGB"}
    assert (base / "CXR_png/Thumbs.db").is_file() and (base / "CXR_png/CHNCXR_0999.png").is_file()
    readings = {p.stem for p in (base / "ClinicalReadings").glob("*.txt")}
    assert readings == {p.stem for p in pngs} - {"CHNCXR_0999"}


def test_montgomery_masks_match_the_lungs(tiny):
    out, truth, _ = tiny
    t, base = truth["montgomery"], out / "MontgomerySet"
    no_right = [r["path"] for r in t["planted_rejects"] if r["reason"] == "mask missing"]
    assert len(no_right) == 1 and not (base / "ManualMask/rightMask" / Path(no_right[0]).name
                                       ).exists()
    shapes = set()
    for p in sorted((base / "ManualMask/rightMask").glob("*.png")):
        img = np.asarray(Image.open(base / "CXR_png" / p.name), np.float32)
        left = np.asarray(Image.open(base / "ManualMask/leftMask" / p.name)) > 0
        right = np.asarray(Image.open(p)) > 0
        assert img.shape == left.shape == right.shape and not (left & right).any()
        assert right.nonzero()[1].mean() < left.nonzero()[1].mean()  # patient's right = image left
        lung, around = img[left | right].mean(), img[~(left | right)].mean()
        assert lung < around - 30  # the masks cover the dark lung fields
        shapes.add(img.shape[0] > img.shape[1])
    assert shapes == {True, False}  # portrait and landscape films


def test_indiana_quirks(tiny):
    out, truth, _ = tiny
    t, base = truth["indiana"], out / "OpenI"
    im = Image.open(base / t["quirks"]["i16"])
    assert im.mode == "I;16" and np.asarray(im).max() > 255
    referenced, labels = set(), Counter()
    for xml in sorted((base / "ecgen-radiology").glob("*.xml")):
        tree = ET.parse(xml)
        stems = [e.get("id") for e in tree.iter("parentImage")]
        normal = all(e.text == "normal" for e in tree.iter("major"))
        assert tree.find("uId").get("id") == f"CXR{xml.stem}"
        referenced.update(stems)
        labels[str(int(not normal))] += len(stems)
        if xml.name == Path(t["quirks"]["report_without_image"]).name:
            assert stems == []
    on_disk = {p.stem for p in (base / "NLMCXR_png").glob("*.png")}
    assert on_disk - referenced == {Path(t["planted_rejects"][0]["path"]).stem}
    assert dict(labels) == t["label_counts"]


def test_boneage_quirks(tiny):
    out, truth, _ = tiny
    t, base = truth["boneage"], out / "rsna-bone-age"
    rows = list(csv.DictReader((base / "boneage-training-dataset.csv").open()))
    ids = [int(r["id"]) for r in rows]
    assert ids == sorted(ids) and np.diff(ids).max() > 1
    assert {r["male"] for r in rows} == {"True", "False"}
    folder = base / "boneage-training-dataset/boneage-training-dataset"
    files = {int(p.stem) for p in folder.glob("*.png")}
    reasons = {r["reason"]: int(Path(r["path"]).stem) for r in t["planted_rejects"]}
    assert files - set(ids) == {reasons["label missing"]}
    assert set(ids) - files == {reasons["file missing"]}
    assert t["males"] == sum(r["male"] == "True" for r in rows if int(r["id"]) in files)


def test_boneage_bones_grow_with_age(tiny):
    out, _, _ = tiny
    base = out / "rsna-bone-age"
    rows = list(csv.DictReader((base / "boneage-training-dataset.csv").open()))
    folder = base / "boneage-training-dataset/boneage-training-dataset"
    ages, bone = [], []
    for r in rows:
        p = folder / f"{r['id']}.png"
        if p.exists():
            ages.append(float(r["boneage"]))
            bone.append(_bone_fraction(np.asarray(Image.open(p))))
    assert np.corrcoef(ages, bone)[0, 1] > 0.5


def _bone_fraction(img: np.ndarray) -> float:
    """Bone's share of the film's middle (collimator leaves cover at most 12 % of a side):
    Otsu splits background from the hand, then bone from soft tissue. Thresholds of the
    image's own, since each film has its own exposure, contrast and gamma."""
    h, w = img.shape
    mid = np.ascontiguousarray(img[int(0.13 * h):int(0.87 * h), int(0.13 * w):int(0.87 * w)])
    hand, _ = cv2.threshold(mid, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    bone, _ = cv2.threshold(mid[mid > hand].reshape(1, -1), 0, 255,
                            cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float((mid > bone).mean())


def test_pneumonia_quirks(tiny):
    out, truth, _ = tiny
    t, base = truth["pneumonia"], out / "chest_xray"
    assert all(Image.open(base / r).mode == "RGB" for r in t["quirks"]["rgb"])
    assert {Image.open(p).mode for p in base.glob("train/*/*.jpeg") if loads(p)} == {"L", "RGB"}
    assert (base / ".DS_Store").is_file() and list(base.glob("__MACOSX/**/._*.jpeg"))
    assert list(base.glob("chest_xray/train/NORMAL/*.jpeg"))
    patients = Counter()
    for p in base.glob("*/*/*.jpeg"):
        m = re.fullmatch(r"(person\d+)_(bacteria|virus)_\d+|((?:NORMAL2-)?IM-\d{4})-\d{4}", p.stem)
        assert m, p.name
        assert (p.parent.name == "PNEUMONIA") == bool(m.group(1))
        patients[m.group(1) or m.group(3)] += 1
    assert {p.parent.name for p in base.glob("val/*/*.jpeg")} == {"NORMAL", "PNEUMONIA"}
    assert sum(n > 1 for n in patients.values()) >= 3
    assert max(patients.values()) <= 0.1 * t["usable"]  # a 80/10/10 cut leaves valid and test
    assert {p.stem.split("_")[1] for p in base.glob("*/PNEUMONIA/person1_*.jpeg")} == {
        "bacteria", "virus"}
    assert any(p.name.startswith("NORMAL2-IM-") for p in base.glob("*/NORMAL/*.jpeg"))


def test_mura_quirks(tiny):
    out, truth, _ = tiny
    t, base = truth["mura"], out / "MURA-v1.1"
    listed = []
    for split in ("train", "valid"):
        paths = (base / f"{split}_image_paths.csv").read_text().split()
        assert all(p.startswith(f"MURA-v1.1/{split}/XR_") for p in paths)
        listed += paths
        studies = list(csv.reader((base / f"{split}_labeled_studies.csv").open()))
        assert all(s.endswith("/") and lab == str(int("_positive/" in s)) for s, lab in studies)
        assert {s for s, _ in studies} == {p.rsplit("/", 1)[0] + "/" for p in paths}
    gone = [p for p in listed if not (out / p).exists()]
    assert gone == ["MURA-v1.1/" + t["planted_rejects"][0]["path"]]
    assert len(t["body_part_counts"]) >= 5
    modes = {Image.open(out / p).mode for p in listed if p not in gone}
    assert modes == {"L", "RGB"}
    patients = Counter(p.split("/")[3] for p in listed if p not in gone)
    assert sum(n > 1 for n in patients.values()) >= 3
    assert max(patients.values()) <= 0.1 * t["usable"]


def test_chestmasks_quirks(tiny):
    out, truth, _ = tiny
    t, base = truth["chestmasks"], out / "Lung Segmentation"
    q = t["quirks"]
    assert Image.open(base / q["palette"]).mode == "P"
    deep = Image.open(base / q["mask_16bit"])
    assert deep.mode == "I;16" and np.asarray(deep).max() > 255
    other = base / q["mask_other_size"]
    assert Image.open(other).size != Image.open(base / "CXR_png" / other.name).size
    stems = {p.stem for p in (base / "CXR_png").glob("*.png")}
    assert {s for s in stems if s.startswith("MCUCXR")} and {s for s in stems
                                                              if s.startswith("CHNCXR")}
    for p in (base / "masks").glob("*.png"):
        stem = p.stem.removesuffix("_mask")
        assert stem in stems and (p.stem.endswith("_mask") == stem.startswith("CHNCXR"))
    tests = list((base / "test").glob("*.png"))
    assert tests and all(not list((base / "masks").glob(f"{p.stem}*")) for p in tests)


def test_tbx11k_quirks_and_boxes(tiny):
    out, truth, _ = tiny
    t, base = truth["tbx11k"], out / "TBX11K"
    folders = {p.parent.relative_to(base / "imgs").parts[0] for p in base.glob("imgs/**/*.png")}
    assert folders == {"health", "sick", "tb", "extra", "test"}
    assert {p.name for p in (base / "lists").glob("*.txt")} >= {"TBX11K_train.txt",
                                                               "TBX11K_val.txt"}
    task, boxes, cats, seen = 0, 0, Counter(), set()
    for split in ("train", "val"):
        doc = json.loads((base / f"annotations/json/TBX11K_{split}.json").read_text())
        assert [c["id"] for c in doc["categories"]] == [1, 2, 3]
        by_image = Counter(a["image_id"] for a in doc["annotations"])
        for im in doc["images"]:
            path = base / "imgs" / im["file_name"]
            seen.add(im["file_name"])
            assert (im["width"], im["height"]) == (512, 512)
            if loads(path):
                assert Image.open(path).size == (512, 512)
            if by_image[im["id"]]:
                assert im["file_name"].startswith("tb/")
                task += 1
        for a in doc["annotations"]:
            x, y, w, h = a["bbox"]
            assert 0 <= x < x + w <= 512 and 0 <= y < y + h <= 512
            cats[a["category_id"]] += 1
            boxes += 1
    assert task == t["task_images"] >= 20 and boxes == t["boxes"]
    assert set(cats) == {1, 2, 3} and t["box_counts"] == {str(k): cats[k] for k in sorted(cats)}
    assert t["quirks"]["tb_without_box"].removeprefix("imgs/") in seen
    assert t["label_counts"]["2"] == t["task_images"] + 1


def test_tbx11k_lesions_lie_inside_their_boxes():
    """Everything the lesion drawing adds to a film falls inside the boxes it reports."""
    from data_prep.synth import anatomy, layouts

    for seed in range(10):
        rng = np.random.default_rng(seed)
        ch = anatomy.chest(512, 512, rng)
        before = ch.image.copy()
        boxes = layouts._tbx_boxes(ch, rng, [1, 2, 3, 1])
        added = ch.image - before
        inside = np.zeros(added.shape, bool)
        for x, y, w, h, _ in boxes:
            inside[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))] = True
        assert np.abs(added[~inside]).max() < 2
        for x, y, w, h, _ in boxes:
            assert added[int(y):int(y + h), int(x):int(x + w)].max() > 40


@pytest.mark.parametrize("name", ["pneumonia", "shenzhen", "montgomery", "chestmasks",
                                  "tbx11k", "nih"])
def test_lung_masks_are_the_dark_fields_on_every_film(name):
    """Whatever the body's size, position and tilt and the film's exposure, collimation and
    marker: just inside a lung mask is darker than just outside it."""
    from data_prep.synth import layouts

    labels = {"nih": [["No Finding"], ["Effusion", "Mass"]], "tbx11k": [0, 2]}.get(name, [0, 1])
    for i in range(6):
        s = layouts.sample(name, labels[i % 2], seed=4, index=i, px=256, h=300, w=250)
        mask = s.lungs.astype(np.uint8)
        assert mask.any() and not (s.right & s.left).any()
        k = np.ones((5, 5), np.uint8)
        inner = (mask & ~cv2.erode(mask, k)).astype(bool)
        outer = (cv2.dilate(mask, k) & ~mask).astype(bool)
        img = s.image.astype(np.float32)
        assert img[outer].mean() > img[inner].mean() + 15, (name, i)
        assert s.right.nonzero()[1].mean() < s.left.nonzero()[1].mean()


def test_tbx11k_boxes_hold_their_lesions_on_the_film():
    """On the film as written (exposure, collimation, marker, grain): a TB image and the same
    rng drawn healthy differ only in the boxes (up to the film's blur), and in every box."""
    from data_prep.synth import layouts

    for seed, cats in enumerate(([1], [2], [3], [1, 2, 3], [2, 2], [3, 1])):
        sick = layouts.tbx_image(np.random.default_rng(seed), 2, cats)
        healthy = layouts.tbx_image(np.random.default_rng(seed), 0)
        diff = np.abs(sick.image.astype(np.int16) - healthy.image) > 8
        near = np.zeros(diff.shape, bool)
        for x, y, w, h, _ in sick.boxes:
            assert 0 <= x < x + w <= 512 and 0 <= y < y + h <= 512
            assert diff[int(y):int(y + h), int(x):int(x + w)].any()
            near[max(0, int(y) - 6):int(np.ceil(y + h)) + 6,
                 max(0, int(x) - 6):int(np.ceil(x + w)) + 6] = True
        assert diff.any() and not (diff & ~near).any()
        assert (sick.lungs == healthy.lungs).all()


# --- the two external datasets (generic layouts) -------------------------------------------------

def _joint_space(path: Path) -> int:
    """The narrowest dark run between two bright (bone) runs over the middle columns. Bone is
    what is brighter than the image's own Otsu threshold there: each film has its own
    exposure, contrast and gamma, so no fixed gray level separates bone from soft tissue."""
    arr = np.asarray(Image.open(path).convert("L"))
    h, w = arr.shape
    middle = np.ascontiguousarray(arr[:, int(0.3 * w):int(0.7 * w)])
    level, _ = cv2.threshold(middle, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    best = h
    for x in range(int(0.3 * w), int(0.7 * w)):
        bright = np.flatnonzero(arr[:, x] > level)
        if len(bright) < 2:
            continue
        gaps = np.diff(bright) - 1
        best = min(best, int(gaps.max()))
    return best


def test_external_manifest_agrees_with_disk(tiny):
    out, truth, _ = tiny
    knee, hip = truth["external"]["knee"], truth["external"]["hip"]
    assert knee["folder"] == "external/knee" and hip["folder"] == "external/hip"
    kbase, hbase = out / knee["folder"], out / hip["folder"]
    rels = [p.relative_to(kbase).as_posix() for p in list_files(kbase) if is_image(p)]
    assert len(rels) == knee["usable"] + 1  # + the truncated one
    assert {r for r in rels if not loads(kbase / r)} == {
        r["path"] for r in knee["planted_rejects"] if r["reason"] == "unreadable"}
    assert sum(knee["label_counts"].values()) == knee["usable"]
    assert sum(knee["split_counts"].values()) == knee["usable"]
    assert all("/batch2/" in p and (kbase / p).is_file() for p in knee["quirks"]["nested"])
    assert Image.open(kbase / knee["quirks"]["rgb"]).mode == "RGB"
    assert Image.open(kbase / knee["quirks"]["i16"]).mode in ("I;16", "I")
    for j in (*knee["junk"], *hip["junk"]):
        assert is_junk(Path(j))
    images = [p for p in list_files(hbase / "images") if is_image(p)]
    assert len(images) == hip["usable"] + 1  # + the one lacking its right mask
    left, right = (sorted(p.name for p in (hbase / "masks" / c).iterdir()) for c in hip["classes"])
    assert len(left) == hip["usable"] + 2  # + that image's left mask + the orphan
    assert len(right) == hip["usable"]
    assert Image.open(hbase / hip["quirks"]["mask_16bit"]).mode in ("I;16", "I")
    assert Image.open(hbase / hip["quirks"]["palette"]).mode == "P"


def test_knee_grade_is_the_joint_space(tiny):
    out, truth, _ = tiny
    base = out / truth["external"]["knee"]["folder"]
    quirks = truth["external"]["knee"]["quirks"]
    skip = {quirks["rgb"], quirks["i16"]} | {r["path"] for r in
                                            truth["external"]["knee"]["planted_rejects"]}
    space = {}
    for grade in ("normal", "mild", "severe"):
        space[grade] = [_joint_space(p) for p in sorted(base.glob(f"*/{grade}/**/*.png"))
                        if p.relative_to(base).as_posix() not in skip]
    assert min(space["normal"]) > max(space["mild"]) >= min(space["mild"]) > \
        max(space["severe"]), space


def test_hip_masks_lie_on_the_femoral_heads(tiny):
    out, truth, _ = tiny
    base = out / truth["external"]["hip"]["folder"]
    img = np.asarray(Image.open(base / "images/hip_0001.png").convert("L"), np.float32)
    for cls, side in (("left_femoral_head", 1), ("right_femoral_head", -1)):
        mask = np.asarray(Image.open(base / "masks" / cls / "hip_0001_mask.png")) > 0
        assert mask.any()
        assert img[mask].mean() > img[~mask].mean() + 60  # a bright bone head
        cx = np.nonzero(mask)[1].mean()
        assert (cx - img.shape[1] / 2) * side > 0  # the patient's left is on the image right
