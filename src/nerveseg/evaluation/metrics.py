"""Per-image segmentation metrics and their summary over a test set.

Implements the "Statistical Analysis" of Kim et al. (2022): precision, recall, Dice, IoU,
Hausdorff distance (HD, and HD95), pixel-level ROC AUC and the zero-overlap rate, reported as
mean and SD over images. Only numpy and scipy are used, so evaluation runs anywhere; the test
suite cross-checks Dice, HD/HD95 and AUC against MONAI.

Conventions
-----------
* A prediction is ``prob >= threshold`` (ties at the threshold count as foreground).
* The boundary of a mask is the set of mask pixels with at least one background 4-neighbour,
  pixels outside the image counting as background. This is exactly MONAI's
  ``get_mask_edges`` (``binary_erosion(mask) ^ mask`` with scipy's default cross structure),
  so :func:`hausdorff` equals ``monai.metrics.compute_hausdorff_distance`` (Euclidean).
* Distances are in pixels when ``spacing`` is None, else in the spacing's unit; ``spacing`` is
  given per axis, ``(row, col)`` for 2-D images.

Empty-mask policy (``image_metrics``; ``diag`` is the image diagonal
``sqrt((H*sy)**2 + (W*sx)**2)``, i.e. the worst possible distance in the image):

=============  ============  =========  ======  ====  ===  =============  ============
truth          prediction    precision  recall  dice  iou  hd, hd95       zero_overlap
=============  ============  =========  ======  ====  ===  =============  ============
empty          empty         1          1       1     1    0              False
non-empty      empty         0          0       0     0    diag           True
empty          non-empty     0          NaN     0     0    diag           False
non-empty      non-empty     (computed)                    (computed)     tp == 0
=============  ============  =========  ======  ====  ===  =============  ============

Recall is NaN for an empty truth because there is nothing to find; NaN values are skipped
by :func:`summarize`. The per-image ``auc`` is NaN whenever the truth is all-0 or all-1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

__all__ = [
    "RocAccumulator",
    "boundary",
    "hausdorff",
    "image_metrics",
    "roc_auc",
    "roc_curve",
    "summarize",
]

Spacing = float | Sequence[float] | None

DEFAULT_SUMMARY_KEYS: tuple[str, ...] = (
    "precision",
    "recall",
    "dice",
    "iou",
    "hd",
    "hd95",
    "hd_mm",
    "hd95_mm",
    "auc",
)


# --------------------------------------------------------------------------------------------
# input checking
# --------------------------------------------------------------------------------------------


def _as_mask(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a bool array; non-bool input must hold only 0 and 1.

    Casting a probability map or a 0/255 image with ``astype(bool)`` would silently give a
    wrong mask, so anything that is not clearly binary is refused.
    """
    a = np.asarray(x)
    if a.dtype == bool:
        return a
    if not np.all((a == 0) | (a == 1)):
        raise ValueError(f"{name} must be a binary mask (bool, or values in {{0, 1}}); got dtype {a.dtype}")
    return a.astype(bool)


def _check_same_shape(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {a.shape} and {b.shape}")


def _spacing_tuple(spacing: Spacing, ndim: int) -> tuple[float, ...]:
    """Per-axis spacing; None means 1 pixel, a scalar means isotropic."""
    if spacing is None:
        return (1.0,) * ndim
    if np.isscalar(spacing):
        sp = (float(spacing),) * ndim  # type: ignore[arg-type]
    else:
        sp = tuple(float(s) for s in spacing)  # type: ignore[union-attr]
    if len(sp) != ndim:
        raise ValueError(f"spacing needs one value per image axis ({ndim}), got {len(sp)}: {sp}")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing values must be positive and finite, got {sp}")
    return sp


def _diagonal(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


# --------------------------------------------------------------------------------------------
# boundary and Hausdorff distance
# --------------------------------------------------------------------------------------------


def boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask.

    Parameters
    ----------
    mask : array (H, W) or N-D
        Binary mask (bool or 0/1).

    Returns
    -------
    numpy.ndarray of bool
        Mask pixels with at least one background 4-neighbour (2N-neighbour in N-D); pixels
        outside the image count as background, so foreground on the image border is boundary.
        Same as ``monai.metrics.utils.get_mask_edges``.
    """
    m = _as_mask(mask, "mask")
    # scipy's default structure is the cross (connectivity 1) and border_value=0, which is
    # precisely what MONAI uses: keep it implicit so the two cannot drift apart.
    return m & ~ndimage.binary_erosion(m)


def _directed_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances pred-boundary -> truth-boundary and back; both masks must be non-empty."""
    # Crop to the union's bounding box plus one pixel: every boundary pixel, and so every
    # nearest neighbour, lies inside it, and the one-pixel margin keeps the erosion exact
    # (the margin is background, like the outside of the image).
    lo = np.argwhere(pred | truth)
    start = np.maximum(lo.min(axis=0) - 1, 0)
    stop = np.minimum(lo.max(axis=0) + 2, pred.shape)
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    bp, bt = boundary(pred[box]), boundary(truth[box])
    # EDT of the complement gives, at every pixel, the distance to the nearest boundary pixel.
    d_pt = ndimage.distance_transform_edt(~bt, sampling=spacing)[bp]
    d_tp = ndimage.distance_transform_edt(~bp, sampling=spacing)[bt]
    return d_pt, d_tp


def hausdorff(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Spacing = None,
    percentile: float | None = None,
) -> float:
    """Symmetric Hausdorff distance between the boundaries of two masks.

    Parameters
    ----------
    pred, truth : array (H, W)
        Binary masks of the same shape.
    spacing : float or sequence of float, optional
        Pixel size per axis, ``(row, col)``; None measures in pixels.
    percentile : float in [0, 100], optional
        None gives the maximum (HD). ``95`` gives HD95 as MONAI computes it: the larger of the
        two directed 95th percentiles (linear interpolation, as ``torch.quantile``).

    Returns
    -------
    float
        0.0 when both masks are empty; the image diagonal ``sqrt((H*sy)**2 + (W*sx)**2)`` when
        exactly one is empty (MONAI would return inf; a finite worst case keeps means usable).
    """
    p, t = _as_mask(pred, "pred"), _as_mask(truth, "truth")
    _check_same_shape(p, t, ("pred", "truth"))
    if percentile is not None and not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    sp = _spacing_tuple(spacing, p.ndim)
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return 0.0
    if not p_any or not t_any:
        return _diagonal(p.shape, sp)
    d_pt, d_tp = _directed_distances(p, t, sp)
    if percentile is None:
        return float(max(d_pt.max(), d_tp.max()))
    return float(max(np.percentile(d_pt, percentile), np.percentile(d_tp, percentile)))


# --------------------------------------------------------------------------------------------
# ROC
# --------------------------------------------------------------------------------------------


def _scores_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = _as_mask(labels, "labels")
    _check_same_shape(s, y, ("scores", "labels"))
    s, y = s.ravel(), y.ravel()
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (found NaN or inf)")
    return s, y


def _bin_levels(scores: np.ndarray, bins: int) -> np.ndarray:
    """Quantise scores in [0, 1] to levels 0..bins-1 with floor.

    Floor (not round) makes ``level >= k`` equivalent to ``score >= k / (bins - 1)``, so every
    point of a binned curve is an exact point of the true curve at threshold k/(bins-1).
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if scores.size and (scores.min() < 0.0 or scores.max() > 1.0):
        raise ValueError(
            f"binned ROC needs scores in [0, 1], got range [{scores.min()}, {scores.max()}]"
        )
    levels = np.floor(scores * (bins - 1)).astype(np.int64)
    return np.clip(levels, 0, bins - 1)


def _curve_from_counts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC points from per-threshold counts ordered from the highest threshold down.

    Returns (fpr, tpr) with (0, 0) prepended; an axis whose class is absent is all NaN.
    """
    tp = np.concatenate([[0], np.cumsum(pos)]).astype(np.float64)
    fp = np.concatenate([[0], np.cumsum(neg)]).astype(np.float64)
    n_pos, n_neg = tp[-1], fp[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tp / n_pos if n_pos > 0 else np.full_like(tp, np.nan)
        fpr = fp / n_neg if n_neg > 0 else np.full_like(fp, np.nan)
    return fpr, tpr


def _thin(n: int, max_points: int | None) -> np.ndarray | slice:
    """Indices keeping at most ``max_points`` of ``n`` curve points, both ends included."""
    if max_points is None or n <= max_points:
        return slice(None)
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    return np.unique(np.round(np.linspace(0, n - 1, max_points)).astype(np.int64))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact area under the ROC curve.

    Uses the Mann-Whitney U statistic with average ranks, so tied scores count one half,
    which equals the trapezoid area under the exact curve (and sklearn / MONAI).

    Parameters
    ----------
    scores : array
        Finite scores, any shape; higher means more likely positive.
    labels : array
        Binary labels of the same shape.

    Returns
    -------
    float
        AUC in [0, 1]; NaN when only one class is present.
    """
    s, y = _scores_labels(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(
    scores: np.ndarray,
    labels: np.ndarray,
    max_points: int | None = None,
    bins: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve, one point per distinct threshold.

    Parameters
    ----------
    scores, labels : array
        Finite scores and binary labels of the same shape (flattened).
    max_points : int, optional
        Thin the returned curve to at most this many points (evenly spaced in index, both
        ends kept) for plotting; the points kept are still exact.
    bins : int, optional
        Quantise scores in [0, 1] to ``bins`` levels first (thresholds ``k / (bins - 1)``),
        so a curve over millions of pixels has at most ``bins + 1`` points. Each point is the
        exact (fpr, tpr) at its threshold.

    Returns
    -------
    fpr, tpr, thresholds : numpy.ndarray
        Ordered by decreasing threshold; a pixel is positive when ``score >= threshold``.
        The first point is (0, 0) at threshold +inf and the last is (1, 1). If a class is
        absent, its rate is NaN.
    """
    s, y = _scores_labels(scores, labels)
    if bins is not None:
        levels = _bin_levels(s, bins)
        pos = np.bincount(levels[y], minlength=bins)[::-1]
        neg = np.bincount(levels[~y], minlength=bins)[::-1]
        keep = (pos + neg) > 0  # drop empty levels: they repeat the previous point
        thresholds = np.arange(bins - 1, -1, -1, dtype=np.float64)[keep] / (bins - 1)
        pos, neg = pos[keep], neg[keep]
    else:
        order = np.argsort(-s, kind="stable")
        s_sorted, y_sorted = s[order], y[order]
        # last index of each run of equal scores: the curve only moves between distinct values
        ends = np.flatnonzero(np.diff(s_sorted) != 0)
        ends = np.concatenate([ends, [s.size - 1]]) if s.size else ends
        tp_cum = np.cumsum(y_sorted)[ends]
        fp_cum = (ends + 1) - tp_cum
        pos = np.diff(np.concatenate([[0], tp_cum]))
        neg = np.diff(np.concatenate([[0], fp_cum]))
        thresholds = s_sorted[ends]
    fpr, tpr = _curve_from_counts(pos, neg)
    thresholds = np.concatenate([[np.inf], thresholds])
    idx = _thin(fpr.size, max_points)
    return fpr[idx], tpr[idx], thresholds[idx]


class RocAccumulator:
    """Pooled pixel ROC over many images, kept as two score histograms.

    Memory is ``2 * bins`` counters whatever the number of images, so the pooled curve over a
    whole test set of 500x500 images (the paper's Fig. 3) stays cheap. Scores are quantised
    with floor to thresholds ``k / (bins - 1)``; each curve point is exact at its threshold,
    and :meth:`auc` (trapezoid on those points) differs from the exact AUC only by ties
    within a bin, typically < 1e-3 for 1001 bins.

    Parameters
    ----------
    bins : int
        Number of score levels in [0, 1] (default 1001: thresholds 0, 0.001, ..., 1).
    """

    def __init__(self, bins: int = 1001) -> None:
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        self.bins = bins
        self.pos_hist = np.zeros(bins, dtype=np.int64)
        self.neg_hist = np.zeros(bins, dtype=np.int64)

    @property
    def n_pos(self) -> int:
        return int(self.pos_hist.sum())

    @property
    def n_neg(self) -> int:
        return int(self.neg_hist.sum())

    def update(self, prob: np.ndarray, truth: np.ndarray) -> None:
        """Add the pixels of one image: ``prob`` in [0, 1], ``truth`` binary, same shape."""
        s, y = _scores_labels(prob, truth)
        levels = _bin_levels(s, self.bins)
        self.pos_hist += np.bincount(levels[y], minlength=self.bins)
        self.neg_hist += np.bincount(levels[~y], minlength=self.bins)

    def thresholds(self) -> np.ndarray:
        """Thresholds matching :meth:`curve`: +inf, then 1, ..., 0 (all ``bins`` levels)."""
        return np.concatenate([[np.inf], np.arange(self.bins - 1, -1, -1) / (self.bins - 1)])

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Pooled (fpr, tpr), from (0, 0) to (1, 1), by decreasing threshold."""
        return _curve_from_counts(self.pos_hist[::-1], self.neg_hist[::-1])

    def auc(self) -> float:
        """Trapezoid area under :meth:`curve`; NaN until both classes have been seen."""
        if self.n_pos == 0 or self.n_neg == 0:
            return float("nan")
        fpr, tpr = self.curve()
        return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


# --------------------------------------------------------------------------------------------
# per-image metrics and summary
# --------------------------------------------------------------------------------------------


def image_metrics(
    prob: np.ndarray,
    truth: np.ndarray,
    threshold: float = 0.5,
    spacing: Spacing = None,
) -> dict[str, Any]:
    """All metrics of one image.

    Parameters
    ----------
    prob : float array (H, W)
        Foreground probability in [0, 1].
    truth : bool array (H, W)
        Ground-truth mask.
    threshold : float
        The prediction is ``prob >= threshold``.
    spacing : float or (row, col), optional
        Pixel size (e.g. mm); when given, ``hd_mm`` and ``hd95_mm`` are filled.

    Returns
    -------
    dict
        ``tp, fp, fn, tn`` (int); ``precision, recall, dice, iou`` (float); ``hd, hd95``
        (pixels); ``hd_mm, hd95_mm`` (None without spacing); ``auc`` (pixel ROC AUC of
        ``prob`` vs ``truth``, NaN if truth is all-0 or all-1); ``zero_overlap`` (truth
        non-empty and tp == 0, an empty prediction included); ``pred_empty, truth_empty``;
        ``area_pred_px, area_truth_px``. Empty masks follow the module's policy table.

    Raises
    ------
    ValueError
        Shapes differ, ``prob`` is not finite in [0, 1], or ``truth`` is not binary.
    """
    p = np.asarray(prob, dtype=np.float64)
    t = _as_mask(truth, "truth")
    _check_same_shape(p, t, ("prob", "truth"))
    if p.size and not (np.all(np.isfinite(p)) and p.min() >= 0.0 and p.max() <= 1.0):
        raise ValueError("prob must be finite and within [0, 1]")
    pred = p >= threshold

    tp = int(np.count_nonzero(pred & t))
    fp = int(np.count_nonzero(pred & ~t))
    fn = int(np.count_nonzero(~pred & t))
    tn = int(t.size - tp - fp - fn)
    pred_empty, truth_empty = tp + fp == 0, tp + fn == 0

    if truth_empty and pred_empty:
        precision = recall = dice = iou = 1.0
    elif pred_empty:  # truth non-empty: a complete miss
        precision = recall = dice = iou = 0.0
    elif truth_empty:  # false alarm: nothing to find, so recall is undefined
        precision, recall, dice, iou = 0.0, float("nan"), 0.0, 0.0
    else:
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
        dice = 2 * tp / (2 * tp + fp + fn)
        iou = tp / (tp + fp + fn)

    hd = hausdorff(pred, t)
    hd95 = hausdorff(pred, t, percentile=95)
    hd_mm = hd95_mm = None
    if spacing is not None:
        hd_mm = hausdorff(pred, t, spacing=spacing)
        hd95_mm = hausdorff(pred, t, spacing=spacing, percentile=95)

    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "precision": float(precision),
        "recall": float(recall),
        "dice": float(dice),
        "iou": float(iou),
        "hd": hd,
        "hd95": hd95,
        "hd_mm": hd_mm,
        "hd95_mm": hd95_mm,
        "auc": roc_auc(p, t),
        "zero_overlap": bool(not truth_empty and tp == 0),
        "pred_empty": bool(pred_empty),
        "truth_empty": bool(truth_empty),
        "area_pred_px": tp + fp,
        "area_truth_px": tp + fn,
    }


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(v))


def summarize(
    rows: list[dict[str, Any]],
    keys: Sequence[str] = DEFAULT_SUMMARY_KEYS,
) -> dict[str, Any]:
    """Mean and SD over images, as the paper reports them.

    Parameters
    ----------
    rows : list of dict
        Outputs of :func:`image_metrics` (any dicts holding ``keys`` plus ``zero_overlap`` and
        ``truth_empty``).
    keys : sequence of str
        Metrics to summarise.

    Returns
    -------
    dict
        ``{key: {"mean", "sd", "n"}}`` for each key, skipping None and NaN values (so ``n``
        can differ between keys); ``sd`` is the sample SD (ddof=1), 0.0 when n == 1;
        ``mean`` and ``sd`` are None when n == 0. Plus ``zero_overlap_rate`` (fraction of
        images with non-empty truth that are zero-overlap; None if there are none) and
        ``n_images``.

    Notes
    -----
    ``auc`` here is the mean of per-image AUCs. The pooled AUC over all pixels of all images
    (the curve of the paper's Fig. 3) is :class:`RocAccumulator`'s.
    """
    out: dict[str, Any] = {}
    for key in keys:
        vals = np.array([float(r[key]) for r in rows if not _is_missing(r[key])], dtype=np.float64)
        n = int(vals.size)
        if n == 0:
            out[key] = {"mean": None, "sd": None, "n": 0}
        else:
            sd = float(np.std(vals, ddof=1)) if n > 1 else 0.0
            out[key] = {"mean": float(vals.mean()), "sd": sd, "n": n}
    with_truth = [r for r in rows if not r["truth_empty"]]
    out["zero_overlap_rate"] = (
        sum(bool(r["zero_overlap"]) for r in with_truth) / len(with_truth) if with_truth else None
    )
    out["n_images"] = len(rows)
    return out
