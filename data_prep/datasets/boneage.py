"""RSNA Bone Age (training set): ``boneage-training-dataset.csv`` (``id,boneage,male``) and images
doubly nested in ``boneage-training-dataset/boneage-training-dataset/<id>.png``.

Ids are not contiguous, so images and rows are matched by id, not by position. ``boneage`` is in
months (float), ``male`` is ``True``/``False`` (0/1 also accepted). Group = the id. An image with
no row is a ``label missing`` reject; a row whose image is absent is a ``file missing`` reject.
"""

from __future__ import annotations

import math
from pathlib import Path

from .base import (
    DatasetSpec,
    LayoutError,
    Licence,
    Record,
    Scan,
    find_dir,
    find_file,
    is_image,
    list_files,
    read_csv,
)

CSV_NAME = "boneage-training-dataset.csv"
FOLDER = "boneage-training-dataset"
TRUE, FALSE = frozenset({"true", "1", "m", "male", "yes"}), frozenset(
    {"false", "0", "f", "female", "no"})


def norm_id(text: str) -> str:
    """``"01377"``, ``"1377"`` and ``"1377.0"`` are one id."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else text


def read_rows(path: Path) -> list[dict[str, str]]:
    rows = read_csv(path)
    if not rows:
        return []
    header = [h.lower() for h in rows[0]]
    if not {"id", "boneage", "male"} <= set(header):
        header = ["id", "boneage", "male"]  # no header line: positional
    else:
        rows = rows[1:]
    return [dict(zip(header, r)) for r in rows]


def image_folder(base: Path) -> Path | None:
    """The innermost ``boneage-training-dataset/`` (it is doubly nested in the download)."""
    folder = find_dir(base, FOLDER)
    while folder is not None and (folder / FOLDER).is_dir():
        folder = folder / FOLDER
    return folder


def _values(row: dict[str, str]) -> tuple[float, int] | str:
    try:
        age = float(row.get("boneage", ""))
    except ValueError:
        return "label missing: no numeric boneage"
    if not math.isfinite(age):
        return "label missing: no numeric boneage"
    male = row.get("male", "").lower()
    if male not in TRUE | FALSE:
        return "label missing: male is not True/False"
    return age, int(male in TRUE)


def scan(root: Path) -> Scan:
    csv_path = find_file(root, (CSV_NAME,))
    if csv_path is None:
        raise LayoutError(f"boneage: no {CSV_NAME} found in {root} or 2 levels below")
    folder = image_folder(csv_path.parent) or image_folder(root)
    if folder is None:
        raise LayoutError(f"boneage: no {FOLDER}/{FOLDER}/ image folder next to {CSV_NAME}")
    out = Scan()
    files: dict[str, Path] = {}
    for p in list_files(folder):
        if not is_image(p):
            out.reject(root, p, "bad name: not an image file")
        elif norm_id(p.stem) in files:
            out.reject(root, p, "bad name: duplicate id")
        else:
            files[norm_id(p.stem)] = p
    rows: dict[str, dict[str, str]] = {}
    for row in read_rows(csv_path):
        key = norm_id(row.get("id", ""))
        if key:
            rows.setdefault(key, row)
    for key in sorted(set(rows) - set(files)):
        out.reject(root, folder / f"{key}.png", f"file missing: listed in {CSV_NAME}")
    for key, p in files.items():
        row = rows.get(key)
        if row is None:
            out.reject(root, p, f"label missing: id not in {CSV_NAME}")
            continue
        values = _values(row)
        if isinstance(values, str):
            out.reject(root, p, values)
            continue
        out.records.append(Record(p, key, boneage=values[0], male=values[1]))
    out.records.sort(key=lambda r: r.image.as_posix())
    out.rejects.sort(key=lambda r: r.path)
    return out


LICENCE = Licence(
    terms='custom terms: RSNA 2017 AI Challenge, non-commercial',
    summary=('"for the purposes of academic research and education, and other '
             'non-commercial purposes"; no attempt to identify any subject; sharing the '
             "data requires a link to RSNA's download page and the citation."),
    url=('https://www.rsna.org/rsnai/ai-image-challenge/RSNA-Pediatric-Bone-Age-Challenge-'
         '2017'),
    citation=('Halabi SS et al., The RSNA Pediatric Bone Age Machine Learning Challenge, '
              'Radiology 290(2):498-503, 2019'),
    read=("RSNA's Terms of Use and Attribution through a verbatim copy; the Stanford AIMI "
          "and Kaggle copies' terms were not found"),
)

SPEC = DatasetSpec(name="boneage", folder_names=("rsna-bone-age", "boneage", "RSNA-Bone-Age"),
                   role="pretrain", fields=("boneage", "male"), scan=scan,
                   licence=LICENCE)
