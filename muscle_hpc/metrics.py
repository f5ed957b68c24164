"""The paper's metrics, computed with the reference libraries (scikit-learn, pycocotools).

- ``classification``: accuracy, sensitivity, specificity (class 1 is positive) and ROC AUC,
  optionally with percentile-bootstrap confidence intervals (``bootstrap_ci``).
- ``multiclass``: more than two classes: accuracy of the argmax, one-vs-rest macro ROC AUC, and
  each class's sensitivity and specificity (one-vs-rest of the argmax prediction).
- ``multilabel``: ROC AUC of each finding and their mean.
- ``regression``: MAE and RMSE in the target's unit.
- ``roc_curve``: the ROC curve's points, JSON-ready.
- ``segmentation``: Dice of each foreground class (mean over images; an image where both masks
  are empty of the class scores 1) and their mean, and mIoU (per-class IoU from the confusion
  matrix summed over all images, then averaged over classes, as torchvision's segmentation
  reference does).
- ``detection``: COCO AP at IoU 0.5 per class and their mean (classes without any ground-truth
  box are left out of the mean, as COCO does).

Inputs are per-sample records, so ranks can evaluate shards of a split and gather them.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable

import numpy as np

# sklearn.metrics (~1.5 s) and pycocotools are imported where they are used: the stages import
# this module at start, and most runs score only some kinds.


def _binary(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` as int in {0, 1} and ``probs`` as the (N,) probability of class 1."""
    y = np.asarray(labels).astype(np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 2:
        p = p[:, 1]
    p = p.ravel()
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} probabilities")
    if y.size and (y.min() < 0 or y.max() > 1):
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(np.unique(y).tolist()))}")
    return y, p


def _scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """The four metrics of validated arrays; NaN where one is undefined (no sample, no class)."""
    from sklearn.metrics import roc_auc_score

    # bincount rather than sklearn's confusion_matrix: same counts, no per-call validation
    # (it runs once per bootstrap resample), and it takes an empty split.
    tn, fp, fn, tp = np.bincount(2 * y + (p >= 0.5), minlength=4).tolist()
    n = tn + fp + fn + tp
    return {"acc": (tp + tn) / n if n else math.nan,
            "sen": tp / (tp + fn) if tp + fn else math.nan,
            "spe": tn / (tn + fp) if tn + fp else math.nan,
            "auc": float(roc_auc_score(y, p)) if tp + fn and tn + fp else math.nan}


def bootstrap_ci(fn: Callable[[np.ndarray, np.ndarray], dict[str, float]], labels, probs,
                 resamples: int, seed: int = 0, level: float = 0.95
                 ) -> dict[str, tuple[list[float], int]]:
    """Percentile-bootstrap CIs of every metric ``fn(labels, probs)`` returns.

    Resample ``r`` is the ``r``-th ``rng.integers(0, n, n)`` of ``np.random.default_rng(seed)``
    (drawn one at a time, so memory stays O(n) for any ``resamples``); all metrics are computed
    on the same index sets. A resample where a metric is NaN (undefined, e.g. AUC without both
    classes) is left out of that metric's percentiles, as is usual, which biases the CI towards
    the resamples that have both classes when they are rare. Returns ``name -> ([lo, hi],
    resamples left out)``; ``[nan, nan]`` when none is defined. The percentile method is simple
    and widely used, but undercovers on small sets (BCa would correct that, at a cost).
    """
    if resamples < 0:
        raise ValueError(f"resamples must be >= 0, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    y, p = np.asarray(labels), np.asarray(probs)
    n = len(y)
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {name: [] for name in fn(y, p)}
    for _ in range(resamples if n else 0):
        idx = rng.integers(0, n, n)
        for name, v in fn(y[idx], p[idx]).items():
            values[name].append(v)
    tail = (1 - level) / 2
    out = {}
    for name, vs in values.items():
        vs = np.asarray(vs, np.float64)
        kept = vs[~np.isnan(vs)]
        ci = np.quantile(kept, [tail, 1 - tail]).tolist() if kept.size else [math.nan] * 2
        out[name] = ([float(v) for v in ci], resamples - int(kept.size))
    return out


def classification(labels, probs, resamples: int = 0, seed: int = 0, level: float = 0.95
                   ) -> dict:
    """``labels`` (N,) in {0, 1}; ``probs`` (N,) probability of class 1 (or (N, 2)); a sample is
    predicted positive when its probability is >= 0.5.

    Returns ``acc``, ``sen``, ``spe``, ``auc`` (floats, NaN where undefined). With
    ``resamples > 0`` also ``<metric>_ci`` (``[lo, hi]`` at ``level``, see ``bootstrap_ci``),
    ``ci_resamples`` and ``auc_ci_skipped``: the resamples without both classes, left out of
    every CI where the metric is undefined (sen needs a positive, spe a negative, so these are
    the only resamples sen and spe can lose too). Without resamples the dict holds exactly the
    four floats, which callers log as scalars.
    """
    y, p = _binary(labels, probs)
    out: dict = _scores(y, p)
    if resamples:  # bootstrap_ci rejects a negative count
        cis = bootstrap_ci(_scores, y, p, resamples, seed, level)
        out.update({f"{name}_ci": ci for name, (ci, _) in cis.items()})
        out["ci_resamples"] = int(resamples)
        out["auc_ci_skipped"] = cis["auc"][1]
    return out


def _with_cis(out: dict, fn, y, p, resamples: int, seed: int, level: float,
              keys=None) -> dict:
    """``out`` plus the bootstrap CIs of ``fn``'s metrics (``keys`` of them, all when None),
    ``ci_resamples`` and ``auc_ci_skipped`` when ``fn`` has an auc: ``classification``'s
    layout for every kind."""
    if not resamples:  # bootstrap_ci rejects a negative count
        return out
    cis = bootstrap_ci(fn, y, p, resamples, seed, level)
    out.update({f"{name}_ci": ci for name, (ci, _) in cis.items()
                if keys is None or name in keys})
    out["ci_resamples"] = int(resamples)
    if "auc" in cis:
        out["auc_ci_skipped"] = cis["auc"][1]
    return out


def _multiclass_scores(y: np.ndarray, p: np.ndarray, names) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    k = p.shape[1]
    pred = p.argmax(axis=1)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)  # rows truth, cols prediction
    n = int(cm.sum())
    present = cm.sum(axis=1) > 0
    out = {"acc": float(np.trace(cm) / n) if n else math.nan,
           "auc": float(roc_auc_score(y, p, multi_class="ovr", average="macro",
                                      labels=np.arange(k))) if present.all() else math.nan}
    for c, name in enumerate(names):
        tp = cm[c, c]
        fn = cm[c].sum() - tp
        fp = cm[:, c].sum() - tp
        tn = n - tp - fn - fp
        out[f"sen_{name}"] = float(tp / (tp + fn)) if tp + fn else math.nan
        out[f"spe_{name}"] = float(tn / (tn + fp)) if tn + fp else math.nan
    return out


def multiclass(labels, probs, classes, resamples: int = 0, seed: int = 0,
               level: float = 0.95) -> dict:
    """``labels`` (N,) in 0..K-1; ``probs`` (N, K) class probabilities (rows summing to 1);
    ``classes``: the K class names. The predicted class is the argmax.

    Returns ``acc``; ``auc``, scikit-learn's ``roc_auc_score(multi_class="ovr",
    average="macro")``, NaN unless every class occurs in the split (a one-vs-rest AUC needs
    both sides); ``sen_C`` and ``spe_C`` of each class C, one-vs-rest of the argmax prediction
    (NaN without a sample of C, resp. of another class). With ``resamples > 0`` as
    ``classification``: ``<metric>_ci`` of every metric, ``ci_resamples`` and
    ``auc_ci_skipped`` (the resamples that miss a class, left out of the auc CI)."""
    y = np.asarray(labels).astype(np.int64).ravel()
    k = len(classes)
    p = np.asarray(probs, dtype=np.float64).reshape(len(y), k)
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"labels must be in 0..{k - 1}, got {sorted(np.unique(y).tolist())}")

    def fn(y, p):
        return _multiclass_scores(y, p, classes)

    return _with_cis(fn(y, p), fn, y, p, resamples, seed, level)


def _multilabel_scores(y: np.ndarray, p: np.ndarray, names) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    per = {}
    for c, name in enumerate(names):
        col = y[:, c]
        both = col.any() and not col.all()
        per[f"auc_{name}"] = float(roc_auc_score(col, p[:, c])) if both else math.nan
    defined = [v for v in per.values() if not math.isnan(v)]
    return {"auc": float(np.mean(defined)) if defined else math.nan, **per}


def multilabel(labels, probs, classes, resamples: int = 0, seed: int = 0,
               level: float = 0.95) -> dict:
    """``labels`` (N, C) multi-hot; ``probs`` (N, C) each finding's probability; ``classes``:
    the C finding names.

    Returns ``auc_C``, each finding's ROC AUC (scikit-learn's ``roc_auc_score`` of its column),
    and ``auc``, their mean. A finding that is present in every image of the split, or in none,
    has no AUC: its ``auc_C`` is NaN and it is left out of the mean (which is NaN when no
    finding has one). With ``resamples > 0``: ``auc_ci`` of the mean (a resample's mean over
    the findings defined in it), ``ci_resamples`` and ``auc_ci_skipped`` (resamples where no
    finding is defined)."""
    y = np.asarray(labels).astype(np.int64)
    c = len(classes)
    y = y.reshape(-1, c)
    p = np.asarray(probs, dtype=np.float64).reshape(len(y), c)

    def fn(y, p):
        return _multilabel_scores(y, p, classes)

    def mean_only(y, p):
        return {"auc": fn(y, p)["auc"]}

    return _with_cis(fn(y, p), mean_only, y, p, resamples, seed, level)


def _regression_scores(t: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    if not t.size:
        return {"mae": math.nan, "rmse": math.nan}
    return {"mae": float(mean_absolute_error(t, p)),
            "rmse": float(mean_squared_error(t, p) ** 0.5)}


def regression(targets, predictions, resamples: int = 0, seed: int = 0,
               level: float = 0.95) -> dict:
    """``targets`` and ``predictions`` (N,) in the target's unit. Returns ``mae`` and ``rmse``
    (scikit-learn's ``mean_absolute_error`` and the root of ``mean_squared_error``; NaN on an
    empty split); with ``resamples > 0`` also ``mae_ci``, ``rmse_ci`` and ``ci_resamples``."""
    t = np.asarray(targets, dtype=np.float64).ravel()
    p = np.asarray(predictions, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"{t.size} targets but {p.size} predictions")
    return _with_cis(_regression_scores(t, p), _regression_scores, t, p, resamples, seed, level)


def roc_curve(labels, probs) -> dict[str, list[float]]:
    """The ROC curve (``sklearn.metrics.roc_curve``, default ``drop_intermediate``) as lists of
    floats. scikit-learn >= 1.3 starts ``thresholds`` with ``inf``; it is replaced by
    ``max(probs) + 1`` (what scikit-learn < 1.3 returned) rather than dropped, so the curve keeps
    its (0, 0) point and the JSON stays strict. Empty lists without both classes (no curve)."""
    from sklearn.metrics import roc_curve as sk_roc_curve

    y, p = _binary(labels, probs)
    if len(np.unique(y)) < 2:
        return {"fpr": [], "tpr": [], "thresholds": []}
    fpr, tpr, thresholds = sk_roc_curve(y, p)
    thresholds = np.where(np.isposinf(thresholds), p.max() + 1, thresholds)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist()}


def confusion(true_mask, pred_mask, num_classes: int) -> np.ndarray:
    """(C, C) pixel counts, rows = truth, columns = prediction."""
    t = np.asarray(true_mask, np.int64).ravel()
    p = np.asarray(pred_mask, np.int64).ravel()
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes,
                                                                             num_classes)


def segmentation(confusions, dice: str = "per_image", classes=None) -> dict[str, float]:
    """From per-image (K, K) confusion matrices (``confusion``, class 0 the background): Dice
    and mIoU. ``dice``: ``per_image`` (a class's Dice is the mean of every image's) or
    ``pooled`` (one Dice of all pixels of the split). A foreground class c's Dice in an image
    is ``2 TP / (2 TP + FP + FN)`` of c against every other class, 1 where neither mask has c.

    Returns ``dice``, the mean of the foreground classes' Dice (with two classes the Dice of
    the foreground), and ``miou`` over all K classes (a class absent from truth and prediction
    alike is left out). With ``classes`` (the K names) and K > 2, also ``dice_C`` of each
    foreground class C. NaN on an empty split."""
    cms = np.asarray(confusions, np.int64)
    if dice not in ("per_image", "pooled"):
        raise ValueError(f"dice must be per_image or pooled, not {dice!r}")
    k = cms.shape[-1] if cms.ndim == 3 else len(classes or (0, 1))
    per_class = classes is not None and len(classes) > 2
    if not len(cms):  # an empty split
        return {"dice": math.nan, "miou": math.nan,
                **({f"dice_{c}": math.nan for c in classes[1:]} if per_class else {})}
    scored = cms if dice == "per_image" else cms.sum(axis=0, keepdims=True)
    class_dice = []
    for c in range(1, k):
        dices = []
        for cm in scored:
            tp = cm[c, c]
            fp, fn = cm[:, c].sum() - tp, cm[c, :].sum() - tp
            dices.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
        class_dice.append(float(np.mean(dices)))
    total = cms.sum(axis=0)
    union = total.sum(axis=0) + total.sum(axis=1) - np.diag(total)
    present = union > 0
    iou = np.diag(total)[present] / union[present]
    out = {"dice": float(np.mean(class_dice)),
           "miou": float(iou.mean()) if iou.size else math.nan}
    if per_class:
        out.update({f"dice_{name}": d for name, d in zip(classes[1:], class_dice, strict=True)})
    return out


def detection(ground_truth, detections, classes: dict[int, str], iou: float = 0.5,
              recall_points: int = 101) -> dict[str, float]:
    """COCO AP at ``iou``. ``ground_truth``: per image ``(boxes (n, 4) xyxy, labels (n,))``;
    ``detections``: per image ``(boxes, scores, labels)``; ``classes``: label -> name.
    ``recall_points``: the interpolated precision is averaged at this many evenly spaced
    recalls, 101 as COCO (pycocotools' default), 11 as PASCAL VOC 2007.
    Returns ``map`` and ``ap_<name>`` per class (NaN for a class without ground truth)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for i, ((gb, gl), (db, ds, dl)) in enumerate(zip(ground_truth, detections, strict=True)):
        images.append({"id": i})
        for box, label in zip(np.asarray(gb, np.float64).reshape(-1, 4), np.asarray(gl)):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": i,
                                "category_id": int(label), "bbox": [box[0], box[1], w, h],
                                "area": w * h, "iscrowd": 0})
        for box, score, label in zip(np.asarray(db, np.float64).reshape(-1, 4),
                                     np.asarray(ds), np.asarray(dl)):
            results.append({"image_id": i, "category_id": int(label), "score": float(score),
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    out = {f"ap_{name}": math.nan for name in classes.values()}
    # A label outside ``classes`` is not scored; counting it here would average an empty list.
    has_gt = {int(a["category_id"]) for a in annotations} & set(classes)
    if not has_gt:
        return {"map": math.nan, **out}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": k, "name": classes[k]} for k in sorted(classes)]}
        gt.createIndex()
        if results:
            ev = COCOeval(gt, gt.loadRes(results), "bbox")
            ev.params.iouThrs = np.array([iou])
            ev.params.recThrs = np.linspace(0.0, 1.0, recall_points)
            ev.evaluate()
            ev.accumulate()
            precision = ev.eval["precision"]  # (iou, recall, class, area, max dets)
    for k, cat in enumerate(sorted(classes)):  # COCOeval orders classes by id
        name = classes[cat]
        if cat not in has_gt:
            continue
        if not results:
            out[f"ap_{name}"] = 0.0
            continue
        p = precision[0, :, k, 0, -1]
        p = p[p > -1]
        out[f"ap_{name}"] = float(p.mean()) if p.size else 0.0
    aps = [out[f"ap_{classes[c]}"] for c in classes if c in has_gt]
    return {"map": float(np.mean(aps)), **out}
