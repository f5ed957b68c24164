"""NIH ChestX-ray14: 15-dim multi-hot findings from ``Data_Entry_2017[_v2020].csv``.

Images sit in Kaggle's ``images_NNN/images/`` folders or in one flat ``images/`` folder next to
the CSV. The CSV's bracketed headers contain commas, so columns are read by position
(0 image name, 1 findings, 3 patient id); the 2017 file ends every row with a trailing comma.
The official split comes from ``train_val_list.txt`` / ``test_list.txt`` when they exist.
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
    find_file,
    is_image,
    list_files,
    read_csv,
    read_text,
)

LABEL_NAMES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
               "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
               "Pleural_Thickening", "Hernia", "No Finding")
CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
_INDEX = {re.sub(r"[\s_]+", " ", n).lower(): i for i, n in enumerate(LABEL_NAMES)}
_SHARD_DIR = re.compile(r"images_\d+", re.IGNORECASE)


def finding_index(name: str) -> int | None:
    """Index of a finding name; case and space/underscore spelling are not significant."""
    return _INDEX.get(re.sub(r"[\s_]+", " ", name).strip().lower())


def image_dirs(base: Path) -> list[Path]:
    """``images/`` and ``images_NNN/images/`` (or ``images_NNN/`` holding the files itself)."""
    dirs = []
    for d in sorted(base.iterdir()):
        if not d.is_dir():
            continue
        if d.name.lower() == "images":
            dirs.append(d)
        elif _SHARD_DIR.fullmatch(d.name):
            inner = d / "images"
            dirs.append(inner if inner.is_dir() else d)
    return dirs


def read_list(path: Path | None) -> set[str]:
    if path is None:
        return set()
    return {Path(line.strip()).name for line in read_text(path).splitlines() if line.strip()}


def scan(root: Path) -> Scan:
    csv_path = find_file(root, CSV_NAMES)
    if csv_path is None:
        raise LayoutError(f"nih: no {' or '.join(CSV_NAMES)} found in {root} or 2 levels below")
    base = csv_path.parent
    dirs = image_dirs(base) or (image_dirs(root) if root != base else [])
    if not dirs:
        raise LayoutError(f"nih: no images/ or images_NNN/images/ folder next to {csv_path.name}")

    out = Scan()
    files: dict[str, Path] = {}
    for d in dirs:
        for p in list_files(d):
            if not is_image(p):
                out.reject(root, p, "bad name: not an image file")
            elif p.name in files:
                out.reject(root, p, "bad name: duplicate image name")
            else:
                files[p.name] = p

    rows = read_csv(csv_path)
    if rows and rows[0][0].lower() == "image index":
        rows = rows[1:]
    entries: dict[str, tuple[str, str]] = {}  # image name -> (findings, patient id)
    for row in rows:
        name = Path(row[0]).name
        if not name or name in entries:
            continue
        entries[name] = (row[1] if len(row) > 1 else "", row[3] if len(row) > 3 else "")

    lists = (find_file(base, ("train_val_list.txt",), 1), find_file(base, ("test_list.txt",), 1))
    train, test = read_list(lists[0]), read_list(lists[1])
    has_split = any(lists)

    for name in sorted(set(entries) - set(files)):
        out.reject(root, name, f"file missing: listed in {csv_path.name}")
    for name, path in files.items():
        entry = entries.get(name)
        if entry is None:
            out.reject(root, path, f"label missing: no row in {csv_path.name}")
            continue
        findings, patient = entry
        names = [f.strip() for f in findings.split("|") if f.strip()]
        if not names:
            out.reject(root, path, "label missing: empty Finding Labels")
            continue
        hot = [0] * len(LABEL_NAMES)
        unknown = []
        for f in names:
            i = finding_index(f)
            if i is None:
                unknown.append(f)
            else:
                hot[i] = 1
        if unknown:
            out.reject(root, path, f"unknown finding: {', '.join(unknown)}")
            continue
        split = None
        if has_split:
            split = "test" if name in test else "train" if name in train else None
        group = patient or name.split("_")[0]
        out.records.append(Record(path, group, split=split, labels=tuple(hot)))

    out.records.sort(key=lambda r: r.image.as_posix())
    out.rejects.sort(key=lambda r: r.path)
    return out


LICENCE = Licence(
    terms='custom terms: unrestricted use with attribution',
    summary=('"The usage of the data set is unrestricted. But you should provide the link '
             'to our original download site, acknowledge the NIH Clinical Center and '
             'provide a citation to our CVPR 2017 paper."'),
    url='https://nihcc.app.box.com/v/ChestXray-NIHCC',
    citation=('Wang X et al., ChestX-ray8: Hospital-scale Chest X-ray Database and '
              'Benchmarks on Weakly-Supervised Classification and Localization of Common '
              'Thorax Diseases, CVPR 2017'),
    read=("FAQ_CHESTXRAY.pdf Q04 through a text extraction, and Google Cloud's page for "
          'the set, which says the same'),
)

SPEC = DatasetSpec(name="nih", folder_names=("ChestX-ray14", "NIH", "nih-chest-xrays", "data"),
                   role="pretrain", fields=("labels",), scan=scan, has_official_split=True,
                   label_names=LABEL_NAMES,
                   licence=LICENCE)
