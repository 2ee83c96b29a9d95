"""Pixel size in millimetres: from the user, or from a DICOM file's own calibration.

A measurement in mm² is only as good as the pixel size behind it, so nothing here guesses: the
pixel size comes from the command line (``--mm-per-pixel`` / ``--spacing``), from the DICOM
*Sequence of Ultrasound Regions* (the calibration the scanner itself writes), or from DICOM
*Pixel Spacing*; otherwise there is none and areas stay in pixels (see
:func:`warn_once_no_calibration`).

Only the rules live here. Files are read in :mod:`nerveseg.data.media`; ``read_dicom``,
``read_dicom_header`` and ``MAX_DICOM_PIXELS`` are re-exported from there for existing callers.
What a file declares (:class:`Spacing`, :func:`dicom_spacing`, :func:`mask_roi`, the accepted range)
lives in :mod:`nerveseg.data.spacing`, next to the readers that need it, and is re-exported here.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

from nerveseg.data.media import MAX_DICOM_PIXELS, read_dicom, read_dicom_header
from nerveseg.data.spacing import (
    _RANGE_TEXT,
    MAX_MM_PER_PIXEL,
    MIN_MM_PER_PIXEL,
    Spacing,
    dicom_spacing,
    in_range,
    mask_roi,
)
from nerveseg.errors import ConfigError

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
