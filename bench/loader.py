"""MD-MoCo two-view loader vs. a torchvision ImageFolder + PIL + DataLoader pipeline, and the
cost of each view recipe (``data.views``).

    python -m bench.loader [--images 3000] [--size 800x500] [--workers 2] [--batch-size 64]
                           [--views paper,mococxr,mocov2]

Both read the same gray images (PNG files for torchvision, as users have them; our FFCV shard
made from those files by the converter) and produce two views per image with the same
augmentation, the paper's: horizontal flip p=0.5, rotation in [-10, 10] degrees (bilinear, zero
fill), Z-score normalisation. Same batch size and number of workers. Each is warmed up, then
timed over the same number of images. Prints images/s of our loader for each recipe of
``--views`` (the paper's first, the others also as a ratio to it), then torchvision's, and the
ratio ours / torchvision for the paper's recipe last.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_prep.convert import convert_dataset, parse_size
from data_prep.datasets.base import DatasetSpec, Record, Scan
from muscle_hpc.data import TwoViewLoader, pretrain_shards
from muscle_hpc.data.augment import RECIPES, view_size
from muscle_hpc.registry import PIXEL_MEAN, PIXEL_STD


def make_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """Smooth X-ray-like gray images (compressible like real ones, unlike pure noise)."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    (folder / "xray").mkdir(parents=True)
    for i in range(n):
        f = rng.uniform(2, 6, 4)
        img = 110 + 50 * np.sin(f[0] * xx + f[1] * yy) * np.cos(f[2] * yy - f[3] * xx)
        img += rng.normal(0, 6, (h, w))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / "xray" / f"{i}.png")


def convert_to_shard(folder: Path, out: Path, size, workers: int) -> None:
    def scan(root: Path) -> Scan:
        return Scan([Record(p, p.stem) for p in sorted((root / "xray").glob("*.png"))])

    spec = DatasetSpec("bench", ("bench",), "pretrain", (), scan)
    convert_dataset(spec, folder, out, size=size, workers=workers, log=lambda *_: None)


class TwoViews:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        return self.transform(img), self.transform(img)


def torchvision_loader(folder: Path, batch_size: int, workers: int):
    from torchvision import datasets, transforms

    view = transforms.Compose([
        transforms.RandomHorizontalFlip(0.5),
        transforms.RandomRotation(10, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.ToTensor(),
        transforms.Normalize([PIXEL_MEAN / 255], [PIXEL_STD / 255]),
    ])
    ds = datasets.ImageFolder(str(folder), transform=TwoViews(view),
                              loader=lambda p: Image.open(p).convert("L"))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                       num_workers=workers, drop_last=True,
                                       persistent_workers=True)


def images_per_second(make_iter, query_view, batch_size: int, warmup: int, batches: int) -> float:
    it = make_iter()
    done = 0
    start = None
    while done < warmup + batches:
        try:
            q = query_view(next(it))
        except StopIteration:
            it = make_iter()
            continue
        assert q.shape[0] == batch_size
        done += 1
        if done == warmup:
            start = time.perf_counter()
    return batches * batch_size / (time.perf_counter() - start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--size", default="800x500")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    p.add_argument("--views", default=",".join(RECIPES),
                   help=f"recipes to time, comma separated, of {', '.join(RECIPES)} (the "
                        f"paper's is always timed, first)")
    args = p.parse_args(argv)
    size = parse_size(args.size)
    recipes = ["paper", *(v for v in dict.fromkeys(args.views.split(",")) if v != "paper")]
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        p.error(f"--views: {', '.join(sorted(unknown))} not one of {', '.join(RECIPES)}")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        make_images(tmp / "png", args.images, size)
        convert_to_shard(tmp / "png", tmp / "shards", size, args.workers)
        mb = sum(f.stat().st_size for f in (tmp / "png" / "xray").iterdir()) / 2**20
        print(f"{args.images} images {size[0]}x{size[1]} ({mb:.0f} MiB of PNG) prepared in "
              f"{time.perf_counter() - t:.0f}s; batch {args.batch_size}, "
              f"{args.workers} workers, {os.cpu_count()} cores")
        per_epoch = args.images // args.batch_size
        timed = max(4, per_epoch - 4)
        rates = {}
        for views in recipes:
            ours = TwoViewLoader(pretrain_shards(tmp / "shards", ["bench"]), args.batch_size,
                                 num_workers=args.workers, views=views)
            rates[views] = images_per_second(partial(iter, ours), lambda b: b[0],
                                             args.batch_size, 3, timed)
            w, h = view_size(views, *size)
            vs_paper = "" if views == "paper" else f", {rates[views] / rates['paper']:.2f}x " \
                                                  f"the paper's"
            print(f"ours (FFCV shard + numba two-view kernel), views={views} ({w}x{h}): "
                  f"{rates[views]:8.1f} img/s{vs_paper}")
        ffcv_ips = rates["paper"]
        tv = torchvision_loader(tmp / "png", args.batch_size, args.workers)
        tv_ips = images_per_second(lambda: iter(tv), lambda b: b[0][0], args.batch_size, 3, timed)
        print(f"torchvision ImageFolder + PIL + DataLoader: {tv_ips:8.1f} img/s")
        print(f"ratio ours / torchvision (views=paper): {ffcv_ips / tv_ips:.2f}x")


if __name__ == "__main__":
    main()
