"""MoCo v2 (He et al. 2020; Chen et al. 2020) with the reference's forward contract.

``logits, labels = moco(im_q, im_k)``: logits (B, 1+K), the positive at column 0, labels all
zero. The key encoder is a momentum copy of the query encoder (never in the optimizer: its
parameters have ``requires_grad=False``). Keys of all ranks are all-gathered before being
enqueued, so the queue is the same on every rank after every step.

Batch norm across ranks (``bn``):

- ``"shuffle"``: the reference's shuffle-BN, so a rank's key batch statistics come from other
  samples than its query batch. The reference all-gathers the whole key image batch on every
  rank (each rank receives world×B images) to take its shuffled slice. Here a permutation of
  sample *indices* is broadcast and each image is sent once, straight to the rank that encodes
  it, with one ``all_to_all_single`` (uneven splits; works on gloo CPU and NCCL): each rank
  receives B images, world× less. The keys are not sent back: the all-gather the queue needs
  anyway brings every shuffled key, and the permutation restores their order locally, which
  also saves the reference's second (unshuffle) all-gather. ``moco_collective_bytes`` counts
  both designs. The cost: the same random permutation needs a (tiny) broadcast each step.
- ``"sync"``: ``nn.SyncBatchNorm`` in both encoders. torch's SyncBatchNorm runs only on GPU
  (and XPU): on CPU it is refused at forward with a one-line error.
- ``"none"``: per-rank BN (one rank, tests).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

BN_MODES = ("shuffle", "sync", "none")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank concatenated along dim 0, in rank order (no gradient)."""
    _, world = _world()
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def moco_collective_bytes(batch_shape: tuple[int, ...], world: int, dim: int,
                          elem_bytes: int = 4) -> dict[str, dict[str, int]]:
    """Bytes each rank receives per step for MoCo's own collectives (gradients excluded),
    for this module's shuffle-BN and the reference's. ``batch_shape`` is the per-rank key batch
    (B, C, H, W). All-gathers are counted as world× the per-rank tensor (own part included),
    the all-to-all as one batch (its ~1/world own part included)."""
    b = batch_shape[0]
    image = elem_bytes
    for s in batch_shape[1:]:
        image *= s
    keys = world * b * dim * elem_bytes
    perm = world * b * 8  # int64 permutation, broadcast
    ours = {"images": b * image, "perm": perm, "keys": keys}
    ref = {"images": world * b * image, "perm": perm, "keys": 2 * keys}  # unshuffle + enqueue
    for d in (ours, ref):
        d["total"] = sum(d.values())
    return {"ours": ours, "reference": ref}


class MoCo(nn.Module):
    """MoCo v2. ``base_encoder(num_classes=dim)`` builds an encoder whose ``fc`` is a Linear;
    with ``mlp`` its fc becomes the v2 head Linear(f, f) → ReLU → Linear(f, dim)."""

    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int = 128, K: int = 65536,
                 m: float = 0.999, T: float = 0.2, mlp: bool = True, bn: str = "shuffle"):
        super().__init__()
        if bn not in BN_MODES:
            raise ValueError(f"bn must be one of {', '.join(BN_MODES)}, not {bn!r}")
        self.K, self.m, self.T, self.bn = K, m, T, bn
        self.encoder_q = base_encoder(num_classes=dim)
        if mlp:
            f = self.encoder_q.fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(nn.Linear(f, f), nn.ReLU(), self.encoder_q.fc)
        if bn == "sync":
            self.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder_q)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", nn.functional.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def trainable_parameters(self):
        return self.encoder_q.parameters()

    @torch.no_grad()
    def momentum_update(self) -> None:
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.mul_(self.m).add_(pq.detach(), alpha=1 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        n = keys.shape[0]
        assert self.K % n == 0, f"queue size K={self.K} must be a multiple of the global batch {n}"
        ptr = int(self.queue_ptr)
        self.queue[:, ptr:ptr + n] = keys.T
        self.queue_ptr[0] = (ptr + n) % self.K

    @torch.no_grad()
    def _shuffled_keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Keys of the global batch in rank order, encoded shuffled across ranks."""
        rank, world = _world()
        b = im_k.shape[0]
        perm = torch.randperm(world * b, device=im_k.device)  # shuffled slot -> global sample
        if world > 1:
            dist.broadcast(perm, src=0)
        # Rank r encodes slots r*b..(r+1)*b. Sender s sends, in slot order, its samples
        # that land on each rank; the receiver files them back into slot order.
        owner = perm // b
        dest = torch.arange(world * b, device=perm.device) // b
        mine = owner == rank
        send = im_k[perm[mine] % b]  # ordered by slot, hence grouped by destination rank
        send_sizes = torch.bincount(dest[mine], minlength=world).tolist()
        slots = slice(rank * b, (rank + 1) * b)
        recv_sizes = torch.bincount(owner[slots], minlength=world).tolist()
        if world > 1:
            recv = torch.empty((b, *im_k.shape[1:]), dtype=im_k.dtype, device=im_k.device)
            dist.all_to_all_single(recv, send.contiguous(), recv_sizes, send_sizes)
        else:
            recv = send
        # recv is grouped by sender rank; a stable sort of this rank's slots by owner gives
        # the slot each received image belongs to.
        order = torch.sort(owner[slots], stable=True).indices
        shuffled = torch.empty_like(recv)
        shuffled[order] = recv
        k = nn.functional.normalize(self.encoder_k(shuffled), dim=1)
        k_all = all_gather_cat(k)  # slot order
        keys = torch.empty_like(k_all)
        keys[perm] = k_all
        return keys

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor):
        if self.bn == "sync" and not im_q.is_cuda:
            raise RuntimeError('bn="sync" needs GPU tensors (torch\'s SyncBatchNorm is GPU-only)')
        q = nn.functional.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self.momentum_update()
            if self.bn == "shuffle":
                keys = self._shuffled_keys(im_k)
            else:
                keys = all_gather_cat(nn.functional.normalize(self.encoder_k(im_k), dim=1))
        rank, _ = _world()
        b = im_q.shape[0]
        k = keys[rank * b:(rank + 1) * b]
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ self.queue.clone().detach()
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(b, dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(keys)
        return logits, labels
