"""The MD-MoCo stage's config: its schema (``MocoConfig``) and what a loaded one must also
satisfy on a number of ranks (``check_moco``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from muscle_hpc import registry
from muscle_hpc.config.loader import NAME_PATTERN, ConfigError, load, opt
from muscle_hpc.config.sections import DataConfig, RunConfig, check_world_size

_ZERO3_WHY = ("ZeRO stage 3 is not supported: it shards the query encoder's weights, which the "
              "momentum update of MoCo's key encoder reads whole on every rank; use 0-2")
_KNN_WHY = "{} is a {} task; the kNN monitor needs one class label per image: use {}"


@dataclass(frozen=True)
class MocoDataConfig(DataConfig):
    # The paper's nine by default; any dataset converted under root may be added (one of the
    # user's: python -m data_prep.convert --layout ...). A name with no shards is refused at
    # start, naming the conversion that would make them.
    datasets: list[str] = field(default_factory=lambda: list(registry.DATASETS))
    # Also read each dataset's ``extra`` shard (images of no task, e.g. TBX11K's ~10k healthy,
    # sick and test images): not the paper's Table 1, which pre-trains on the training sets.
    pretrain_extra: bool = False
    batch_size: int = opt(256, lo=1)  # global, over all ranks
    max_degrees: float = opt(10.0, lo=0.0, hi=180.0)  # each view's rotation: +-this many degrees
    # The two views' recipe (muscle_hpc/data/augment.py; README, fidelity): paper (flip and
    # rotation: the views share their gray-level histogram and position, cues MoCo can match
    # instead of anatomy), mococxr (MoCo-CXR's: + a random square crop of side min(H, W),
    # views min(H, W) square), mocov2 (MoCo v2's: resized crop, brightness/contrast/gamma,
    # blur, flip). max_degrees is the paper's and mococxr's rotation; flip_prob (each view's
    # flip) every recipe's.
    views: str = opt("paper", choices=("paper", "mococxr", "mocov2"))


@dataclass(frozen=True)
class MocoModelConfig:
    arch: str = opt("resnet50", choices=registry.ARCHS)
    dim: int = opt(128, lo=1)  # the embedding's size (MoCo's feature dimension)
    K: int = opt(65536, lo=1)  # keys in the queue: the negatives; the global batch divides it
    m: float = opt(0.999, lo=0.0, hi=1.0)  # the key encoder's momentum
    T: float = opt(0.2, gt=0.0)  # the softmax temperature (MoCo v2's)
    mlp: bool = True  # MoCo v2's 2-layer projection head; false: MoCo v1's linear one
    # Batch norm across ranks: shuffle (the reference's shuffle-BN over bn_groups groups) or
    # sync (SyncBatchNorm over the global batch, GPU only; needs bn_groups=1).
    bn: str = opt("shuffle", choices=("shuffle", "sync"))
    # Shuffle-BN groups over the global batch, at least (rounded up to a whole number per rank:
    # 8 groups on 1, 2, 4 or 8 ranks, 16 on 16). Each key is normalised with a random group's
    # statistics, which are its query's with probability 1/groups: with one group (one rank,
    # bn_groups=1) MoCo can match a query to its key through the batch statistics alone (MoCo
    # 3.3). 8: MoCo's 8-GPU reference (8 groups of 32) and its one-GPU demo (8 SplitBatchNorm
    # groups). 1: one group per rank, the reference on any number of GPUs.
    bn_groups: int = opt(8, lo=1)


@dataclass(frozen=True)
class MocoOptimConfig:
    lr_base: float = opt(0.03, gt=0.0)  # per 256 images; see MocoConfig.effective_lr
    momentum: float = opt(0.9, lo=0.0, hi=1.0)
    weight_decay: float = opt(1e-4, lo=0.0)
    epochs: int = opt(200, lo=1)
    warmup_epochs: int = opt(0, lo=0)
    schedule: str = opt("cosine", choices=("cosine",))


@dataclass(frozen=True)
class MocoRunConfig(RunConfig):
    dir: str = "runs/mdmoco"
    checkpoint_every_steps: int = opt(1000, lo=1)
    log_every_steps: int = opt(50, lo=1)
    image_grid_every_steps: int = opt(1000, lo=0)  # 0: never
    # End after this many steps (0: run the whole schedule, which still spans optim.epochs):
    # smoke tests and demos. A later start with a larger cap continues the same run.
    max_steps: int = opt(0, lo=0)
    zero_stage: int = opt(0, lo=0, hi=2, refuse={3: _ZERO3_WHY})
    # Representation monitors (README, "Is pre-training working?"). Every this many steps, at
    # step 0 of a new run and at the end: a weighted kNN (k, T: the InstDisc/DINO protocol) of
    # each monitored task set's valid images over its training images, on the query encoder's
    # pooled features. Embedding an image is a forward pass, ~1/4 of what a training image
    # costs in MoCo, so N images every S steps of global batch B cost ~N/(4·S·B) of training:
    # 2 tasks x 2 splits x 1000 every 1000 steps of 256 is ~0.4 % (reading each split up to
    # its last picked image adds a little). 0: never.
    monitor_every_steps: int = opt(1000, lo=0)
    monitor_tasks: list[str] = opt(
        list(registry.KNN_TASKS), choices=registry.KNN_TASKS,
        refuse={t.name: _KNN_WHY.format(t.name, t.kind, ", ".join(registry.KNN_TASKS))
                for t in registry.TASKS.values() if t.name not in registry.KNN_TASKS})
    # Images embedded per split and task: that many spread evenly over the split (the same
    # ones at every step; not its first ones, which run class by class), all if fewer.
    monitor_max_images: int = opt(1000, lo=1)
    monitor_knn_k: int = opt(20, lo=1)
    monitor_knn_t: float = opt(0.07, gt=0.0)
    # Warn when collapse_std x sqrt(model.dim) is below this: ~1 for embeddings spread over the
    # sphere, 0 when all images get one embedding, sqrt(r/dim) when they span r of dim
    # dimensions. A Kaiming-initialised ResNet already maps X-rays to nearly one direction
    # (0.18-0.25 measured, ResNet-18 and -50): 0.05, 4x below that, is a collapse, not a start.
    monitor_collapse_warn: float = opt(0.05, lo=0.0)


@dataclass(frozen=True)
class MocoConfig:
    data: MocoDataConfig = field(default_factory=MocoDataConfig)
    model: MocoModelConfig = field(default_factory=MocoModelConfig)
    optim: MocoOptimConfig = field(default_factory=MocoOptimConfig)
    run: MocoRunConfig = field(default_factory=MocoRunConfig)

    @property
    def effective_lr(self) -> float:
        """MoCo's linear scaling rule: ``lr_base`` is per 256 images of global batch."""
        return self.optim.lr_base * self.data.batch_size / 256



def load_config(path: str | Path | None, overrides: list[str] = ()) -> MocoConfig:
    return load(path, overrides, MocoConfig)


def check_moco(cfg: MocoConfig, world_size: int) -> None:
    """What a loaded MD-MoCo config must also satisfy on ``world_size`` ranks: batches that
    split into equal per-rank shares and shuffle-BN groups of at least two images, a queue of
    whole batches, and dataset names that are folder names."""
    check_world_size(world_size)
    for name in cfg.data.datasets:
        if not NAME_PATTERN.fullmatch(name):
            raise ConfigError(f"data.datasets: {name!r} is not a dataset name (letters, digits, "
                              f"'_', '-': a folder under data.root)")
    batch = cfg.data.batch_size
    if batch % world_size:
        raise ConfigError(f"data.batch_size: global batch {batch} is not divisible by the world "
                          f"size {world_size}")
    per_rank = batch // world_size
    if per_rank < 2:
        raise ConfigError(f"data.batch_size: {batch} over {world_size} ranks is {per_rank} "
                          f"image per rank; BatchNorm needs at least 2")
    if cfg.model.K % batch:
        raise ConfigError(f"model.K: queue size {cfg.model.K} is not a multiple of the global "
                          f"batch {batch} (MoCo enqueues whole batches of keys)")
    if cfg.model.bn == "sync" and cfg.model.bn_groups != 1:
        raise ConfigError(f"model.bn_groups: {cfg.model.bn_groups} groups are shuffle-BN's; "
                          f"model.bn=sync normalises over the whole global batch (set "
                          f"model.bn_groups=1)")
    # Lazy: the config package imports no torch (~2 s), since the launcher and --describe read
    # it on login nodes.
    from muscle_hpc.models.moco import splits_per_rank

    splits = splits_per_rank(cfg.model.bn_groups, world_size)
    if cfg.model.bn == "shuffle" and (per_rank % splits or per_rank // splits < 2):
        raise ConfigError(f"model.bn_groups: {cfg.model.bn_groups} groups over {world_size} "
                          f"rank(s) are {splits} per rank, which do not cut the {per_rank} "
                          f"images of each rank into equal groups of at least 2 (batch norm); "
                          f"change data.batch_size or model.bn_groups")
    if cfg.optim.warmup_epochs >= cfg.optim.epochs:
        raise ConfigError(f"optim.warmup_epochs: {cfg.optim.warmup_epochs} must be less than "
                          f"optim.epochs {cfg.optim.epochs}")
