"""``data.synthetic``: random images with the shard loaders' contract, so every stage runs where
no dataset is converted or FFCV is missing (the GPU check runs on them)."""

import pytest
import torch

from muscle_hpc import config, registry
from muscle_hpc.data.loaders import task_loader, two_view_loader
from muscle_hpc.data.synthetic import SyntheticTaskLoader, SyntheticTwoViewLoader
from muscle_hpc.stages import continual, finetune, mdmoco
from muscle_hpc.tasks import PAPER_TASKS


def test_two_views_are_z_scored_mirror_images_replayed_from_any_step():
    loader = SyntheticTwoViewLoader(20, 4, (12, 8), seed=3, mean=100.0, std=20.0)
    assert len(loader) == 5
    batches = list(loader.epoch_batches(0))
    assert len(batches) == 5
    q, k = batches[0]
    assert q.shape == (4, 1, 8, 12) and torch.equal(k, q.flip(-1))
    gray = q * 20.0 + 100.0
    torch.testing.assert_close(gray, gray.round(), atol=1e-4, rtol=0)
    assert gray.min() >= 0 and gray.max() <= 255
    again = SyntheticTwoViewLoader(20, 4, (12, 8), seed=3, mean=100.0, std=20.0)
    tail = list(again.epoch_batches(0, start_step=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[3:], tail, strict=True))
    other_epoch = next(iter(again.epoch_batches(1)))[0]
    assert not torch.equal(other_epoch, q)
    with pytest.raises(ValueError, match="do not fill one batch"):
        SyntheticTwoViewLoader(3, 4, (12, 8))


@pytest.mark.parametrize("task", sorted(PAPER_TASKS))
def test_task_batches_have_the_kind_of_the_task(task):
    kind = PAPER_TASKS[task].kind
    loader = SyntheticTaskLoader(kind, 10, 4, (40, 24), train=True, box_categories=(1, 2))
    assert len(loader) == 2
    batch = next(iter(loader.epoch_batches(0)))
    assert batch["image"].shape == (4, 1, 24, 40) and batch["index"].shape == (4,)
    if kind == "classification":
        assert set(batch["label"].tolist()) <= {0, 1}
    elif kind == "segmentation":
        mask = batch["mask"]
        assert mask.shape == (4, 24, 40) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) == {0, 1}
    else:
        for boxes, labels in zip(batch["boxes"], batch["box_labels"], strict=True):
            assert boxes.shape[1] == 4 and len(boxes) == len(labels) >= 1
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert (boxes[:, 2] <= 40).all() and (boxes[:, 3] <= 24).all()
            assert set(labels.tolist()) <= {1, 2}


@pytest.mark.parametrize("kind", registry.KINDS)
def test_every_kind_has_synthetic_batches_of_its_classes(kind):
    """Four classes (box categories 3, 5, 7, 9): a task of any kind runs without shards."""
    loader = SyntheticTaskLoader(kind, 32, 8, (48, 32), train=True, num_classes=4,
                                 box_categories=(3, 5, 7, 9))
    batches = list(loader.epoch_batches(0))
    assert len(batches) == 4
    if kind == "classification":
        labels = torch.cat([b["label"] for b in batches])
        assert labels.dtype == torch.int64 and set(labels.tolist()) == {0, 1, 2, 3}
    elif kind == "multilabel":
        labels = torch.cat([b["labels"] for b in batches])
        assert labels.shape == (32, 4) and labels.dtype == torch.float32
        assert set(labels.unique().tolist()) == {0.0, 1.0} and (labels.sum(1) > 1).any()
    elif kind == "regression":
        values = torch.cat([b["value"] for b in batches])
        assert values.shape == (32,) and values.dtype == torch.float32
        assert len(values.unique()) == 32 and abs(float(values.mean())) < 1
    elif kind == "segmentation":
        mask = torch.cat([b["mask"] for b in batches])
        assert mask.dtype == torch.int64 and set(mask.unique().tolist()) == {0, 1, 2, 3}
    else:
        labels = torch.cat([x for b in batches for x in b["box_labels"]])
        assert set(labels.tolist()) == {3, 5, 7, 9}
    again = list(SyntheticTaskLoader(kind, 32, 8, (48, 32), train=True, num_classes=4,
                                     box_categories=(3, 5, 7, 9)).epoch_batches(0, 2))
    key = {"classification": "label", "multilabel": "labels", "regression": "value",
           "segmentation": "mask", "detection": "box_labels"}[kind]
    for a, b in zip(batches[2:], again, strict=True):  # replayed from a step
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key], strict=True))


def test_evaluation_splits_keep_every_image_in_order():
    loader = SyntheticTaskLoader("classification", 10, 4, (16, 16), train=False)
    batches = list(loader.epoch_batches(0))
    assert [len(b["index"]) for b in batches] == [4, 4, 2]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(10))


def test_stages_check_no_shards_when_synthetic(tmp_path):
    """With data.synthetic the stages start without a shard folder, and the loaders they
    build from their configs are the synthetic ones."""
    missing = f"data.root={tmp_path / 'none'}"
    inputs = mdmoco.prepare(mdmoco.load(None, [missing, "data.synthetic=16", "data.batch_size=4",
                                               "model.K=16", "model.bn_groups=2",
                                               "run.allow_cpu=true"]), 1, False)
    cfg, shards = inputs.cfg, inputs.shards
    assert shards is None and inputs.knn_shards is None
    assert isinstance(two_view_loader(shards, 4, cfg.data, distributed=False),
                      SyntheticTwoViewLoader)
    inputs = continual.prepare(continual.load(None, [missing, "data.synthetic=8", "model.init=''",
                                                     "run.allow_cpu=true"]), 1, False)
    cfg, shards = inputs.cfg, inputs.shards
    assert shards == {t: {"train": None, "valid": None} for t in cfg.data.tasks}
    loader = task_loader(None, 2, PAPER_TASKS["tbx"], cfg.data, train=True, distributed=False)
    assert loader.box_categories == (1, 2) and (loader.width, loader.height) == (800, 500)
    sel = registry.FinetuneRun("lung", "scratch", "r18")
    cfg = finetune.load(None, [missing, "data.synthetic=8", "run.allow_cpu=true"])
    shards = finetune.prepare(cfg, 1, False, sel).shards
    assert shards == {"train": None, "valid": None, "test": None}


def test_synthetic_counts_are_checked():
    with pytest.raises(config.ConfigError, match="data.synthetic: must be >= 0"):
        config.load_config(None, ["data.synthetic=-1"])
    with pytest.raises(config.ConfigError, match="data.synthetic_width: must be >= 32"):
        config.load(None, ["data.synthetic_width=8"], config.FinetuneConfig)
