"""MoCo v2 (He et al. 2020; Chen et al. 2020) with the reference's forward contract.

``logits, labels = moco(im_q, im_k)``: logits (B, 1+K), the positive at column 0, labels all
zero. The key encoder is a momentum copy of the query encoder (never in the optimizer: its
parameters have ``requires_grad=False``). Keys of all ranks are all-gathered before being
enqueued, so the queue is the same on every rank after every step.

Batch norm across ranks (``bn``):

- ``"shuffle"``: the reference's shuffle-BN over ``bn_groups`` groups of the global batch
  (MoCo §3.3: a query and its positive key must not share batch statistics, or the model
  cheats through them). Each rank splits its batch into ``bn_groups / world`` groups for the
  query encoder (``SplitBatchNorm2d``: per-group statistics, as each of that many GPUs would
  compute them), and each key is batch-normalised with the statistics of a random group of the
  global batch (a random permutation split into ``bn_groups`` groups), so its statistics match
  those of its query's group only by chance (1 / ``bn_groups``). ``bn_groups`` = world is the
  reference on that many GPUs; one rank with ``bn_groups`` = G gives the keys and queries that
  G ranks of the reference give (tested against its gather-shuffle-encode-unshuffle), which is
  what MoCo's one-GPU demo does with 8 ``SplitBatchNorm`` groups. With one group (one rank,
  ``bn_groups`` = 1) a key shares its query's statistics: the leak. The reference all-gathers
  the whole key image batch on every rank (world×B images received per rank) and encodes its
  group. Here no image moves: each rank encodes its own images, and every BN layer of the key
  encoder all-reduces per-group sums (2 × groups × channels numbers per layer) to normalise
  each sample with its group's mean and variance: the same function, computed in another
  order (equal up to float rounding; tested). Keys come back in rank order from the one
  all-gather the queue needs anyway; only the permutation (int64, world×B) is broadcast. The
  cost is latency: one small all-reduce per BN layer (20 in ResNet-18, 53 in ResNet-50) of the
  no-grad key forward. ``moco_collective_bytes`` counts both designs.
- ``"sync"``: ``nn.SyncBatchNorm`` in both encoders (one group, the global batch). torch's
  SyncBatchNorm runs only on GPU (and XPU): on CPU it is refused at forward with a one-line
  error.
- ``"none"``: per-rank BN (tests).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from muscle_hpc.dist import rank_world
from muscle_hpc.models.norm import GroupStatsBatchNorm2d, SplitBatchNorm2d, convert_batchnorm

BN_MODES = ("shuffle", "sync", "none")


def splits_per_rank(bn_groups: int, world: int) -> int:
    """Batch-norm groups of each rank's batch for at least ``bn_groups`` groups over the global
    batch: ``ceil(bn_groups / world)``, so every group lies on one rank (no collective in the
    query encoder's backward) and the global count is a multiple of the world size, never
    fewer than one per rank (the reference's shuffle-BN)."""
    return -(-bn_groups // world)


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank concatenated along dim 0, in rank order (no gradient)."""
    _, world = rank_world()
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def bus_bytes(op: str, payload: int, world: int) -> float:
    """Bytes a rank sends (= receives) for a collective with ``payload`` bytes per rank, by
    the ring algorithm (NCCL's "bus bandwidth" convention): all-reduce 2(w-1)/w × payload;
    all-gather and all-to-all (w-1)/w × the gathered total; broadcast the payload."""
    if world == 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (world - 1) / world * payload
    if op in ("all_gather", "all_to_all"):
        return (world - 1) * payload if op == "all_gather" else (world - 1) / world * payload
    if op == "broadcast":
        return float(payload)
    raise ValueError(op)


def bn_channels(encoder: nn.Module) -> tuple[int, int]:
    """(channels summed over all BatchNorm2d layers, number of those layers)."""
    bns = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    return sum(m.num_features for m in bns), len(bns)


def moco_collective_bytes(batch_shape: tuple[int, ...], world: int, dim: int, bn_channels: int,
                          n_bn: int, elem_bytes: int = 4, groups: int | None = None
                          ) -> dict[str, dict[str, float]]:
    """Bytes each rank sends per step for MoCo's own collectives (gradients excluded), for this
    module's shuffle-BN and the reference's, by ``bus_bytes``. ``batch_shape`` is the per-rank
    key batch (B, C, H, W); ``bn_channels`` the key encoder's BN channels and ``n_bn`` its BN
    layers (``bn_channels``); ``groups`` the shuffle-BN groups (default: one per rank)."""
    b = batch_shape[0]
    image = elem_bytes
    for s in batch_shape[1:]:
        image *= s
    keys = bus_bytes("all_gather", b * dim * elem_bytes, world)
    perm = bus_bytes("broadcast", world * b * 8, world)
    groups = groups or world
    ours = {"bn_stats": bus_bytes("all_reduce", (2 * bn_channels + n_bn) * groups * 8, world),
            "perm": perm, "keys": keys}
    ref = {"images": bus_bytes("all_gather", b * image, world), "perm": perm,
           "keys": 2 * keys}  # unshuffle + enqueue
    for d in (ours, ref):
        d["total"] = sum(d.values())
    return {"ours": ours, "reference": ref}


def embed(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``encoder``'s L2-normalised output in fp32, whatever autocast computed it in."""
    return nn.functional.normalize(encoder(images).float(), dim=1)


def contrastive_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float
                       ) -> torch.Tensor:
    """MoCo's logits (B, 1+K): the positive ``q·k`` then ``q·queue``, over ``T``, in fp32
    even under bf16 autocast (the reference computes them in fp32; with T = 0.2 a bf16
    rounding of a cosine is an error of ~0.02 in a logit)."""
    with torch.autocast(q.device.type, enabled=False):
        q, k = q.float(), k.float()
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ queue.float()
        return torch.cat([l_pos, l_neg], dim=1) / T


class MoCo(nn.Module):
    """MoCo v2. ``base_encoder(num_classes=dim)`` builds an encoder whose ``fc`` is a Linear;
    with ``mlp`` its fc becomes the v2 head Linear(f, f) → ReLU → Linear(f, dim). ``bn`` and
    ``bn_groups`` (the least number of shuffle-BN groups over the global batch; rounded up to a
    whole number per rank, ``splits_per_rank``): see the module's docstring."""

    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int = 128, K: int = 65536,
                 m: float = 0.999, T: float = 0.2, mlp: bool = True, bn: str = "shuffle",
                 bn_groups: int = 1):
        super().__init__()
        if bn not in BN_MODES:
            raise ValueError(f"bn must be one of {', '.join(BN_MODES)}, not {bn!r}")
        if bn_groups < 1 or (bn != "shuffle" and bn_groups != 1):
            raise ValueError(f"bn_groups must be >= 1, and 1 unless bn is shuffle: {bn_groups}")
        self.K, self.m, self.T, self.bn, self.bn_groups = K, m, T, bn, bn_groups
        self.encoder_q = base_encoder(num_classes=dim)
        if mlp:
            f = self.encoder_q.fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(nn.Linear(f, f), nn.ReLU(), self.encoder_q.fc)
        if bn == "sync":
            self.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder_q)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        if bn == "shuffle":
            convert_batchnorm(self.encoder_q, SplitBatchNorm2d)
            convert_batchnorm(self.encoder_k, GroupStatsBatchNorm2d)
        self.split_bns = [m for m in self.encoder_q.modules() if isinstance(m, SplitBatchNorm2d)]
        self.group_bns = [m for m in self.encoder_k.modules()
                          if isinstance(m, GroupStatsBatchNorm2d)]
        self.traffic: list | None = None  # set to [] to record (op, payload bytes) per call
        # The last step's query embeddings (this rank's) and keys (all ranks'), detached: the
        # stage's collapse and in-batch monitors read them on logging steps (B x dim tensors,
        # so keeping them costs nothing).
        self.last_q: torch.Tensor | None = None
        self.last_keys: torch.Tensor | None = None
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", nn.functional.normalize(torch.randn(dim, K), dim=0))
        # The pointer is a Python int, so the step never waits for the GPU to read it back;
        # the buffer mirrors it for checkpoints and is read back only when one is loaded.
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.ptr = 0
        self.register_load_state_dict_post_hook(MoCo._read_ptr)

    @staticmethod
    def _read_ptr(module, incompatible_keys) -> None:
        module.ptr = int(module.queue_ptr)

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
        self.queue[:, self.ptr:self.ptr + n] = keys.T
        self.ptr = (self.ptr + n) % self.K
        self.queue_ptr.fill_(self.ptr)

    @torch.no_grad()
    def _keys_shuffle_bn(self, im_k: torch.Tensor, splits: int) -> torch.Tensor:
        """Keys of the global batch in rank order, each batch-normalised over a random one of
        ``world × splits`` groups."""
        rank, world = rank_world()
        groups = world * splits
        if groups == 1:  # one group, the whole batch: plain BN (the leak; module docstring)
            return all_gather_cat(embed(self.encoder_k, im_k))
        b = im_k.shape[0]
        perm = torch.randperm(world * b, device=im_k.device)  # slot -> global sample
        if world > 1:
            dist.broadcast(perm, src=0)
            self._record("broadcast", perm)
        slot = torch.empty_like(perm)
        slot[perm] = torch.arange(world * b, device=perm.device)
        # The group of the reference's rank that would encode it, if it had ``groups`` ranks.
        group_of = slot[rank * b:(rank + 1) * b] // (b // splits)
        for m in self.group_bns:
            m.groups, m.num_groups, m.traffic = group_of, groups, self.traffic
        try:
            k = embed(self.encoder_k, im_k)
        finally:
            for m in self.group_bns:
                m.groups, m.traffic = None, None
        return self._gather(k)

    def _record(self, op: str, t: torch.Tensor) -> None:
        if self.traffic is not None:
            self.traffic.append((op, t.numel() * t.element_size()))

    def _gather(self, k: torch.Tensor) -> torch.Tensor:
        self._record("all_gather", k)
        return all_gather_cat(k)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor):
        if self.bn == "sync" and not im_q.is_cuda:
            raise RuntimeError('bn="sync" needs GPU tensors (torch\'s SyncBatchNorm is GPU-only)')
        splits = splits_per_rank(self.bn_groups, rank_world()[1])
        for m in self.split_bns:
            m.splits = splits
        q = embed(self.encoder_q, im_q)
        self.last_q = q.detach()
        with torch.no_grad():
            self.momentum_update()
            if self.bn == "shuffle":
                keys = self._keys_shuffle_bn(im_k, splits)
            else:
                keys = self._gather(embed(self.encoder_k, im_k))
        rank, _ = rank_world()
        b = im_q.shape[0]
        self.last_keys = keys
        k = keys[rank * b:(rank + 1) * b]
        logits = contrastive_logits(q, k, self.queue.clone().detach(), self.T)
        labels = torch.zeros(b, dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(keys)
        return logits, labels
