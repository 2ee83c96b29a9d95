"""Measurements of segmented nerves on hand-made masks with known geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nerveseg.errors import ConfigError
from nerveseg.inference.calibration import Spacing
from nerveseg.inference.measure import (
    MEASUREMENT_FIELDS,
    measure_components,
    measure_mask,
    measurement_row,
    measurement_rows,
    perimeter,
    postprocess,
)


def disc(r: float, size: int | None = None, center: tuple[float, float] | None = None) -> np.ndarray:
    size = size or int(2 * r + 21)
    cy, cx = center or (size // 2, size // 2)
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def ellipse(a: float, b: float, shape=(100, 120), center=(50.3, 60.2)) -> np.ndarray:
    """Semi-axis ``a`` along columns, ``b`` along rows."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return ((yy - center[0]) / b) ** 2 + ((xx - center[1]) / a) ** 2 <= 1


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


# ------------------------------------------------------------------------------------------------
# Perimeter, area, shape
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [10, 20, 40])
@pytest.mark.parametrize("offset", [(0.0, 0.0), (0.5, 0.5), (0.3, 0.1)])
def test_perimeter_of_disc_within_3_percent(r, offset):
    size = 2 * r + 21
    mask = disc(r, size, (size // 2 + offset[0], size // 2 + offset[1]))
    assert perimeter(mask) == pytest.approx(2 * math.pi * r, rel=0.03)


def test_disc_area_circularity_flattening():
    m = measure_mask(disc(20))
    assert m["area_px"] == pytest.approx(math.pi * 20 ** 2, rel=0.01)
    assert m["area_mm2"] is None and m["perimeter_mm"] is None
    assert m["perimeter_px"] == pytest.approx(2 * math.pi * 20, rel=0.03)
    assert m["circularity"] == pytest.approx(1.0, abs=0.05)
    assert m["flattening"] == pytest.approx(1.0, abs=0.05)
    assert m["n_components"] == 1 and m["qc_flags"] == "" and m["confidence"] is None
    assert (m["centroid_row"], m["centroid_col"]) == pytest.approx((30.0, 30.0))


def test_disc_with_isotropic_spacing():
    m = measure_mask(disc(20), spacing=Spacing(0.06, 0.06, "test"))
    assert m["area_mm2"] == pytest.approx(m["area_px"] * 0.0036, rel=1e-12)
    assert m["perimeter_mm"] == pytest.approx(m["perimeter_px"] * 0.06, rel=1e-12)
    assert m["circularity"] == pytest.approx(1.0, abs=0.05)


def test_ellipse_flattening():
    m = measure_mask(ellipse(30, 15))
    assert m["flattening"] == pytest.approx(2.0, rel=0.03)
    assert m["area_px"] == pytest.approx(math.pi * 30 * 15, rel=0.01)
    h = ((30 - 15) / (30 + 15)) ** 2  # Ramanujan
    assert m["perimeter_px"] == pytest.approx(math.pi * 45 * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h))), rel=0.03)


def test_rotated_ellipse_flattening():
    yy, xx = np.mgrid[:120, :120]
    u, v = (xx - 60) * math.cos(0.6) + (yy - 60) * math.sin(0.6), -(xx - 60) * math.sin(0.6) + (yy - 60) * math.cos(0.6)
    m = measure_mask((u / 40) ** 2 + (v / 16) ** 2 <= 1)
    assert m["flattening"] == pytest.approx(2.5, rel=0.03)


def test_square_circularity():
    mask = np.zeros((60, 60), bool)
    mask[10:50, 10:50] = True
    assert measure_mask(mask)["circularity"] == pytest.approx(math.pi / 4, rel=0.05)


def test_anisotropic_spacing_pixel_circle_is_mm_ellipse():
    mask = disc(20)
    m = measure_mask(mask, spacing=Spacing(row_mm=0.1, col_mm=0.2, source="user --spacing"))
    assert m["area_mm2"] == pytest.approx(mask.sum() * 0.02, rel=1e-12)
    assert m["flattening"] == pytest.approx(2.0, rel=0.03)
    # In mm it is an ellipse of semi-axes 4 (columns) and 2 (rows).
    h = ((4 - 2) / (4 + 2)) ** 2
    assert m["perimeter_mm"] == pytest.approx(math.pi * 6 * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h))), rel=0.03)
    assert m["circularity"] < 0.9  # a flattened nerve is not round, whatever the pixel grid says


# ------------------------------------------------------------------------------------------------
# QC flags and components
# ------------------------------------------------------------------------------------------------


def two_blobs() -> np.ndarray:
    mask = np.zeros((80, 100), bool)
    yy, xx = np.mgrid[:80, :100]
    mask |= (yy - 30) ** 2 + (xx - 30) ** 2 <= 15 ** 2   # big
    mask |= (yy - 50) ** 2 + (xx - 75) ** 2 <= 6 ** 2    # small
    return mask


def test_two_blobs_multi_component_and_component_rows():
    mask = two_blobs()
    m = measure_mask(mask)
    assert m["n_components"] == 2 and m["qc_flags"] == "multi_component"
    assert m["area_px"] == mask.sum()
    comps = measure_components(mask)
    assert [c["component"] for c in comps] == [1, 2]
    assert comps[0]["area_px"] > comps[1]["area_px"]
    assert comps[0]["area_px"] + comps[1]["area_px"] == m["area_px"]
    assert comps[0]["centroid_row"] == pytest.approx(30) and comps[1]["centroid_col"] == pytest.approx(75)
    assert m["perimeter_px"] == pytest.approx(comps[0]["perimeter_px"] + comps[1]["perimeter_px"])
    assert all("multi_component" in c["qc_flags"] for c in comps)
    rows = measurement_rows("a.png", 0, mask, per_component=True)
    assert [r["component"] for r in rows] == [1, 2]


def test_diagonal_pixels_are_one_component():
    mask = np.zeros((10, 10), bool)
    mask[3, 3] = mask[4, 4] = mask[5, 5] = True
    assert measure_mask(mask)["n_components"] == 1


def test_empty_mask_is_no_nerve():
    m = measure_mask(np.zeros((20, 20), bool), prob=np.zeros((20, 20)), spacing=Spacing(0.1, 0.1, "t"))
    assert m["area_px"] == 0 and m["area_mm2"] == 0.0 and m["n_components"] == 0
    assert m["qc_flags"] == "no_nerve" and m["confidence"] is None and m["circularity"] is None
    assert measure_components(np.zeros((20, 20), bool)) == []
    rows = measurement_rows("a.png", 3, np.zeros((20, 20), bool), per_component=True)
    assert len(rows) == 1 and rows[0]["qc_flags"] == "no_nerve" and rows[0]["area_px"] == 0


def test_touches_border():
    mask = np.zeros((30, 30), bool)
    mask[0:5, 10:15] = True
    assert measure_mask(mask)["qc_flags"] == "touches_border"
    mask[:] = False
    mask[1:5, 10:15] = True
    assert measure_mask(mask)["qc_flags"] == ""


def test_confidence_and_low_confidence():
    mask = disc(10)
    prob = np.where(mask, 0.9, 0.1)
    m = measure_mask(mask, prob)
    assert m["confidence"] == pytest.approx(0.9) and m["qc_flags"] == ""
    m = measure_mask(mask, np.where(mask, 0.6, 0.0))
    assert m["confidence"] == pytest.approx(0.6) and m["qc_flags"] == "low_confidence"
    assert measure_mask(mask, np.where(mask, 0.6, 0.0), low_confidence=0.5)["qc_flags"] == ""
    with pytest.raises(ValueError):
        measure_mask(mask, np.zeros((3, 3)))


def test_flags_combine_in_fixed_order():
    mask = np.zeros((30, 30), bool)
    mask[0:4, 0:4] = True
    mask[20:25, 20:25] = True
    assert measure_mask(mask, np.where(mask, 0.5, 0))["qc_flags"] == "multi_component;low_confidence;touches_border"


# ------------------------------------------------------------------------------------------------
# Post-processing
# ------------------------------------------------------------------------------------------------


def test_postprocess_none_is_a_copy():
    mask = two_blobs()
    out = postprocess(mask)
    assert out is not mask and np.array_equal(out, mask)


def test_postprocess_largest_keeps_the_big_one():
    out = postprocess(two_blobs(), "largest")
    assert measure_mask(out)["n_components"] == 1
    assert out[30, 30] and not out[50, 75]


def test_postprocess_min_area_drops_the_small():
    mask = two_blobs()
    out = postprocess(mask, "min_area", min_area_px=200)
    assert out[30, 30] and not out[50, 75]
    assert np.array_equal(postprocess(mask, "min_area", min_area_px=50), mask)  # both >= 50 px


def test_postprocess_ellipse_fills_a_notch():
    mask = disc(25, 80)
    notched = mask.copy()
    notched[30:50, 55:70] = False  # a bite out of the right side
    out = postprocess(notched, "ellipse")
    assert measure_mask(out)["n_components"] == 1
    assert out.sum() == pytest.approx(notched.sum(), rel=0.05)
    assert out[40, 60]  # the notch is filled
    assert measure_mask(out)["flattening"] == pytest.approx(
        measure_mask(notched)["flattening"], rel=0.05)


def test_postprocess_ellipse_reproduces_a_rotated_ellipse():
    yy, xx = np.mgrid[:120, :120]
    u, v = (xx - 60) * math.cos(0.6) + (yy - 58) * math.sin(0.6), -(xx - 60) * math.sin(0.6) + (yy - 58) * math.cos(0.6)
    mask = (u / 40) ** 2 + (v / 16) ** 2 <= 1
    assert iou(postprocess(mask, "ellipse"), mask) > 0.95


def test_postprocess_errors():
    with pytest.raises(ConfigError, match="largest"):
        postprocess(two_blobs(), "biggest")
    with pytest.raises(ConfigError):
        postprocess(two_blobs(), "min_area")
    with pytest.raises(ConfigError):
        postprocess(two_blobs(), "largest", min_area_px=-1)
    with pytest.raises(ValueError, match="threshold"):
        postprocess(np.full((4, 4), 0.5))


# ------------------------------------------------------------------------------------------------
# CSV rows
# ------------------------------------------------------------------------------------------------


def test_measurement_row_fills_every_field():
    spacing = Spacing(0.06, 0.06, "DICOM SequenceOfUltrasoundRegions[0] (PhysicalDeltaX/Y, cm)")
    mask = disc(20)
    row = measurement_row("a.dcm", 2, mask, np.where(mask, 0.95, 0), spacing)
    assert set(MEASUREMENT_FIELDS) <= set(row) and "perimeter_px" in row
    assert row["file"] == "a.dcm" and row["frame"] == 2 and row["component"] == ""
    assert row["area_mm2"] == pytest.approx(mask.sum() * 0.0036, abs=1e-4)
    assert row["spacing_mm"] == "0.06 x 0.06" and row["spacing_source"] == spacing.source
    assert row["confidence"] == pytest.approx(0.95) and row["qc_flags"] == ""
    assert all(row[f] != "" for f in MEASUREMENT_FIELDS if f not in ("component", "qc_flags"))


def test_measurement_row_without_spacing_or_prob():
    row = measurement_row("a.png", None, disc(10))
    for field in ("area_mm2", "perimeter_mm", "confidence", "spacing_mm", "spacing_source", "frame"):
        assert row[field] == ""
    assert row["perimeter_px"] == pytest.approx(2 * math.pi * 10, rel=0.03)
    assert isinstance(row["area_px"], int) and row["circularity"] != ""
