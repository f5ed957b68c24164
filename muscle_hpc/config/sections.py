"""The config sections more than one stage reads, each declared once: the images and their
loading (``DataConfig``), the run's engine settings (``RunConfig``), the task heads
(``HeadsConfig``) and the metrics' readings (``MetricsConfig``); and the rule every task's
batch obeys on a number of ranks (``check_task_batch``)."""

from __future__ import annotations

from dataclasses import dataclass

from muscle_hpc import registry
from muscle_hpc.config.loader import ConfigError, opt

# Values that look valid but are refused, each with its one-line reason.
FP16_WHY = ("fp16 is not supported: its loss scaler skips overflowing steps, which would still "
            "update MoCo's key encoder and queue; use bf16")


@dataclass(frozen=True)
class DataConfig:
    """The converted shards and how each stage's loaders read them."""
    root: str = "shards"
    num_workers: int = opt(2, lo=1)  # FFCV decoding threads per rank
    flip_prob: float = opt(0.5, lo=0.0, hi=1.0)  # a horizontal flip of each training image
    # The Z-score of every image's uint8 gray levels (the paper's values).
    mean: float = registry.PIXEL_MEAN
    std: float = opt(registry.PIXEL_STD, gt=0.0)
    seed: int = 0  # the loader's shuffling and augmentation
    # N > 0: no shards are read; N random images per split are made in memory instead
    # (data/synthetic.py), to check GPUs, NCCL, Slurm and checkpoints before any dataset is
    # converted, or where FFCV is not installed. Nothing is learned from them.
    synthetic: int = opt(0, lo=0)
    synthetic_width: int = opt(800, lo=32)
    synthetic_height: int = opt(500, lo=32)


@dataclass(frozen=True)
class RunConfig:
    """What every stage's run sets the same way; each stage's run section adds its own keys
    (where it writes, how often it saves and logs, why ZeRO 3 is refused)."""
    precision: str = opt("auto", choices=("auto", "fp32", "bf16"), refuse={"fp16": FP16_WHY})
    # GPU kernels that repeat bit for bit, so a resumed run equals an uninterrupted one (CPU
    # runs always do); costs speed (README, "Exact resume"). Off: cuDNN autotunes instead.
    deterministic: bool = False
    # Train on CPU when this host has no GPU. Off: such a start is refused, since a GPU job
    # that landed without its GPUs (no --gpus in sbatch) would otherwise train the paper's
    # 800x500 ResNet-50 on CPU for weeks, silently. The demo and the tests turn it on.
    allow_cpu: bool = False
    seed: int = 0


@dataclass(frozen=True)
class HeadsConfig:
    rois_per_image: int = opt(512, lo=1)  # Faster R-CNN's box-head sample (torchvision's)
    test_proposals: int = opt(1000, lo=1)  # proposals scored per image in evaluation (same)
    # The trunk's output stride under the DeepLab-V3 head (segmentation batches only; the
    # weights are the same at every stride): 8 as torchvision's deeplabv3 (ASPP 12/24/36),
    # 16 (6/12/18) or 32 (3/6/9, the undilated trunk: cheapest, coarsest masks).
    seg_output_stride: int = opt(8, choices=(8, 16, 32))
    # Regression heads' loss on the standardized target: l1, the reported MAE's own measure and
    # robust to outliers, or mse (smooth near the optimum, outliers weigh more).
    regression_loss: str = opt("l1", choices=("l1", "mse"))
    # With more than one rank: batch-norm statistics over the global batch (torch's
    # SyncBatchNorm on GPU, an all-reduce of the sums on CPU), so a rank may hold one image
    # and the statistics stay those of the task's global batch.
    sync_bn: bool = True


@dataclass(frozen=True)
class MetricsConfig:
    """Readings of the paper's metrics where it does not say which (README, fidelity)."""
    # Lung Dice: the mean of every image's Dice, or one Dice over all pixels of the split.
    dice: str = opt("per_image", choices=("per_image", "pooled"))
    # TB AP: interpolated precision averaged at 101 recalls (COCO, pycocotools) or 11 (VOC07).
    ap_recall_points: int = opt(101, choices=(11, 101))


def check_world_size(world_size: int) -> None:
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")


def check_task_batch(key: str, batch: int, world_size: int, sync_bn: bool) -> None:
    """A task's global ``batch`` must split evenly into at least one image per rank, and batch
    norm needs two values per channel: two images in all (an ASPP pooling branch sees one value
    per image), on one rank unless ``sync_bn`` pools the statistics over ranks."""
    if batch < 2:
        raise ConfigError(f"{key}: a global batch of {batch}; batch norm needs at least 2 images")
    if batch < world_size:
        raise ConfigError(f"{key}: global batch {batch} over {world_size} ranks is less than one "
                          f"image per rank; run this task on at most {batch} ranks, or give it a "
                          f"global batch that {world_size} ranks divide")
    if batch % world_size:
        raise ConfigError(f"{key}: global batch {batch} is not divisible by the world size "
                          f"{world_size}")
    if batch // world_size < 2 and not sync_bn:
        raise ConfigError(f"{key}: {batch} over {world_size} ranks is 1 image per rank, which "
                          f"batch norm can use only with model.sync_bn=true (statistics over "
                          f"the global batch)")

