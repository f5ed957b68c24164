"""FFCV loaders: the MD-MoCo two-view loader over many shards, and task loaders.

FFCV reads, shuffles and splits samples between ranks; augmentation (``augment.py``) and the
mixing of shards run in one background thread per loader, so the training loop only pops
ready float tensors. Given a CUDA ``device``, that thread runs on it (a thread starts on GPU 0)
and writes batches into pinned memory, so ``.to(device, non_blocking=True)`` overlaps the step.
Batches are fully determined by ``(seed, epoch, step, rank, world)``:
``epoch_batches(epoch, start_step)`` replays any point of any epoch exactly.
"""

from __future__ import annotations

import math
import queue
import time
from collections.abc import Iterator
from contextlib import closing

import numba
import numpy as np
import torch

from muscle_hpc.config.definitions import check_flips
from muscle_hpc.registry import PIXEL_MEAN, PIXEL_STD

from . import augment
from .prefetch import pins, prefetch, rank_and_world
from .shards import Shard, ShardError
from .synthetic import SyntheticTaskLoader, SyntheticTwoViewLoader

# FFCV is imported where it is used (~8 s here, and optional: synthetic runs go without it).


def _order_class(rank: int, world: int, shuffle: bool, drop_uneven: bool):
    """An FFCV traversal order: one seeded permutation per epoch, split between ranks.

    Unlike FFCV's own distributed order (torch's DistributedSampler, which pads by repeating
    samples), ranks get disjoint samples; with ``drop_uneven`` the few samples that do not
    divide evenly are left out this epoch (a different few each epoch) so every rank runs
    the same number of steps. Called by ``ffcv_loader``, after ``import_ffcv``."""
    from ffcv.loader.loader import ORDER_MAP
    from ffcv.traversal_order.base import TraversalOrder

    class RankOrder(TraversalOrder):
        def sample_order(self, epoch: int):
            idx = np.asarray(self.indices)
            if shuffle:
                idx = np.random.default_rng([self.seed, epoch]).permutation(idx)
            end = len(idx) // world * world if drop_uneven else len(idx)
            return idx[rank:end:world]

    # FFCV 1.0.2 builds custom orders only through this table (its isinstance path is broken).
    ORDER_MAP[RankOrder] = RankOrder
    return RankOrder


def ffcv_loader(shard: Shard, batch_size: int, fields: tuple[str, ...], *, shuffle: bool,
                seed: int, rank: int, world: int, num_workers: int, drop_last: bool,
                drop_uneven: bool | None = None, indices: np.ndarray | None = None):
    """A raw FFCV loader of ``fields`` (numpy batches, nothing decoded beyond the bytes), over
    the samples ``indices`` of the shard (all when None)."""
    from data_prep.shard import import_ffcv

    import_ffcv()
    from ffcv.fields.basics import FloatDecoder, IntDecoder
    from ffcv.fields.ndarray import NDArrayDecoder
    from ffcv.loader import Loader, epoch_iterator

    # FFCV's GPU path (a CUDA stream per batch slot, for pipelines that end on the GPU) is
    # never ours, and it opens a CUDA context on whatever device the reading thread has,
    # GPU 0 for every rank of a node: turn it off.
    epoch_iterator.IS_CUDA = False
    decoders = {"IntField": IntDecoder, "FloatField": FloatDecoder, "NDArrayField": NDArrayDecoder}
    pipelines = {}
    for name, doc in shard.fields.items():
        pipelines[name] = [decoders[doc["type"]]()] if name in fields else None
    missing = set(fields) - set(shard.fields)
    if missing:
        raise ShardError(f"{shard.dataset}/{shard.split} has no field {sorted(missing)}")
    order = _order_class(rank, world, shuffle,
                         drop_uneven=drop_last if drop_uneven is None else drop_uneven)
    loader = Loader(str(shard.path), batch_size=batch_size, num_workers=num_workers,
                    order=order, seed=seed, pipelines=pipelines, drop_last=drop_last,
                    batches_ahead=2, indices=indices)
    loader.output_names = [n for n in shard.fields if n in fields]
    return loader


def close_epoch(it) -> None:
    """Stop an FFCV epoch iterator's reader thread and wait for it before its memory is
    unmapped (FFCV's own ``close`` unmaps at once, under a thread that may still be reading)."""
    it.terminate_event.set()
    # The reader may be blocked putting a batch into its full queue, which nobody reads any
    # more: drain it until the thread sees the event (a bare join waited out its timeout).
    deadline = time.monotonic() + 60
    while it.is_alive() and time.monotonic() < deadline:
        try:
            it.output_queue.get_nowait()
        except queue.Empty:
            it.join(0.05)
    it.close()


def epoch_arrays(loader, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Epoch ``epoch`` of a raw FFCV loader (``ffcv_loader``) from batch ``start_step`` on,
    each batch as ``{field: array}``; the epoch's reader thread is stopped however the
    iteration ends (``close_epoch``)."""
    loader.next_epoch = epoch
    names = loader.output_names
    it = iter(loader)
    try:
        for step, arrays in enumerate(it):
            if step >= start_step:
                yield dict(zip(names, arrays))
    finally:
        close_epoch(it)


class _Stream:
    """Consumes an FFCV loader a few samples at a time across its batch boundaries."""

    def __init__(self, loader):
        self.loader, self.it, self.batch, self.pos = loader, None, None, 0

    def start(self, epoch: int) -> None:
        self.loader.next_epoch = epoch
        self.it, self.batch, self.pos = iter(self.loader), None, 0

    def close(self) -> None:
        if self.it is not None:
            close_epoch(self.it)
            self.it = None

    def take(self, n: int, out: dict[str, np.ndarray] | None, rows: np.ndarray) -> None:
        """Copy the next ``n`` samples into ``out[name][rows]`` (or just skip them)."""
        done = 0
        while done < n:
            if self.batch is None or self.pos == len(self.batch[0]):
                # FFCV recycles a batch's memory only after later batches are requested,
                # so the current batch stays valid until it is fully consumed here.
                self.batch, self.pos = next(self.it), 0
            m = min(n - done, len(self.batch[0]) - self.pos)
            if out is not None:
                for name, arr in zip(self.loader.output_names, self.batch):
                    out[name][rows[done:done + m]] = arr[self.pos:self.pos + m].reshape(
                        (m, *out[name].shape[1:]))
            self.pos += m
            done += m


class _Ring:
    """Output buffers reused round-robin. Fresh large tensors per batch would page-fault on
    every first touch (as costly here as the augmentation itself). Like FFCV's own buffers, a
    batch stays valid while the next one is in use; drawing the one after that may reuse it.
    Pinned outputs are not kept here: they come fresh from torch's pinned-memory cache, which
    reuses a block only after every copy from it has finished (it records an event per
    ``non_blocking`` copy), where a ring could overwrite a batch the GPU has yet to read."""

    def __init__(self, prefetch_depth: int, make):
        self.slots = [make() for _ in range(prefetch_depth + 3)]
        self.i = -1

    def next(self) -> dict:
        self.i = (self.i + 1) % len(self.slots)
        return self.slots[self.i]


class BatchSizeError(ValueError):
    """The batch size cannot be served by these shards (said in one line)."""


class TwoViewLoader:
    """MD-MoCo batches ``(query_view, key_view)``, each (B, 1, h, w) float32, Z-scored, where
    ``view_size`` = (w, h) is the recipe's (``augment.view_size``: the shard size, or
    min(H, W) square for ``mococxr``).

    All shards are mixed at the sample level: each epoch every rank draws a seeded random
    interleaving of its samples of every shard, so a batch holds images of all datasets in
    proportion to their size, without a merged copy of the data on disk. ``views`` names the
    two views' recipe (``augment.RECIPES``; README, fidelity): ``paper`` (default) gives each
    view its own horizontal flip and rotation in ``[-max_degrees, max_degrees]``, no crop,
    blur or intensity change (the paper's choice for X-rays), which leaves the two views of an
    image with one gray-level histogram and one position; ``mococxr`` adds MoCo-CXR's random
    square crop (a translation), ``mocov2`` is MoCo v2's crop, intensity jitter and blur.
    ``len()`` is the number of full batches per epoch; the remainder is dropped.
    ``with_keys=True`` adds a (B, 2) tensor of (shard position, sample index) identifying each
    image. A batch's memory is reused once the batch after the next is drawn: copy
    (``.to(device)``, ``.clone()``) what must outlive that. ``device``: where the batches will
    be copied; a CUDA device pins them (module docstring).
    """

    def __init__(self, shards: list[Shard], batch_size: int, *, seed: int = 0,
                 max_degrees: float = 10.0, flip_prob: float = 0.5, mean: float = PIXEL_MEAN,
                 std: float = PIXEL_STD, num_workers: int = 2, distributed: bool = False,
                 sub_batch: int = 32, prefetch_depth: int = 2, with_keys: bool = False,
                 device=None, views: str = "paper"):
        if batch_size < 1:
            raise BatchSizeError("batch_size must be >= 1")
        self.rank, self.world = rank_and_world(distributed)
        self.shards, self.batch_size, self.seed = shards, batch_size, seed
        self.max_degrees, self.flip_prob, self.mean, self.std = max_degrees, flip_prob, mean, std
        self.num_workers, self.prefetch_depth = num_workers, prefetch_depth
        self.with_keys, self.device = with_keys, device
        self.width, self.height = shards[0].size  # the shards' images
        self.views = views
        self.view_size = augment.view_size(views, self.width, self.height)
        self.loaders = [ffcv_loader(s, sub_batch, ("image", "index"), shuffle=True,
                                    seed=seed + 1000 * k, rank=self.rank, world=self.world,
                                    num_workers=num_workers, drop_last=False,
                                    drop_uneven=True)  # equal counts on all ranks
                        for k, s in enumerate(shards)]
        self.counts = np.array([len(ld.first_traversal_order) for ld in self.loaders])
        self.epoch = 0
        if len(self) == 0:
            raise BatchSizeError(f"{int(self.counts.sum())} samples per rank do not fill one "
                                 f"batch of {batch_size}")

    def __len__(self) -> int:
        return int(self.counts.sum()) // self.batch_size

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.epoch_batches(epoch)

    def interleaving(self, epoch: int) -> np.ndarray:
        """Which shard each of this rank's samples of ``epoch`` comes from, in order."""
        rng = np.random.default_rng([self.seed, epoch, self.rank, 0x4D49])
        return rng.permutation(np.repeat(np.arange(len(self.shards)), self.counts))

    def _batches(self, epoch: int, start_step: int):
        streams = [_Stream(ld) for ld in self.loaders]
        for s in streams:
            s.start(epoch)
        seq = self.interleaving(epoch)
        b, h, w = self.batch_size, self.height, self.width
        view_w, view_h = self.view_size
        src_of = np.concatenate([np.arange(b), np.arange(b)])
        pinned = pins(self.device)

        def views():
            return torch.empty((2 * b, 1, view_h, view_w), dtype=torch.float32,
                               pin_memory=pinned)
        ring = _Ring(self.prefetch_depth, lambda: {
            "image": np.empty((b, h, w), np.uint8), "index": np.empty(b, np.int64),
            "views": None if pinned else views()})
        numba.set_num_threads(self.num_workers)
        try:
            yield from self._augmented(epoch, start_step, streams, seq, ring, src_of, views)
        finally:
            for s in streams:
                s.close()

    def _augmented(self, epoch, start_step, streams, seq, ring, src_of, views):
        b = self.batch_size
        for step in range(len(self)):
            which = seq[step * b:(step + 1) * b]
            raw = ring.next() if step >= start_step else None
            for k, stream in enumerate(streams):
                rows = np.flatnonzero(which == k)
                if len(rows):
                    stream.take(len(rows), raw, rows)
            if raw is None:
                continue
            params = augment.draw(self.views, self.seed, epoch, which, raw["index"],
                                  width=self.width, height=self.height,
                                  max_degrees=self.max_degrees, flip_prob=self.flip_prob)
            out = raw["views"] if raw["views"] is not None else views()
            augment.render(self.views, raw["image"], src_of, params, self.mean, self.std,
                           out.numpy())
            if self.with_keys:
                keys = torch.from_numpy(np.stack([which, raw["index"]], axis=1))
                yield out[:b], out[b:], keys
            else:
                yield out[:b], out[b:]

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator:
        """The batches of ``epoch`` from ``start_step`` on (resume mid-epoch)."""
        return prefetch(self._batches(epoch, start_step), self.prefetch_depth, self.device)


def two_view_loader(shards: list[Shard] | None, batch_size: int, data_cfg, *,
                    distributed: bool = True, device=None):
    """MD-MoCo's loader from its ``data`` config: a ``TwoViewLoader`` over ``shards``, or
    with ``data.synthetic`` random images (``synthetic.py``) made at the size of the views of
    ``data.views`` (its views are mirror images, not the recipe's). Either has ``view_size``,
    the (w, h) of its views."""
    if data_cfg.synthetic:
        size = augment.view_size(data_cfg.views, data_cfg.synthetic_width,
                                 data_cfg.synthetic_height)
        loader = SyntheticTwoViewLoader(
            data_cfg.synthetic, batch_size, size, seed=data_cfg.seed, mean=data_cfg.mean,
            std=data_cfg.std, distributed=distributed, device=device)
        loader.view_size = size
        return loader
    return TwoViewLoader(shards, batch_size, seed=data_cfg.seed,
                         max_degrees=data_cfg.max_degrees, flip_prob=data_cfg.flip_prob,
                         mean=data_cfg.mean, std=data_cfg.std, num_workers=data_cfg.num_workers,
                         distributed=distributed, device=device, views=data_cfg.views)


def task_loader(shard: Shard | None, batch_size: int, task, data_cfg, *, train: bool,
                distributed: bool = True, device=None, fraction: float = 1.0):
    """A stage's loader of one split of ``task`` (a ``muscle_hpc.tasks`` object) from its
    ``data`` config (seed, flip, Z-score, workers): ``train=True`` for the training split,
    ``False`` to evaluate. A ``TaskLoader`` over ``shard`` reading the fields of the task's kind
    (a regression task's ``target``), or with ``data.synthetic`` random images of the task's
    kind and classes. A training loader that flips swaps the classes a flip mirrors
    (``task.flip_swap``), and refuses a task whose side-naming classes have no mirror."""
    flips = train and data_cfg.flip_prob > 0
    if flips:
        check_flips(task.definition, data_cfg.flip_prob)
    if data_cfg.synthetic:
        return SyntheticTaskLoader(
            task.kind, data_cfg.synthetic, batch_size,
            (data_cfg.synthetic_width, data_cfg.synthetic_height), train=train,
            num_classes=len(task.classes),
            box_categories=task.definition.box_categories or (1,), seed=data_cfg.seed,
            mean=data_cfg.mean, std=data_cfg.std, distributed=distributed, device=device)
    return TaskLoader(shard, batch_size, task.kind, train=train, seed=data_cfg.seed,
                      flip_prob=data_cfg.flip_prob, mean=data_cfg.mean, std=data_cfg.std,
                      num_workers=data_cfg.num_workers, distributed=distributed, device=device,
                      fraction=fraction, target=task.definition.target,
                      flip_swap=task.flip_swap() if flips else None)


def subset_size(count: int, fraction: float) -> int:
    """How many of ``count`` samples a training ``fraction`` asks for: ``ceil``, at least one."""
    return max(1, math.ceil(fraction * count))


def subset(count: int, fraction: float, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """The sample indices a training ``fraction`` keeps, sorted: whole groups (patients), in
    an order drawn by ``seed`` alone, until ``subset_size`` samples are reached. So every init
    and rank of a run gets the same subset, and the subsets of one seed are nested (1 % lies
    in 10 %: each is a prefix of one group order). ``groups``: each sample's group (the
    converter's ``SPLIT.groups.npy``); None: every sample its own. A subset may exceed its
    size by the last patient's other images; it never splits a patient."""
    groups = np.arange(count) if groups is None else np.asarray(groups)
    names, inverse = np.unique(groups, return_inverse=True)
    order = np.random.default_rng([seed, 0x5CA4CE]).permutation(len(names))
    sizes = np.bincount(inverse, minlength=len(names))[order]
    taken = int(np.searchsorted(np.cumsum(sizes), subset_size(count, fraction))) + 1
    return np.flatnonzero(np.isin(inverse, order[:taken]))


def train_subset(shard: Shard, fraction: float, seed: int) -> np.ndarray:
    """``subset`` of ``shard`` by its patients (every index when ``fraction`` is 1)."""
    if fraction >= 1:
        return np.arange(shard.count)
    return subset(shard.count, fraction, seed, shard.groups())


# The shard fields each kind reads; a regression task reads its ``target`` field instead of
# "value" (the field CSV datasets store; RSNA Bone Age's is "boneage").
TASK_FIELDS = {
    "classification": ("label",),
    "multilabel": ("labels",),
    "regression": ("value",),
    "segmentation": ("mask",),
    "detection": ("boxes", "box_labels", "num_boxes"),
}


class TaskLoader:
    """Batches of one task shard as a dict: ``image`` (B, 1, H, W) float32 Z-scored, ``index``,
    and per kind ``label`` (B,) int64 / ``labels`` (B, C) float32 / ``value`` (B,) float32, the
    ``target`` field of a regression shard / ``mask`` (B, H, W) int64 / ``boxes`` +
    ``box_labels`` (lists of per-image tensors, xyxy pixels, torchvision's format).

    ``train=True`` shuffles per epoch and flips horizontally (mask and boxes with the image);
    otherwise order is fixed, nothing is flipped and the last partial batch is kept.
    ``flip_swap``: {stored class value: its mirror's}, applied to a flipped image's mask
    values, label, label columns or box categories, so that a flipped left stays "left" in
    the sense the unflipped images teach (the patient's left on the image's right).
    ``device``: where the batches will be copied; a CUDA device pins image and mask.
    ``fraction`` < 1: only that fraction of the split, whole patients drawn by ``seed``
    (``train_subset``), for label-scarce training; ``examples``: the images used.
    """

    def __init__(self, shard: Shard, batch_size: int, kind: str, *, train: bool,
                 seed: int = 0, flip_prob: float = 0.5, mean: float = PIXEL_MEAN,
                 std: float = PIXEL_STD, num_workers: int = 2, distributed: bool = False,
                 prefetch_depth: int = 2, device=None, fraction: float = 1.0,
                 target: str = "value", flip_swap: dict[int, int] | None = None):
        if kind not in TASK_FIELDS:
            raise ValueError(f"kind must be one of {', '.join(TASK_FIELDS)}, not {kind!r}")
        self.rank, self.world = rank_and_world(distributed)
        self.kind, self.train, self.seed, self.shard = kind, train, seed, shard
        self.fields = (target,) if kind == "regression" else TASK_FIELDS[kind]
        self.flip_prob = flip_prob if train else 0.0
        swap = flip_swap or {}
        self.mirror = np.arange(max([256, *(k + 1 for k in swap)]), dtype=np.int64)
        self.mirror[list(swap)] = list(swap.values())
        self.mirrors = bool(swap)
        self.mean, self.std, self.num_workers = mean, std, num_workers
        self.prefetch_depth, self.device = prefetch_depth, device
        self.width, self.height = shard.size
        self.indices = None if fraction >= 1 else train_subset(shard, fraction, seed)
        self.examples = shard.count if self.indices is None else len(self.indices)
        if self.indices is not None and train and len(self.indices) < batch_size * self.world:
            raise ValueError(f"a fraction {fraction} of {shard.dataset}/{shard.split} is "
                             f"{len(self.indices)} images, less than one batch of "
                             f"{batch_size * self.world}")
        self.loader = ffcv_loader(shard, batch_size, ("image", "index", *self.fields),
                                  shuffle=train, seed=seed, rank=self.rank, world=self.world,
                                  num_workers=num_workers, drop_last=train, indices=self.indices)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.epoch_batches(epoch)

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator:
        return prefetch(self._batches(epoch, start_step), self.prefetch_depth, self.device)

    def _batches(self, epoch: int, start_step: int):
        numba.set_num_threads(self.num_workers)
        with closing(epoch_arrays(self.loader, epoch, start_step)) as batches:
            for raw in batches:
                yield self._to_batch(epoch, raw)

    def _to_batch(self, epoch: int, raw: dict) -> dict:
        b, h, w = len(raw["image"]), self.height, self.width
        index = raw["index"].reshape(b).astype(np.int64)
        flip = augment.uniforms(self.seed, epoch, np.zeros(b, np.int64), index, 0, 0) < \
            self.flip_prob
        pinned = pins(self.device)
        image = torch.empty((b, 1, h, w), dtype=torch.float32, pin_memory=pinned)
        augment.rotate_flip_normalize(raw["image"].reshape(b, h, w), np.arange(b),
                                      np.zeros(b), flip, self.mean, self.std, image.numpy())
        batch = {"image": image, "index": torch.from_numpy(index)}
        swap = flip if self.mirrors else np.zeros(b, bool)
        if self.kind == "classification":
            label = raw["label"].reshape(b).astype(np.int64)
            label[swap] = self.mirror[label[swap]]
            batch["label"] = torch.from_numpy(label)
        elif self.kind == "multilabel":
            labels = raw["labels"].reshape(b, -1).astype(np.float32)
            labels[swap] = labels[swap][:, self.mirror[:labels.shape[1]]]
            batch["labels"] = torch.from_numpy(labels)
        elif self.kind == "regression":
            batch["value"] = torch.from_numpy(raw[self.fields[0]].reshape(b).astype(np.float32))
        elif self.kind == "segmentation":
            mask = np.empty((b, h, w), np.uint8)
            augment.flip_copy(raw["mask"].reshape(b, h, w), flip, mask)
            mask[swap] = self.mirror[mask[swap]]
            batch["mask"] = torch.empty((b, h, w), dtype=torch.int64, pin_memory=pinned)
            batch["mask"].numpy()[...] = mask
        else:
            counts = raw["num_boxes"].reshape(b)
            boxes, labels = [], []
            for i in range(b):
                bx = raw["boxes"][i, :counts[i]].astype(np.float32).copy()
                if flip[i]:
                    bx[:, [0, 2]] = w - bx[:, [2, 0]]
                boxes.append(torch.from_numpy(bx))
                cats = raw["box_labels"][i, :counts[i]].astype(np.int64)
                labels.append(torch.from_numpy(self.mirror[cats] if swap[i] else cats))
            batch["boxes"], batch["box_labels"] = boxes, labels
        return batch
