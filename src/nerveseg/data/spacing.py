"""The pixel size a file declares: :class:`Spacing` (millimetres per pixel and where the number came
from) and the DICOM rules that read it (:func:`dicom_spacing`: the *Sequence of Ultrasound Regions*
the scanner writes, else *Pixel Spacing*, else none).

These rules sit in the data layer, next to the readers that need them (:mod:`nerveseg.data.media`
gives every DICOM file's spacing); which pixel size a measurement then uses (the user's
``--mm-per-pixel`` / ``--spacing`` or the file's, and the warning when there is none) is decided
in :mod:`nerveseg.inference.calibration`, which also re-exports every name here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nerveseg.errors import ConfigError, InputError

__all__ = [
    "MAX_MM_PER_PIXEL",
    "MIN_MM_PER_PIXEL",
    "Spacing",
    "dicom_spacing",
    "finite_float",
    "in_range",
    "mask_roi",
]

# DICOM PS3.3 C.8.5.5.1: (0018,6024) Physical Units X/Y Direction, 3 = cm.
_UNITS_CM = 3
# (0018,6014) Region Data Type: 1 = tissue; 0 = none / not applicable. Colour flow (2), Doppler
# traces, ECG etc. are not the B-mode picture a nerve is segmented in.
_TISSUE_DATA_TYPES = (0, 1)
# (0018,6012) Region Spatial Format: 1 = 2D (tissue or flow); 0 = none. M-mode (2), spectral (3)
# and waveform (4) regions have time, not length, on one axis.
_SPATIAL_2D = (0, 1)
_REL_TOL = 1e-6

MIN_MM_PER_PIXEL = 1e-6
MAX_MM_PER_PIXEL = 1e3
"""The pixel sizes a Spacing accepts, in mm. An ultrasound pixel is about 0.01-1 mm; the range
is wide on purpose and only keeps out numbers no scanner writes (a header's 1e-170 cm, a typed
1e200), whose squares overflow or vanish in the area and circularity arithmetic."""

_RANGE_TEXT = f"{MIN_MM_PER_PIXEL:g}-{MAX_MM_PER_PIXEL:g} mm (an ultrasound pixel is about 0.01-1 mm)"


def in_range(mm: float) -> bool:
    """Whether ``mm`` is a pixel size a :class:`Spacing` accepts."""
    return MIN_MM_PER_PIXEL <= mm <= MAX_MM_PER_PIXEL



# ------------------------------------------------------------------------------------------------
# Spacing
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spacing:
    """Size of one pixel in millimetres, and where that number came from.

    ``row_mm`` is the height of a pixel (the distance between two rows, DICOM's Y) and
    ``col_mm`` its width (the distance between two columns, DICOM's X). ``source`` says where
    the values came from, e.g. ``"user --mm-per-pixel"`` or
    ``"DICOM SequenceOfUltrasoundRegions[0] (PhysicalDeltaX/Y, cm)"``, so every reported
    area can be traced back to its calibration.
    """

    row_mm: float
    col_mm: float
    source: str

    def __post_init__(self) -> None:
        for name in ("row_mm", "col_mm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ConfigError(f"pixel spacing {name} must be a number, not {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"pixel spacing {name} must be a positive number of mm, not {value!r}")
            if not in_range(float(value)):
                raise ConfigError(f"pixel spacing {name} {float(value):g} mm is outside {_RANGE_TEXT}; "
                                  "give the size of one pixel in millimetres")
            object.__setattr__(self, name, float(value))

    @property
    def area_mm2_per_px(self) -> float:
        """Area of one pixel in mm² (``row_mm * col_mm``)."""
        return self.row_mm * self.col_mm

    @property
    def is_isotropic(self) -> bool:
        return math.isclose(self.row_mm, self.col_mm, rel_tol=_REL_TOL)

    @property
    def text(self) -> str:
        """``"row x col"`` in mm, e.g. ``"0.06 x 0.06"`` (the ``spacing_mm`` measurement column)."""
        return f"{self.row_mm:.6g} x {self.col_mm:.6g}"


def finite_number(value: Any) -> float | None:
    """``value`` (a DICOM element's value, a CSV cell) as a finite float, or None when absent,
    blank or not a number."""
    if value is None or str(value).strip() == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def finite_float(item: Any, keyword: str) -> float | None:
    """A DICOM element as a finite float, or None when absent, empty or not a number."""
    return finite_number(item.get(keyword))


# ------------------------------------------------------------------------------------------------
# Spacing from DICOM
# ------------------------------------------------------------------------------------------------


def mask_roi(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box ``(row0, col0, row1, col1)`` of a mask's foreground, or None when empty.

    ``row1`` and ``col1`` are exclusive (Python slice / ``regionprops.bbox`` convention), the
    ``roi`` that :func:`dicom_spacing` takes.
    """
    mask = np.asarray(mask)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _check_roi(roi: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    try:
        row0, col0, row1, col1 = (int(v) for v in roi)
    except (TypeError, ValueError):
        raise ConfigError(f"roi must be four integers (row0, col0, row1, col1), not {roi!r}") from None
    if row0 < 0 or col0 < 0 or row1 <= row0 or col1 <= col0:
        raise ConfigError(f"roi {roi!r} is empty or negative; expected row0 < row1 and col0 < col1, "
                          "row1/col1 exclusive")
    return row0, col0, row1, col1


def _int_or_none(item: Any, keyword: str) -> int | None:
    value = item.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None



@dataclass(frozen=True)
class _Region:
    index: int
    min_x: int
    min_y: int
    max_x: int
    max_y: int
    delta_x_cm: float
    delta_y_cm: float

    def contains(self, roi: tuple[int, int, int, int]) -> bool:
        row0, col0, row1, col1 = roi
        return (self.min_y <= row0 and row1 - 1 <= self.max_y
                and self.min_x <= col0 and col1 - 1 <= self.max_x)


def _calibrated_regions(ds: Any) -> list[_Region]:
    """The 2D tissue regions of SequenceOfUltrasoundRegions with a pixel size in cm."""
    regions = []
    for index, item in enumerate(ds.get("SequenceOfUltrasoundRegions") or []):
        if (_int_or_none(item, "PhysicalUnitsXDirection") != _UNITS_CM
                or _int_or_none(item, "PhysicalUnitsYDirection") != _UNITS_CM):
            continue
        data_type = _int_or_none(item, "RegionDataType")
        if data_type is not None and data_type not in _TISSUE_DATA_TYPES:
            continue
        spatial = _int_or_none(item, "RegionSpatialFormat")
        if spatial is not None and spatial not in _SPATIAL_2D:
            continue
        bounds = [_int_or_none(item, k) for k in
                  ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1")]
        dx, dy = finite_float(item, "PhysicalDeltaX"), finite_float(item, "PhysicalDeltaY")
        if any(b is None for b in bounds) or not dx or not dy:
            continue
        # The sign of a delta only says which way the axis runs; a pixel's size is its magnitude.
        regions.append(_Region(index, *bounds, abs(dx), abs(dy)))  # type: ignore[arg-type]
    return regions


def _agree(a: float, b: float) -> bool:
    return abs(a - b) <= _REL_TOL * max(abs(a), abs(b))


def dicom_spacing(
    ds: Any,
    roi: tuple[int, int, int, int] | None = None,
    path: str | Path | None = None,
) -> Spacing | None:
    """The pixel size a DICOM dataset declares for ``roi``, or None when it declares none.

    Parameters
    ----------
    ds : pydicom.Dataset
        The dataset (pixel data not needed; see :func:`read_dicom_header`).
    roi : (row0, col0, row1, col1), optional
        Bounding box of the segmented area, ``row1``/``col1`` exclusive (see :func:`mask_roi`).
        ``None`` (default) means the whole image: the area may lie in any region, so every
        calibrated region applies and they must agree.
    path : str or Path, optional
        File name for error messages (default: ``ds.filename`` when it has one).

    Returns
    -------
    Spacing or None
        In this order:

        1. *Sequence of Ultrasound Regions*: of the regions with Physical Units X and Y both
           cm (3) and Region Data Type tissue (1) or unspecified, those that contain the roi
           (RegionLocationMinX0/MinY0/MaxX1/MaxY1, inclusive). ``row_mm = PhysicalDeltaY * 10``
           and ``col_mm = PhysicalDeltaX * 10`` (the deltas are cm per pixel); ``source``
           names the region index, e.g. ``"DICOM SequenceOfUltrasoundRegions[0]
           (PhysicalDeltaX/Y, cm)"``. No such region containing the roi: go on to 2.
        2. *Pixel Spacing* (row, column in mm): ``source "DICOM PixelSpacing"``.
        3. None. *Imager Pixel Spacing* is deliberately not used: it is the size at the
           detector of a projection image, not in the patient, and means nothing in ultrasound.

    Raises
    ------
    InputError
        Several regions contain the roi and disagree on the pixel size (more than 1e-6
        relative): the image holds views of different depth, and which one the nerve is in
        is unknown. Crop to one region or pass ``--mm-per-pixel``.
    """
    if path is None:
        path = getattr(ds, "filename", None) or None
        if path is not None and not isinstance(path, (str, Path)):
            path = None
    regions = _calibrated_regions(ds)
    if roi is not None:
        roi = _check_roi(roi)
        regions = [r for r in regions if r.contains(roi)]
    if regions:
        first = regions[0]
        for other in regions[1:]:
            if not (_agree(first.delta_x_cm, other.delta_x_cm) and _agree(first.delta_y_cm, other.delta_y_cm)):
                listed = ", ".join(
                    f"[{r.index}] {r.delta_x_cm * 10:.6g} x {r.delta_y_cm * 10:.6g} mm (X x Y)" for r in regions)
                where = ("the whole image" if roi is None
                         else f"the area rows {roi[0]}-{roi[2] - 1}, columns {roi[1]}-{roi[3] - 1}")
                raise InputError(
                    path,
                    f"ultrasound regions disagree on the pixel size for {where}: {listed}",
                    fix="crop to one region or pass --mm-per-pixel",
                )
        indices = ",".join(str(r.index) for r in regions)
        row_mm, col_mm = first.delta_y_cm * 10.0, first.delta_x_cm * 10.0
        if not (in_range(row_mm) and in_range(col_mm)):
            raise InputError(
                path,
                f"SequenceOfUltrasoundRegions[{indices}] declares a pixel size of {col_mm:g} x {row_mm:g} mm "
                f"(PhysicalDeltaX/Y {first.delta_x_cm:g}/{first.delta_y_cm:g} cm), outside {_RANGE_TEXT}",
                fix="fix the file's calibration or pass --mm-per-pixel; until then areas are in pixels only",
            )
        return Spacing(
            row_mm=first.delta_y_cm * 10.0,
            col_mm=first.delta_x_cm * 10.0,
            source=f"DICOM SequenceOfUltrasoundRegions[{indices}] (PhysicalDeltaX/Y, cm)",
        )
    pixel_spacing = ds.get("PixelSpacing")
    if pixel_spacing is not None:
        try:
            row_mm, col_mm = (float(v) for v in pixel_spacing)
        except (TypeError, ValueError):
            raise InputError(path, f"PixelSpacing {pixel_spacing!r} is not two numbers",
                             "fix the header or pass --mm-per-pixel") from None
        try:
            return Spacing(row_mm=row_mm, col_mm=col_mm, source="DICOM PixelSpacing")
        except ConfigError:
            raise InputError(path, f"PixelSpacing {row_mm:g}\\{col_mm:g} mm is not a positive pixel size within "
                                   f"{_RANGE_TEXT}",
                             "fix the header or pass --mm-per-pixel; until then areas are in pixels only") from None
    return None
