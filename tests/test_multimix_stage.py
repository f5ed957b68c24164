"""The MultiMix stage end to end on the tiny demo sets: the labels of unlabelled images never
reach a loss (their labels corrupted in the shards, the weights bit-identical; the same
corruption of labelled images changes them), results in the fine-tune schema per task, exact
resume after a signal, and 2 gloo ranks equal 1 on the same global batch."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import ROOT, run_ranks, stopped_at_step
from PIL import Image

from data_prep import convert, synth
from data_prep.datasets import get_spec
from data_prep.datasets.base import Scan, relpath
from muscle_hpc import checkpoint, weights
from muscle_hpc.data import open_shard, semi
from muscle_hpc.tblog import read_scalars

RUN = "multimix/pneumonia+lung_r18_scratch_50pct"


def mm_args(shards, root, *extra):
    return ["--config", str(ROOT / "configs/multimix_demo.yaml"), "--init", "scratch",
            "--backbone", "r18", "--fraction", "0.5", f"data.root={shards}", f"run.root={root}",
            "run.log_every_steps=1", "eval.bootstrap=10", *extra]


def converted(downloads, out, name, change=None):
    """``name`` converted from ``downloads`` into ``out``, each scanned record passed through
    ``change`` first (the shard otherwise the same: same images, same order)."""
    spec = get_spec(name)
    folder = convert.find_dataset_folder(spec, downloads)
    if change is not None:
        clean = spec.scan(folder)
        spec = dataclasses.replace(spec, scan=lambda root: Scan(
            [change(r) for r in clean.records], list(clean.rejects)))
    convert.convert_dataset(spec, folder, out, size=(128, 80), log=lambda *_: 0)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("mm")
    synth.generate(base / "downloads", "tiny")
    for name in ("pneumonia", "chestmasks"):
        converted(base / "downloads", base / "clean", name)
    return base


def labelled_groups(sources, name) -> set[str]:
    """The patients whose labels a fraction of 0.5 keeps, by name (the shard stores each
    sample's index in the sorted list of the packed records' patients)."""
    spec = get_spec(name)
    folder = convert.find_dataset_folder(spec, sources / "downloads")
    manifest = json.loads((sources / "clean" / name / "manifest.json").read_text())
    rejected = {r["path"] for r in manifest["rejects"]}
    packed = sorted({r.group for r in spec.scan(folder).records
                     if relpath(folder, r.image) not in rejected})
    train = open_shard(sources / "clean", name, "train")
    ids = train.groups()[semi.labelled_indices(train, 0.5, 0)]
    return {packed[i] for i in np.unique(ids)}


def corrupt(sources, out, which: str):
    """Shards whose pneumonia labels are flipped and lung masks replaced by a full mask, for
    the images of ``which`` patients: ``unlabelled`` (outside the labelled subset) or
    ``labelled`` (the control)."""
    full = sources / "full_mask.png"
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(full)
    for name in ("pneumonia", "chestmasks"):
        keep = labelled_groups(sources, name)

        def change(r, keep=keep, name=name):
            if (r.group in keep) == (which == "unlabelled"):
                return r
            if name == "pneumonia":
                return dataclasses.replace(r, label=1 - r.label)
            return dataclasses.replace(r, masks=(full,))

        converted(sources / "downloads", out, name, change)
    return out


# One step, dropout off: what the 2-rank comparison needs; enough for a label to matter.
ONE_STEP = ("optim.epochs=1", "run.max_steps_per_epoch=1", "multimix.dropout=0")


def one_step(shards, root, world=1):
    run_ranks("multimix", world, mm_args(shards, root, *ONE_STEP))
    return root / RUN


@pytest.fixture(scope="module")
def clean_step(sources, tmp_path_factory):
    return one_step(sources / "clean", tmp_path_factory.mktemp("clean"))


def weights_of(run_dir):
    return checkpoint.load(run_dir / "checkpoint.pth")["model"]


def test_the_labels_of_unlabelled_images_never_reach_a_loss(sources, clean_step, tmp_path):
    clean = weights_of(clean_step)
    shards = corrupt(sources, tmp_path / "unl", "unlabelled")
    # The corruption is there: every unlabelled training label flipped, no labelled one.
    before = open_shard(sources / "clean", "pneumonia", "train")
    after = open_shard(shards, "pneumonia", "train")
    flipped = before.scalar_values("label") != after.scalar_values("label")
    unlabelled = np.setdiff1d(np.arange(before.count), semi.labelled_indices(before, 0.5, 0))
    assert flipped.sum() > 0 and np.array_equal(np.flatnonzero(flipped), unlabelled)
    changed = weights_of(one_step(shards, tmp_path / "b"))
    assert all(torch.equal(clean[k], changed[k]) for k in clean)
    # The control: the same corruption on labelled images is seen by the losses.
    control = weights_of(one_step(corrupt(sources, tmp_path / "lab", "labelled"),
                                  tmp_path / "c"))
    assert not all(torch.equal(clean[k], control[k]) for k in clean)


def test_results_per_task_in_the_fine_tune_schema_and_exact_resume(sources, tmp_path):
    extra = ("optim.epochs=2", "run.max_steps_per_epoch=3", "run.checkpoint_every_steps=100")
    whole = tmp_path / "whole"
    run_ranks("multimix", 1, mm_args(sources / "clean", whole, *extra))
    cut = tmp_path / "cut"
    args = mm_args(sources / "clean", cut, *extra)
    stopped = stopped_at_step("multimix", args, 4)  # in epoch 1 (steps 4-6)
    assert f"resuming at step {stopped}" in run_ranks("multimix", 1, args)

    a = checkpoint.load(whole / RUN / "checkpoint.pth")
    b = checkpoint.load(cut / RUN / "checkpoint.pth")
    assert a["history"] == b["history"] and len(a["history"]) == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for task, metrics in (("pneumonia", {"acc", "sen", "spe", "auc"}), ("lung", {"dice", "miou"})):
        ra = json.loads((whole / RUN / task / "results.json").read_text())
        rb = json.loads((cut / RUN / task / "results.json").read_text())
        assert ra["test"] == rb["test"] and metrics <= set(ra["test"])
        assert (ra["task"], ra["init"], ra["backbone"], ra["train_fraction"], ra["method"]) == \
            (task, "scratch", "r18", 0.5, "multimix")
    # The encoder is published as the other stages' are.
    found = weights.read(whole / RUN / "backbone_torchvision.safetensors")
    assert found.published.source["stage"] == "multimix"
    assert found.preprocessing == weights.Preprocessing(128, 80)


def test_two_gloo_ranks_equal_one_on_the_same_global_batch(sources, clean_step, tmp_path):
    """Dropout off (its masks are drawn per rank); batch norm over the global batch; every
    stream split between the ranks as the loaders split theirs, every view drawn by image.
    The step's loss terms are equal. Adam's first step moves every weight by +-lr (the sign
    of its gradient), so the few weights whose gradient is rounding noise may move the other
    way: all others must be equal."""
    two = one_step(sources / "clean", tmp_path, world=2)
    terms = [read_scalars(run / "tb") for run in (clean_step, two)]
    for tag in ("train/loss", "train/ce", "train/dice", "train/pseudo", "train/kl",
                "train/confident"):
        (s1, v1), = terms[0][tag]
        (s2, v2), = terms[1][tag]
        assert s1 == s2 == 1 and v1 == pytest.approx(v2, rel=1e-5), tag
    a, b = weights_of(clean_step), weights_of(two)
    diffs = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a
                       if a[k].is_floating_point()])
    assert diffs.max() <= 2 * 1e-4 + 1e-6
    assert (diffs > 1e-6).float().mean() < 1e-3
