"""The representation monitors (muscle_hpc/monitor.py) and their place in the MD-MoCo stage:
the kNN against a brute-force scikit-learn computation, 2 gloo ranks against 1, the collapse
signal on a collapsed and a healthy batch, and a short stage run read back from TensorBoard."""

import math
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from conftest import run_ranks
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from muscle_hpc import config, monitor, registry
from muscle_hpc.models.backbone import build_backbone
from muscle_hpc.models.moco import MoCo
from muscle_hpc.stages import mdmoco
from muscle_hpc.tasks import PAPER_TASKS
from muscle_hpc.tblog import read_scalars

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "mdmoco_demo.yaml"
MAX_IMAGES = 25  # of 32 pneumonia / 28 mura training images: a spread subset, odd for 2 ranks


def data_cfg(shards):
    return config.load_config(None, [f"data.root={shards}", "data.num_workers=1"]).data


def encoder():
    torch.manual_seed(0)
    return build_backbone("resnet18")


def knn_answer(shards, batch_size, tasks=("pneumonia", "mura")):
    """The monitor's pneumonia features and kNN metrics of ``tasks`` on this process group, as
    the stage computes them; checked to leave the encoder and torch's random stream alone
    (a resumed run, which skips the step-0 kNN, must train what an uninterrupted one does)."""
    net = encoder()
    loaders = monitor.knn_loaders(monitor.task_shards(shards, list(tasks)), list(tasks),
                                  data_cfg(shards), batch_size)
    state, rng = {k: v.clone() for k, v in net.state_dict().items()}, torch.get_rng_state()
    feats = {s: monitor.embed_split(net, *loaders["pneumonia"][s], torch.device("cpu"),
                                    MAX_IMAGES, batch_size) for s in monitor.SPLITS}
    metrics = monitor.knn_eval(net, loaders, torch.device("cpu"), MAX_IMAGES, k=5,
                               batch_size=batch_size)
    assert net.training  # put back in its mode, its BN statistics untouched
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    return feats, metrics


@pytest.fixture
def one_rank(tmp_path):
    """A 1-rank gloo group, as every stage has (the evaluation loaders deal over ranks)."""
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                                  world_size=1)
    yield
    torch_dist.destroy_process_group()


def brute_force(train, train_labels, query, k, T):
    """Class-1 scores and predictions by scikit-learn's exhaustive cosine neighbours."""
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(train)
    distance, nearest = nn.kneighbors(query)
    weights = np.exp((1 - distance) / T)
    scores = np.stack([(weights * (train_labels[nearest] == c)).sum(1) for c in (0, 1)], 1)
    scores /= scores.sum(1, keepdims=True)
    return scores


def test_knn_is_the_brute_force_weighted_vote(task_shards, one_rank):
    feats, metrics = knn_answer(task_shards, batch_size=8)
    train, valid = feats["train"], feats["valid"]
    assert len(train.labels) == MAX_IMAGES and train.features.shape == (MAX_IMAGES, 512)
    assert set(train.labels) == {0, 1} and set(valid.labels) == {0, 1}
    assert list(train.index) == list(monitor.spread_subset(32, MAX_IMAGES))
    for k, T in ((5, 0.07), (20, 0.07), (7, 0.5)):
        ours = monitor.knn_scores(train.features, train.labels, valid.features, 2, k, T)
        ref = brute_force(train.features, train.labels, valid.features, k, T)
        np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4, atol=1e-6)
        got = monitor.knn_metrics(ours, valid.labels)
        assert got["accuracy"] == pytest.approx(np.mean(ref.argmax(1) == valid.labels))
        assert got["auc"] == pytest.approx(roc_auc_score(valid.labels, ref[:, 1]), abs=1e-6)
    ref = brute_force(train.features, train.labels, valid.features, 5, 0.07)
    assert metrics["pneumonia"]["auc"] == pytest.approx(roc_auc_score(valid.labels, ref[:, 1]))
    assert metrics["pneumonia"]["train_images"] == MAX_IMAGES
    # A tiny T weighs neighbours as exp(sim / T) would, without underflowing to 0 / 0.
    sharp = monitor.knn_scores(train.features, train.labels, valid.features, 2, 5, T=1e-3)
    assert not sharp.isnan().any()
    # More neighbours than training images: all of them vote.
    all_votes = monitor.knn_scores(train.features[:3], train.labels[:3], valid.features, 2, 20)
    np.testing.assert_allclose(all_votes.numpy(), brute_force(
        train.features[:3], train.labels[:3], valid.features, 3, 0.07), rtol=1e-4, atol=1e-6)


def test_spread_subset_reaches_the_whole_split():
    assert list(monitor.spread_subset(5, 10)) == [0, 1, 2, 3, 4]
    picked = monitor.spread_subset(1000, 7)
    assert len(set(picked)) == 7 and picked[0] == 0 and picked[-1] > 800


def _rank(rank, world, init_file, shards, out):
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                  world_size=world)
    try:
        feats, metrics = knn_answer(shards, batch_size=4, tasks=("pneumonia",))
        torch.save({"metrics": metrics, "feats": {s: {k: torch.from_numpy(getattr(f, k)) for k in
                                                      ("features", "labels", "index")}
                                                  for s, f in feats.items()}},
                   f"{out}.{rank}")  # tensors, so the test reads it with weights_only
    finally:
        torch_dist.destroy_process_group()


def test_two_gloo_ranks_give_the_one_rank_answer(task_shards, tmp_path):
    mp.spawn(_rank, args=(2, tempfile.mktemp(dir=tmp_path), task_shards, tmp_path / "out"),
             nprocs=2)
    answers = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in (0, 1)]
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                                  world_size=1)
    try:
        one_feats, one_metrics = knn_answer(task_shards, batch_size=8, tasks=("pneumonia",))
    finally:
        torch_dist.destroy_process_group()
    for answer in answers:
        metrics = answer["metrics"]
        for split, f in answer["feats"].items():
            one = one_feats[split]
            assert f["index"].tolist() == one.index.tolist()  # the same images, in order
            assert f["labels"].tolist() == one.labels.tolist()
            np.testing.assert_allclose(f["features"].numpy(), one.features, rtol=1e-4,
                                       atol=1e-5)
        assert metrics.keys() == one_metrics.keys() == {"pneumonia"}
        for key, value in one_metrics["pneumonia"].items():
            assert metrics["pneumonia"][key] == pytest.approx(value, abs=1e-6), key


def test_a_collapsed_encoder_trips_the_warning_and_a_spread_batch_does_not():
    torch.manual_seed(0)
    moco = MoCo(partial(build_backbone, "resnet18"), dim=16, K=32, bn="none")
    head = moco.encoder_q.fc[-1]
    with torch.no_grad():  # every image gets the same embedding
        head.weight.zero_()
        head.bias.fill_(1.0)
    logits, _ = moco(torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32))
    assert moco.last_q.shape == (4, 16) and not moco.last_q.requires_grad
    assert logits.shape == (4, 33)  # the forward contract is unchanged
    assert monitor.collapse_std(moco.last_q) == 0.0
    warning = monitor.collapse_warning(0.0, 0.05)
    assert warning and "collapse" in warning

    dim = 128
    healthy = monitor.collapse_std(torch.randn(4096, dim))
    assert healthy == pytest.approx(1 / math.sqrt(dim), rel=0.02)
    assert monitor.collapse_warning(healthy * math.sqrt(dim), 0.05) is None
    # Spread over 8 of 128 dimensions: about sqrt(8 / 128) = 0.25 once times sqrt(dim).
    narrow = torch.zeros(4096, dim)
    narrow[:, :8] = torch.randn(4096, 8)
    assert monitor.collapse_std(narrow) * math.sqrt(dim) == pytest.approx(0.25, rel=0.05)


def test_knn_metrics_of_more_than_two_classes_are_the_tasks_own():
    """accuracy of the argmax and the one-vs-rest macro AUC, as metrics.multiclass scores a
    classification task of K > 2 classes; NaN while a class is missing."""
    rng = np.random.default_rng(0)
    y = np.arange(30) % 3
    scores = torch.softmax(torch.as_tensor(rng.normal(size=(30, 3)) + 2 * np.eye(3)[y]), 1)
    out = monitor.knn_metrics(scores.float(), y)
    p = scores.float().double().numpy()
    assert out["accuracy"] == pytest.approx(float((p.argmax(1) == y).mean()))
    assert out["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"), abs=1e-9)
    assert math.isnan(monitor.knn_metrics(scores[y < 2].float(), y[y < 2])["auc"])


def test_monitor_tasks_are_the_classification_tasks():
    assert set(registry.KNN_TASKS) == \
        {n for n, t in PAPER_TASKS.items() if t.kind == "classification"}
    assert config.load_config(None).run.monitor_tasks == ["pneumonia", "mura"]
    with pytest.raises(config.ConfigError, match="run.monitor_tasks: lung is a segmentation "
                                                 "task; the kNN monitor needs one class label"):
        config.load_config(None, ["run.monitor_tasks=[pneumonia,lung]"])
    with pytest.raises(config.ConfigError, match="'xray' is not one of pneumonia, mura"):
        config.load_config(None, ["run.monitor_tasks=xray"])


def test_a_stage_without_the_task_sets_says_so_in_one_line(moco_shards, tmp_path, capsys):
    args = ["--config", str(DEMO), f"data.root={moco_shards}", "data.datasets=nih,shenzhen",
            f"run.dir={tmp_path / 'run'}"]
    assert mdmoco.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mdmoco: error: run.monitor_tasks: pneumonia: ")
    assert err[0].endswith("(run.monitor_every_steps=0: no kNN monitor)")
    assert not (tmp_path / "run").exists()


def test_stage_logs_the_monitors(task_shards, tmp_path):
    # pneumonia + mura: 60 training images, 7 steps of 8; the kNN at 0 (init), 2 and 3 (end).
    args = ["--config", str(DEMO), f"data.root={task_shards}", "data.datasets=pneumonia,mura",
            "data.batch_size=8", "model.K=32", "model.bn_groups=4", "optim.epochs=1",
            "run.max_steps=3",
            "run.log_every_steps=1", "run.image_grid_every_steps=0",
            "run.monitor_every_steps=2", "run.monitor_max_images=16"]
    out = run_ranks("mdmoco", 1, [*args, f"run.dir={tmp_path}"])
    assert "monitor step 0: kNN pneumonia acc" in out and "monitor step 3: kNN" in out
    scalars = read_scalars(tmp_path / "tb")
    for task in ("pneumonia", "mura"):
        for metric in ("accuracy", "auc"):
            points = scalars[f"monitor/knn/{task}/{metric}"]
            assert [s for s, _ in points] == [0, 2, 3]
            assert all(0 <= v <= 1 for _, v in points)
    for tag in ("collapse_std", "collapse_std_x_sqrt_dim", "cos_positive", "cos_negative",
                "shortcut_top1", "top1_in_batch"):
        assert [s for s, _ in scalars[f"monitor/{tag}"]] == [1, 2, 3], tag
    for (_, std), (_, scaled) in zip(scalars["monitor/collapse_std"],
                                     scalars["monitor/collapse_std_x_sqrt_dim"]):
        assert 0 < std < 1 and scaled == pytest.approx(std * math.sqrt(128), rel=1e-5)
    assert all(-1 <= v <= 1 for tag in ("cos_positive", "cos_negative")
               for _, v in scalars[f"monitor/{tag}"])
    assert all(0 <= v <= 1 for tag in ("shortcut_top1", "top1_in_batch")
               for _, v in scalars[f"monitor/{tag}"])
    assert "(in-batch " in out and ", histograms alone " in out
    report = monitor.pretext_report(scalars, 32, 8)  # what the demo prints, from this run
    assert report[0].startswith("loss ") and "(chance ln(1+K) = 3.497)" in report[0]
    assert "kNN pneumonia valid AUC" in "\n".join(report)


def _curves(top1, in_batch, histograms, knn_first, knn_last):
    """Logged curves of 8 steps whose last quarter averages the given values."""
    def curve(first, last):
        return [(s, first if s <= 4 else last) for s in range(1, 9)]

    return {"train/loss": curve(5.5, 5.0), "train/top1": curve(0.0, top1),
            "monitor/top1_in_batch": curve(0.1, in_batch),
            "monitor/shortcut_top1": curve(0.5, histograms),
            "monitor/collapse_std_x_sqrt_dim": curve(0.2, 0.4),
            "monitor/knn/pneumonia/auc": [(0, knn_first), (8, knn_last)]}


def test_the_pretext_report_says_what_the_monitors_show():
    lines = monitor.pretext_report(_curves(0.3, 0.1, 0.6, 0.6, 0.5), 256, 16)
    assert lines[:2] == ["loss 5.500 -> 5.000 (chance ln(1+K) = 5.549)",
                         "top-1 against the queue 0.000 -> 0.300 (chance 1/(1+K) = 0.004)"]
    assert "kNN pneumonia valid AUC 0.600 at step 0 -> 0.500 at step 8" in lines
    readings = [line for line in lines if line.startswith("reading: ")]
    assert len(readings) == 3
    assert "by their age" in readings[0] and "histograms alone" in readings[1]
    assert "do not carry the finding" in readings[2]
    # MoCo as good among its own keys, above the histograms, the kNN risen: no warning
    healthy = monitor.pretext_report(_curves(0.3, 0.6, 0.1, 0.6, 0.8), 256, 16)
    assert [line for line in healthy if line.startswith("reading: ")] == [
        "reading: the kNN AUC of pneumonia rose above its first pass"]
    older = _curves(0.3, 0.1, 0.6, 0.6, 0.5)  # a run from before the in-batch monitor
    del older["monitor/top1_in_batch"]
    lines = monitor.pretext_report(older, 256, 16)
    assert not any("own keys" in line or "their age" in line for line in lines)
    assert sum(line.startswith("reading: ") for line in lines) == 2


def test_the_in_batch_monitor_is_blind_to_the_age_of_keys():
    """Embeddings that carry only the encoder's state when they were made (a shared "age"
    direction per step) and noise: the fresh positive beats every stale queue key, so MoCo's
    top-1 is 1, while among the step's own keys the queries find theirs at chance. Keys that
    carry their image are found by both."""
    from muscle_hpc.models.moco import contrastive_logits

    g = torch.Generator().manual_seed(0)
    B, b, D, K = 64, 16, 128, 4096

    def unit(x):
        return torch.nn.functional.normalize(x, dim=1)

    now, before = unit(torch.randn(2, D, generator=g))
    noise = 0.3 / math.sqrt(D)  # |noise| about 0.3
    queue = unit(before + noise * torch.randn(K, D, generator=g)).T
    keys = unit(now + noise * torch.randn(B, D, generator=g))
    first = 2 * b  # rank 2's queries
    q = unit(now + noise * torch.randn(b, D, generator=g))  # no trace of their own images
    moco_top1 = (contrastive_logits(q, keys[first:first + b], queue, 0.2).argmax(1) == 0)
    assert moco_top1.float().mean() == 1.0
    assert monitor.in_batch_top1(q, keys, first) <= 4 / b  # chance: 1 / 64
    seen = unit(keys[first:first + b] + noise / 3 * torch.randn(b, D, generator=g))
    assert monitor.in_batch_top1(seen, keys, first) == 1.0
    assert monitor.in_batch_top1(seen, keys, first + 1) == 0.0  # the wrong rank's rows


def _films(step, b=8, seed=0):
    """``b`` films of one smooth picture, each with its own exposure (gain and offset): images
    told apart by their gray levels alone."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    yy, xx = torch.meshgrid(torch.linspace(0, 3, 20), torch.linspace(0, 5, 30), indexing="ij")
    picture = (torch.sin(xx) * torch.cos(yy))[None, None]
    gain = torch.rand(b, 1, 1, 1, generator=g) * 2 + 0.5
    return picture * gain + torch.randn(b, 1, 1, 1, generator=g)


def test_the_shortcut_monitor_finds_keys_by_their_histograms_and_only_by_them():
    """Views of one film that keep its gray levels (a flip) are matched to their keys by the
    histograms alone, every time; views whose gray levels are redrawn per view (jitter) or
    keys of other films are not; the queue holds all keys of the last K/N steps."""
    K, steps = 32, 6  # 48 keys: the queue wraps
    same, jitter, other = (monitor.HistogramShortcut(K, "cpu") for _ in range(3))
    tops = {"same": [], "jitter": [], "other": []}
    for step in range(steps):
        films = _films(step)
        tops["same"].append(float(same.step(films, films.flip(-1))))
        tops["jitter"].append(float(jitter.step(films, _films(step, seed=1).flip(-1))))
        tops["other"].append(float(other.step(films, films.roll(1, 0))))
    assert tops["same"] == [1.0] * steps
    assert max(tops["jitter"][2:]) <= 0.25 and max(tops["other"][2:]) <= 0.25
    assert same.ptr == steps * 8 % K and not same.queue.isnan().any()
    torch.testing.assert_close(same.queue[8:16], monitor.gray_quantiles(_films(5).flip(-1)))
    # gray_quantiles: the levels at (k + 1/2)/16, as numpy's linear quantile
    x = torch.rand(3, 1, 7, 9)
    np.testing.assert_allclose(monitor.gray_quantiles(x).numpy(), np.quantile(
        x.flatten(1).numpy(), (np.arange(16) + 0.5) / 16, axis=1).T, rtol=1e-5, atol=1e-6)
    # a resumed monitor (its state dict) goes on with the same queue
    resumed = monitor.HistogramShortcut(K, "cpu")
    resumed.load_state_dict(same.state_dict())
    films = _films(9)
    assert float(resumed.step(films, films)) == float(same.step(films, films))
    assert torch.equal(resumed.queue, same.queue) and resumed.ptr == same.ptr

