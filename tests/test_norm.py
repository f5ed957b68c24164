"""Batch norm over the global batch on CPU ranks: 2 gloo ranks with one image each compute the
gradients and running statistics that torch's BatchNorm2d computes on one rank with both.
In float64: in fp32 a rounding difference of 1e-6 flips the odd near-zero ReLU of layer4's
few cells, and a flipped mask moves a gradient by percents."""

import os
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from muscle_hpc import dist
from muscle_hpc.models.backbone import build_backbone
from muscle_hpc.models.heads import MultiTaskNet, SegmentationHead, trunk_channels
from muscle_hpc.models.norm import GlobalBatchNorm2d, sync_batchnorm


def lung_net() -> MultiTaskNet:
    torch.manual_seed(0)
    head = SegmentationHead(trunk_channels("resnet18"), 2, 8)  # ASPP: one value per image
    for m in head.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # its masks depend on how the batch is split
    return MultiTaskNet(build_backbone("resnet18"), {"lung": head}).double()


def batch():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 1, 48, 64, generator=g, dtype=torch.float64),
            torch.randint(0, 2, (2, 48, 64), generator=g))


def one_step(net, images, masks) -> dict:
    """Gradients (averaged over ranks, as data parallelism does) and buffers after one
    training forward and backward."""
    net.train()
    net("lung", images, masks).backward()
    _, world = dist.rank_world()
    out = {}
    for name, p in net.named_parameters():
        if world > 1:
            tdist.all_reduce(p.grad)
            p.grad /= world
        out[name] = p.grad
    out.update({n: b for n, b in net.named_buffers() if "running" in n})
    return out


def _rank(rank, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_distributed(backend="gloo", timeout_s=60)
    net = sync_batchnorm(lung_net(), on_cuda=False)
    images, masks = batch()
    state = one_step(net, images[rank:rank + 1], masks[rank:rank + 1])
    if rank == 0:
        torch.save(state, Path(out) / "two_ranks.pth")
    dist.shutdown()


def test_two_ranks_of_one_image_equal_one_rank_of_two(tmp_path):
    mp.spawn(_rank, args=(dist.free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = torch.load(tmp_path / "two_ranks.pth", weights_only=True)
    reference = one_step(lung_net(), *batch())  # torch's BatchNorm2d, whole batch
    assert ranks.keys() == reference.keys()
    for name, ref in reference.items():
        scale = ref.abs().max().clamp_min(1e-12)
        assert (ranks[name] - ref).abs().max() <= 1e-9 * scale, name


def test_global_batch_norm_is_plain_batch_norm_on_one_rank_and_in_evaluation():
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(3)
    ours = GlobalBatchNorm2d(3)
    x = torch.randn(4, 3, 5, 6)
    assert torch.equal(ours(x), plain(x))
    assert torch.equal(ours.running_var, plain.running_var)
    ours.eval(), plain.eval()
    assert torch.equal(ours(x), plain(x))
