"""Pooled backbone features for every image of a folder or of converted shards.

    python -m muscle_hpc.embed --weights W --images DIR|SHARDS --out feats.npy
        [--split train|valid|test|extra ...] [--batch-size 64] [--workers 2] [--device cuda]

``W`` is anything ``muscle_hpc.weights.read`` takes (``.safetensors``, ``.pth``, a hub folder,
a run directory, a URL). Images go through the preprocessing recorded with the weights (the
converter's own gray conversion and resize, then the Z-score), in eval mode, on the GPU when
there is one.

``--images`` is a folder of image files (every PNG, JPEG, BMP or TIFF under it), a dataset's
shard folder (``SHARDS/NAME`` with its ``manifest.json``), or a shard root holding several.
Writes ``feats.npy`` (float32, one row per image, in the order listed) and ``feats.json``
beside it: the weights, the preprocessing, each row's image (its path, or ``NAME/SPLIT#i`` in a
shard, with its class where the shard has one) and each file that could not be read with the
reason. Both files are written whole or not at all, the ``.json`` last: a pair is complete
once its ``.json`` is there.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_prep import imaging
from data_prep.datasets.base import is_image, list_files
from muscle_hpc import checkpoint
from muscle_hpc.data.shards import ShardError, open_shard, read_manifest
from muscle_hpc.weights import Preprocessing, WeightsError, backbone, read


@dataclass
class Batch:
    rows: list[dict]  # each image's path (and class, in a shard with one)
    images: torch.Tensor | None  # (B, 1, H, W), preprocessed; None when no image was read
    rejects: list[dict]  # path and reason of each file that could not be read


class Files(torch.utils.data.Dataset):
    """Decodes and preprocesses in the loader's workers; a file that cannot be read comes
    back as its reason instead of a tensor, so it is reported, never dropped."""

    def __init__(self, paths: list[Path], preprocessing: Preprocessing):
        self.paths, self.preprocessing = paths, preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            return str(path), self.preprocessing(imaging.open_image(path)), ""
        except imaging.Unusable as e:
            return str(path), None, str(e).splitlines()[0]
        except (OSError, ValueError) as e:  # decoded, but not as an image can be
            return str(path), None, f"unreadable: {str(e).splitlines()[0] if str(e) else e!r}"


def collate(batch) -> Batch:
    good = [(name, x) for name, x, _ in batch if x is not None]
    return Batch([{"path": name} for name, _ in good],
                 torch.stack([x for _, x in good]) if good else None,
                 [{"path": name, "reason": why} for name, x, why in batch if x is None])


def folder_batches(paths: list[Path], preprocessing: Preprocessing, batch_size: int,
                   workers: int):
    return torch.utils.data.DataLoader(Files(paths, preprocessing), batch_size=batch_size,
                                       num_workers=workers, collate_fn=collate)


def shard_folders(root: Path) -> list[Path]:
    """One dataset's shard folder, or each under a root of several."""
    if (root / "manifest.json").is_file():
        return [root]
    return sorted(p.parent for p in root.glob("*/manifest.json"))


def shard_splits(root: Path, splits: list[str] | None) -> list:
    """The shards to embed, opened and checked against their manifests."""
    shards = []
    for folder in shard_folders(root):
        manifest = read_manifest(folder.parent, folder.name)
        for split in splits or list(manifest["splits"]):
            if split in manifest["splits"]:
                shards.append(open_shard(folder.parent, folder.name, split))
    return shards


def shard_batches(shards: list, preprocessing: Preprocessing, batch_size: int):
    """The shards' images in shard order, read through FFCV, named ``NAME/SPLIT#i``. They
    are uint8 at the shard's size already; ``preprocessing`` resizes them only when the
    weights were trained at another size."""
    from muscle_hpc.data.loaders import epoch_arrays, ffcv_loader

    for shard in shards:
        fields = ("image", "label") if "label" in shard.fields else ("image",)
        loader = ffcv_loader(shard, batch_size, fields, shuffle=False, seed=0, rank=0, world=1,
                             num_workers=1, drop_last=False)
        n = 0
        with closing(epoch_arrays(loader, 0)) as batches:
            for raw in batches:
                images = raw["image"].reshape(-1, shard.size[1], shard.size[0])
                labels = raw["label"].reshape(-1).tolist() if "label" in raw else None
                rows = []
                for k in range(len(images)):
                    rows.append({"path": f"{shard.dataset}/{shard.split}#{n + k}"}
                                | ({"label": int(labels[k])} if labels else {}))
                n += len(images)
                yield Batch(rows, torch.stack([preprocessing(im) for im in images]), [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m muscle_hpc.embed",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--images", required=True, help="a folder of images, or shards")
    p.add_argument("--out", required=True, help="the features' .npy (a .json goes beside it)")
    p.add_argument("--split", action="append", dest="splits",
                   help="shards only: the split(s) to embed (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="decoding processes (0: in-process)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        p.error("--batch-size must be >= 1 and --workers >= 0")
    out = Path(args.out)
    if out.suffix != ".npy":
        p.error(f"--out must end in .npy, not {out.name!r}")
    src = Path(args.images)
    try:
        weights = read(args.weights)
        if not src.is_dir():
            raise WeightsError(f"{src}: not a folder")
        if shard_folders(src):
            shards = shard_splits(src, args.splits)
            total = sum(s.count for s in shards)
            batches = shard_batches(shards, weights.preprocessing, args.batch_size)
        else:
            if args.splits:
                raise WeightsError(f"--split is for shards; {src} holds no manifest.json")
            paths = [p for p in list_files(src) if is_image(p)]
            total = len(paths)
            batches = folder_batches(paths, weights.preprocessing, args.batch_size,
                                     args.workers)
        if not total:
            raise WeightsError(f"{src}: no images in it")
    except (WeightsError, ShardError) as e:
        print(f"embed: error: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    # The images are ours to preprocess: a flat one is not a user's mistake to warn about.
    model = backbone(weights, check_inputs=False).to(device)
    rows, feats, rejects = [], [], []
    with torch.inference_mode(), tqdm(total=total, desc="embed", unit="img",
                                      file=sys.stderr) as bar:
        for batch in batches:
            rejects += batch.rejects
            if batch.images is not None:
                feats.append(model(batch.images.to(device)).float().cpu().numpy())
                rows += batch.rows
            bar.update(len(batch.rows) + len(batch.rejects))
    if not rows:
        print(f"embed: error: none of the {total} images could be read (first: "
              f"{rejects[0]['path']}: {rejects[0]['reason']})", file=sys.stderr)
        return 2
    features = np.concatenate(feats)
    side = out.with_suffix(".json")
    meta = {"weights": str(args.weights), "arch": weights.arch,
            "preprocessing": weights.preprocessing.as_dict(),
            "source": weights.published.source if weights.published else None,
            "features": list(features.shape), "rows": rows, "rejects": rejects}
    buf = io.BytesIO()
    np.save(buf, features.astype(np.float32), allow_pickle=False)
    try:
        # The .json is written last and an old one removed first: a run killed between the
        # two files leaves features without rows, never rows beside another run's features.
        side.unlink(missing_ok=True)
        checkpoint.save_bytes(out, buf.getvalue())
        checkpoint.save_bytes(side, json.dumps(meta, indent=1).encode())
    except checkpoint.NoSpaceError as e:
        print(f"embed: error: {e}", file=sys.stderr)
        return 1
    said = f", {len(rejects)} rejected (listed in {side.name})" if rejects else ""
    print(f"embed: {len(rows)} images -> {out} {tuple(features.shape)}{said}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
