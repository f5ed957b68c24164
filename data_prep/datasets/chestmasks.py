"""Chest X-ray Masks and Labels (``Lung Segmentation``): Montgomery and Shenzhen images with
lung masks.

``CXR_png/`` holds ``MCUCXR_0001_0.png`` and ``CHNCXR_0001_0.png``; ``masks/`` holds
``MCUCXR_0001_0.png`` (same name) and ``CHNCXR_0001_0_mask.png`` (``_mask`` suffix); either
spelling is accepted for either set, names matched case-insensitively. Masks may differ in size
and bit depth from their image; the converter handles that. ``label`` = last digit of the stem
(0 normal, 1 TB); ``masks`` = (mask,). Group = the stem. No official split.

Rejects: every image in ``test/`` (whatever its name) and any ``CXR_png/`` image without a mask
(``mask missing``), a non-image file or a ``CXR_png/`` stem not ``<PREFIX>_<digits>_<0|1>``
(``bad name``). Orphan masks and
``ClinicalReadings/`` are not read.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import (
    NLM_TB_CITATION,
    DatasetSpec,
    LayoutError,
    Licence,
    Record,
    Scan,
    find_dir,
    is_image,
    list_files,
)

NAME = re.compile(r"[A-Za-z]+_\d+_([01])")
MAX_DEPTH = 3


def _sibling(images: Path, name: str) -> Path | None:
    """``name/`` next to ``images/``, matched case-insensitively."""
    for c in sorted(images.parent.iterdir()):
        if c.is_dir() and c.name.lower() == name and c != images:
            return c
    return None


def mask_index(folder: Path | None) -> dict[str, Path]:
    """``{image stem (lower case): mask path}``; ``X_mask.png`` and ``X.png`` both give ``x``."""
    out: dict[str, Path] = {}
    if folder is None:
        return out
    for p in list_files(folder):
        if not is_image(p):
            continue
        stem = p.stem.lower()
        if stem.endswith("_mask"):
            stem = stem[: -len("_mask")]
        out.setdefault(stem, p)
    return out


def _bad_name(p: Path) -> str | None:
    if not is_image(p):
        return "bad name: not an image file"
    if NAME.fullmatch(p.stem) is None:
        return "bad name: expected <PREFIX>_NNNN_0 or <PREFIX>_NNNN_1 (MCUCXR_/CHNCXR_)"
    return None


def scan(root: Path) -> Scan:
    images = find_dir(root, "CXR_png", MAX_DEPTH)
    if images is None:
        raise LayoutError(f"chestmasks: no CXR_png/ folder in {root} or {MAX_DEPTH} levels below")
    masks_dir = _sibling(images, "masks")
    if masks_dir is None:
        raise LayoutError(f"chestmasks: no masks/ folder next to {images.name}/")
    masks = mask_index(masks_dir)
    out = Scan()
    for p in list_files(images):
        problem = _bad_name(p)
        if problem:
            out.reject(root, p, problem)
            continue
        mask = masks.get(p.stem.lower())
        if mask is None:
            out.reject(root, p, f"mask missing: no {p.stem}.png or {p.stem}_mask.png in "
                                f"{masks_dir.name}/")
            continue
        out.records.append(Record(p, p.stem, label=int(NAME.fullmatch(p.stem).group(1)),
                                  masks=(mask,)))
    test = _sibling(images, "test")
    if test is not None:
        for p in list_files(test):
            out.reject(root, p, "mask missing: test/ images have no masks" if is_image(p)
                       else "bad name: not an image file")
    out.records.sort(key=lambda r: r.image.as_posix())
    out.rejects.sort(key=lambda r: r.path)
    return out


LICENCE = Licence(
    terms="CC0 label on Kaggle; the images keep NLM's terms",
    summary=("The Kaggle upload is labelled CC0, but its images are NLM's Shenzhen and "
             'Montgomery sets, whose terms (attribution; Montgomery: no sharing outside '
             "your group) a re-upload cannot lift: follow NLM's."),
    url='https://www.kaggle.com/datasets/nikhilpandey360/chest-xray-masks-and-labels',
    citation=NLM_TB_CITATION,
    read='the Kaggle page through two copies of its text',
)

SPEC = DatasetSpec(name="chestmasks",
                   folder_names=("Lung Segmentation", "chest-xray-masks-and-labels"),
                   role="task", fields=("label", "mask"), scan=scan,
                   label_names=("normal", "tb"), mask_classes=("lung",),
                   licence=LICENCE)
