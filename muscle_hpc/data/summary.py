"""One pass of every loader over converted shards, with a printed summary.

    python -m muscle_hpc.data.summary --data OUT [--batch-size 16] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .. import registry
from .loaders import TaskLoader, TwoViewLoader
from .shards import ShardError, open_shard, pretrain_shards, read_manifest

# (dataset, kind) of each task set, once per set, in the tasks' order.
TASK_DATASETS = tuple(dict.fromkeys((t.dataset, t.kind) for t in registry.TASKS.values()))


def _timed(loader) -> tuple[int, int, float, object]:
    start, n, batches, last = time.perf_counter(), 0, 0, None
    for batch in loader:
        batches += 1
        first = batch[0] if isinstance(batch, tuple) else batch["image"]
        n += len(first)
        last = batch
    return batches, n, time.perf_counter() - start, last


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m muscle_hpc.data.summary", description=__doc__)
    p.add_argument("--data", type=Path, required=True, help="the converter's --out folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    try:
        present = [d for d in registry.DATASETS if (args.data / d / "manifest.json").is_file()]
        if not present:
            raise ShardError(f"no converted dataset in {args.data}")
        print(f"{'dataset':<11} {'train':>6} {'valid':>6} {'test':>6} {'extra':>6} {'rejects':>8}"
              f"  {'mean':>6} {'std':>6}")
        for name in present:
            m = read_manifest(args.data, name)
            c = [m["splits"].get(s, {}).get("count", 0) for s in ("train", "valid", "test",
                                                                   "extra")]
            print(f"{name:<11} {c[0]:>6} {c[1]:>6} {c[2]:>6} {c[3]:>6} {len(m['rejects']):>8}"
                  f"  {m['pixel_mean']:>6.1f} {m['pixel_std']:>6.1f}")

        moco = TwoViewLoader(pretrain_shards(args.data, present), args.batch_size,
                             num_workers=args.workers)
        batches, n, secs, (q, k) = _timed(moco)
        print(f"\nMD-MoCo two-view loader: {len(moco.shards)} shards mixed, {batches} batches, "
              f"views {tuple(q.shape)} mean {q.mean():.2f} std {q.std():.2f}, "
              f"{n / secs:.0f} img/s")
        for name, kind in TASK_DATASETS:
            if name not in present:
                continue
            loader = TaskLoader(open_shard(args.data, name, "train"), args.batch_size, kind,
                                train=True, num_workers=args.workers)
            batches, n, secs, last = _timed(loader)
            if kind == "classification":
                what = f"labels {torch.bincount(last['label']).tolist()} in last batch"
            elif kind == "segmentation":
                what = f"mask foreground {last['mask'].float().mean():.2f}"
            else:
                what = f"{sum(len(b) for b in last['boxes'])} boxes in last batch"
            print(f"{name} {kind} loader: {batches} batches, {n} images, {what}, "
                  f"{n / secs:.0f} img/s")
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
