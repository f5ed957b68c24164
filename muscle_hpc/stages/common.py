"""What every stage's entry point does the same way: its command line and its one-line errors."""

from __future__ import annotations

import argparse
import sys


def parse_args(stage: str, doc: str, argv, example: str):
    p = argparse.ArgumentParser(prog=f"python -m muscle_hpc.stages.{stage}",
                                description=doc.split("\n\n")[0])
    p.add_argument("--config", required=True, help=f"YAML file (configs/{stage}_*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"e.g. {example}")
    return p.parse_args(argv)


def fail(stage: str, message: str) -> int:
    """Say ``message`` on stderr as the stage's error; the exit status of a refused start."""
    print(f"{stage}: error: {message}", file=sys.stderr)
    return 2
