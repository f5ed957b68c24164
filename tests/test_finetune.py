"""The fine-tune stage: the grid, finding each init's weights, training with model selection on
the valid split, test metrics in results.json, resume after a signal, and the report built from
real results."""

import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torchvision
from conftest import (
    ROOT,
    assert_same_model,
    benchmark_models,
    finish_ranks,
    run_ranks,
    start_ranks,
    stopped_at_step,
)

from muscle_hpc import checkpoint, config, registry
from muscle_hpc.models.backbone import build_backbone, export_torchvision, load_imagenet_into
from muscle_hpc.stages import finetune
from muscle_hpc.tblog import read_scalars


def ft_args(shards, root, task, init="scratch", *extra):
    return ["--config", str(ROOT / "configs/finetune_demo.yaml"), "--task", task, "--init", init,
            "--backbone", "r18", f"data.root={shards}", f"run.root={root}",
            "run.max_steps_per_epoch=2", "run.log_every_steps=1", "data.num_workers=1",
            f"tasks.{task}.epochs=3", f"tasks.{task}.batch_size=4", "eval.bootstrap=20",
            "eval.samples=3", *extra]


def save_backbone(path, arch="resnet18"):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(export_torchvision(build_backbone(arch)), path)
    return path


def paper_grid():
    return [(sel.task, sel.init, sel.backbone)
            for sel in finetune.grid(finetune.load(finetune.DEFAULT_CONFIG, []))]


def test_grid_covers_every_task_init_backbone_once(capsys):
    grid = paper_grid()
    assert len(grid) == 40 == len(set(grid))
    assert set(grid) == set(itertools.product(registry.TASK_NAMES, registry.INIT_NAMES,
                                              registry.BACKBONE_NAMES))
    assert finetune.main(["--list"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert [tuple(line.split()[1:4]) for line in lines] == grid
    assert [int(line.split()[0]) for line in lines] == list(range(40))


def test_protocols_and_fractions_are_axes_of_the_grid(capsys):
    axes = ["grid.tasks=[mura,lung]", "grid.inits=[scratch,mdmoco]", "grid.backbones=[r18,r50]",
            "grid.protocols=[finetune,linear]", "grid.fractions=[0.01,0.1,1]"]
    grid = finetune.grid(finetune.load(None, axes))
    assert len(grid) == len(set(grid)) == 2 * 2 * 2 * 2 * 3
    assert grid[0] == registry.FinetuneRun("mura", "scratch", "r18", "finetune", 0.01)
    assert grid[len(grid) // 2].backbone == "r50"  # backbone-major: one array range each
    assert len({sel.name for sel in grid}) == len(grid)  # each its own run directory
    run = registry.FinetuneRun("mura", "mdmoco", "r18", "linear", 0.1)
    assert run.name == "mura_r18_mdmoco_linear_10pct"
    assert run.argv() == ["--task", "mura", "--init", "mdmoco", "--backbone", "r18",
                          "--protocol", "linear", "--fraction", "0.1"]
    assert finetune.main(["--list", *axes]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == ["# r18: --array=0-23", "# r50: --array=24-47"]
    assert out[3].split() == ["3", "lung", "mdmoco", "r18", "finetune", "0.01"]


def test_a_list_cut_short_by_its_reader_is_no_traceback():
    """``--list | head -1`` ended in a BrokenPipeError traceback."""
    import subprocess
    import sys

    fractions = ",".join(f"{k / 50:g}" for k in range(1, 51))  # 2,000 lines: > a pipe's 64 KiB
    done = subprocess.run(["bash", "-c", f"'{sys.executable}' -m muscle_hpc.stages.finetune "
                           f"--list grid.fractions=[{fractions}] | head -1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["0", "pneumonia", "scratch", "r18", "finetune", "0.02"]
    assert done.stderr == ""


@pytest.mark.parametrize("argv, says", [
    (["--grid-index", "40"], "--grid-index: 40 is not in 0-39"),
    (["--grid-index", "3", "--task", "lung"], "do not also give"),
    (["--task", "lung", "--init", "scratch"], "give --task, --init and --backbone"),
])
def test_a_bad_selection_is_one_line(argv, says, capsys):
    assert finetune.main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1


def test_grid_index_selects_its_element_and_finds_the_earlier_stages_backbone(
        task_shards, tmp_path, capsys):
    index = paper_grid().index(("mura", "muscle--", "r18"))
    args = ["--grid-index", str(index), "--check", f"data.root={task_shards}",
            f"run.root={tmp_path}"]
    assert finetune.main(args) == 2
    assert "run the continual stage with cl.method=muscle-- first" in capsys.readouterr().err
    weights = save_backbone(tmp_path / "continual_r18_muscle--" / "backbone_torchvision.pth")
    assert finetune.main(args) == 0
    out = capsys.readouterr().out
    assert f"index {index}: task mura, init muscle-- ({weights})" in out
    assert f"output {tmp_path / 'finetune' / 'mura_r18_muscle--'}" in out


def test_a_backbone_of_the_other_arch_is_refused(task_shards, tmp_path, capsys):
    save_backbone(tmp_path / "mdmoco_r18" / "backbone_torchvision.pth", "resnet50")
    args = ["--task", "lung", "--init", "mdmoco", "--backbone", "r18", "--check",
            f"data.root={task_shards}", f"run.root={tmp_path}"]
    assert finetune.main(args) == 2
    assert "is not a resnet18 backbone" in capsys.readouterr().err


def test_imagenet_weights_come_from_the_torch_hub_cache_or_say_where_to_put_them(
        task_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    args = ["--task", "pneumonia", "--init", "imagenet", "--backbone", "r18", "--check",
            f"data.root={task_shards}", f"run.root={tmp_path}"]
    assert finetune.main(args) == 2
    err = capsys.readouterr().err
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert "put resnet18-f37072fd.pth (from https://download.pytorch.org/models/" in err
    assert str(cache) in err and err.count("\n") == 1
    cache.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cache / "resnet18-f37072fd.pth")
    assert finetune.main(args) == 0
    assert f"init imagenet ({cache / 'resnet18-f37072fd.pth'})" in capsys.readouterr().out
    own = save_backbone(tmp_path / "elsewhere.pth")
    assert finetune.main([*args, f"pretrained.imagenet={own}"]) == 0
    assert f"init imagenet ({own})" in capsys.readouterr().out


@pytest.mark.parametrize("extra, says", [
    (["tasks.lung.epochs=0"], "tasks.lung.epochs: must be >= 1"),
    (["run.zero_stage=3"], "ZeRO stage 3 is not supported"),
    (["tasks.lung.batch_size=1"], "a global batch of 1; batch norm needs at least 2 images"),
    (["pretrained.mdmoco={root}/{arch}.pth"], "has a placeholder other than"),
    (["--fraction", "0.1"], "--fraction: 0.1 of the 24 lung training images is "),
    (["--fraction", "0"], "--fraction: must be in (0, 1], got 0.0"),
    (["tasks.lung.kind=detection"], "tasks.lung.headline: 'dice' is not one of its metrics"),
    (["tasks.lung.classes=[lung]"], "tasks.lung.classes: a segmentation task needs at least 2"),
])
def test_bad_config_fails_in_one_line(task_shards, tmp_path, capsys, extra, says):
    args = ["--task", "lung", "--init", "mdmoco", "--backbone", "r18", "--check",
            f"data.root={task_shards}", f"run.root={tmp_path}", *extra]
    assert finetune.main(args) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def finetuned(task_shards, tmp_path_factory):
    """Three fine-tunes of the tiny data (pneumonia from MD-MoCo weights, lung and tbx from
    scratch), 3 epochs of 2 steps each, one rank, in one run root."""
    root = tmp_path_factory.mktemp("ft")
    save_backbone(root / "mdmoco_r18" / "backbone_torchvision.pth")
    for task, init in (("pneumonia", "mdmoco"), ("lung", "scratch"), ("tbx", "scratch")):
        run_ranks("finetune", 1, ft_args(task_shards, root, task, init))
    return root


def results(root, name):
    return json.loads((root / "finetune" / name / "results.json").read_text())


def test_classification_results_hold_test_metrics_cis_and_roc(finetuned, task_shards):
    r = results(finetuned, "pneumonia_r18_mdmoco")
    assert (r["task"], r["init"], r["backbone"], r["arch"]) == ("pneumonia", "mdmoco", "r18",
                                                               "resnet18")
    assert r["train_fraction"] == 1.0  # which label budget a result came from
    assert r["init_weights"] == str(finetuned / "mdmoco_r18" / "backbone_torchvision.pth")
    test = r["test"]
    manifest = json.loads((task_shards / "pneumonia" / "manifest.json").read_text())
    assert test["n"] == manifest["splits"]["test"]["count"]
    for m in ("acc", "sen", "spe", "auc"):
        assert 0 <= test[m] <= 1 or math.isnan(test[m])
        lo, hi = test[f"{m}_ci"]
        assert (lo <= test[m] <= hi) or math.isnan(lo)
    assert test["ci_resamples"] == 20
    assert len(r["roc"]["fpr"]) == len(r["roc"]["tpr"])
    if len(manifest["splits"]["test"]["label_counts"]) == 2:
        assert r["roc"]["fpr"][0] == 0.0 and r["roc"]["tpr"][-1] == 1.0
    else:  # the tiny data's 4 test images are all pneumonia: no ROC, no AUC, no crash
        assert r["roc"]["fpr"] == [] and math.isnan(test["auc"])


def test_the_best_valid_epoch_is_the_one_tested(finetuned):
    for name in ("pneumonia_r18_mdmoco", "lung_r18_scratch", "tbx_r18_scratch"):
        r = results(finetuned, name)
        scores = [h[r["selected_by"]] for h in r["history"]]
        assert [h["epoch"] for h in r["history"]] == [0, 1, 2]
        best = None
        for epoch, s in enumerate(scores):  # first maximum; a number beats NaN
            if best is None or (not math.isnan(s) and (math.isnan(scores[best]) or
                                                       s > scores[best])):
                best = epoch
        assert r["best_epoch"] == best
        assert r["valid"][r["selected_by"]] == scores[best] or math.isnan(scores[best])
        run = finetuned / "finetune" / name
        final = checkpoint.load(run / "checkpoint.pth")
        assert final["step"] == 6 and len(final["history"]) == 3
        assert set(checkpoint.load(run / "best.pth")) == set(final["model"])


def test_bench_stages_times_the_model_each_fine_tune_trained(finetuned):
    runs = {"pneumonia": "pneumonia_r18_mdmoco", "lung": "lung_r18_scratch",
            "tbx": "tbx_r18_scratch"}
    bench_models = benchmark_models(*[("finetune", task) for task in runs])
    for name, bench_model in zip(runs.values(), bench_models):
        trained = checkpoint.load(finetuned / "finetune" / name / "checkpoint.pth")["model"]
        assert_same_model(trained, bench_model)


def test_segmentation_and_detection_results_and_overlay_samples(finetuned):
    lung = results(finetuned, "lung_r18_scratch")
    assert set(lung["test"]) == {"dice", "miou", "n"}
    import numpy as np

    samples = np.load(finetuned / "finetune" / "lung_r18_scratch" / "samples.npz")
    assert samples["images"].shape == samples["masks"].shape == samples["preds"].shape
    kept = min(3, lung["test"]["n"])  # eval.samples=3
    assert samples["images"].shape == (kept, 80, 128) and samples["masks"].max() == 1
    tbx = results(finetuned, "tbx_r18_scratch")
    assert set(tbx["test"]) == {"map", "ap_active", "ap_latent", "n"}


def test_train_valid_and_test_scalars_reach_tensorboard(finetuned):
    scalars = read_scalars(finetuned / "finetune" / "pneumonia_r18_mdmoco" / "tb")
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 7))
    assert [s for s, _ in scalars["valid/auc"]] == [2, 4, 6]
    test_acc = results(finetuned, "pneumonia_r18_mdmoco")["test"]["acc"]
    assert scalars["test/acc"][0][1] == pytest.approx(test_acc)


def test_the_report_puts_each_result_in_its_cell(finetuned):
    from muscle_hpc import report

    assert report.main([str(finetuned)]) == 0
    rows = {(r["backbone"], r["init"]): r
            for r in csv.DictReader(open(finetuned / "report" / "table3.csv"))}
    lung, tbx = results(finetuned, "lung_r18_scratch"), results(finetuned, "tbx_r18_scratch")
    assert float(rows["r18", "scratch"]["lung_dice"]) == lung["test"]["dice"]
    assert float(rows["r18", "scratch"]["tbx_map"]) == tbx["test"]["map"] or \
        math.isnan(tbx["test"]["map"])
    t2 = {(r["backbone"], r["init"]): r
          for r in csv.DictReader(open(finetuned / "report" / "table2.csv"))}
    pneu = results(finetuned, "pneumonia_r18_mdmoco")["test"]
    assert float(t2["r18", "mdmoco"]["pneumonia_acc"]) == pneu["acc"]
    assert (finetuned / "report" / "overlay_lung_r18_scratch.png").is_file()


def test_stopped_by_signal_then_resumed_equals_an_uninterrupted_run(task_shards, tmp_path):
    extra = ("tasks.mura.epochs=3", "run.max_steps_per_epoch=3", "run.checkpoint_every_steps=100")
    whole = tmp_path / "whole"
    codes, outs = finish_ranks(start_ranks("finetune", 1, ft_args(task_shards, whole, "mura",
                                                                  "scratch", *extra)))
    assert codes == [0], outs[0][-2000:]

    cut = tmp_path / "cut"
    args = ft_args(task_shards, cut, "mura", "scratch", *extra)
    stopped = stopped_at_step("finetune", args, 4)  # in epoch 1 (steps 4-6 of 9)
    codes, outs = finish_ranks(start_ranks("finetune", 1, args))
    assert codes == [0], outs[0][-2000:]
    assert f"resuming at step {stopped}" in outs[0]

    a = checkpoint.load(whole / "finetune" / "mura_r18_scratch" / "checkpoint.pth")
    b = checkpoint.load(cut / "finetune" / "mura_r18_scratch" / "checkpoint.pth")
    assert a["history"] == b["history"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ra, rb = results(whole, "mura_r18_scratch"), results(cut, "mura_r18_scratch")
    assert ra["test"] == rb["test"] and ra["best_epoch"] == rb["best_epoch"]

    # Going on from that checkpoint with epochs of another length is refused in one line.
    codes, outs = finish_ranks(start_ranks("finetune", 1, [*args, "run.max_steps_per_epoch=2"]))
    assert codes == [2], outs[0][-2000:]
    assert "checkpoint.pth: per_epoch was 3, is 2 now (the shards or a step limit changed)" \
        in outs[0] and "Traceback" not in outs[0]


# --- linear probe and label fractions ------------------------------------------------------


def test_a_linear_probe_trains_the_head_and_leaves_every_backbone_tensor_bit_identical(
        task_shards, tmp_path):
    weights = save_backbone(tmp_path / "mdmoco_r18" / "backbone_torchvision.pth")
    out = run_ranks("finetune", 2, [*ft_args(task_shards, tmp_path, "mura", "mdmoco"),
                                    "--protocol", "linear", "run.checkpoint_every_steps=1"])
    assert "linear probe" in out
    run_dir = tmp_path / "finetune" / "mura_r18_mdmoco_linear"
    start = build_backbone("resnet18")
    load_imagenet_into(start, torch.load(weights, weights_only=True))  # 1-channel conv1
    init = start.state_dict()
    for name in ("checkpoint.pth", "best.pth"):
        state = checkpoint.load(run_dir / name)
        state = state.get("model", state)
        trunk = {k.removeprefix("backbone."): v for k, v in state.items()
                 if k.startswith("backbone.")}
        assert set(trunk) == set(init) - {"fc.weight", "fc.bias"}
        for k, v in trunk.items():  # weights, BN statistics and num_batches_tracked alike
            assert torch.equal(v, init[k]), (name, k)
    before = finetune_head(tmp_path, "mura")
    after = {k: v for k, v in checkpoint.load(run_dir / "checkpoint.pth")["model"].items()
             if k.startswith("heads.")}
    assert set(after) == set(before)
    assert any(not torch.equal(after[k], before[k]) for k in after)  # the head did learn
    r = results(tmp_path, "mura_r18_mdmoco_linear")
    assert r["protocol"] == "linear" and r["train_fraction"] == 1.0


def finetune_head(tmp_path, task):
    """The head the stage starts from (its seed makes it the same in every run)."""
    torch.manual_seed(0)
    from muscle_hpc.models.heads import MultiTaskNet, trunk_channels
    from muscle_hpc.tasks import PAPER_TASKS

    trunk = build_backbone("resnet18")
    net = MultiTaskNet(trunk, {task: PAPER_TASKS[task].head(trunk_channels("resnet18"),
                                                      config.FinetuneConfig().model)})
    return {k: v for k, v in net.state_dict().items() if k.startswith("heads.")}


def test_label_fractions_are_patient_grouped_nested_and_the_same_for_every_init():
    from muscle_hpc.data.loaders import subset

    groups = np.repeat(np.arange(40), np.random.default_rng(1).integers(1, 6, 40))
    n = len(groups)
    small, medium, whole = (set(subset(n, f, seed=3, groups=groups)) for f in (0.01, 0.1, 1.0))
    assert small <= medium <= whole == set(range(n))
    assert len(medium) >= 0.1 * n
    for part in (small, medium):  # whole patients only
        kept = set(groups[sorted(part)])
        assert part == {i for i in range(n) if groups[i] in kept}
    assert list(subset(n, 0.1, 3, groups)) == list(subset(n, 0.1, 3, groups.copy()))
    assert set(subset(n, 0.1, 4, groups)) != medium  # the seed draws it


def test_a_fraction_trains_every_init_on_the_same_images(task_shards, tmp_path, capsys):
    from muscle_hpc.data.loaders import train_subset
    from muscle_hpc.data.shards import open_shard

    save_backbone(tmp_path / "mdmoco_r18" / "backbone_torchvision.pth")
    shard = open_shard(task_shards, "mura", "train")
    expected = len(train_subset(shard, 0.5, 0))
    assert expected < shard.count
    for init in ("scratch", "mdmoco"):
        assert finetune.main([*ft_args(task_shards, tmp_path, "mura", init), "--fraction", "0.5",
                              "--check"]) == 0
        said = capsys.readouterr().out
        assert f"fraction 0.5 ({expected} training images)" in said
        assert f"output {tmp_path / 'finetune' / f'mura_r18_{init}_50pct'}" in said
    # and what a run records: the images it trained on
    run_ranks("finetune", 1, [*ft_args(task_shards, tmp_path, "mura", "scratch"),
                              "--fraction", "0.5", "tasks.mura.epochs=1"])
    r = results(tmp_path, "mura_r18_scratch_50pct")
    assert (r["train_fraction"], r["train_images"]) == (0.5, expected)


def test_the_launcher_submits_the_protocol_and_fraction_of_each_grid_element():
    from muscle_hpc import launch

    overrides = ["grid.tasks=[lung]", "grid.inits=[scratch]", "grid.backbones=[r18]",
                 "grid.protocols=[finetune,linear]", "grid.fractions=[0.25,1]",
                 "data.synthetic=8", "run.allow_cpu=true"]
    args = launch.parse_args(["--stage", "finetune", "--config", str(finetune.DEFAULT_CONFIG),
                              *overrides])
    argvs = launch.finetune_argvs(args, args.config, overrides, 1, False, ["r18"])
    chosen = [(a[a.index("--protocol") + 1], a[a.index("--fraction") + 1]) for a in argvs]
    assert chosen == [("finetune", "0.25"), ("finetune", "1.0"), ("linear", "0.25"),
                      ("linear", "1.0")]
    # each argv selects its own element again
    for argv, sel in zip(argvs, finetune.grid(finetune.load(args.config, overrides))):
        parsed = finetune.parse_args(argv)
        assert finetune.selection(parsed, finetune.load(parsed.config, parsed.overrides)) == sel
