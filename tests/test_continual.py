"""The continual-learning stage: visit order, eq. 1, eq. 2, frozen idle heads, exact resume,
and every head learning, on the four task sets of the tiny demo data at 128x80 (real FFCV
shards, real DeepSpeed, real gloo ranks, event files read back)."""

import json
import math
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torchvision
from conftest import assert_same_model, benchmark_models, finish_ranks, run_ranks, start_ranks

from muscle_hpc import config, dist, schedule
from muscle_hpc.engine import RollingCheckpoint
from muscle_hpc.regularizers import L2SP, omega
from muscle_hpc.stages import continual
from muscle_hpc.tblog import read_scalars

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "continual_demo.yaml"
TASKS = ["pneumonia", "mura", "lung", "tbx"]


def overrides(shards, run_dir, *extra):
    return ["--config", str(DEMO), f"data.root={shards}", "model.init=''", "run.log_every_steps=1",
            "run.checkpoint_every_steps=100", "cl.rounds=2", "run.visit_steps=4",
            f"run.dir={run_dir}", *extra]


def state(run_dir):
    return torch.load(run_dir / "checkpoint.pth", weights_only=True)


def anchors(run_dir, world) -> list:
    """Each rank's L2-SP anchor of the backbone group: under ZeRO 2 its flat fp32 shard, in
    the optimizer state of the rank's own checkpoint file."""
    out = []
    for rank in range(world):
        _, own = RollingCheckpoint(run_dir, rank, world).load()
        out.append(own["optimizer"]["base_optimizer_state"]["state"][0]["l2sp_anchor"])
    return out


def heads(model: dict, task: str) -> dict:
    return {k: v for k, v in model.items() if k.startswith(f"heads.{task}.")}


def assert_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- visit order ---------------------------------------------------------------------------

def test_each_round_is_a_fresh_permutation_and_muscle_minus_minus_keeps_the_order():
    orders = [schedule.visit_order(TASKS, r, seed=0) for r in range(10)]
    assert all(sorted(o) == sorted(TASKS) for o in orders)
    for a, b in zip(orders, orders[1:]):
        assert a != b and b[0] != a[-1]  # no round repeats the last, no task twice in a row
    assert len({tuple(o) for o in orders}) >= 5
    assert orders == [schedule.visit_order(TASKS, r, seed=0) for r in range(10)]
    assert orders != [schedule.visit_order(TASKS, r, seed=1) for r in range(10)]
    assert all(schedule.visit_order(TASKS, r, 0, reshuffle=False) == TASKS for r in range(10))


def _orders_on_rank(rank, port, out):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_distributed(backend="gloo", timeout_s=60)
    mine = [schedule.visit_order(TASKS, r, seed=3) for r in range(10)]
    Path(out, str(rank)).write_text(json.dumps(dist.gather_objects([mine])))
    dist.shutdown()


def test_two_gloo_ranks_draw_the_same_orders(tmp_path):
    mp.spawn(_orders_on_rank, args=(dist.free_port(), str(tmp_path)), nprocs=2, join=True)
    gathered = json.loads((tmp_path / "0").read_text())
    assert gathered[0] == gathered[1] == [schedule.visit_order(TASKS, r, 3) for r in range(10)]


# --- eq. 2 ---------------------------------------------------------------------------------

def _net_and_sgd(l2sp_weight_decay=0.0, momentum=0.9):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 2))
    sgd = torch.optim.SGD([{"params": list(net[0].parameters()), "role": "backbone",
                            "weight_decay": l2sp_weight_decay},
                           {"params": list(net[1].parameters()), "role": "head",
                            "weight_decay": 0.0}], lr=0.1, momentum=momentum)
    return net, sgd


def _task_loss(net, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)
    return torch.nn.functional.mse_loss(net(x), y)


def test_l2sp_adds_eq2s_gradient_to_the_backbone_group_only():
    """The step adds 2λ(α(w − w⁰) + (1 − α)w), by hand, to the backbone's gradient."""
    lam, alpha = 0.5, 0.3
    net, sgd = _net_and_sgd(momentum=0.0)
    reg = L2SP(sgd, alpha, lam)
    for g in sgd.param_groups:
        g["weight_decay"] = reg.weight_decay if g["role"] == "backbone" else 0.0
    reg.set_anchor()
    w0 = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    w = [p.detach().clone() for p in net.parameters()]
    _task_loss(net, 1).backward()
    g = [p.grad.clone() for p in net.parameters()]
    sgd.step()
    for i, p in enumerate(net.parameters()):
        eq2 = 2 * lam * (alpha * (w[i] - w0[i]) + (1 - alpha) * w[i]) if i < 2 else 0
        assert torch.allclose(p.detach(), w[i] - 0.1 * (g[i] + eq2), atol=1e-6), i

    parts = reg.parts()
    drift = sum(((a - b) ** 2).sum() for a, b in zip(list(net.parameters())[:2], w0[:2]))
    size = sum((a ** 2).sum() for a in list(net.parameters())[:2])
    assert parts["drift"] == pytest.approx(drift.sqrt().item(), rel=1e-6)
    assert parts["pull"] == pytest.approx(lam * alpha * drift.item(), rel=1e-6)
    assert parts["decay"] == pytest.approx(lam * (1 - alpha) * size.item(), rel=1e-6)


def test_l2sp_in_the_step_equals_eq2_through_autograd_with_momentum():
    """Three SGD steps with momentum: the decoupled term moves the weights exactly as
    back-propagating λΩ(w) (eq. 2, autograd) does; the anchor rides in the optimizer state."""
    lam, alpha = 0.05, 0.999
    ref, ref_sgd = _net_and_sgd()
    anchors = [p.detach().clone() for p in ref[0].parameters()]
    net, sgd = _net_and_sgd()
    reg = L2SP(sgd, alpha, lam)
    sgd.param_groups[0]["weight_decay"] = reg.weight_decay
    reg.set_anchor()
    for step in range(3):
        ref_sgd.zero_grad(), sgd.zero_grad()
        penalty = lam * omega(list(ref[0].parameters()), anchors, alpha)
        (_task_loss(ref, step) + penalty).backward()
        ref_sgd.step()
        _task_loss(net, step).backward()
        sgd.step()
    for a, b in zip(ref.parameters(), net.parameters()):
        assert torch.allclose(a, b, atol=1e-7)
    state = sgd.state_dict()["state"]
    assert torch.equal(state[0]["l2sp_anchor"], anchors[0]) and "l2sp_anchor" not in state[2]

    sgd.state.clear()  # a new visit clears the momentum, and the anchor with it
    _task_loss(net, 5).backward()
    with pytest.raises(RuntimeError, match="no anchor in the optimizer state"):
        sgd.step()


# --- the stage -----------------------------------------------------------------------------

def test_every_head_trains_the_lung_head_learns_and_the_lr_follows_eq1(task_shards, tmp_path):
    run_dir = tmp_path / "run"
    out = run_ranks("continual", 1, overrides(task_shards, run_dir, "cl.rounds=5",
                                              "run.visit_steps=0", "run.validate=false",
                                              "optim.lr_max=0.005"))
    steps_of = state(run_dir)["steps_of"]  # whole epochs: 32/8, 28/8, 24/4, 19/4 images
    assert steps_of == {"pneumonia": 4, "mura": 3, "lung": 6, "tbx": 4}
    assert "continual: done, 85 of 85 steps" in out
    assert "tbx: boxes of PulmonaryTuberculosis are not learned" in out

    scalars = read_scalars(run_dir / "tb")
    for task in TASKS:
        losses = [v for _, v in scalars[f"train/{task}/loss"]]
        n = steps_of[task]
        visits = [sum(losses[i:i + n]) / n for i in range(0, len(losses), n)]
        assert len(visits) == 5 and all(math.isfinite(v) for v in losses), (task, visits)
        # Only the lung masks are learned within these 20-24 steps whatever the seed: their
        # last two visits' loss is 0.59-0.66 of the first's (data.seed 0/1, run.seed 0/1). The
        # demo's pneumonia, fracture and TB findings are local (a lobe, a line, small lesions):
        # at 20 steps of 8 images their visit means move by up to 10 % either way with the seed
        # and the CPU's float order (pneumonia 0.96-1.01 of the first visit), so they say
        # nothing here. That they can be learned is test_demo_data's (a ResNet-18, all labels).
        if task == "lung":
            assert (visits[-1] + visits[-2]) / 2 < 0.75 * visits[0], visits
    lrs, step = dict(scalars["train/lr"]), 0
    for r in range(5):
        for task in schedule.visit_order(TASKS, r, 0):
            for t in range(steps_of[task]):  # eq. 1 by hand, T = 2 x the visit's steps
                step += 1
                expected = 1e-4 + 0.5 * (0.005 - 1e-4) * (
                    1 + math.cos(2 * math.pi * t / (2 * steps_of[task])))
                assert lrs[step] == pytest.approx(expected, rel=1e-6), (step, task, t)
    assert all(v > 0 for _, v in scalars["train/l2sp"])
    backbone = torchvision.models.resnet18()
    backbone.load_state_dict(torch.load(run_dir / "backbone_torchvision.pth", weights_only=True))
    # bench.stages times, per task, the trunk and that task's head of this very model.
    model = state(run_dir)["model"]
    for task, bench_model in zip(TASKS, benchmark_models(*[("continual", t) for t in TASKS])):
        trained = {k: v for k, v in model.items()
                   if k.startswith("backbone.") or k.startswith(f"heads.{task}.")}
        assert_same_model(trained, bench_model)


def test_muscle_minus_minus_fixed_order_plain_cosine_no_l2sp_and_the_matrix(task_shards,
                                                                            tmp_path):
    run_dir = tmp_path / "run"
    run_ranks("continual", 1, overrides(task_shards, run_dir, "cl.method=muscle--",
                                        "cl.rounds=2", "run.visit_steps=2"))
    matrix = json.loads((run_dir / "validation.json").read_text())
    assert [r["trained"] for r in matrix] == TASKS * 2
    assert all(set(TASKS) <= row.keys() for row in matrix)
    assert set(matrix[-1]["pneumonia"]) == {"acc", "sen", "spe", "auc"}
    assert set(matrix[-1]["lung"]) == {"dice", "miou"}
    assert set(matrix[-1]["tbx"]) == {"map", "ap_active", "ap_latent"}
    scalars = read_scalars(run_dir / "tb")
    for task, metric in (("pneumonia", "auc"), ("mura", "auc"), ("lung", "dice"),
                         ("tbx", "map")):
        assert [s for s, _ in scalars[f"forgetting/{task}"]] == list(range(1, 9))
        assert [s for s, _ in scalars[f"val/{task}/{metric}"]] == list(range(2, 17, 2))
    assert "train/l2sp" not in scalars
    lrs = [v for _, v in scalars["train/lr"]]
    assert lrs == pytest.approx([1e-4 + 0.5 * (0.01 - 1e-4) * (1 + math.cos(math.pi * s / 16))
                                 for s in range(16)], rel=1e-6)


def test_l2sp_holds_the_backbone_nearer_its_anchor_over_the_same_visit(task_shards, tmp_path):
    """The same first visit from the same start with eq. 2 on and with λ = 0: the backbone
    ends measurably nearer the visit's start. λ = 1 (20x the default): the pull's time
    constant, (1 - momentum) / (lr 2λα) steps, is ~100 steps at the default λ and lr, longer
    than this 14-step visit, over which two batch-2 trajectories drift 1-2% apart anyway
    (measured: the default λ changes this visit's drift by -1.3% to +0.3%)."""
    drift = {}
    for name, weight in (("muscle", 1.0), ("off", 0.0)):
        run_ranks("continual", 1, overrides(task_shards, tmp_path / name, "run.visit_steps=14",
                                            "tasks.mura.batch_size=2", "run.max_steps=14",
                                            "run.validate=false", f"cl.l2sp_weight={weight}"))
        visit, = json.loads((tmp_path / name / "visits.json").read_text())
        assert visit["task"] == schedule.visit_order(TASKS, 0, 0)[0] and visit["step"] == 14
        drift[name] = visit["drift"]
        scalars = read_scalars(tmp_path / name / "tb")
        assert scalars["visit/drift"] == [(1, pytest.approx(visit["drift"]))]
    assert visit["pull"] == visit["decay"] == 0.0  # λ = 0
    assert drift["muscle"] < 0.95 * drift["off"], drift  # > 3x that 1-2% noise


def test_idle_heads_stay_frozen_under_zero2_on_two_ranks(task_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(task_shards, run_dir, "run.zero_stage=2", "run.validate=false",
                     "run.visit_steps=2")
    first, second = schedule.visit_order(TASKS, 0, 0)[:2]
    run_ranks("continual", 2, [*args, "run.max_steps=2"])
    after_first = state(run_dir)["model"]
    run_ranks("continual", 2, [*args, "run.max_steps=4"])
    after_second = state(run_dir)["model"]
    for task in TASKS:
        if task == second:
            a, b = heads(after_first, task), heads(after_second, task)
            assert any(not torch.equal(a[k], b[k]) for k in a), task
        else:  # no gradient, no weight decay, no stale momentum moved them
            assert_equal(heads(after_first, task), heads(after_second, task))
    backbone = [k for k in after_first if k.startswith("backbone.") and k.endswith("weight")]
    assert any(not torch.equal(after_first[k], after_second[k]) for k in backbone)


def test_two_ranks_train_every_head_with_one_image_each(task_shards, tmp_path):
    """Global batches of 2 on 2 ranks: batch norm (trunk, DeepLab's ASPP pooling branch with
    one value per image) takes its statistics over both ranks."""
    run_dir = tmp_path / "run"
    batches = [f"tasks.{t}.batch_size=2" for t in TASKS]
    out = run_ranks("continual", 2, overrides(task_shards, run_dir, *batches, "cl.rounds=1",
                                              "run.visit_steps=2"))
    assert "continual: done, 8 of 8 steps" in out
    scalars = read_scalars(run_dir / "tb")
    for task in TASKS:
        assert all(math.isfinite(v) for _, v in scalars[f"train/{task}/loss"]), task
    matrix = json.loads((run_dir / "validation.json").read_text())
    assert len(matrix) == 4 and all(math.isfinite(matrix[-1][t]["auc"])
                                    for t in ("pneumonia", "mura"))


def test_stop_mid_visit_by_signal_then_resume_equals_uninterrupted_run(task_shards, tmp_path):
    world = 2
    args = ["run.visit_steps=3", "cl.rounds=1", "run.validate=false", "run.zero_stage=2"]
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    run_ranks("continual", world, overrides(task_shards, ref_dir, *args))
    ref = state(ref_dir)
    assert ref["step"] == 12

    procs = start_ranks("continual", world, overrides(task_shards, cut_dir, *args))
    for line in procs[0].stdout:
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 4:
            procs[-1].send_signal(signal.SIGTERM)  # one rank only: all stop after one step
            break
    codes, outs = finish_ranks(procs)
    assert codes == [128 + signal.SIGTERM] * world, outs
    cut = state(cut_dir)
    assert 4 <= cut["step"] < 12 and cut["step"] % 3 != 0, cut["step"]  # mid-visit
    assert all(a.numel() for a in anchors(cut_dir, world))

    out = run_ranks("continual", world, overrides(task_shards, cut_dir, *args))
    assert f"resuming at step {cut['step']}" in out
    resumed = state(cut_dir)
    assert resumed["step"] == 12
    assert_equal(resumed["model"], ref["model"])
    for a, b in zip(anchors(cut_dir, world), anchors(ref_dir, world)):
        assert torch.equal(a, b)  # each rank's shard of the backbone's anchor


@pytest.mark.parametrize("extra, message", [
    (["tasks.lung.batch_size=1"], "tasks.lung.batch_size: a global batch of 1; batch norm "
                                  "needs at least 2 images"),
    (["model.init=/nonexistent/backbone.pth"], "model.init: /nonexistent/backbone.pth not "
                                               "found (run MD-MoCo first, or set model.init='' "
                                               "to start from Kaiming init; on a shell: "
                                               "model.init=\"''\")"),
    (["cl.method=muscle-"], "cl.method: 'muscle-' is not one of muscle, muscle--"),
    (["optim.lr_min=1"], "optim.lr_min: 1.0 is above optim.lr_max 0.01"),
    (["cl.round=3"], "cl.round: unknown key (did you mean cl.rounds?)"),
])
def test_bad_config_fails_in_one_line_before_training(task_shards, tmp_path, capsys, extra,
                                                      message):
    code = continual.main(overrides(task_shards, tmp_path / "run", *extra))
    assert code == 2
    assert capsys.readouterr().err == f"continual: error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_missing_task_shard_and_wrong_backbone_are_refused(task_shards, tmp_path, capsys):
    assert continual.main(overrides(tmp_path / "none", tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("continual: error: pneumonia: no manifest.json in ") and \
        err.count("\n") == 1
    from muscle_hpc.models.backbone import build_backbone, export_torchvision

    torch.save(export_torchvision(build_backbone("resnet50")), tmp_path / "r50.pth")
    assert continual.main(overrides(task_shards, tmp_path / "run",
                                    f"model.init={tmp_path / 'r50.pth'}")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"continual: error: model.init: {tmp_path / 'r50.pth'} is not a "
                          f"resnet18 backbone") and err.count("\n") == 1


def test_an_init_that_is_a_directory_or_left_empty_says_what_to_give(task_shards, tmp_path,
                                                                    capsys):
    """model.init naming MD-MoCo's run directory instead of its backbone file, and
    model.init='' typed on a shell, which hands the stage model.init= (no value)."""
    def error(*extra) -> str:
        assert continual.main(overrides(task_shards, tmp_path / "run", *extra)) == 2
        return capsys.readouterr().err

    moco = tmp_path / "mdmoco_r18"
    moco.mkdir()
    assert error(f"model.init={moco}") == (
        f"continual: error: model.init: {moco} is a directory; give a file, a torchvision "
        f"resnet18 state dict (.pth); run MD-MoCo first, or set model.init='' to start from "
        f"Kaiming init; on a shell: model.init=\"''\"\n")
    (moco / "backbone_torchvision.pth").write_bytes(b"")
    assert error(f"model.init={moco}") == (
        f"continual: error: model.init: {moco} is a directory; give a file, a torchvision "
        f"resnet18 state dict (.pth): {moco / 'backbone_torchvision.pth'} is one\n")

    typed = "model.init=''"
    argv = subprocess.run(["bash", "-c", f"printf %s {typed}"], capture_output=True,
                          text=True, check=True).stdout
    assert argv == "model.init="  # what the stage gets
    assert error(argv) == (
        "continual: error: model.init: no value given: give one, or model.init='' for no "
        "pre-training, Kaiming init (on a shell command line: model.init=\"''\")\n")
    advised = "model.init=\"''\""
    argv = subprocess.run(["bash", "-c", f"printf %s {advised}"], capture_output=True,
                          text=True, check=True).stdout
    assert config.load(DEMO, [argv], config.ContinualConfig).model.init == ""
    assert not (tmp_path / "run").exists()


def test_launch_refuses_a_bad_continual_config_before_submitting(task_shards, tmp_path, capsys):
    from muscle_hpc import launch

    code = launch.main(["--stage", "cl", "--config", str(DEMO), "--gpus-per-node", "0",
                        "--nodes", "3",
                        f"data.root={task_shards}", "model.init=''", f"run.dir={tmp_path}/run"])
    assert code == 2
    assert capsys.readouterr().err == ("launch: error: tasks.pneumonia.batch_size: global batch "
                                       "8 is not divisible by the world size 3\n")
    assert not (tmp_path / "run").exists()
