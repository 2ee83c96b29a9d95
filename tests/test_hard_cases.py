"""The hard cases a comparison's overlay panel shows: bifid nerves and low-contrast nerves, found from
the image and the expert mask alone, and the panel's choice of images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from nerveseg.data import discover_samples
from nerveseg.evaluation.benchmark import pick_panel_stems
from nerveseg.evaluation.hard_cases import boundary_contrast, hard_case_stems, nerve_regions

WRIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mn-wrist"


def test_nerve_regions_counts_eight_connected_regions_and_ignores_specks():
    mask = np.zeros((60, 60), bool)
    mask[5:20, 5:20] = True
    assert nerve_regions(mask) == 1
    mask[30:45, 30:45] = True
    assert nerve_regions(mask) == 2
    mask[50:53, 50:53] = True  # 9 px: an annotation speck, not a third region
    assert nerve_regions(mask) == 2
    assert nerve_regions(mask, min_px=1) == 3
    touching = np.zeros((20, 20), bool)
    touching[2:10, 2:10] = True
    touching[10:18, 10:18] = True  # meets the first only at a corner: one region under 8-connectivity
    assert nerve_regions(touching) == 1
    assert nerve_regions(np.zeros((5, 5), bool)) == 0


def test_boundary_contrast_against_a_ring_built_independently():
    rng = np.random.default_rng(3)
    image = rng.normal(50, 10, (80, 90))
    mask = np.zeros(image.shape, bool)
    mask[30:50, 35:60] = True
    image[mask] = 80
    # the ring: pixels within 10 steps (city block, as 10 dilations by the cross) of the mask, outside it
    steps = ndi.distance_transform_cdt(~mask, metric="taxicab")
    ring = (steps > 0) & (steps <= 10)
    expected = abs(80 - image[ring].mean()) / image[ring].std()
    assert boundary_contrast(image, mask, ring_px=10) == pytest.approx(expected, rel=1e-9)
    # an RGB frame of the same grey gives the same contrast
    rgb = np.repeat(image[..., None], 3, axis=-1)
    assert boundary_contrast(rgb, mask) == pytest.approx(expected, rel=1e-9)
    assert math.isnan(boundary_contrast(image, np.zeros_like(mask)))
    assert math.isnan(boundary_contrast(image, np.ones_like(mask)))


def _write(root: Path, stem: str, image: np.ndarray, mask: np.ndarray) -> None:
    Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"{stem}.png")
    Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{stem}.png")


def test_hard_case_stems_finds_the_bifid_and_the_faintest(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i, inside in enumerate([200, 180, 160, 140, 120, 100, 90, 80, 75, 72]):  # background ~60 +- 8
        image = np.clip(rng.normal(60, 8, (64, 64)), 0, 255)
        mask = np.zeros((64, 64), np.uint8)
        mask[20:40, 20:40] = 1
        if i == 2:  # a split nerve: two regions
            mask[20:40, 29:32] = 0
        image[mask == 1] = inside
        _write(root, f"s{i}", image, mask)
    (root / "masks" / "s3.png").write_bytes(b"not a png")  # an unreadable mask is left out, not fatal
    samples, _ = discover_samples(root)
    kinds = hard_case_stems(samples, low_contrast_fraction=0.2)
    assert kinds["bifid"] == ["s2"]
    assert kinds["low contrast"] == ["s9", "s8"]  # ceil(0.2 * 9 readable) = 2, the faintest first
    assert hard_case_stems(samples[:0]) == {"bifid": [], "low contrast": []}


def test_pick_panel_stems_takes_the_hardest_then_each_kind_then_typical_images():
    # mean Dice per image over both architectures: a 0.1, b 0.5, c 0.6, d 0.7, e 0.9, f nan only
    rows = [{"stem": s, "dice": d} for s, d in (("a", 0.0), ("a", 0.2), ("b", 0.5), ("c", 0.6), ("d", 0.7),
                                                 ("e", 0.9), ("f", "nan"))]
    assert pick_panel_stems(rows, n_hard=1, n_typical=2) == [("a", "hardest"), ("c", "typical"), ("b", "typical")]
    # a kind shows its lowest-Dice candidate not already shown; unscored candidates (f, z) never
    kinds = {"bifid": ["a", "e", "d", "f"], "low contrast": ["z"], "other": ["f", "b"]}
    assert pick_panel_stems(rows, n_hard=1, n_typical=1, kinds=kinds) == [
        ("a", "hardest"), ("d", "bifid"), ("b", "other"), ("c", "typical")]
    assert pick_panel_stems([], 3, 3) == []


def test_the_wrist_data_has_its_documented_bifid_nerves():
    if not (WRIST / "manifest.csv").is_file():
        pytest.skip(f"mn-wrist not found at {WRIST} (../shared/data is only on developer and CI machines)")
    samples, _ = discover_samples(WRIST)
    kinds = hard_case_stems(samples)
    # the README: "the nerve is one region in all but a few images (bifid or split nerve in the others)"
    assert 1 <= len(kinds["bifid"]) <= 10
    assert len(kinds["low contrast"]) == math.ceil(0.1 * len(samples))
