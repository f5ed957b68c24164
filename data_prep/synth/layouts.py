"""The nine dataset writers: each lays its images out exactly as the real download does
(``data_prep/LAYOUTS.md``), plants that download's quirks, and returns the ground truth a
correct converter must reproduce (counts, labels, planted rejects, junk).

Randomness: the layout of dataset ``name`` (names, labels, which file carries which quirk)
comes from one generator seeded by ``(seed, name)``; each image's pixels come from its own
generator seeded by ``(seed, name, index)``. So writers can run in any order or in parallel
and a seed always gives the same bytes.

Why one module over ~450 lines: nine writers of one shape (images, quirks, ground truth), each
short; one file keeps them side by side with the layouts document they follow.
"""

from __future__ import annotations

import csv
import io
import json
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..datasets import NAMES  # a writer per converter plug-in, in its order
from . import anatomy as A

FOLDERS = {"nih": "ChestX-ray14", "shenzhen": "ChinaSet_AllFiles", "montgomery": "MontgomerySet",
           "indiana": "OpenI", "boneage": "rsna-bone-age", "pneumonia": "chest_xray",
           "mura": "MURA-v1.1", "chestmasks": "Lung Segmentation", "tbx11k": "TBX11K"}

# small's MURA has 450 patients: with 150, the patient-grouped valid/test splits held 34/37
# images of a few patients each, and the train split's positive rate per body part alone
# scored valid AUC 0.13 and test 0.70, so no MURA number measured the fractures.
SCALES = {
    "tiny": {"px": 128, "nih": 24, "shenzhen": 20, "montgomery": 12, "montgomery_px": (300, 360),
             "indiana": 12, "boneage": 20,
             "pneumonia": {"train": (10, 16), "val": (2, 2), "test": (5, 5)}, "per_patient": 3,
             "mura": (14, 4), "chestmasks": (14, 16),
             "tbx11k": {"health": 8, "sick": 6, "tb": 24, "extra": 2, "test": 2}},
    "small": {"px": 512, "nih": 400, "shenzhen": 300, "montgomery": 138,
              "montgomery_px": (502, 611), "indiana": 200, "boneage": 300,
              "pneumonia": {"train": (100, 200), "val": (8, 8), "test": (40, 60)},
              "per_patient": 4, "mura": (360, 90), "chestmasks": (138, 162),
              "tbx11k": {"health": 120, "sick": 80, "tb": 200, "extra": 10, "test": 20}},
}
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)
THUMBS_DB = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504)


def _key(name: str) -> int:
    return zlib.crc32(name.encode())


def layout_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, _key(name)])


def image_rng(seed: int, name: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _key(name), 1, index])


def jitter(rng, base: int, lo: float = 0.9, hi: float = 1.1) -> int:
    return int(round(base * rng.uniform(lo, hi)))


# --- files -------------------------------------------------------------------------------------

def save_png(path: Path, arr: np.ndarray, mode: str = "L") -> None:
    """Write a gray uint8 image in one of the modes the real downloads use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        im = Image.fromarray(arr)
    elif mode in ("RGB", "RGBA"):
        chans = [arr] * 3 + ([np.full_like(arr, 255)] if mode == "RGBA" else [])
        im = Image.fromarray(np.stack(chans, -1), mode)
    elif mode == "I;16":  # 12-bit data in a 16-bit PNG, as scanners write it
        im = Image.fromarray(arr.astype(np.uint16) * 16)
    elif mode == "P":
        im = Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    else:
        raise ValueError(mode)
    im.save(path, compress_level=1)


def save_jpeg(path: Path, arr: np.ndarray, rgb: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.stack([arr] * 3, -1) if rgb else arr).save(path, quality=90)


def truncate(path: Path) -> None:
    """Cut a file in half: what an interrupted download leaves."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def write_csv(path: Path, rows, trailing_comma: bool = False) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    text = buf.getvalue()
    if trailing_comma:
        text = "".join(line + ",\n" for line in text.splitlines())
    write(path, text)


def truth(folder: str, usable: int, **extra) -> dict:
    out = {"folder": folder, "usable": usable, "planted_rejects": [], "junk": []}
    out.update(extra)
    return out


def reject(t: dict, path: str, reason: str) -> None:
    t["planted_rejects"].append({"path": path, "reason": reason})


def counts(labels) -> dict[str, int]:
    c = Counter(str(v) for v in labels)
    return {k: c[k] for k in sorted(c)}


# --- pictures ----------------------------------------------------------------------------------
# One function per dataset draws one image of it with a given label from the image's own rng,
# exactly as its writer does (the writers call them), so tests can check what the demo holds.
# Each draws the film (acquisition) first, then the body, then the finding: the rng stream up
# to the finding does not depend on the label.

@dataclass
class Sample:
    image: np.ndarray  # uint8 (H, W), the pixels the writer saves
    right: np.ndarray | None = None  # chests: the patient's right lung field (image left), bool
    left: np.ndarray | None = None  # the patient's left lung field (image right)
    boxes: list[list[float]] | None = None  # TBX11K: [x, y, w, h, category] in 512 space

    @property
    def lungs(self) -> np.ndarray:
        return self.right | self.left


def _chest_sample(ch: A.Chest, film: A.Film) -> Sample:
    """Develop a chest; the collimation and the marker stay 6 % of the film clear of the lung
    fields (not of a finding: that would make the borders depend on the label), so the masks
    are exactly what the film shows and lesions at the lungs' edges stay in view."""
    return Sample(A.expose(ch.image, film, ch.lungs, margin=0.06), ch.right, ch.left)


def tb_chest(h, w, rng, sick: bool) -> A.Chest:
    ch = A.chest(h, w, rng)
    if sick:
        A.tb(ch, rng)
    return ch


def nih_chest(h, w, rng, findings) -> A.Chest:
    ch = A.chest(h, w, rng, heart=1.6 if "Cardiomegaly" in findings else 1.0,
                 emphysema="Emphysema" in findings)
    for f in findings:
        if f not in ("Cardiomegaly", "Emphysema", "No Finding"):
            A.nih_finding(ch, f, rng)
    return ch


def tb_image(rng, sick: bool, h: int, w: int) -> Sample:
    """A Shenzhen / Montgomery / chest-masks film of h x w, with TB when ``sick``."""
    film = A.film(rng, pa_chest=True)
    return _chest_sample(tb_chest(h, w, rng, sick), film)


def shenzhen_image(rng, sick: bool, px: int) -> Sample:
    h = jitter(rng, px)
    return tb_image(rng, sick, h, jitter(rng, px))


def nih_image(rng, findings, h: int, w: int) -> Sample:
    film = A.film(rng, pa_chest=True)
    return _chest_sample(nih_chest(h, w, rng, findings), film)


def pneumonia_image(rng, label: int, px: int) -> Sample:
    """A Kermany film: NORMAL (0) or PNEUMONIA (1)."""
    h = jitter(rng, px * 0.95)
    w = jitter(rng, px * 1.2, 0.95, 1.25)
    film = A.film(rng, pa_chest=True)
    ch = A.chest(h, w, rng)
    if label:
        A.pneumonia(ch, rng)
    return _chest_sample(ch, film)


def mura_image(rng, label: int, px: int, part: str) -> Sample:
    """A MURA image of ``part``: normal (0) or abnormal (1, a fracture)."""
    h = jitter(rng, px * 1.15)
    w = jitter(rng, px * 0.9)
    film = A.film(rng)
    return Sample(A.expose(A.limb(h, w, rng, part, label), film))


def boneage_image(rng, age: float, px: int) -> Sample:
    h = jitter(rng, px * 1.25)
    w = jitter(rng, px)
    film = A.film(rng)
    return Sample(A.expose(A.hand(h, w, rng, age), film))


def tbx_image(rng, label: int | None, cats: list[int] | None = None) -> Sample:
    """A TBX11K film (always 512 px): healthy (0), sick but not TB (1, pneumonia), TB (2,
    lesions of ``cats`` with their boxes) or unlabeled (None: TB or not, at random)."""
    film = A.film(rng, pa_chest=True)
    ch = A.chest(TBX, TBX, rng)
    boxes = []
    if label == 2:
        boxes = _tbx_boxes(ch, rng, cats or [1])
    elif label == 1:
        A.pneumonia(ch, rng)
    elif label is None and rng.random() < 0.5:
        A.tb(ch, rng)
    out = _chest_sample(ch, film)
    out.boxes = boxes
    return out


def mask_png(ch_mask: np.ndarray) -> np.ndarray:
    return (ch_mask * 255).astype(np.uint8)


def sample(name: str, label, seed: int = 0, index: int = 0, px: int | None = None,
           part: str = "XR_WRIST", h: int | None = None, w: int | None = None) -> Sample:
    """Image ``index`` of dataset ``name`` drawn with ``label`` as its writer draws it at
    ``px`` (default: the demo's, ``--scale small``). ``label``: 0/1 for pneumonia, mura (of
    ``part``), shenzhen, montgomery and chestmasks; 0/1/2/None for tbx11k (TB gets one
    active lesion); a list of findings for nih; the age in months for boneage. Montgomery and
    chestmasks take the film's ``h`` x ``w`` (default px x px)."""
    rng = image_rng(seed, name, index)
    px = px or SCALES["small"]["px"]
    if name == "pneumonia":
        return pneumonia_image(rng, label, px)
    if name == "mura":
        return mura_image(rng, label, px, part)
    if name == "shenzhen":
        return shenzhen_image(rng, bool(label), px)
    if name in ("montgomery", "chestmasks"):
        return tb_image(rng, bool(label), h or px, w or px)
    if name == "tbx11k":
        return tbx_image(rng, label, [1] if label == 2 else None)
    if name == "nih":
        return nih_image(rng, list(label), px, px)
    if name == "boneage":
        return boneage_image(rng, float(label), px)
    raise ValueError(f"no sampler for {name!r}")


# --- writers -----------------------------------------------------------------------------------

def nih(root: Path, cfg: dict, seed: int) -> dict:
    """Kaggle layout over images_001/ and images_002/, one RGBA image, a CSV with the 2017
    header quirks, an image without row and a row without image."""
    rng, n, px = layout_rng(seed, "nih"), cfg["nih"], cfg["px"]
    names, patients, pid = [], [], 0
    while len(names) < n + 1:  # + 1: the row whose image is missing
        pid += int(rng.integers(1, 30))
        for k in range(int(rng.integers(1, 4))):
            names.append(f"{pid:08d}_{k:03d}.png")
            patients.append(pid)
    names, patients = names[: n + 1], patients[: n + 1]
    findings = []
    cover = list(A.NIH_FINDINGS) + ["No Finding"]
    order = rng.permutation(n + 1)
    missing, norow = (int(i) for i in order[-2:])  # never among the cover set
    for i in range(n + 1):
        rank = int(np.nonzero(order == i)[0][0])
        if rank < len(cover):
            findings.append([cover[rank]])
        elif rng.random() < 0.35:
            findings.append(["No Finding"])
        else:
            k = int(rng.integers(1, 3))
            findings.append(sorted(rng.choice(A.NIH_FINDINGS, k, replace=False).tolist()))
    rgba = int(order[0])
    t = truth(FOLDERS["nih"], 0, label_counts={}, quirks={})
    rows = [["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
             "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
             "OriginalImagePixelSpacing[x", "y]"]]
    label_counts = Counter()
    for i, name in enumerate(names):
        folder = "images_001" if i < (n + 1) // 2 else "images_002"
        rel = f"{folder}/images/{name}"
        if i != missing:
            r = image_rng(seed, "nih", i)
            img = nih_image(r, findings[i], px, px).image
            save_png(root / rel, img, "RGBA" if i == rgba else "L")
        if i == rgba:
            t["quirks"]["rgba"] = rel
        if i == norow:
            reject(t, rel, "label missing")
            continue
        rows.append([name, "|".join(findings[i]), name[9:12].lstrip("0") or "0",
                     str(patients[i]), str(int(rng.integers(1, 90))), str(rng.choice(["M", "F"])),
                     str(rng.choice(["PA", "AP"])), "2500", "2048", "0.168", "0.168"])
        if i == missing:
            reject(t, name, "file missing")  # the scanner can only name it
        else:
            label_counts.update(findings[i])
            t["usable"] += 1
    write_csv(root / "Data_Entry_2017.csv", rows, trailing_comma=True)
    test_patients = set(rng.choice(sorted(set(patients)), max(1, len(set(patients)) // 5),
                                   replace=False).tolist())
    listed = [r[0] for r in rows[1:]]
    write(root / "train_val_list.txt",
          "".join(f"{x}\n" for x in listed if int(x[:8]) not in test_patients))
    write(root / "test_list.txt", "".join(f"{x}\n" for x in listed if int(x[:8]) in test_patients))
    t["label_counts"] = {f: label_counts[f] for f in (*A.NIH_FINDINGS, "No Finding")}
    return t


def _tb_ids(rng, n: int, tb_frac: float) -> list[tuple[int, int]]:
    """(number, label) pairs numbered normals first, as the NLM sets are."""
    n_tb = int(round(n * tb_frac))
    return [(i + 1, int(i >= n - n_tb)) for i in range(n)]


def shenzhen(root: Path, cfg: dict, seed: int) -> dict:
    """RGB PNGs, clinical readings, a Thumbs.db and one file named without its label digit."""
    rng, px = layout_rng(seed, "shenzhen"), cfg["px"]
    ids = _tb_ids(rng, cfg["shenzhen"], 0.5)
    t = truth(FOLDERS["shenzhen"], len(ids), label_counts=counts(lab for _, lab in ids))
    for i, (num, lab) in enumerate(ids):
        stem = f"CHNCXR_{num:04d}_{lab}"
        r = image_rng(seed, "shenzhen", i)
        img = shenzhen_image(r, bool(lab), px).image
        save_png(root / "CXR_png" / f"{stem}.png", img, "RGB")
        sex, age = rng.choice(["male", "female"]), int(rng.integers(18, 80))
        write(root / "ClinicalReadings" / f"{stem}.txt",
              f"{sex} {age}yrs\n{'PTB in the right upper field' if lab else 'normal'}\n")
    bad = root / "CXR_png" / "CHNCXR_0999.png"
    r = image_rng(seed, "shenzhen", 10_000)
    save_png(bad, tb_image(r, False, px, px).image, "RGB")
    reject(t, "CXR_png/CHNCXR_0999.png", "bad name")
    write(root / "CXR_png" / "Thumbs.db", THUMBS_DB)
    t["junk"].append("CXR_png/Thumbs.db")
    return t


def montgomery(root: Path, cfg: dict, seed: int) -> dict:
    """Large portrait films (one landscape), left/right lung masks; one image lacks its
    rightMask."""
    rng = layout_rng(seed, "montgomery")
    ids = _tb_ids(rng, cfg["montgomery"], 0.42)
    w, h = cfg["montgomery_px"]
    landscape, no_right = (int(i) for i in rng.choice(len(ids), 2, replace=False))
    t = truth(FOLDERS["montgomery"], 0, label_counts={}, masks=0,
              quirks={"landscape": f"CXR_png/MCUCXR_{ids[landscape][0]:04d}_"
                                   f"{ids[landscape][1]}.png"})
    labels = []
    for i, (num, lab) in enumerate(ids):
        name = f"MCUCXR_{num:04d}_{lab}.png"
        r = image_rng(seed, "montgomery", i)
        ch = tb_image(r, bool(lab), *((w, h) if i == landscape else (h, w)))
        save_png(root / "CXR_png" / name, ch.image)
        save_png(root / "ManualMask" / "leftMask" / name, mask_png(ch.left))
        if i == no_right:
            reject(t, f"CXR_png/{name}", "mask missing")
        else:
            save_png(root / "ManualMask" / "rightMask" / name, mask_png(ch.right))
            labels.append(lab)
        write(root / "ClinicalReadings" / name.replace(".png", ".txt"),
              f"Patient's Sex: {rng.choice(['M', 'F'])}\nPatient's Age: "
              f"{int(rng.integers(18, 80)):03d}Y\n{'TB, right upper lobe' if lab else 'normal'}\n")
    t.update(usable=len(labels), label_counts=counts(labels), masks=len(labels))
    return t


INDIANA_MESH = (("Cardiomegaly/mild", "Cardiomegaly"), ("Pleural Effusion/right", "Effusion"),
                ("Pulmonary Atelectasis/base/left", "Atelectasis"),
                ("Nodule/lung/upper lobe/right", "Nodule"), ("Opacity/lung/base/left", "Pneumonia"),
                ("Calcified Granuloma/lung/upper lobe/right", "Nodule"),
                ("Emphysema", "Emphysema"))


def _report_xml(uid: int, majors: list[str], stems: list[str], rng) -> str:
    images = "".join(
        f'  <parentImage id="{s}">\n    <figureId>F{j + 1}</figureId>\n'
        f'    <caption>Xray Chest PA and Lateral</caption>\n    <panel type="single">\n'
        f'      <url>/hadoop/storage/radiology/extract/{s}.jpg</url>\n    </panel>\n'
        f'  </parentImage>\n' for j, s in enumerate(stems))
    mesh = "".join(f"    <major>{m}</major>\n" for m in majors)
    impression = "No acute cardiopulmonary disease." if majors == ["normal"] else \
        f"{majors[0].split('/')[0]}."
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<eCitation>\n  <meta type="rr"/>\n'
            f'  <uId id="CXR{uid}"/>\n  <pmcId id="{uid}"/>\n  <docSource>CXR</docSource>\n'
            f'  <IUXRId id="{uid}"/>\n  <MedlineCitation Owner="Indiana University" '
            f'Status="supplied">\n    <Article PubModel="Electronic">\n      <Abstract>\n'
            f'        <AbstractText Label="INDICATION">Cough, {int(rng.integers(20, 80))}'
            f'-year-old.</AbstractText>\n        <AbstractText Label="IMPRESSION">{impression}'
            f'</AbstractText>\n      </Abstract>\n    </Article>\n  </MedlineCitation>\n'
            f'  <MeSH>\n{mesh}  </MeSH>\n{images}</eCitation>\n')


def indiana(root: Path, cfg: dict, seed: int) -> dict:
    """OpenI layout: frontal + lateral PNGs per report, one report naming no image, one image
    no report names, and one 16-bit PNG."""
    rng, px = layout_rng(seed, "indiana"), cfg["px"]
    n = cfg["indiana"]
    empty = int(rng.integers(2, n + 1))
    t = truth(FOLDERS["indiana"], 0, label_counts={}, quirks={})
    labels, k = [], 0
    for uid in range(1, n + 1):
        normal = rng.random() < 0.45
        pick = [] if normal else [INDIANA_MESH[int(j)] for j in
                                  rng.choice(len(INDIANA_MESH), int(rng.integers(1, 3)), False)]
        majors = ["normal"] if normal else [m for m, _ in pick]
        n_img = 0 if uid == empty else 1 if rng.random() < 0.2 else 2
        series = int(rng.integers(1, 3000))
        stems = [f"CXR{uid}_1_IM-{series:04d}-{3001 + 1000 * j}" if uid % 3 else
                 f"CXR{uid}_IM-{series:04d}-{1001 + j}" for j in range(n_img)]
        write(root / "ecgen-radiology" / f"{uid}.xml", _report_xml(uid, majors, stems, rng))
        for j, stem in enumerate(stems):
            r = image_rng(seed, "indiana", k)
            hh, ww = jitter(r, px * 1.15), jitter(r, px)
            img = A.finish(A.lateral(hh, ww, r), r) if j else \
                nih_image(r, [f for _, f in pick], hh, ww).image
            rel = f"NLMCXR_png/{stem}.png"
            mode = "I;16" if "i16" not in t["quirks"] and j == 0 and uid > 1 else "L"
            if mode == "I;16":
                t["quirks"]["i16"] = rel
            save_png(root / rel, img, mode)
            labels.append(int(not normal))
            k += 1
    orphan = f"NLMCXR_png/CXR{n + 7}_1_IM-9999-3001.png"
    r = image_rng(seed, "indiana", 10_000)
    save_png(root / orphan, tb_image(r, False, px, px).image)
    reject(t, orphan, "no report")
    t["quirks"]["report_without_image"] = f"ecgen-radiology/{empty}.xml"
    t.update(usable=len(labels), label_counts=counts(labels))
    return t


def boneage(root: Path, cfg: dict, seed: int) -> dict:
    """Non-contiguous ids, True/False sex, the doubly nested folder; one image without a CSV
    row and one row without an image."""
    rng, px, n = layout_rng(seed, "boneage"), cfg["px"], cfg["boneage"]
    ids = (1377 + np.cumsum(rng.integers(1, 5, n + 2))).tolist()
    ages = rng.integers(6, 229, n + 2).tolist()
    males = (rng.random(n + 2) < 0.5).tolist()
    norow, nofile = n, n + 1
    folder = "boneage-training-dataset/boneage-training-dataset"
    t = truth(FOLDERS["boneage"], n, quirks={})
    rows = [["id", "boneage", "male"]]
    for i, (bid, age, male) in enumerate(zip(ids, ages, males)):
        rel = f"{folder}/{bid}.png"
        if i != nofile:
            r = image_rng(seed, "boneage", i)
            save_png(root / rel, boneage_image(r, age, px).image)
        if i == norow:
            reject(t, rel, "label missing")
        else:
            rows.append([bid, age, "True" if male else "False"])
        if i == nofile:
            reject(t, rel, "file missing")
    write_csv(root / "boneage-training-dataset.csv", rows)
    t["males"] = sum(males[:n])
    return t


def pneumonia(root: Path, cfg: dict, seed: int) -> dict:
    """Kermany layout: train/val/test x NORMAL/PNEUMONIA JPEGs named per patient, some RGB,
    one truncated, plus the archive's nested duplicate tree, __MACOSX and .DS_Store."""
    rng, px, cap = layout_rng(seed, "pneumonia"), cfg["px"], cfg["per_patient"]
    files = []  # (relative path, label)
    im_id, person, running = 114, 0, 0
    for split, (n_normal, n_pneu) in cfg["pneumonia"].items():
        for label, total in ((0, n_normal), (1, n_pneu)):
            left = total
            while left:
                k = min(left, int(rng.integers(1, cap + 1)))
                left -= k
                if label == 0:
                    im_id += int(rng.integers(1, 20))
                    prefix = "NORMAL2-IM" if rng.random() < 0.4 else "IM"
                    names = [f"{prefix}-{im_id:04d}-{j + 1:04d}.jpeg" for j in range(k)]
                else:
                    if person == 0:  # person1 has both kinds: person1_bacteria_1, person1_virus_2
                        k = min(2, total)
                        left = total - k
                    person += int(rng.integers(1, 4)) if person else 1
                    kinds = ["bacteria", "virus"] if person == 1 else \
                        [str(rng.choice(["bacteria", "virus"]))]
                    names = []
                    for j in range(k):
                        running += int(rng.integers(1, 4)) if running else 1
                        names.append(f"person{person}_{kinds[j % len(kinds)]}_{running}.jpeg")
                cls = "PNEUMONIA" if label else "NORMAL"
                files += [(f"{split}/{cls}/{name}", label) for name in names]
    train_pneu = [i for i, (p, _) in enumerate(files) if p.startswith("train/PNEUMONIA")]
    broken = int(rng.choice(train_pneu))
    rgb = set(rng.choice(len(files), max(1, len(files) // 8), replace=False).tolist()) - {broken}
    t = truth(FOLDERS["pneumonia"], 0, label_counts={}, quirks={"rgb": []})
    labels = []
    for i, (rel, label) in enumerate(files):
        r = image_rng(seed, "pneumonia", i)
        save_jpeg(root / rel, pneumonia_image(r, label, px).image, rgb=i in rgb)
        if i in rgb:
            t["quirks"]["rgb"].append(rel)
        if i == broken:
            truncate(root / rel)
            reject(t, rel, "unreadable")
        else:
            labels.append(label)
    for rel, _ in (files[0], files[-1]):  # the archive's duplicate copy of the tree
        dup = root / "chest_xray" / rel
        write(dup, (root / rel).read_bytes())
        t["junk"].append(f"chest_xray/{rel}")
    for rel, data in ((".DS_Store", bytes(16)), ("train/.DS_Store", bytes(16)),
                      ("__MACOSX/._chest_xray", APPLEDOUBLE),
                      (f"__MACOSX/chest_xray/{Path(files[0][0]).parent}/._"
                       f"{Path(files[0][0]).name}", APPLEDOUBLE)):
        write(root / rel, data)
        t["junk"].append(rel)
    t.update(usable=len(labels), label_counts=counts(labels), task_images=len(labels))
    return t


MURA_PARTS = ("XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER",
              "XR_WRIST")


def mura(root: Path, cfg: dict, seed: int) -> dict:
    """MURA-v1.1 with both CSV kinds (paths prefixed ``MURA-v1.1/``, study paths ending in
    ``/``), L and RGB PNGs, and one listed image missing on disk."""
    rng, px, cap = layout_rng(seed, "mura"), cfg["px"], cfg["per_patient"]
    entries = []  # (split, part, patient, study dir, [image names], label)
    for split, n_pat, first in (("train", cfg["mura"][0], 1), ("valid", cfg["mura"][1], 11185)):
        for p in range(n_pat):
            part = MURA_PARTS[p % 7] if p < 7 else str(rng.choice(MURA_PARTS))
            budget = int(rng.integers(1, cap + 1))
            study = 0
            while budget:
                k = min(budget, int(rng.integers(1, 4)))
                budget -= k
                study += 1
                label = int(rng.random() < 0.45)
                sdir = f"{split}/{part}/patient{first + p:05d}/study{study}_" \
                       f"{'positive' if label else 'negative'}"
                entries.append((split, part, sdir, [f"image{j + 1}.png" for j in range(k)],
                                label))
    multi = [i for i, e in enumerate(entries) if e[0] == "train" and len(e[3]) > 1]
    if not multi:
        entries[0][3].append("image2.png")
        multi = [0]
    missing = (int(rng.choice(multi)), 1)
    total = sum(len(e[3]) for e in entries)
    rgb = set(rng.choice(total, max(1, total // 7), replace=False).tolist())
    t = truth(FOLDERS["mura"], 0, label_counts={}, quirks={"rgb": []},
              body_part_counts={})
    lists = {"train": [], "valid": []}
    studies = {"train": [], "valid": []}
    labels, parts, k = [], Counter(), 0
    for e_i, (split, part, sdir, images, label) in enumerate(entries):
        studies[split].append([f"MURA-v1.1/{sdir}/", label])
        for j, name in enumerate(images):
            rel = f"{sdir}/{name}"
            lists[split].append([f"MURA-v1.1/{rel}"])
            r = image_rng(seed, "mura", k)
            k += 1
            if (e_i, j) == missing:
                reject(t, rel, "file missing")
                continue
            img = mura_image(r, label, px, part).image
            mode = "RGB" if k - 1 in rgb else "L"
            if mode == "RGB":
                t["quirks"]["rgb"].append(rel)
            save_png(root / rel, img, mode)
            labels.append(label)
            parts[part] += 1
    for split in ("train", "valid"):
        write_csv(root / f"{split}_image_paths.csv", lists[split])
        write_csv(root / f"{split}_labeled_studies.csv", studies[split])
    t.update(usable=len(labels), label_counts=counts(labels), task_images=len(labels),
             body_part_counts={p: parts[p] for p in MURA_PARTS if parts[p]})
    return t


def chestmasks(root: Path, cfg: dict, seed: int) -> dict:
    """CXR_png with Montgomery and Shenzhen images, masks/ named two ways (one mask at half
    size, one 16-bit), one image left without mask, one palette image, and test/ images
    that have no masks."""
    rng, px = layout_rng(seed, "chestmasks"), cfg["px"]
    n_mc, n_ch = cfg["chestmasks"]
    items = [(f"MCUCXR_{num:04d}_{lab}", f"MCUCXR_{num:04d}_{lab}.png")
             for num, lab in _tb_ids(rng, n_mc, 0.42)]
    items += [(f"CHNCXR_{num:04d}_{lab}", f"CHNCXR_{num:04d}_{lab}_mask.png")
              for num, lab in _tb_ids(rng, n_ch, 0.5)]
    half, deep, nomask, palette = (int(i) for i in rng.choice(len(items), 4, replace=False))
    t = truth(FOLDERS["chestmasks"], 0, label_counts={}, masks=0, quirks={})
    labels = []
    for i, (stem, mask_name) in enumerate(items):
        r = image_rng(seed, "chestmasks", i)
        h, w = (jitter(r, px * 1.2), jitter(r, px)) if stem[0] == "M" else \
            (jitter(r, px), jitter(r, px))
        ch = tb_image(r, stem.endswith("1"), h, w)
        rel = f"CXR_png/{stem}.png"
        save_png(root / rel, ch.image, "P" if i == palette else "L")
        if i == palette:
            t["quirks"]["palette"] = rel
        if i == nomask:
            reject(t, rel, "mask missing")
            continue
        mask = mask_png(ch.lungs)
        mrel = f"masks/{mask_name}"
        if i == half:
            mask = cv2.resize(mask, (w // 2, h // 2), interpolation=cv2.INTER_NEAREST)
            t["quirks"]["mask_other_size"] = mrel
        save_png(root / mrel, mask, "I;16" if i == deep else "L")
        if i == deep:
            t["quirks"]["mask_16bit"] = mrel
        labels.append(int(stem[-1]))
    for j in range(3):
        num, lab = n_ch + 1 + j, j % 2
        r = image_rng(seed, "chestmasks", 10_000 + j)
        rel = f"test/CHNCXR_{num:04d}_{lab}.png"
        save_png(root / rel, tb_image(r, bool(lab), px, px).image)
        reject(t, rel, "mask missing")
    t.update(usable=len(labels), label_counts=counts(labels), masks=len(labels),
             task_images=len(labels))
    return t


TBX_CATEGORIES = [{"id": 1, "name": "ActiveTuberculosis", "supercategory": "Tuberculosis"},
                  {"id": 2, "name": "ObsoletePulmonaryTuberculosis",
                   "supercategory": "Tuberculosis"},
                  {"id": 3, "name": "PulmonaryTuberculosis", "supercategory": "Tuberculosis"}]
TBX = 512


def _tbx_boxes(ch: A.Chest, rng, cats: list[int]) -> list[list[float]]:
    """Boxes around TB lesions drawn inside them (latent = small calcified spots)."""
    boxes = []
    weight = ch.lungs.astype(np.float32)  # lesions lie in the lung parenchyma
    for cat in cats:
        ys, xs = np.nonzero(ch.lungs)
        upper = ys < np.percentile(ys, 65)
        i = rng.integers(upper.sum())
        cx, cy = float(xs[upper][i]), float(ys[upper][i])
        bw, bh = (rng.uniform(28, 60, 2) if cat == 2 else rng.uniform(50, 110, 2))
        x0, y0 = max(0.0, cx - bw / 2), max(0.0, cy - bh / 2)
        bw, bh = min(bw, TBX - x0), min(bh, TBX - y0)
        A.tb_lesion(ch.image, x0 + bw / 2, y0 + bh / 2, 0.6 * min(bw, bh), cat, rng, weight,
                    ch.density)
        boxes.append([round(x0, 2), round(y0, 2), round(bw, 2), round(bh, 2), cat])
    return boxes


def tbx11k(root: Path, cfg: dict, seed: int) -> dict:
    """TBX11K: 512 px health/sick/tb (+ extra, test) PNGs, COCO train/val JSONs with xywh boxes
    in 512 space, lists/*.txt; one TB image without box, one truncated PNG."""
    rng = layout_rng(seed, "tbx11k")
    n = cfg["tbx11k"]
    files = []  # (relative to imgs/, folder label or None, in json split or None)
    for folder, prefix, label in (("health", "h", 0), ("sick", "s", 1), ("tb", "tb", 2)):
        nums = np.cumsum(rng.integers(1, 4, n[folder] + (folder == "sick")))
        split = np.where(rng.random(len(nums)) < 0.8, "train", "val")
        files += [(f"{folder}/{prefix}{num:04d}.png", label, str(s)) for num, s in zip(nums, split)]
    files += [(f"extra/{'da' if j % 2 else 'db'}/{j + 1:04d}.png", None, None)
              for j in range(n["extra"])]
    files += [(f"test/{j + 1:04d}.png", None, None) for j in range(n["test"])]
    tb_idx = [i for i, f in enumerate(files) if f[1] == 2]
    sick_idx = [i for i, f in enumerate(files) if f[1] == 1]
    no_box, broken = int(rng.choice(tb_idx)), int(rng.choice(sick_idx))
    cats_of = {i: [1 + j % 3] if j < 3 else
               rng.choice([1, 2, 3], int(rng.integers(1, 4)), p=[0.6, 0.25, 0.15]).tolist()
               for j, i in enumerate(x for x in tb_idx if x != no_box)}
    coco = {s: {"images": [], "annotations": [], "categories": TBX_CATEGORIES}
            for s in ("train", "val")}
    t = truth(FOLDERS["tbx11k"], 0, label_counts={}, task_images=0, boxes=0, box_counts={},
              unlabeled=0, quirks={"tb_without_box": f"imgs/{files[no_box][0]}"})
    labels, box_counts = [], Counter()
    for i, (rel, label, split) in enumerate(files):
        r = image_rng(seed, "tbx11k", i)
        drawn = tbx_image(r, label, cats_of.get(i, [1]))
        img, boxes = drawn.image, [] if i == no_box else drawn.boxes
        save_png(root / "imgs" / rel, img, "RGB" if r.random() < 0.3 else "L")
        if split:
            doc = coco[split]
            image_id = len(doc["images"])
            doc["images"].append({"id": image_id, "file_name": rel, "width": TBX, "height": TBX})
            for b in boxes:
                doc["annotations"].append({"id": len(doc["annotations"]), "image_id": image_id,
                                           "category_id": b[4], "bbox": b[:4],
                                           "area": round(b[2] * b[3], 2), "iscrowd": 0})
        if i == broken:
            truncate(root / "imgs" / rel)
            reject(t, f"imgs/{rel}", "unreadable")
            continue
        if label is None:
            t["unlabeled"] += 1
        else:
            labels.append(label)
        if boxes:
            t["task_images"] += 1
            box_counts.update(b[4] for b in boxes)
    for s in ("train", "val"):
        write(root / "annotations" / "json" / f"TBX11K_{s}.json", json.dumps(coco[s]))
        write(root / "lists" / f"TBX11K_{s}.txt",
              "".join(f"{im['file_name']}\n" for im in coco[s]["images"]))
    write(root / "lists" / "TBX11K_trainval.txt",
          "".join(f"{f}\n" for f, _, s in files if s))
    write(root / "lists" / "all_test.txt", "".join(f"{f}\n" for f, _, s in files
                                                  if f.startswith("test/")))
    t.update(usable=len(labels) + t["unlabeled"], label_counts=counts(labels),
             boxes=sum(box_counts.values()),
             box_counts={str(c): box_counts[c] for c in sorted(box_counts)})
    return t


WRITERS = {name: globals()[name] for name in NAMES}
