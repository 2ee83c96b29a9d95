"""Pixel size in millimetres: from the user, or from a DICOM file's own calibration.

A measurement in mm² is only as good as the pixel size behind it, so nothing here guesses: the
pixel size comes from the command line (``--mm-per-pixel`` / ``--spacing``), from the DICOM
*Sequence of Ultrasound Regions* (the calibration the scanner itself writes), or from DICOM
*Pixel Spacing*; otherwise there is none and areas stay in pixels (see
:func:`warn_once_no_calibration`).

Only the rules live here. Files are read in :mod:`nerveseg.data.media`; ``read_dicom``,
``read_dicom_header`` and ``MAX_DICOM_PIXELS`` are re-exported from there for existing callers.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nerveseg.data.media import MAX_DICOM_PIXELS, read_dicom, read_dicom_header
from nerveseg.data.media import finite_float as _float_or_none
from nerveseg.errors import ConfigError, InputError

__all__ = [
    "MAX_DICOM_PIXELS",
    "MAX_MM_PER_PIXEL",
    "MIN_MM_PER_PIXEL",
    "NO_CALIBRATION_MESSAGE",
    "Spacing",
    "dicom_spacing",
    "mask_roi",
    "read_dicom",
    "read_dicom_header",
    "resolve_spacing",
    "spacing_from_user",
    "warn_once_no_calibration",
]

NO_CALIBRATION_MESSAGE = "no calibration: areas in pixels only; pass --mm-per-pixel or use calibrated DICOM"

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


def _positive(value: Any, option: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{option} must be a number of mm, not {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{option} must be a number of mm, not {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{option} must be a positive number of mm per pixel, not {value!r}")
    if not in_range(number):
        raise ConfigError(f"{option} {number:g} is outside {_RANGE_TEXT}; give the size of one pixel in "
                          "millimetres, e.g. 0.06")
    return number


def spacing_from_user(
    mm_per_pixel: float | None = None,
    spacing: tuple[float, float] | None = None,
) -> Spacing | None:
    """The pixel size given on the command line, or None when none was given.

    Parameters
    ----------
    mm_per_pixel : float, optional
        ``--mm-per-pixel``: square pixels of this size in mm.
    spacing : (float, float), optional
        ``--spacing X Y``: pixel width then pixel height in mm, i.e. **(column, row)**, the
        order of DICOM's PhysicalDeltaX/Y and of image "width x height". Give it for
        non-square pixels.

    Raises
    ------
    ConfigError
        Both given, or a value that is not a positive, finite number.
    """
    if mm_per_pixel is not None and spacing is not None:
        raise ConfigError("give either --mm-per-pixel or --spacing, not both")
    if mm_per_pixel is not None:
        size = _positive(mm_per_pixel, "--mm-per-pixel")
        return Spacing(row_mm=size, col_mm=size, source="user --mm-per-pixel")
    if spacing is not None:
        if isinstance(spacing, (str, bytes)) or len(spacing) != 2:
            raise ConfigError(f"--spacing takes two numbers, X (column) and Y (row) in mm, not {spacing!r}")
        col_mm = _positive(spacing[0], "--spacing X")
        row_mm = _positive(spacing[1], "--spacing Y")
        return Spacing(row_mm=row_mm, col_mm=col_mm, source="user --spacing")
    return None


def resolve_spacing(
    user: Spacing | None,
    dicom: Spacing | None,
    path: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> Spacing | None:
    """The pixel size to measure with: the user's when given, else the DICOM file's, else None.

    **The user wins over DICOM**: ``--mm-per-pixel`` / ``--spacing`` is an explicit decision
    (e.g. a known-wrong vendor calibration, or a resized export). When both are known and
    differ by more than 1 %, ``log`` (stderr by default) gets a warning naming ``path`` and
    both values, so an override never goes unnoticed. None when neither is known: the
    caller reports areas in pixels (see :func:`warn_once_no_calibration`), never a guess.
    """
    if user is None:
        return dicom
    if dicom is not None and not (
        math.isclose(user.row_mm, dicom.row_mm, rel_tol=0.01)
        and math.isclose(user.col_mm, dicom.col_mm, rel_tol=0.01)
    ):
        log = log or (lambda msg: print(msg, file=sys.stderr))
        where = f"{path}: " if path is not None else ""
        log(f"warning: {where}{user.source} ({user.text} mm) overrides the file's calibration "
            f"({dicom.source}: {dicom.text} mm)")
    return user


_warned_no_calibration = False


def warn_once_no_calibration(log: Callable[[str], None] | None = None) -> bool:
    """Tell the user, once per process, that areas are in pixels only; True if it did now.

    ``log`` receives ``"warning: " + NO_CALIBRATION_MESSAGE`` (stderr by default).
    """
    global _warned_no_calibration
    if _warned_no_calibration:
        return False
    _warned_no_calibration = True
    log = log or (lambda msg: print(msg, file=sys.stderr))
    log(f"warning: {NO_CALIBRATION_MESSAGE}")
    return True


def _reset_no_calibration_warning() -> None:
    """Forget that the warning was given (for tests)."""
    global _warned_no_calibration
    _warned_no_calibration = False


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
        dx, dy = _float_or_none(item, "PhysicalDeltaX"), _float_or_none(item, "PhysicalDeltaY")
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
