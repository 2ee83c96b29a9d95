"""Read and write LabelMe JSON annotations as bool masks.

LabelMe (https://github.com/wkentaro/labelme) stores shapes in pixel coordinates ``[x, y]`` with
the pixel centres at integer positions. Only area shapes (polygon, rectangle, circle) make a mask;
lines and points are annotations of another kind and are ignored.

Polygons are filled by a scanline (:func:`_fill_polygon`) that includes exactly the pixels
``skimage.draw.polygon`` includes, in time proportional to the pixels and edge crossings rather
than to pixels x vertices: skimage tests every pixel of the bounding box against every edge, so a
20,000-vertex polygon on 512x512 took 40 s (issue 24, point 4).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from skimage import draw, measure

from nerveseg.data.limits import MAX_IMAGE_PIXELS
from nerveseg.errors import InputError
from nerveseg.io_utils import atomic_write_json

__all__ = ["LABELME_VERSION", "MAX_POLYGON_CROSSINGS", "MAX_POLYGON_VERTICES", "read_labelme_mask", "write_labelme"]

LABELME_VERSION = "5.2.1"
"""Schema version written by :func:`write_labelme` (any LabelMe 5.x opens it)."""

MAX_POLYGON_VERTICES = 100_000
"""Most vertices one polygon may have. A drawn outline has tens to hundreds and
:func:`write_labelme`'s outline of a mask a few thousand at most; more is not an annotation."""

MAX_POLYGON_CROSSINGS = 5_000_000
"""Most crossings of a file's polygon edges with the pixel rows they span (the scanline's work:
about a second on a slow 2-core machine). An outline crosses each row of its height a few
times; a polygon zigzagging over the whole height of a large image with thousands of vertices
would cost minutes and is refused instead."""

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


def _row_spans(lo: np.ndarray, hi: np.ndarray, r0: int, r1: int, upper: bool) -> tuple[np.ndarray, np.ndarray]:
    """First row and row count of each edge (from row ``lo`` to ``hi``) inside rows r0..r1.

    ``upper``: the rows y with ``lo <= y < hi`` (an edge "straddles" y when exactly one end is
    above it, ``(ya > y) != (yb > y)``); else ``lo < y <= hi`` (``(ya < y) != (yb < y)``).
    Clipped in floats first, so coordinates of 1e308 cannot overflow an integer."""
    if upper:
        first, stop = np.ceil(lo), np.ceil(hi)
    else:
        first, stop = np.floor(lo) + 1, np.floor(hi) + 1
    first = np.clip(first, r0, r1 + 1).astype(np.int64)
    stop = np.clip(stop, r0, r1 + 1).astype(np.int64)
    return first, np.maximum(stop - first, 0)


def _crossing_parity(ya: np.ndarray, xa: np.ndarray, yb: np.ndarray, xb: np.ndarray, r0: int, r1: int, c0: int,
                     width: int, upper: bool) -> np.ndarray:
    """Per row r0..r1 and box column 0..width-1, the parity of the edge crossings to the right
    of the pixel (``upper``: edges straddling by the upper rule, crossing at x > pixel) or to its
    left (else: lower rule, crossing at x < pixel), as skimage's point_in_polygon counts them.

    Each crossing flips the parity of the first box column it is not counted for (right:
    ceil(x); left: floor(x) + 1); a running sum along the row then gives, per pixel, the parity
    of the crossings at or left of it (uint8 sums wrap at 256, which keeps the parity)."""
    parity = np.zeros((r1 - r0 + 1, width + 1), dtype=np.uint8)
    lo, hi = np.minimum(ya, yb), np.maximum(ya, yb)
    first, span = _row_spans(lo, hi, r0, r1, upper)
    keep = span > 0
    ya, xa, yb, xb, first, span = ya[keep], xa[keep], yb[keep], xb[keep], first[keep], span[keep]
    ends = np.cumsum(span)
    total = int(ends[-1]) if len(ends) else 0
    step = 2_000_000  # crossings per chunk: bounds the temporary arrays to ~100 MB
    for g0 in range(0, total, step):
        g = np.arange(g0, min(g0 + step, total))
        edge = np.searchsorted(ends, g, side="right")  # the edge each crossing belongs to
        y = (first[edge] + (g - (ends[edge] - span[edge]))).astype(np.float64)
        a_y, a_x, b_y, b_x = ya[edge], xa[edge], yb[edge], xb[edge]
        with np.errstate(all="ignore"):
            # skimage's crossing, (x0*y1 - x1*y0) / (y1 - y0) relative to the pixel, written
            # for the whole row: exact for integer vertices, as skimage's is
            x = (a_x * b_y - b_x * a_y + y * (b_x - a_x)) / (b_y - a_y)
            bad = ~np.isfinite(x)
            if bad.any():  # products of coordinates near 1e308 overflow; interpolate instead
                t = (y[bad] - a_y[bad]) / (b_y[bad] - a_y[bad])
                x[bad] = np.nan_to_num(a_x[bad] * (1 - t) + b_x[bad] * t, nan=-1.0)
            column = np.ceil(x) if upper else np.floor(x) + 1
            column = np.clip(column - c0, 0, width).astype(np.int64)
        # only the parity counts: flip each cell hit an odd number of times (sorting first is
        # several times faster than np.add.at's scattered increments on a large box)
        flat = np.sort((y - r0).astype(np.int64) * (width + 1) + column)
        run_starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
        odd = np.diff(np.r_[run_starts, len(flat)]) & 1 == 1
        parity.reshape(-1)[flat[run_starts[odd]]] ^= 1
    before = np.cumsum(parity, axis=1, dtype=np.uint8)  # crossings counted at or left of each column
    if upper:  # to the right = all of the row's crossings less those at or left of the pixel
        return ((before[:, -1:] - before[:, :-1]) & 1).astype(bool)
    return (before[:, :-1] & 1).astype(bool)


def _fill_polygon(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    """Set the pixels ``skimage.draw.polygon(rows, cols, shape=mask.shape)`` gives, by scanline.

    skimage includes a pixel centre that is inside (an odd number of edge crossings to its
    right, by the upper straddle rule), on an edge (the crossings to its left, by the lower rule,
    of another parity) or on a vertex. Here both parities are counted for whole rows at once, so
    the work is the bounding box plus one step per edge crossing of a row."""
    h, w = mask.shape
    r0, r1 = max(0, int(max(rows.min(), 0))), int(min(math.ceil(rows.max()), h - 1))
    c0, c1 = max(0, int(max(cols.min(), 0))), int(min(math.ceil(cols.max()), w - 1))
    if r0 > r1 or c0 > c1:
        return
    ya, xa = rows, cols
    yb, xb = np.roll(rows, -1), np.roll(cols, -1)
    width = c1 - c0 + 1
    box = _crossing_parity(ya, xa, yb, xb, r0, r1, c0, width, upper=True)
    box |= _crossing_parity(ya, xa, yb, xb, r0, r1, c0, width, upper=False)
    # a vertex on a pixel centre is in, whatever the crossings say (skimage: within 1e-12)
    vr, vc = np.round(rows), np.round(cols)
    on = ((np.abs(rows - vr) < 1e-12) & (np.abs(cols - vc) < 1e-12)
          & (vr >= r0) & (vr <= r1) & (vc >= c0) & (vc <= c1))
    box[(vr[on] - r0).astype(np.int64), (vc[on] - c0).astype(np.int64)] = True
    mask[r0:r1 + 1, c0:c1 + 1] |= box


def _polygon_work(rows: np.ndarray, height: int) -> int:
    """Crossings of the polygon's edges with the image rows (an upper bound of the fill's work)."""
    lo = np.minimum(rows, np.roll(rows, -1))
    hi = np.maximum(rows, np.roll(rows, -1))
    _, span = _row_spans(lo, hi, 0, height - 1, upper=True)
    return int(span.sum())


def _check_polygon(path: Path, index: int, pts: np.ndarray, height: int, crossings_before: int) -> int:
    """Refuse a polygon that would cost more than a second or so to fill (alone or with the
    file's polygons before it); returns the file's crossings so far."""
    fix = "simplify the outline (e.g. redraw it in LabelMe with fewer points)"
    if len(pts) > MAX_POLYGON_VERTICES:
        raise InputError(path, f"shape {index} is a polygon of {len(pts):,} vertices; the limit is "
                               f"{MAX_POLYGON_VERTICES:,}", fix)
    crossings = crossings_before + (_polygon_work(pts[:, 1], height) if len(pts) >= 3 else 0)
    if crossings > MAX_POLYGON_CROSSINGS:
        raise InputError(path, f"shape {index} is a polygon whose edges (with the polygons before it) cross the "
                               f"image rows {crossings:,} times; the limit is {MAX_POLYGON_CROSSINGS:,}", fix)
    return crossings


def _rasterise(mask: np.ndarray, shape_type: str, pts: np.ndarray) -> None:
    """Draw one shape into ``mask`` in place (clipped to the image)."""
    h, w = mask.shape
    if shape_type == "polygon":
        if len(pts) < 3:  # a polygon of fewer than 3 points has no area
            return
        _fill_polygon(mask, pts[:, 1], pts[:, 0])
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
        Malformed JSON, missing image size, malformed shape, a label no shape has, or a polygon
        over :data:`MAX_POLYGON_VERTICES` vertices or :data:`MAX_POLYGON_CROSSINGS` row crossings.
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
    crossings = 0
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
        pts = _points(path, i, shape)
        if shape_type == "polygon":
            crossings = _check_polygon(path, i, pts, height, crossings)
        _rasterise(mask, shape_type, pts)
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
