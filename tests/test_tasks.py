"""Task kinds: a task built from a registry definition trains its head on the shared trunk and
scores its records as scikit-learn scores the same forward outputs; its shard check refuses a
shard that does not match the definition, in one line."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

from data_prep import convert
from data_prep.datasets.base import DatasetSpec, Record, Scan
from muscle_hpc import config, registry
from muscle_hpc.data.loaders import TaskLoader, task_loader
from muscle_hpc.data.shards import Shard, ShardError, open_shard
from muscle_hpc.models.backbone import build_backbone
from muscle_hpc.models.heads import MultiTaskNet, trunk_channels
from muscle_hpc.tasks import PAPER_TASKS, build
from muscle_hpc.tasks.base import target_stats

DEFINITIONS = {
    "classification": registry.Task("grade", "nih", "classification", "Grade",
                                    ("none", "mild", "severe")),
    "multilabel": registry.Task("findings", "nih", "multilabel", "Findings",
                                ("effusion", "mass", "nodule")),
    "regression": registry.Task("age", "boneage", "regression", "Age", (), target="boneage"),
    "segmentation": registry.Task("lobes", "chestmasks", "segmentation", "Lobes",
                                  ("background", "left", "right")),
    # shard category 1 is not learned: detector classes 1, 2 are shard categories 3, 2
    "detection": registry.Task("lesions", "tbx11k", "detection", "Lesions", ("big", "small"),
                               box_categories=(3, 2)),
}
SIZE = 64


def nan_close(a, b) -> bool:
    return np.allclose(a, b, atol=1e-6, rtol=0, equal_nan=True)


def data_config(images: int, seed: int = 0):
    return config.load(None, [f"data.synthetic={images}", f"data.synthetic_width={SIZE}",
                              f"data.synthetic_height={SIZE}", f"data.seed={seed}"],
                       config.FinetuneConfig).data


def synthetic(task, images: int, train: bool, seed: int = 0):
    if task.kind == "detection":  # every shard category, so that one of them goes unused
        from muscle_hpc.data.synthetic import SyntheticTaskLoader

        return SyntheticTaskLoader("detection", images, 4, (SIZE, SIZE), train=train,
                                   box_categories=(1, 2, 3), seed=seed)
    return task_loader(None, 4, task, data_config(images, seed), train=train, distributed=False)


def reference(task, outputs: list, batches: list) -> dict[str, float]:
    """The task's metrics from scikit-learn (and numpy) on the captured forward outputs."""
    names = task.classes
    if task.kind == "classification":
        y = torch.cat([b["label"] for b in batches]).numpy()
        p = torch.cat(outputs).double().numpy()
        pred = p.argmax(axis=1)
        cm = skm.confusion_matrix(y, pred, labels=range(len(names)))
        out = {"acc": skm.accuracy_score(y, pred),
               "auc": skm.roc_auc_score(y, p, multi_class="ovr", average="macro")
               if len(np.unique(y)) == len(names) else math.nan}
        for c, name in enumerate(names):
            tp, fn, fp = cm[c, c], cm[c].sum() - cm[c, c], cm[:, c].sum() - cm[c, c]
            out[f"sen_{name}"] = tp / (tp + fn) if tp + fn else math.nan
            out[f"spe_{name}"] = (cm.sum() - tp - fn - fp) / (cm.sum() - tp - fn)
        return out
    if task.kind == "multilabel":
        y = torch.cat([b["labels"] for b in batches]).numpy()
        p = torch.cat(outputs).double().numpy()
        per = {f"auc_{n}": skm.roc_auc_score(y[:, c], p[:, c])
               if 0 < y[:, c].sum() < len(y) else math.nan for c, n in enumerate(names)}
        return {"auc": np.nanmean(list(per.values())), **per}
    if task.kind == "regression":
        t = torch.cat([b["value"] for b in batches]).double().numpy()
        q = torch.cat(outputs).double().numpy()
        return {"mae": skm.mean_absolute_error(t, q),
                "rmse": math.sqrt(skm.mean_squared_error(t, q))}
    if task.kind == "segmentation":
        t = [m.numpy() for b in batches for m in b["mask"]]
        q = [p.numpy() for o in outputs for p in o.argmax(dim=1)]
        dice = {}
        for c, name in enumerate(names[1:], 1):
            per_image = []
            for a, b in zip(t, q):
                denom = (a == c).sum() + (b == c).sum()
                per_image.append(1.0 if denom == 0 else 2 * ((a == c) & (b == c)).sum() / denom)
            dice[f"dice_{name}"] = np.mean(per_image)
        t_all = np.concatenate([a.ravel() for a in t])
        q_all = np.concatenate([b.ravel() for b in q])
        return {"dice": np.mean(list(dice.values())),
                "miou": skm.jaccard_score(t_all, q_all, average="macro"), **dice}
    raise AssertionError(task.kind)


@pytest.mark.parametrize("kind", registry.KINDS)
def test_each_kind_trains_on_the_trunk_and_scores_its_records_as_sklearn(kind):
    task = build(DEFINITIONS[kind])
    assert (task.name, task.kind, task.classes, task.headline, task.metrics) == (
        DEFINITIONS[kind].name, kind, DEFINITIONS[kind].classes, registry.HEADLINES[kind],
        DEFINITIONS[kind].metrics)
    if kind == "regression":
        task.standardization = (100.0, 20.0)  # as check() would set it from a train split
    torch.manual_seed(0)
    net = MultiTaskNet(build_backbone("resnet18"),
                       {task.name: task.head(trunk_channels("resnet18"), config.HeadsConfig())})
    head_before = [p.detach().clone() for p in net.heads[task.name].parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.train()
    losses = []
    for batch in synthetic(task, 12, train=True).epoch_batches(0):
        if kind == "regression":
            assert batch["value"].dtype == torch.float32 and batch["value"].shape == (4,)
        loss = net(task.name, batch["image"], task.targets(batch, torch.device("cpu")))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    assert any(not torch.equal(a, b) for a, b in
               zip(head_before, net.heads[task.name].parameters()))

    net.eval()
    records, outputs, batches = [], [], []
    for batch in synthetic(task, 24, train=False, seed=1).epoch_batches(0):
        out = net.predict(task.name, batch["image"])
        if kind == "regression":  # in months: the standardized output, scaled back
            with torch.no_grad():
                z = net.heads[task.name](net.task_features(task.name, batch["image"]))
            torch.testing.assert_close(out, z.squeeze(1) * 20.0 + 100.0)
        records += task.records(out, batch)
        outputs.append(out)
        batches.append(batch)
    scores = task.score(records, config.MetricsConfig())
    assert tuple(scores) == task.metrics
    test, _ = task.test_metrics(records, config.finetune.FtEvalConfig(bootstrap=5))
    assert set(task.metrics) <= set(test)
    assert all(test[k] == scores[k] or math.isnan(scores[k]) for k in task.metrics)
    if kind == "detection":
        check_detection_records(task, records, outputs, batches)
    else:
        ref = reference(task, outputs, batches)
        assert set(ref) == set(scores)
        assert nan_close([scores[k] for k in ref], [ref[k] for k in ref]), (scores, ref)
    if kind in ("classification", "multilabel", "regression"):
        assert f"{task.headline}_ci" in test and test["ci_resamples"] == 5


def check_detection_records(task, records, outputs, batches):
    """Ground truth keeps shard categories 3 and 2 as detector classes 1 and 2, and drops 1;
    the detections are the head's own; the metrics are metrics.detection's on them."""
    from muscle_hpc import metrics

    for (gt, det), out, (boxes, labels) in zip(
            records, [d for o in outputs for d in o],
            [x for b in batches for x in zip(b["boxes"], b["box_labels"])], strict=True):
        keep = labels != 1
        assert np.array_equal(gt[0], boxes[keep].numpy())
        assert np.array_equal(gt[1], (4 - labels[keep]).numpy())  # 3 -> 1, 2 -> 2... as 4 - id
        assert np.array_equal(det[1], out["scores"].numpy())
    gt = [r[0] for r in records]
    det = [r[1] for r in records]
    assert nan_close(list(task.score(records, config.MetricsConfig()).values()),
                     list(metrics.detection(gt, det, {1: "big", 2: "small"}).values()))


def test_the_paper_tasks_are_the_registry_definitions_built():
    for name, definition in registry.TASKS.items():
        task = PAPER_TASKS[name]
        assert task.definition is definition and task.metrics == definition.metrics
    assert PAPER_TASKS["tbx"].categories == {1: (1, "active"), 2: (2, "latent")}


# --- check(): the shard against the definition ------------------------------------------------

def one_line_error(task, shard) -> str:
    with pytest.raises(ShardError) as e:
        task.check(shard)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_a_shard_with_another_class_count_is_refused_in_one_line(flat_shards):
    shard = open_shard(flat_shards, "dark", "train")  # label names ("a", "b")
    PAPER_TASKS["pneumonia"].check(shard)  # two classes: accepted, whatever their names
    msg = one_line_error(build(dataclasses.replace(DEFINITIONS["classification"],
                                                   dataset="dark")), shard)
    assert "2 classes" in msg and "(a, b)" in msg and "grade" in msg and \
        "3 (none, mild, severe)" in msg, msg
    msg = one_line_error(build(DEFINITIONS["multilabel"]), shard)
    assert "no 'labels' field" in msg, msg


def fake_shard(fields: dict) -> Shard:
    return Shard(None, "some", "valid", 4, (SIZE, SIZE), {"fields": fields, "splits": {}})


def test_masks_and_box_categories_are_checked_against_the_definition():
    lobes = build(DEFINITIONS["segmentation"])
    PAPER_TASKS["lung"].check(fake_shard({"mask": {"type": "NDArrayField"}}))  # old binary shards
    assert "do not name their classes" in one_line_error(
        lobes, fake_shard({"mask": {"type": "NDArrayField"}}))
    assert "2 mask classes" in one_line_error(
        lobes, fake_shard({"mask": {"type": "NDArrayField", "names": ["bg", "lung"]}}))
    lobes.check(fake_shard({"mask": {"names": ["background", "l", "r"]}}))
    lesions = build(DEFINITIONS["detection"])
    two = fake_shard({"box_labels": {"names": ["a", "b"]}})
    msg = one_line_error(lesions, two)
    assert "1 a, 2 b" in msg and "box_categories 3" in msg, msg
    three = fake_shard({"box_labels": {"names": ["a", "b", "c"]}})
    lesions.check(three)
    assert lesions.unused_categories(three) == ["a"]


@pytest.fixture(scope="module")
def age_shards(tmp_path_factory):
    """A regression set: 20 images with a bone age each (10 * i months), 80/10/10 split."""
    base = tmp_path_factory.mktemp("ages")
    folder = base / "src" / "ages"
    folder.mkdir(parents=True)
    for i in range(20):
        Image.fromarray(np.full((24, 40), 10 * i, np.uint8)).save(folder / f"{i:04d}.png")

    def scan(r):
        return Scan([Record(p, p.stem, boneage=10.0 * int(p.stem)) for p in
                     sorted(r.glob("*.png"))])

    spec = DatasetSpec("ages", ("ages",), "task", ("boneage",), scan)
    convert.convert_dataset(spec, folder, base / "shards", size=(40, 24), log=lambda *_: 0)
    return base / "shards"


def test_regression_reads_its_target_and_standardizes_with_the_train_split(age_shards):
    age = build(dataclasses.replace(DEFINITIONS["regression"], dataset="ages"))
    valid = open_shard(age_shards, "ages", "valid")
    age.check(valid)  # any split: the statistics are the train split's
    train = TaskLoader(open_shard(age_shards, "ages", "train"), 4, "regression", train=False,
                       num_workers=1, target="boneage")
    values = torch.cat([b["value"] for b in train.epoch_batches(0)]).double().numpy()
    assert len(values) == valid.manifest["splits"]["train"]["count"]
    assert np.allclose(age.standardization, (values.mean(), values.std()), atol=1e-9)
    head = age.head(trunk_channels("resnet18"), config.HeadsConfig(regression_loss="mse"))
    assert (float(head.mean), float(head.std), head.loss_name) == pytest.approx(
        (values.mean(), values.std(), "mse"))
    # a summary with mean and std (as data_prep writes for "value") is used as it is
    splits = dict(valid.manifest["splits"])
    splits["train"] = {**splits["train"], "boneage": {"min": 0, "max": 1, "mean": 5.0,
                                                      "std": 2.0}}
    summarized = dataclasses.replace(valid, manifest={**valid.manifest, "splits": splits})
    assert target_stats(summarized, "boneage") == (5.0, 2.0)
    wrong = build(dataclasses.replace(DEFINITIONS["regression"], dataset="ages",
                                      target="index"))
    assert "stored as IntField" in one_line_error(wrong, valid)
