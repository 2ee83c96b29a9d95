"""Segment images, DICOM files and cine loops: masks, overlays, measurements.

A file that cannot be read is reported and the rest go on; ``measurements.csv`` is rewritten
atomically after every file, so an interrupted batch keeps every row it finished.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..data.labelme import write_labelme
from ..data.media import DICOM_EXTENSIONS, MEDIA_EXTENSIONS, read_dicom_header, read_media
from ..errors import ConfigError, InputError
from ..io_utils import atomic_path, atomic_write_csv, atomic_write_json
from .calibration import Spacing, dicom_spacing, mask_roi, resolve_spacing, warn_once_no_calibration
from .measure import MEASUREMENT_FIELDS, POSTPROCESS_MODES, measurement_rows, postprocess
from .overlay import make_overlay, save_png
from .video import VideoWriter

SUPPORTED_EXTENSIONS = MEDIA_EXTENSIONS  # DICOM_EXTENSIONS is imported from data.media for callers


@dataclass
class SegmentOptions:
    """How to turn probabilities into masks and measurements."""

    threshold: float = 0.5
    spacing: Spacing | None = None  # from --mm-per-pixel / --spacing; wins over DICOM
    postprocess: str = "none"
    min_area_px: int = 0
    per_component: bool = False
    labelme: bool = False
    temporal_smoothing: float = 0.0  # weight of the previous frames in an exponential average
    batch_size: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.postprocess not in POSTPROCESS_MODES:
            raise ConfigError(f"unknown post-processing {self.postprocess!r}; choose from {', '.join(POSTPROCESS_MODES)}")
        if not 0 <= self.temporal_smoothing < 1:
            raise ConfigError(f"temporal smoothing must be in [0, 1), got {self.temporal_smoothing}")


@dataclass
class SegmentResult:
    rows: list[dict] = field(default_factory=list)
    problems: list[InputError] = field(default_factory=list)
    videos: list[dict] = field(default_factory=list)  # per cine loop: file, frames, fps achieved


def expand_inputs(paths: Iterable[str | Path]) -> tuple[list[Path], list[InputError]]:
    """Files as given, folders expanded to their supported files (sorted); missing paths reported."""
    files, problems = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUPPORTED_EXTENSIONS)
            if not found:
                problems.append(InputError(p, "folder holds no image, DICOM or video files",
                                           f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"))
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            problems.append(InputError(p, "no such file or folder", "check the path"))
    return files, problems


def class_columns(name: str) -> tuple[str, ...]:
    """measurements.csv columns of a class other than the nerve (e.g. vessels)."""
    return (f"{name}_area_px", f"{name}_area_mm2", f"{name}_components")


def write_measurements(path: Path, rows: Sequence[dict]) -> None:
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in MEASUREMENT_FIELDS and k != "perimeter_px"]
    atomic_write_csv(path, rows, MEASUREMENT_FIELDS + tuple(extra))


def _class_probabilities(predictor, chunk: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    if hasattr(predictor, "predict_classes_many"):
        return predictor.predict_classes_many(chunk, batch_size=batch_size)
    return [p[None] for p in predictor.predict_many(chunk, batch_size=batch_size)]


def _class_values(name: str, mask: np.ndarray, spacing: Spacing | None) -> dict:
    from scipy import ndimage

    area_px = int(mask.sum())
    _, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    area_mm2 = "" if spacing is None else round(area_px * spacing.row_mm * spacing.col_mm, 4)
    return dict(zip(class_columns(name), (area_px, area_mm2, n)))


def save_csa_plot(rows: Sequence[dict], path: Path, title: str) -> None:
    """Cross-sectional area over the frames of a cine loop (mm² when calibrated, else px)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calibrated = all(r["area_mm2"] != "" for r in rows)
    key, unit = ("area_mm2", "mm²") if calibrated else ("area_px", "pixels")
    frames = [int(r["frame"]) for r in rows]
    values = [float(r[key]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3), dpi=120)
    ax.plot(frames, values, lw=1.5)
    ax.set_xlabel("frame")
    ax.set_ylabel(f"nerve CSA ({unit})")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _chunks(frames: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    chunk: list[np.ndarray] = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def segment_file(path: Path, stem: str, predictor, out: Path, options: SegmentOptions, log) -> tuple[list[dict], dict | None]:
    """Segment every frame of one input; returns its measurement rows and, for cine loops, stats."""
    media = read_media(path)
    frames, meta = media.frames(), media.meta
    spacing = resolve_spacing(options.spacing, media.spacing, path, log)
    header = None
    if spacing is None and meta.get("spacing_problem"):
        header = read_dicom_header(path)  # regions disagree: choose the region around each mask
        log(f"warning: {path}: {meta['spacing_problem']}")
    elif spacing is None:
        warn_once_no_calibration(log)
    multi = meta["n_frames"] != 1
    rows: list[dict] = []
    writer = None
    previous = None
    t0 = time.perf_counter()
    index = 0
    video_tmp = None
    other_names = list(getattr(predictor, "class_names", ["nerve"]))[1:]
    try:
        for chunk in _chunks(frames, options.batch_size):
            for image, probs in zip(chunk, _class_probabilities(predictor, chunk, options.batch_size)):
                if options.temporal_smoothing and previous is not None and previous.shape == probs.shape:
                    probs = options.temporal_smoothing * previous + (1 - options.temporal_smoothing) * probs
                previous = probs
                prob = probs[0]
                mask = postprocess(prob >= options.threshold, options.postprocess, options.min_area_px)
                others = [p >= options.threshold for p in probs[1:]]
                frame_spacing = spacing
                if header is not None and mask.any():
                    try:
                        frame_spacing = dicom_spacing(header, roi=mask_roi(mask), path=path)
                    except InputError as exc:
                        log(f"warning: {exc}")
                frame_rows = measurement_rows(str(path), index, mask, prob, frame_spacing, options.per_component)
                for name, other in zip(other_names, others):
                    values = _class_values(name, other, frame_spacing)
                    for row in frame_rows:
                        row.update(values)
                rows.extend(frame_rows)
                overlay = make_overlay(image, mask, others=others)
                if multi:
                    save_png((mask * 255).astype(np.uint8), out / f"{stem}_masks" / f"frame_{index:05d}.png")
                    for name, other in zip(other_names, others):
                        save_png((other * 255).astype(np.uint8), out / f"{stem}_{name}_masks" / f"frame_{index:05d}.png")
                    if writer is None:
                        video_tmp = out / f".{stem}_overlay.partial.mp4"
                        writer = VideoWriter(video_tmp, fps=meta.get("fps") or 25.0)
                    writer.write(overlay)
                else:
                    save_png((mask * 255).astype(np.uint8), out / f"{stem}_mask.png")
                    for name, other in zip(other_names, others):
                        save_png((other * 255).astype(np.uint8), out / f"{stem}_{name}_mask.png")
                    save_png(overlay, out / f"{stem}_overlay.png")
                    if options.labelme:
                        write_labelme(out / f"{stem}.json", mask, image_path=str(path.resolve()), label="nerve")
                index += 1
    finally:
        if writer is not None:
            writer.close()
            video_tmp.replace(out / f"{stem}_overlay.mp4")  # only a finished video takes the final name
    if index == 0:
        raise InputError(path, "holds no frames", "check the file")
    elapsed = time.perf_counter() - t0
    stats = None
    if multi:
        whole = [r for r in rows if r["component"] == ""] or rows
        save_csa_plot(whole, out / f"{stem}_csa.png", f"{path.name}: nerve CSA per frame")
        stats = {"file": str(path), "frames": index, "seconds": round(elapsed, 3), "fps": round(index / elapsed, 2),
                 "source_fps": meta.get("fps"), "temporal_smoothing": options.temporal_smoothing}
    return rows, stats


def segment_files(
    paths: Iterable[str | Path],
    predictor,
    out_dir: str | Path,
    options: SegmentOptions | None = None,
    log=print,
) -> SegmentResult:
    """Write per input ``<stem>_mask.png`` + ``<stem>_overlay.png`` (+ ``<stem>.json`` LabelMe), or for
    cine loops ``<stem>_masks/frame_NNNNN.png``, ``<stem>_overlay.mp4`` and ``<stem>_csa.png``; and
    ``measurements.csv`` (one row per image or frame, or per component) and ``videos.json``."""
    options = options or SegmentOptions()
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
            rows, stats = segment_file(path, stem, predictor, out, options, log)
        except InputError as exc:
            result.problems.append(exc)
            log(f"error: {exc}")
            continue
        result.rows.extend(rows)
        if stats:
            result.videos.append(stats)
            atomic_write_json(out / "videos.json", result.videos)
            log(f"{path.name}: {stats['frames']} frames at {stats['fps']:.1f} frames/s")
        write_measurements(out / "measurements.csv", result.rows)
    if not result.rows:
        write_measurements(out / "measurements.csv", [])
    return result
