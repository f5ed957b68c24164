"""The model card (``README.md`` of a hub folder), written from what the run knows.

Sources, all read-only: the checkpoint's config (against the stage's defaults), the run's
``provenance.json`` (commit, versions, GPUs), its TensorBoard events (the last value of each
curve), the manifests of its datasets under ``data.root`` (image counts; the licence terms are
the dataset plug-ins', ``data_prep.datasets.*.SPEC.licence``), and the fine-tune results under
the run root, as the report's tables. What is not reachable from here is said, not guessed.
"""

from __future__ import annotations

import math
from pathlib import Path

from data_prep.datasets import NAMES, get_spec
from muscle_hpc import config, report, tblog
from muscle_hpc.data.shards import ShardError, read_manifest
from muscle_hpc.export import run_datasets
from muscle_hpc.weights import Published

METHOD_TITLES = {"mdmoco": "MD-MoCo", "muscle": "MUSCLE", "muscle--": "MUSCLE⁻⁻",
                 "fine-tune": "a fine-tune", "multimix": "MultiMix"}
STAGE_TITLES = {"mdmoco": "MD-MoCo pre-training (MoCo v2 over the X-ray datasets)",
                "continual": "multi-task continual learning", "finetune": "fine-tuning",
                "multimix": "MultiMix (semi-supervised classification and segmentation)"}
MAX_CURVES = 40
CITATION = """@inproceedings{liao2022muscle,
  title     = {MUSCLE: Multi-task Self-supervised Continual Learning to Pre-train Deep Models
               for X-ray Images of Multiple Body Parts},
  author    = {Liao, Weibin and Xiong, Haoyi and Wang, Qingzhong and Mo, Yan and Li, Xuhong
               and Liu, Yi and Chen, Zeyu and Huang, Siyu and Dou, Dejing},
  booktitle = {Medical Image Computing and Computer Assisted Intervention (MICCAI)},
  year      = {2022}
}"""


def run_root(run_dir: Path, stage: str) -> Path:
    """The run root whose ``finetune/`` holds the fine-tunes of this run's backbone."""
    return run_dir.parent.parent if stage in ("finetune", "multimix") else run_dir.parent


def flat(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(stage: str, cfg: dict) -> list[tuple[str, object, object]]:
    """(key, the run's value, the default) for every key the run changed."""
    defaults = flat(config.to_dict(config.SCHEMAS[stage]()))
    ran = flat(cfg)
    return [(k, ran.get(k, "—"), defaults.get(k, "—")) for k in sorted({*ran, *defaults})
            if ran.get(k, "—") != defaults.get(k, "—")]


def dataset_rows(names: list[str], root: str) -> tuple[list[str], list[str]]:
    """Markdown rows of image counts per split, and what could not be read."""
    rows, missing = [], []
    for name in names:
        try:
            manifest = read_manifest(Path(root), name)
        except ShardError as e:
            missing.append(str(e))
            continue
        splits = manifest.get("splits", {})
        counts = ", ".join(f"{s} {info.get('count', '?')}" for s, info in splits.items())
        rejects = manifest.get("rejects")
        said = f"; {len(rejects)} file(s) rejected by the converter" if rejects else ""
        rows.append(f"| {name} | {counts}{said} |")
    return rows, missing


def used_splits(stage: str, cfg: dict) -> str:
    if stage == "mdmoco":
        extra = " and `extra`" if cfg["data"].get("pretrain_extra") else ""
        return f"MD-MoCo read the images of each dataset's `train`{extra} split, not its labels."
    if stage == "continual":
        init = cfg["model"].get("init") or "none: Kaiming init"
        return ("Each task trained on its `train` split, with its labels; `valid` scored the "
                f"tasks after each visit. The trunk started from `{init}` (`model.init`).")
    if stage == "multimix":
        return ("MultiMix trained on both tasks' `train` splits: the labels of a fraction, "
                "the rest of each without labels.")
    return "The fine-tune trained on its task's `train` split (or a fraction of it)."


def licence_lines(names: list[str]) -> list[str]:
    lines = []
    for name in names:
        licence = get_spec(name).licence if name in NAMES else None
        if licence is None:
            lines.append(f"- **{name}**: a dataset of the user's; its terms are not recorded "
                         f"here: state them before sharing these weights.")
            continue
        lines.append(f"- **{name}**, {licence.terms}. {licence.summary} Source: "
                     f"<{licence.url}>. Cite: {licence.citation}")
    return lines


def curve_lines(run_dir: Path) -> list[str]:
    tb = run_dir / "tb"
    if not tb.is_dir():
        return ["No TensorBoard events in the run directory."]
    scalars = tblog.read_scalars(tb)
    if not scalars:
        return ["The TensorBoard events hold no scalars."]
    lines = ["| curve | step | last value |", "|---|---|---|"]
    for tag in sorted(scalars)[:MAX_CURVES]:
        step, value = scalars[tag][-1]
        lines.append(f"| {tag} | {step} | {value:.6g} |" if math.isfinite(value)
                     else f"| {tag} | {step} | {value} |")
    if len(scalars) > MAX_CURVES:
        lines.append(f"\n({len(scalars) - MAX_CURVES} more curves in `tb/`.)")
    return lines


def finetune_tables(root: Path) -> list[str]:
    try:
        results, _ = report.collect(root)
    except report.ReportError as e:
        return [f"No fine-tune results to show ({e})."]
    by_setting = report.by_setting_of(results)
    return [report.markdown_table(t.title, t.tasks, t.by_key)
            for t in report.tables_of(by_setting)]


def provenance_lines(provenance: list[dict]) -> list[str]:
    if not provenance:
        return ["No provenance.json in the run directory."]
    last = provenance[-1]
    code = last.get("code", {})
    gpus = ", ".join(f"{n} × {name}" for name, n in (last.get("gpus") or {}).items())
    versions = ", ".join(f"{k} {v}" for k, v in (last.get("versions") or {}).items())
    return [f"- code: muscle-hpc {code.get('version')} at commit `{code.get('commit')}`"
            + (" (with uncommitted changes)" if code.get("dirty") else ""),
            f"- software: {versions}",
            f"- ranks: {last.get('world_size')} ({gpus or 'devices not recorded'}); "
            f"{len(provenance)} start(s) of the stage, the last at {last.get('time')}"]


def card(info: Published, cfg: dict, run_dir: Path, provenance: list[dict]) -> str:
    src = info.source
    stage, method = src["stage"], src["method"]
    arch_title = {"resnet18": "ResNet-18", "resnet50": "ResNet-50"}[info.arch]
    p = info.preprocessing
    names = run_datasets(cfg)
    rows, missing = dataset_rows(names, cfg["data"]["root"])
    changes = config_changes(stage, cfg)
    lines = [
        "---",
        "library_name: timm",
        "pipeline_tag: image-feature-extraction",
        "license: other",
        "tags: [timm, image-feature-extraction, medical-imaging, x-ray, muscle-hpc]",
        "---",
        "",
        f"# {arch_title} X-ray backbone: {METHOD_TITLES.get(method, method)}",
        "",
        f"A {arch_title} trunk trained by muscle-hpc's {STAGE_TITLES[stage]} stage "
        f"(step {src.get('step')}), after Liao et al., *MUSCLE*, MICCAI 2022. It is a feature "
        f"extractor for X-ray images, to fine-tune or to probe; it has no classifier.",
        "",
        "## Intended input",
        "",
        f"One gray channel, resized to {p.width}×{p.height} (width × height, no letterbox), "
        f"Z-scored as (x − {p.mean}) / {p.std} on 0–255 pixels. Raw pixels, 0–1 pixels or "
        f"ImageNet's normalisation give features of nothing the trunk saw; the hub loader "
        f"warns once when a batch cannot be Z-scored 8-bit pixels.",
        "",
        "```python",
        "import torch",
        'model = torch.hub.load("REPO", "muscle_' + info.arch + '", weights="THIS_FOLDER")',
        'features = model(model.preprocessing("image.png")[None])  # (1, '
        f'{512 if info.arch == "resnet18" else 2048})',
        "```",
        "",
        "With timm: `timm.create_model(\"local-dir:THIS_FOLDER\", pretrained=True)` (one "
        "input channel; `in_chans=3` spreads conv1 over three). The exact preprocessing is "
        "`muscle_hpc` in `config.json`; timm's own data config approximates its resize.",
        "",
        "## Training data",
        "",
    ]
    lines += [used_splits(stage, cfg), ""]
    if rows:
        lines += ["| dataset | images per split |", "|---|---|", *rows, ""]
    lines += [f"- {m}" for m in missing]
    if missing:
        lines.append("")
    lines += ["### Licences of the training data", "",
              "Weights trained on these images carry their terms; non-commercial terms are "
              "common. As their publishers state them:", "", *licence_lines(names), ""]
    lines += ["## Configuration", "",
              f"Stage `{stage}`, method `{method}`" +
              (f", MoCo's {src['encoder']} encoder" if "encoder" in src else "") + ". "]
    if changes:
        lines += [f"Changed from the defaults ({len(changes)} keys):", "",
                  "| key | this run | default |", "|---|---|---|",
                  *(f"| {k} | {v} | {d} |" for k, v, d in changes), ""]
    else:
        lines += ["The stage's defaults, unchanged.", ""]
    lines += ["## Provenance", "", *provenance_lines(provenance), "",
              "## Training curves (last values)", "", *curve_lines(run_dir), "",
              "## Fine-tune results under this run root", "",
              *finetune_tables(run_root(run_dir, stage)), "",
              "## Limitations", "",
              "A research artefact: not a medical device, not validated for any clinical use. "
              "Features reflect the training datasets' populations, scanners and labels.", "",
              "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)
