"""``python -m muscle_hpc.config --describe STAGE``: every key of a stage's config."""

from __future__ import annotations

import argparse

from muscle_hpc.config import SCHEMAS
from muscle_hpc.config.describe import describe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m muscle_hpc.config",
                                description="The config keys of a stage: type, default, "
                                            "bounds and what each means.")
    p.add_argument("--describe", required=True, choices=list(SCHEMAS), metavar="STAGE",
                   help=f"one of {', '.join(SCHEMAS)}")
    args = p.parse_args(argv)
    print(f"# {args.describe}: every key, as a config file sets it or key=value on the command "
          f"line overrides it")
    print("\n".join(describe(SCHEMAS[args.describe])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
