"""Is pre-training working? Two monitors of a contrastive encoder, cheap enough to run during
training (README, "Is pre-training working?").

- **kNN on labelled task sets** (``knn_eval``): the pooled backbone features of a classification
  task's training and valid images; each valid image is classified by a weighted cosine kNN over
  the training features (the InstDisc / DINO protocol: the ``k`` most similar training images
  vote for their label with weight ``exp(sim / T)``). No training, no hyper-parameter search:
  it moves when the features become more useful, which the contrastive loss alone cannot show.
- **Collapse** (``collapse_std``): the spread of the L2-normalised embeddings over a batch,
  label-free, from the batch the step computed anyway.
- **Shortcut** (``HistogramShortcut``): the top-1 that the views' gray-level histograms alone
  reach on MoCo's own task (the same batch, a queue of the same keys), label-free. When it is
  near or above MoCo's top-1, the views leave a cue that tells images apart without anatomy
  (exposure, gamma, collimation), and a rising MoCo top-1 says little about the features.

Ranks embed disjoint shares of a split and gather small records (features, labels), so the
monitor costs one forward pass per image however many ranks run it, and every rank computes the
same numbers.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from muscle_hpc import dist
from muscle_hpc.data.loaders import task_loader
from muscle_hpc.models.moco import all_gather_cat
from muscle_hpc.tasks import PAPER_TASKS

SPLITS = ("train", "valid")


@dataclass(frozen=True)
class SplitFeatures:
    """A split's embedded images in the split's order: ``features`` (N, F) float32,
    ``labels`` (N,) int64, ``index`` (N,) the loader's sample index."""
    features: np.ndarray
    labels: np.ndarray
    index: np.ndarray


def task_shards(data_root: Path, tasks: list[str]) -> dict[str, dict[str, object]]:
    """The ``train`` and ``valid`` shards of each of ``tasks`` (names in ``muscle_hpc.tasks``),
    checked against the task. Raises ``ShardError`` naming what is missing."""
    return {name: PAPER_TASKS[name].open_splits(data_root, SPLITS) for name in tasks}


def knn_loaders(shards: dict | None, tasks: list[str], data_cfg, batch_size: int, device=None
                ) -> dict[str, dict[str, tuple[object, int]]]:
    """``(loader, samples in the split)`` of each task's ``train`` and ``valid`` split: loaders
    that evaluate (fixed order, no flip, the split dealt to ranks), over ``shards``
    (``task_shards``), or with ``data.synthetic`` random images. Synthetic splits get seeds of
    their own: the synthetic loader would otherwise make the same images and labels for both,
    and the kNN would find every valid image among the training ones."""
    out = {}
    for name in tasks:
        out[name] = {}
        for i, split in enumerate(SPLITS):
            cfg, shard = data_cfg, None
            if data_cfg.synthetic:
                cfg = dataclasses.replace(data_cfg, seed=data_cfg.seed + i)
            else:
                shard = shards[name][split]
            loader = task_loader(shard, batch_size, PAPER_TASKS[name], cfg, train=False,
                                 distributed=True, device=device)
            out[name][split] = (loader, data_cfg.synthetic or shard.count)
    return out


def spread_subset(count: int, n: int) -> np.ndarray:
    """``min(n, count)`` sample indices of a split of ``count``, evenly spread over it
    (``j * count // n``): a fixed subset, the same at every monitoring step and for any number
    of ranks, that reaches every part of the split. Converted splits keep the download's order,
    which runs class by class (the demo pneumonia training split starts with 82 positives), so
    its first ``n`` images could hold one class only."""
    if count <= n:
        return np.arange(count)
    return np.arange(n) * count // n


def _picked(batches, keep: np.ndarray, size: int):
    """``(images, labels, index)`` of the samples of ``batches`` whose index ``keep`` marks,
    regrouped into batches of ``size`` to ``2 * size - 1`` but the last (a sparse subset would
    otherwise run the encoder on a few images at a time); stops reading after the last marked
    index."""
    last = int(np.flatnonzero(keep)[-1]) if keep.any() else -1
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    held = 0
    for batch in batches if last >= 0 else ():
        index = batch["index"]
        rows = torch.from_numpy(keep[index.numpy()])
        if rows.any():
            pending.append((batch["image"][rows], batch["label"][rows], index[rows]))
            held += int(rows.sum())
        done = int(index.max()) >= last
        if held >= size or (done and pending):
            yield tuple(torch.cat(parts) for parts in zip(*pending))
            pending, held = [], 0
        if done:
            return
    if pending:
        yield tuple(torch.cat(parts) for parts in zip(*pending))


def pooled_features(resnet: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A torchvision ResNet's global-average-pooled features (before ``fc``, whatever head it
    holds: MoCo's MLP or a Linear). ``fc`` is swapped for an identity for the call rather than
    the forward being rewritten here, so this follows torchvision's ResNet as it is."""
    fc = resnet.fc
    resnet.fc = nn.Identity()
    try:
        return resnet(images)
    finally:
        resnet.fc = fc


@torch.no_grad()
def embed_split(encoder: nn.Module, loader, split_size: int, device: torch.device,
                max_images: int, batch_size: int = 64, bf16: bool = False) -> SplitFeatures:
    """The pooled features of ``spread_subset(split_size, max_images)`` of ``loader``'s split
    (``split_size`` samples, in a fixed order, dealt to ranks by the loader), each rank
    embedding the picked samples of its share in batches of about ``batch_size``; gathered, in
    split order, on every rank.

    Every sample of the split up to the last picked one is read (reading is a small fraction
    of a forward pass); only the picked ones are embedded. ``encoder`` runs in eval mode (BN
    with its running statistics, so a sample's features depend neither on its batch nor its
    rank, and training's statistics are left alone) and is put back in its mode after.
    ``bf16``: autocast as the training step does; features come back as float32."""
    keep = np.zeros(split_size, bool)
    keep[spread_subset(split_size, max_images)] = True
    feats, labels, index = [], [], []
    was_training = encoder.training
    encoder.eval()
    try:
        with closing(loader.epoch_batches(0)) as batches:
            for images, y, i in _picked(batches, keep, batch_size):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    f = pooled_features(encoder, images.to(device, non_blocking=True))
                feats.append(f.float().cpu().numpy())
                labels.append(y.numpy())
                index.append(i.numpy())
    finally:
        encoder.train(was_training)
    mine = [tuple(np.concatenate(x) for x in (feats, labels, index))] if feats else []
    parts = dist.gather_objects(mine)
    if not parts:
        return SplitFeatures(np.zeros((0, 0), np.float32), np.zeros(0, np.int64),
                             np.zeros(0, np.int64))
    f, y, i = (np.concatenate(x) for x in zip(*parts))
    # Sorted into the split's order: the answer is then the same for any number of ranks,
    # down to which of two equally similar neighbours the kNN keeps.
    order = np.argsort(i, kind="stable")
    return SplitFeatures(f[order], y[order].astype(np.int64), i[order].astype(np.int64))


@torch.no_grad()
def knn_scores(train_feats, train_labels, query_feats, num_classes: int, k: int = 20,
               T: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted cosine kNN class scores (Q, ``num_classes``), each row summing to 1.

    Features are L2-normalised; each query's ``k`` most similar training features (all of them
    if fewer) vote for their label with weight ``exp(sim / T)``, and a class's score is the sum
    of its votes over the sum of all (InstDisc, Wu et al. 2018; DINO's eval_knn). A small ``T``
    makes the nearest neighbours count most (0.07: DINO's default). The weights are taken as
    ``exp((sim - max sim) / T)``, the same normalised scores, without overflow or underflow for
    any ``T``. Computed in float32 on the CPU, ``chunk`` queries at a time (memory ``chunk`` ×
    N); for the monitor's few thousand images that is a fraction of a second, and every rank
    gets the same bits."""
    train = F.normalize(torch.as_tensor(np.asarray(train_feats), dtype=torch.float32), dim=1)
    query = F.normalize(torch.as_tensor(np.asarray(query_feats), dtype=torch.float32), dim=1)
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    scores = torch.zeros(len(query), num_classes)
    k = min(k, len(train))
    if k == 0:
        return scores.fill_(math.nan)
    for start in range(0, len(query), chunk):
        sim, nearest = (query[start:start + chunk] @ train.T).topk(k, dim=1)
        weights = ((sim - sim[:, :1]) / T).exp()  # topk sorts: column 0 is the largest
        scores[start:start + chunk].scatter_add_(1, labels[nearest], weights)
    return scores / scores.sum(dim=1, keepdim=True)


def knn_metrics(scores: torch.Tensor, labels) -> dict[str, float]:
    """``accuracy`` of the argmax class and ROC ``auc``: of class 1's score (the task's
    positive, ``classes[1]``) with two classes, one-vs-rest macro with more (as the task's own
    metric, ``metrics.multiclass``); NaN where undefined (no sample, or a class missing)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, np.int64)
    if not len(y) or torch.isnan(scores).any():
        return {"accuracy": math.nan, "auc": math.nan}
    accuracy = float((scores.argmax(dim=1).numpy() == y).mean())
    k = scores.shape[1]
    every = len(np.unique(y)) == k
    if not every:
        auc = math.nan
    elif k == 2:
        auc = float(roc_auc_score(y, scores[:, 1].numpy()))
    else:
        auc = float(roc_auc_score(y, scores.double().numpy(), multi_class="ovr",
                                  average="macro", labels=np.arange(k)))
    return {"accuracy": accuracy, "auc": auc}


def knn_eval(encoder: nn.Module, loaders: dict[str, dict[str, tuple[object, int]]],
             device: torch.device, max_images: int, k: int = 20, T: float = 0.07,
             batch_size: int = 64, bf16: bool = False) -> dict[str, dict[str, float]]:
    """Per task of ``loaders`` (``knn_loaders``): ``accuracy`` and ``auc`` of the kNN
    (``knn_scores``) of up to ``max_images`` valid images over up to ``max_images`` training
    images (``spread_subset`` of each), and the image counts used. Collective: every rank
    calls it, and all get the same numbers."""
    out = {}
    for name, splits in loaders.items():
        train, valid = (embed_split(encoder, *splits[s], device, max_images, batch_size, bf16)
                        for s in SPLITS)
        scores = knn_scores(train.features, train.labels, valid.features,
                            len(PAPER_TASKS[name].classes), k, T)
        out[name] = {**knn_metrics(scores, valid.labels), "train_images": len(train.labels),
                     "valid_images": len(valid.labels)}
    return out


# Gray levels at the quantiles (k + 1/2) / 16 of an image: its histogram in 16 numbers, the
# probe the project's data tests use to show that a label cannot be read from gray levels.
QUANTILES = 16


@torch.no_grad()
def gray_quantiles(images: torch.Tensor, n: int = QUANTILES, max_pixels: int = 1 << 14
                   ) -> torch.Tensor:
    """(B, ``n``) the gray levels of each image of ``images`` (B, 1, H, W) at the quantiles
    (k + 1/2) / n, over every ``ceil(H·W / max_pixels)``-th pixel: sorting 400,000 pixels of an
    800x500 view would cost more than the histogram needs."""
    flat = images.detach().flatten(1).float()
    flat = flat[:, ::max(1, -(-flat.shape[1] // max_pixels))]
    levels = (torch.arange(n, device=flat.device, dtype=torch.float32) + 0.5) / n
    return torch.quantile(flat, levels, dim=1).T.contiguous()


class HistogramShortcut:
    """MoCo's pretext task solved by gray-level histograms alone: each query view's
    ``gray_quantiles`` matched, by Euclidean distance, against its key view's and a queue of
    the last ``K`` keys' (all ranks' keys, enqueued after each step as MoCo enqueues its
    keys). Its top-1, the share of queries whose own key is nearest (ties count for the key,
    as MoCo's argmax gives them to the positive), is what MoCo could reach without looking at
    anatomy at all. Queue entries not yet filled are not candidates. ``state_dict`` /
    ``load_state_dict``: the queue and its pointer, for exact resume of the logged curve."""

    def __init__(self, K: int, device, n: int = QUANTILES):
        self.K = K
        self.queue = torch.full((K, n), math.nan, device=device)
        self.ptr = 0

    @torch.no_grad()
    def step(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
        """This rank's top-1 on its views (a 0-dim tensor); then all ranks' keys enqueued."""
        q, k = gray_quantiles(im_q), gray_quantiles(im_k)
        positive = (q - k).norm(dim=1)
        negative = torch.cdist(q, self.queue).nan_to_num(math.inf).amin(dim=1)
        top1 = (positive <= negative).float().mean()
        keys = all_gather_cat(k)
        self.queue[self.ptr:self.ptr + len(keys)] = keys
        self.ptr = (self.ptr + len(keys)) % self.K
        return top1

    def state_dict(self) -> dict:
        return {"queue": self.queue.cpu(), "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        self.queue.copy_(state["queue"])
        self.ptr = int(state["ptr"])


@torch.no_grad()
def in_batch_top1(q: torch.Tensor, keys: torch.Tensor, first: int) -> torch.Tensor:
    """MoCo's task among the step's own keys: the share of the queries ``q`` (b, D) whose own
    key, row ``first + i`` of ``keys`` (all ranks' keys of the step, (B, D)), is the most
    similar of the B (a 0-dim tensor; chance 1/B). Every one of these keys comes from this
    step's key encoder, so none can be told from the positive by its age, as a queue's keys,
    encoded by earlier key encoders, can: when the encoder moves fast, the fresh positive
    beats stale negatives whatever the images. MoCo's top-1 far above this one (which faces
    B - 1 negatives, not K) says the queue's task is solved through that staleness."""
    sims = q.float() @ keys.float().T
    own = torch.arange(first, first + len(q), device=q.device)
    return (sims.argmax(dim=1) == own).float().mean()


@torch.no_grad()
def collapse_std(z: torch.Tensor) -> float:
    """The standard deviation over the batch (population, all ``N`` rows) of the L2-normalised
    embeddings ``z`` (N, D), per dimension, averaged over dimensions (SimSiam, Chen & He 2021).

    Embeddings spread over the unit sphere give about ``1/sqrt(D)``; all alike (collapse) give
    0; embeddings confined to ``r`` of the ``D`` dimensions give about ``sqrt(r)/D``. ``z`` is
    normalised again here, which changes nothing for MoCo's ``q`` and makes raw features safe."""
    z = F.normalize(z.detach().float(), dim=1)
    return float(z.std(dim=0, correction=0).mean())


def collapse_warning(std_x_sqrt_dim: float, threshold: float) -> str | None:
    """The warning to print when ``collapse_std × sqrt(D)`` (≈ 1 when healthy) is below
    ``threshold``, else None."""
    if not std_x_sqrt_dim < threshold:
        return None
    return (f"warning: the query embeddings look collapsed: their spread over the batch "
            f"(collapse_std x sqrt(dim)) is {std_x_sqrt_dim:.3f}, below "
            f"run.monitor_collapse_warn {threshold:g} (about 1 when healthy, 0 when every image "
            f"gets the same embedding); check the learning rate and the augmentations")


def _quarters(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Means of the first and the last quarter of a curve's logged values (one logged batch
    is noisy: at batch 16 a top-1 moves in steps of 1/16)."""
    values = [v for _, v in points]
    n = max(1, len(values) // 4)
    return sum(values[:n]) / n, sum(values[-n:]) / n


def pretext_report(scalars: dict[str, list[tuple[int, float]]], K: int, batch: int
                   ) -> list[str]:
    """An MD-MoCo run's monitors (``scalars`` as ``tblog.read_scalars`` gives them; ``K`` and
    ``batch``, the global batch, from its config) in lines for a person: each curve from its
    first logged quarter to its last, beside its chance level, the kNN AUCs from the first
    pass to the last; then what they say together. The readings compare measured values only
    (no tuned thresholds): MoCo's top-1 against K queue keys above its top-1 among the step's
    B - 1 own keys means the queue's task is solved through the keys' age; the histograms'
    top-1 at or above MoCo's means the views leave a cue that needs no anatomy; a kNN AUC at
    or below its first pass (the Kaiming start of a new run) means the features do not carry
    the finding. A curve the run did not log (a run older than its monitor) is left out,
    with the readings that need it."""
    quarters = {tag: _quarters(points) for tag, points in scalars.items() if points}
    lines = []
    for tag, what, chance in (
            ("train/loss", "loss", f"chance ln(1+K) = {math.log(1 + K):.3f}"),
            ("train/top1", "top-1 against the queue", f"chance 1/(1+K) = {1 / (1 + K):.3f}"),
            ("monitor/top1_in_batch", "top-1 among the step's own keys",
             f"chance 1/B = {1 / batch:.3f}"),
            ("monitor/shortcut_top1", "top-1 of the gray-level histograms alone", ""),
            ("monitor/collapse_std_x_sqrt_dim", "spread of the embeddings",
             "about 1 healthy, 0 collapsed")):
        if tag in quarters:
            first, last = quarters[tag]
            lines.append(f"{what} {first:.3f} -> {last:.3f}" + (f" ({chance})" if chance else ""))
    top1 = quarters.get("train/top1", (math.nan, math.nan))
    in_batch = quarters.get("monitor/top1_in_batch", (math.nan, math.nan))
    histograms = quarters.get("monitor/shortcut_top1", (math.nan, math.nan))
    knn = {tag.split("/")[2]: points for tag, points in sorted(scalars.items())
           if tag.startswith("monitor/knn/") and tag.endswith("/auc")}
    for task, points in knn.items():
        (s0, first), (s1, last) = points[0], points[-1]
        lines.append(f"kNN {task} valid AUC {first:.3f} at step {s0} -> {last:.3f} at step {s1}")
    if top1[1] > in_batch[1]:
        lines.append("reading: MoCo finds the positive among the K queue keys more often than "
                     "among the step's B - 1 own keys: it tells the queue's keys from the "
                     "fresh one by their age (the older key encoders that made them) rather "
                     "than by the image")
    if histograms[1] >= top1[1]:
        lines.append("reading: the gray-level histograms alone find the positive at least as "
                     "often as MoCo: the views leave a cue that needs no anatomy (data.views)")
    flat = [t for t, p in knn.items() if p[-1][1] <= p[0][1]]
    if flat:
        lines.append(f"reading: the kNN AUC of {', '.join(flat)} ended at or below its first "
                     f"pass: the features do not carry the finding{'s' * (len(flat) > 1)}")
    elif knn:
        lines.append(f"reading: the kNN AUC of {', '.join(knn)} rose above its first pass")
    return lines
