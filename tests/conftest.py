"""Shared fixtures: synthetic 'ultrasound' datasets of noisy ellipses, and the real data path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "usgra-seg"


def ellipse_pair(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A speckled image with one bright, textured ellipse (the 'nerve'), and its label mask (1)."""
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    ry, rx = rng.uniform(0.08, 0.16) * height, rng.uniform(0.1, 0.2) * width
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    image = 0.25 + 0.05 * rng.standard_normal((height, width))
    image[inside] += 0.4
    image *= 1 + 0.15 * rng.standard_normal((height, width))  # multiplicative speckle
    image = np.clip(image, 0, 1)
    return (image * 255).astype(np.uint8), inside.astype(np.uint8)


def write_ellipse_dataset(root: Path, n: int, height: int = 60, width: int = 76, seed: int = 0) -> Path:
    """images/NNN.png (grey) + masks/NNN.png (palette-free, 0/1 labels)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, mask = ellipse_pair(rng, height, width)
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
    return root


@pytest.fixture
def ellipse_dataset(tmp_path: Path) -> Path:
    return write_ellipse_dataset(tmp_path / "ellipses", 12)


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / "images").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA} (../shared/data/usgra-seg is only on developer and CI machines)")
    return REAL_DATA


@pytest.fixture(scope="session", autouse=True)
def isolated_native_cache(tmp_path_factory):
    """The native SAConv library and the graphs exported for it go to a per-session folder,
    not the user's ~/.cache/nerveseg: tests see a cold cache and leave nothing behind."""
    import os

    folder = tmp_path_factory.mktemp("nerveseg-cache")
    previous = os.environ.get("NERVESEG_CACHE_DIR")
    os.environ["NERVESEG_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("NERVESEG_CACHE_DIR", None)
    else:
        os.environ["NERVESEG_CACHE_DIR"] = previous
