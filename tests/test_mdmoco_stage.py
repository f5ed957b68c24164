"""The MD-MoCo stage end to end: real DeepSpeed, real gloo ranks, real signals, real event files.

Ranks are started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_* in the environment),
one thread each, on shards of flat gray images at 40x24 so a step takes milliseconds.
"""

import signal
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import assert_same_model, benchmark_models, run_ranks, start_ranks
from conftest import finish_ranks as finish
from conftest import moco_overrides as overrides

from muscle_hpc import config, export
from muscle_hpc.data import pretrain_shards
from muscle_hpc.models.build import build_moco
from muscle_hpc.stages import mdmoco
from muscle_hpc.tblog import read_image_tags, read_scalars

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "mdmoco_demo.yaml"


@pytest.fixture
def shards(moco_shards):
    return moco_shards


def start(world, args, port=None):
    return start_ranks("mdmoco", world, ["--config", str(DEMO), *args], port)


def run(world, args):
    return run_ranks("mdmoco", world, ["--config", str(DEMO), *args])


def final_state(run_dir):
    return torch.load(run_dir / "checkpoint.pth", weights_only=True)


def assert_bit_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stop_by_signal_then_resume_equals_uninterrupted_run(shards, tmp_path):
    world, args = 2, ["run.zero_stage=2"]  # ZeRO 2: each rank checkpoints its own partition
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    run(world, overrides(shards, ref_dir, *args))
    ref = final_state(ref_dir)
    total = ref["step"]
    assert total == 6 * ref["steps_per_epoch"]

    procs = start(world, overrides(shards, cut_dir, *args))
    victim = procs[-1]  # the signal reaches one rank only; all must stop after the same step
    for line in procs[0].stdout:
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 5:
            victim.send_signal(signal.SIGTERM)
            break
    codes, outs = finish(procs)
    assert codes == [128 + signal.SIGTERM] * world, outs
    cut = final_state(cut_dir)
    assert 5 <= cut["step"] < total  # it really stopped early, at a step boundary
    assert not (cut_dir / "backbone_torchvision.pth").exists()

    out = run(world, overrides(shards, cut_dir, *args))
    assert f"resuming at step {cut['step']}" in out
    resumed = final_state(cut_dir)
    assert resumed["step"] == total
    assert_bit_equal(resumed["model"], ref["model"])  # both encoders, queue and pointer
    ckpt_files = sorted((cut_dir / "checkpoint").iterdir())
    assert [f.name for f in ckpt_files] == [f"step{total:09d}-rank{r}.pth" for r in range(world)]


def test_one_rank_resume_tensorboard_and_exported_backbone(shards, tmp_path, stage_error):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    run(1, overrides(shards, ref_dir, "optim.epochs=2"))
    run(1, overrides(shards, cut_dir, "optim.epochs=2", "run.max_steps=5"))
    assert final_state(cut_dir)["step"] == 5
    run(1, overrides(shards, cut_dir, "optim.epochs=2"))
    ref, resumed = final_state(ref_dir), final_state(cut_dir)
    assert resumed["step"] == ref["step"] == 8  # 34 images, batches of 8
    assert_bit_equal(resumed["model"], ref["model"])  # ZeRO 0: optimizer in checkpoint.pth
    # The shortcut monitor's key histograms resume with the run: the same queue, the same curve.
    assert torch.equal(resumed["shortcut"]["queue"], ref["shortcut"]["queue"])
    # bench.stages times this model (the default config's, at K 65536): the same modules.
    bench_model, = benchmark_models(("mdmoco", None))
    assert_same_model(ref["model"], bench_model, skip=("queue",))

    scalars = read_scalars(cut_dir / "tb")
    assert scalars["monitor/shortcut_top1"] == read_scalars(ref_dir / "tb")["monitor/shortcut_top1"]
    for tag in ("loss", "lr", "top1", "images_per_s", "data_wait", "grad_norm", "epoch"):
        steps = [s for s, _ in scalars[f"train/{tag}"]]
        assert steps == list(range(1, 9)), tag  # one curve across the resume, no step twice
    lrs = [v for _, v in scalars["train/lr"]]
    assert lrs[0] == pytest.approx(0.03 * 8 / 256) and lrs == sorted(lrs, reverse=True)
    assert all(0 <= v <= 1 for _, v in scalars["train/data_wait"])
    assert all(v > 0 for _, v in scalars["train/grad_norm"])
    assert read_image_tags(cut_dir / "tb") == ["train/views_query_top_key_bottom"]

    backbone = torchvision.models.resnet18()
    written = torch.load(cut_dir / "backbone_torchvision.pth", weights_only=True)
    backbone.load_state_dict(written)  # strict
    assert torch.equal(backbone.layer4[1].conv2.weight,
                       resumed["model"]["encoder_q.layer4.1.conv2.weight"])
    # The export command gives the same trunk from the checkpoint (fc is a fresh layer).
    assert export.main([str(cut_dir), "--out", str(tmp_path / "b.pth")]) == 0
    exported = torch.load(tmp_path / "b.pth", weights_only=True)
    assert_bit_equal({k: v for k, v in exported.items() if not k.startswith("fc.")},
                     {k: v for k, v in written.items() if not k.startswith("fc.")})
    assert export.main([str(ref_dir / "tb"), "--out", str(tmp_path / "c.pth")]) == 2

    # Resuming with another experiment's settings or world size is refused.
    base = ["--config", str(DEMO), *overrides(shards, cut_dir, "optim.epochs=2")]
    assert "written with another config (model.T: 0.2 -> 0.1)" in stage_error(*base, "model.T=0.1")
    assert "written by 1 ranks; resume it with 1, not 2" in stage_error(*base, world=2)


@pytest.fixture
def stage_error(monkeypatch, capsys):
    """The stage's one-line error for ``args`` (run in this process: nothing may start)."""
    def error(*args, world=1):
        for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
            monkeypatch.delenv(k, raising=False)
        if world > 1:
            monkeypatch.setenv("SLURM_PROCID", "0")
            monkeypatch.setenv("SLURM_NTASKS", str(world))
            monkeypatch.setenv("SLURM_JOB_NODELIST", "localhost")
        capsys.readouterr()
        assert mdmoco.main(list(args)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]
    return error


def test_bad_configs_fail_in_one_line_before_training(shards, tmp_path, stage_error):
    base = ["--config", str(DEMO), *overrides(shards, tmp_path / "run")]
    assert "model.K: queue size 20 is not a multiple of the global batch 8" in \
        stage_error(*base, "model.K=20")
    assert stage_error(*base, "model.kk=4") == \
        "mdmoco: error: model.kk: unknown key (did you mean model.K?)"
    assert "mura: no manifest.json" in stage_error(*base, "data.datasets=nih,mura")
    assert "not divisible by the world size 3" in stage_error(*base, world=3)
    assert "do not fill one batch" in stage_error(*base, "data.batch_size=64", "model.K=64")
    assert "run.precision: fp16 is not supported" in stage_error(*base, "run.precision=fp16")
    assert "run.zero_stage: ZeRO stage 3 is not supported" in stage_error(*base, "run.zero_stage=3")
    assert "model.bn_groups: 8 groups over 1 rank(s) are 8 per rank, which do not cut the 8 " \
        "images" in stage_error(*base, "model.bn_groups=8")
    if not torch.cuda.is_available():
        assert "model.bn: sync needs GPUs" in stage_error(*base, "model.bn=sync",
                                                          "model.bn_groups=1")
    assert not (tmp_path / "run").exists()  # nothing was trained, nothing written


def test_bf16_is_autocast_with_fp32_weights(shards, tmp_path):
    """bf16 runs (on CPU too) with fp32 weights: the key encoder's momentum update of
    (1 - m) = 0.1 % of a weight would vanish in bf16's 8-bit mantissa."""
    args = overrides(shards, tmp_path, "optim.epochs=1", "run.precision=bf16", "model.m=0.999")
    run(1, args)
    model = final_state(tmp_path)["model"]
    assert {v.dtype for k, v in model.items() if v.is_floating_point()} == {torch.float32}
    torch.manual_seed(0)  # the stage's initialisation (run.seed 0)
    init = build_moco(config.load_config(DEMO, args).model).state_dict()
    key = "encoder_k.layer1.0.conv1.weight"
    assert not torch.equal(model[key], init[key])  # the key encoder moved
    q, k = model[key.replace("encoder_k", "encoder_q")], model[key]
    assert (k - init[key]).abs().max() < (q - init[key]).abs().max()  # slower than the query


def test_pretraining_reads_the_training_sets_and_extra_only_when_asked(task_shards, tmp_path):
    """Table 1's images are the training sets; TBX11K's images of no task (its ``extra``
    shard) join only with data.pretrain_extra, which the stage then says."""
    shards = pretrain_shards(task_shards, ["tbx11k", "mura"])
    assert [(s.dataset, s.split) for s in shards] == [("tbx11k", "train"), ("mura", "train")]
    with_extra = pretrain_shards(task_shards, ["tbx11k", "mura"], extra=True)
    extra = [s for s in with_extra if s.split == "extra"]
    assert [s.dataset for s in extra] == ["tbx11k"] and extra[0].count > 0

    args = [f"data.root={task_shards}", "data.datasets=tbx11k,mura", "data.batch_size=4",
            "model.K=16", "model.bn_groups=2", "run.max_steps=1", "run.log_every_steps=1"]
    out = run(1, [*args, f"run.dir={tmp_path / 'train'}"])
    assert "pretrain_extra" not in out
    steps = final_state(tmp_path / "train")["steps_per_epoch"]
    assert steps == sum(s.count for s in shards) // 4
    out = run(1, [*args, "data.pretrain_extra=true", f"run.dir={tmp_path / 'extra'}"])
    assert (f"mdmoco: data.pretrain_extra is on: also {extra[0].count} images of no task "
            f"(tbx11k {extra[0].count})") in out
    assert final_state(tmp_path / "extra")["steps_per_epoch"] == \
        sum(s.count for s in with_extra) // 4


def test_a_resume_at_another_zero_stage_is_refused_in_one_line(tmp_path, stage_error):
    """Started at ZeRO 0 and resumed at ZeRO 1, the checkpoint holds no optimizer state
    where ZeRO looks for it: one line before anything starts, the checkpoint untouched."""
    args = ["--config", str(DEMO), "data.synthetic=16", "data.batch_size=4", "model.K=16",
            "model.bn_groups=2", "run.monitor_every_steps=0", f"run.dir={tmp_path}"]
    run_ranks("mdmoco", 1, [*args, "run.max_steps=1"])  # the demo's run.zero_stage=0
    assert stage_error(*args, "run.max_steps=2", "run.zero_stage=1") == (
        f"mdmoco: error: run.zero_stage: {tmp_path / 'checkpoint.pth'} was written with "
        f"run.zero_stage=0, not 1: ZeRO 1 and 2 save the optimizer state split over the "
        f"ranks, stage 0 whole, so neither resumes the other; resume with run.zero_stage=0, or "
        f"use a new run.dir")
    assert final_state(tmp_path)["step"] == 1
