"""Area agreement figures (issue 22) against hand-computed cases and independent formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from nerveseg.evaluation.agreement import area_agreement, bland_altman, icc_a1, lins_ccc


def test_constant_offset_by_hand():
    # pred = truth + 1: bias 1, no spread; CCC = 2(8/3) / (8/3 + 8/3 + 1) = 16/19
    pred, truth = [2, 4, 6], [1, 3, 5]
    ba = bland_altman(pred, truth)
    assert ba == {"n": 3, "bias": 1.0, "sd": 0.0, "loa_low": 1.0, "loa_high": 1.0}
    assert lins_ccc(pred, truth) == pytest.approx(16 / 19)
    # two-way ANOVA of rows (1,2), (3,4), (5,6): MSR 8, MSC 1.5, MSE 0 -> ICC = 8 / (8 + 2 * 1.5 / 3) = 8/9
    assert icc_a1(pred, truth) == pytest.approx(8 / 9)
    summary = area_agreement(pred, truth)
    # percentage errors 100%, 33.3%, 20%
    assert summary["median_ape_percent"] == pytest.approx(100 / 3)
    assert summary["mean_ape_percent"] == pytest.approx((100 + 100 / 3 + 20) / 3)


def test_bland_altman_limits_by_hand():
    ba = bland_altman([12, 18, 30, 41], [10, 20, 30, 40])  # differences 2, -2, 0, 1
    sd = math.sqrt((1.75 ** 2 + 2.25 ** 2 + 0.25 ** 2 + 0.75 ** 2) / 3)
    assert ba["bias"] == pytest.approx(0.25) and ba["sd"] == pytest.approx(sd)
    assert ba["loa_low"] == pytest.approx(0.25 - 1.96 * sd) and ba["loa_high"] == pytest.approx(0.25 + 1.96 * sd)


def test_ccc_is_pearson_times_bias_correction():
    # Lin (1989): CCC = r * C_b, C_b = 2 / (v + 1/v + u^2), v = s_x / s_y, u = (mu_x - mu_y) / sqrt(s_x s_y)
    rng = np.random.default_rng(0)
    truth = rng.uniform(1000, 4000, 50)
    pred = 1.1 * truth + rng.normal(0, 200, 50) + 50
    r = stats.pearsonr(pred, truth).statistic
    sx, sy = pred.std(), truth.std()
    v, u = sx / sy, (pred.mean() - truth.mean()) / math.sqrt(sx * sy)
    assert lins_ccc(pred, truth) == pytest.approx(r * 2 / (v + 1 / v + u ** 2))


def test_perfect_agreement_and_edges():
    truth = [100.0, 250.0, 400.0]
    summary = area_agreement(truth, truth)
    assert summary["median_ape_percent"] == 0 and summary["lins_ccc"] == pytest.approx(1.0)
    assert summary["icc_a1"] == pytest.approx(1.0) and summary["bland_altman"]["bias"] == 0
    # an empty truth has no percentage error but still counts in Bland-Altman
    summary = area_agreement([10, 110], [0, 100])
    assert summary["n_ape"] == 1 and summary["median_ape_percent"] == pytest.approx(10.0) and summary["n"] == 2
    empty = area_agreement([], [])
    assert empty["median_ape_percent"] is None and empty["lins_ccc"] is None and empty["bland_altman"]["bias"] is None
    assert lins_ccc([1.0], [2.0]) is None and icc_a1([5, 5], [5, 5]) is None  # no variance: undefined, not NaN
    with pytest.raises(ValueError):
        bland_altman([1, 2], [1])
