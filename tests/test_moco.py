import functools
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from muscle_hpc.models import MoCo, build_backbone, moco_collective_bytes
from muscle_hpc.models.moco import bn_channels, splits_per_rank
from muscle_hpc.models.norm import GroupStatsBatchNorm2d, SplitBatchNorm2d

R18 = functools.partial(build_backbone, "resnet18")
B, K, DIM, STEPS = 4, 32, 16, 5


def make(bn="none", seed=0, **kw):
    torch.manual_seed(seed)
    return MoCo(R18, dim=DIM, K=K, m=0.9, T=0.2, bn=bn, **kw)


def inputs(step, world=2):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(world * B, 1, 32, 48, generator=g),
            torch.randn(world * B, 1, 32, 48, generator=g))


def nudge(moco, step):
    """The same pseudo optimizer step on every rank, so the momentum update has work to do."""
    g = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))


def test_forward_contract_and_queue():
    moco = make()
    cols = moco.queue.norm(dim=0)
    torch.testing.assert_close(cols, torch.ones(K))
    assert moco.queue_ptr.dtype == torch.long
    assert not any(p.requires_grad for p in moco.encoder_k.parameters())
    assert {id(p) for p in moco.trainable_parameters()} == \
        {id(p) for p in moco.parameters() if p.requires_grad}
    im_q, im_k = inputs(0, world=1)
    logits, labels = moco(im_q, im_k)
    assert logits.shape == (B, 1 + K) and labels.tolist() == [0] * B
    assert int(moco.queue_ptr) == B
    # The positive is q·k/T at column 0; the enqueued keys are k.
    with torch.no_grad():
        q = torch.nn.functional.normalize(moco.encoder_q(im_q), dim=1)
    torch.testing.assert_close(logits[:, 0], (q * moco.queue[:, :B].T).sum(1) / 0.2)
    torch.testing.assert_close(moco.queue.norm(dim=0), torch.ones(K))
    logits.sum().backward()
    assert moco.encoder_q.conv1.weight.grad is not None
    assert moco.encoder_k.conv1.weight.grad is None
    for _ in range(K // B - 1):
        moco(im_q, im_k)
    assert int(moco.queue_ptr) == 0  # wrapped


def test_the_queue_pointer_is_never_read_back_from_the_device_but_resumes_from_a_checkpoint():
    """MoCo's step keeps the pointer as a Python int (reading the buffer would wait for the
    GPU every step); the buffer mirrors it for checkpoints, and a loaded state sets it."""
    moco = make()
    im_q, im_k = inputs(0, world=1)
    moco(im_q, im_k)
    assert moco.ptr == int(moco.queue_ptr) == B
    moco.queue_ptr.fill_(99)  # not what the step reads
    moco(im_q, im_k)
    assert moco.ptr == int(moco.queue_ptr) == 2 * B
    resumed = make()
    resumed.load_state_dict(moco.state_dict())
    assert resumed.ptr == 2 * B
    resumed(im_q, im_k)  # enqueues after the loaded keys, not over them
    assert torch.equal(resumed.queue[:, :2 * B], moco.queue[:, :2 * B])
    assert not torch.equal(resumed.queue[:, 2 * B:3 * B], moco.queue[:, 2 * B:3 * B])
    assert resumed.ptr == 3 * B


def test_momentum_update_formula():
    moco = make()
    nudge(moco, 0)
    wq, wk = moco.encoder_q.conv1.weight.detach().clone(), moco.encoder_k.conv1.weight.clone()
    moco.momentum_update()
    torch.testing.assert_close(moco.encoder_k.conv1.weight, 0.9 * wk + 0.1 * wq)


def test_queue_multiple_of_global_batch():
    moco = make()
    with pytest.raises(AssertionError, match="multiple of the global batch"):
        moco(*[x[:3] for x in inputs(0, world=1)])


def test_bytes_of_shuffle_design():
    channels, layers = bn_channels(build_backbone("resnet50"))
    assert (channels, layers) == (26560, 53)
    n = moco_collective_bytes((32, 1, 800, 500), world=8, dim=128, bn_channels=channels,
                              n_bn=layers)
    img = 32 * 800 * 500 * 4
    assert n["reference"]["images"] == 7 * img  # all-gather: the 7 other ranks' batches
    assert n["ours"]["bn_stats"] == 2 * 7 / 8 * ((2 * channels + 53) * 8 * 8)  # ring all-reduce
    assert "images" not in n["ours"] and n["ours"]["total"] < n["reference"]["total"] / 50


def test_group_stats_bn_is_batch_norm_over_each_group():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    gbn = GroupStatsBatchNorm2d(3)
    gbn.load_state_dict(bn.state_dict())
    x = torch.randn(6, 3, 5, 7) * 3 + 10  # mean far from 0: the variance must not cancel
    gbn.groups, gbn.num_groups = torch.tensor([1, 0, 1, 0, 0, 1]), 2
    y = gbn(x)
    for g in (0, 1):  # each group's samples: plain train-mode BN over that group alone
        rows = (gbn.groups == g).nonzero().flatten()
        torch.testing.assert_close(y[rows], bn(x[rows]), atol=1e-5, rtol=1e-5)
    # running statistics: those of the whole batch, as one BN over it would keep
    ref = torch.nn.BatchNorm2d(3)
    ref(x)
    torch.testing.assert_close(gbn.running_mean, ref.running_mean)
    torch.testing.assert_close(gbn.running_var, ref.running_var)
    gbn.groups = None  # no groups: plain BN over the batch
    torch.testing.assert_close(gbn(x), bn(x))


def test_split_bn_is_batch_norm_over_each_group_of_consecutive_samples():
    """Each of ``splits`` consecutive groups normalised alone, as that many GPUs would; running
    statistics the mean of the groups' updates (MoCo's demo ``SplitBatchNorm``)."""
    torch.manual_seed(0)
    x = torch.randn(12, 3, 5, 7) * 3 + 10
    split = SplitBatchNorm2d(3)
    with torch.no_grad():
        split.weight.uniform_(0.5, 2)
        split.bias.uniform_(-1, 1)
    split.splits = 4
    refs = [torch.nn.BatchNorm2d(3) for _ in range(4)]
    for r in refs:
        r.load_state_dict(split.state_dict())
    y = split(x)
    for g, r in enumerate(refs):
        torch.testing.assert_close(y[3 * g:3 * g + 3], r(x[3 * g:3 * g + 3]))
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(split, name),
                                   torch.stack([getattr(r, name) for r in refs]).mean(0))
    assert int(split.num_batches_tracked) == 1
    y.sum().backward()  # trains like BN: gradients reach its affine parameters
    assert split.weight.grad is not None
    split.eval()  # evaluation: plain BN with the running statistics
    torch.testing.assert_close(split(x), torch.nn.functional.batch_norm(
        x, split.running_mean, split.running_var, split.weight, split.bias, False, 0.0, 1e-5))
    with pytest.raises(ValueError, match="does not split into 4"):
        split.train()(x[:10])


def test_groups_per_rank_round_up_to_at_least_the_asked_number():
    assert [splits_per_rank(8, w) for w in (1, 2, 3, 4, 8, 16)] == [8, 4, 3, 2, 1, 1]
    assert [splits_per_rank(1, w) for w in (1, 2, 8)] == [1, 1, 1]


@torch.no_grad()
def reference_groups(moco, steps, world, b, dtype=torch.float64):
    """MoCo's reference on ``world`` GPUs with ``b`` images each, in one process: each rank's
    query encoder normalises over its own batch; the key batch is gathered, shuffled by the
    permutation rank 0 draws, split into one slice per rank, each encoded on its own
    (train-mode BN over that slice), unshuffled, enqueued. Returns each step's logits (global
    batch order) and the final queue."""
    moco.train()
    logits = []
    for step in range(steps):
        nudge(moco, step)
        im_q, im_k = (x.to(dtype) for x in inputs(step, world * b // B))
        q = torch.cat([torch.nn.functional.normalize(moco.encoder_q(im_q[r * b:(r + 1) * b]),
                                                     dim=1) for r in range(world)])
        moco.momentum_update()
        torch.manual_seed(step)
        perm = torch.randperm(world * b)
        shuffled = im_k[perm]
        k = torch.cat([torch.nn.functional.normalize(moco.encoder_k(shuffled[r * b:(r + 1) * b]),
                                                     dim=1) for r in range(world)])
        keys = torch.empty_like(k)
        keys[perm] = k
        logits.append(torch.cat([(q * keys).sum(1, keepdim=True), q @ moco.queue], 1) / moco.T)
        moco._dequeue_and_enqueue(keys)
    return logits, moco.queue.clone()


def test_one_rank_with_g_groups_is_g_ranks_of_the_reference_in_float64():
    """One rank with bn_groups=G gives the logits, keys and queue that G GPUs of MoCo's
    reference give, each holding one group of consecutive samples, to 1e-6 in float64 (the
    embeddings are fp32, as the reference's)."""
    groups, steps, n = 4, 3, 2 * B  # a global batch of 8: 4 groups of 2
    ours = make("shuffle", bn_groups=groups).double().train()
    ref = make("none").double()
    ref.load_state_dict(ours.state_dict())
    ref_logits, ref_queue = reference_groups(ref, steps, groups, n // groups)
    plain = make("shuffle").double().train()  # one group: plain BN, the leak
    plain.load_state_dict(ours.state_dict())
    for step in range(steps):
        for moco in (ours, plain):
            nudge(moco, step)
        im_q, im_k = (x.double() for x in inputs(step, n // B))
        torch.manual_seed(step)  # the same permutation in both runs
        logits, _ = ours(im_q, im_k)
        torch.manual_seed(step)
        leaky, _ = plain(im_q, im_k)
        torch.testing.assert_close(logits, ref_logits[step].float(), atol=1e-6, rtol=0)
        assert not torch.allclose(leaky, logits, atol=1e-3)
    torch.testing.assert_close(ours.queue, ref_queue, atol=1e-6, rtol=0)


def run_steps(moco, rank, train, b=B):
    """STEPS steps on this rank's ``b`` samples of a 2-rank global batch (the shuffle's
    permutation drawn from the seed ``step``, as ``reference_groups`` draws it)."""
    moco.train(train)
    for step in range(STEPS):
        nudge(moco, step)
        im_q, im_k = inputs(step)
        torch.manual_seed(step)
        moco(im_q[rank * b:(rank + 1) * b], im_k[rank * b:(rank + 1) * b])
    return moco.queue.clone(), moco.queue_ptr.clone()


def _rank(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        out = {}
        for name, bn, train, groups in (
                ("none_eval", "none", False, 1), ("shuffle_eval", "shuffle", False, 1),
                ("shuffle_train", "shuffle", True, 1), ("shuffle_train_g4", "shuffle", True, 4)):
            out[name] = run_steps(make(bn, bn_groups=groups), rank, train)
        torch.save(out, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_share_one_queue(tmp_path):
    init = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_rank, args=(2, init, tmp_path / "out"), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"out.{r}") for r in (0, 1))
    for name in r0:  # bit-identical on both ranks, ptr advanced by the global batch
        assert torch.equal(r0[name][0], r1[name][0]), name
        assert int(r0[name][1]) == STEPS * 2 * B % K
    # One rank fed the concatenated batch (eval-mode BN, same init) fills the same queue:
    # for shuffle-BN this means the unshuffle restored the order.
    torch.set_num_threads(1)
    one, _ = run_steps(make("none"), 0, False, b=2 * B)
    assert STEPS * 2 * B > K  # the queue wrapped: every column was written
    for name in ("none_eval", "shuffle_eval"):
        torch.testing.assert_close(r0[name][0], one, atol=1e-5, rtol=1e-4)
    # Train-mode shuffle-BN normalises with shuffled per-rank batch statistics: other keys,
    # the very keys of the reference's gather-shuffle-encode-unshuffle, without moving images.
    assert not torch.allclose(r0["shuffle_train"][0], one, atol=1e-3)
    _, ref = reference_groups(make("none"), STEPS, 2, B, torch.float32)
    torch.testing.assert_close(r0["shuffle_train"][0], ref, atol=1e-5, rtol=1e-4)
    # bn_groups=4 on 2 ranks (2 groups per rank): the reference on 4 GPUs of 2 images each,
    # the key groups spanning both ranks through the all-reduced group sums.
    _, ref4 = reference_groups(make("none"), STEPS, 4, B // 2, torch.float32)
    torch.testing.assert_close(r0["shuffle_train_g4"][0], ref4, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ref4, ref, atol=1e-3)


def test_shuffle_bn_on_one_rank_and_sync_bn_refused_on_cpu():
    moco = make("shuffle")
    logits, labels = moco(*[x[:B] for x in inputs(0)])
    assert logits.shape == (B, 1 + K) and int(moco.queue_ptr) == B
    with pytest.raises(RuntimeError, match="GPU"):
        make("sync")(*[x[:B] for x in inputs(0)])
    with pytest.raises(ValueError, match="bn must be one of"):
        make("ghost")
    with pytest.raises(ValueError, match="1 unless bn is shuffle"):
        make("sync", bn_groups=8)
