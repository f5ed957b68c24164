"""MURA v1.1: ``MURA-v1.1/{train,valid}/XR_<PART>/patientNNNNN/studyK_<label>/imageN.png``.

``root`` is the folder that contains ``MURA-v1.1/`` (or ``MURA-v1.1/`` itself, or a folder up to
two levels above it). The path lists ``{train,valid}_image_paths.csv`` (no header) hold paths
starting ``MURA-v1.1/``; they are resolved against the folder holding the CSVs (the first path
component is the CSV's own name for that folder, whatever the folder is called on disk).
Images found on disk under ``train/`` and ``valid/`` are read whether listed or not.

``label`` per study from ``studyK_positive|negative``, checked against
``{train,valid}_labeled_studies.csv`` (``study_dir/,label``); a study named without a label
takes the CSV's. ``body_part`` = index in :data:`BODY_PARTS`. Group = the patient id.
Official split = the top folder (train / valid).

Rejects: a listed path whose file is absent (``file missing``), a study whose name and CSV
label disagree (``label conflict``), a study with neither (``label missing``), a path that is
not ``<split>/XR_<PART>/patient<N>/study<K>[_<label>]/<image>`` (``bad name``).
"""

from __future__ import annotations

import re
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

FOLDER = "MURA-v1.1"
SPLITS = ("train", "valid")
BODY_PARTS = ("XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER",
              "XR_WRIST")
LABELS = {"negative": 0, "positive": 1}
PATIENT = re.compile(r"patient\d+", re.IGNORECASE)
STUDY = re.compile(r"study\d+(?:_(positive|negative))?", re.IGNORECASE)


def read_rows(path: Path | None) -> list[list[str]]:
    """The CSV's rows that name something (first cell non-empty); none for an absent CSV."""
    return [r for r in read_csv(path) if r[0]] if path is not None else []


def csv_parts(text: str) -> tuple[str, ...]:
    """A CSV path relative to the MURA folder: ``MURA-v1.1/train/XR_HAND/.../`` ->
    ``("train", "XR_HAND", ...)``; backslashes, ``./`` and the trailing ``/`` do not matter."""
    parts = [p for p in text.replace("\\", "/").split("/") if p and p != "."]
    while parts and parts[0].lower() not in SPLITS:
        parts = parts[1:]  # the CSV's name for the MURA folder (and anything above it)
    return tuple(parts)


def find_base(root: Path) -> Path | None:
    """The MURA folder: the one holding the CSVs, else ``MURA-v1.1/``, else ``root`` itself
    when it holds ``train/`` or ``valid/`` with ``XR_*`` folders."""
    csv_path = find_file(root, tuple(f"{s}_image_paths.csv" for s in SPLITS))
    if csv_path is not None:
        return csv_path.parent
    if root.name == FOLDER:
        return root
    found = find_dir(root, FOLDER)
    if found is not None:
        return found
    for s in SPLITS:
        if (root / s).is_dir() and any(c.name.upper() in BODY_PARTS for c in (root / s).iterdir()):
            return root
    return None


def study_labels(base: Path) -> dict[tuple[str, ...], int]:
    """``{study parts (lower case): label}`` from the labeled-studies CSVs."""
    out: dict[tuple[str, ...], int] = {}
    for s in SPLITS:
        for row in read_rows(find_file(base, (f"{s}_labeled_studies.csv",), 1)):
            if len(row) > 1 and row[1] in ("0", "1", "0.0", "1.0"):
                out.setdefault(tuple(p.lower() for p in csv_parts(row[0])), int(float(row[1])))
    return out


def scan(root: Path) -> Scan:
    base = find_base(root)
    if base is None:
        raise LayoutError(f"mura: no {FOLDER}/ folder nor train_image_paths.csv / "
                          f"valid_image_paths.csv in {root} or 2 levels below")
    out = Scan()
    files: dict[tuple[str, ...], Path] = {}  # parts relative to base (lower case) -> path
    for s in SPLITS:
        folder = base / s
        if folder.is_dir():
            for p in list_files(folder):
                files[tuple(x.lower() for x in p.relative_to(base).parts)] = p
    for s in SPLITS:
        listing = find_file(base, (f"{s}_image_paths.csv",), 1)
        for row in read_rows(listing):
            parts = csv_parts(row[0])
            key = tuple(x.lower() for x in parts)
            if key in files:
                continue
            if parts:
                p = base.joinpath(*parts)
                if p.is_file():  # a spelling the case-folded walk did not see
                    files[key] = p
                    continue
            out.reject(root, base.joinpath(*parts) if parts else row[0],
                       f"file missing: listed in {listing.name}")
    labels = study_labels(base)

    for key, p in files.items():
        parts = p.relative_to(base).parts
        if not is_image(p):
            out.reject(root, p, "bad name: not an image file")
            continue
        study = STUDY.fullmatch(parts[-2]) if len(parts) == 5 else None
        if (study is None or parts[1].upper() not in BODY_PARTS
                or not PATIENT.fullmatch(parts[2]) or parts[0].lower() not in SPLITS):
            out.reject(root, p, "bad name: expected <split>/XR_<PART>/patientN/studyK_<label>/"
                                "<image>")
            continue
        named = LABELS[study.group(1).lower()] if study.group(1) else None
        listed = labels.get(key[:-1])
        if named is not None and listed is not None and named != listed:
            out.reject(root, p, f"label conflict: study is {study.group(1).lower()}, "
                                f"labeled-studies CSV says {listed}")
            continue
        label = named if named is not None else listed
        if label is None:
            out.reject(root, p, "label missing: study name has no _positive/_negative and "
                                "no labeled-studies row")
            continue
        out.records.append(Record(p, parts[2], split=parts[0].lower(), label=label,
                                  body_part=BODY_PARTS.index(parts[1].upper())))
    out.records.sort(key=lambda r: r.image.as_posix())
    out.rejects.sort(key=lambda r: r.path)
    return out


LICENCE = Licence(
    terms='custom terms: Stanford MURA Research Use Agreement, non-commercial',
    summary=('"for personal, non-commercial research purposes only. Any commercial use, '
             'sale, or other monetization is prohibited"; no redistribution without '
             'written permission; "You must not ... create derivative works from the MURA '
             'Dataset".'),
    url='https://stanfordmlgroup.github.io/competitions/mura/',
    citation=('Rajpurkar P et al., MURA: Large Dataset for Abnormality Detection in '
              'Musculoskeletal Radiographs, arXiv:1712.06957, 2017'),
    read="the publisher's own agreement page (verbatim)",
)

SPEC = DatasetSpec(name="mura", folder_names=(FOLDER,), role="task",
                   fields=("label", "body_part"), scan=scan, has_official_split=True,
                   label_names=("negative", "positive"),
                   licence=LICENCE)
