"""Read and write LabelMe JSON annotations as bool masks.

LabelMe (https://github.com/wkentaro/labelme) stores shapes in pixel coordinates ``[x, y]`` with
the pixel centres at integer positions. Only area shapes (polygon, rectangle, circle) make a mask;
lines and points are annotations of another kind and are ignored.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from skimage import draw, measure

from nerveseg.data.io import MAX_IMAGE_PIXELS
from nerveseg.errors import InputError
from nerveseg.io_utils import atomic_write_json

__all__ = ["LABELME_VERSION", "read_labelme_mask", "write_labelme"]

LABELME_VERSION = "5.2.1"
"""Schema version written by :func:`write_labelme` (any LabelMe 5.x opens it)."""

_AREA_SHAPES = ("polygon", "rectangle", "circle")
_IGNORED_SHAPES = ("line", "linestrip", "point", "points")
_FIX_JSON = "open the file in LabelMe and save it again"


def _load(path: Path) -> dict[str, Any]:
    """Parse the JSON file; every failure becomes an InputError naming the file."""
    if not path.is_file():
        raise InputError(path, "LabelMe file not found", "check the path and the file name")
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"is not valid JSON ({e})", _FIX_JSON) from e
    except OSError as e:
        raise InputError(path, f"cannot be read: {e}", "check the file permissions") from e
    if not isinstance(data, dict):
        raise InputError(path, "is not a LabelMe annotation (top level is not an object)", _FIX_JSON)
    return data


def _size(path: Path, data: dict[str, Any]) -> tuple[int, int]:
    """``(imageHeight, imageWidth)``, which the mask grid needs and the shapes do not imply."""
    size = []
    for key in ("imageHeight", "imageWidth"):
        value = data.get(key)
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value != int(value) or value <= 0):
            raise InputError(path, f"LabelMe file lacks a valid '{key}' (got {value!r})",
                             f"{_FIX_JSON}, or add imageHeight and imageWidth of the image")
        size.append(int(value))
    if size[0] * size[1] > MAX_IMAGE_PIXELS:  # checked before the mask is allocated
        raise InputError(path, f"LabelMe image size {size[0]}x{size[1]} is too large; the limit is "
                               f"{MAX_IMAGE_PIXELS:,} pixels", f"{_FIX_JSON}, or check imageHeight and imageWidth")
    return size[0], size[1]


def _points(path: Path, index: int, shape: dict[str, Any]) -> np.ndarray:
    """Shape points as float array (N, 2) of ``[x, y]``."""
    try:
        pts = np.asarray(shape.get("points", []), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(path, f"shape {index} has malformed points", _FIX_JSON) from e
    if pts.size == 0:
        return np.zeros((0, 2))
    if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
        raise InputError(path, f"shape {index} has malformed points (expected a list of [x, y])", _FIX_JSON)
    return pts


def _rasterise(mask: np.ndarray, shape_type: str, pts: np.ndarray) -> None:
    """Draw one shape into ``mask`` in place (clipped to the image)."""
    h, w = mask.shape
    if shape_type == "polygon":
        if len(pts) < 3:  # a polygon of fewer than 3 points has no area
            return
        rr, cc = draw.polygon(pts[:, 1], pts[:, 0], shape=mask.shape)
        mask[rr, cc] = True
    elif shape_type == "rectangle":
        if len(pts) < 2:
            return
        (x0, y0), (x1, y1) = pts[0], pts[1]
        # Corners may be given in any order; both are inclusive, as in LabelMe's own rasteriser.
        r0, r1 = sorted((int(round(y0)), int(round(y1))))
        c0, c1 = sorted((int(round(x0)), int(round(x1))))
        r0, c0 = max(r0, 0), max(c0, 0)
        r1, c1 = min(r1, h - 1), min(c1, w - 1)
        if r0 > r1 or c0 > c1:  # entirely outside the image
            return
        rr, cc = draw.rectangle((r0, c0), end=(r1, c1), shape=mask.shape)
        mask[rr, cc] = True
    elif shape_type == "circle":
        if len(pts) < 2:
            return
        (cx, cy), (px, py) = pts[0], pts[1]
        radius = math.hypot(px - cx, py - cy)
        rr, cc = draw.disk((cy, cx), radius, shape=mask.shape)
        mask[rr, cc] = True


def read_labelme_mask(path: str | Path, label: str | None = None) -> np.ndarray:
    """Rasterise a LabelMe JSON file into a bool mask.

    Parameters
    ----------
    path : str or Path
        LabelMe ``.json`` with ``imageHeight``, ``imageWidth`` and ``shapes``.
    label : str, optional
        Only shapes with this label; ``None`` takes every shape.

    Returns
    -------
    np.ndarray
        bool (imageHeight, imageWidth): union of the polygon, rectangle and circle shapes.

    Raises
    ------
    InputError
        Malformed JSON, missing image size, malformed shape, or a label no shape has.
    """
    path = Path(path)
    data = _load(path)
    height, width = _size(path, data)
    shapes = data.get("shapes")
    if not isinstance(shapes, list):
        raise InputError(path, "LabelMe file has no 'shapes' list", _FIX_JSON)
    for i, shape in enumerate(shapes):
        if not isinstance(shape, dict):
            raise InputError(path, f"shape {i} is not an object", _FIX_JSON)

    if label is not None:
        label = str(label)
        present = sorted({str(s.get("label", "")) for s in shapes})
        if label not in present:
            listed = ", ".join(repr(p) for p in present) if present else "none (no shapes)"
            raise InputError(path, f"has no shape labelled '{label}'; labels present: {listed}",
                             "pass one of the labels present with --label")

    mask = np.zeros((height, width), dtype=bool)
    for i, shape in enumerate(shapes):
        if label is not None and str(shape.get("label", "")) != label:
            continue
        # LabelMe omits shape_type (or writes null) in files from versions before 3.
        shape_type = shape.get("shape_type") or "polygon"
        if shape_type in _IGNORED_SHAPES:
            continue
        if shape_type not in _AREA_SHAPES:
            # Newer LabelMe types (e.g. "mask" with embedded PNG) are not supported; say so
            # rather than return a mask that silently lacks the shape.
            raise InputError(path, f"shape {i} has unsupported shape_type '{shape_type}'",
                             f"redraw it as one of: {', '.join(_AREA_SHAPES)}")
        _rasterise(mask, shape_type, _points(path, i, shape))
    return mask


def _outer_polygon(component: np.ndarray) -> np.ndarray | None:
    """Outer boundary of one 4-connected component as (N, 2) ``[row, col]``, unclosed."""
    # Padding closes contours of components that touch the border.
    padded = np.pad(component, 1).astype(np.float32)
    contours = measure.find_contours(padded, 0.5)
    if not contours:
        return None

    def area(c: np.ndarray) -> float:  # shoelace; the outer boundary encloses the most area
        r, col = c[:, 0], c[:, 1]
        return abs(float(np.dot(r, np.roll(col, 1)) - np.dot(col, np.roll(r, 1)))) / 2.0

    outer = max(contours, key=area) - 1.0
    approx = measure.approximate_polygon(outer, tolerance=0.5)
    if len(approx) >= 2 and np.array_equal(approx[0], approx[-1]):
        approx = approx[:-1]
    if len(approx) < 3:  # tiny components can simplify away; keep the exact contour then
        approx = outer[:-1] if np.array_equal(outer[0], outer[-1]) else outer
    return approx


def write_labelme(path: str | Path, mask: np.ndarray, image_path: str, label: str = "nerve") -> None:
    """Write a bool mask as a LabelMe 5.x JSON file, one polygon per connected component.

    Parameters
    ----------
    path : str or Path
        Output ``.json`` (written atomically).
    mask : np.ndarray
        bool (H, W).
    image_path : str
        Stored as ``imagePath``; LabelMe resolves it relative to the JSON file.
    label : str
        Label of every polygon.

    Notes
    -----
    Holes inside a component are not written (a LabelMe polygon cannot have holes).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    mask = mask.astype(bool)
    # 4-connectivity matches find_contours' default (fully_connected="low"), so each labelled
    # component has exactly one outer contour.
    components = measure.label(mask, connectivity=1)
    shapes = []
    for index in range(1, int(components.max()) + 1):
        poly = _outer_polygon(components == index)
        if poly is None:
            continue
        shapes.append({
            "label": label,
            "points": [[float(c), float(r)] for r, c in poly],
            "group_id": None,
            "shape_type": "polygon",
            "flags": {},
        })
    document = {
        "version": LABELME_VERSION,
        "flags": {},
        "shapes": shapes,
        "imagePath": str(image_path),
        "imageData": None,
        "imageHeight": int(mask.shape[0]),
        "imageWidth": int(mask.shape[1]),
    }
    atomic_write_json(path, document)
