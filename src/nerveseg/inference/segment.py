"""Segment files: masks, overlays and measurements; a bad file is reported and the rest go on."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from ..data.io import IMAGE_EXTENSIONS, read_image
from ..errors import InputError
from ..io_utils import atomic_write_text
from .overlay import make_overlay, save_png
from .predictor import Predictor

MEASUREMENT_FIELDS = ("file", "area_px", "area_mm2", "n_components")


@dataclass
class SegmentResult:
    rows: list[dict] = field(default_factory=list)
    problems: list[InputError] = field(default_factory=list)


def expand_inputs(paths: Iterable[str | Path]) -> tuple[list[Path], list[InputError]]:
    """Files as given, folders expanded to their image files (sorted); missing paths reported."""
    files, problems = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                problems.append(InputError(p, "folder holds no image files", f"supported: {', '.join(IMAGE_EXTENSIONS)}"))
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            problems.append(InputError(p, "no such file or folder", "check the path"))
    return files, problems


def measure(mask: np.ndarray, mm_per_pixel: float | None) -> dict:
    _, n_components = ndimage.label(mask, structure=np.ones((3, 3)))
    area_px = int(mask.sum())
    return {
        "area_px": area_px,
        "area_mm2": "" if mm_per_pixel is None else f"{area_px * mm_per_pixel**2:.4f}",
        "n_components": int(n_components),
    }


def write_measurements(path: Path, rows: Sequence[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MEASUREMENT_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def segment_files(
    paths: Iterable[str | Path],
    predictor: Predictor,
    out_dir: str | Path,
    mm_per_pixel: float | None = None,
    threshold: float = 0.5,
    log=print,
) -> SegmentResult:
    """Write ``<stem>_mask.png`` (0/255), ``<stem>_overlay.png`` and ``measurements.csv``.

    ``measurements.csv`` is rewritten atomically after every image, so an interrupted batch
    keeps every row it finished.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, problems = expand_inputs(paths)
    result = SegmentResult(problems=problems)
    for problem in problems:
        log(f"error: {problem}")
    used_stems: set[str] = set()
    for path in files:
        stem = path.stem
        if stem in used_stems:  # a.png and a.jpg, or two folders: never overwrite a result
            stem = next(f"{path.stem}_{i}" for i in range(2, len(files) + 2) if f"{path.stem}_{i}" not in used_stems)
        used_stems.add(stem)
        try:
            image = read_image(path)
        except InputError as exc:
            result.problems.append(exc)
            log(f"error: {exc}")
            continue
        mask = predictor.predict(image) >= threshold
        save_png((mask * 255).astype(np.uint8), out / f"{stem}_mask.png")
        save_png(make_overlay(image, mask), out / f"{stem}_overlay.png")
        result.rows.append({"file": str(path), **measure(mask, mm_per_pixel)})
        write_measurements(out / "measurements.csv", result.rows)
    if not result.rows:
        write_measurements(out / "measurements.csv", [])
    return result
