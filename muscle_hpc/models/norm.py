"""Batch norm over groups of the batch, and whose statistics span ranks.

- ``SplitBatchNorm2d``: each of ``splits`` groups of a rank's batch normalised on its own, as
  MoCo's one-GPU ``SplitBatchNorm`` (facebookresearch/moco, the CIFAR-10 demo): one rank's
  query encoder sees the per-group statistics that ``splits`` GPUs would give it.
- ``GroupStatsBatchNorm2d``: each sample normalised with the statistics of its group, a set of
  samples spread over all ranks: MoCo's shuffle-BN without moving images (``moco.py``).
- ``GlobalBatchNorm2d``: one group, the global batch: torch's ``SyncBatchNorm``, for the
  process groups it does not run on (CPU ranks over gloo); ``sync_batchnorm`` picks torch's on
  GPU. With it a rank may hold one image: the statistics are those of the global batch, so 8
  ranks x 1 image train as 1 rank x 8 images, gradients included (the all-reduce is
  differentiable when autograd needs it).

Per-sample sums of x and x² are computed locally; one fp64 all-reduce of their per-group sums
gives every rank every group's statistics. Running statistics are updated with the whole
global batch's, so they stay equal on all ranks. Same parameters and buffers as
``nn.BatchNorm2d``: state dicts are interchangeable.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from muscle_hpc.dist import rank_world


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training with ``splits`` > 1, cuts the batch into ``splits``
    consecutive groups and normalises each with its own statistics: what ``splits`` GPUs of
    MoCo's reference compute, each over its consecutive slice of the global batch.

    MoCo's one-GPU demo (``SplitBatchNorm``, facebookresearch/moco's CIFAR-10 notebook) does the
    same over interleaved groups (a free view of the batch as ``B / splits`` samples of
    ``splits x C`` channels): the same partition up to the batch's random order. Consecutive
    groups make one rank equal to ``splits`` reference GPUs sample for sample (tested), at the
    price of one batch-norm call per group. The running statistics are the mean of the groups'
    updates, as in the demo. Evaluation, and ``splits`` = 1, are plain ``BatchNorm2d``; same
    parameters and buffers, so state dicts are interchangeable."""

    splits: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.splits
        if not self.training or s == 1:
            return super().forward(x)
        if len(x) % s:
            raise ValueError(f"a batch of {len(x)} does not split into {s} batch-norm groups")
        track = self.track_running_stats
        momentum = self.momentum
        if track:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # a cumulative average, as nn.BatchNorm2d keeps it
                momentum = 1.0 / float(self.num_batches_tracked)
        outs, stats = [], []
        for chunk in x.chunk(s):
            mean = self.running_mean.clone() if track else None
            var = self.running_var.clone() if track else None
            outs.append(nn.functional.batch_norm(chunk, mean, var, self.weight, self.bias, True,
                                                 momentum or 0.0, self.eps))
            stats.append((mean, var))
        if track:
            with torch.no_grad():
                self.running_mean.copy_(torch.stack([m for m, _ in stats]).mean(0))
                self.running_var.copy_(torch.stack([v for _, v in stats]).mean(0))
        return torch.cat(outs)


class GroupStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training with ``groups`` set, normalises each sample with the
    statistics of its group (see the module's docstring)."""

    groups: torch.Tensor | None = None  # (B,) group of each local sample
    num_groups: int = 1
    traffic: list | None = None  # (op, payload bytes) of each collective, when recording

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.groups is None:
            return super().forward(x)
        return self._normalise(x, self.groups, self.num_groups)

    def _normalise(self, x: torch.Tensor, groups: torch.Tensor, g: int) -> torch.Tensor:
        b, c, h, w = x.shape
        # Per-sample sums by fused reductions (20x faster on CPU than var_mean); the variance
        # E[x²] - E[x]² is formed per group in fp64. fp32 per-sample sums lose ~1e-7 of
        # E[x²], i.e. a relative variance error of ~1e-7·(1 + mean²/var): harmless for conv
        # outputs, whose mean is not orders of magnitude above their spread.
        hw = h * w
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        mean = x.sum(dim=(2, 3), dtype=acc) / hw
        mean_sq = torch.linalg.vector_norm(x, dim=(2, 3), dtype=acc).square() / hw
        zeros = torch.zeros(g, c, dtype=torch.float64, device=x.device)
        ones = torch.ones(b, dtype=torch.float64, device=x.device)
        flat = torch.cat([zeros.index_add(0, groups, mean.double()).flatten(),
                          zeros.index_add(0, groups, mean_sq.double()).flatten(),
                          zeros[:, 0].index_add(0, groups, ones)])
        if rank_world()[1] > 1:
            if flat.requires_grad:
                flat = dist_nn.all_reduce(flat)  # backward: the all-reduce of the gradients
            else:
                dist.all_reduce(flat)
            if self.traffic is not None:
                self.traffic.append(("all_reduce", flat.numel() * flat.element_size()))
        sums, counts = flat[:2 * g * c].view(2, g, c), flat[2 * g * c:]
        per_group = counts.clamp_min(1)[:, None]
        g_mean = sums[0] / per_group
        g_var = (sums[1] / per_group - g_mean * g_mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self._track(g_mean, g_var, counts, h * w)
        scale = torch.rsqrt(g_var + self.eps).to(acc)  # (G, C)
        if self.affine:
            scale = scale * self.weight
        shift = -g_mean.to(acc) * scale
        if self.affine:
            shift = shift + self.bias
        y = torch.addcmul(shift[groups][:, :, None, None], x, scale[groups][:, :, None, None])
        return y.to(x.dtype)

    def _track(self, g_mean, g_var, counts, hw: int) -> None:
        w_g = counts / counts.sum()  # group weights in the whole batch
        all_mean = (w_g[:, None] * g_mean).sum(0)
        all_var = (w_g[:, None] * (g_var + g_mean * g_mean)).sum(0) - all_mean * all_mean
        n = counts.sum() * hw
        unbiased = all_var * n / (n - 1).clamp_min(1)
        mom = self.momentum
        self.num_batches_tracked.add_(1)
        if mom is None:
            mom = 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - mom).add_(all_mean.to(self.running_mean.dtype), alpha=mom)
        self.running_var.mul_(1 - mom).add_(unbiased.to(self.running_var.dtype), alpha=mom)


class GlobalBatchNorm2d(GroupStatsBatchNorm2d):
    """Training statistics over the global batch (all ranks), as ``nn.SyncBatchNorm``; plain
    BatchNorm2d on one rank and in evaluation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or rank_world()[1] == 1:
            return nn.BatchNorm2d.forward(self, x)
        return self._normalise(x, torch.zeros(len(x), dtype=torch.long, device=x.device), 1)


def convert_batchnorm(module: nn.Module, cls: type[nn.BatchNorm2d]) -> nn.Module:
    """Every plain ``BatchNorm2d`` in ``module`` replaced, in place, by ``cls`` with the same
    parameters and buffers."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = cls(child.num_features, child.eps, child.momentum, child.affine,
                      child.track_running_stats)
            new.to(child.weight if child.affine else child.running_mean)  # device and dtype
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_batchnorm(child, cls)
    return module


def sync_batchnorm(module: nn.Module, on_cuda: bool) -> nn.Module:
    """``module`` with batch-norm statistics over the global batch: torch's SyncBatchNorm on
    GPU (as torchvision's references' ``--sync-bn``), ``GlobalBatchNorm2d`` elsewhere."""
    if on_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return convert_batchnorm(module, GlobalBatchNorm2d)
