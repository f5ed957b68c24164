"""Check converted shards against their manifests, every byte.

    python -m data_prep.verify SHARDS [SHARDS ...]

Each ``SHARDS`` is a converter ``--out`` folder (every dataset in it) or one dataset's folder
(``OUT/NAME``, holding ``manifest.json``). For each split, the ``.beton`` and its groups file
must have the size, sample count and SHA-256 the converter recorded when it wrote them. Prints
one line per split; exit status 0 when all match, 1 when one does not, 2 when a folder holds no
conversion. Opening a shard for training checks size and count only (the checksums read every
byte); run this after copying shards to another file system, or when in doubt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .datasets.base import printable
from .shard import MANIFEST, mismatch, read_manifest


def dataset_folders(path: Path) -> list[Path]:
    """``path`` itself when it holds a manifest, else its sub-folders that do."""
    if (path / MANIFEST).is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(d for d in path.iterdir() if (d / MANIFEST).is_file())


def verify(folder: Path, log=print) -> int:
    """Check every split of the conversion in ``folder``; the number of splits that differ."""
    manifest = read_manifest(folder)
    if manifest is None:
        log(f"{folder}: {MANIFEST} is missing or not valid JSON")
        return 1
    bad = 0
    for split, info in manifest["splits"].items():
        problem = mismatch(folder, info, checksums=True)
        name = f"{manifest['dataset']}/{split}"
        if problem is None:
            n = info["count"]
            log(f"{name}: ok ({n} image{'' if n == 1 else 's'})")
        else:
            bad += 1
            log(f"{name}: MISMATCH: {printable(problem)}")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", type=Path, metavar="SHARDS")
    args = p.parse_args(argv)
    folders = []
    for path in args.shards:
        found = dataset_folders(path)
        if not found:
            print(f"error: no converted dataset ({MANIFEST}) in {printable(str(path))}",
                  file=sys.stderr)
            return 2
        folders += found
    bad = sum(verify(f) for f in folders)
    if bad:
        print(f"error: {bad} split(s) differ from their manifest; convert them again "
              "(--force)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
