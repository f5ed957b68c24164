"""TBX11K: ``imgs/{health,sick,tb,extra,test}/...png`` with COCO boxes in
``annotations/json/TBX11K_{train,val}.json``.

The task is the TB images that have at least one box (the paper's 800): ``task=True``, split
``train`` or ``valid`` from the JSON that lists them, ``boxes`` = ``(x, y, w, h, category_id)``
from the JSON (categories 1 ActiveTuberculosis, 2 ObsoletePulmonaryTuberculosis,
3 PulmonaryTuberculosis) and ``box_space`` = the JSON entry's ``(width, height)``. Every other
readable image (health, sick, extra, test, TB without boxes) is ``task=False`` (the ``extra``
split, MD-MoCo only) with no boxes. ``label`` from the folder: health 0, sick 1, tb 2; images
under ``extra/`` and ``test/`` have no known class and get ``label=None`` (they are never task
images, so no task reads it). Group = the file (its path under ``imgs/``).

Rejects: a JSON image whose file is absent (``file missing``), a file outside the five folders
(``label missing``), a box that is not 4 finite numbers with w, h > 0 and a known category
(``label missing``), a box wholly outside its image (``bad box``, found when decoding), a
non-image file (``bad name``).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from .base import (
    DatasetSpec,
    LayoutError,
    Licence,
    Record,
    Scan,
    coco_bbox,
    coco_size,
    find_dir,
    find_file,
    is_image,
    list_files,
)

LABEL_NAMES = ("health", "sick", "tb")
CATEGORIES = ("ActiveTuberculosis", "ObsoletePulmonaryTuberculosis", "PulmonaryTuberculosis")
JSONS = {"train": "TBX11K_train.json", "valid": "TBX11K_val.json"}
UNLABELED = ("extra", "test")  # folders whose images have no class label
FOLDERS = (*LABEL_NAMES, *UNLABELED)
TASK_FOLDER = "tb"


def _norm(name: str) -> str:
    """A JSON ``file_name`` as a lower-case path under ``imgs/``."""
    parts = [p for p in str(name).replace("\\", "/").split("/") if p and p != "."]
    if parts and parts[0].lower() == "imgs":
        parts = parts[1:]
    return "/".join(parts).lower()


def _category_map(doc: dict) -> dict:
    """JSON category id -> our category id (by name where the JSON names them)."""
    out = {}
    for c in doc.get("categories") or []:
        if isinstance(c, dict) and c.get("name") in CATEGORIES:
            out[c.get("id")] = CATEGORIES.index(c["name"]) + 1
    return out or {i: i for i in range(1, len(CATEGORIES) + 1)}


def _box(ann: dict, cats: dict) -> tuple[float, float, float, float, int] | None:
    cat, box = cats.get(ann.get("category_id")), coco_bbox(ann)
    return None if cat is None or box is None else (*box, cat)


def read_json(path: Path) -> dict[str, dict]:
    """``{normalized file name: {"file_name", "size", "boxes", "bad"}}`` of one COCO file."""
    with open(path, encoding="utf-8-sig") as f:
        doc = json.load(f)
    cats = _category_map(doc)
    entries: dict[str, dict] = {}
    by_id: dict = {}
    for img in doc.get("images") or []:
        if not isinstance(img, dict) or not img.get("file_name"):
            continue
        key = _norm(img["file_name"])
        if key in entries:
            by_id[img.get("id")] = entries[key]
            continue
        entry = {"file_name": img["file_name"], "size": coco_size(img), "boxes": [], "bad": False}
        entries[key] = by_id[img.get("id")] = entry
    for ann in doc.get("annotations") or []:
        entry = by_id.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if entry is None:
            continue
        box = _box(ann, cats)
        if box is None:
            entry["bad"] = True
        else:
            entry["boxes"].append(box)
    return entries




def scan(root: Path) -> Scan:
    imgs = find_dir(root, "imgs")
    if imgs is None:
        raise LayoutError(f"tbx11k: no imgs/ folder in {root} or 2 levels below")
    base = imgs.parent
    jsons = {s: find_file(base, (n,), 2) for s, n in JSONS.items()}
    if not any(jsons.values()):
        raise LayoutError(f"tbx11k: no annotations/json/{' or '.join(JSONS.values())} "
                          f"next to {imgs.name}/")
    out = Scan()
    files: dict[str, Path] = {}
    for p in list_files(imgs):
        if not is_image(p):
            out.reject(root, p, "bad name: not an image file")
        else:
            files[p.relative_to(imgs).as_posix().lower()] = p
    listed: dict[str, tuple[str, dict]] = {}  # file key -> (split, entry); train wins
    for split, path in jsons.items():
        if path is None:
            continue
        for key, entry in read_json(path).items():
            if key in listed:
                continue
            if key not in files:
                out.reject(root, imgs / entry["file_name"].lstrip("/"),
                           f"file missing: listed in {path.name}")
                continue
            listed[key] = (split, entry)

    for key, p in files.items():
        rel = PurePosixPath(p.relative_to(imgs).as_posix())
        top = rel.parts[0].lower() if len(rel.parts) > 1 else ""
        if top not in FOLDERS:
            out.reject(root, p, f"label missing: not under imgs/{{{','.join(FOLDERS)}}}/")
            continue
        label = LABEL_NAMES.index(top) if top in LABEL_NAMES else None
        split, entry = listed.get(key, (None, None))
        if entry is not None and entry["bad"]:
            out.reject(root, p, "label missing: malformed box annotation in "
                                f"{JSONS[split]}")
            continue
        group = rel.as_posix()
        if entry is not None and entry["boxes"] and top == TASK_FOLDER:
            out.records.append(Record(p, group, split=split, task=True, label=label,
                                      boxes=tuple(entry["boxes"]), box_space=entry["size"]))
        else:
            out.records.append(Record(p, group, task=False, label=label))
    out.records.sort(key=lambda r: r.image.as_posix())
    out.rejects.sort(key=lambda r: r.path)
    return out


LICENCE = Licence(
    terms='no data licence stated (the code: CC BY-NC-SA 4.0)',
    summary=('The authors state no licence for the data and ask to be cited ("It would be '
             'highly appreciated if you can cite our paper when using our dataset"); their'
             ' code is CC BY-NC-SA 4.0, commercial use by permission. Read conservatively:'
             ' non-commercial, with attribution.'),
    url='https://github.com/yun-liu/Tuberculosis',
    citation=('Liu Y et al., Rethinking Computer-aided Tuberculosis Diagnosis, CVPR 2020; '
              'Liu Y et al., Revisiting Computer-Aided Tuberculosis Diagnosis, IEEE TPAMI '
              '46(4):2316-2332, 2023'),
    read="the publisher's repository and project page (verbatim); no data licence there",
)

SPEC = DatasetSpec(name="tbx11k", folder_names=("TBX11K", "tbx11k"), role="task",
                   fields=("label", "boxes"), scan=scan, has_official_split=True,
                   label_names=LABEL_NAMES, box_categories=CATEGORIES,
                   licence=LICENCE)
