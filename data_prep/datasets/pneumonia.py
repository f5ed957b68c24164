"""Pediatric pneumonia (Kermany): ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``.

The tree read is the shallowest folder under ``root`` that holds ``train/``, ``val/`` or
``test/``; the Kaggle archive's duplicate ``chest_xray/chest_xray/`` tree is therefore ignored
when the top tree exists, and used when it is the only one. ``__MACOSX/`` and ``.DS_Store`` are
junk. ``label``: NORMAL 0, PNEUMONIA 1 (folder names matched case-insensitively). Group = the
patient in the file name: ``person1_bacteria_1`` -> ``person1``, ``IM-0115-0001`` -> ``IM-0115``,
``NORMAL2-IM-1427-0001`` -> ``NORMAL2-IM-1427``. Official split: train / val / test ->
train / valid / test.

Rejects: a file outside ``NORMAL/`` and ``PNEUMONIA/`` (``label missing``), a non-image file or
a name without a patient (``bad name``).
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import DatasetSpec, LayoutError, Licence, Record, Scan, is_image, list_files

SPLITS = {"train": "train", "val": "valid", "valid": "valid", "test": "test"}
CLASSES = {"normal": 0, "pneumonia": 1}
PATIENT = (re.compile(r"(person\d+)_[a-z]+(?:_\d+)+", re.IGNORECASE),
           re.compile(r"((?:NORMAL2-)?IM-\d+)(?:-\d+)+", re.IGNORECASE))
MAX_DEPTH = 3


def _split_dirs(folder: Path) -> dict[str, Path]:
    """``{official split: folder}`` for the split folders directly inside ``folder``."""
    out = {}
    for c in sorted(folder.iterdir()):
        split = SPLITS.get(c.name.lower())
        if split and c.is_dir() and split not in out:
            out[split] = c
    return out


def find_tree(root: Path) -> dict[str, Path]:
    """The split folders of the shallowest folder under ``root`` whose split folders hold a
    NORMAL/ or PNEUMONIA/ folder."""
    frontier = [root]
    for _ in range(MAX_DEPTH + 1):
        for d in frontier:
            found = _split_dirs(d)
            if any(c.is_dir() and c.name.lower() in CLASSES
                   for s in found.values() for c in s.iterdir()):
                return found
        frontier = [c for d in frontier for c in sorted(d.iterdir())
                    if c.is_dir() and c.name != "__MACOSX"]
    return {}


def patient(stem: str) -> str | None:
    for pattern in PATIENT:
        m = pattern.fullmatch(stem)
        if m:
            return m.group(1)
    return None


def scan(root: Path) -> Scan:
    tree = find_tree(root)
    if not tree:
        raise LayoutError(f"pneumonia: no chest_xray/{{train,val,test}}/ folders in {root} "
                          f"or {MAX_DEPTH} levels below")
    out = Scan()
    for split, folder in tree.items():
        for p in list_files(folder):
            rel = p.relative_to(folder).parts
            label = CLASSES.get(rel[0].lower()) if len(rel) == 2 else None
            if label is None:
                out.reject(root, p, "label missing: not in a NORMAL/ or PNEUMONIA/ folder")
                continue
            if not is_image(p):
                out.reject(root, p, "bad name: not an image file")
                continue
            group = patient(p.stem)
            if group is None:
                out.reject(root, p, "bad name: expected personN_<kind>_N, IM-NNNN-NNNN or "
                                    "NORMAL2-IM-NNNN-NNNN")
                continue
            out.records.append(Record(p, group, split=split, label=label))
    out.records.sort(key=lambda r: r.image.as_posix())
    out.rejects.sort(key=lambda r: r.path)
    return out


LICENCE = Licence(
    terms='CC BY 4.0',
    summary=('Any use, commercial included, with credit to the creators and the licence '
             'named.'),
    url='https://data.mendeley.com/datasets/rscbjbr9sj/2',
    citation=('Kermany D, Zhang K, Goldbaum M, Labeled Optical Coherence Tomography (OCT) '
              'and Chest X-Ray Images for Classification, Mendeley Data V2, '
              'doi:10.17632/rscbjbr9sj.2; Kermany DS et al., Cell 172(5):1122-1131, 2018'),
    read=("the Kaggle page's and the Mendeley record's licence through three copies that "
          'agree'),
)

SPEC = DatasetSpec(name="pneumonia", folder_names=("chest_xray", "chest-xray-pneumonia", "Kermany"),
                   role="task", fields=("label",), scan=scan, has_official_split=True,
                   label_names=("normal", "pneumonia"),
                   licence=LICENCE)
