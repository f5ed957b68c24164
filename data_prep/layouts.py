"""Datasets by configuration: four generic layouts for data that is not one of the nine.

    python -m data_prep.convert --dataset NAME --layout folders|csv|masks|coco --root DIR ...

:func:`build_spec` turns a layout and its options into a :class:`DatasetSpec` like the nine
plug-ins', so the converter's guarantees (every unusable file a reported reject, junk skipped,
atomic shards, patient-grouped seeded splits) hold unchanged. Options and rejects are
documented in ``data_prep/LAYOUTS.md`` ("Your own dataset: the four layouts"). Building a spec
reads the CSV header or the COCO categories, because the class names must be known before the
scan; every problem with them is a one-line :class:`LayoutError`.

Trade-offs, chosen for safety over convenience:
- An image missing a mask in *any* mask folder is rejected (in every ``--mask-mode``):
  an unannotated structure would otherwise train as background. Save an empty mask for an
  image that truly lacks a class.
- A COCO annotation with an unknown or malformed category/box rejects its whole image (a
  dropped box would teach "nothing here"); one on an unknown image id is itself a reject.
- A CSV row with an empty patient cell, or a path that ``--patient-pattern`` does not match, is
  rejected rather than made its own group (it could put one patient in two splits).

Why one module over ~450 lines: the four layouts share their record checks, group rules and
rejects, and a user's dataset is read by exactly one of them.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from .datasets import NAMES
from .datasets.base import (
    DatasetSpec,
    LayoutError,
    Record,
    Scan,
    coco_bbox,
    coco_size,
    is_image,
    is_junk,
    list_files,
    read_csv,
    relpath,
)

LAYOUTS = ("folders", "csv", "masks", "coco")
MASK_MODES = ("union", "classes", "values")
ROLES = ("task", "pretrain")
NAME_RE = re.compile(r"[a-z0-9_-]{1,64}")
SPLIT_NAMES = {"train": "train", "valid": "valid", "val": "valid", "test": "test"}
TRUE, FALSE = frozenset({"1", "1.0", "true"}), frozenset({"0", "0.0", "false"})

# Layout option -> the layouts it applies to. CLI: --image-column; YAML: image_column.
OPTIONS: dict[str, tuple[str, ...]] = {
    "role": LAYOUTS,
    "images": ("csv", "masks", "coco"),
    "csv": ("csv",),
    "encoding": ("csv",),
    "image_column": ("csv",),
    "label_column": ("csv",),
    "label_columns": ("csv",),
    "value_column": ("csv",),
    "patient_column": ("csv",),
    "patient_pattern": ("folders", "masks", "coco"),
    "split_column": ("csv",),
    "classes": ("csv", "masks"),
    "masks": ("masks",),
    "mask_suffix": ("masks",),
    "mask_mode": ("masks",),
    "coco": ("coco",),
}
LIST_OPTIONS = ("label_columns", "classes", "masks")


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name or ""):
        raise LayoutError(f"dataset name {name!r} must be 1-64 characters of a-z 0-9 _ - "
                          "(it becomes a folder name)")
    if name in NAMES or name == "all":
        raise LayoutError(f"dataset name {name!r} is taken by a built-in dataset; choose another "
                          "name for a dataset defined by --layout")


def as_list(value) -> list[str]:
    """A list option from the CLI (``a,b,c`` or repeated) or YAML (a list or ``a,b,c``)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str | int | float) else list(value)
    return [p.strip() for v in items for p in str(v).split(",") if p.strip()]


def normalize(layout: str, options: dict) -> dict:
    """Options with ``None`` dropped, lists split, checked against ``layout``."""
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    out = {}
    for key, value in options.items():
        if value is None or value == []:
            continue
        if key not in OPTIONS:
            raise LayoutError(f"unknown option {key!r}; known: {', '.join(OPTIONS)}")
        if layout not in OPTIONS[key]:
            raise LayoutError(f"{flag(key)} does not apply to the {layout} layout (it is for "
                              f"{', '.join(OPTIONS[key])})")
        out[key] = as_list(value) if key in LIST_OPTIONS else str(value)
        twice = sorted({v for v in out[key] if out[key].count(v) > 1}) \
            if key in LIST_OPTIONS else []
        if twice:  # a class named twice would be two classes, one of them never seen
            raise LayoutError(f"{flag(key)} names {twice[0]!r} more than once")
    role = out.setdefault("role", "task")
    if role not in ROLES:
        raise LayoutError(f"--role must be task or pretrain, not {role!r}")
    return out


def _path(root: Path, value: str | None, default: Path | None = None) -> Path | None:
    if value is None:
        return default
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p


def _folder(root: Path, value: str | None, what: str, default: Path | None = None) -> Path:
    p = _path(root, value, default)
    if p is None or not p.is_dir():
        raise LayoutError(f"{what} {p} is not a folder")
    return p


def _file(root: Path, value: str | None, what: str) -> Path:
    if value is None:
        raise LayoutError(f"the layout needs {what}")
    p = _path(root, value)
    if not p.is_file():
        raise LayoutError(f"{what} {p} is not a file")
    return p


def _under(path: Path, folders: Iterable[Path]) -> bool:
    return any(f == path or f in path.parents for f in folders)


def _sorted_values(values: Iterable[str]) -> tuple[str, ...]:
    """Distinct values sorted; numerically when every one is an integer (so 0,1,2,10)."""
    distinct = set(values)
    try:
        return tuple(sorted(distinct, key=int))
    except ValueError:
        return tuple(sorted(distinct))


def build_spec(name: str, layout: str, root: Path, options: dict) -> DatasetSpec:
    """The spec of dataset ``name`` stored in ``layout`` under ``root``. ``options`` use the
    YAML spelling (``image_column``); ``None`` values count as not given."""
    check_name(name)
    opts = normalize(layout, options)
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{name}: --root {root} is not a folder")
    try:
        spec = BUILDERS[layout](name, root, opts)
        if "patient_pattern" in opts:
            spec = replace(spec, scan=grouped_by_pattern(spec.scan, opts["patient_pattern"]))
    except LayoutError as e:
        raise LayoutError(f"{name}: {e}") from None
    except (OSError, ValueError) as e:
        raise LayoutError(f"{name}: cannot read the {layout} layout under {root}: "
                          f"{type(e).__name__}: {e}".replace("\n", " ")) from None
    definition = {"layout": layout, "root": str(root.resolve()), **opts}
    return replace(spec, definition=definition)


def grouped_by_pattern(scan, pattern: str):
    """``scan`` with each image's group (patient) read from its path by ``pattern``.

    The pattern is searched in the image's path relative to ``--root`` (``/`` separators); its
    first capture group, or the whole match without one, is the patient id. Without it, the
    folders, masks and coco layouts group by image, and two images of one patient may land in
    different splits. An image whose path does not match is a reject (``patient missing``),
    like a CSV row with an empty patient cell, rather than a group of its own."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise LayoutError(f"--patient-pattern {pattern!r} is not a regular expression: {e}") \
            from None

    def scan_grouped(r: Path) -> Scan:
        out = scan(r)
        records = []
        for rec in out.records:
            rel = relpath(r, rec.image)
            m = regex.search(rel)
            patient = m and (m.group(1) if regex.groups else m.group(0))
            if patient:
                records.append(replace(rec, group=patient))
            else:
                out.reject(r, rec.image, f"patient missing: {pattern!r} finds no patient id "
                                         "in the path")
        out.records = records
        out.rejects.sort(key=lambda x: x.path)
        return out

    return scan_grouped


# --- folders -------------------------------------------------------------------------------------

def _subdirs(folder: Path) -> list[Path]:
    return [c for c in sorted(folder.iterdir(), key=lambda c: c.name)
            if c.is_dir() and c.name != "__MACOSX" and not c.name.startswith(".")]


def _folders(name: str, root: Path, opts: dict) -> DatasetSpec:
    """torchvision ImageFolder: class = sorted sub-folder names (Python string order, so
    case-sensitive), optionally under train/ valid/ (or val/) test/: the official split."""
    top = _subdirs(root)
    split_dirs = [d for d in top if d.name.lower() in SPLIT_NAMES]
    if split_dirs and len(split_dirs) != len(top):
        others = ", ".join(d.name + "/" for d in top if d not in split_dirs)
        splits = ", ".join(d.name + "/" for d in split_dirs)
        raise LayoutError(f"{root} mixes split folders ({splits}) with other folders "
                          f"({others}); use one or the other")
    trees = [(SPLIT_NAMES[d.name.lower()], d) for d in split_dirs] or [(None, root)]
    classes = sorted({c.name for _, tree in trees for c in _subdirs(tree)})
    if not classes:
        raise LayoutError(f"no class sub-folders in {root}"
                          + (" /train etc." if split_dirs else ""))

    def scan(r: Path) -> Scan:
        out = Scan()
        if split_dirs:  # files beside train/ valid/ test/ belong to no class
            for p in sorted(r.iterdir()):
                if p.is_file() and not is_junk(p):
                    out.reject(r, p, "label missing: not in a class folder")
        for split, tree in trees:
            for p in list_files(tree):
                parts = p.relative_to(tree).parts
                if len(parts) < 2 or parts[0] not in classes:
                    out.reject(r, p, "label missing: not in a class folder")
                elif not is_image(p):
                    out.reject(r, p, "not an image")
                else:
                    out.records.append(Record(p, relpath(r, p), split=split,
                                              label=classes.index(parts[0])))
        out.rejects.sort(key=lambda x: x.path)
        return out

    return DatasetSpec(name, (name,), opts["role"], ("label",), scan,
                       has_official_split=bool(split_dirs), label_names=tuple(classes))


# --- csv -----------------------------------------------------------------------------------------

def _binary(cell: str) -> int | None:
    v = cell.lower()
    return 1 if v in TRUE else 0 if v in FALSE else None


def _number(cell: str) -> float | None:
    try:
        v = float(cell)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


class _FileIndex:
    """Files under a folder by relative path: exact, then case-insensitive, then without the
    suffix (a CSV of ids like ``1377`` naming ``1377.png``) when that is unambiguous."""

    def __init__(self, folder: Path, skip: set[Path]):
        self.folder = folder
        self.files = [p for p in list_files(folder) if p not in skip]
        self.lower: dict[str, Path] = {}
        stems: dict[str, list[Path]] = {}
        for p in self.files:
            rel = p.relative_to(folder).as_posix().lower()
            self.lower.setdefault(rel, p)
            if is_image(p):
                stems.setdefault(rel.rsplit(".", 1)[0], []).append(p)
        self.stem = {k: v[0] for k, v in stems.items() if len(v) == 1}

    def find(self, value: str) -> Path | None:
        text = value.replace("\\", "/")
        p = Path(text)
        if p.is_absolute():
            if p.is_file():
                return p
            try:
                text = p.relative_to(self.folder).as_posix()
            except ValueError:
                return None
        key = "/".join(x for x in text.split("/") if x not in ("", ".")).lower()
        return self.lower.get(key) or self.stem.get(key)


def _csv(name: str, root: Path, opts: dict) -> DatasetSpec:
    csv_path = _file(root, opts.get("csv"), "--csv")
    images = _folder(root, opts.get("images"), "--images", root)
    targets = [k for k in ("label_column", "label_columns", "value_column") if k in opts]
    if len(targets) > 1:
        raise LayoutError(f"give one of --label-column, --label-columns, --value-column, not "
                          f"{' and '.join(flag(k) for k in targets)}")
    if not targets and opts["role"] == "task":
        raise LayoutError("a task set needs --label-column, --label-columns or --value-column "
                          "(or --role pretrain)")
    if "classes" in opts and targets != ["label_column"]:
        raise LayoutError("--classes goes with --label-column")
    encoding = opts.get("encoding", "utf-8")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise LayoutError(f"--encoding {encoding!r} is not a text encoding Python knows (e.g. "
                          "utf-8, cp1252, latin-1)") from None
    rows = read_csv(csv_path, encoding)
    if not rows:
        raise LayoutError(f"{csv_path.name} is empty")
    header, body = rows[0], rows[1:]

    def find(wanted: str, option: str) -> int:
        if wanted not in header:
            raise LayoutError(f"no column {wanted!r} ({option}) in {csv_path.name}; its "
                              f"columns are: {', '.join(header)}")
        if header.count(wanted) > 1:  # taking the first would be a guess
            raise LayoutError(f"column {wanted!r} ({option}) appears {header.count(wanted)} "
                              f"times in {csv_path.name}; rename all but one")
        return header.index(wanted)

    def col(key: str, default: str | None = None) -> int | None:
        wanted = opts.get(key, default)
        return None if wanted is None else find(wanted, flag(key))

    image_col = col("image_column", "image")
    label_col, value_col = col("label_column"), col("value_column")
    patient_col, split_col = col("patient_column"), col("split_column")
    multi = opts.get("label_columns", [])
    multi_cols = [find(c, "--label-columns") for c in multi]

    def cell(row: list[str], i: int) -> str:
        return row[i] if i < len(row) else ""

    if label_col is not None:
        names = tuple(opts["classes"]) if "classes" in opts else \
            _sorted_values(v for r in body if (v := cell(r, label_col)))
        if not names:
            raise LayoutError(f"column {header[label_col]!r} of {csv_path.name} is empty")
        fields, label_names = ("label",), names
    elif multi:
        fields, label_names = ("labels",), tuple(multi)
    elif value_col is not None:
        fields, label_names = ("value",), ()
    else:
        fields, label_names = (), ()

    def scan(r: Path) -> Scan:
        out = Scan()
        index = _FileIndex(images, {csv_path})
        used: dict[Path, int] = {}
        for line, row in enumerate(body, start=2):
            ref = cell(row, image_col)
            where = f"row {line} of {csv_path.name}"
            if not ref:
                out.reject(r, f"{csv_path.name}#row{line}", "no image: empty image column")
                continue
            p = index.find(ref)
            if p is None:
                outside = ".." in Path(ref.replace("\\", "/")).parts and \
                    (images / ref).resolve().is_file()
                out.reject(r, images / ref, f"outside --images: {ref} leads out of {images} "
                           "(give paths under it, or absolute ones)" if outside else
                           "file missing: listed in CSV but file missing")
                continue
            if p in used:
                out.reject(r, p, f"listed twice in CSV: {where} repeats row {used[p]}")
                continue
            used[p] = line
            if not is_image(p):
                out.reject(r, p, "not an image")
                continue
            rec: dict = {}
            if label_col is not None:
                v = cell(row, label_col)
                if v not in label_names:
                    out.reject(r, p, f"bad label: {v!r} in {where} is not one of "
                                     f"{', '.join(label_names)}")
                    continue
                rec["label"] = label_names.index(v)
            elif multi_cols:
                bits = [_binary(cell(row, i)) for i in multi_cols]
                bad = [(multi[k], cell(row, i)) for k, (i, b) in
                       enumerate(zip(multi_cols, bits)) if b is None]
                if bad:
                    out.reject(r, p, f"bad label: {bad[0][0]}={bad[0][1]!r} in {where} "
                                     "(expected 0, 1, 0.0, 1.0, true or false)")
                    continue
                rec["labels"] = tuple(bits)
            elif value_col is not None:
                v = _number(cell(row, value_col))
                if v is None:
                    out.reject(r, p, f"bad label: {cell(row, value_col)!r} in {where} is not "
                                     "a finite number")
                    continue
                rec["value"] = v
            group = relpath(r, p)
            if patient_col is not None:
                group = cell(row, patient_col)
                if not group:
                    out.reject(r, p, f"patient missing: empty {header[patient_col]!r} in "
                                     f"{where}")
                    continue
            if split_col is not None:
                split = SPLIT_NAMES.get(cell(row, split_col).lower())
                if split is None:
                    out.reject(r, p, f"bad split: {cell(row, split_col)!r} in {where} "
                                     "(expected train, valid, val or test)")
                    continue
                rec["split"] = split
            out.records.append(Record(p, group, **rec))
        for p in index.files:
            if p not in used:
                out.reject(r, p, "not in the CSV" if is_image(p) else "not an image")
        out.rejects.sort(key=lambda x: x.path)
        return out

    return DatasetSpec(name, (name,), opts["role"], fields, scan,
                       has_official_split=split_col is not None, label_names=label_names,
                       value_name=header[value_col] if value_col is not None else "")


# --- masks ---------------------------------------------------------------------------------------

def _masks(name: str, root: Path, opts: dict) -> DatasetSpec:
    images = _folder(root, opts.get("images"), "--images", None)
    if not opts.get("masks"):
        raise LayoutError("the masks layout needs --masks DIR (one or more)")
    mask_dirs = [_folder(root, m, "--masks") for m in opts["masks"]]
    if len(set(mask_dirs)) != len(mask_dirs):
        raise LayoutError("--masks names a folder twice")
    mode = opts.get("mask_mode", "union")
    if mode not in MASK_MODES:
        raise LayoutError(f"--mask-mode must be {', '.join(MASK_MODES)}, not {mode!r}")
    suffix = opts.get("mask_suffix", "").lower()
    classes = opts.get("classes")
    if mode == "values":
        if len(mask_dirs) != 1:
            raise LayoutError("--mask-mode values reads one --masks folder of label maps, not "
                              f"{len(mask_dirs)}")
        if not classes or len(classes) > 255:
            raise LayoutError("--mask-mode values needs --classes: the names of pixel values "
                              "1, 2, ... (1 to 255 names)")
    want = {"union": 1, "classes": len(mask_dirs), "values": len(classes or ())}[mode]
    if classes and len(classes) != want:
        raise LayoutError(f"--classes gives {len(classes)} names for {want} mask class(es) "
                          f"(--mask-mode {mode})")
    if not classes:
        classes = [d.name for d in mask_dirs] if mode == "classes" else \
            [mask_dirs[0].name if len(mask_dirs) == 1 else "foreground"]
    if len(set(classes)) != len(classes):
        raise LayoutError(f"class names must differ: {', '.join(classes)}")

    def scan(r: Path) -> Scan:
        out = Scan()
        by_stem: dict[str, Path] = {}
        for p in list_files(images):
            if _under(p, mask_dirs):
                continue
            if not is_image(p):
                out.reject(r, p, "not an image")
            elif p.stem.lower() in by_stem:
                first = relpath(r, by_stem[p.stem.lower()])
                out.reject(r, p, f"duplicate name: same stem as {first}")
            else:
                by_stem[p.stem.lower()] = p
        found: list[dict[str, Path]] = []
        for d in mask_dirs:
            masks: dict[str, Path] = {}
            for m in list_files(d):
                stem = m.stem.lower()
                key = stem if not suffix else \
                    stem[: -len(suffix)] if stem.endswith(suffix) else None
                if not is_image(m):
                    out.reject(r, m, "not an image")
                elif key is None or key not in by_stem:
                    out.reject(r, m, "mask without image" + ("" if key is not None else
                                                            f": name does not end in {suffix}"))
                elif key in masks:
                    out.reject(r, m, f"duplicate mask: {relpath(r, masks[key])} is the mask of "
                                     "the same image")
                else:
                    masks[key] = m
            found.append(masks)
        for stem, p in sorted(by_stem.items(), key=lambda kv: kv[1]):
            per_dir = [f.get(stem) for f in found]
            missing = [d for d, m in zip(mask_dirs, per_dir) if m is None]
            if missing:
                where = ", ".join(relpath(r, d) + "/" for d in missing)
                out.reject(r, p, f"mask missing: none in {where}")
                continue
            group = relpath(r, p)
            if mode == "union":
                out.records.append(Record(p, group, masks=tuple(per_dir)))
            elif mode == "classes":
                out.records.append(Record(p, group, class_masks=tuple((m,) for m in per_dir)))
            else:
                out.records.append(Record(p, group, label_map=per_dir[0],
                                          label_map_classes=len(classes)))
        out.rejects.sort(key=lambda x: x.path)
        return out

    return DatasetSpec(name, (name,), opts["role"], ("mask",), scan,
                       mask_classes=tuple(classes))


# --- coco ----------------------------------------------------------------------------------------

def _coco(name: str, root: Path, opts: dict) -> DatasetSpec:
    images = _folder(root, opts.get("images"), "--images", root)
    coco_path = _file(root, opts.get("coco"), "--coco")
    try:
        doc = json.loads(coco_path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeError, json.JSONDecodeError) as e:
        raise LayoutError(f"cannot read {coco_path.name}: {e}".replace("\n", " ")) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise LayoutError(f"{coco_path.name} is not a COCO instances file (no images list)")
    cats = [c for c in doc.get("categories") or [] if isinstance(c, dict)]
    ids = [c.get("id") for c in cats]
    if not cats or len(set(ids)) != len(ids) or not all(isinstance(i, int) for i in ids):
        raise LayoutError(f"{coco_path.name}: categories must be a non-empty list with distinct "
                          "integer ids")
    cats.sort(key=lambda c: c["id"])
    cat_of = {c["id"]: k + 1 for k, c in enumerate(cats)}  # COCO id -> 1..K in id order
    names = tuple(str(c.get("name", c["id"])) for c in cats)
    src = relpath(root, coco_path)

    def scan(r: Path) -> Scan:
        out = Scan()
        index = _FileIndex(images, {coco_path})
        entries: dict = {}  # image id -> {"path", "size", "boxes", "bad"}
        by_path: dict[Path, dict] = {}
        for k, img in enumerate(doc["images"]):
            if not isinstance(img, dict) or not img.get("file_name") or "id" not in img:
                out.reject(r, f"{src}#images[{k}]", "bad entry: no id or file_name")
                continue
            if img["id"] in entries:
                out.reject(r, f"{src}#images[{k}]", f"bad entry: image id {img['id']} repeated")
                continue
            p = index.find(str(img["file_name"]))
            if p is None:
                out.reject(r, images / str(img["file_name"]),
                           f"file missing: listed in {coco_path.name}")
                entries[img["id"]] = None
                continue
            if p in by_path:  # the same file twice: one image, boxes merged
                entries[img["id"]] = by_path[p]
                continue
            entries[img["id"]] = by_path[p] = {"path": p, "size": coco_size(img), "boxes": [],
                                               "bad": None}
        for k, ann in enumerate(doc.get("annotations") or []):
            ann = ann if isinstance(ann, dict) else {}
            label = f"annotation {ann.get('id', k)}"
            image_id = ann.get("image_id")
            if image_id not in entries:
                out.reject(r, f"{src}#annotation={ann.get('id', k)}",
                           f"unknown image: {label} has image_id {image_id!r}, not in images")
                continue
            entry = entries[image_id]
            if entry is None or entry["bad"]:
                continue
            cat, box = cat_of.get(ann.get("category_id")), coco_bbox(ann)
            if cat is None:
                entry["bad"] = f"bad box: {label} has unknown category_id " \
                               f"{ann.get('category_id')!r}"
            elif box is None:
                entry["bad"] = f"bad box: {label} bbox {ann.get('bbox')!r} is not x, y, w, h " \
                               "with w, h > 0"
            else:
                entry["boxes"].append((*box, cat))
        for p in index.files:
            entry = by_path.get(p)
            if entry is None:
                out.reject(r, p, f"not in the COCO file {coco_path.name}" if is_image(p)
                           else "not an image")
            elif not is_image(p):
                out.reject(r, p, "not an image")
            elif entry["bad"]:
                out.reject(r, p, entry["bad"])
            else:
                out.records.append(Record(p, relpath(r, p), boxes=tuple(entry["boxes"]),
                                          box_space=entry["size"]))
        out.rejects.sort(key=lambda x: x.path)
        return out

    return DatasetSpec(name, (name,), opts["role"], ("boxes",), scan, box_categories=names)


BUILDERS = {"folders": _folders, "csv": _csv, "masks": _masks, "coco": _coco}


# --- YAML definitions ----------------------------------------------------------------------------

ENTRY_KEYS = ("name", "layout", "root", *OPTIONS)


def read_definitions(path: Path) -> list[dict]:
    """The entries of a YAML definitions file: a list, or ``{datasets: [...]}``. Each entry is
    ``{name, layout, root, ...options}`` (options spelled as in YAML: ``image_column``)."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise LayoutError(f"--datasets {path}: no such file") from None
    except (OSError, UnicodeError, yaml.YAMLError) as e:
        raise LayoutError(f"--datasets {path}: cannot read: {e}".replace("\n", " ")) from None
    if isinstance(doc, dict) and set(doc) == {"datasets"}:
        doc = doc["datasets"]
    if not isinstance(doc, list) or not doc:
        raise LayoutError(f"--datasets {path}: expected a non-empty list of datasets (or "
                          "'datasets:' holding one)")
    seen = set()
    for k, entry in enumerate(doc, start=1):
        if not isinstance(entry, dict):
            raise LayoutError(f"{path}: entry {k} is not a mapping")
        label = f"{path}: entry {k} ({entry.get('name', 'no name')})"
        unknown = [key for key in entry if key not in ENTRY_KEYS]
        if unknown:
            raise LayoutError(f"{label}: unknown key {unknown[0]!r}; known: "
                              f"{', '.join(ENTRY_KEYS)}")
        missing = [key for key in ("name", "layout", "root") if key not in entry]
        if missing:
            raise LayoutError(f"{label}: missing {', '.join(missing)}")
        try:
            check_name(str(entry["name"]))
            normalize(str(entry["layout"]), {k2: v for k2, v in entry.items()
                                             if k2 not in ("name", "layout", "root")})
        except LayoutError as e:
            raise LayoutError(f"{label}: {e}") from None
        if entry["name"] in seen:
            raise LayoutError(f"{label}: name {entry['name']!r} used twice")
        seen.add(entry["name"])
    return doc
