"""Comparing architectures: run-level summaries and paired tests on per-image scores."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
from scipy import stats


def _finite(values: Iterable) -> np.ndarray:
    arr = np.array([np.nan if v in (None, "", "nan") else float(v) for v in values], dtype=float)
    return arr[np.isfinite(arr)]


def mean_sd(values: Iterable) -> tuple[float, float, int]:
    """Mean and sample SD (ddof = 1; 0 for a single value) of the finite values."""
    arr = _finite(values)
    if arr.size == 0:
        return math.nan, math.nan, 0
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0, int(arr.size)


def run_level_summary(rows: Sequence[dict], metric: str, run_keys: Sequence[str] = ("seed", "fold")) -> tuple[float, float, int]:
    """The paper's "mean and SD over repeated runs": mean of each run's per-image mean, and the
    SD of those run means. With one run, the SD is over images instead (said in the report)."""
    by_run: dict[tuple, list] = defaultdict(list)
    for row in rows:
        by_run[tuple(row[k] for k in run_keys)].append(row.get(metric))
    if len(by_run) == 1:
        return mean_sd(next(iter(by_run.values())))
    run_means = [mean_sd(v)[0] for v in by_run.values()]
    return mean_sd(run_means)


def paired_wilcoxon(
    rows: Sequence[dict], reference: str, other: str, metric: str = "dice", pair_keys: Sequence[str] = ("seed", "fold", "stem")
) -> dict:
    """Two-sided Wilcoxon signed-rank test of ``reference`` vs ``other`` on a per-image metric.

    Images are paired by (seed, fold, stem), so each pair is the same image under the same split
    and seed. Pairs where either value is missing are dropped. Returns n, the median of
    (reference - other), and the p-value (NaN when fewer than 2 non-zero differences).
    """
    values: dict[str, dict[tuple, float]] = {reference: {}, other: {}}
    for row in rows:
        if row["arch"] in values:
            v = row.get(metric)
            if v not in (None, "", "nan") and math.isfinite(float(v)):
                values[row["arch"]][tuple(str(row[k]) for k in pair_keys)] = float(v)
    common = sorted(set(values[reference]) & set(values[other]))
    a = np.array([values[reference][k] for k in common])
    b = np.array([values[other][k] for k in common])
    diff = a - b
    result = {"n": len(common), "median_difference": float(np.median(diff)) if len(common) else math.nan}
    if np.count_nonzero(diff) < 2:
        result["p_value"] = math.nan
    else:
        result["p_value"] = float(stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided").pvalue)
    return result


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (Holm 1979) of a family of p-values, in the input order.

    Sort ascending, multiply the i-th smallest (0-based) by (m - i), take the running maximum so
    the adjusted values keep the raw order, cap at 1. NaN p-values (tests that could not run) stay
    NaN and do not count in m. Reject at level alpha where the adjusted p <= alpha: the
    family-wise error rate of the m comparisons is then at most alpha.
    """
    p = [float(v) for v in p_values]
    finite = [i for i, v in enumerate(p) if not math.isnan(v)]
    m = len(finite)
    adjusted = [math.nan] * len(p)
    running = 0.0
    for rank, i in enumerate(sorted(finite, key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted
