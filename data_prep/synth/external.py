"""Two datasets that are *not* among the nine, written in the generic layouts
(``data_prep/layouts.py``) with planted quirks: the demo of "your own dataset, no code".

- ``knee`` (``external/knee``, ``folders`` layout): knee radiographs graded by joint-space
  narrowing, ``{train,valid,test}/{mild,normal,severe}/*.png``. The gap between the femur and
  the tibia is wide (normal), narrower (mild) or nearly closed (severe), so the grade is
  learnable from the pixels. Quirks: a nested folder inside a class folder, one RGB and one
  16-bit PNG, one truncated PNG, a notes file in a class folder, ``.DS_Store`` /
  ``Thumbs.db`` / ``__MACOSX`` junk.
- ``hip`` (``external/hip``, ``masks`` layout, two classes): pelvis radiographs with the left
  and right femoral heads segmented, ``images/hip_NNNN.png`` and
  ``masks/{left_femoral_head,right_femoral_head}/hip_NNNN_mask.png``. "Left" is the patient's
  left, on the image's right as radiographs are viewed. Quirks: one image without its right
  mask, one mask without image, one mask at half size, one 16-bit mask, one palette image,
  one RGBA image, a ``Thumbs.db``.

The returned truths follow the nine writers' (``usable``, ``label_counts``,
``planted_rejects``, ``junk``, ``quirks``) plus ``layout``, ``classes`` and, for knee,
``split_counts``; hip has ``masks`` and ``images_with_class``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from . import anatomy as A
from .layouts import (
    APPLEDOUBLE,
    THUMBS_DB,
    image_rng,
    jitter,
    layout_rng,
    reject,
    save_png,
    truncate,
    truth,
    write,
)

KNEE_GRADES = ("normal", "mild", "severe")  # written in this order; class index = sorted order
KNEE_GAP = {"normal": 0.11, "mild": 0.06, "severe": 0.015}  # joint space / image height
HIP_CLASSES = ("left_femoral_head", "right_femoral_head")
EXTERNAL_SCALES = {
    "tiny": {"px": 96, "knee": {"train": 8, "valid": 2, "test": 2}, "hip": 16},
    "small": {"px": 256, "knee": {"train": 60, "valid": 12, "test": 12}, "hip": 140},
}
FOLDERS = {"knee": "external/knee", "hip": "external/hip"}


def knee_image(h: int, w: int, rng, grade: str) -> np.ndarray:
    """A frontal knee: femur from the top, tibia (and fibula) from the bottom, separated by a
    joint space of ``KNEE_GAP[grade]`` of the height (±15%)."""
    img = np.full((h, w), rng.uniform(5, 20), np.float32)
    cx = w * rng.uniform(0.45, 0.55)
    joint = h * rng.uniform(0.45, 0.55)
    gap = h * KNEE_GAP[grade] * rng.uniform(0.85, 1.15)
    r = w * rng.uniform(0.13, 0.16)
    A.capsule(img, (cx, -r), (cx, joint - gap / 2), w * 0.3, rng.uniform(45, 60))  # soft tissue
    A.capsule(img, (cx, joint + gap / 2), (cx, h + r), w * 0.28, rng.uniform(45, 60))
    femur_end = joint - gap / 2 - 1.6 * r
    A.capsule(img, (cx, -r), (cx, femur_end), r, 150, cortex=60)
    for side in (-1, 1):  # the condyles end exactly at the joint space
        A.capsule(img, (cx + side * 0.9 * r, femur_end), (cx + side * 0.9 * r,
                                                          joint - gap / 2 - r), r, 150,
                  cortex=60)
    plateau = joint + gap / 2
    A.capsule(img, (cx - 1.8 * r, plateau + 0.4 * r), (cx + 1.8 * r, plateau + 0.4 * r),
              0.4 * r, 150, cortex=60)
    A.capsule(img, (cx, plateau + 1.5 * r), (cx, h + r), 1.1 * r, 150, cortex=60)
    A.capsule(img, (cx + 2.1 * r, plateau + 1.5 * r), (cx + 2.3 * r, h + r), 0.35 * r, 140,
              cortex=40)
    return img


def knee(root: Path, cfg: dict, seed: int) -> dict:
    """The folders layout with official train/valid/test sub-folders."""
    rng, px, per = layout_rng(seed, "knee"), cfg["px"], cfg["knee"]
    files = []  # (relative path, grade)
    for split, n in per.items():
        for grade in KNEE_GRADES:
            for _ in range(n):
                files.append((f"{split}/{grade}/knee_{len(files) + 1:04d}.png", grade))
    # nested: the last two train/severe images sit in a sub-folder of their class folder
    severe = [i for i, (p, g) in enumerate(files) if p.startswith("train/severe/")]
    for i in severe[-2:]:
        rel, g = files[i]
        files[i] = (rel.replace("severe/", "severe/batch2/"), g)
    train = [i for i, (p, _) in enumerate(files) if p.startswith("train/")]
    rgb, i16, broken = (int(i) for i in rng.choice(train, 3, replace=False))
    t = truth(FOLDERS["knee"], 0, layout="folders", classes=sorted(KNEE_GRADES),
              label_counts={}, split_counts={}, quirks={"nested": [files[i][0] for i in
                                                                   severe[-2:]]})
    labels, splits = [], []
    for i, (rel, grade) in enumerate(files):
        r = image_rng(seed, "knee", i)
        h, w = jitter(r, px * 1.2), jitter(r, px)
        film = A.film(r)  # before the grade: its distribution is every grade's
        drawn = knee_image(h, w, r, grade)
        img = A.expose(drawn, film, clear=drawn > 100)  # no collimator leaf over a bone
        mode = "RGB" if i == rgb else "I;16" if i == i16 else "L"
        save_png(root / rel, img, mode)
        if i == rgb:
            t["quirks"]["rgb"] = rel
        if i == i16:
            t["quirks"]["i16"] = rel
        if i == broken:
            truncate(root / rel)
            reject(t, rel, "unreadable")
            continue
        labels.append(grade)
        splits.append(rel.split("/")[0])
    write(root / "train/mild/notes.txt", "grader 2 re-read these\n")
    reject(t, "train/mild/notes.txt", "not an image")
    for rel, data in (("train/.DS_Store", bytes(16)), ("train/normal/Thumbs.db", THUMBS_DB),
                      ("__MACOSX/train/normal/._knee_0001.png", APPLEDOUBLE)):
        write(root / rel, data)
        t["junk"].append(rel)
    t.update(usable=len(labels),
             label_counts={g: labels.count(g) for g in sorted(KNEE_GRADES)},
             split_counts={s: splits.count(s) for s in per})
    return t


def hip_image(h: int, w: int, rng) -> tuple[np.ndarray, list[np.ndarray]]:
    """A pelvis with both femora; returns the image and the femoral-head masks (left, right:
    the patient's left is on the image's right)."""
    img = np.full((h, w), rng.uniform(5, 20), np.float32)
    A.capsule(img, (0.1 * w, 0.55 * h), (0.9 * w, 0.55 * h), 0.35 * h, rng.uniform(40, 55))
    A.capsule(img, (0.2 * w, 0.25 * h), (0.42 * w, 0.55 * h), 0.09 * w, 120, cortex=40)  # ilia
    A.capsule(img, (0.8 * w, 0.25 * h), (0.58 * w, 0.55 * h), 0.09 * w, 120, cortex=40)
    A.capsule(img, (0.4 * w, 0.7 * h), (0.6 * w, 0.7 * h), 0.04 * w, 120, cortex=40)  # pubis
    masks = []
    for side in (1, -1):  # patient's left = image right first
        cx = w * (0.5 + side * rng.uniform(0.2, 0.25))
        cy = h * rng.uniform(0.5, 0.58)
        rad = w * rng.uniform(0.065, 0.085)
        A.capsule(img, (cx, cy), (cx + side * 0.08 * w, h * 1.05), 0.055 * w, 150, cortex=60)
        A.capsule(img, (cx, cy), (cx, cy), rad, 170, cortex=50)
        m = np.zeros((h, w), np.uint8)
        cv2.circle(m, (int(round(cx)), int(round(cy))), int(round(rad)), 255, -1)
        masks.append(m)
    return img, masks


def hip(root: Path, cfg: dict, seed: int) -> dict:
    """The masks layout, two classes: one folder of masks per femoral head."""
    rng, px, n = layout_rng(seed, "hip"), cfg["px"], cfg["hip"]
    no_right, half, deep, palette, rgba = (int(i) for i in rng.choice(n, 5, replace=False))
    t = truth(FOLDERS["hip"], 0, layout="masks", classes=list(HIP_CLASSES), masks=0,
              images_with_class={c: 0 for c in HIP_CLASSES}, quirks={})
    for i in range(n):
        stem = f"hip_{i + 1:04d}"
        r = image_rng(seed, "hip", i)
        h, w = jitter(r, px * 0.8), jitter(r, px)
        film = A.film(r)
        img, masks = hip_image(h, w, r)
        rel = f"images/{stem}.png"
        mode = "P" if i == palette else "RGBA" if i == rgba else "L"
        save_png(root / rel, A.expose(img, film, clear=img > 30), mode)  # leaves off the body
        if mode != "L":
            t["quirks"]["palette" if mode == "P" else "rgba"] = rel
        for cls, m in zip(HIP_CLASSES, masks):
            mrel = f"masks/{cls}/{stem}_mask.png"
            if i == no_right and cls == "right_femoral_head":
                continue
            if i == half and cls == "left_femoral_head":
                m = cv2.resize(m, (w // 2, h // 2), interpolation=cv2.INTER_NEAREST)
                t["quirks"]["mask_other_size"] = mrel
            save_png(root / mrel, m, "I;16" if i == deep and cls == HIP_CLASSES[1] else "L")
            if i == deep and cls == HIP_CLASSES[1]:
                t["quirks"]["mask_16bit"] = mrel
        if i == no_right:
            reject(t, rel, "mask missing")
            continue
        t["usable"] += 1
    orphan = "masks/left_femoral_head/hip_0999_mask.png"
    save_png(root / orphan, np.zeros((px, px), np.uint8))
    reject(t, orphan, "mask without image")
    write(root / "images/Thumbs.db", THUMBS_DB)
    t["junk"].append("images/Thumbs.db")
    t["masks"] = t["usable"]
    t["images_with_class"] = {c: t["usable"] for c in HIP_CLASSES}
    return t


WRITERS = {"knee": knee, "hip": hip}
