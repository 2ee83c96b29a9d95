"""Segment images, DICOM files and cine loops: masks, overlays, measurements.

A file that cannot be read is reported and the rest go on; so are files of an unknown type and
sub-folders inside an input folder (never silently skipped). ``measurements.csv`` is rewritten
atomically after every file, so an interrupted batch keeps every row it finished, and
``resume=True`` skips the inputs whose outputs are complete (:func:`completed_inputs`).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..data.labelme import write_labelme
from ..data.media import DICOM_EXTENSIONS, MEDIA_EXTENSIONS, is_dicom, read_dicom_header, read_media
from ..data.samples import _is_junk
from ..errors import ConfigError, InputError, OutputError
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
    skipped: list[Path] = field(default_factory=list)  # resume: inputs whose outputs were complete


def expand_inputs(paths: Iterable[str | Path], exclude: Iterable[str | Path] = ()) -> tuple[list[Path], list[InputError]]:
    """Files as given; folders expanded to their image, DICOM and video files (sorted, DICOM
    without an ending found by its first bytes). Missing paths, files of another type and
    sub-folders inside a folder (not searched) are reported. Hidden and system files
    (``.name``, Thumbs.db, desktop.ini) and the folders in ``exclude`` (the output folder) are
    passed over without a word."""
    excluded = {Path(e).resolve() for e in exclude}
    files, problems = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found, reported = [], 0
            for f in sorted(p.iterdir()):
                if _is_junk(f) or f.resolve() in excluded:
                    continue
                if f.is_dir():
                    problems.append(InputError(f, f"is a folder inside {p}; sub-folders are not searched, so it was not segmented",
                                               "give it as an input of its own to segment its files"))
                    reported += 1
                elif f.suffix.lower() in SUPPORTED_EXTENSIONS or (not f.suffix and is_dicom(f)):
                    found.append(f)
                else:
                    problems.append(InputError(f, f"unsupported file type '{f.suffix or '(none)'}', not segmented",
                                               f"supported: {', '.join(SUPPORTED_EXTENSIONS)} and DICOM without an ending"))
                    reported += 1
            if not found and not reported:
                problems.append(InputError(p, "folder holds no image, DICOM or video files",
                                           f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"))
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            problems.append(InputError(p, "no such file or folder", "check the path"))
    return files, problems


def assign_stems(files: Sequence[Path]) -> list[str]:
    """Output name of each input: its stem, with _2, _3, ... for a repeated stem (a.png and
    a.jpg, or two folders), so no result overwrites another. Depends only on the input order,
    so a resumed run gives every input the names it had."""
    used: set[str] = set()
    stems = []
    for path in files:
        stem = path.stem
        if stem in used:
            stem = next(f"{path.stem}_{i}" for i in range(2, len(files) + 2) if f"{path.stem}_{i}" not in used)
        used.add(stem)
        stems.append(stem)
    return stems


def read_previous_rows(path: Path, log=print) -> dict[str, list[dict]]:
    """The rows of an earlier measurements.csv by input (``file`` column), for ``resume``; an
    unreadable file counts as no rows (every input is done again), with a warning."""
    if not path.is_file():
        return {}
    try:
        with path.open("r", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        log(f"warning: {path}: cannot read the earlier measurements ({exc}); segmenting every input again")
        return {}
    by_file: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("file"):
            by_file.setdefault(row["file"], []).append(row)
    return by_file


def expected_outputs(stem: str, out: Path, frames: Sequence[int], class_names: Sequence[str], labelme: bool) -> list[Path]:
    """The files a finished input leaves in ``out``: for a still ``<stem>_mask.png``,
    ``<stem>_overlay.png`` (+ one mask per other class, + ``<stem>.json`` with LabelMe); for a
    cine loop or multi-frame DICOM (``frames`` beyond 0) ``<stem>_overlay.mp4``, ``<stem>_csa.png``
    and ``<stem>_masks/frame_NNNNN.png`` for every frame (+ the other classes' frame masks)."""
    others = list(class_names)[1:]
    if any(int(f) != 0 for f in frames):
        files = [out / f"{stem}_overlay.mp4", out / f"{stem}_csa.png"]
        for folder in [f"{stem}_masks"] + [f"{stem}_{name}_masks" for name in others]:
            files += [out / folder / f"frame_{int(i):05d}.png" for i in frames]
        return files
    files = [out / f"{stem}_mask.png", out / f"{stem}_overlay.png"] + [out / f"{stem}_{name}_mask.png" for name in others]
    return files + ([out / f"{stem}.json"] if labelme else [])


def completed_inputs(files: Sequence[Path], stems: Sequence[str], out: Path, class_names: Sequence[str],
                     labelme: bool, log=print) -> dict[Path, list[dict]]:
    """Inputs whose outputs are complete, with their earlier measurement rows.

    Complete means: ``out/measurements.csv`` holds rows for the input (its ``file`` column as
    given), and every file :func:`expected_outputs` names for those frames exists. Rows are
    written only after all of an input's files (each written atomically), so an input
    interrupted half-way has no rows and is done again; so is one whose rows remain but whose
    files were removed. A still with one frame and a one-frame loop both have frame 0 only:
    either set of outputs counts."""
    previous = read_previous_rows(out / "measurements.csv", log)
    done: dict[Path, list[dict]] = {}
    for path, stem in zip(files, stems):
        rows = previous.get(str(path))
        if not rows:
            continue
        try:
            frames = sorted({int(r.get("frame") or 0) for r in rows})
        except ValueError:
            continue
        candidates = [expected_outputs(stem, out, frames, class_names, labelme)]
        if frames == [0]:  # a loop that turned out to have one frame is written as a loop
            candidates.append([out / f"{stem}_overlay.mp4", out / f"{stem}_csa.png", out / f"{stem}_masks" / "frame_00000.png"])
        if any(all(f.is_file() for f in expected) for expected in candidates):
            done[path] = rows
    return done


# what an interrupted atomic write (io_utils.atomic_path: ".NAME.XXXXXXXX.tmp.SUFFIX") or video
# (".STEM_overlay.partial.mp4") leaves behind when the process is killed
_STALE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.\w+)?$|^\..+_overlay\.partial\.mp4$")


def remove_stale_temporaries(out: Path) -> int:
    """Delete the temporary files a killed run left in ``out`` and its frame-mask folders (never a
    file under a final name); returns how many. Only for --resume: one segment run per folder."""
    removed = 0
    for folder in [out] + [d for d in out.iterdir() if d.is_dir() and d.name.endswith("_masks")]:
        for path in folder.iterdir():
            if path.is_file() and _STALE.match(path.name):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def _previous_videos(path: Path) -> dict[str, dict]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {e["file"]: e for e in entries if isinstance(e, dict) and isinstance(e.get("file"), str)} if isinstance(entries, list) else {}


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
    finished = False
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
        finished = True
    finally:
        if writer is not None:
            if finished:
                writer.close()
                video_tmp.replace(out / f"{stem}_overlay.mp4")  # only a finished video takes the final name
            else:  # decoding failed or the disk is full: no half video under the final name
                with contextlib.suppress(Exception):
                    writer.close()
                video_tmp.unlink(missing_ok=True)
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
    resume: bool = False,
) -> SegmentResult:
    """Write per input ``<stem>_mask.png`` + ``<stem>_overlay.png`` (+ ``<stem>.json`` LabelMe), or for
    cine loops ``<stem>_masks/frame_NNNNN.png``, ``<stem>_overlay.mp4`` and ``<stem>_csa.png``; and
    ``measurements.csv`` (one row per image or frame, or per component) and ``videos.json``.

    Every input that cannot be segmented -- unreadable, missing, of an unknown type, a folder
    inside an input folder -- is in ``result.problems`` (and logged); the rest go on.

    ``resume``: inputs whose outputs in ``out_dir`` are complete (:func:`completed_inputs`) are
    not segmented again; their earlier rows are kept, so the final measurements.csv holds the
    rows of every input, in input order. Resume with the same inputs (as given) and options."""
    options = options or SegmentOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, problems = expand_inputs(paths, exclude=[out])
    result = SegmentResult(problems=problems)
    for problem in problems:
        log(f"error: {problem}")
    stems = assign_stems(files)
    class_names = list(getattr(predictor, "class_names", ["nerve"]))
    done = completed_inputs(files, stems, out, class_names, options.labelme, log) if resume else {}
    if resume and remove_stale_temporaries(out):
        log(f"resume: removed the temporary files an interrupted run left in {out}")
    old_videos = _previous_videos(out / "videos.json") if done else {}
    for path, stem in zip(files, stems):
        if path in done:
            result.rows.extend(done[path])
            result.skipped.append(path)
            if str(path) in old_videos:
                result.videos.append(old_videos[str(path)])
            continue
        try:
            with _stop_on_full_disk(out, path, result):
                rows, stats = segment_file(path, stem, predictor, out, options, log)
        except InputError as exc:
            result.problems.append(exc)
            log(f"error: {exc}")
            continue
        result.rows.extend(rows)
        with _stop_on_full_disk(out, path, result, len(rows)):
            if stats:
                result.videos.append(stats)
                atomic_write_json(out / "videos.json", result.videos)
                log(f"{path.name}: {stats['frames']} frames at {stats['fps']:.1f} frames/s")
            write_measurements(out / "measurements.csv", result.rows)
    with _stop_on_full_disk(out, None, result):
        if result.skipped:
            log(f"resume: {len(result.skipped)} input(s) already complete in {out}, not segmented again")
            if result.videos:
                atomic_write_json(out / "videos.json", result.videos)
        if not result.rows or result.skipped:
            write_measurements(out / "measurements.csv", result.rows)
    return result


# a write that fails for one of these fails for every later input too: stop the batch
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def _stop_on_full_disk(out: Path, path: Path | None, result: SegmentResult, pending: int = 0) -> Iterator[None]:
    """Turn a failed write (full disk, quota, read-only or forbidden folder) into an OutputError
    that says what is safe: every write is atomic, so the files of the inputs finished before --
    and measurements.csv as it was after the last of them -- are intact."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        finished = len({r["file"] for r in result.rows[: len(result.rows) - pending]})
        what = f"the results of {path}" if path is not None else "measurements.csv"
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OutputError(
            out, f"cannot write {what} ({reason})",
            f"free space or fix permissions, then run the same command with --resume; the {finished} input(s) "
            f"finished before are intact in {out / 'measurements.csv'}",
        ) from exc
