"""Agreement of the nerve's area with the expert's: what a clinician reads off, not Dice.

A carpal tunnel cut-off (e.g. CSA >= 10 mm² at the inlet) is crossed or not by the area, and a
segmentation with a good Dice can still be biased in area (always a rim too wide). For each
evaluation nerveseg reports, per image, predicted vs expert area and over images:

- absolute percentage error |pred - truth| / truth (median and mean), images with an empty
  truth left out (the percentage is undefined there);
- Bland-Altman (1986): bias = mean(pred - truth), 95% limits of agreement bias +- 1.96 SD of the
  differences (sample SD);
- Lin's concordance correlation coefficient (1989): 2 s_xy / (s_x² + s_y² + (mean_x - mean_y)²)
  with population (1/n) moments, as Lin defined it;
- ICC(2,1) (Shrout & Fleiss 1979; McGraw & Wong's "A,1": two-way random effects, absolute
  agreement, single rater), from the two-way ANOVA of the n x 2 table (truth, prediction).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io_utils import atomic_path

__all__ = ["area_agreement", "bland_altman", "icc_a1", "lins_ccc", "save_bland_altman_plot"]


def _pairs(pred: Sequence[float], truth: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64).ravel()
    t = np.asarray(truth, dtype=np.float64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"need one prediction per truth, got {p.size} and {t.size}")
    keep = np.isfinite(p) & np.isfinite(t)
    return p[keep], t[keep]


def bland_altman(pred: Sequence[float], truth: Sequence[float]) -> dict:
    """Bias (mean of pred - truth), SD of the differences and the 95% limits of agreement."""
    p, t = _pairs(pred, truth)
    n = int(p.size)
    if n == 0:
        return {"n": 0, "bias": None, "sd": None, "loa_low": None, "loa_high": None}
    d = p - t
    bias = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    return {"n": n, "bias": bias, "sd": sd, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd}


def lins_ccc(pred: Sequence[float], truth: Sequence[float]) -> float | None:
    """Lin's concordance correlation coefficient; None with fewer than 2 pairs or no variance."""
    p, t = _pairs(pred, truth)
    if p.size < 2:
        return None
    mp, mt = p.mean(), t.mean()
    sxy = float(((p - mp) * (t - mt)).mean())
    denominator = float(p.var() + t.var() + (mp - mt) ** 2)
    return 2 * sxy / denominator if denominator > 0 else None


def icc_a1(pred: Sequence[float], truth: Sequence[float]) -> float | None:
    """ICC(2,1) / ICC(A,1): two-way random effects, absolute agreement, single measurement."""
    p, t = _pairs(pred, truth)
    n, k = int(p.size), 2
    if n < 2:
        return None
    y = np.stack([t, p], axis=1)
    grand = y.mean()
    ss_rows = k * float(((y.mean(axis=1) - grand) ** 2).sum())
    ss_cols = n * float(((y.mean(axis=0) - grand) ** 2).sum())
    ss_total = float(((y - grand) ** 2).sum())
    ms_rows = ss_rows / (n - 1)
    ms_cols = ss_cols / (k - 1)
    ms_error = (ss_total - ss_rows - ss_cols) / ((n - 1) * (k - 1))
    denominator = ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n
    return float((ms_rows - ms_error) / denominator) if denominator > 0 else None


def area_agreement(pred: Sequence[float], truth: Sequence[float], unit: str = "px") -> dict:
    """Every agreement figure of predicted vs expert areas (one value per image)."""
    p, t = _pairs(pred, truth)
    with_truth = t > 0
    ape = np.abs(p[with_truth] - t[with_truth]) / t[with_truth] * 100.0
    out = {
        "unit": unit,
        "n": int(p.size),
        "median_ape_percent": float(np.median(ape)) if ape.size else None,
        "mean_ape_percent": float(ape.mean()) if ape.size else None,
        "n_ape": int(ape.size),
        "bland_altman": bland_altman(p, t),
        "lins_ccc": lins_ccc(p, t),
        "icc_a1": icc_a1(p, t),
    }
    return _finite_or_none(out)


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_bland_altman_plot(groups: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                           unit: str = "px") -> None:
    """Bland-Altman plot (difference against mean of prediction and expert), one colour per group,
    with the pooled bias and 95% limits of agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.4), dpi=120)
    all_p, all_t = [], []
    for name, (pred, truth) in groups.items():
        p, t = _pairs(pred, truth)
        all_p.append(p)
        all_t.append(t)
        ax.scatter((p + t) / 2, p - t, s=10, alpha=0.7, label=f"{name} (n={p.size})")
    if all_p:
        ba = bland_altman(np.concatenate(all_p), np.concatenate(all_t))
        if ba["n"]:
            for value, style, text in ((ba["bias"], "-", "bias"), (ba["loa_low"], "--", "-1.96 SD"),
                                       (ba["loa_high"], "--", "+1.96 SD")):
                ax.axhline(value, color="black", ls=style, lw=1)
                ax.annotate(f"{text} {value:.0f}", xy=(1.0, value), xycoords=("axes fraction", "data"),
                            ha="right", va="bottom", fontsize=7)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel(f"mean of predicted and expert nerve area ({unit})")
    ax.set_ylabel(f"predicted - expert ({unit})")
    ax.set_title("Nerve area agreement (Bland-Altman)")
    if len(groups) > 1 or groups:
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
