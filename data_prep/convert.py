"""Convert downloaded X-ray datasets into FFCV shards.

    python -m data_prep.convert --dataset NAME --root DIR --out DIR [--workers N]
        [--size 800x500] [--split paper|official] [--seed S] [--force]
        [--role task|pretrain --as NEWNAME] [--verify]
    python -m data_prep.convert --dataset NEW --layout folders|csv|masks|coco --root DIR
        --out DIR [layout options]
    python -m data_prep.convert --datasets FILE.yaml --root DIR --out DIR

Writes ``OUT/NAME/{train,valid,test,extra}.beton``, next to each ``SPLIT.groups.npy`` (int32,
one per sample in shard order: the index of its patient in the sorted list of the dataset's
patients), and ``OUT/NAME/manifest.json``. Splits with no image get no shard. ``--dataset all``
converts every one of the nine datasets found under ``--root`` by its usual download folder
name; ``--layout`` and ``--datasets`` read your own datasets (``data_prep/LAYOUTS.md``).
The manifest records each shard's size, sample count and SHA-256: opening a shard checks the
first two, ``--verify`` (or ``python -m data_prep.verify``) all three.

Why one module over ~450 lines: the CLI, the parallel decode and the atomic publish are one
path every dataset goes through; the per-dataset parts are the plug-ins in ``datasets/``.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from . import layouts, shard, verify
from .datasets import NAMES, get_spec
from .datasets.base import DatasetSpec, LayoutError, Record, Reject, printable, relpath
from .imaging import MAX_BOXES, Decoded, Unusable, decode

SPLITS = ("train", "valid", "test", "extra")
PAPER_FRACTIONS = (0.8, 0.1, 0.1)


class ConvertError(Exception):
    """A user error reported as one line."""


class Stopped(Exception):
    """SIGTERM or Ctrl-C arrived; the conversion stopped cleanly between two images."""


_stop_signal: list[int] = []


def _request_stop(signum, _frame) -> None:
    # Only a flag: raising from a signal handler can land inside multiprocessing's locks and
    # leave the decode pool unable to shut down. The work loops check it between images.
    _stop_signal.append(signum)


def _check_stop() -> None:
    if _stop_signal:
        raise Stopped(f"stopped by {signal.Signals(_stop_signal[0]).name}")


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConvertError(f"--size must look like 800x500 (W x H), not {text!r}") from None
    if not (16 <= w <= 8192 and 16 <= h <= 8192):
        raise ConvertError(f"--size {text}: each side must be within 16..8192")
    return w, h


def assign_splits(records: list[Record], spec: DatasetSpec, mode: str, seed: int) -> list[str]:
    """The split of each record. ``paper``: task sets get a patient-grouped 80/10/10 drawn with
    ``seed`` (whole patients go to one split, cut by image count); pre-training sets put every
    image in train. ``official``: the dataset's own split. Non-task images go to extra."""
    if mode == "official":
        return [(r.split or "train") if r.task else "extra" for r in records]
    if spec.role == "pretrain":
        return ["train" if r.task else "extra" for r in records]
    sizes = Counter(r.group for r in records if r.task)
    groups = sorted(sizes)
    random.Random(seed).shuffle(groups)
    total, seen, split_of = sum(sizes.values()), 0, {}
    cut_valid, cut_test = PAPER_FRACTIONS[0] * total, (1 - PAPER_FRACTIONS[2]) * total
    for g in groups:
        split_of[g] = "train" if seen < cut_valid else "valid" if seen < cut_test else "test"
        seen += sizes[g]
    return [split_of[r.group] if r.task else "extra" for r in records]


def _worker_init() -> None:
    # Stopping is the parent's job (it stops feeding work); a worker killed from outside dies.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _decode_chunk(records: list[Record], size) -> list[Decoded | str]:
    out = []
    for record in records:
        try:
            out.append(decode(record, size))
        except Unusable as e:
            out.append(str(e))
    return out


def decoded(records: list[Record], size, workers: int, chunk: int = 4):
    """Decoded images (or reject reasons) in the order of ``records``, ``workers`` processes
    decoding ahead. At most a few chunks are in flight, so memory stays bounded and stopping
    early (closing the generator) waits only for those, never for a hung pool."""
    chunks = (records[i:i + chunk] for i in range(0, len(records), chunk))
    if workers == 1:
        for c in chunks:
            yield from _decode_chunk(c, size)
        return
    with ProcessPoolExecutor(workers, initializer=_worker_init) as pool:
        pending = deque(pool.submit(_decode_chunk, c, size)
                        for c in itertools.islice(chunks, 3 * workers))
        try:
            while pending:
                results = pending.popleft().result()
                nxt = next(chunks, None)
                if nxt is not None:
                    pending.append(pool.submit(_decode_chunk, nxt, size))
                yield from results
        finally:
            for f in pending:
                f.cancel()


class Packed(NamedTuple):
    """What is kept per packed image once its pixels are in the staging memmap (keeping the
    decoded arrays would hold the whole dataset in memory)."""

    record: Record
    boxes: np.ndarray | None
    box_labels: np.ndarray | None
    has_foreground: bool
    mask_classes: tuple[int, ...] = ()  # the foreground class indices present in the mask


def _split_summary(spec: DatasetSpec, rows: list[Packed]) -> dict:
    summary = {}
    if "label" in spec.fields:
        names = spec.label_names
        counts = Counter(-1 if p.record.label is None else p.record.label for p in rows)
        summary["label_counts"] = {(names[k] if 0 <= k < len(names) else
                                    "unlabeled" if k == -1 else str(k)): counts[k]
                                   for k in sorted(counts)}
    if "labels" in spec.fields:
        totals = np.sum([p.record.labels for p in rows if p.record.labels is not None], axis=0)
        summary["label_counts"] = {n: int(c) for n, c in zip(spec.label_names, totals)}
    if "mask" in spec.fields:
        summary["masks"] = sum(int(p.has_foreground) for p in rows)
        present = Counter(k for p in rows for k in p.mask_classes)
        summary["images_with_class"] = {n: present[k] for k, n in
                                        enumerate(mask_names(spec)[1:], 1)}
    if "boxes" in spec.fields:
        labels = Counter(int(c) for p in rows if p.boxes is not None for c in p.box_labels)
        cats = spec.box_categories
        summary["boxes"] = sum(labels.values())
        summary["box_counts"] = {cats[c - 1] if 0 < c <= len(cats) else str(c): labels[c]
                                 for c in sorted(labels)}
        summary["images_with_boxes"] = sum(1 for p in rows if p.boxes is not None
                                           and len(p.boxes))
    if "value" in spec.fields:
        values = [p.record.value for p in rows if p.record.value is not None] or [float("nan")]
        summary["value"] = {"min": min(values), "max": max(values),
                            "mean": round(float(np.mean(values)), 6)}
    if "boneage" in spec.fields:
        ages = [p.record.boneage for p in rows if p.record.boneage is not None] or [float("nan")]
        summary["boneage_months"] = {"min": min(ages), "max": max(ages),
                                     "mean": round(float(np.mean(ages)), 3)}
    return summary


def _columns(spec: DatasetSpec, rows: list[Packed], images: np.ndarray,
             masks: np.ndarray | None) -> dict[str, np.ndarray]:
    n = len(rows)
    cols = {"image": images[:n], "index": np.arange(n, dtype=np.int64)}

    def column(name, dtype, missing):
        values = (getattr(p.record, name) for p in rows)
        return np.array([missing if v is None else v for v in values], dtype)

    # Pre-training-only (extra) images may carry no label: -1 / NaN / all-zero, like padding.
    if "label" in spec.fields:
        cols["label"] = column("label", np.int64, -1)
    if "labels" in spec.fields:
        cols["labels"] = column("labels", np.uint8, (0,) * len(spec.label_names))
    if "value" in spec.fields:
        cols["value"] = column("value", np.float64, np.nan)
    if "boneage" in spec.fields:
        cols["boneage"] = column("boneage", np.float64, np.nan)
    if "male" in spec.fields:
        cols["male"] = column("male", np.int64, -1)
    if "body_part" in spec.fields:
        cols["body_part"] = column("body_part", np.int64, -1)
    if "mask" in spec.fields:
        cols["mask"] = masks[:n]
    if "boxes" in spec.fields:
        boxes = np.zeros((n, MAX_BOXES, 4), np.float32)
        box_labels = np.full((n, MAX_BOXES), -1, np.int64)
        for i, p in enumerate(rows):
            if p.boxes is not None and len(p.boxes):
                boxes[i, :len(p.boxes)], box_labels[i, :len(p.boxes)] = p.boxes, p.box_labels
        cols["boxes"], cols["box_labels"] = boxes, box_labels
        cols["num_boxes"] = np.array([0 if p.boxes is None else len(p.boxes) for p in rows],
                                     np.int64)
    return cols


def _check_record(spec: DatasetSpec, r: Record) -> str | None:
    if not r.task:
        return None  # an extra (pre-training only) image needs nothing but its pixels
    needed = {"label": r.label, "labels": r.labels, "value": r.value, "boneage": r.boneage,
              "male": r.male, "body_part": r.body_part}
    for name in spec.fields:
        if name in needed and needed[name] is None:
            return f"label missing: no {name}"
        if name == "mask" and not r.masks and not r.class_masks and r.label_map is None:
            return "mask missing"
    return None


def convert_dataset(spec: DatasetSpec, root: Path, out: Path, size=(800, 500), split="paper",
                    seed=0, workers=1, force=False, log=print) -> dict:
    """Scan, decode, pack and publish one dataset; return its manifest."""
    if split == "official" and not spec.has_official_split:
        raise ConvertError(f"{spec.name} has no official split; use --split paper")
    if not root.is_dir():
        raise ConvertError(f"{spec.name}: --root {root} is not a folder")
    try:
        scan = spec.scan(root)
    except LayoutError as e:
        raise ConvertError(str(e)) from None
    except (OSError, ValueError, UnicodeError) as e:  # unreadable or malformed CSV/JSON/XML
        raise ConvertError(f"{spec.name}: cannot read the download under {root}: "
                           f"{type(e).__name__}: {e}".replace("\n", " ")) from None
    records, rejects = [], list(scan.rejects)
    for r in scan.records:
        problem = _check_record(spec, r)
        if problem:
            rejects.append(Reject(relpath(root, r.image), problem))
        else:
            records.append(r)
    if not records:
        raise ConvertError(f"{spec.name}: no usable image found under {root}")
    params = {"size": list(size), "split_mode": split, "seed": seed,
              "format_version": shard.FORMAT_VERSION,
              "scanned": {"records": len(records), "rejects": len(rejects)}}
    if spec.definition is not None:
        params["definition"] = spec.definition
    check_places(spec.name, root, out)
    final = out / spec.name
    previous = shard.read_manifest(final)
    if previous and previous.get("params") == params and not force:
        log(f"{spec.name}: already converted in {final} (use --force to redo)")
        return previous
    with _converting(spec.name, out):
        try:
            return _pack(spec, root, out, records, rejects, split, seed, size, workers, params)
        except OSError as e:  # full after the check, a quota, a file system gone read-only
            where = f" ({e.filename})" if e.filename else ""
            raise ConvertError(f"{spec.name}: cannot write in {out}: {e.strerror or e}{where}; "
                               "nothing half-written was left") from None


def check_places(name: str, root: Path, out: Path) -> None:
    """Refuse an ``--out`` the conversion would read or destroy: inside the folder it scans
    (the next run would find the shards as data, e.g. as a class folder), one that holds that
    folder (publishing replaces ``OUT/NAME``), or an ``OUT/NAME`` that is not a conversion."""
    final = out / name
    r, o, f = root.resolve(), out.resolve(), final.resolve()
    if o == r or r in o.parents:
        raise ConvertError(f"{name}: --out {out} is inside --root {root}: the next conversion "
                           "would read the shards as data; choose an --out outside it")
    if f == r or f in r.parents:
        raise ConvertError(f"{name}: --root {root} is inside {final}, which the conversion "
                           "replaces; choose another --out")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{name}: --out {out} is a file, not a folder")
    if final.exists() and not (final / shard.MANIFEST).is_file():
        raise ConvertError(f"{name}: {final} exists and is not a finished conversion (it has no "
                           f"{shard.MANIFEST}); move it away or choose another --out")


@contextmanager
def _converting(name: str, out: Path):
    """Hold ``OUT/.NAME.lock`` while converting NAME: a second conversion into the same
    ``--out`` (another shell, another node) is refused in one line, instead of deleting the
    staging folder the first one is writing. ``runlock`` takes over a dead holder's lock."""
    from muscle_hpc import runlock

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"{name}: cannot create --out {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        read_only = os.statvfs(out).f_flag & os.ST_RDONLY
        raise ConvertError(f"{name}: --out {out} is not writable"
                           + (" (a read-only file system)" if read_only else ""))
    lock_dir = out / f".{name}.lock"
    try:
        lock = runlock.acquire(lock_dir, log=print)
    except runlock.InUseError as e:
        raise ConvertError(f"{name}: another conversion into {out} is running ({e})") from None
    except (runlock.RunLockError, OSError) as e:
        raise ConvertError(f"{name}: cannot write to --out {out}: "
                           f"{getattr(e, 'strerror', None) or e}") from None
    lock.keep_alive()
    try:
        yield
    finally:
        lock.release()
        with suppress(OSError):
            lock_dir.rmdir()


def _pack(spec: DatasetSpec, root: Path, out: Path, records: list[Record],
          rejects: list[Reject], split: str, seed: int, size, workers: int,
          params: dict) -> dict:
    """Decode, pack and publish (the caller holds the conversion's lock)."""
    splits = assign_splits(records, spec, split, seed)
    order = sorted(range(len(records)), key=lambda i: SPLITS.index(splits[i]))
    planned = Counter(splits)
    final = out / spec.name
    # A memmap on a full file system dies of SIGBUS, with no message: check first. Staging
    # arrays and shards are both on disk before the arrays are deleted.
    layers = 2 if "mask" in spec.fields else 1
    need, free = 2 * layers * len(records) * size[0] * size[1], shutil.disk_usage(out).free
    if need > free:
        raise ConvertError(f"{spec.name}: converting needs about {need / 2**20:,.1f} MiB in "
                           f"{out} (staging arrays, then shards), {free / 2**20:,.1f} MiB free")
    stage = shard.staging_dir(out, spec.name)
    try:
        w, h = size
        images = {s: np.lib.format.open_memmap(stage / f".{s}.images.npy", "w+", np.uint8,
                                               (planned[s], h, w, 1)) for s in planned}
        masks = {s: np.lib.format.open_memmap(stage / f".{s}.masks.npy", "w+", np.uint8,
                                              (planned[s], h, w, 1))
                 for s in planned} if "mask" in spec.fields else {}
        rows: dict[str, list] = {s: [] for s in planned}
        pix_sum = pix_sq = 0.0
        results = decoded([records[i] for i in order], size, workers)
        try:
            for i, res in tqdm(zip(order, results), total=len(order), desc=spec.name, unit="img",
                               disable=None):
                _check_stop()
                rec = records[i]
                if isinstance(res, str):
                    rejects.append(Reject(relpath(root, rec.image), res))
                    continue
                s, k = splits[i], len(rows[splits[i]])
                images[s][k, :, :, 0] = res.image
                if masks:
                    masks[s][k, :, :, 0] = 0 if res.mask is None else res.mask
                present = () if res.mask is None else \
                    tuple(int(k) for k in np.flatnonzero(np.bincount(res.mask.ravel())) if k)
                rows[s].append(Packed(rec, res.boxes, res.box_labels, bool(present), present))
                img = res.image.astype(np.float64)
                pix_sum += img.mean()
                pix_sq += (img * img).mean()
        finally:
            results.close()  # stops the decode workers when interrupted
        fields = shard.ffcv_fields(spec.fields, size)
        if "labels" in spec.fields:
            from ffcv.fields import NDArrayField
            fields["labels"] = NDArrayField(np.dtype("uint8"), (len(spec.label_names),))
        manifest_splits = {}
        group_ids = {g: i for i, g in enumerate(sorted({p.record.group for v in rows.values()
                                                        for p in v}))}
        for s in SPLITS:
            if not rows.get(s):
                continue
            _check_stop()
            cols = _columns(spec, rows[s], images[s], masks.get(s))
            shard.write_shard(stage / f"{s}.beton", fields, cols)
            np.save(stage / f"{s}.groups.npy",
                    np.array([group_ids[p.record.group] for p in rows[s]], np.int32))
            manifest_splits[s] = {"file": f"{s}.beton", "count": len(rows[s]),
                                  **shard.identity(stage / f"{s}.beton"),
                                  "groups": f"{s}.groups.npy",
                                  "groups_sha256": shard.sha256(stage / f"{s}.groups.npy"),
                                  **_split_summary(spec, rows[s])}
        del images, masks
        for tmp in stage.glob(".*.npy"):
            tmp.unlink()
        n = sum(len(v) for v in rows.values())
        if n == 0:
            raise ConvertError(f"{spec.name}: every image under {root} was rejected")
        mean = pix_sum / n
        manifest = {
            "dataset": spec.name, "size": list(size), "splits": manifest_splits,
            "rejects": [{"path": r.path, "reason": r.reason}
                        for r in sorted(rejects, key=lambda r: r.path)],
            "pixel_mean": round(mean, 4), "pixel_std": round(float(np.sqrt(pix_sq / n - mean**2)),
                                                             4),
            "role": spec.role, "fields": _field_doc(spec, fields), "params": params,
        }
        _check_stop()
        shard.write_json_atomic(stage / shard.MANIFEST, manifest)
        shard.publish(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest


def _field_doc(spec: DatasetSpec, fields: dict) -> dict:
    doc = {}
    for name, f in fields.items():
        entry = {"type": type(f).__name__}
        if hasattr(f, "shape"):
            entry.update(shape=list(f.shape), dtype=str(f.dtype))
        if name in ("label", "labels") and spec.label_names:
            entry["names"] = list(spec.label_names)
        if name == "value" and spec.value_name:
            entry["name"] = spec.value_name
        if name == "mask":
            entry["names"] = mask_names(spec)
        if name == "box_labels":
            entry["names"] = list(spec.box_categories)
            entry["padding"] = -1
        doc[name] = entry
    return doc


def mask_names(spec: DatasetSpec) -> list[str]:
    """Mask class names in value order: background, then the spec's classes (one unnamed
    foreground class is called ``foreground``)."""
    return ["background", *(spec.mask_classes or ("foreground",))]


def find_dataset_folder(spec: DatasetSpec, root: Path) -> Path | None:
    for name in spec.folder_names:
        if (root / name).is_dir():
            return root / name
    return None


def _report(manifest: dict, seconds: float, log) -> None:
    counts = ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())
    reasons = Counter(r["reason"].split(":")[0] for r in manifest["rejects"])
    rej = "; ".join(f"{n} {why}" for why, n in sorted(reasons.items())) or "none"
    log(f"{manifest['dataset']}: {counts} | rejected: {rej} | {seconds:.1f}s")


def _layout_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("your own dataset (data_prep/LAYOUTS.md, 'the four layouts')")
    g.add_argument("--layout", choices=layouts.LAYOUTS,
                   help="read --dataset NAME (a new name) from this layout")
    g.add_argument("--role", choices=layouts.ROLES,
                   help="task (default): 80/10/10 paper split; pretrain: everything in train")
    g.add_argument("--images", help="image folder (csv, masks, coco; default --root for csv "
                                    "and coco)")
    g.add_argument("--csv", help="csv layout: the CSV file (relative to --root or absolute)")
    g.add_argument("--encoding", help="csv: the CSV's text encoding (default utf-8; e.g. "
                                      "cp1252 for Excel on Windows)")
    g.add_argument("--image-column", help="csv: column of image paths (default: image)")
    g.add_argument("--label-column", help="csv: one class label per row -> field label")
    g.add_argument("--label-columns", help="csv: C1,C2,... 0/1 columns -> multi-hot labels")
    g.add_argument("--value-column", help="csv: a number per row -> regression field value")
    g.add_argument("--classes", help="csv: the classes of --label-column in index order; "
                                     "masks: the mask class names")
    g.add_argument("--patient-column", help="csv: patient id (groups the split)")
    g.add_argument("--patient-pattern",
                   help="folders, masks, coco: a regular expression whose first group finds "
                        "the patient id in an image's path under --root (groups the split; "
                        "default: each image its own group)")
    g.add_argument("--split-column", help="csv: train/valid/val/test -> the official split")
    g.add_argument("--masks", nargs="+", action="extend",
                   help="masks layout: one or more mask folders")
    g.add_argument("--mask-suffix", help="masks: a.png <-> a<SUFFIX>.png (e.g. _mask)")
    g.add_argument("--mask-mode", choices=layouts.MASK_MODES,
                   help="union: the masks' foreground is one class (default); classes: folder "
                        "k is class k; values: one folder of label maps, pixel value k is "
                        "class k of --classes")
    g.add_argument("--coco", help="coco layout: the COCO instances JSON")


def renamed(spec: DatasetSpec, role: str | None, name: str | None) -> DatasetSpec:
    """One of the nine with another role, under another name: ``--dataset nih --role task
    --as nih-findings`` makes NIH's or RSNA Bone Age's images (pre-training sets: everything in
    train) a task set with a patient-grouped 80/10/10 split, beside the pre-training copy."""
    if role is not None and role != spec.role and name is None:
        raise ConvertError(f"--role {role} changes what {spec.name}'s shards hold; give it "
                           f"another name with --as (MD-MoCo reads {spec.name} as it is)")
    if name is not None:
        try:
            layouts.check_name(name)
        except LayoutError as e:
            raise ConvertError(f"--as: {e}") from None
        spec = replace(spec, name=name, folder_names=(name,))
    return replace(spec, role=role) if role else spec


def _layout_options(args) -> dict:
    return {k: getattr(args, k) for k in layouts.OPTIONS}


def _jobs(args) -> list[tuple]:
    """``(spec or None, root, split mode, definition)`` per dataset to convert; a layout
    dataset's spec is built when its turn comes (building reads its CSV or JSON)."""
    given = [layouts.flag(k) for k, v in _layout_options(args).items() if v is not None]
    if args.datasets is not None:
        if args.dataset or args.layout or given:
            raise ConvertError("--datasets FILE takes no --dataset, --layout or layout options "
                               "(they go into the file)")
        if not args.root.is_dir():
            raise ConvertError(f"--root {args.root} is not a folder")
        jobs = []
        for entry in layouts.read_definitions(args.datasets):
            opts = {k: v for k, v in entry.items() if k not in ("name", "layout", "root")}
            root = layouts._path(args.root, str(entry["root"]))
            jobs.append((None, root, args.split, (str(entry["name"]), str(entry["layout"]),
                                                  opts)))
        return jobs
    if not args.dataset:
        raise ConvertError("give --dataset NAME (with --layout for your own dataset) or "
                           "--datasets FILE.yaml")
    if args.layout is not None:
        if args.dataset == "all":
            raise ConvertError("--dataset all converts the nine known datasets; it takes no "
                               "--layout")
        layouts.check_name(args.dataset)
        layouts.normalize(args.layout, _layout_options(args))  # refuse now, before any work
        return [(None, args.root, args.split, (args.dataset, args.layout,
                                               _layout_options(args)))]
    given = [g for g in given if g != "--role"] if args.dataset != "all" else given
    if given:
        raise ConvertError(f"{given[0]} needs --layout (it describes your own dataset)")
    if args.dataset != "all":
        if args.dataset not in NAMES:
            raise ConvertError(f"unknown dataset {args.dataset!r}: choose from "
                               f"{', '.join(NAMES)}, all, or give --layout for your own")
        return [(renamed(get_spec(args.dataset), args.role, args.as_name), args.root,
                 args.split, None)]
    if args.as_name:
        raise ConvertError("--as names one dataset; --dataset all converts nine")
    if not args.root.is_dir():
        raise ConvertError(f"--root {args.root} is not a folder")
    jobs = []
    for name in NAMES:
        spec = get_spec(name)
        folder = find_dataset_folder(spec, args.root)
        if folder is None:
            print(f"{name}: skipped, none of {', '.join(spec.folder_names)} under "
                  f"{args.root}")
            continue
        mode = args.split if spec.has_official_split else "paper"
        if mode != args.split:
            print(f"{name}: has no official split, using the paper split")
        jobs.append((spec, folder, mode, None))
    if not jobs:
        raise ConvertError(f"no dataset found under {args.root}")
    return jobs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help=f"one of {', '.join(NAMES)}, all, or a new name with "
                                     "--layout")
    p.add_argument("--as", dest="as_name", metavar="NAME",
                   help="one of the nine under another name (with --role task: NIH or bone age "
                        "as a fine-tune task set, beside their pre-training shards)")
    p.add_argument("--datasets", type=Path, metavar="FILE.yaml",
                   help="convert every dataset defined in this YAML file")
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--workers", type=int, default=min(8, multiprocessing.cpu_count()))
    p.add_argument("--size", default="800x500", help="W x H of the stored images")
    p.add_argument("--split", choices=("paper", "official"), default="paper")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="redo a finished conversion")
    p.add_argument("--verify", action="store_true",
                   help="then check every shard's checksum against the manifest (also a "
                        "finished conversion's: python -m data_prep.verify does the same)")
    _layout_args(p)
    args = p.parse_args(argv)
    # SIGTERM (scancel, kill) and Ctrl-C stop at the next image and remove the staging folder.
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    try:
        size = parse_size(args.size)
        if args.workers < 1:
            raise ConvertError("--workers must be >= 1")
        jobs = _jobs(args)
        failed = 0
        for spec, root, mode, definition in jobs:
            start = time.time()
            try:
                if spec is None:
                    spec = layouts.build_spec(*definition[:2], root, definition[2])
                    if (args.datasets or len(jobs) > 1) and mode == "official" \
                            and not spec.has_official_split:
                        print(f"{spec.name}: has no official split, using the paper split")
                        mode = "paper"
                m = convert_dataset(spec, root, args.out, size, mode, args.seed, args.workers,
                                    args.force)
                _report(m, time.time() - start, print)
                if args.verify and verify.verify(args.out / spec.name):
                    raise ConvertError(f"{spec.name}: shards in {args.out / spec.name} differ "
                                       "from their manifest; convert again with --force")
            except (ConvertError, LayoutError) as e:
                if len(jobs) == 1:
                    raise ConvertError(str(e)) from None
                failed += 1
                print(f"error: {printable(str(e))}", file=sys.stderr)
        return 1 if failed else 0
    except LayoutError as e:
        print(f"error: {printable(str(e))}", file=sys.stderr)
        return 2
    except ConvertError as e:
        print(f"error: {printable(str(e))}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"{e}; nothing half-written was left", file=sys.stderr)
        return 128 + _stop_signal[0]


if __name__ == "__main__":
    sys.exit(main())
