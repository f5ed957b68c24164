"""The MD-MoCo two-view loader and the task loaders over real FFCV shards."""

import os
import threading
from collections import Counter
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from muscle_hpc.data import (
    ShardError,
    TaskLoader,
    TwoViewLoader,
    open_shard,
    pretrain_shards,
)
from muscle_hpc.registry import PIXEL_MEAN, PIXEL_STD


def _values(view):
    """The stored gray level of each image, read at its centre (rotation keeps the centre)."""
    return torch.round(view[:, 0, 12, 20] * PIXEL_STD + PIXEL_MEAN).long().tolist()


def test_two_views_mix_all_shards_once_per_epoch(flat_shards):
    shards = pretrain_shards(flat_shards, ["dark", "bright"])
    loader = TwoViewLoader(shards, batch_size=8, seed=5, num_workers=1, with_keys=True)
    assert len(loader) == (23 + 11) // 8
    seen, mixed_batches = [], 0
    for q, k, keys in loader:
        assert q.shape == k.shape == (8, 1, 24, 40) and q.dtype == torch.float32
        assert _values(q) == _values(k)  # two views of the same images
        assert _values(q) == [[40, 200][s] for s in keys[:, 0].tolist()]
        mixed_batches += len(set(keys[:, 0].tolist())) == 2
        seen += [tuple(x) for x in keys.tolist()]
    assert len(seen) == len(set(seen)) == 32  # each sample at most once, remainder dropped
    assert mixed_batches >= 2
    assert not torch.equal(q, k)  # views are augmented independently


def test_normalisation_is_the_papers_z_score(flat_shards):
    loader = TwoViewLoader(pretrain_shards(flat_shards, ["dark"]), 4, max_degrees=0,
                           flip_prob=0, num_workers=1)
    q, _ = next(iter(loader))
    torch.testing.assert_close(q, torch.full_like(q, (40 - 122.786) / 18.390))


def test_batches_replay_exactly_from_any_step(flat_shards):
    shards = pretrain_shards(flat_shards, ["dark", "bright"])
    a = TwoViewLoader(shards, 4, seed=1, num_workers=1)
    full = list(a.epoch_batches(3))
    tail = list(TwoViewLoader(shards, 4, seed=1, num_workers=2).epoch_batches(3, start_step=5))
    assert len(tail) == len(full) - 5
    for (q1, k1), (q2, k2) in zip(full[5:], tail):
        assert torch.equal(q1, q2) and torch.equal(k1, k2)
    other_epoch = list(a.epoch_batches(4))
    assert not torch.equal(other_epoch[0][0], full[0][0])


def test_missing_shard_is_one_line(tmp_path, flat_shards):
    with pytest.raises(ShardError, match="no manifest.json"):
        pretrain_shards(tmp_path, ["nih"])
    (tmp_path / "dark").mkdir()
    manifest = (flat_shards / "dark" / "manifest.json").read_text()
    (tmp_path / "dark" / "manifest.json").write_text(manifest)
    with pytest.raises(ShardError, match="listed in the manifest but missing"):
        open_shard(tmp_path, "dark", "train")


def _rank_main(rank, world, init_file, shard_root, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    shards = pretrain_shards(shard_root, ["dark", "bright"])
    # batches of 2: 23 + 11 samples split unevenly per shard would give rank 0 one more step
    loader = TwoViewLoader(shards, 2, seed=2, num_workers=1, distributed=True, with_keys=True)


    task = TaskLoader(open_shard(shard_root, "dark", "train"), 3, "classification", train=True,
                      num_workers=1, distributed=True)
    for epoch in range(2):
        keys = [tuple(x) for _, _, kk in loader for x in kk.tolist()]
        idx = [i for b in task for i in b["index"].tolist()]
        np.save(os.path.join(out_dir, f"moco_{rank}_{epoch}.npy"), np.array(keys))
        np.save(os.path.join(out_dir, f"task_{rank}_{epoch}.npy"), np.array(idx))
        steps = torch.tensor([len(keys) // 2, len(loader)])
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        assert steps.tolist() == [len(keys) // 2, len(loader)], "ranks' step counts differ"
    dist.destroy_process_group()


def test_two_gloo_ranks_see_disjoint_samples(tmp_path, flat_shards):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), flat_shards, str(tmp_path)),
             nprocs=2, join=True)
    for epoch in range(2):
        m0, m1 = (set(map(tuple, np.load(tmp_path / f"moco_{r}_{epoch}.npy"))) for r in (0, 1))
        assert m0 and m1 and not (m0 & m1)
        t0, t1 = (np.load(tmp_path / f"task_{r}_{epoch}.npy") for r in (0, 1))
        assert len(t0) == len(t1) > 0
        assert not set(t0) & set(t1)
        assert Counter(t0.tolist()).most_common(1)[0][1] == 1
    e0 = np.load(tmp_path / "task_0_0.npy")
    e1 = np.load(tmp_path / "task_0_1.npy")
    assert e0.tolist() != e1.tolist()  # reshuffled per epoch


def test_leaving_an_epoch_early_stops_every_loader_thread(flat_shards):
    """A run that stops mid-epoch (signal, max_steps) must not leave reader threads inside
    numba or FFCV code: at interpreter exit they abort the process."""
    moco = TwoViewLoader(pretrain_shards(flat_shards, ["dark", "bright"]), 2, num_workers=1)
    task = TaskLoader(open_shard(flat_shards, "dark", "train"), 2, "classification", train=True,
                      num_workers=1)
    before = set(threading.enumerate())
    for loader in (moco, task):
        with closing(loader.epoch_batches(0)) as batches:
            next(batches)
            assert len(threading.enumerate()) > len(before)  # reader threads were running
        assert set(threading.enumerate()) <= before


FFCV_ON_A_GPU_HOST = """
import sys, torch
torch.cuda.is_available = lambda: True  # a GPU node, as FFCV sees it when imported

def refuse(*args, **kwargs):
    raise RuntimeError("FFCV made a CUDA call")

torch.cuda.current_stream = torch.cuda.Stream = torch.cuda.Event = refuse
from muscle_hpc.data import TaskLoader, TwoViewLoader, open_shard, pretrain_shards
task = TaskLoader(open_shard(sys.argv[1], "dark", "train"), 4, "classification", train=True,
                  num_workers=1)
moco = TwoViewLoader(pretrain_shards(sys.argv[1], ["dark"]), 4, num_workers=1)
print(sum(len(b["image"]) for b in task), sum(len(q) for q, _ in moco))
"""


def test_ffcv_never_touches_cuda_on_a_gpu_host(flat_shards):
    """FFCV's reader makes CUDA streams and events on the reading thread's device (GPU 0 for
    every rank of a node) whenever CUDA is present; our loaders never use its GPU path."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FFCV_ON_A_GPU_HOST, str(flat_shards)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["20", "20"]


def _views_by_key(batches):
    """{(shard, index): (query view, key view)} of every image of ``batches``."""
    return {tuple(key): (q[i].clone(), k[i].clone())
            for q, k, keys in batches for i, key in enumerate(keys.tolist())}


@pytest.mark.parametrize("views", ["mococxr", "mocov2"])
def test_a_recipe_gives_each_image_its_views_in_any_batch_and_on_resume(task_shards, views):
    """Every recipe's views are a pure function of (seed, epoch, image): another batch size,
    another number of threads or a resumed epoch gives each image the same two views."""
    shards = pretrain_shards(task_shards, ["pneumonia", "mura"])  # 128x80 chest-like images
    loader = TwoViewLoader(shards, 4, seed=2, num_workers=1, with_keys=True, views=views)
    assert loader.view_size == {"mococxr": (80, 80), "mocov2": (128, 80)}[views]
    full = _views_by_key(loader.epoch_batches(1))
    q, k = next(iter(full.values()))
    assert q.shape == k.shape == (1, 80, loader.view_size[0])
    other = TwoViewLoader(shards, 6, seed=2, num_workers=2, with_keys=True, views=views)
    resumed = _views_by_key(other.epoch_batches(1, start_step=2))
    common = full.keys() & resumed.keys()
    assert len(common) >= 30
    for key in common:
        assert all(torch.equal(a, b) for a, b in zip(full[key], resumed[key])), key
    assert sum(not torch.equal(q, k) for q, k in full.values()) == len(full)
    again = _views_by_key(loader.epoch_batches(2))
    assert sum(torch.equal(full[key][0], again[key][0]) for key in full.keys() & again.keys()) \
        == 0  # a new epoch, new views


def test_mocov2_views_of_one_image_differ_in_gray_levels(flat_shards):
    """The cue the paper's views leave: both views of a flat image keep its gray level."""
    shards = pretrain_shards(flat_shards, ["dark", "bright"])
    q, k = next(iter(TwoViewLoader(shards, 16, seed=2, num_workers=1, views="mocov2")))
    assert (q.shape, k.shape) == ((16, 1, 24, 40),) * 2
    levels = torch.stack([q.mean(dim=(1, 2, 3)), k.mean(dim=(1, 2, 3))]) * PIXEL_STD + PIXEL_MEAN
    assert (levels[0] - levels[1]).abs().gt(1).float().mean() > 0.5
    paper_q, paper_k = next(iter(TwoViewLoader(shards, 16, seed=2, num_workers=1, max_degrees=0)))
    torch.testing.assert_close(paper_q.mean(dim=(1, 2, 3)), paper_k.mean(dim=(1, 2, 3)))


def test_data_views_is_checked_by_the_config_and_sizes_the_views(tmp_path):
    from muscle_hpc import config
    from muscle_hpc.data import augment
    from muscle_hpc.data.loaders import two_view_loader

    demo = Path(__file__).parents[1] / "configs" / "mdmoco_demo.yaml"
    assert config.load_config(demo).data.views == "paper"
    with pytest.raises(config.ConfigError) as e:
        config.load_config(demo, ["data.views=simclr"])
    assert str(e.value) == "data.views: 'simclr' is not one of paper, mococxr, mocov2"
    assert config.mdmoco.MocoDataConfig.__dataclass_fields__["views"].metadata["choices"] == \
        augment.RECIPES
    cfg = config.load_config(demo, ["data.views=mococxr", "data.synthetic=8",
                             "data.synthetic_width=64", "data.synthetic_height=40"])
    loader = two_view_loader(None, 4, cfg.data, distributed=False)
    q, k = next(iter(loader.epoch_batches(0)))
    assert loader.view_size == (40, 40) and q.shape == k.shape == (4, 1, 40, 40)


def test_a_training_fraction_is_one_seeded_subset(task_shards):
    shard = open_shard(task_shards, "pneumonia", "train")

    def indices(seed):
        return TaskLoader(shard, 2, "classification", train=True, seed=seed, num_workers=1,
                          fraction=0.25).indices

    kept = indices(3)
    assert len(kept) >= 8 == 0.25 * shard.count and len(set(kept.tolist())) == len(kept)
    groups = shard.groups()  # whole patients: every image of a kept patient is kept
    assert set(kept) == set(np.flatnonzero(np.isin(groups, groups[kept])))
    assert np.array_equal(kept, indices(3)) and not np.array_equal(kept, indices(4))
    loader = TaskLoader(shard, 2, "classification", train=True, seed=3, num_workers=1,
                        fraction=0.25)
    seen = [i for b in loader.epoch_batches(0) for i in b["index"].tolist()]
    assert set(seen) <= set(kept) and len(seen) == len(kept) // 2 * 2  # whole batches only
    with pytest.raises(ValueError, match=r"is \d images, less than one batch of 16"):
        TaskLoader(shard, 16, "classification", train=True, num_workers=1, fraction=0.01)
