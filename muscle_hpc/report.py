"""The paper's Table 2 and Table 3 from a run's fine-tune results, with ROC curves and overlays.

    python -m muscle_hpc.report RUN_DIR [--out DIR]        (DIR defaults to RUN_DIR/report)

Reads every ``RUN_DIR/finetune/<task>_<backbone>_<init>/results.json`` (and a segmentation
result's ``samples.npz``) and writes into DIR:

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
- ``roc_<task>_<backbone>.png``: per classification task and backbone, one ROC curve per init.
- ``overlay_lung_<backbone>_<init>.png``: up to 8 test images, ground truth outlined in green,
  prediction filled in red.
- ``report.md``: both tables, the rejected results (path and reason), which of the 40 results
  (4 tasks x 5 inits x 2 backbones) are missing, and last the tables in words: per task and
  backbone the best init on the headline metric (AUC, Dice, mAP), its lead over the runner-up,
  whether that lead is beyond the 95% CIs (AUC), and a classifier that calls every image one
  class; the same text goes to stdout.
- ``tb/``: TensorBoard, the two tables as text (tags ``table2``, ``table3``) and one HParams
  session per result in ``tb/<task>_<backbone>_<init>/`` (hparams task, init, backbone; metrics
  ``hparam/<metric>`` of the test split, NaN ones left out).

Every file is written to a temporary name and renamed, and ``tb/`` is built aside and swapped in,
so a killed report leaves the previous complete output, never half a table. Exit status 2, with
one line on stderr, when RUN_DIR is missing or holds no usable result.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from muscle_hpc import registry

# Rows, columns and their titles, in the registry's order (the paper's).
TASKS = {t.name: (t.kind, t.metrics) for t in registry.TASKS.values()}  # kind, test metrics
TASK_NAMES = {t.name: t.title for t in registry.TASKS.values()}
INITS = {i.name: i.title for i in registry.INITS.values()}
# ASCII for the CSV: spreadsheets and terminals mangle ⁻
CSV_INIT_NAMES = {i: title.replace("⁻", "-") for i, title in INITS.items()}
BACKBONES = {b.name: b.title for b in registry.BACKBONES.values()}
METRIC_NAMES = {"acc": "Acc", "sen": "Sen", "spe": "Spe", "auc": "AUC (95% CI)", "dice": "Dice",
                "miou": "mIoU", "map": "mAP", "ap_active": "AP_active", "ap_latent": "AP_latent"}
CI_SHOWN = {"auc"}  # the paper prints a CI for AUC only; the CSV has all of them
HEADLINE = {t.name: t.headline for t in registry.TASKS.values()}  # what "best" means
TABLES = {
    "table2": ("Table 2: pneumonia and MURA classification (test split, %; AUC with bootstrap "
               "95% CI)", ("pneumonia", "mura")),
    "table3": ("Table 3: lung segmentation and TB detection (test split, %)", ("lung", "tbx")),
}
MISSING = "—"
MAX_OVERLAYS = 8


@dataclass
class Result:
    task: str
    backbone: str
    init: str
    path: Path
    test: dict[str, float]
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    n: int | None = None
    roc: object = None  # as read; checked when plotted, a bad curve costs only its plot

    @property
    def name(self) -> str:
        return registry.finetune_name(self.task, self.backbone, self.init)


class ReportError(Exception):
    """RUN_DIR cannot give a report at all."""


# ---------------------------------------------------------------- reading


def as_number(value, where: str) -> float:
    if value is None:  # what a writer without NaN support would put for NaN
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} is {value!r}, not a number")
    return float(value)


def parse_result(data, path: Path) -> Result:
    """The result in ``data`` (a loaded results.json); ValueError says what is wrong with it."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    for key, known in (("task", TASKS), ("backbone", BACKBONES), ("init", INITS)):
        if key not in data:
            raise ValueError(f"no '{key}'")
        if data[key] not in known:
            raise ValueError(f"unknown {key} {data[key]!r}")
    task, backbone, init = data["task"], data["backbone"], data["init"]
    kind, metrics = TASKS[task]
    if data.get("kind", kind) != kind:
        raise ValueError(f"kind {data['kind']!r} is not {task}'s ({kind})")
    # the folder is the result's identity in the grid; a copied file must not fill another cell
    name = registry.finetune_name(task, backbone, init)
    if path.parent.name != name:
        raise ValueError(f"says {name}, its folder is {path.parent.name}")
    test = data.get("test")
    if not isinstance(test, dict):
        raise ValueError("no 'test' metrics")
    result = Result(task, backbone, init, path, {}, roc=data.get("roc"))
    for m in metrics:
        if m not in test:
            raise ValueError(f"no 'test.{m}'")
        result.test[m] = as_number(test[m], f"test.{m}")
        ci = test.get(f"{m}_ci")
        if ci is not None:
            if not isinstance(ci, list | tuple) or len(ci) != 2:
                raise ValueError(f"test.{m}_ci is {ci!r}, not [lo, hi]")
            result.ci[m] = (as_number(ci[0], f"test.{m}_ci"), as_number(ci[1], f"test.{m}_ci"))
    if isinstance(test.get("n"), int) and not isinstance(test["n"], bool):
        result.n = test["n"]
    return result


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
            results.append(parse_result(json.loads(path.read_text()), path))
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError included
            rejects.append((path, one_line(e)))
    if not results:
        path, reason = rejects[0]
        raise ReportError(f"none of the {len(rejects)} results under {finetune} is "
                          f"usable (first: {path}: {reason})")
    return results, rejects


# ---------------------------------------------------------------- tables


def pct(value: float) -> str:
    return f"{100 * value:.2f}" if math.isfinite(value) else "n/a"


def cell(result: Result | None, metric: str) -> str:
    if result is None:
        return MISSING
    text = pct(result.test[metric])
    if metric in CI_SHOWN and metric in result.ci and text != "n/a":
        lo, hi = result.ci[metric]
        bounds = f"{pct(lo)}–{pct(hi)}" if math.isfinite(lo) and math.isfinite(hi) else "n/a"
        text += f" ({bounds})"
    return text


def table_rows(tasks, by_key: dict) -> list[tuple[str, str]]:
    """(backbone, init) of each row: every init of each backbone that has a result here."""
    present = {b for (t, b, _) in by_key if t in tasks}
    return [(b, i) for b in BACKBONES if b in present for i in INITS]


def markdown_table(title: str, tasks, by_key: dict) -> str:
    header = ["Backbone", "Pre-training"] + [f"{TASK_NAMES[t]} {METRIC_NAMES[m]}"
                                             for t in tasks for m in TASKS[t][1]]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for b, i in table_rows(tasks, by_key):
        cells = [BACKBONES[b], INITS[i]] + [cell(by_key.get((t, b, i)), m)
                                            for t in tasks for m in TASKS[t][1]]
        lines.append("| " + " | ".join(cells) + " |")
    if len(lines) == 4:
        lines.append("")
        lines.append("(no results)")
    return "\n".join(lines) + "\n"


def csv_columns(tasks) -> list[str]:
    cols = ["backbone", "init", "backbone_name", "init_name"]
    for t in tasks:
        kind, metrics = TASKS[t]
        for m in metrics:
            cols.append(f"{t}_{m}")
            if kind == "classification":
                cols += [f"{t}_{m}_lo", f"{t}_{m}_hi"]
        cols.append(f"{t}_n")
    return cols


def csv_values(result: Result) -> dict[str, str]:
    t = result.task
    out = {f"{t}_{m}": repr(v) for m, v in result.test.items()}
    for m, (lo, hi) in result.ci.items():
        out[f"{t}_{m}_lo"], out[f"{t}_{m}_hi"] = repr(lo), repr(hi)
    if result.n is not None:
        out[f"{t}_n"] = str(result.n)
    return out


def csv_table(tasks, by_key: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, csv_columns(tasks), restval="", lineterminator="\n")
    writer.writeheader()
    for b, i in table_rows(tasks, by_key):
        row = {"backbone": b, "init": i, "backbone_name": BACKBONES[b],
               "init_name": CSV_INIT_NAMES[i]}
        for t in tasks:
            if (t, b, i) in by_key:
                row.update(csv_values(by_key[(t, b, i)]))
        writer.writerow(row)
    return buf.getvalue()


def missing_line(by_key: dict) -> str:
    """How many of the 40 grid results are missing, listed per task and backbone."""
    parts, count = [], 0
    for t in TASKS:
        for b in BACKBONES:
            gone = [i for i in INITS if (t, b, i) not in by_key]
            count += len(gone)
            if gone:
                parts.append(f"{t} {b}: " + ("all" if len(gone) == len(INITS)
                                             else ", ".join(gone)))
    total = len(TASKS) * len(BACKBONES) * len(INITS)
    return f"Missing {count} of {total} results" + (": " + "; ".join(parts) if parts else ".")


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


def verdict_lines(by_key: dict) -> list[str]:
    """The tables in words: per task and backbone, which init scores best on the task's
    headline metric and by how much over the runner-up. A lead is called clear only when both
    have a bootstrap 95% CI (AUC) and the CIs do not overlap, and an AUC above chance only when
    its CI is; Dice and mAP have no CI here, so their leads are given as measured, without a
    claim either way."""
    lines = []
    for task, metric in HEADLINE.items():
        for b in BACKBONES:
            scored = sorted(((r.test[metric], i) for i in INITS
                             if (r := by_key.get((task, b, i))) and math.isfinite(r.test[metric])),
                            key=lambda vi: -vi[0])
            if not scored:
                continue
            (top, best), name = scored[0], METRIC_NAMES[metric].split(" ")[0]
            ci = finite_ci(by_key[(task, b, best)], metric)
            leaders = [i for v, i in scored if v == top]
            line = f"- {TASK_NAMES[task]}, {BACKBONES[b]}: "
            if len(scored) == 1:
                line += f"only {INITS[best]} has a result, {name} {pct(top)}"
            elif len(leaders) > 1:
                names = [INITS[i] for i in leaders]
                line += f"{', '.join(names[:-1])} and {names[-1]} tie at {name} {pct(top)}"
            else:
                runner, second = scored[1]
                line += (f"{INITS[best]} scores best, {name} {pct(top)}, "
                         f"{100 * (top - runner):.2f} points over {INITS[second]}")
                ci_second = finite_ci(by_key[(task, b, second)], metric)
                if ci and ci_second:
                    line += (" (clear: their 95% CIs do not overlap)" if ci[0] > ci_second[1]
                             else " (within their 95% CIs: not a clear win)")
            if metric == "auc" and ci:
                line += ("; above chance (95% CI above 50)" if ci[0] > 0.5
                         else "; not clearly above chance (95% CI reaches 50)")
            flags = "".join(degenerate(by_key[(task, b, i)], INITS[i]) for i in leaders)
            lines.append(line + flags + ".")
    return ["In words (test split; headline metric per task):", *lines] if lines else []


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
        ax.plot(fpr, tpr, label=f"{INITS[r.init]} (AUC {pct(r.test['auc'])})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 − specificity", ylabel="sensitivity",
           title=f"{TASK_NAMES[task]} ROC, {BACKBONES[backbone]} (test split)")
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
    fig.suptitle(f"Lung, {BACKBONES[result.backbone]}, {INITS[result.init]}: "
                 "green = ground truth outline, red = prediction", fontsize=10)
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
    for t, (kind, _) in TASKS.items():
        if kind != "classification":
            continue
        for b in BACKBONES:
            curves = []
            for r in sorted((r for r in results if (r.task, r.backbone) == (t, b)),
                            key=lambda r: list(INITS).index(r.init)):
                if roc_arrays(r.roc) is None:
                    notes.append(f"no ROC curve: {r.path} has no usable 'roc' (fpr, tpr)")
                else:
                    curves.append(r)
            if curves:
                name = f"roc_{t}_{b}.png"
                write_atomic(out / name, roc_figure(t, b, curves))
                written.append(name)
    for r in results:
        samples = r.path.parent / "samples.npz"
        if TASKS[r.task][0] != "segmentation" or not samples.is_file():
            continue
        try:
            arrays = load_samples(samples)
        except Exception as e:  # a broken zip, a missing array, a bad shape: not the report's end
            notes.append(f"no overlay: {samples}: {one_line(e)}")
            continue
        name = f"overlay_{r.task}_{r.backbone}_{r.init}.png"
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
    domains = {"task": list(TASKS), "init": list(INITS), "backbone": list(BACKBONES)}
    # TensorBoard takes the HParams columns from one session's experiment summary, picked at
    # random; SummaryWriter.add_hparams would declare only that session's task's metrics, so
    # every session here declares all of them (the body of add_hparams otherwise)
    every_metric = {f"hparam/{m}": 0.0 for t in dict.fromkeys(r.task for r in results)
                    for m in TASKS[t][1]}
    for r in results:
        hp = {"task": r.task, "init": r.init, "backbone": r.backbone}
        metrics = {f"hparam/{m}": v for m, v in r.test.items() if math.isfinite(v)}
        experiment, _, _ = hparams(hp, every_metric, domains)
        _, start, end = hparams(hp, metrics, domains)
        with SummaryWriter(str(tmp / r.name)) as run:
            for summary in (experiment, start, end):
                run.file_writer.add_summary(summary)
            for tag, value in metrics.items():
                run.add_scalar(tag, value, 0)
    old = tb_dir.with_name(f".{tb_dir.name}.old-{os.getpid()}")
    if tb_dir.exists():
        tb_dir.rename(old)
    tmp.rename(tb_dir)
    shutil.rmtree(old, ignore_errors=True)


def build_report(results: list[Result], rejects: list[tuple[Path, str]], out: Path) -> str:
    """Writes everything into ``out``; returns the report's text (tables, rejects, missing)."""
    out.mkdir(parents=True, exist_ok=True)
    by_key = {(r.task, r.backbone, r.init): r for r in results}
    tables = {}
    for name, (title, tasks) in TABLES.items():
        tables[name] = markdown_table(title, tasks, by_key)
        write_atomic(out / f"{name}.csv", csv_table(tasks, by_key))
        write_atomic(out / f"{name}.md", tables[name])
    notes: list[str] = []
    write_figures(out, results, notes)
    write_tensorboard(out / "tb", tables, results)
    lines = [tables["table2"], tables["table3"]]
    if rejects:
        lines.append(f"Rejected {len(rejects)} result file(s):")
        lines += [f"- reject: {path}: {reason}" for path, reason in rejects]
        lines.append("")
    if notes:
        lines += [f"- {note}" for note in notes] + [""]
    lines.append(missing_line(by_key))
    words = verdict_lines(by_key)
    if words:
        lines += ["", *words]
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
