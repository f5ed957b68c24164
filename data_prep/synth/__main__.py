"""CLI of the demo data generator (see the package docstring)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import EXTERNAL, MANIFEST, SCALES, __doc__, generate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder to write the datasets into")
    p.add_argument("--scale", choices=tuple(SCALES), default="tiny",
                   help="tiny: seconds, for tests; small: a few hundred images per dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)
    start = time.time()
    try:
        truth = generate(args.out, args.scale, args.seed, workers=max(1, args.workers))
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    external = truth.pop(EXTERNAL)
    for name, t in (*truth.items(), *external.items()):
        print(f"{name:11s} {t['folder']:18s} usable {t['usable']:4d}  "
              f"planted rejects {len(t['planted_rejects'])}")
    print(f"wrote {args.out / MANIFEST} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
