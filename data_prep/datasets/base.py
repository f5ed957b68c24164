"""The contract between a dataset plug-in and the converter.

A plug-in is one module in this package that defines ``SPEC`` (a :class:`DatasetSpec`).
Its ``scan(root)`` only *lists* what is on disk: image paths, labels, mask paths, boxes and
the patient (group) each image belongs to. It never decodes pixels; decoding, resizing and
packing happen in :mod:`data_prep.convert`, which turns undecodable files into rejects too.
Anything a scanner cannot use (label missing, mask missing, a name it cannot parse) becomes a
:class:`Reject` with a reason; junk files are dropped silently by :func:`is_junk`.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
JUNK_NAMES = frozenset({"thumbs.db", ".ds_store", "desktop.ini"})

# Fields a shard may carry besides the image. The converter writes exactly the ones a spec lists.
FIELDS = ("label", "labels", "value", "boneage", "male", "body_part", "mask", "boxes")


@dataclass(frozen=True)
class Record:
    """One image and everything known about it before decoding.

    ``split`` is the dataset's own (official) split where it has one: train / valid / test.
    ``task=False`` marks an image that is usable for pre-training but is not part of the
    dataset's task (e.g. TBX11K images without boxes); it always goes to the ``extra`` split.
    ``boxes`` are ``(x, y, w, h, category_id)`` in the pixel space ``box_space = (W, H)``.
    ``masks`` are OR-ed into one foreground class (mask value 1); ``class_masks[k]`` are the
    masks of class ``k + 1`` (OR-ed per class; where two classes overlap the later one wins);
    ``label_map`` is one mask whose pixel values are the classes (0 background, 1 to
    ``label_map_classes``). A record uses one of the three. ``value`` is a regression target
    (``value`` field).
    """

    image: Path
    group: str
    split: str | None = None
    task: bool = True
    label: int | None = None
    labels: tuple[int, ...] | None = None
    value: float | None = None
    boneage: float | None = None
    male: int | None = None
    body_part: int | None = None
    masks: tuple[Path, ...] = ()
    class_masks: tuple[tuple[Path, ...], ...] = ()
    label_map: Path | None = None
    label_map_classes: int = 0
    boxes: tuple[tuple[float, float, float, float, int], ...] | None = None
    box_space: tuple[int, int] | None = None


@dataclass(frozen=True)
class Reject:
    path: str  # relative to the dataset root, POSIX style
    reason: str


@dataclass
class Scan:
    records: list[Record] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    def reject(self, root: Path, path: Path | str, reason: str) -> None:
        self.rejects.append(Reject(relpath(root, path), reason))


# What NLM asks users of its two TB sets (Shenzhen, Montgomery) and of their derivatives to cite.
NLM_TB_CITATION = ("Jaeger S et al., Automatic tuberculosis screening using chest radiographs, "
                   "IEEE TMI 33(2):233-245, 2014; Candemir S et al., Lung segmentation in chest "
                   "radiographs using anatomical atlases with nonrigid registration, IEEE TMI "
                   "33(2):577-590, 2014")


@dataclass(frozen=True)
class Licence:
    """A dataset's terms of use as its publisher states them, written by hand once: a model
    card lists them, since weights trained on the images carry them.

    ``terms``: the licence's identifier, or what kind of custom terms; ``summary``: what they
    allow, in plain words, the publisher's key words quoted; ``url``: where the publisher says
    it; ``citation``: what the publisher asks to cite; ``read``: how we know (the publisher's
    own page, or a copy of its text, and what could not be found)."""

    terms: str
    summary: str
    url: str
    citation: str
    read: str


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is and how to read it.

    ``role="task"``: the paper split is a seeded, patient-grouped 80/10/10 train/valid/test.
    ``role="pretrain"``: the paper split puts every image in train (MD-MoCo only).
    ``folder_names``: the usual download folder names, tried in order by ``--dataset all``.
    ``label_names``: class names for ``label`` (index = value) or for the ``labels`` multi-hot.
    ``mask_classes``: names of the mask's foreground classes (index = mask value - 1; 0 is
    background). ``value_name``: what the ``value`` field measures (a CSV column name).
    ``definition``: where a dataset defined by configuration came from (its layout and
    options, JSON-able); recorded in the manifest, and a changed definition reconverts.
    """

    name: str
    folder_names: tuple[str, ...]
    role: str
    fields: tuple[str, ...]
    scan: Callable[[Path], Scan]
    has_official_split: bool = False
    label_names: tuple[str, ...] = ()
    box_categories: tuple[str, ...] = ()  # index = category_id - 1
    mask_classes: tuple[str, ...] = ()
    value_name: str = ""
    definition: dict | None = None
    licence: Licence | None = None  # None: a dataset of the user's, its terms not recorded

    def __post_init__(self):
        if self.role not in ("task", "pretrain"):
            raise ValueError(f"{self.name}: role must be 'task' or 'pretrain', not {self.role!r}")
        unknown = set(self.fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"{self.name}: unknown fields {sorted(unknown)}")
        # Names travel into manifests, logs and reports, which print them as they are.
        for name in (*self.label_names, *self.box_categories, *self.mask_classes,
                     self.value_name):
            if printable(name) != name:
                raise LayoutError(f"the name {name!r} (a class, category or column) has a "
                                  "control character; rename it in the source")
        # A task finds a class by its name; two classes of one name cannot both be found.
        for names in (self.label_names, self.box_categories, self.mask_classes):
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise LayoutError(f"two classes are named {twice[0]!r}; rename one in the "
                                  "source")


def is_junk(path: Path) -> bool:
    """OS droppings that users' archives carry: never data, never reported."""
    name = path.name.lower()
    return name in JUNK_NAMES or name.startswith("._") or "__MACOSX" in path.parts


def relpath(root: Path, path: Path | str) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def list_files(directory: Path) -> list[Path]:
    """Every non-junk file under ``directory``, sorted, following no symlinked dirs."""
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if d != "__MACOSX")
        for name in filenames:
            p = Path(dirpath) / name
            if not is_junk(p):
                out.append(p)
    return sorted(out)


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The text of a user's file, decoded strictly: bytes that are not ``encoding`` are a
    one-line error naming the line. Replacing them would merge labels that differ only in those
    bytes (cp1252's ``légère`` and ``lègère`` both read as ``l\ufffdg\ufffdre``). A UTF-8 BOM
    is dropped."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LayoutError(f"{path.name} line {line}: byte {data[e.start:e.start + 1]!r} is not "
                          f"{encoding}; save the file as UTF-8 (or give its encoding, e.g. "
                          "--encoding cp1252 for a CSV from Excel on Windows)") from None


def read_csv(path: Path, encoding: str = "utf-8") -> list[list[str]]:
    """CSV rows with every cell stripped; BOM and blank lines tolerated, undecodable bytes
    refused (:func:`read_text`)."""
    text = io.StringIO(read_text(path, encoding), newline="")
    rows = [[c.strip() for c in row] for row in csv.reader(text)]
    return [r for r in rows if any(r)]


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\x1b`` for ESC), for echoing what users'
    files hold: a CSV header or file name can carry terminal escape codes that clear the screen
    or set the window title. Newlines are escaped too, so an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _levels(root: Path, max_depth: int):
    """The folders at depth 0, 1, ... ``max_depth`` below ``root``, one sorted list a level."""
    frontier = [root]
    for _ in range(max_depth + 1):
        yield frontier
        frontier = [c for d in frontier for c in sorted(d.iterdir())
                    if c.is_dir() and c.name != "__MACOSX"]


def find_dir(root: Path, name: str, max_depth: int = 2) -> Path | None:
    """``root/name`` or the shallowest ``root/**/name`` (users unpack archives one level deeper
    or shallower than the docs say)."""
    for level in _levels(root, max_depth):
        for d in level:
            if (d / name).is_dir():
                return d / name
    return None


def find_file(root: Path, names: tuple[str, ...], max_depth: int = 2) -> Path | None:
    """The first of ``names`` found at ``root`` or up to ``max_depth`` folders below it."""
    for level in _levels(root, max_depth):
        for name in names:
            for d in level:
                if (d / name).is_file():
                    return d / name
    return None


def coco_bbox(ann: dict) -> tuple[float, float, float, float] | None:
    """A COCO annotation's ``bbox`` as (x, y, w, h), or None when it is not four finite
    numbers with a positive width and height."""
    bbox = ann.get("bbox")
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None
    return x, y, w, h


def coco_size(entry: dict) -> tuple[int, int] | None:
    """A COCO image entry's (width, height), or None when either is missing or not positive."""
    try:
        w, h = int(entry["width"]), int(entry["height"])
    except (KeyError, TypeError, ValueError):
        return None
    return (w, h) if w > 0 and h > 0 else None


class LayoutError(Exception):
    """The folder does not look like the dataset at all (one-line message for the CLI)."""
