"""Loaders of random images made in memory, with the contract of the shard loaders.

``data.synthetic=N`` gives a stage these instead of its shards: N images per split (the
training set of MD-MoCo; each split of a task), of ``data.synthetic_width`` x
``synthetic_height``, with labels, masks and boxes of the task's kind. A stage then runs end to
end (ranks, GPUs, NCCL, checkpoints, resume, validation, exports) with no dataset converted and
without FFCV installed: a check of a cluster before the data is there, and what ``bench.stages``
runs on a GPU host that lacks FFCV's native libraries. Nothing is learned from them.

Batches are determined by ``(seed, epoch, step, rank)``, so a resumed run reads what the
uninterrupted run read. They pass through the same prefetch thread, and on a CUDA ``device``
the same pinned memory, as the shard loaders' batches.
"""

from __future__ import annotations

import torch

from .prefetch import pins, prefetch, rank_and_world


def _generator(*key: int) -> torch.Generator:
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + int(k)) % (2**63)
    return torch.Generator().manual_seed(seed)


class _Images:
    """A rank's images as uint8, Z-scored into (pinned) float batches on demand."""

    def __init__(self, count: int, size: tuple[int, int], seed: int, rank: int, mean: float,
                 std: float, device):
        w, h = size
        self.gray = torch.randint(0, 256, (count, h, w), dtype=torch.uint8,
                                  generator=_generator(seed, rank, 0x5E1))
        self.mean, self.std, self.pinned = mean, std, pins(device)

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        out = torch.empty((len(index), 1, *self.gray.shape[1:]), pin_memory=self.pinned)
        torch.sub(self.gray[index].unsqueeze(1), self.mean, out=out)
        return out.div_(self.std)


class SyntheticTwoViewLoader:
    """``TwoViewLoader``'s batches ``(query_view, key_view)`` from ``count`` random images per
    rank; the key view is the query view mirrored."""

    shards: list = []

    def __init__(self, count: int, batch_size: int, size: tuple[int, int], *, seed: int = 0,
                 mean: float = 0.0, std: float = 1.0, distributed: bool = False, device=None,
                 prefetch_depth: int = 2):
        self.rank, self.world = rank_and_world(distributed)
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.prefetch_depth = prefetch_depth
        self.images = _Images(count // self.world, size, seed, self.rank, mean, std, device)
        if len(self) == 0:
            raise ValueError(f"{count // self.world} synthetic images per rank do not fill one "
                             f"batch of {batch_size}")

    def __len__(self) -> int:
        return len(self.images.gray) // self.batch_size

    def epoch_batches(self, epoch: int, start_step: int = 0):
        return prefetch(self._batches(epoch, start_step), self.prefetch_depth, self.device)

    def _batches(self, epoch: int, start_step: int):
        order = torch.randperm(len(self.images.gray), generator=_generator(self.seed, epoch,
                                                                           self.rank))
        b = self.batch_size
        for step in range(start_step, len(self)):
            views = self.images.batch(order[step * b:(step + 1) * b])
            yield views, views.flip(-1)


class SyntheticTaskLoader:
    """``TaskLoader``'s batches for a task of ``kind`` from ``count`` random images of the
    split, with random targets of the kind (``num_classes``: the task's number of classes):

    - classification: ``label`` (B,) int64, uniform among ``num_classes``;
    - multilabel: ``labels`` (B, num_classes) float32, each finding 0 or 1 with probability ½;
    - regression: ``value`` (B,) float32, standard normal (the unit of a task whose head is not
      standardized, as on synthetic data: ``tasks.RegressionTask``);
    - segmentation: ``mask`` (B, H, W) int64: a random rectangle of class 1, then one of each
      further class 2..K-1 drawn over it (later classes on top), background 0 elsewhere;
    - detection: one or two boxes per image, each of a category id in ``box_categories``.

    Training splits are reshuffled per epoch and cut to whole batches; evaluation splits keep
    every image, in order."""

    shard = None

    def __init__(self, kind: str, count: int, batch_size: int, size: tuple[int, int], *,
                 train: bool, num_classes: int = 2, box_categories: tuple[int, ...] = (1,),
                 seed: int = 0, mean: float = 0.0, std: float = 1.0, distributed: bool = False,
                 device=None, prefetch_depth: int = 2):
        self.rank, self.world = rank_and_world(distributed)
        self.kind, self.train, self.seed = kind, train, seed
        self.batch_size, self.device, self.prefetch_depth = batch_size, device, prefetch_depth
        self.num_classes, self.box_categories = num_classes, tuple(box_categories)
        self.width, self.height = size
        n = count // self.world if train else len(range(self.rank, count, self.world))
        self.images = _Images(n, size, seed + 7919 * train, self.rank, mean, std, device)
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.images.gray)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.epoch_batches(epoch)

    def epoch_batches(self, epoch: int, start_step: int = 0):
        return prefetch(self._batches(epoch, start_step), self.prefetch_depth, self.device)

    def _batches(self, epoch: int, start_step: int):
        n = len(self.images.gray)
        order = (torch.randperm(n, generator=_generator(self.seed, epoch, self.rank))
                 if self.train else torch.arange(n))
        for step in range(start_step, len(self)):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield self._targets(index, _generator(self.seed, epoch, self.rank, step, 1))

    def _targets(self, index: torch.Tensor, g: torch.Generator) -> dict:
        b, h, w = len(index), self.height, self.width
        batch = {"image": self.images.batch(index), "index": index.clone()}
        if self.kind == "classification":
            batch["label"] = torch.randint(0, self.num_classes, (b,), generator=g)
        elif self.kind == "multilabel":
            batch["labels"] = torch.randint(0, 2, (b, self.num_classes), generator=g).float()
        elif self.kind == "regression":
            batch["value"] = torch.randn((b,), generator=g)
        elif self.kind == "segmentation":
            mask = torch.zeros((b, h, w), dtype=torch.int64, pin_memory=pins(self.device))
            for c in range(1, max(self.num_classes, 2)):
                for i, (x0, y0, x1, y1) in enumerate(self._boxes(b, g).tolist()):
                    mask[i, int(y0):int(y1), int(x0):int(x1)] = c
            batch["mask"] = mask
        elif self.kind == "detection":
            counts = torch.randint(1, 3, (b,), generator=g).tolist()
            batch["boxes"] = [self._boxes(c, g) for c in counts]
            ids = torch.tensor(self.box_categories)
            batch["box_labels"] = [ids[torch.randint(0, len(ids), (c,), generator=g)]
                                   for c in counts]
        else:
            raise ValueError(f"no synthetic batches for task kind {self.kind!r}")
        return batch

    def _boxes(self, n: int, g: torch.Generator) -> torch.Tensor:
        """``n`` boxes (xyxy pixels) of a tenth to a half of the image on each side."""
        wh = torch.tensor([self.width, self.height], dtype=torch.float32)
        extent = (0.1 + 0.4 * torch.rand((n, 2), generator=g)) * wh
        corner = torch.rand((n, 2), generator=g) * (wh - extent)
        return torch.cat([corner, corner + extent], dim=1).floor()
