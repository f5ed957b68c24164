"""Finding shards by dataset and split, with one-line errors for what is missing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep import shard as shard_files

# MD-MoCo reads the training sets (the paper's 169,257 images of Table 1), never a task set's
# valid/test images; ``extra`` (images that belong to no task, e.g. TBX11K's healthy, sick and
# test folders) only when asked.
PRETRAIN_SPLITS = ("train",)
EXTRA_SPLIT = "extra"


class ShardError(Exception):
    """A missing or inconsistent shard, said in one line."""


@dataclass(frozen=True)
class Shard:
    path: Path
    dataset: str
    split: str
    count: int
    size: tuple[int, int]  # (W, H)
    manifest: dict

    @property
    def fields(self) -> dict:
        return self.manifest["fields"]

    def class_names(self, kind: str) -> list[str] | None:
        """The class names the converter recorded for a task of ``kind`` (classification:
        ``label``, multilabel: ``labels``, segmentation: ``mask`` with the background first,
        detection: ``box_labels``); None where it recorded none."""
        field = {"classification": "label", "multilabel": "labels", "segmentation": "mask",
                 "detection": "box_labels"}.get(kind)
        return self.fields.get(field, {}).get("names") if field else None

    def groups(self) -> np.ndarray | None:
        """Each sample's group (patient) as an integer, in shard order, from the converter's
        ``SPLIT.groups.npy``; None for a shard converted before there was one."""
        name = self.manifest["splits"][self.split].get("groups")
        if name is None:
            return None
        groups = np.load(self.path.parent / name, allow_pickle=False)
        if groups.shape != (self.count,):
            raise ShardError(f"{self.dataset}/{self.split}: {name} holds {groups.shape} groups "
                             f"for {self.count} images (convert it again)")
        return groups

    def scalar_values(self, name: str) -> np.ndarray:
        """Every sample's value of the scalar field ``name`` (an int or float field), in shard
        order, as float64, from FFCV's metadata table, where FFCV keeps scalar fields: no image
        is read."""
        shard_files.import_ffcv()
        # Lazy: FFCV takes seconds to import, and synthetic runs go without it.
        from ffcv.reader import Reader

        reader = Reader(str(self.path))
        table = reader.metadata
        return np.asarray(table[table.dtype.names[reader.field_names.index(name)]], np.float64)


def read_manifest(data_root: Path, dataset: str) -> dict:
    folder = Path(data_root) / dataset
    try:
        return json.loads((folder / "manifest.json").read_text())
    except FileNotFoundError:
        raise ShardError(f"{dataset}: no manifest.json in {folder} (convert it first: "
                         f"python -m data_prep.convert --dataset {dataset} ...)") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{dataset}: {folder / 'manifest.json'} is not valid JSON ({e})") from None


def open_shard(data_root: Path, dataset: str, split: str) -> Shard:
    manifest = read_manifest(data_root, dataset)
    info = manifest["splits"].get(split)
    if info is None:
        raise ShardError(f"{dataset}: no {split!r} split (has {', '.join(manifest['splits'])})")
    path = Path(data_root) / dataset / info["file"]
    problem = shard_files.mismatch(path.parent, info)
    if problem is not None:
        hint = " (cut short, replaced or changed since it was converted: convert it again)" \
            if "bytes" in info else ""
        raise ShardError(f"{dataset}/{split}: {problem}{hint}")
    return Shard(path, dataset, split, info["count"], tuple(manifest["size"]), manifest)


def pretrain_shards(data_root: Path, datasets, extra: bool = False) -> list[Shard]:
    """Every pre-training shard of ``datasets``: ``train``, and ``extra`` too when ``extra``;
    all must share one size."""
    shards = []
    for name in datasets:
        manifest = read_manifest(data_root, name)
        for split in PRETRAIN_SPLITS + ((EXTRA_SPLIT,) if extra else ()):
            if split in manifest["splits"]:
                shards.append(open_shard(data_root, name, split))
    if not shards:
        raise ShardError(f"no train shard found in {data_root} for {', '.join(datasets)}")
    sizes = {s.size for s in shards}
    if len(sizes) > 1:
        detail = ", ".join(f"{s.dataset}/{s.split} {s.size[0]}x{s.size[1]}" for s in shards)
        raise ShardError(f"shards have different image sizes ({detail}); convert with one --size")
    return shards
