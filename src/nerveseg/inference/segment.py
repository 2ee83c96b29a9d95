"""Segment images, DICOM files and cine loops: masks, overlays, measurements.

A file that cannot be read is reported and the rest go on; so are files of an unknown type and
sub-folders inside an input folder (never silently skipped, unless ``recursive``). The measurements
table is rewritten atomically after every file (in a long batch less often, see :class:`_Table`), so
an interrupted batch keeps the rows it finished, and ``resume=True`` skips the inputs whose outputs
are complete (:func:`completed_inputs`).

Which inputs, under which names, and which job of N segments each are planned in
:mod:`.planning`; what ``resume`` keeps of an earlier run is decided in :mod:`.resume`.

Archives (``recursive=True`` or ``list_file``): every input gets a relative path -- below the folder
given (the common parent of several), or below the list's folder -- and its results are written at
the same place under the output folder, so ``ROOT/a/b/case.png`` gives ``OUT/a/b/case_mask.png``.
``shard=(i, n)`` segments only the inputs :func:`shard_of` assigns to job ``i``; each job writes
its own ``measurements.shard-i-of-n.csv`` and ``archive.collect`` joins them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..data.labelme import write_labelme
from ..data.media import read_dicom_header, read_media
from ..errors import ConfigError, InputError, OutputError
from ..io_utils import atomic_path, atomic_write_csv, atomic_write_json
from .calibration import Spacing, dicom_spacing, mask_roi, resolve_spacing, warn_once_no_calibration
from .measure import MEASUREMENT_FIELDS, POSTPROCESS_MODES, measurement_rows, postprocess
from .overlay import make_overlay, save_png
from .planning import PlannedInput, check_shard, plan_inputs, shard_file_names, shard_of
from .resume import completed_inputs, read_previous_videos, remove_own_stale_temporaries, remove_stale_temporaries
from .video import VideoWriter


@dataclass
class SegmentOptions:
    """How to turn probabilities into masks and measurements."""

    threshold: float | None = None  # None: the model's own (config.json inference.threshold)
    low_confidence: float | None = None  # the low_confidence flag's cut; None: the model's own
    spacing: Spacing | None = None  # from --mm-per-pixel / --spacing; wins over DICOM
    postprocess: str = "none"
    min_area_px: int = 0
    per_component: bool = False
    labelme: bool = False
    temporal_smoothing: float = 0.0  # weight of the previous frames in an exponential average
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.low_confidence is not None and not 0 <= self.low_confidence <= 1:
            raise ConfigError(f"low_confidence must be in [0, 1], got {self.low_confidence}")
        if self.postprocess not in POSTPROCESS_MODES:
            raise ConfigError(f"unknown post-processing {self.postprocess!r}; choose from {', '.join(POSTPROCESS_MODES)}")
        if not 0 <= self.temporal_smoothing < 1:
            raise ConfigError(f"temporal smoothing must be in [0, 1), got {self.temporal_smoothing}")


def with_model_threshold(options: SegmentOptions, predictor) -> SegmentOptions:
    """``options`` with its threshold, and the cut of its low_confidence flag, filled from the
    model (config.json ``inference``) where the user gave none."""
    if options.threshold is None:
        options = replace(options, threshold=model_threshold(predictor))
    if options.low_confidence is None:
        config = getattr(predictor, "config", None)
        options = replace(options, low_confidence=float(config.inference.low_confidence) if config is not None else 0.7)
    return options


def model_threshold(predictor) -> float:
    """The probability cut chosen with the model (config.json ``inference.threshold``; 0.5 by default)."""
    config = getattr(predictor, "config", None)
    return float(config.inference.threshold) if config is not None else 0.5


@dataclass
class SegmentResult:
    rows: list[dict] = field(default_factory=list)
    problems: list[InputError] = field(default_factory=list)
    videos: list[dict] = field(default_factory=list)  # per cine loop: file, frames, fps achieved
    skipped: list[Path] = field(default_factory=list)  # resume: inputs whose outputs were complete
    table: Path | None = None  # the measurements table this run wrote (None: no input, nothing written)
    planned: int = 0  # inputs this run (this shard) was to segment


def class_columns(name: str) -> tuple[str, ...]:
    """measurements.csv columns of a class other than the nerve (e.g. vessels)."""
    return (f"{name}_area_px", f"{name}_area_mm2", f"{name}_components")


def write_measurements(path: Path, rows: Sequence[dict]) -> None:
    """Columns: MEASUREMENT_FIELDS (``relpath`` right after ``file`` in an archive run), then the
    other classes' columns in the order they first appear."""
    fields = list(MEASUREMENT_FIELDS)
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in MEASUREMENT_FIELDS and k != "perimeter_px"]
    if "relpath" in extra:
        extra.remove("relpath")
        fields.insert(fields.index("file") + 1, "relpath")
    atomic_write_csv(path, rows, fields + extra)


class _Table:
    """The measurements table of a run, rewritten atomically as inputs finish.

    A rewrite costs time in proportion to the rows already in it, so rewriting after every
    input makes a batch of n inputs cost O(n^2) (5000 rows: ~13 ms a rewrite, ~30 s over the
    batch; 50000 inputs: an hour). So the table is rewritten after an input only when at least
    20 times the last rewrite's duration has passed since it: at most ~5% of the time goes to
    it, small batches still get it after every input, and a killed run loses the rows of the
    last fraction of a second, whose inputs --resume does again."""

    def __init__(self, path: Path):
        self.path = path
        self.written = 0  # rows on disk: the count a full-disk message reports as intact
        self._next = -math.inf

    def write(self, rows: Sequence[dict], force: bool = False) -> None:
        start = time.monotonic()
        if not force and start < self._next:
            return
        write_measurements(self.path, rows)
        end = time.monotonic()
        self._next = end + 20 * (end - start)
        self.written = len(rows)


def class_probabilities(predictor, images: list[np.ndarray], batch_size: int = 4,
                        route: int | None = None) -> list[np.ndarray]:
    """(C, H, W) float32 probabilities per image, for any predictor: ``predict_classes_many`` (or
    ``predict_classes``) when the model has them, else ``predict_many``'s nerve probability as one
    class. ``route``: a routed model's member for every image, chosen once for a whole file (one cine
    loop is one scan of one anatomy), passed in rather than read back from a predictor that concurrent
    callers share."""
    if route is not None:
        probs = predictor.predict_classes_many(images, batch_size=batch_size, route=route)
    elif hasattr(predictor, "predict_classes_many"):
        probs = predictor.predict_classes_many(images, batch_size=batch_size)
    elif hasattr(predictor, "predict_classes"):
        probs = [predictor.predict_classes(image) for image in images]
    else:
        probs = [p[None] for p in predictor.predict_many(images, batch_size=batch_size)]
    return [np.asarray(p, dtype=np.float32) for p in probs]


def _class_values(name: str, mask: np.ndarray, spacing: Spacing | None) -> dict:
    from scipy import ndimage

    area_px = int(mask.sum())
    _, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    area_mm2 = "" if spacing is None else round(area_px * spacing.row_mm * spacing.col_mm, 4)
    return dict(zip(class_columns(name), (area_px, area_mm2, n)))


def save_csa_plot(rows: Sequence[dict], path: Path, title: str) -> None:
    """Cross-sectional area over the frames of a cine loop (mm² when calibrated, else px)."""
    import matplotlib.pyplot as plt

    fig = csa_figure(rows, title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def csa_figure(rows: Sequence[dict], title: str):
    """The matplotlib figure of :func:`save_csa_plot`. The y axis starts at 0: from the data's
    minimum (matplotlib's default) a 4 % change over the loop fills the plot and looks large."""
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
    ax.set_ylim(bottom=0, top=max(max(values, default=0.0) * 1.05, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


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
    warned: set[str] = set()
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
    route = None
    try:
        for chunk in _chunks(frames, options.batch_size):
            if route is None and hasattr(predictor, "choose_route"):
                # a file is one scan of one anatomy (a loop too): a routed model's member is chosen on its first
                # frames and kept, so the CSA curve never switches models mid-loop
                route = predictor.choose_route(chunk, options.batch_size)
            chunk_probs = class_probabilities(predictor, chunk, options.batch_size, route)
            for image, probs in zip(chunk, chunk_probs):
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
                        if str(exc) not in warned:  # once per file, not once per frame of a loop
                            warned.add(str(exc))
                            log(f"warning: {exc}")
                frame_rows = measurement_rows(str(path), index, mask, prob, frame_spacing, options.per_component,
                                              low_confidence=options.low_confidence)
                for name, other in zip(other_names, others):
                    values = _class_values(name, other, frame_spacing)
                    for row in frame_rows:
                        row.update(values)
                if route is not None:  # a routed model (one model per anatomy) says which of its models drew it
                    for row in frame_rows:
                        row["model_route"] = predictor.route_names[route]
                rows.extend(frame_rows)
                overlay = make_overlay(image, mask, others=others)
                if multi:
                    save_png((mask * 255).astype(np.uint8), out / f"{stem}_masks" / f"frame_{index:05d}.png")
                    for name, other in zip(other_names, others):
                        save_png((other * 255).astype(np.uint8), out / f"{stem}_{name}_masks" / f"frame_{index:05d}.png")
                    if writer is None:  # (stem may hold folders: "a/b/loop" -> a/b/.loop_overlay.partial.mp4)
                        video_tmp = (out / stem).parent / f".{Path(stem).name}_overlay.partial.mp4"
                        video_tmp.parent.mkdir(parents=True, exist_ok=True)
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
    *,
    recursive: bool = False,
    list_file: str | Path | None = None,
    shard: tuple[int, int] = (0, 1),
    on_input: Callable[[PlannedInput, list[dict], bool], None] | None = None,
) -> SegmentResult:
    """Write per input ``<stem>_mask.png`` + ``<stem>_overlay.png`` (+ ``<stem>.json`` LabelMe), or for
    cine loops ``<stem>_masks/frame_NNNNN.png``, ``<stem>_overlay.mp4`` and ``<stem>_csa.png``; and
    ``measurements.csv`` (one row per image or frame, or per component) and ``videos.json``.

    Every input that cannot be segmented -- unreadable, missing, of an unknown type, a folder
    inside an input folder -- is in ``result.problems`` (and logged); the rest go on. When none is
    left to segment (``nothere.png``) and ``out_dir`` does not exist, nothing is created and
    ``result.table`` is None.

    ``recursive`` searches input folders and their sub-folders; ``list_file`` adds the inputs of
    a CSV (column ``path``) or text list. Either makes it an archive run (:func:`plan_inputs`):
    results mirror the inputs' relative paths below ``out_dir`` and rows get a ``relpath`` column.

    ``shard=(i, n)``: segment only the inputs :func:`shard_of` gives job ``i`` of ``n`` (every job
    is given the same inputs), writing ``measurements.shard-i-of-n.csv``, ``videos.shard-i-of-n.json``
    and ``segment.shard-i-of-n.json`` (this job's inputs and problems, for ``archive.collect``);
    a listing problem is reported by one job only (the one its path hashes to).

    ``resume``: inputs whose outputs in ``out_dir`` are complete (:func:`completed_inputs`, per
    shard) are not segmented again; their earlier rows are kept, so the final table holds the
    rows of every input, in input order. Resume with the same inputs (as given), options and shard.

    ``on_input(item, rows, resumed)`` is called once an input's files and rows are written (and
    for each input ``resume`` kept, with ``resumed=True``): ``segment --dicom-out`` writes the
    DICOM SEG and SR there (:class:`nerveseg.clinical.dicom_out.DicomResultWriter`). It reports
    its own per-input problems; a failed write stops the batch as any other."""
    options = with_model_threshold(options or SegmentOptions(), predictor)
    index, count = check_shard(shard)
    out = Path(out_dir)
    archive = recursive or list_file is not None
    items, problems = plan_inputs(paths, out, recursive=recursive, list_file=list_file, log=log)
    if not items and count == 1 and not out.exists():
        # nothing to segment (every input missing or unreadable): report it and make nothing, not an
        # empty output folder with an empty measurements.csv that looks like a finished run
        for problem in problems:
            log(f"error: {problem}")
        return SegmentResult(problems=problems, table=None, planned=0)
    out.mkdir(parents=True, exist_ok=True)
    # every job of a split plans all inputs; collect compares these to see they were given the same
    plan_digest = hashlib.sha256("\n".join(f"{it.name}\t{it.path}" for it in items).encode("utf-8")).hexdigest()
    n_all = len(items)
    if count > 1:
        problems = [p for p in problems if shard_of(str(p.path), count) == index]
        items = [it for it in items if shard_of(it.name, count) == index]
    table_name, videos_name, status_name = shard_file_names((index, count))
    if not archive and count == 1:
        status_name = None  # a plain batch writes what it always wrote; its problems are on stderr
    table = _Table(out / table_name)
    result = SegmentResult(problems=problems, table=table.path, planned=len(items))
    for problem in problems:
        log(f"error: {problem}")
    files = [it.path for it in items]
    stems = [it.name for it in items]
    class_names = list(getattr(predictor, "class_names", ["nerve"]))
    done = completed_inputs(files, stems, out, class_names, options.labelme, log, table=table.path) if resume else {}
    if resume:
        if archive or count > 1:
            removed = remove_own_stale_temporaries(out, stems, class_names, [n for n in (table_name, videos_name, status_name) if n])
        else:
            removed = remove_stale_temporaries(out)
        if removed:
            log(f"resume: removed the temporary files an interrupted run left in {out}")
    old_videos = read_previous_videos(out / videos_name) if done else {}

    def write_status(finished: bool) -> None:
        if status_name is None:
            return
        atomic_write_json(out / status_name, {
            "shard": f"{index}/{count}", "finished": finished,
            "plan": {"inputs": n_all, "sha256": plan_digest},
            "inputs": [str(it.path) for it in items],
            "problems": [{"file": "" if p.path is None else str(p.path), "error": str(p)} for p in result.problems],
        })

    with _stop_on_full_disk(out, None, result, table):
        write_status(False)
    try:
        for item, path, stem in zip(items, files, stems):
            if path in done:
                result.rows.extend(done[path])
                result.skipped.append(path)
                if str(path) in old_videos:
                    result.videos.append(old_videos[str(path)])
                if on_input is not None:
                    with _stop_on_full_disk(out, path, result, table):
                        on_input(item, done[path], True)
                continue
            try:
                with _stop_on_full_disk(out, path, result, table):
                    rows, stats = segment_file(path, stem, predictor, out, options, log)
            except InputError as exc:
                result.problems.append(exc)
                log(f"error: {exc}")
                continue
            if item.relpath is not None:
                for row in rows:
                    row["relpath"] = item.relpath
            result.rows.extend(rows)
            with _stop_on_full_disk(out, path, result, table):
                if stats:
                    result.videos.append(stats)
                    atomic_write_json(out / videos_name, result.videos)
                    played = f"; the loop plays at {stats['source_fps']:g} frames/s" if stats.get("source_fps") else ""
                    log(f"{path.name}: {stats['frames']} frames segmented in {stats['seconds']:.1f} s "
                        f"(processing rate {stats['fps']:.1f} frames/s{played})")
                table.write(result.rows)
                if on_input is not None:
                    on_input(item, rows, False)
    except KeyboardInterrupt:
        # Ctrl-C (or SIGINT from a scheduler): keep the rows of every input finished so far
        with contextlib.suppress(OSError):
            table.write(result.rows, force=True)
        raise
    with _stop_on_full_disk(out, None, result, table):
        if result.skipped:
            log(f"resume: {len(result.skipped)} input(s) already complete in {out}, not segmented again")
            if result.videos:
                atomic_write_json(out / videos_name, result.videos)
        if table.written != len(result.rows) or not result.rows or result.skipped:
            table.write(result.rows, force=True)
        write_status(True)
    return result


# a write that fails for one of these fails for every later input too: stop the batch
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def _stop_on_full_disk(out: Path, path: Path | None, result: SegmentResult, table: _Table) -> Iterator[None]:
    """Turn a failed write (full disk, quota, read-only or forbidden folder) into an OutputError
    that says what is safe: every write is atomic, so the files of the inputs finished before --
    and the measurements table as it was last written -- are intact."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        finished = len({r["file"] for r in result.rows[: table.written]})
        what = f"the results of {path}" if path is not None else table.path.name
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OutputError(
            out, f"cannot write {what} ({reason})",
            f"free space or fix permissions, then run the same command with --resume; the {finished} input(s) "
            f"finished before are intact in {table.path}",
        ) from exc
