"""Metrics against hand-computed values (place_tf/evaluate/metrics.py)."""

import json
import math

import numpy as np
import pytest

from place_tf.evaluate import metrics as M


def test_roc_auc_with_ties_hand_computed():
    # positives 0.8, 0.3, 0.5 vs negatives 0.8, 0.1: pairs won = 0.5 (tie) + 1 + 0 + 1 + 0 + 1
    y = [1, 0, 1, 0, 1]
    s = [0.8, 0.8, 0.3, 0.1, 0.5]
    assert M.roc_auc(y, s) == pytest.approx(3.5 / 6)
    assert M.roc_auc([0, 1], [0.2, 0.9]) == 1.0
    assert M.roc_auc([0, 1], [0.9, 0.2]) == 0.0
    assert M.roc_auc([1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_roc_auc_undefined_and_bad_input():
    assert math.isnan(M.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="labels must be 0/1"):
        M.roc_auc([1, 2, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        M.roc_auc([1, 0, 0], [0.1, 0.2])


def test_roc_auc_matches_sklearn_on_random_ties():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 7, 200) / 7.0  # many ties
    assert M.roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)


def test_multilabel_auroc_policies_missing_and_skips():
    labels = np.array(
        [
            [1, 0, 1],
            [0, -2, 1],
            [-1, 1, 1],
            [0, 0, -2],
        ]
    )
    scores = np.array(
        [
            [0.9, 0.1, 0.5],
            [0.2, 0.9, 0.6],  # column 1 here is missing: its 0.9 must be ignored
            [0.5, 0.8, 0.7],
            [0.4, 0.3, 0.1],
        ]
    )
    names = ["a", "b", "c"]
    r = M.multilabel_auroc(labels, scores, names, uncertain="ignore")
    # a: positives {0.9} vs negatives {0.2, 0.4} -> 1.0 ; b: pos {0.8} vs neg {0.1, 0.3} -> 1.0
    assert r["per_label"] == {"a": 1.0, "b": 1.0}
    assert "c" in r["skipped"] and "no negatives" in r["skipped"]["c"]
    assert r["macro_auroc"] == 1.0
    assert r["support"]["a"] == [1, 2]
    # the policy decides whether row 2 (uncertain "a") counts, and on which side
    assert M.multilabel_auroc(labels, scores, names, "ones")["support"]["a"] == [2, 2]
    assert M.multilabel_auroc(labels, scores, names, "zeros")["support"]["a"] == [1, 3]
    with pytest.raises(ValueError, match="uncertain policy"):
        M.multilabel_auroc(labels, scores, names, "maybe")
    with pytest.raises(ValueError, match="outside"):
        M.apply_uncertain_policy(np.array([[3, 0]]))


def test_uncertain_policy_changes_auroc():
    labels = np.array([[1], [0], [-1], [0]])
    scores = np.array([[0.9], [0.5], [0.1], [0.3]])
    # zeros: pos {0.9} vs neg {0.5, 0.1, 0.3} -> 1 ; ones: pos {0.9, 0.1} vs neg {0.5, 0.3} -> 0.5
    assert M.multilabel_auroc(labels, scores, ["x"], "zeros")["per_label"]["x"] == 1.0
    assert M.multilabel_auroc(labels, scores, ["x"], "ones")["per_label"]["x"] == 0.5


def test_accuracy():
    assert M.accuracy([0, 1, 2, 2], [0, 2, 2, 2]) == 0.75
    with pytest.raises(ValueError):
        M.accuracy([0, 1], [0])


def test_precision_at_k_3x5_hand_computed():
    sim = np.array(
        [
            [0.9, 0.1, 0.8, 0.3, 0.2],
            [0.1, 0.7, 0.2, 0.9, 0.0],
            [0.7, 0.5, 0.4, 0.3, 0.6],
        ]
    )
    cand = [0, 1, 0, 1, 2]
    query = [0, 1, 2]
    # rankings: q0 -> c0 c0 c1 c2 c1 ; q1 -> c1 c1 c0 c0 c2 ; q2 -> c0 c2 c1 c0 c1
    p = M.precision_at_k(sim, query, cand, ks=(1, 3, 5))
    assert p[1] == pytest.approx(2 / 3)
    assert p[3] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)
    assert p[5] == pytest.approx((2 / 5 + 2 / 5 + 1 / 5) / 3)
    with pytest.raises(ValueError, match="K=6"):
        M.precision_at_k(sim, query, cand, ks=(6,))
    with pytest.raises(ValueError, match="similarity"):
        M.precision_at_k(sim, [0, 1], cand)


def test_dice_and_iou_tiny_masks():
    pred = np.array([[1, 1, 0], [0, 1, 0]])
    gt = np.array([[1, 0, 0], [0, 1, 1]])
    assert M.dice(pred, gt) == pytest.approx(2 * 2 / (3 + 3))
    assert M.iou(pred, gt) == pytest.approx(2 / 4)
    empty = np.zeros((2, 3))
    assert M.dice(empty, empty) == 1.0 and M.iou(empty, empty) == 1.0
    assert M.dice(pred, empty) == 0.0
    assert M.mean_dice(np.stack([pred, empty]), np.stack([gt, empty])) == pytest.approx(
        (2 / 3 + 1) / 2
    )
    with pytest.raises(ValueError, match="differ in shape"):
        M.dice(pred, gt[:, :2])


def test_box_iou():
    a = [[0, 0, 10, 10]]
    b = [[0, 0, 10, 8], [5, 5, 15, 15], [20, 20, 30, 30]]
    np.testing.assert_allclose(M.box_iou(a, b), [[0.8, 25 / 175, 0.0]])


def test_map_two_gt_three_predictions_hand_computed():
    gts = [[[0, 0, 10, 10]], [[0, 0, 10, 10]]]
    preds = [
        # image 0: p1 IoU 0.8 (score 0.9), p3 IoU 0.6 with the same GT (score 0.8: duplicate)
        {"boxes": [[0, 0, 10, 8], [0, 0, 10, 6]], "scores": [0.9, 0.8]},
        # image 1: p2 IoU 0.5 (score 0.7)
        {"boxes": [[0, 0, 10, 5]], "scores": [0.7]},
    ]
    # IoU thr <= 0.5: TP, FP, TP -> recall .5 .5 1, precision 1 .5 2/3 -> AP = .5*1 + .5*2/3
    assert M.average_precision(preds, gts, 0.5) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # IoU thr > 0.5: TP, FP, FP -> AP = 0.5
    assert M.average_precision(preds, gts, 0.55) == pytest.approx(0.5)
    r = M.mean_average_precision(preds, gts)
    assert list(r["ap_per_threshold"]) == [
        "0.40",
        "0.45",
        "0.50",
        "0.55",
        "0.60",
        "0.65",
        "0.70",
        "0.75",
    ]
    assert r["map"] == pytest.approx((3 * (0.5 + 1 / 3) + 5 * 0.5) / 8)
    assert math.isnan(M.average_precision([{"boxes": [], "scores": []}], [[]]))


def test_voc_ap_envelope():
    # precision rises after a dip: the envelope takes the later maximum
    assert M.voc_average_precision([0.25, 0.25, 0.5], [1.0, 0.5, 2 / 3]) == pytest.approx(
        0.25 * 1.0 + 0.25 * 2 / 3
    )


def test_pointing_game_and_top_fraction():
    heat = np.array([[0.1, 0.2], [0.9, 0.3]])
    assert M.pointing_game_hit(heat, [[0, 0], [1, 0]])
    assert not M.pointing_game_hit(heat, [[1, 1], [0, 1]])
    assert M.pointing_game_accuracy([heat, heat], [[[0, 0], [1, 0]], [[1, 0], [0, 0]]]) == 0.5
    m = M.top_fraction_mask(np.arange(20.0).reshape(4, 5), 0.1)
    assert m.sum() == 2 and m[3, 4] and m[3, 3]
    with pytest.raises(ValueError, match="fraction"):
        M.top_fraction_mask(heat, 0.0)


def test_nan_to_none_gives_strict_json():
    out = M.nan_to_none(
        {"a": float("nan"), "b": [np.float32(0.5), np.int64(3)], 1: np.array([np.inf])}
    )
    assert json.loads(json.dumps(out, allow_nan=False)) == {"a": None, "b": [0.5, 3], "1": [None]}
