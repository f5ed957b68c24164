"""Demo data: all nine public X-ray datasets in their real download layouts, quirks included,
and two datasets of your own kind (``external/knee``, ``external/hip``, see :mod:`.external`)
in the generic layouts that ``configs/external_datasets.yaml`` converts.

    python -m data_prep.synth --out DIR [--scale tiny|small] [--seed S] [--workers N]

The pictures are synthetic films, learnable through anatomy only (see :mod:`.anatomy`):
exposure, contrast, gamma, collimation, side marker, noise and the body's size and position
are drawn per image independently of the label, and findings are local, so a picture's
gray-level histogram does not tell its label (``tests/test_demo_data.py``). Each dataset's
pictures come from one function of :mod:`.layouts` (``layouts.sample``). The layouts follow
``data_prep/LAYOUTS.md`` to the letter, so the converters are exercised exactly as on the real
downloads. :func:`generate` returns (and writes to ``DIR/synth_manifest.json``) the ground
truth a correct converter must reproduce, so converter tests need not re-derive it.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from . import external
from .layouts import FOLDERS, NAMES, SCALES, WRITERS

MANIFEST = "synth_manifest.json"
EXTERNAL = "external"  # not a download folder name, so --dataset all never sees it
__all__ = ["EXTERNAL", "FOLDERS", "MANIFEST", "NAMES", "SCALES", "generate"]


def _write_one(args) -> dict:
    name, out, scale, seed = args
    if name in external.WRITERS:
        root, writer, cfg = out / external.FOLDERS[name], external.WRITERS[name], \
            external.EXTERNAL_SCALES[scale]
    else:
        root, writer, cfg = out / FOLDERS[name], WRITERS[name], SCALES[scale]
    if root.exists():  # a rerun must not leave files of an earlier seed or scale behind
        shutil.rmtree(root)
    return writer(root, cfg, seed)


def _claim(out: Path) -> None:
    """Refuse to wipe dataset folders this generator did not write (``--out`` pointed at real
    downloads by mistake); the manifest, written first, marks a folder as ours."""
    manifest = out / MANIFEST
    foreign = [f for f in (*FOLDERS.values(), EXTERNAL) if (out / f).exists()]
    if foreign and not manifest.is_file():
        raise FileExistsError(f"{out} already holds {', '.join(foreign)} and no {MANIFEST}: "
                              "not overwriting what the generator did not write")
    manifest.write_text('{"incomplete": true}\n')


def generate(out: Path, scale: str = "tiny", seed: int = 0, workers: int = 1) -> dict:
    """Write the nine datasets under ``out`` and return ``{dataset: truth}``, plus
    ``{"external": {"knee": truth, "hip": truth}}`` for the two written under ``out/external``.

    Each truth has ``folder``, ``usable`` (images a correct converter packs), ``label_counts``
    (``label`` value or NIH finding -> usable images), ``planted_rejects`` (path relative to the
    folder, reason prefix), ``junk`` (files skipped silently) and, where they apply,
    ``task_images``, ``masks``, ``boxes`` and ``quirks`` (which file carries which oddity).
    The same seed and scale give byte-identical files, whatever ``workers`` is.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, not {scale!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _claim(out)
    jobs = [(name, out, scale, seed) for name in (*NAMES, *external.WRITERS)]
    if workers > 1:
        # Not multiprocessing.Pool: its terminate(), which its context manager calls, can
        # deadlock against its own worker-respawning thread (seen here in CI).
        with ProcessPoolExecutor(min(workers, len(jobs)),
                                 mp_context=multiprocessing.get_context("fork")) as pool:
            truths = list(pool.map(_write_one, jobs))
    else:
        truths = [_write_one(j) for j in jobs]
    result = dict(zip(NAMES, truths))
    result[EXTERNAL] = dict(zip(external.WRITERS, truths[len(NAMES):]))
    (out / MANIFEST).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result
