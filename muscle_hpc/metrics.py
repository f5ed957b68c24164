"""The paper's metrics, computed with the reference libraries (scikit-learn, pycocotools).

- ``classification``: accuracy, sensitivity, specificity (class 1 is positive) and ROC AUC.
- ``segmentation``: Dice of the foreground (mean over images; an image where both masks are
  empty scores 1) and mIoU (per-class IoU from the confusion matrix summed over all images,
  then averaged over classes, as torchvision's segmentation reference does).
- ``detection``: COCO AP at IoU 0.5 per class and their mean (classes without any ground-truth
  box are left out of the mean, as COCO does).

Inputs are per-sample records, so ranks can evaluate shards of a split and gather them.
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np


def classification(labels, probs) -> dict[str, float]:
    """``labels`` (N,) in {0, 1}; ``probs`` (N,) probability of class 1 (or (N, 2))."""
    from sklearn.metrics import confusion_matrix, roc_auc_score

    y = np.asarray(labels).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 2:
        p = p[:, 1]
    pred = (p >= 0.5).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    both = len(np.unique(y)) == 2
    return {"acc": float((tp + tn) / len(y)) if len(y) else math.nan,
            "sen": float(tp / (tp + fn)) if tp + fn else math.nan,
            "spe": float(tn / (tn + fp)) if tn + fp else math.nan,
            "auc": float(roc_auc_score(y, p)) if both else math.nan}


def confusion(true_mask, pred_mask, num_classes: int) -> np.ndarray:
    """(C, C) pixel counts, rows = truth, columns = prediction."""
    t = np.asarray(true_mask, np.int64).ravel()
    p = np.asarray(pred_mask, np.int64).ravel()
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes,
                                                                             num_classes)


def segmentation(confusions) -> dict[str, float]:
    """From per-image confusion matrices (``confusion``): foreground Dice and mIoU."""
    cms = np.asarray(confusions, np.int64)
    dices = []
    for cm in cms:
        tp, fp, fn = cm[1:, 1:].trace(), cm[0, 1:].sum(), cm[1:, 0].sum()
        dices.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    total = cms.sum(axis=0)
    union = total.sum(axis=0) + total.sum(axis=1) - np.diag(total)
    present = union > 0
    iou = np.diag(total)[present] / union[present]
    return {"dice": float(np.mean(dices)) if dices else math.nan,
            "miou": float(iou.mean()) if iou.size else math.nan}


def detection(ground_truth, detections, classes: dict[int, str], iou: float = 0.5
              ) -> dict[str, float]:
    """COCO AP at ``iou``. ``ground_truth``: per image ``(boxes (n, 4) xyxy, labels (n,))``;
    ``detections``: per image ``(boxes, scores, labels)``; ``classes``: label -> name.
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
    has_gt = {int(a["category_id"]) for a in annotations}
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
