"""The metrics against the reference libraries and against answers worked out by hand."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from muscle_hpc import metrics

TOL = 1e-6


def random_scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and informative (but imperfect) probabilities, some of them tied."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1).round(2)
    return y, p


def reference_scores(y, p) -> dict[str, float]:
    """acc/sen/spe/auc the way scikit-learn's own functions give them."""
    pred = (np.asarray(p) >= 0.5).astype(int)
    both = len(np.unique(y)) == 2
    return {"acc": skm.accuracy_score(y, pred),
            "sen": skm.recall_score(y, pred, pos_label=1, zero_division=np.nan),
            "spe": skm.recall_score(y, pred, pos_label=0, zero_division=np.nan),
            "auc": skm.roc_auc_score(y, p) if both else math.nan}


def percentile_ci(values, level: float = 0.95) -> list[float]:
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    if not values.size:
        return [math.nan, math.nan]
    tail = (1 - level) / 2
    return np.percentile(values, [100 * tail, 100 * (1 - tail)]).tolist()


def hand_bootstrap(y, p, resamples: int, seed: int, level: float = 0.95) -> dict:
    """The bootstrap spelled out: the same rng calls as metrics.bootstrap_ci, one at a time."""
    y, p = np.asarray(y), np.asarray(p)
    rng = np.random.default_rng(seed)
    per = {"acc": [], "sen": [], "spe": [], "auc": []}
    for _ in range(resamples):
        idx = rng.integers(0, len(y), len(y))
        for k, v in reference_scores(y[idx], p[idx]).items():
            per[k].append(v)
    return {k: (percentile_ci(v, level), int(np.isnan(v).sum())) for k, v in per.items()}


def close(a, b) -> bool:
    return np.allclose(a, b, atol=TOL, rtol=0, equal_nan=True)


# classification: point estimates

def test_classification_counts_match_sklearn_confusion_matrix():
    y, p = random_scores(300, seed=1)
    tn, fp, fn, tp = skm.confusion_matrix(y, (p >= 0.5).astype(int), labels=[0, 1]).ravel()
    out = metrics.classification(y, p)
    assert out["acc"] == pytest.approx((tp + tn) / len(y), abs=TOL)
    assert out["sen"] == pytest.approx(tp / (tp + fn), abs=TOL)
    assert out["spe"] == pytest.approx(tn / (tn + fp), abs=TOL)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_classification_matches_sklearn_scores(seed):
    y, p = random_scores(257, seed=seed)
    out = metrics.classification(y, p)
    ref = reference_scores(y, p)
    for k in ref:
        assert out[k] == pytest.approx(ref[k], abs=TOL), k


def test_classification_accepts_two_column_probabilities():
    y, p = random_scores(100, seed=4)
    assert metrics.classification(y, np.stack([1 - p, p], axis=1)) == \
        metrics.classification(y, p)


def test_classification_threshold_half_is_positive():
    out = metrics.classification([1, 0], [0.5, 0.4999999])
    assert out["sen"] == 1.0 and out["spe"] == 1.0 and out["acc"] == 1.0


def test_classification_one_class_gives_nan_auc_without_error():
    out = metrics.classification([1, 1, 1], [0.2, 0.7, 0.9])
    assert math.isnan(out["auc"]) and math.isnan(out["spe"])
    assert out["sen"] == pytest.approx(2 / 3)
    out = metrics.classification([0, 0], [0.2, 0.7])
    assert math.isnan(out["auc"]) and math.isnan(out["sen"]) and out["spe"] == 0.5


def test_classification_empty_split_gives_nan():
    out = metrics.classification((), ())
    assert set(out) == {"acc", "sen", "spe", "auc"}
    assert all(math.isnan(v) for v in out.values())


def test_classification_rejects_labels_other_than_0_1():
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.classification([0, 2], [0.1, 0.9])
    with pytest.raises(ValueError, match="labels"):
        metrics.classification([0, 1, 1], [0.1, 0.9])


def test_classification_without_resamples_is_exactly_four_floats():
    y, p = random_scores(50)
    for out in (metrics.classification(y, p), metrics.classification(y, p, resamples=0)):
        assert set(out) == {"acc", "sen", "spe", "auc"}
        assert all(type(v) is float for v in out.values())


# classification: bootstrap CIs

def test_bootstrap_keys_and_types():
    y, p = random_scores(200)
    out = metrics.classification(y, p, resamples=20, seed=3)
    assert set(out) == {"acc", "sen", "spe", "auc", "acc_ci", "sen_ci", "spe_ci", "auc_ci",
                        "ci_resamples", "auc_ci_skipped"}
    assert type(out["ci_resamples"]) is int and out["ci_resamples"] == 20
    assert type(out["auc_ci_skipped"]) is int and out["auc_ci_skipped"] == 0
    for k in ("acc", "sen", "spe", "auc"):
        ci = out[f"{k}_ci"]
        assert isinstance(ci, list) and len(ci) == 2 and all(type(v) is float for v in ci)
    json.dumps(out, allow_nan=False)


def test_bootstrap_ci_contains_point_estimate():
    y, p = random_scores(500, seed=5)
    out = metrics.classification(y, p, resamples=200, seed=0)
    for k in ("acc", "sen", "spe", "auc"):
        lo, hi = out[f"{k}_ci"]
        assert lo < out[k] < hi, k
        assert hi - lo < 0.2, k


def test_bootstrap_same_seed_same_ci_other_seed_other_ci():
    y, p = random_scores(300, seed=6)
    a = metrics.classification(y, p, resamples=50, seed=7)
    assert a == metrics.classification(y, p, resamples=50, seed=7)
    b = metrics.classification(y, p, resamples=50, seed=8)
    assert a["auc_ci"] != b["auc_ci"]
    assert {k: a[k] for k in ("acc", "sen", "spe", "auc")} == \
        {k: b[k] for k in ("acc", "sen", "spe", "auc")}


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_bootstrap_ci_equals_hand_written_loop(level):
    y, p = random_scores(120, seed=9)
    out = metrics.classification(y, p, resamples=60, seed=11, level=level)
    ref = hand_bootstrap(y, p, 60, seed=11, level=level)
    for k, (ci, _) in ref.items():
        assert close(out[f"{k}_ci"], ci), k


def test_bootstrap_narrower_at_lower_level():
    y, p = random_scores(300, seed=12)
    wide = metrics.classification(y, p, resamples=100, level=0.95)["auc_ci"]
    narrow = metrics.classification(y, p, resamples=100, level=0.5)["auc_ci"]
    assert wide[0] <= narrow[0] < narrow[1] <= wide[1]


def test_bootstrap_skips_one_class_resamples():
    # One positive in five: (4/5)^5, about a third of the resamples, have no positive at all.
    y = np.array([0, 0, 0, 0, 1])
    p = np.array([0.1, 0.4, 0.6, 0.8, 0.7])
    out = metrics.classification(y, p, resamples=200, seed=2)
    ref = hand_bootstrap(y, p, 200, seed=2)
    assert out["auc_ci_skipped"] == ref["auc"][1]
    assert 30 < out["auc_ci_skipped"] < 110
    assert close(out["auc_ci"], ref["auc"][0])
    assert not any(math.isnan(v) for v in out["auc_ci"])
    # sen loses the resamples without a positive, spe those without a negative: AUC loses both
    assert ref["sen"][1] + ref["spe"][1] == out["auc_ci_skipped"]
    assert close(out["sen_ci"], ref["sen"][0])
    assert close(out["spe_ci"], ref["spe"][0]) and close(out["acc_ci"], ref["acc"][0])


def test_bootstrap_all_one_class_gives_nan_ci():
    out = metrics.classification([1, 1, 1, 1], [0.3, 0.6, 0.7, 0.9], resamples=25)
    assert all(math.isnan(v) for v in out["auc_ci"] + out["spe_ci"])
    assert out["auc_ci_skipped"] == 25
    assert not any(math.isnan(v) for v in out["sen_ci"] + out["acc_ci"])


def test_bootstrap_empty_split_gives_nan_ci():
    out = metrics.classification((), (), resamples=10)
    assert all(math.isnan(v) for k in ("acc", "sen", "spe", "auc") for v in out[f"{k}_ci"])
    assert out["auc_ci_skipped"] == 10


def test_bootstrap_ci_helper_with_other_metric():
    y, p = random_scores(80, seed=13)

    def mean_prob(labels, probs):
        return {"mean": float(np.mean(probs)), "never": math.nan}

    out = metrics.bootstrap_ci(mean_prob, y, p, resamples=40, seed=1, level=0.9)
    rng = np.random.default_rng(1)
    means = [p[rng.integers(0, len(p), len(p))].mean() for _ in range(40)]
    assert close(out["mean"][0], percentile_ci(means, 0.9)) and out["mean"][1] == 0
    assert all(math.isnan(v) for v in out["never"][0]) and out["never"][1] == 40


@pytest.mark.parametrize("kwargs", [{"resamples": -1}, {"resamples": 5, "level": 1.0},
                                    {"resamples": 5, "level": 0.0}])
def test_bootstrap_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        metrics.classification([0, 1], [0.2, 0.8], **kwargs)


# ROC curve

def test_roc_curve_equals_sklearn():
    y, p = random_scores(200, seed=14)
    out = metrics.roc_curve(y, p)
    fpr, tpr, thr = skm.roc_curve(y, p)
    assert close(out["fpr"], fpr) and close(out["tpr"], tpr)
    assert close(out["thresholds"][1:], thr[1:])
    # the first point predicts nothing positive: its threshold is above every probability
    assert out["fpr"][0] == 0 and out["tpr"][0] == 0 and out["thresholds"][0] > p.max()
    assert out == metrics.roc_curve(y, np.stack([1 - p, p], axis=1))


def test_roc_curve_is_strict_json():
    y, p = random_scores(50, seed=15)
    out = metrics.roc_curve(y, p)
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    assert all(type(v) is float for vs in out.values() for v in vs)


@pytest.mark.parametrize("labels,probs", [((), ()), ([1, 1], [0.3, 0.8]), ([0], [0.5])])
def test_roc_curve_without_both_classes_is_empty(labels, probs):
    assert metrics.roc_curve(labels, probs) == {"fpr": [], "tpr": [], "thresholds": []}


# segmentation

def random_masks(count: int, shape=(12, 9), classes: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = [rng.integers(0, classes, shape) for _ in range(count)]
    pred = [np.where(rng.random(shape) < 0.75, t, rng.integers(0, classes, shape))
            for t in truth]
    return truth, pred


def test_confusion_matches_sklearn():
    truth, pred = random_masks(1, classes=3, seed=1)
    assert (metrics.confusion(truth[0], pred[0], 3) ==
            skm.confusion_matrix(truth[0].ravel(), pred[0].ravel(), labels=[0, 1, 2])).all()


def test_dice_is_mean_of_per_image_f1():
    truth, pred = random_masks(5, seed=2)
    out = metrics.segmentation([metrics.confusion(t, q, 2) for t, q in zip(truth, pred)])
    f1 = [skm.f1_score(t.ravel(), q.ravel()) for t, q in zip(truth, pred)]
    assert out["dice"] == pytest.approx(np.mean(f1), abs=TOL)


def test_pooled_dice_is_the_f1_of_all_pixels():
    truth, pred = random_masks(5, seed=2)
    out = metrics.segmentation([metrics.confusion(t, q, 2) for t, q in zip(truth, pred)],
                               dice="pooled")
    all_t = np.concatenate([t.ravel() for t in truth])
    all_p = np.concatenate([q.ravel() for q in pred])
    assert out["dice"] == pytest.approx(skm.f1_score(all_t, all_p), abs=TOL)
    assert all(math.isnan(v) for v in metrics.segmentation([], dice="pooled").values())


def test_dice_of_two_empty_masks_is_one_and_of_a_false_alarm_is_zero():
    empty = np.zeros((4, 4), int)
    alarm = empty.copy()
    alarm[1, 1] = 1
    assert metrics.segmentation([metrics.confusion(empty, empty, 2)])["dice"] == 1.0
    assert metrics.segmentation([metrics.confusion(empty, alarm, 2)])["dice"] == 0.0
    assert metrics.segmentation([metrics.confusion(alarm, empty, 2)])["dice"] == 0.0
    both = [metrics.confusion(empty, empty, 2), metrics.confusion(empty, alarm, 2)]
    assert metrics.segmentation(both)["dice"] == 0.5


@pytest.mark.parametrize("classes", [2, 3])
def test_miou_is_macro_jaccard_over_all_pixels(classes):
    truth, pred = random_masks(4, classes=classes, seed=3)
    out = metrics.segmentation([metrics.confusion(t, q, classes) for t, q in zip(truth, pred)])
    all_t = np.concatenate([t.ravel() for t in truth])
    all_p = np.concatenate([q.ravel() for q in pred])
    assert out["miou"] == pytest.approx(skm.jaccard_score(all_t, all_p, average="macro"),
                                        abs=TOL)


def test_miou_leaves_out_a_class_absent_from_truth_and_prediction():
    truth, pred = random_masks(3, classes=2, seed=4)  # class 2 of 3 never occurs
    out = metrics.segmentation([metrics.confusion(t, q, 3) for t, q in zip(truth, pred)])
    all_t = np.concatenate([t.ravel() for t in truth])
    all_p = np.concatenate([q.ravel() for q in pred])
    assert out["miou"] == pytest.approx(skm.jaccard_score(all_t, all_p, average="macro"),
                                        abs=TOL)


# detection (COCO AP at IoU 0.5)

CLASSES = {1: "nodule", 2: "mass"}
NONE = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))


def det(boxes, scores, labels):
    return np.asarray(boxes, float).reshape(-1, 4), np.asarray(scores, float), np.asarray(labels)


def gt(boxes, labels):
    return np.asarray(boxes, float).reshape(-1, 4), np.asarray(labels)


def test_detection_perfect_box():
    out = metrics.detection([gt([[10, 10, 50, 60]], [1])],
                            [det([[10, 10, 50, 60]], [0.9], [1])], CLASSES)
    # pycocotools' precision is tp / (tp + fp + eps), so "1" is 1 - 1e-16
    assert out["ap_nodule"] == pytest.approx(1.0, abs=TOL) == out["map"]
    assert math.isnan(out["ap_mass"])


def test_detection_below_iou_threshold_scores_zero():
    # IoU of [0, 0, 10, 10] and [5, 0, 15, 10] is 50 / 150
    out = metrics.detection([gt([[0, 0, 10, 10]], [1])],
                            [det([[5, 0, 15, 10]], [0.9], [1])], CLASSES)
    assert out["ap_nodule"] == 0.0 and out["map"] == 0.0


def test_detection_half_recall_is_51_of_101():
    # precision 1 at the recall thresholds 0, 0.01, ..., 0.5 and 0 above: 51 of COCO's 101
    out = metrics.detection([gt([[0, 0, 10, 10], [50, 50, 70, 70]], [1, 1])],
                            [det([[0, 0, 10, 10]], [0.8], [1])], CLASSES)
    assert out["ap_nodule"] == pytest.approx(51 / 101, abs=TOL)


def test_detection_false_positive_ranked_above_true_positive():
    # precision 1/2 once the true positive is reached (recall 1), at all 101 thresholds
    out = metrics.detection([gt([[0, 0, 10, 10]], [1])],
                            [det([[30, 30, 40, 40], [0, 0, 10, 10]], [0.9, 0.8], [1, 1])],
                            CLASSES)
    assert out["ap_nodule"] == pytest.approx(0.5, abs=TOL)


def test_detection_false_positive_on_an_image_without_boxes():
    truth = [gt([[0, 0, 10, 10]], [1]), gt(np.zeros((0, 4)), [])]
    above = [det([[0, 0, 10, 10]], [0.8], [1]), det([[0, 0, 10, 10]], [0.9], [1])]
    below = [det([[0, 0, 10, 10]], [0.8], [1]), det([[0, 0, 10, 10]], [0.3], [1])]
    assert metrics.detection(truth, above, CLASSES)["ap_nodule"] == pytest.approx(0.5, abs=TOL)
    # ranked after full recall it cannot lower the interpolated precision
    assert metrics.detection(truth, below, CLASSES)["ap_nodule"] == pytest.approx(1.0, abs=TOL)


def test_detection_class_without_ground_truth_is_nan_and_left_out_of_map():
    out = metrics.detection([gt([[0, 0, 10, 10], [50, 50, 70, 70]], [1, 1])],
                            [det([[0, 0, 10, 10], [20, 20, 30, 30]], [0.8, 0.9], [1, 2])],
                            CLASSES)
    assert math.isnan(out["ap_mass"])
    assert out["map"] == pytest.approx(51 / 101, abs=TOL) == out["ap_nodule"]


def test_detection_without_detections_scores_zero():
    out = metrics.detection([gt([[0, 0, 10, 10]], [1]), gt([[5, 5, 9, 9]], [2])],
                            [NONE, NONE], CLASSES)
    assert out == {"map": 0.0, "ap_nodule": 0.0, "ap_mass": 0.0}


def test_detection_without_ground_truth_is_nan():
    out = metrics.detection([gt(np.zeros((0, 4)), [])], [det([[0, 0, 1, 1]], [0.5], [1])],
                            CLASSES)
    assert all(math.isnan(v) for v in out.values())


def test_detection_ignores_labels_outside_classes():
    out = metrics.detection([gt([[0, 0, 10, 10]], [7])], [det([[0, 0, 10, 10]], [0.9], [7])],
                            CLASSES)
    assert set(out) == {"map", "ap_nodule", "ap_mass"}
    assert all(math.isnan(v) for v in out.values())
    out = metrics.detection([gt([[0, 0, 10, 10], [0, 0, 10, 10]], [1, 7])],
                            [det([[0, 0, 10, 10]], [0.9], [1])], CLASSES)
    assert out["map"] == pytest.approx(1.0, abs=TOL)


def random_detection_case(seed: int, images: int = 12):
    """Jittered copies of the truth (hits and near misses), spurious boxes, and a third class
    that has detections but no ground truth at all."""
    rng = np.random.default_rng(seed)
    truth, found = [], []
    for _ in range(images):
        n = int(rng.integers(0, 4))
        xy = rng.uniform(0, 200, (n, 2))
        wh = rng.uniform(8, 60, (n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        labels = rng.integers(1, 3, n)
        keep = rng.random(n) < 0.8
        jitter = rng.normal(0, 0.15, (n, 4)) * np.concatenate([wh, wh], axis=1)
        m = int(rng.integers(0, 3))
        fxy = rng.uniform(0, 200, (m, 2))
        spurious = np.concatenate([fxy, fxy + rng.uniform(8, 60, (m, 2))], axis=1)
        dboxes = np.concatenate([(boxes + jitter)[keep], spurious])
        dlabels = np.concatenate([labels[keep], rng.integers(1, 4, m)])
        truth.append((boxes, labels))
        found.append((dboxes, rng.random(len(dboxes)), dlabels))
    return truth, found


def cocoeval_ap50(truth, found, classes) -> float:
    """``stats[1]`` of a plain COCOeval run (AP at IoU 0.5, all areas, 100 detections)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    anns, res = [], []
    for i, ((gb, gl), (db, ds, dl)) in enumerate(zip(truth, found)):
        for (x0, y0, x1, y1), label in zip(gb, gl):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(label),
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                         "iscrowd": 0})
        for (x0, y0, x1, y1), s, label in zip(db, ds, dl):
            res.append({"image_id": i, "category_id": int(label), "score": float(s),
                        "bbox": [x0, y0, x1 - x0, y1 - y0]})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": [{"id": i} for i in range(len(truth))], "annotations": anns,
                        "categories": [{"id": k, "name": v} for k, v in classes.items()]}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detection_map_equals_cocoeval_stats(seed):
    # stats[1] averages the precision entries > -1 over recall thresholds and classes; a class
    # with ground truth has all 101 entries >= 0 and one without has all -1, so it equals the
    # mean over classes with ground truth of their APs, which is how ``map`` is defined.
    classes = {1: "nodule", 2: "mass", 3: "never"}
    truth, found = random_detection_case(seed)
    out = metrics.detection(truth, found, classes)
    assert math.isnan(out["ap_never"])
    assert 0 < out["map"] < 1
    assert out["map"] == pytest.approx(cocoeval_ap50(truth, found, classes), abs=TOL)


def test_eleven_recall_points_are_voc2007_ap():
    """One image, two boxes: the first found at score 0.9, a false alarm at 0.8, the second at
    0.7; recall 0.5 at precision 1, recall 1 at precision 2/3. VOC 2007 averages the best
    precision at recall >= 0, 0.1, ..., 1: 6 points of 1 and 5 of 2/3."""
    truth = [gt([[0, 0, 10, 10], [50, 50, 70, 70]], [1, 1])]
    found = [det([[0, 0, 10, 10], [100, 100, 110, 110], [50, 50, 70, 70]], [0.9, 0.8, 0.7],
                 [1, 1, 1])]
    ap11 = metrics.detection(truth, found, {1: "nodule"}, recall_points=11)["ap_nodule"]
    assert ap11 == pytest.approx((6 * 1 + 5 * 2 / 3) / 11, abs=TOL)
    ap101 = metrics.detection(truth, found, {1: "nodule"})["ap_nodule"]
    assert ap101 == pytest.approx((51 * 1 + 50 * 2 / 3) / 101, abs=TOL)


# more than two classes, multilabel, regression, K-class segmentation

NAMES3 = ("a", "b", "c")


def random_multiclass(n: int, k: int = 3, seed: int = 0):
    """Labels and informative softmax probabilities of ``k`` classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, p


def reference_multiclass(y, p, names) -> dict[str, float]:
    k = len(names)
    pred = p.argmax(axis=1)
    cm = skm.confusion_matrix(y, pred, labels=list(range(k)))
    out = {"acc": skm.accuracy_score(y, pred),
           "auc": skm.roc_auc_score(y, p, multi_class="ovr", average="macro")}
    for c, name in enumerate(names):
        tp, fn = cm[c, c], cm[c].sum() - cm[c, c]
        fp = cm[:, c].sum() - tp
        tn = cm.sum() - tp - fn - fp
        out[f"sen_{name}"] = tp / (tp + fn)
        out[f"spe_{name}"] = tn / (tn + fp)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_matches_sklearn_confusion_matrix_and_ovr_auc(seed):
    y, p = random_multiclass(120, seed=seed)
    out = metrics.multiclass(y, p, NAMES3)
    ref = reference_multiclass(y, p, NAMES3)
    assert tuple(out) == ("acc", "auc", "sen_a", "spe_a", "sen_b", "spe_b", "sen_c", "spe_c")
    assert close([out[k] for k in ref], [ref[k] for k in ref])
    # one-vs-rest sensitivity is scikit-learn's per-class recall
    assert close([out[f"sen_{c}"] for c in NAMES3],
                 skm.recall_score(y, p.argmax(axis=1), average=None))


def test_multiclass_auc_is_nan_without_every_class_and_the_ci_skips_those_resamples():
    y, p = random_multiclass(40, seed=2)
    y[y == 2] = 0
    out = metrics.multiclass(y, p, NAMES3)
    assert math.isnan(out["auc"]) and math.isnan(out["sen_c"]) and out["spe_c"] >= 0
    y, p = random_multiclass(12, seed=3)
    out = metrics.multiclass(y, p, NAMES3, resamples=50, seed=1)
    rng = np.random.default_rng(1)
    skipped = sum(len(np.unique(y[rng.integers(0, 12, 12)])) < 3 for _ in range(50))
    assert out["auc_ci_skipped"] == skipped > 0


def test_multiclass_cis_have_the_binary_layout_and_equal_a_hand_loop():
    y, p = random_multiclass(80, seed=4)
    out = metrics.multiclass(y, p, NAMES3, resamples=30, seed=5)
    keys = reference_multiclass(y, p, NAMES3).keys()
    assert set(out) == {*keys, *(f"{k}_ci" for k in keys), "ci_resamples", "auc_ci_skipped"}
    rng = np.random.default_rng(5)
    per = {k: [] for k in keys}
    for _ in range(30):
        idx = rng.integers(0, 80, 80)
        for k, v in reference_multiclass(y[idx], p[idx], NAMES3).items():
            per[k].append(v)
    for k in ("acc", "auc", "sen_b"):
        assert close(out[f"{k}_ci"], percentile_ci(per[k])), k
    json.dumps(out, allow_nan=False)


def test_multilabel_is_sklearns_auc_per_finding_and_their_mean():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, (90, 3))
    p = np.clip(0.3 * y + 0.7 * rng.random((90, 3)), 0, 1)
    y[:, 2] = 0  # a finding absent from the split: no AUC, left out of the mean
    out = metrics.multilabel(y, p, NAMES3)
    per = [skm.roc_auc_score(y[:, c], p[:, c]) for c in range(2)]
    assert tuple(out) == ("auc", "auc_a", "auc_b", "auc_c")
    assert close([out["auc_a"], out["auc_b"]], per) and math.isnan(out["auc_c"])
    assert close(out["auc"], np.mean(per))
    # scikit-learn's own macro average over the defined findings
    assert close(out["auc"], skm.roc_auc_score(y[:, :2], p[:, :2], average="macro"))
    ci = metrics.multilabel(y, p, NAMES3, resamples=20, seed=1)
    assert set(ci) == {*out, "auc_ci", "ci_resamples", "auc_ci_skipped"}
    assert ci["auc_ci"][0] <= out["auc"] <= ci["auc_ci"][1] and ci["auc_ci_skipped"] == 0


def test_regression_is_sklearns_mae_and_rmse():
    rng = np.random.default_rng(7)
    t = rng.uniform(0, 228, 60)
    q = t + rng.normal(0, 12, 60)
    out = metrics.regression(t, q)
    assert out == {"mae": pytest.approx(skm.mean_absolute_error(t, q), abs=TOL),
                   "rmse": pytest.approx(math.sqrt(skm.mean_squared_error(t, q)), abs=TOL)}
    ci = metrics.regression(t, q, resamples=40, seed=2)
    rng = np.random.default_rng(2)
    maes = []
    for _ in range(40):
        idx = rng.integers(0, 60, 60)
        maes.append(skm.mean_absolute_error(t[idx], q[idx]))
    assert close(ci["mae_ci"], percentile_ci(maes)) and ci["ci_resamples"] == 40
    assert set(ci) == {"mae", "rmse", "mae_ci", "rmse_ci", "ci_resamples"}
    assert all(math.isnan(v) for v in metrics.regression([], []).values())


def numpy_dice(t, q, c) -> float:
    tp = np.sum((t == c) & (q == c))
    denom = np.sum(t == c) + np.sum(q == c)
    return 1.0 if denom == 0 else 2 * tp / denom


@pytest.mark.parametrize("dice", ["per_image", "pooled"])
def test_k_class_dice_and_miou_equal_a_direct_numpy_computation(dice):
    truth, pred = random_masks(4, classes=4, seed=8)
    names = ("bg", "x", "y", "z")
    out = metrics.segmentation([metrics.confusion(t, q, 4) for t, q in zip(truth, pred)],
                               dice, names)
    assert tuple(out) == ("dice", "miou", "dice_x", "dice_y", "dice_z")
    if dice == "pooled":
        truth, pred = [np.concatenate([t.ravel() for t in truth])], \
            [np.concatenate([q.ravel() for q in pred])]
    per = [np.mean([numpy_dice(t, q, c) for t, q in zip(truth, pred)]) for c in (1, 2, 3)]
    assert close([out["dice_x"], out["dice_y"], out["dice_z"]], per)
    assert close(out["dice"], np.mean(per))
    t_all = np.concatenate([t.ravel() for t in truth])
    q_all = np.concatenate([q.ravel() for q in pred])
    iou = [np.sum((t_all == c) & (q_all == c)) / np.sum((t_all == c) | (q_all == c))
           for c in range(4)]
    assert close(out["miou"], np.mean(iou))


def test_two_class_segmentation_is_unchanged_by_the_class_names():
    truth, pred = random_masks(5, seed=2)
    cms = [metrics.confusion(t, q, 2) for t, q in zip(truth, pred)]
    f1 = [skm.f1_score(t.ravel(), q.ravel()) for t, q in zip(truth, pred)]
    for dice in ("per_image", "pooled"):
        named = metrics.segmentation(cms, dice, ("background", "lung"))
        assert named == metrics.segmentation(cms, dice) and tuple(named) == ("dice", "miou")
    assert metrics.segmentation(cms)["dice"] == pytest.approx(np.mean(f1), abs=TOL)
