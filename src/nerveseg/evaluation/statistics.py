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
