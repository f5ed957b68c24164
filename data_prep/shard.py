"""FFCV shard layout and atomic publication of a converted dataset.

A dataset is built in a hidden staging folder next to its final place and renamed into place
only when every shard and the manifest are complete, so ``OUT/NAME/manifest.json`` existing
means the conversion finished. A killed run leaves only a staging folder, removed by the next.
Shards are written by one FFCV writer process from already-decoded arrays (a failing sample
inside FFCV's writer hangs it, so nothing that can fail runs there), which also makes the
bytes of a shard depend only on its inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from .imaging import MAX_BOXES

MANIFEST = "manifest.json"
# 2: SPLIT.groups.npy next to every shard; 3: each split's bytes and SHA-256 (shard and groups)
FORMAT_VERSION = 3


def import_ffcv() -> None:
    """Import FFCV, less the ~4.5 s (2 cores) that every process spent compiling numba's typed
    dict for a two-entry table at import.

    ``ffcv.fields.rgb_image`` stores its image modes (jpg 0, raw 1) in a ``numba.typed.Dict``,
    whose first use compiles the typed-dict implementation; every rank, fine-tune and converter
    paid it. The table is read only from Python (``generate_code`` copies the two ints into
    locals before compiling), so a plain dict behaves the same; the swap lasts for that one
    import. Call before any other ``ffcv`` import."""
    if "ffcv.fields.rgb_image" in sys.modules:
        return
    import numba.typed

    typed_dict = numba.typed.Dict
    numba.typed.Dict = dict
    try:
        import ffcv.fields.rgb_image  # noqa: F401
    finally:
        numba.typed.Dict = typed_dict


def ffcv_fields(fields: tuple[str, ...], size: tuple[int, int]) -> dict:
    """Field name -> FFCV field for a dataset's shard. Images are stored raw as H×W×1 uint8:
    FFCV's image field takes only 3 channels, and raw gray reads fastest."""
    import_ffcv()
    from ffcv.fields import FloatField, IntField, NDArrayField

    w, h = size
    out = {"image": NDArrayField(np.dtype("uint8"), (h, w, 1)), "index": IntField()}
    for name in fields:
        if name in ("label", "male", "body_part"):
            out[name] = IntField()
        elif name == "labels":
            continue  # added by the caller, which knows the number of classes
        elif name in ("boneage", "value"):
            out[name] = FloatField()
        elif name == "mask":
            out[name] = NDArrayField(np.dtype("uint8"), (h, w, 1))
        elif name == "boxes":
            out["boxes"] = NDArrayField(np.dtype("float32"), (MAX_BOXES, 4))
            out["box_labels"] = NDArrayField(np.dtype("int64"), (MAX_BOXES,))
            out["num_boxes"] = IntField()
    return out


class ArrayDataset:
    """Index -> tuple in field order, over decoded arrays (images/masks may be memmaps)."""

    def __init__(self, columns: dict[str, np.ndarray]):
        self.columns = columns
        self.names = list(columns)
        self.n = len(next(iter(columns.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return tuple(self.columns[k][i] for k in self.names)


def write_shard(path: Path, fields: dict, columns: dict[str, np.ndarray]) -> None:
    import_ffcv()
    from ffcv.writer import DatasetWriter

    ordered = {k: fields[k] for k in columns}
    writer = DatasetWriter(str(path), ordered, num_workers=1)
    writer.from_indexed_dataset(ArrayDataset(columns), chunksize=64)


def sha256(path: Path) -> str:
    """The file's SHA-256, read in 8 MiB blocks (a shard may be tens of GiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def identity(path: Path) -> dict:
    """What the manifest records to know later that a file is the one written: its size (cheap
    to check whenever a shard is opened) and its SHA-256 (``python -m data_prep.verify``)."""
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


# ``ffcv.types.HeaderType``, the first bytes of a ``.beton`` (a test checks they are equal):
# importing ffcv to read one integer costs seconds (numba) in processes that never load data,
# such as the launcher planning a job.
BETON_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                         ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)


def beton_count(path: Path) -> int | None:
    """The number of samples a ``.beton`` file's header declares (None when the file is shorter
    than a header)."""
    header = np.fromfile(path, dtype=BETON_HEADER, count=1)
    return int(header[0]["num_samples"]) if len(header) else None


def mismatch(folder: Path, split: dict, checksums: bool = False) -> str | None:
    """What differs between a split's files in ``folder`` and what its manifest entry
    ``split`` recorded when they were written, or None when nothing does. Without
    ``checksums`` only sizes and the header's sample count are compared (cheap: done whenever a
    shard is opened); with them, the SHA-256 of the shard and its groups file too (reads every
    byte). A file cut short, replaced by another dataset's, or rewritten is caught."""
    if "bytes" not in split:
        return ("its manifest predates shard checks (converter format < 3): convert it again, "
                "the converter redoes it")
    path = folder / split["file"]
    if not path.is_file():
        return f"{path} is listed in the manifest but missing"
    size = path.stat().st_size
    if size != split["bytes"]:
        return f"{path} is {size:,} bytes, its manifest says {split['bytes']:,}"
    count = beton_count(path)
    if count != split["count"]:
        return f"{path} holds {count} samples, its manifest says {split['count']}"
    if checksums:
        if sha256(path) != split["sha256"]:
            return f"{path}: SHA-256 differs from its manifest's (same size, other bytes)"
        groups = folder / split["groups"]
        if not groups.is_file() or sha256(groups) != split["groups_sha256"]:
            return f"{groups} is missing or differs from its manifest's SHA-256"
    return None


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def staging_dir(out: Path, name: str) -> Path:
    """A fresh staging folder for ``out/name``; leftovers of killed runs are removed first."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f".{name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in out.glob(f".{name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    stage = out / f".{name}.partial-{os.getpid()}"
    stage.mkdir()
    return stage


def publish(stage: Path, final: Path) -> None:
    """Swap the finished staging folder into place. ``final`` is never half-written: it is
    either the previous complete conversion, absent for an instant, or the new one."""
    for f in stage.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(stage, final)
    shutil.rmtree(old, ignore_errors=True)
