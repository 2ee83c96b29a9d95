"""Tests of nerveseg.evaluation.metrics: hand-computed cases, the empty policy, and MONAI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import directed_hausdorff

from nerveseg.evaluation.metrics import (
    RocAccumulator,
    boundary,
    hausdorff,
    image_metrics,
    roc_auc,
    roc_curve,
    summarize,
)

monai_metrics = pytest.importorskip("monai.metrics")
monai_utils = pytest.importorskip("monai.metrics.utils")

# MONAI's own calls pass a deprecated argument to get_mask_edges; that warning is not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")

SHAPE = (64, 80)
ANISO = (0.7, 1.3)


def _blob(rng: np.random.Generator, shape=SHAPE, sigma: float = 4.0, frac: float = 0.25) -> np.ndarray:
    """A random non-empty blobby mask: thresholded gaussian-smoothed noise."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, 1.0 - frac)


@pytest.fixture(scope="module")
def blob_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1234)
    pairs = []
    for i in range(20):
        truth = _blob(rng)
        if i % 2:  # independent masks: large distances, partial overlap
            pred = _blob(rng, frac=rng.uniform(0.05, 0.4))
        else:  # a perturbed truth: small distances, like a decent model
            pred = ndimage.binary_dilation(truth, iterations=int(rng.integers(0, 3))) ^ (_blob(rng, frac=0.05))
        assert pred.any() and truth.any()
        pairs.append((pred, truth))
    return pairs


def _stack(masks: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))  # (B, 1, H, W)


def _monai_hd(pairs, **kw) -> np.ndarray:
    preds, truths = zip(*pairs)
    out = monai_metrics.compute_hausdorff_distance(_stack(preds), _stack(truths), include_background=True, **kw)
    return out[:, 0].numpy().astype(np.float64)


# --------------------------------------------------------------------------------------------
# hand-computed cases
# --------------------------------------------------------------------------------------------


def test_two_squares_overlap_counts():
    truth = np.zeros((6, 6), bool)
    truth[1:3, 1:3] = True
    prob = np.zeros((6, 6))
    prob[1:3, 2:4] = 0.9  # shifted one column: 2 of 4 pixels overlap
    m = image_metrics(prob, truth)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 2, 2, 30)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["dice"] == 0.5
    assert m["iou"] == pytest.approx(1 / 3)
    assert m["hd"] == 1.0 and m["hd95"] == 1.0  # every pixel of a 2x2 square is boundary
    assert m["hd_mm"] is None and m["hd95_mm"] is None
    assert m["area_pred_px"] == 4 and m["area_truth_px"] == 4
    assert not m["zero_overlap"] and not m["pred_empty"] and not m["truth_empty"]


def test_threshold_is_inclusive():
    truth = np.array([[True, False]])
    m = image_metrics(np.array([[0.5, 0.49]]), truth, threshold=0.5)
    assert (m["tp"], m["fp"]) == (1, 0)


def test_hd_single_pixels_pixels_and_anisotropic():
    a = np.zeros((10, 12), bool)
    b = np.zeros((10, 12), bool)
    a[2, 3] = True
    b[5, 7] = True  # 3 rows, 4 cols apart
    assert hausdorff(a, b) == pytest.approx(5.0)
    assert hausdorff(a, b, spacing=(0.5, 2.0)) == pytest.approx(math.hypot(1.5, 8.0))
    assert hausdorff(a, b, spacing=2.0) == pytest.approx(10.0)


def test_hd95_differs_from_hd_with_one_outlier():
    truth = np.zeros((40, 40), bool)
    truth[2:12, 2:12] = True  # 36 boundary pixels
    pred = truth.copy()
    pred[6, 30] = True  # isolated outlier, 19 px from the truth boundary pixel (6, 11)
    assert hausdorff(pred, truth) == pytest.approx(19.0)
    # 37 pred-boundary distances: 36 zeros and one 19 -> the 95th percentile is 0
    assert hausdorff(pred, truth, percentile=95) == 0.0
    assert hausdorff(pred, truth, percentile=100) == pytest.approx(19.0)


def test_boundary_is_4_neighbour_and_image_edge_counts():
    m = np.zeros((5, 5), bool)
    m[1:4, 1:4] = True
    expected = m.copy()
    expected[2, 2] = False  # the only pixel whose 4 neighbours are all foreground
    np.testing.assert_array_equal(boundary(m), expected)
    full = np.ones((4, 4), bool)  # outside the image is background
    np.testing.assert_array_equal(boundary(full), ~ndimage.binary_erosion(full))
    assert boundary(full)[0].all() and not boundary(full)[1:3, 1:3].any()


# --------------------------------------------------------------------------------------------
# cross-checks against MONAI and scipy
# --------------------------------------------------------------------------------------------


def test_boundary_matches_monai_edges(blob_pairs):
    for pred, truth in blob_pairs[:6]:
        ep, et = monai_utils.get_mask_edges(pred, truth, crop=False)
        np.testing.assert_array_equal(boundary(pred), ep)
        np.testing.assert_array_equal(boundary(truth), et)


def test_dice_matches_monai(blob_pairs):
    preds, truths = zip(*blob_pairs)
    ref = monai_metrics.compute_dice(_stack(preds), _stack(truths), include_background=True)[:, 0].numpy()
    ours = [image_metrics(p.astype(float), t)["dice"] for p, t in blob_pairs]
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "percentile, spacing",
    [(None, None), (95, None), (None, ANISO), (95, ANISO)],
)
def test_hausdorff_matches_monai(blob_pairs, percentile, spacing):
    ref = _monai_hd(blob_pairs, percentile=percentile, spacing=spacing)
    ours = [hausdorff(p, t, spacing=spacing, percentile=percentile) for p, t in blob_pairs]
    # MONAI works in float32, hence a relative tolerance
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


def test_image_metrics_hd_fields_match_monai(blob_pairs):
    pairs = blob_pairs[:5]
    hd, hd95 = _monai_hd(pairs), _monai_hd(pairs, percentile=95)
    hd_mm, hd95_mm = _monai_hd(pairs, spacing=ANISO), _monai_hd(pairs, percentile=95, spacing=ANISO)
    for i, (p, t) in enumerate(pairs):
        m = image_metrics(p.astype(float), t, spacing=ANISO)
        got = [m["hd"], m["hd95"], m["hd_mm"], m["hd95_mm"]]
        np.testing.assert_allclose(got, [hd[i], hd95[i], hd_mm[i], hd95_mm[i]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spacing", [None, ANISO])
def test_hausdorff_matches_scipy_directed_hausdorff(blob_pairs, spacing):
    scale = np.ones(2) if spacing is None else np.asarray(spacing)
    for pred, truth in blob_pairs[:8]:
        a = np.argwhere(boundary(pred)) * scale
        b = np.argwhere(boundary(truth)) * scale
        ref = max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0])
        assert hausdorff(pred, truth, spacing=spacing) == pytest.approx(ref, rel=1e-12, abs=1e-12)


def test_hausdorff_mask_touching_image_border_matches_monai():
    truth = np.zeros(SHAPE, bool)
    truth[:20, :15] = True  # touches the top-left corner
    pred = np.zeros(SHAPE, bool)
    pred[30:, 50:] = True  # touches the bottom-right corner
    ref = _monai_hd([(pred, truth)])[0]
    assert hausdorff(pred, truth) == pytest.approx(ref, rel=1e-6)


# --------------------------------------------------------------------------------------------
# ROC
# --------------------------------------------------------------------------------------------


def _tied_scores(rng, n=2000):
    labels = rng.random(n) < 0.3
    # 20 score levels -> many ties; positives shifted up so AUC is well inside (0, 1)
    scores = np.clip(rng.integers(0, 16, n) + 4 * labels, 0, 19) / 19.0
    return scores, labels


def test_roc_auc_matches_monai_with_ties():
    rng = np.random.default_rng(7)
    for _ in range(3):
        scores, labels = _tied_scores(rng)
        ref = monai_metrics.compute_roc_auc(torch.from_numpy(scores), torch.from_numpy(labels.astype(np.float64)))
        assert roc_auc(scores, labels) == pytest.approx(float(ref), abs=1e-12)


def test_roc_curve_endpoints_and_trapezoid_equals_auc():
    rng = np.random.default_rng(8)
    scores, labels = _tied_scores(rng)
    fpr, tpr, thr = roc_curve(scores, labels)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and thr[0] == np.inf
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) < 0)
    assert len(thr) == len(np.unique(scores)) + 1
    # each point is the rate of score >= threshold
    k = 5
    assert tpr[k] == pytest.approx(np.mean(scores[labels] >= thr[k]))
    assert fpr[k] == pytest.approx(np.mean(scores[~labels] >= thr[k]))
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(scores, labels), abs=1e-12)
    # thinning keeps both ends
    f2, t2, th2 = roc_curve(scores, labels, max_points=5)
    assert len(f2) == 5 and (f2[0], t2[0], f2[-1], t2[-1]) == (0.0, 0.0, 1.0, 1.0)


def test_roc_curve_binned_points_are_exact():
    rng = np.random.default_rng(9)
    labels = rng.random(5000) < 0.4
    scores = np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1)
    fpr, tpr, thr = roc_curve(scores, labels, bins=101)
    assert len(thr) <= 102 and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    for k in (10, 40, len(thr) - 2):
        assert tpr[k] == pytest.approx(np.mean(scores[labels] >= thr[k]))
        assert fpr[k] == pytest.approx(np.mean(scores[~labels] >= thr[k]))


def test_roc_perfect_reversed_and_one_class():
    labels = np.array([0, 0, 0, 1, 1], bool)
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert roc_auc(scores, labels) == 1.0
    assert roc_auc(1 - scores, labels) == 0.0
    assert roc_auc(np.full(5, 0.5), labels) == 0.5  # all tied
    assert math.isnan(roc_auc(scores, np.zeros(5, bool)))
    acc = RocAccumulator()
    acc.update(scores, labels)
    assert acc.auc() == pytest.approx(1.0)
    rev = RocAccumulator()
    rev.update(1 - scores, labels)
    assert rev.auc() == pytest.approx(0.0)
    assert math.isnan(RocAccumulator().auc())


def test_roc_accumulator_pooled_auc_close_to_exact():
    rng = np.random.default_rng(10)
    acc = RocAccumulator(bins=1001)
    all_s, all_y = [], []
    for _ in range(4):
        truth = _blob(rng, frac=rng.uniform(0.1, 0.3))
        prob = 1 / (1 + np.exp(-(2.0 * truth - 1 + rng.normal(0, 1.2, SHAPE))))  # noisy sigmoid
        acc.update(prob, truth)
        all_s.append(prob.ravel())
        all_y.append(truth.ravel())
    s, y = np.concatenate(all_s), np.concatenate(all_y)
    exact = roc_auc(s, y)
    assert 0.6 < exact < 0.99
    assert acc.auc() == pytest.approx(exact, abs=1e-3)
    assert acc.n_pos == y.sum() and acc.n_neg == (~y).sum()
    fpr, tpr = acc.curve()
    assert len(fpr) == 1002 and len(acc.thresholds()) == 1002
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    # the accumulated curve equals the binned curve of the pooled pixels
    f2, t2, _ = roc_curve(s, y, bins=1001)
    np.testing.assert_allclose(np.trapezoid(t2, f2), acc.auc(), atol=1e-12)


# --------------------------------------------------------------------------------------------
# empty policy and input errors
# --------------------------------------------------------------------------------------------


def _diag(shape, spacing=(1.0, 1.0)) -> float:
    return math.hypot(shape[0] * spacing[0], shape[1] * spacing[1])


def test_empty_both():
    m = image_metrics(np.zeros(SHAPE), np.zeros(SHAPE, bool), spacing=ANISO)
    assert (m["precision"], m["recall"], m["dice"], m["iou"]) == (1.0, 1.0, 1.0, 1.0)
    assert (m["hd"], m["hd95"], m["hd_mm"], m["hd95_mm"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["pred_empty"] and m["truth_empty"] and not m["zero_overlap"]
    assert math.isnan(m["auc"])


def test_empty_prediction_nonempty_truth():
    truth = np.zeros(SHAPE, bool)
    truth[10:20, 10:20] = True
    prob = np.full(SHAPE, 0.2)
    prob[12, 12] = 0.4  # below threshold: still an empty prediction
    m = image_metrics(prob, truth, spacing=ANISO)
    assert (m["precision"], m["recall"], m["dice"], m["iou"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["hd"] == m["hd95"] == pytest.approx(_diag(SHAPE))
    assert m["hd_mm"] == m["hd95_mm"] == pytest.approx(_diag(SHAPE, ANISO))
    assert m["zero_overlap"] and m["pred_empty"] and not m["truth_empty"]
    assert m["auc"] == pytest.approx(1 / 100 + 0.5 * 99 / 100)  # one positive above all, the rest tied


def test_empty_truth_nonempty_prediction():
    prob = np.zeros(SHAPE)
    prob[5:9, 5:9] = 0.9
    m = image_metrics(prob, np.zeros(SHAPE, bool), spacing=ANISO)
    assert (m["precision"], m["dice"], m["iou"]) == (0.0, 0.0, 0.0)
    assert math.isnan(m["recall"])
    assert m["hd"] == m["hd95"] == pytest.approx(_diag(SHAPE))
    assert m["hd_mm"] == pytest.approx(_diag(SHAPE, ANISO))
    assert not m["zero_overlap"] and not m["pred_empty"] and m["truth_empty"]
    assert math.isnan(m["auc"])


def test_hausdorff_empty_policy_direct():
    a = np.zeros((3, 4), bool)
    b = a.copy()
    b[1, 1] = True
    assert hausdorff(a, a) == 0.0
    assert hausdorff(a, b) == hausdorff(b, a) == pytest.approx(5.0)
    assert hausdorff(a, b, spacing=(2.0, 1.0), percentile=95) == pytest.approx(math.hypot(6, 4))


def test_disjoint_masks_are_zero_overlap():
    truth = np.zeros(SHAPE, bool)
    truth[5:15, 5:15] = True
    prob = np.zeros(SHAPE)
    prob[40:50, 60:70] = 1.0
    m = image_metrics(prob, truth)
    assert m["zero_overlap"] and m["tp"] == 0 and m["dice"] == 0.0 and m["precision"] == 0.0
    assert m["hd"] == pytest.approx(hausdorff(prob > 0.5, truth)) and m["hd"] < _diag(SHAPE)


def test_shape_mismatch_raises_with_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
        image_metrics(np.zeros((4, 5)), np.zeros((4, 6), bool))
    with pytest.raises(ValueError, match="same shape"):
        hausdorff(np.zeros((4, 5), bool), np.zeros((5, 4), bool))
    with pytest.raises(ValueError, match="same shape"):
        roc_auc(np.zeros(5), np.zeros(4, bool))
    with pytest.raises(ValueError, match="same shape"):
        RocAccumulator().update(np.zeros((2, 2)), np.zeros((2, 3), bool))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="binary"):
        image_metrics(np.zeros((3, 3)), np.full((3, 3), 255, np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_metrics(np.full((3, 3), 1.5), np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="percentile"):
        hausdorff(np.ones((3, 3), bool), np.ones((3, 3), bool), percentile=101)
    with pytest.raises(ValueError, match="spacing"):
        hausdorff(np.ones((3, 3), bool), np.ones((3, 3), bool), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        roc_curve(np.array([0.2, 1.2]), np.array([0, 1]), bins=11)


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------


def _row(dice, hd, zero_overlap=False, truth_empty=False, hd_mm=None) -> dict:
    keys = ("precision", "recall", "dice", "iou", "hd", "hd95", "hd_mm", "hd95_mm", "auc")
    row = {k: float("nan") for k in keys}
    row.update(dice=dice, hd=hd, hd_mm=hd_mm, hd95_mm=None, zero_overlap=zero_overlap, truth_empty=truth_empty)
    return row


def test_summarize_hand_computed():
    rows = [
        _row(0.5, 2.0),
        _row(1.0, 4.0, hd_mm=3.0),
        _row(float("nan"), None, truth_empty=True),  # NaN and None are skipped
        _row(0.0, 6.0, zero_overlap=True),
    ]
    s = summarize(rows)
    assert s["n_images"] == 4
    assert s["dice"] == {"mean": pytest.approx(0.5), "sd": pytest.approx(0.5), "n": 3}
    assert s["hd"] == {"mean": pytest.approx(4.0), "sd": pytest.approx(2.0), "n": 3}
    assert s["hd_mm"] == {"mean": 3.0, "sd": 0.0, "n": 1}
    assert s["hd95_mm"] == {"mean": None, "sd": None, "n": 0}
    assert s["auc"]["n"] == 0
    assert s["zero_overlap_rate"] == pytest.approx(1 / 3)  # the empty-truth image is not counted


def test_summarize_image_metrics_rows():
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(3):
        truth = _blob(rng)
        rows.append(image_metrics(np.clip(truth + rng.normal(0, 0.3, SHAPE), 0, 1), truth))
    rows.append(image_metrics(np.zeros(SHAPE), _blob(rng)))  # a miss
    s = summarize(rows, keys=("dice", "auc", "hd_mm"))
    dices = [r["dice"] for r in rows]
    assert s["dice"]["mean"] == pytest.approx(np.mean(dices))
    assert s["dice"]["sd"] == pytest.approx(np.std(dices, ddof=1))
    assert s["auc"]["n"] == 4 and s["hd_mm"]["n"] == 0
    assert s["zero_overlap_rate"] == pytest.approx(0.25)
    assert summarize([])["zero_overlap_rate"] is None
