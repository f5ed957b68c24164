"""The paper's Table 2 and Table 3 from a run's fine-tune results, with ROC curves and overlays.

    python -m muscle_hpc.report RUN_DIR [--out DIR]        (DIR defaults to RUN_DIR/report)

Reads every ``RUN_DIR/finetune/<task>_<backbone>_<init>[_linear][_<N>pct]/results.json`` (and
a segmentation result's ``samples.npz``) and writes into DIR:

- ``table2.md`` / ``table2.csv``: pneumonia and MURA classification (Acc, Sen, Spe, AUC with its
  bootstrap 95% CI); ``table3.md`` / ``table3.csv``: lung segmentation (Dice, mIoU) and TBX
  detection (mAP, AP_active, AP_latent). One row per backbone x pre-training (Scratch,
  ImageNet, MD-MoCo, MUSCLE⁻⁻, MUSCLE), test split. Markdown shows percents with 2 decimals,
  "n/a" for NaN and "—" for a result not (yet) there; a backbone without any result in a table
  is left out of it.
- CSV layout (wide, one row per Markdown row): ``backbone`` (r18|r50), ``init`` (scratch,
  imagenet, mdmoco, muscle--, muscle), ``backbone_name``, ``init_name`` (as printed, ASCII:
  "MUSCLE--"), then per task ``<task>_<metric>`` for each metric, for classification also
  ``<task>_<metric>_lo`` / ``_hi`` (the 95% CI), and ``<task>_n`` (test images). Values are
  the raw fractions written with ``repr`` (``float(cell)`` gives back the JSON's number
  exactly), ``nan`` for NaN, an empty cell for a missing result.
- The same two tables for every other setting that has results of their tasks: a linear probe
  and/or a fraction of the training labels (``table2_linear_10pct.md``: the suffix of the run
  directories), and one table per task of the user's per setting (``table_<task>[suffix]``:
  its kind's metrics, as its results.json defines it; MAE and RMSE in the target's unit).
- ``roc_<task>_<backbone>[suffix].png``: per binary classification task, backbone and
  setting, one ROC curve per init.
- ``overlay_<result>.png``: per segmentation result, up to 8 test images, ground truth
  outlined in green, prediction (any foreground class) filled in red.
- ``report.md``: every table, the rejected results (path and reason), which of the paper's 40
  results (4 tasks x 5 inits x 2 backbones) are missing, and last the tables in words, per
  setting: per task and backbone the best init on the headline metric (AUC, Dice, mAP, MAE:
  lowest), its lead over the runner-up,
  whether that lead is beyond the 95% CIs (AUC), and a classifier that calls every image one
  class; the same text goes to stdout.
- ``tb/``: TensorBoard, the two tables as text (tags ``table2``, ``table3``) and one HParams
  session per result in ``tb/<result>/`` (hparams task, init, backbone, protocol, fraction;
  metrics ``hparam/<metric>`` of the test split, NaN ones left out).

Every file is written to a temporary name and renamed, and ``tb/`` is built aside and swapped in,
so a killed report leaves the previous complete output, never half a table. Exit status 2, with
one line on stderr, when RUN_DIR is missing or holds no usable result.

Why one module over ~450 lines: one command whose parts (tables, words, figures, TensorBoard)
run once each, in the order of its output; reading results is ``muscle_hpc.results``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from muscle_hpc import registry
from muscle_hpc import results as results_json
from muscle_hpc.results import Result

# matplotlib (~1 s) and torch's TensorBoard writer (~3 s) are imported where they are used, so
# that reading results and printing the tables needs neither.

# Rows, columns and their titles, in the registry's order (the paper's).
INIT_TITLES = {i.name: i.title for i in registry.INITS.values()}
# ASCII for the CSV: spreadsheets and terminals mangle ⁻
CSV_INIT_NAMES = {i: title.replace("⁻", "-") for i, title in INIT_TITLES.items()}
BACKBONE_TITLES = {b.name: b.title for b in registry.BACKBONES.values()}
METRIC_NAMES = {"acc": "Acc", "sen": "Sen", "spe": "Spe", "auc": "AUC (95% CI)", "dice": "Dice",
                "miou": "mIoU", "map": "mAP", "ap_active": "AP_active", "ap_latent": "AP_latent",
                "mae": "MAE", "rmse": "RMSE"}
CI_SHOWN = {"auc"}  # the paper prints a CI for AUC only; the CSV has all of them
# Metrics in the target's own unit (regression errors), printed as they are, not as percents.
IN_UNITS = frozenset({"mae", "rmse"})
# The paper's tables are of whole-network fine-tunes on all training labels; any other
# (protocol, training fraction) gets tables of its own.
PAPER_SETTING = ("finetune", 1.0)
TABLES = {
    "table2": ("Table 2: pneumonia and MURA classification (test split, %; AUC with bootstrap "
               "95% CI)", ("pneumonia", "mura")),
    "table3": ("Table 3: lung segmentation and TB detection (test split, %)", ("lung", "tbx")),
}
MISSING = "—"
MAX_OVERLAYS = 8


class ReportError(Exception):
    """RUN_DIR cannot give a report at all."""


# ---------------------------------------------------------------- reading


def one_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def collect(run_dir: Path) -> tuple[list[Result], list[tuple[Path, str]]]:
    """The usable results under ``run_dir``, and (path, reason) for each file that is not."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory")
    finetune = registry.finetune_root(run_dir)
    paths = sorted(finetune.glob("*/results.json"))
    if not paths:
        raise ReportError(f"no fine-tune results ({finetune}/*/results.json)")
    results, rejects = [], []
    for path in paths:
        try:
            results.append(results_json.parse(json.loads(path.read_text()), path))
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError included
            rejects.append((path, one_line(e)))
    if not results:
        path, reason = rejects[0]
        raise ReportError(f"none of the {len(rejects)} results under {finetune} is "
                          f"usable (first: {path}: {reason})")
    return results, rejects


# ---------------------------------------------------------------- tables


def pct(value: float, metric: str = "") -> str:
    """A metric as printed: percent with 2 decimals, an error (MAE) in its own unit."""
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}" if metric in IN_UNITS else f"{100 * value:.2f}"


def cell(result: Result | None, metric: str) -> str:
    if result is None:
        return MISSING
    text = pct(result.test[metric], metric)
    if metric in CI_SHOWN and metric in result.ci and text != "n/a":
        lo, hi = result.ci[metric]
        bounds = f"{pct(lo)}–{pct(hi)}" if math.isfinite(lo) and math.isfinite(hi) else "n/a"
        text += f" ({bounds})"
    return text


def definitions(by_key: dict) -> dict[str, registry.Task]:
    """Each task's definition: the paper's four, and every other task that has a result
    here."""
    return {**registry.TASKS, **{t: r.definition for (t, _, _), r in by_key.items()}}


def metric_name(metric: str) -> str:
    head, _, cls = metric.partition("_")
    return METRIC_NAMES.get(metric) or (f"{METRIC_NAMES.get(head, head).split(' ')[0]} {cls}"
                                        if cls else metric)


def table_rows(tasks, by_key: dict) -> list[tuple[str, str]]:
    """(backbone, init) of each row: every init of each backbone that has a result here."""
    present = {b for (t, b, _) in by_key if t in tasks}
    return [(b, i) for b in BACKBONE_TITLES if b in present for i in INIT_TITLES]


def markdown_table(title: str, tasks, by_key: dict) -> str:
    info = definitions(by_key)
    header = ["Backbone", "Pre-training"] + [f"{info[t].title} {metric_name(m)}"
                                             for t in tasks for m in info[t].metrics]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for b, i in table_rows(tasks, by_key):
        cells = [BACKBONE_TITLES[b], INIT_TITLES[i]] + [cell(by_key.get((t, b, i)), m)
                                            for t in tasks for m in info[t].metrics]
        lines.append("| " + " | ".join(cells) + " |")
    if len(lines) == 4:
        lines.append("")
        lines.append("(no results)")
    return "\n".join(lines) + "\n"


def csv_columns(tasks, info: dict[str, registry.Task]) -> list[str]:
    cols = ["backbone", "init", "backbone_name", "init_name"]
    for t in tasks:
        for m in info[t].metrics:
            cols.append(f"{t}_{m}")
            if info[t].kind in ("classification", "multilabel", "regression"):  # bootstrapped
                cols += [f"{t}_{m}_lo", f"{t}_{m}_hi"]
        cols.append(f"{t}_n")
    return cols


def csv_values(result: Result) -> dict[str, str]:
    t = result.run.task
    out = {f"{t}_{m}": repr(v) for m, v in result.test.items()}
    for m, (lo, hi) in result.ci.items():
        out[f"{t}_{m}_lo"], out[f"{t}_{m}_hi"] = repr(lo), repr(hi)
    if result.n is not None:
        out[f"{t}_n"] = str(result.n)
    return out


def csv_table(tasks, by_key: dict) -> str:
    buf = io.StringIO()
    columns = csv_columns(tasks, definitions(by_key))
    writer = csv.DictWriter(buf, columns, restval="", lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    for b, i in table_rows(tasks, by_key):
        row = {"backbone": b, "init": i, "backbone_name": BACKBONE_TITLES[b],
               "init_name": CSV_INIT_NAMES[i]}
        for t in tasks:
            if (t, b, i) in by_key:
                row.update(csv_values(by_key[(t, b, i)]))
        writer.writerow(row)
    return buf.getvalue()


def setting_names(setting: tuple[str, float]) -> tuple[str, str]:
    """A (protocol, training fraction) setting's file-name suffix and title words: ("", "")
    for the paper's, ("_linear_10pct", "linear probe, 10% of the training labels")."""
    protocol, fraction = setting
    suffix = registry.FinetuneRun("", "", "", protocol, fraction).setting_suffix
    words = [w for w in ("linear probe (frozen backbone)" if protocol == "linear" else "",
                         f"{fraction * 100:g}% of the training labels" if fraction < 1 else "")
             if w]
    return suffix, ", ".join(words)


@dataclass(frozen=True)
class Table:
    name: str  # the file stem
    title: str
    tasks: tuple[str, ...]
    by_key: dict  # (task, backbone, init) -> Result, of one setting


def grid_settings(by_setting: dict) -> list[tuple[str, float]]:
    """The settings the paper's grid is reported in (its two tables, its missing results):
    each with results of the paper's tasks, or the paper's own when none has any (its empty
    tables then say what there is to run). A run that fine-tuned the paper's tasks only on a
    fraction of the labels (the demo) is not shown empty tables of all the labels."""
    found = [s for s, by_key in by_setting.items()
             if {t for t, _, _ in by_key} & set(registry.TASKS)]
    return sorted(found, key=setting_order) or [PAPER_SETTING]


def setting_order(setting: tuple[str, float]) -> tuple:
    return setting != PAPER_SETTING, registry.PROTOCOLS.index(setting[0]), -setting[1]


def tables_of(by_setting: dict) -> list[Table]:
    """The paper's two tables in each of ``grid_settings`` (the paper's setting: both, even
    empty; another: those with results), and one table per task of the user's per setting it
    has results in."""
    out = []
    grid = grid_settings(by_setting)
    for setting in sorted({*by_setting, *grid}, key=setting_order):
        by_key = by_setting.get(setting, {})
        suffix, words = setting_names(setting)
        present = {t for t, _, _ in by_key}
        for name, (title, tasks) in TABLES.items():
            if setting == PAPER_SETTING and setting in grid or present & set(tasks):
                out.append(Table(name + suffix, title + (f"; {words}" if words else ""), tasks,
                                 by_key))
        for task in sorted(present - set(registry.TASKS)):
            info = next(r.definition for (t, _, _), r in by_key.items() if t == task)
            unit = "; MAE, RMSE in the target's unit" if info.kind == "regression" else ""
            out.append(Table(f"table_{task}{suffix}",
                             f"{info.title}: {info.kind} (test split, %{unit})"
                             + (f"; {words}" if words else ""), (task,), by_key))
    return out


def missing_line(by_key: dict, words: str = "") -> str:
    """How many of the 40 grid results are missing, listed per task and backbone; ``words``:
    the setting, when not the paper's."""
    parts, count = [], 0
    for t in registry.TASK_NAMES:
        for b in registry.BACKBONE_NAMES:
            gone = [i for i in registry.INIT_NAMES if (t, b, i) not in by_key]
            count += len(gone)
            if gone:
                parts.append(f"{t} {b}: " + ("all" if len(gone) == len(registry.INITS)
                                             else ", ".join(gone)))
    total = len(registry.GRID)
    return (f"Missing {count} of {total} results" + (f" ({words})" if words else "")
            + (": " + "; ".join(parts) if parts else "."))


def degenerate(result: Result, name: str) -> str:
    """What a classifier ``name`` that calls every test image one class shows (Sen 1 / Spe 0
    or the reverse), however good its AUC: its threshold, not its ranking, is useless."""
    sen, spe = result.test.get("sen", math.nan), result.test.get("spe", math.nan)
    if sen == 1 and spe == 0:
        return f"; at its threshold {name} calls every test image positive (Sen 100, Spe 0)"
    if sen == 0 and spe == 1:
        return f"; at its threshold {name} calls every test image negative (Sen 0, Spe 100)"
    return ""


def finite_ci(result: Result, metric: str) -> tuple[float, float] | None:
    ci = result.ci.get(metric)
    return ci if ci and all(map(math.isfinite, ci)) else None


def verdict_lines(by_key: dict, tasks=None, heading: str = "") -> list[str]:
    """The tables in words: per task and backbone, which init scores best on the task's
    headline metric and by how much over the runner-up (an error such as MAE: the lowest). A
    lead is called clear only when both have a bootstrap 95% CI and the CIs do not overlap, and
    an AUC above chance only when its CI is; Dice and mAP have no CI here, so their leads are
    given as measured, without a claim either way. ``tasks``: those to speak of (default: the
    paper's); ``heading``: what setting these results are of."""
    lines, info = [], definitions(by_key)
    for task in tasks or registry.TASK_NAMES:
        metric, lower = info[task].headline, info[task].headline in registry.LOWER_IS_BETTER
        for b in BACKBONE_TITLES:
            scored = sorted(((r.test[metric], i) for i in INIT_TITLES
                             if (r := by_key.get((task, b, i))) and math.isfinite(r.test[metric])),
                            key=lambda vi: vi[0] if lower else -vi[0])
            if not scored:
                continue
            (top, best), name = scored[0], metric_name(metric).split(" ")[0]
            ci = finite_ci(by_key[(task, b, best)], metric)
            leaders = [i for v, i in scored if v == top]
            line = f"- {info[task].title}, {BACKBONE_TITLES[b]}: "
            if len(scored) == 1:
                line += f"only {INIT_TITLES[best]} has a result, {name} {pct(top, metric)}"
            elif len(leaders) > 1:
                names = [INIT_TITLES[i] for i in leaders]
                line += (f"{', '.join(names[:-1])} and {names[-1]} tie at {name} "
                         f"{pct(top, metric)}")
            else:
                runner, second = scored[1]
                gap = (f"{runner - top:.2f} lower than" if lower else
                       f"{100 * (top - runner):.2f} points over")
                line += (f"{INIT_TITLES[best]} scores best, {name} {pct(top, metric)}, "
                         f"{gap} {INIT_TITLES[second]}")
                ci_second = finite_ci(by_key[(task, b, second)], metric)
                if ci and ci_second:
                    apart = ci[1] < ci_second[0] if lower else ci[0] > ci_second[1]
                    line += (" (clear: their 95% CIs do not overlap)" if apart
                             else " (within their 95% CIs: not a clear win)")
            if metric == "auc" and ci:
                line += ("; above chance (95% CI above 50)" if ci[0] > 0.5
                         else "; not clearly above chance (95% CI reaches 50)")
            flags = "".join(degenerate(by_key[(task, b, i)], INIT_TITLES[i]) for i in leaders)
            lines.append(line + flags + ".")
    return [f"In words{heading} (test split; headline metric per task):", *lines] \
        if lines else []


# ---------------------------------------------------------------- figures


def figure(**kwargs):
    """A figure not registered with pyplot (nothing global to leak), on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def roc_arrays(roc) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        fpr = np.asarray(roc["fpr"], dtype=float)
        tpr = np.asarray(roc["tpr"], dtype=float)
    except (KeyError, TypeError, ValueError):
        return None
    if fpr.ndim != 1 or fpr.shape != tpr.shape or len(fpr) < 2:
        return None
    return fpr, tpr


def roc_figure(task: str, backbone: str, results: list[Result]) -> bytes:
    fig = figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", label="chance")
    for r in results:
        fpr, tpr = roc_arrays(r.roc)
        ax.plot(fpr, tpr, label=f"{INIT_TITLES[r.run.init]} (AUC {pct(r.test['auc'])})")
    words = setting_names(results[0].run.setting)[1]
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 − specificity", ylabel="sensitivity",
           title=f"{results[0].definition.title} ROC, {BACKBONE_TITLES[backbone]} (test split"
                 f"{'; ' + words if words else ''})")
    ax.set_aspect("equal")
    ax.legend(loc="lower right")
    return png_bytes(fig)


def load_samples(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        images, masks, preds = (np.asarray(npz[k]) for k in ("images", "masks", "preds"))
    if images.ndim != 3 or not len(images) or not images.shape == masks.shape == preds.shape:
        raise ValueError(f"images {images.shape}, masks {masks.shape}, preds {preds.shape} "
                         "are not the same (N, H, W)")
    return images[:MAX_OVERLAYS], masks[:MAX_OVERLAYS] > 0, preds[:MAX_OVERLAYS] > 0


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The pixels of ``mask`` within ``width`` steps (4-neighbours) of its outside."""
    inner = mask
    for _ in range(width):
        p = np.pad(inner, 1)  # outside the image counts as outside the mask
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def overlay_rgb(image: np.ndarray, mask: np.ndarray, pred: np.ndarray) -> np.ndarray:
    rgb = np.repeat(np.clip(image, 0, 255).astype(np.float32)[..., None], 3, axis=-1)
    rgb[pred] = 0.55 * rgb[pred] + 0.45 * np.array([255.0, 40.0, 40.0])
    # scaled with the image so the outline survives the downsampling of a large image
    rgb[outline(mask, max(1, round(max(mask.shape) / 160)))] = (40.0, 255.0, 40.0)
    return rgb.astype(np.uint8)


def dice(mask: np.ndarray, pred: np.ndarray) -> float:
    total = mask.sum() + pred.sum()
    return 2 * float((mask & pred).sum()) / total if total else math.nan


def overlay_figure(result: Result, images, masks, preds) -> bytes:
    n, h, w = images.shape
    panel = 2.4
    fig = figure(figsize=(panel * n, panel * h / w + 0.6))
    axes = np.atleast_1d(fig.subplots(1, n))
    for k, ax in enumerate(axes):
        ax.imshow(overlay_rgb(images[k], masks[k], preds[k]), interpolation="nearest")
        ax.set_title(f"#{k} Dice {pct(dice(masks[k], preds[k]))}", fontsize=9)
        ax.axis("off")
    run = result.run
    fig.suptitle(f"{result.definition.title}, {BACKBONE_TITLES[run.backbone]}, "
                 f"{INIT_TITLES[run.init]}: "
                 "green = ground truth outline, red = prediction (any foreground class)",
                 fontsize=10)
    return png_bytes(fig)


# ---------------------------------------------------------------- writing


def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def write_figures(out: Path, results: list[Result], notes: list[str]) -> list[str]:
    """The ROC and overlay PNGs; returns their names. What cannot be drawn becomes a note."""
    written = []
    # one ROC figure per binary classification task, backbone and setting
    binary = [r for r in results
              if r.definition.kind == "classification" and "sen" in r.definition.metrics]
    for t, b, setting in dict.fromkeys((r.run.task, r.run.backbone, r.run.setting)
                                       for r in binary):
        curves = []
        for r in sorted((r for r in binary
                         if (r.run.task, r.run.backbone, r.run.setting) == (t, b, setting)),
                        key=lambda r: registry.INIT_NAMES.index(r.run.init)):
            if roc_arrays(r.roc) is None:
                notes.append(f"no ROC curve: {r.path} has no usable 'roc' (fpr, tpr)")
            else:
                curves.append(r)
        if curves:
            name = f"roc_{t}_{b}{setting_names(setting)[0]}.png"
            write_atomic(out / name, roc_figure(t, b, curves))
            written.append(name)
    for r in results:
        samples = r.path.parent / "samples.npz"
        if r.definition.kind != "segmentation" or not samples.is_file():
            continue
        try:
            arrays = load_samples(samples)
        except Exception as e:  # a broken zip, a missing array, a bad shape: not the report's end
            notes.append(f"no overlay: {samples}: {one_line(e)}")
            continue
        name = f"overlay_{r.run.name}.png"
        write_atomic(out / name, overlay_figure(r, *arrays))
        written.append(name)
    # a figure of a result that has since gone would pass for a current one
    for stale in [*out.glob("roc_*.png"), *out.glob("overlay_*.png")]:
        if stale.name not in written:
            stale.unlink()
    return written


def write_tensorboard(tb_dir: Path, tables: dict[str, str], results: list[Result]) -> None:
    """Tables as text, one HParams session per result; built aside, then swapped in."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    tmp = tb_dir.with_name(f".{tb_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with SummaryWriter(str(tmp)) as writer:
        for tag, markdown in tables.items():
            writer.add_text(tag, markdown, 0)
    domains = {"task": list(dict.fromkeys([*registry.TASKS, *(r.run.task for r in results)])),
               "init": list(registry.INIT_NAMES), "backbone": list(registry.BACKBONE_NAMES),
               "protocol": list(registry.PROTOCOLS)}
    # TensorBoard takes the HParams columns from one session's experiment summary, picked at
    # random; SummaryWriter.add_hparams would declare only that session's task's metrics, so
    # every session here declares all of them (the body of add_hparams otherwise)
    every_metric = {f"hparam/{m}": 0.0 for r in results for m in r.definition.metrics}
    for r in results:
        hp = {"task": r.run.task, "init": r.run.init, "backbone": r.run.backbone,
              "protocol": r.run.protocol, "fraction": r.run.fraction}
        metrics = {f"hparam/{m}": v for m, v in r.test.items() if math.isfinite(v)}
        experiment, _, _ = hparams(hp, every_metric, domains)
        _, start, end = hparams(hp, metrics, domains)
        with SummaryWriter(str(tmp / r.run.name)) as run:
            for summary in (experiment, start, end):
                run.file_writer.add_summary(summary)
            for tag, value in metrics.items():
                run.add_scalar(tag, value, 0)
    old = tb_dir.with_name(f".{tb_dir.name}.old-{os.getpid()}")
    if tb_dir.exists():
        tb_dir.rename(old)
    tmp.rename(tb_dir)
    shutil.rmtree(old, ignore_errors=True)


def by_setting_of(results: list[Result]) -> dict[tuple[str, float], dict]:
    """The results of each setting (protocol, fraction), keyed (task, backbone, init)."""
    by_setting: dict[tuple[str, float], dict] = {}
    for r in results:
        by_setting.setdefault(r.run.setting, {})[(r.run.task, r.run.backbone, r.run.init)] = r
    return by_setting


def build_report(results: list[Result], rejects: list[tuple[Path, str]], out: Path) -> str:
    """Writes everything into ``out``; returns the report's text (tables, rejects, missing)."""
    out.mkdir(parents=True, exist_ok=True)
    by_setting = by_setting_of(results)
    tables = {}
    for table in tables_of(by_setting):
        tables[table.name] = markdown_table(table.title, table.tasks, table.by_key)
        write_atomic(out / f"{table.name}.csv", csv_table(table.tasks, table.by_key))
        write_atomic(out / f"{table.name}.md", tables[table.name])
    for stale in [*out.glob("table*.md"), *out.glob("table*.csv")]:  # of results now gone
        if stale.stem not in tables:
            stale.unlink()
    notes: list[str] = []
    write_figures(out, results, notes)
    write_tensorboard(out / "tb", tables, results)
    lines = list(tables.values())
    if rejects:
        lines.append(f"Rejected {len(rejects)} result file(s):")
        lines += [f"- reject: {path}: {reason}" for path, reason in rejects]
        lines.append("")
    if notes:
        lines += [f"- {note}" for note in notes] + [""]
    lines += [missing_line(by_setting.get(setting, {}), setting_names(setting)[1])
              for setting in grid_settings(by_setting)]
    for setting, results_here in by_setting.items():
        own = sorted({t for t, _, _ in results_here} - set(registry.TASKS))
        words = setting_names(setting)[1]
        said = verdict_lines(results_here, [*registry.TASKS, *own], f", {words}" if words else "")
        if said:
            lines += ["", *said]
    text = "\n".join(lines) + "\n"
    write_atomic(out / "report.md", text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m muscle_hpc.report",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run root holding finetune/<task>_<backbone>_<init>/")
    p.add_argument("--out", help="output folder (default: RUN_DIR/report)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "report"
    try:
        results, rejects = collect(run_dir)
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    try:
        text = build_report(results, rejects, out)
    except OSError as e:
        print(f"report: error: cannot write the report to {out}: {one_line(e)}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    print(f"report: {len(results)} results, {len(rejects)} rejected -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
