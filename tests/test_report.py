"""``python -m muscle_hpc.report``: hand-written fine-tune results in, tables, PNGs and
TensorBoard out, every number read back from what was written."""

import contextlib
import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from muscle_hpc import registry, report
from muscle_hpc import results as results_json
from muscle_hpc.registry import FinetuneRun
from muscle_hpc.results import Result

ROOT = Path(__file__).resolve().parents[1]


def cls_result(task, backbone, init, base):
    """A classification results.json as the fine-tune stage writes it; numbers from ``base``."""
    test = {"acc": base + 0.01234567890123, "sen": base - 0.1, "spe": base + 0.1,
            "auc": base + 0.05, "acc_ci": [base - 0.05, base + 0.05],
            "sen_ci": [base - 0.2, base], "spe_ci": [base, base + 0.15],
            "auc_ci": [base - 0.01, base + 0.11], "ci_resamples": 100, "auc_ci_skipped": 0,
            "n": 120}
    return {"task": task, "kind": "classification", "init": init, "backbone": backbone,
            "arch": {"r18": "resnet18", "r50": "resnet50"}[backbone], "best_epoch": 3,
            "epochs": 10, "selected_by": "auc",
            "valid": {"acc": 0.8, "sen": 0.7, "spe": 0.9, "auc": 0.85}, "test": test,
            "roc": {"fpr": [0.0, 0.1, 0.3, 1.0], "tpr": [0.0, 0.6, base, 1.0],
                    "thresholds": [2.0, 0.9, 0.5, 0.0]},
            "init_weights": "runs/mdmoco_r18/backbone_torchvision.pth"}


def seg_result(backbone, init, dice, miou):
    return {"task": "lung", "kind": "segmentation", "init": init, "backbone": backbone,
            "best_epoch": 1, "valid": {"dice": 0.9, "miou": 0.8},
            "test": {"dice": dice, "miou": miou, "n": 12}}


def det_result(backbone, init, map_, active, latent):
    return {"task": "tbx", "kind": "detection", "init": init, "backbone": backbone,
            "best_epoch": 2, "valid": {"map": 0.3},
            "test": {"map": map_, "ap_active": active, "ap_latent": latent, "n": 9}}


def write_result(run_dir: Path, data: dict, folder: str | None = None) -> Path:
    folder = folder or f"{data['task']}_{data['backbone']}_{data['init']}"
    path = run_dir / "finetune" / folder / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))  # NaN is written as the bare NaN Python's json reads
    return path


def write_samples(folder: Path, n=3, h=40, w=64):
    images = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (n, h, 1))
    masks = np.zeros((n, h, w), np.uint8)
    masks[:, 10:30, 8:28] = 1
    preds = np.zeros((n, h, w), np.uint8)
    preds[:, 12:32, 10:30] = 1
    np.savez_compressed(folder / "samples.npz", images=images, masks=masks, preds=preds)


PNEU_R18_MUSCLE = cls_result("pneumonia", "r18", "muscle--", 0.8)
PNEU_R18_SCRATCH = cls_result("pneumonia", "r18", "scratch", 0.6)
PNEU_R50_IMAGENET = cls_result("pneumonia", "r50", "imagenet", 0.7)
MURA_R18_MUSCLE = cls_result("mura", "r18", "muscle", 0.75)
MURA_R18_MUSCLE["test"]["auc"] = math.nan
MURA_R18_MUSCLE["test"]["sen_ci"] = [math.nan, math.nan]
LUNG_R18_MUSCLE = seg_result("r18", "muscle--", 0.9512345678901234, 0.9012)
TBX_R18_MDMOCO = det_result("r18", "mdmoco", 0.3694, 0.41, math.nan)
GOOD = [PNEU_R18_MUSCLE, PNEU_R18_SCRATCH, PNEU_R50_IMAGENET, MURA_R18_MUSCLE, LUNG_R18_MUSCLE,
        TBX_R18_MDMOCO]


def make_run(run_dir: Path) -> dict[str, Path]:
    """The good results, one with samples, and two rejects: broken JSON and a missing metric."""
    for data in GOOD:
        write_result(run_dir, data)
    write_samples(run_dir / "finetune" / "lung_r18_muscle--")
    broken = run_dir / "finetune" / "mura_r50_scratch" / "results.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"task": "mura", "test": {')  # a writer killed mid-file
    no_map = det_result("r50", "muscle", 0.1, 0.2, 0.3)
    del no_map["test"]["map"]
    return {"broken": broken, "no_map": write_result(run_dir, no_map)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One report over ``make_run``'s results, in-process: (out dir, stdout, rejects)."""
    run_dir = tmp_path_factory.mktemp("run")
    rejects = make_run(run_dir)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert report.main([str(run_dir)]) == 0
    return run_dir / "report", stdout.getvalue(), rejects


def read_csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open(newline="") as f:
        return {(row["backbone"], row["init"]): row for row in csv.DictReader(f)}


def read_markdown(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    """Table rows keyed by (Backbone, Pre-training) label, each a header -> cell dict."""
    rows = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {}
    for line in rows[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        out[(cells["Backbone"], cells["Pre-training"])] = cells
    return out


# ---------------------------------------------------------------- CSV


def test_table2_csv_holds_the_exact_numbers(built):
    out, _, _ = built
    row = read_csv(out / "table2.csv")[("r18", "muscle--")]
    test = PNEU_R18_MUSCLE["test"]
    for m in ("acc", "sen", "spe", "auc"):
        assert float(row[f"pneumonia_{m}"]) == test[m]
        assert float(row[f"pneumonia_{m}_lo"]) == test[f"{m}_ci"][0]
        assert float(row[f"pneumonia_{m}_hi"]) == test[f"{m}_ci"][1]
    assert int(row["pneumonia_n"]) == 120
    assert row["init_name"] == "MUSCLE--" and row["backbone_name"] == "ResNet-18"


def test_table2_csv_other_cells_and_missing_are_empty(built):
    out, _, _ = built
    rows = read_csv(out / "table2.csv")
    assert float(rows[("r18", "scratch")]["pneumonia_acc"]) == PNEU_R18_SCRATCH["test"]["acc"]
    assert float(rows[("r18", "muscle")]["mura_spe"]) == MURA_R18_MUSCLE["test"]["spe"]
    assert float(rows[("r50", "imagenet")]["pneumonia_auc"]) == PNEU_R50_IMAGENET["test"]["auc"]
    assert rows[("r18", "muscle--")]["mura_acc"] == ""  # no mura r18 muscle-- result
    assert all(v == "" for k, v in rows[("r18", "imagenet")].items() if k.startswith("p"))
    assert list(rows)[:5] == [("r18", i) for i in report.INIT_TITLES]  # the paper's row order
    assert [k for k in rows if k[0] == "r50"] == [("r50", i) for i in report.INIT_TITLES]


def test_table3_csv_holds_the_exact_numbers(built):
    out, _, _ = built
    rows = read_csv(out / "table3.csv")
    assert float(rows[("r18", "muscle--")]["lung_dice"]) == 0.9512345678901234
    assert float(rows[("r18", "muscle--")]["lung_miou"]) == 0.9012
    assert rows[("r18", "muscle--")]["tbx_map"] == ""
    assert float(rows[("r18", "mdmoco")]["tbx_map"]) == 0.3694
    assert float(rows[("r18", "mdmoco")]["tbx_ap_active"]) == 0.41
    assert math.isnan(float(rows[("r18", "mdmoco")]["tbx_ap_latent"]))
    assert "lung_dice_lo" not in rows[("r18", "muscle--")]  # no CI outside classification


def test_csv_nan_is_written_as_nan(built):
    out, _, _ = built
    row = read_csv(out / "table2.csv")[("r18", "muscle")]
    assert row["mura_auc"] == "nan"
    assert row["mura_sen_lo"] == "nan" and row["mura_sen_hi"] == "nan"


# ---------------------------------------------------------------- Markdown


def test_markdown_percent_cells_and_auc_ci(built):
    out, _, _ = built
    rows = read_markdown(out / "table2.md")
    row = rows[("ResNet-18", "MUSCLE⁻⁻")]
    assert row["Pneumonia Acc"] == "81.23"
    assert row["Pneumonia Sen"] == "70.00"
    assert row["Pneumonia Spe"] == "90.00"
    assert row["Pneumonia AUC (95% CI)"] == "85.00 (79.00–91.00)"
    assert rows[("ResNet-50", "ImageNet")]["Pneumonia AUC (95% CI)"] == "75.00 (69.00–81.00)"


def test_markdown_missing_cells_are_dashes(built):
    out, _, _ = built
    rows = read_markdown(out / "table2.md")
    assert rows[("ResNet-18", "MUSCLE⁻⁻")]["MURA Acc"] == "—"
    assert set(list(rows[("ResNet-18", "ImageNet")].values())[2:]) == {"—"}
    assert list(rows) == [(b, i) for b in ("ResNet-18", "ResNet-50")
                          for i in ("Scratch", "ImageNet", "MD-MoCo", "MUSCLE⁻⁻", "MUSCLE")]


def test_markdown_nan_shows_na(built):
    out, _, _ = built
    row = read_markdown(out / "table2.md")[("ResNet-18", "MUSCLE")]
    assert row["MURA AUC (95% CI)"] == "n/a"
    assert row["MURA Sen"] == "65.00"
    tbx = read_markdown(out / "table3.md")[("ResNet-18", "MD-MoCo")]
    assert (tbx["TBX mAP"], tbx["TBX AP_active"], tbx["TBX AP_latent"]) == ("36.94", "41.00",
                                                                          "n/a")


def test_table3_leaves_out_a_backbone_without_results(built):
    out, _, _ = built
    rows = read_markdown(out / "table3.md")  # the only r50 table-3 result is a reject
    assert {b for b, _ in rows} == {"ResNet-18"}
    assert rows[("ResNet-18", "MUSCLE⁻⁻")]["Lung Dice"] == "95.12"
    assert rows[("ResNet-18", "MUSCLE⁻⁻")]["Lung mIoU"] == "90.12"


def test_cell_ci_formatting():
    r = Result(FinetuneRun("pneumonia", "muscle", "r18"), registry.TASKS["pneumonia"],
               Path("x"), {"auc": 0.951, "acc": 0.5}, {"auc": (math.nan, 0.96), "acc": (0.4, 0.6)})
    assert report.cell(r, "auc") == "95.10 (n/a)"
    assert report.cell(r, "acc") == "50.00"  # the paper shows the CI of AUC only
    r.ci = {}
    assert report.cell(r, "auc") == "95.10"
    assert report.cell(None, "auc") == "—"
    assert report.pct(math.inf) == "n/a"


# ---------------------------------------------------------------- report text


def test_stdout_has_both_tables_the_missing_count_and_the_words_last(built):
    out, stdout, _ = built
    assert (out / "table2.md").read_text() in stdout
    assert (out / "table3.md").read_text() in stdout
    assert (out / "report.md").read_text() == stdout
    tail = stdout.strip().split("\n\n")[-2:]
    last = tail[0]
    assert last.startswith(f"Missing {40 - len(GOOD)} of 40 results: ")
    assert "pneumonia r18: imagenet, mdmoco, muscle;" in last
    assert "mura r50: all;" in last and last.endswith("tbx r50: all")


    assert tail[1].splitlines() == [
        "In words (test split; headline metric per task):",
        "- Pneumonia, ResNet-18: MUSCLE⁻⁻ scores best, AUC 85.00, 20.00 points over Scratch "
        "(clear: their 95% CIs do not overlap); above chance (95% CI above 50).",
        "- Pneumonia, ResNet-50: only ImageNet has a result, AUC 75.00; above chance "
        "(95% CI above 50).",
        "- Lung, ResNet-18: only MUSCLE⁻⁻ has a result, Dice 95.12.",
        "- TBX, ResNet-18: only MD-MoCo has a result, mAP 36.94."]  # MURA's one AUC is NaN


def words(*results) -> list[str]:
    by_key = {}
    for data in results:
        r = results_json.parse(data, Path(f"{data['task']}_{data['backbone']}_{data['init']}")
                               / "results.json")
        by_key[(r.run.task, r.run.backbone, r.run.init)] = r
    return report.verdict_lines(by_key)[1:]


def test_words_call_a_lead_clear_only_when_the_cis_do_not_overlap():
    a, b = cls_result("mura", "r18", "muscle", 0.9), cls_result("mura", "r18", "scratch", 0.6)
    a["test"]["auc_ci"], b["test"]["auc_ci"] = [0.85, 0.95], [0.5, 0.7]
    assert words(a, b) == ["- MURA, ResNet-18: MUSCLE scores best, AUC 95.00, 30.00 points "
                           "over Scratch (clear: their 95% CIs do not overlap); above chance "
                           "(95% CI above 50)."]
    b["test"]["auc_ci"] = [0.5, 0.86]
    assert "(within their 95% CIs: not a clear win); above" in words(a, b)[0]
    a["test"]["auc_ci"] = [0.5, 0.99]
    assert words(a, b)[0].endswith("; not clearly above chance (95% CI reaches 50).")
    a["test"]["auc_ci"] = [math.nan, math.nan]  # every resample missed a class
    assert words(a, b)[0].endswith("30.00 points over Scratch.")
    del b["test"]["auc_ci"], a["test"]["auc_ci"]  # without CIs no claim is made either way
    assert words(a, b)[0].endswith("30.00 points over Scratch.")


def test_words_name_ties_and_a_classifier_that_calls_everything_positive():
    inits = ("scratch", "mdmoco", "muscle")
    dets = [det_result("r18", i, 0.0, 0.0, 0.0) for i in inits]
    assert words(*dets) == ["- TBX, ResNet-18: Scratch, MD-MoCo and MUSCLE tie at mAP 0.00."]
    a, b = cls_result("pneumonia", "r18", "muscle", 0.9), cls_result("pneumonia", "r18",
                                                                     "scratch", 0.8)
    a["test"].update(sen=1.0, spe=0.0)
    assert words(a, b)[0].endswith("; at its threshold MUSCLE calls every test image positive "
                                   "(Sen 100, Spe 0).")
    a["test"].update(sen=0.0, spe=1.0)
    assert "MUSCLE calls every test image negative" in words(a, b)[0]
    # in a tie, the words name which of the leaders is degenerate (the demo's pneumonia row)
    b["test"].update(auc=a["test"]["auc"], sen=1.0, spe=1.0)
    a["test"].update(sen=1.0, spe=0.0)
    line = words(a, b)[0]
    assert "Scratch and MUSCLE tie at AUC" in line and "Scratch calls" not in line
    assert line.endswith("; at its threshold MUSCLE calls every test image positive "
                         "(Sen 100, Spe 0).")


def test_rejects_are_one_line_each_and_the_rest_is_built(built):
    out, stdout, rejects = built
    lines = [line for line in stdout.splitlines() if "reject:" in line]
    assert len(lines) == 2
    assert lines[0].startswith(f"- reject: {rejects['broken']}: ")
    assert lines[1] == f"- reject: {rejects['no_map']}: no 'test.map'"
    assert "Traceback" not in stdout
    assert read_csv(out / "table2.csv")[("r18", "muscle--")]["pneumonia_acc"] != ""


@pytest.mark.parametrize("mutate, reason", [
    (lambda d: d.pop("init"), "no 'init'"),
    (lambda d: d.update(backbone="r101"), "unknown backbone 'r101'"),
    (lambda d: d["test"].update(auc="high"), "test.auc is 'high', not a number"),
    (lambda d: d["test"].update(auc_ci=[0.1]), "test.auc_ci is [0.1], not [lo, hi]"),
    (lambda d: d.update(kind="detection"), "kind 'detection' is not pneumonia's"),
    (lambda d: d.update(test=[1]), "no 'test' metrics"),
])
def test_parse_result_says_what_is_wrong(mutate, reason):
    data = json.loads(json.dumps(PNEU_R18_SCRATCH))
    mutate(data)
    with pytest.raises(ValueError, match=reason.replace("[", r"\[").replace("(", r"\(")):
        results_json.parse(data, Path("finetune/pneumonia_r18_scratch/results.json"))


def test_result_in_the_wrong_folder_is_rejected(tmp_path):
    write_result(tmp_path, PNEU_R18_SCRATCH)
    write_result(tmp_path, PNEU_R18_MUSCLE, folder="pneumonia_r18_mdmoco")
    results, rejects = report.collect(tmp_path)
    assert [r.run.name for r in results] == ["pneumonia_r18_scratch"]
    assert rejects == [(tmp_path / "finetune/pneumonia_r18_mdmoco/results.json",
                        "says pneumonia_r18_muscle--, its folder is pneumonia_r18_mdmoco")]


def test_null_metric_reads_as_nan():
    data = json.loads(json.dumps(PNEU_R18_SCRATCH))
    data["test"]["spe"] = None
    r = results_json.parse(data, Path("pneumonia_r18_scratch/results.json"))
    assert math.isnan(r.test["spe"])


# ---------------------------------------------------------------- figures


def test_pngs_exist_with_the_expected_names(built):
    out, _, _ = built
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["overlay_lung_r18_muscle--.png", "roc_mura_r18.png",
                     "roc_pneumonia_r18.png", "roc_pneumonia_r50.png"]
    for name in names:
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 0 and im.height > 0
    with Image.open(out / "overlay_lung_r18_muscle--.png") as im:
        assert im.width > 2 * im.height  # a row of the 3 samples


def test_overlay_marks_truth_and_prediction():
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    ring = report.outline(mask, 1)
    assert ring.sum() == 20 and not ring[3:7, 3:7].any()
    pred = np.zeros_like(mask)
    pred[0, 0] = True
    rgb = report.overlay_rgb(np.full((10, 10), 100, np.uint8), mask, pred)
    assert tuple(rgb[2, 2]) == (40, 255, 40) and tuple(rgb[5, 5]) == (100, 100, 100)
    assert rgb[0, 0, 0] > rgb[0, 0, 1]  # red wins on the prediction
    assert report.dice(mask, mask) == 1.0 and math.isnan(report.dice(pred & False, pred & False))


def test_bad_roc_and_bad_samples_become_notes(tmp_path):
    data = json.loads(json.dumps(PNEU_R18_SCRATCH))
    data["roc"] = {"fpr": [0.0, 1.0], "tpr": [0.0]}
    path = write_result(tmp_path, data)
    lung = write_result(tmp_path, LUNG_R18_MUSCLE).parent
    (lung / "samples.npz").write_bytes(b"not a zip")
    text = report.build_report(*report.collect(tmp_path), tmp_path / "out")
    assert f"- no ROC curve: {path} has no usable 'roc' (fpr, tpr)" in text
    assert f"- no overlay: {lung / 'samples.npz'}: " in text
    assert not list((tmp_path / "out").glob("*.png"))


# ---------------------------------------------------------------- TensorBoard


def accumulator(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_has_both_tables_as_text(built):
    out, _, _ = built
    acc = accumulator(out / "tb")
    assert set(acc.Tags()["tensors"]) == {"table2/text_summary", "table3/text_summary"}
    for name in ("table2", "table3"):
        (event,) = acc.Tensors(f"{name}/text_summary")
        assert event.tensor_proto.string_val[0].decode() == (out / f"{name}.md").read_text()


def test_tensorboard_has_one_hparams_session_per_result(built):
    from tensorboard.plugins.hparams import metadata

    out, _, _ = built
    runs = sorted(p.name for p in (out / "tb").iterdir() if p.is_dir())
    assert runs == sorted(f"{d['task']}_{d['backbone']}_{d['init']}" for d in GOOD)
    every_metric = {f"hparam/{m}" for t in registry.TASKS.values() for m in t.metrics}
    for data in GOOD:
        acc = accumulator(out / "tb" / f"{data['task']}_{data['backbone']}_{data['init']}")
        content = acc.PluginTagToContent("hparams")
        start = metadata.parse_session_start_info_plugin_data(
            content[metadata.SESSION_START_INFO_TAG])
        assert {k: v.string_value for k, v in start.hparams.items() if k != "fraction"} == {
            "task": data["task"], "init": data["init"], "backbone": data["backbone"],
            "protocol": "finetune"}
        assert start.hparams["fraction"].number_value == 1.0
        experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
        # every session declares every metric, whichever one TensorBoard reads the columns from
        assert {m.name.tag for m in experiment.metric_infos} == every_metric
        assert {h.name for h in experiment.hparam_infos} == {"task", "init", "backbone",
                                                             "protocol", "fraction"}
        finite = {f"hparam/{m}": v for m in registry.TASKS[data["task"]].metrics
                  if math.isfinite(v := data["test"][m])}
        assert set(acc.Tags()["scalars"]) == set(finite)  # NaN metrics are left out
        for tag, value in finite.items():
            (event,) = acc.Scalars(tag)
            assert event.value == pytest.approx(value, rel=1e-6)  # stored as float32


# ---------------------------------------------------------------- command line


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "muscle_hpc.report", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_command_line_writes_to_out(tmp_path):
    make_run(tmp_path / "run")
    proc = run_cli(tmp_path / "run", "--out", tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "elsewhere"
    assert proc.stdout == (out / "report.md").read_text()
    assert proc.stdout.startswith("### Table 2")
    assert proc.stderr.strip().splitlines() == [f"report: 6 results, 2 rejected -> {out}"]
    assert float(read_csv(out / "table3.csv")[("r18", "muscle--")]["lung_dice"]) == (
        LUNG_R18_MUSCLE["test"]["dice"])
    assert not (tmp_path / "run" / "report").exists()


def test_missing_run_dir_exits_2_in_one_line(tmp_path):
    proc = run_cli(tmp_path / "nope")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"report: error: {tmp_path / 'nope'} is not a "
                                                "directory"]
    assert proc.stdout == ""


@pytest.mark.parametrize("setup", ["empty", "no_results", "all_rejected"])
def test_run_dir_without_results_exits_2(tmp_path, capsys, setup):
    if setup == "no_results":
        (tmp_path / "finetune" / "pneumonia_r18_scratch").mkdir(parents=True)
    if setup == "all_rejected":
        write_result(tmp_path, {"task": "nope"}, folder="x")
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("report: error: ")
    assert not (tmp_path / "report").exists()


def test_rerun_replaces_output_and_drops_stale_figures(tmp_path, capsys):
    make_run(tmp_path)
    assert report.main([str(tmp_path)]) == 0
    (tmp_path / "finetune" / "pneumonia_r50_imagenet" / "results.json").unlink()
    assert report.main([str(tmp_path)]) == 0
    out = tmp_path / "report"
    assert not (out / "roc_pneumonia_r50.png").exists()
    assert (out / "roc_pneumonia_r18.png").exists()
    assert ("ResNet-50", "ImageNet") not in read_markdown(out / "table2.md")
    assert len(list((out / "tb").glob("events.*"))) == 1  # swapped in, not appended to
    assert not (out / "tb" / "pneumonia_r50_imagenet").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no tmp left
    assert "Missing 35 of 40 results" in capsys.readouterr().out


# ---------------------------------------------------------------- tasks of the user's, settings


def own_result(task, kind, classes, init, test, **extra):
    """A results.json of a task defined in the user's config, as the stage writes it."""
    return {"task": task, "kind": kind, "title": task.capitalize(), "classes": classes,
            "init": init, "backbone": "r18", "selected_by": extra.pop("selected_by", "auc"),
            "test": test, **extra}


def test_a_task_of_the_users_and_a_probe_at_10pct_get_tables_of_their_own(tmp_path):
    knee = {"scratch": 0.61, "muscle": 0.83}
    for init, auc in knee.items():
        test = {"acc": auc - 0.1, "auc": auc, "auc_ci": [auc - 0.05, auc + 0.05], "n": 30,
                **{f"{m}_{c}": 0.5 for c in ("none", "mild", "severe") for m in ("sen", "spe")}}
        write_result(tmp_path, own_result("knee", "classification", ["none", "mild", "severe"],
                                          init, test))
    for init, mae in (("scratch", 14.5), ("mdmoco", 9.25)):
        write_result(tmp_path, own_result("age", "regression", [], init,
                                          {"mae": mae, "rmse": mae + 3, "n": 20},
                                          selected_by="mae"))
    probe = cls_result("pneumonia", "r18", "mdmoco", 0.7)
    probe.update(protocol="linear", train_fraction=0.1)
    write_result(tmp_path, probe, "pneumonia_r18_mdmoco_linear_10pct")
    write_result(tmp_path, PNEU_R18_SCRATCH)
    out = tmp_path / "report"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert report.main([str(tmp_path)]) == 0
    text = stdout.getvalue()
    names = sorted(p.stem for p in out.glob("table*.md"))
    assert names == ["table2", "table2_linear_10pct", "table3", "table_age", "table_knee"]

    rows = {r["init"]: r for r in csv.DictReader(open(out / "table_knee.csv"))}
    assert float(rows["muscle"]["knee_auc"]) == 0.83 and rows["muscle"]["knee_n"] == "30"
    assert float(rows["muscle"]["knee_auc_lo"]) == 0.83 - 0.05  # as written, to the bit
    assert "| ResNet-18 | MUSCLE | 73.00 | 83.00 (78.00–88.00) | 50.00" in \
        (out / "table_knee.md").read_text()
    age = (out / "table_age.md").read_text()
    assert "MAE, RMSE in the target's unit" in age
    assert "| ResNet-18 | MD-MoCo | 9.25 | 12.25 |" in age
    probe_table = (out / "table2_linear_10pct.md").read_text()
    assert "linear probe (frozen backbone), 10% of the training labels" in probe_table
    assert "| ResNet-18 | MD-MoCo | 71.23 |" in probe_table
    assert "| ResNet-18 | Scratch | 61.23 |" in (out / "table2.md").read_text()  # not mixed
    assert "- Knee, ResNet-18: MUSCLE scores best, AUC 83.00, 22.00 points over Scratch " \
           "(clear: their 95% CIs do not overlap)" in text
    assert "- Age, ResNet-18: MD-MoCo scores best, MAE 9.25, 5.25 lower than Scratch." in text
    assert "In words, linear probe (frozen backbone), 10% of the training labels" in text
    assert (out / "roc_pneumonia_r18_linear_10pct.png").is_file()


def test_a_run_of_the_papers_tasks_at_10pct_only_gets_no_empty_tables_of_all_labels(tmp_path):
    """The demo's layout: the paper's tasks fine-tuned on 10 % of the labels, a task of the
    user's on all of them. The paper's grid is reported at 10 % (its tables and its missing
    results), not as empty tables of all the labels."""
    scarce = cls_result("pneumonia", "r18", "scratch", 0.6)
    scarce.update(train_fraction=0.1)
    write_result(tmp_path, scarce, "pneumonia_r18_scratch_10pct")
    test = {"acc": 0.5, "auc": 0.7, "auc_ci": [0.6, 0.8], "n": 30,
            **{f"{m}_{c}": 0.5 for c in ("none", "mild", "severe") for m in ("sen", "spe")}}
    write_result(tmp_path, own_result("knee", "classification", ["none", "mild", "severe"],
                                      "scratch", test))
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert report.main([str(tmp_path)]) == 0
    text = stdout.getvalue()
    out = tmp_path / "report"
    assert sorted(p.stem for p in out.glob("table*.md")) == ["table2_10pct", "table_knee"]
    assert "(no results)" not in text and "Missing 39 of 40 results (10% of the training " \
        "labels): pneumonia r18: imagenet, mdmoco, muscle--, muscle; " in text
    assert text.count("Missing ") == 1
    write_result(tmp_path, PNEU_R18_SCRATCH)  # and one of all the labels: both grids reported
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert report.main([str(tmp_path)]) == 0
    assert sorted(p.stem for p in out.glob("table*.md")) == [
        "table2", "table2_10pct", "table3", "table_knee"]
    assert "Missing 39 of 40 results: " in stdout.getvalue()


def test_a_result_of_an_unknown_task_without_its_definition_is_rejected(tmp_path):
    write_result(tmp_path, PNEU_R18_SCRATCH)
    bad = own_result("knee", "classification", ["a", "b", "c"], "scratch", {"acc": 0.5})
    del bad["kind"]
    path = write_result(tmp_path, bad)
    results, rejects = report.collect(tmp_path)
    assert [r.run.task for r in results] == ["pneumonia"]
    assert rejects == [(path, "unknown task 'knee' without a known 'kind' (None)")]
