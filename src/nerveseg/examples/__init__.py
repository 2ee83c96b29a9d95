"""Example ultrasound files shipped with nerveseg, for ``nerveseg demo`` and the tests.

Three usgra-seg frames (PNG), a calibrated DICOM and a 10-frame cine loop; usgra-seg dataset,
T. M. K., CC-BY 4.0 (see ATTRIBUTION.md beside this file; made by make_examples.py).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import InputError

EXAMPLE_SUFFIXES = (".png", ".dcm", ".mp4")


def examples_dir() -> Path:
    """The folder holding the example files; InputError when this install does not carry them."""
    folder = Path(str(resources.files(__package__)))
    if not example_files(folder):
        raise InputError(folder, "the example files are not in this installation", "reinstall nerveseg")
    return folder


def example_files(folder: Path | None = None) -> list[Path]:
    """The example images, DICOM and cine loop, sorted by name."""
    folder = folder or Path(str(resources.files(__package__)))
    return sorted(p for p in folder.iterdir() if p.suffix in EXAMPLE_SUFFIXES and p.is_file())
