"""The streams of a semi-supervised stage (MultiMix): a task's labelled images (the fine-tune
stage's patient-grouped ``fraction``) and the rest of its training split without their labels.

A ``Stream`` reads only the fields it is given: an unlabelled stream reads the image and its
index, never the label or the mask, so no label of an unlabelled image can reach a loss. Each
stream is endless: a pass over its images, reshuffled by ``(seed, pass)`` and split between
ranks as the task loaders split theirs, then the next pass. ``batches(step)`` starts at any
global step (pass ``step // len``, batch ``step % len``), so a resumed run reads exactly what
the uninterrupted run would have, and streams of different lengths cycle independently.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing

import numpy as np
import torch

from muscle_hpc.weights import z_score

from . import randaugment
from .loaders import epoch_arrays, ffcv_loader, train_subset
from .prefetch import rank_and_world
from .shards import Shard


def labelled_indices(shard: Shard, fraction: float, seed: int) -> np.ndarray:
    """The training images whose labels a ``fraction`` keeps (``train_subset``: the
    fine-tune stage's subset, the same for every init)."""
    return train_subset(shard, fraction, seed)


def unlabelled_indices(shard: Shard, fraction: float, seed: int) -> np.ndarray:
    """The rest of the training split, used without labels. With ``fraction`` 1 there is no
    rest: the labelled images serve as the unlabelled ones too (the authors' code leaves this
    case empty; its commented-out line uses the labelled set)."""
    kept = labelled_indices(shard, fraction, seed)
    rest = np.setdiff1d(np.arange(shard.count), kept)
    return rest if len(rest) else kept


class Stream:
    """Endless batches of ``fields`` (besides ``image`` and ``index``) of ``indices`` of
    ``shard``: per rank ``batch_size`` images, numpy arrays, with the pass they belong to.

    Args:
        shard: a task's training shard.
        batch_size: images per rank and step.
        fields: the shard fields to read besides the image: ``("label",)``, ``("mask",)``
            or none (an unlabelled stream).
        indices: the samples of the shard to stream.
        seed: the shuffling's seed (``data.seed``).
        num_workers: FFCV's decoding threads.
        distributed: split the samples between the ranks of the process group.
    """

    def __init__(self, shard: Shard, batch_size: int, fields: tuple[str, ...],
                 indices: np.ndarray, seed: int, num_workers: int = 1,
                 distributed: bool = True):
        rank, world = rank_and_world(distributed)
        if len(indices) < batch_size * world:
            raise ValueError(f"{shard.dataset}/{shard.split}: {len(indices)} images, less than "
                             f"one batch of {batch_size * world}")
        self.shard, self.fields = shard, fields
        self.width, self.height = shard.size
        self.loader = ffcv_loader(shard, batch_size, ("image", "index", *fields), shuffle=True,
                                  seed=seed, rank=rank, world=world, num_workers=num_workers,
                                  drop_last=True, indices=np.asarray(indices))
        self.examples = len(indices)

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, step: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(pass, batch) from global ``step`` on, forever; ``batch``: ``image`` (B, H, W)
        uint8, ``index`` (B,) int64 and the stream's fields."""
        epoch, skip = divmod(step, len(self))
        b, h, w = self.loader.batch_size, self.height, self.width
        while True:
            with closing(epoch_arrays(self.loader, epoch, skip)) as batches:
                for raw in batches:
                    batch = {"image": raw["image"].reshape(b, h, w),
                             "index": raw["index"].reshape(b).astype(np.int64)}
                    if "label" in raw:
                        batch["label"] = raw["label"].reshape(b).astype(np.int64)
                    if "mask" in raw:
                        batch["mask"] = raw["mask"].reshape(b, h, w)
                    yield epoch, batch
            epoch, skip = epoch + 1, 0


def z_scored(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """uint8 (B, H, W) to float32 (B, 1, H, W), Z-scored as the loaders do it."""
    return z_score(images, mean, std)[:, None]


def views(batch: dict, kind: str, seed: int, epoch: int) -> np.ndarray:
    """The weak or strong view (``randaugment.view``) of each image of a stream's batch."""
    return np.stack([randaugment.view(im, kind, seed, epoch, int(i))
                     for im, i in zip(batch["image"], batch["index"])])
