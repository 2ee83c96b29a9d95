"""Holm's step-down adjustment against hand-computed cases (issue 23's tables)."""

from __future__ import annotations

import math

import pytest

from nerveseg.evaluation.statistics import holm_adjust


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04, 0.30 (m = 4): 4*0.01 = 0.04, 3*0.02 = 0.06, 2*0.04 = 0.08, 1*0.30 = 0.30
    assert holm_adjust([0.04, 0.01, 0.30, 0.02]) == pytest.approx([0.08, 0.04, 0.30, 0.06])


def test_holm_is_monotone_capped_and_skips_nan():
    # 3*0.02 = 0.06, then 2*0.025 = 0.05 would undercut it: the running maximum keeps 0.06
    assert holm_adjust([0.02, 0.025, 0.9]) == pytest.approx([0.06, 0.06, 0.9])
    assert holm_adjust([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    adjusted = holm_adjust([0.01, math.nan, 0.04])  # m = 2: 0.02, 0.04
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert holm_adjust([]) == []


def test_holm_matches_bonferroni_for_one_test_and_never_exceeds_it():
    assert holm_adjust([0.03]) == [0.03]
    p = [0.001, 0.01, 0.02, 0.2, 0.5]
    for adjusted, raw in zip(holm_adjust(p), p):
        assert raw <= adjusted <= min(1.0, len(p) * raw)
