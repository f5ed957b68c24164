"""The continual-learning stage: visit order, eq. 1, eq. 2, frozen idle heads, exact resume,
and every head learning, on the four task sets of the tiny demo data at 128x80 (real FFCV
shards, real DeepSpeed, real gloo ranks, event files read back)."""

import json
import math
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torchvision
from conftest import finish_ranks, run_ranks, start_ranks

from muscle_hpc import dist, schedule
from muscle_hpc.regularizers import L2SP
from muscle_hpc.stages import continual
from muscle_hpc.tblog import read_scalars

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "continual_demo.yaml"
TASKS = ["pneumonia", "mura", "lung", "tbx"]


def overrides(shards, run_dir, *extra):
    return ["--config", str(DEMO), f"data.root={shards}", "model.init=''", "run.log_every_steps=1",
            "run.checkpoint_every_steps=100", f"run.dir={run_dir}", *extra]


def state(run_dir):
    return torch.load(run_dir / "checkpoint.pth", weights_only=True)


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

def test_l2sp_is_eq2_and_its_gradient_pulls_toward_the_anchor():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 2))
    reg = L2SP(alpha=0.3, weight=0.5)
    reg.set_anchor(net)
    w0 = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    w = [p.detach().clone() for p in net.parameters()]
    by_hand = sum(0.3 * ((a - b) ** 2).sum() + 0.7 * (a ** 2).sum() for a, b in zip(w, w0))
    assert reg.omega(net).item() == pytest.approx(by_hand.item(), rel=1e-6)
    reg.penalty(net).backward()
    for p, a, b in zip(net.parameters(), w, w0):
        assert torch.allclose(p.grad, 0.5 * (2 * 0.3 * (a - b) + 2 * 0.7 * a), atol=1e-6)

    pull = L2SP(alpha=1.0, weight=1.0)
    pull.anchor = {n: t for (n, _), t in zip(net.named_parameters(), w0)}
    net.zero_grad()
    pull.penalty(net).backward()
    with torch.no_grad():
        for p in net.parameters():
            p.sub_(0.1 * p.grad)
    before = sum(((a - b) ** 2).sum() for a, b in zip(w, w0))
    after = sum(((p - b) ** 2).sum() for p, b in zip(net.parameters(), w0))
    assert after < 0.7 * before


# --- the stage -----------------------------------------------------------------------------

def test_every_head_learns_and_the_lr_follows_eq1(task_shards, tmp_path):
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
        assert len(visits) == 5
        assert (visits[-1] + visits[-2]) / 2 < visits[0], (task, visits)
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
    assert "anchor" in cut

    out = run_ranks("continual", world, overrides(task_shards, cut_dir, *args))
    assert f"resuming at step {cut['step']}" in out
    resumed = state(cut_dir)
    assert resumed["step"] == 12
    assert_equal(resumed["model"], ref["model"])
    assert_equal(resumed["anchor"], ref["anchor"])


@pytest.mark.parametrize("extra, message", [
    (["tasks.lung.batch_size=1"], "tasks.lung.batch_size: 1 over 1 ranks is 1 image per rank; "
                                  "BatchNorm needs at least 2"),
    (["model.init=/nonexistent/backbone.pth"], "model.init: /nonexistent/backbone.pth not "
                                               "found (run MD-MoCo first, or set model.init='' "
                                               "to start from Kaiming init)"),
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


def test_launch_refuses_a_bad_continual_config_before_submitting(task_shards, tmp_path, capsys):
    from muscle_hpc import launch

    code = launch.main(["--stage", "cl", "--config", str(DEMO), "--nodes", "3",
                        f"data.root={task_shards}", "model.init=''", f"run.dir={tmp_path}/run"])
    assert code == 2
    assert capsys.readouterr().err == ("launch: error: tasks.pneumonia.batch_size: global batch "
                                       "8 is not divisible by the world size 3\n")
    assert not (tmp_path / "run").exists()
