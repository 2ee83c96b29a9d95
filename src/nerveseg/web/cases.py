"""Cases held by the server: an uploaded file's frames, probabilities, label maps and
measurements, in a store bounded by count and bytes.

A case is made by :func:`segment_upload`, which reads the file with the same reader as
``nerveseg segment`` (``data.media.read_media``), resolves the pixel size the same way, and
measures with ``inference.measure``; only the outputs stay in memory instead of on disk.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from ..data.media import read_dicom_header, read_media
from ..errors import InputError
from ..inference.calibration import Spacing, dicom_spacing, mask_roi, resolve_spacing
from ..inference.measure import measurement_rows, postprocess
from ..inference.segment import SegmentOptions, class_probabilities, with_model_threshold
from .dicom_results import keep_header
from .images import DISPLAY_SIDE, NERVE, VESSEL, shrink, thumbnail_png

CASE_ID_PATTERN = r"^[A-Za-z0-9_-]{16,32}$"
CORRECTED = "corrected"
"""The flag of a frame whose mask was corrected by hand, in place of ``low_confidence``."""
_EIGHT = np.ones((3, 3), dtype=bool)


def new_case_id() -> str:
    """128 random bits, URL-safe: case ids are made by the server and unguessable."""
    return secrets.token_urlsafe(16)


def class_names(predictor) -> list[str]:
    return list(getattr(predictor, "class_names", None) or ["nerve"])


@dataclass
class Frame:
    image: np.ndarray  # uint8 (H, W) grey, what the page shows and the workspace saves
    prob: np.ndarray  # float16 (C, H, W) model probabilities
    labels: np.ndarray  # uint8 (H, W): 0 background, 1 nerve, 2 vessel
    predicted: np.ndarray  # uint8 (H, W): the labels as the model made them (for "reset")
    spacing: Spacing | None
    row: dict = field(default_factory=dict)
    edited: bool = False
    version: int = 0  # bumped on every change of ``labels``: what cached drawings are keyed by
    _display: np.ndarray | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        extra = self._display.nbytes if self._display is not None and self._display is not self.image else 0
        return self.image.nbytes + self.prob.nbytes + self.labels.nbytes + self.predicted.nbytes + extra

    @property
    def display(self) -> np.ndarray:
        """The grey frame shrunk for display (at most ``DISPLAY_SIDE`` on its long side; the frame
        itself when it fits), made once: overlays are drawn on it, never on the full frame."""
        if self._display is None:
            self._display = shrink(self.image, DISPLAY_SIDE)
        return self._display

    def set_labels(self, labels: np.ndarray, edited: bool) -> None:
        self.labels, self.edited = labels, edited
        self.version += 1


@dataclass
class Case:
    id: str
    name: str  # the client's file name, cleaned; shown, never used as a path
    kind: str  # image | dicom | video
    frames: list[Frame]
    classes: list[str]
    threshold: float
    postprocess: str
    min_area_px: int
    fps: float | None
    model: str
    seconds: float
    warnings: list[str] = field(default_factory=list)
    tags: dict = field(default_factory=lambda: {"subject": "", "region": "", "side": ""})
    saved: dict = field(default_factory=dict)  # frame index -> workspace stem
    created: float = field(default_factory=time.time)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    low_confidence: float = 0.7  # the model's cut for the low_confidence flag
    model_route: str = ""  # a routed model's member that drew it (one per loop); "" for any other model
    model_dir: Path | None = None  # the run folder that segmented it: what its DICOM SEG names
    # a DICOM case's header without pixels (web.dicom_results.keep_header): the upload itself is
    # deleted once segmented, and its DICOM SEG/SR reference the source by the header's UIDs
    dicom_header: Any = field(default=None, repr=False)
    dicom_header_bytes: int = 0
    dicom_note: str = ""  # why a DICOM case has no header, when it has none
    _thumbnail: tuple[int, bytes] | None = field(default=None, repr=False)  # (frame 0's version, PNG)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.frames) + self.dicom_header_bytes

    def thumbnail(self) -> bytes:
        """The list's small overlay of frame 0, drawn again only when frame 0's mask changed."""
        with self.lock:
            first = self.frames[0]
            if self._thumbnail is None or self._thumbnail[0] != first.version:
                self._thumbnail = (first.version, thumbnail_png(first.display, first.labels))
            return self._thumbnail[1]

    def frame(self, index: int) -> Frame:
        if not 0 <= index < len(self.frames):
            raise IndexError(index)
        return self.frames[index]

    def class_index(self, name: str) -> int | None:
        return self.classes.index(name) if name in self.classes else None

    def nerve_prob(self, frame: Frame) -> np.ndarray:
        return frame.prob[self.class_index("nerve") or 0].astype(np.float32)

    def measurement(self, index: int, spacing: Spacing | None) -> dict:
        """The measurement row of one frame's current labels at ``spacing``; changes nothing.

        Measured on the nerve's bounding box with a one-pixel margin (the frame's edge where it
        touches it), which gives the same row as the whole frame (areas, perimeters, shape,
        components, confidence and ``touches_border`` do not see the empty rest; the centroid
        is moved back), at a cost that follows the nerve, not the frame: the library's
        measurement takes about 20 bytes per pixel, 0.8 GB on a 40-million-pixel frame."""
        frame = self.frames[index]
        nerve = frame.labels == NERVE
        box = _bounding_box(nerve)
        if box is None:
            crop, prob, box = np.zeros((1, 1), bool), None, (0, 1, 0, 1)
        else:
            r0, r1, c0, c1 = box
            crop = nerve[r0:r1, c0:c1]
            prob = frame.prob[self.class_index("nerve") or 0][r0:r1, c0:c1]
        del nerve
        row = measurement_rows(self.name, index, crop, prob, spacing, low_confidence=self.low_confidence)[0]
        if row["area_px"]:
            rows, cols = np.nonzero(crop)
            row["centroid_row"] = round(float(rows.mean()) + box[0], 2)
            row["centroid_col"] = round(float(cols.mean()) + box[2], 2)
        vessels = int(np.count_nonzero(frame.labels == VESSEL))
        row["vessel_area_px"] = vessels if self.class_index("vessel") is not None or vessels else None
        if frame.edited:
            # low_confidence judges the model's mask; a mask the clinician corrected is theirs, so it
            # says "corrected" instead (confidence stays: the model's mean probability inside it)
            flags = [f for f in row["qc_flags"].split(";") if f and f != "low_confidence"]
            row["qc_flags"] = ";".join(flags + [CORRECTED])
        return row

    def measure(self, index: int) -> dict:
        """(Re-)measure one frame from its current labels; returns the measurement row."""
        frame = self.frames[index]
        frame.row = self.measurement(index, frame.spacing)
        return frame.row

    def set_spacing(self, spacing: Spacing) -> None:
        """Calibrate every frame: all frames are measured first and the case changes only when
        every measurement succeeded, so a failure never leaves it half calibrated (a spacing
        on some frames, rows of the old one, and reset/keep failing on the rest)."""
        with self.lock:
            rows = [self.measurement(i, spacing) for i in range(len(self.frames))]
            for frame, row in zip(self.frames, rows):
                frame.spacing, frame.row = spacing, row


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(row0, row1, col0, col1) of the mask's foreground grown by one pixel within the frame,
    or None when it is empty."""
    rows, cols = mask.any(axis=1), mask.any(axis=0)
    if not rows.any():
        return None
    h, w = mask.shape
    r0, r1 = int(np.argmax(rows)), h - int(np.argmax(rows[::-1]))
    c0, c1 = int(np.argmax(cols)), w - int(np.argmax(cols[::-1]))
    return max(0, r0 - 1), min(h, r1 + 1), max(0, c0 - 1), min(w, c1 + 1)


def _labels(prob: np.ndarray, classes: list[str], options: SegmentOptions) -> np.ndarray:
    nerve_i = classes.index("nerve") if "nerve" in classes else 0
    nerve = postprocess(prob[nerve_i] >= options.threshold, options.postprocess, options.min_area_px)
    labels = np.zeros(nerve.shape, np.uint8)
    if "vessel" in classes:
        labels[prob[classes.index("vessel")] >= options.threshold] = VESSEL
    labels[nerve] = NERVE
    return labels


def segment_upload(
    path: Path,
    name: str,
    predictor,
    options: SegmentOptions,
    *,
    kind_group: str,
    model_label: str,
    max_frames: int,
    max_bytes: int,
    max_pixels: int | None = None,
    case_id: str | None = None,
    model_dir: Path | None = None,
) -> Case:
    """Segment every frame of an uploaded file into a :class:`Case` held in memory.

    Errors are InputErrors named by the client's file name (never the server's path). A cine
    loop over ``max_frames`` frames, or whose arrays would pass ``max_bytes``, is refused as
    soon as that is known, before the rest is decoded; a frame over ``max_pixels`` is refused
    with :class:`TooManyPixels` from the file's header, before anything is decoded.
    """
    t0 = time.perf_counter()
    warnings: list[str] = []
    options = with_model_threshold(options, predictor)

    def rename(exc: InputError) -> InputError:  # the client's name, never the server's temporary path
        def scrub(text: str) -> str:
            return text.replace(str(path), name).replace(str(path.parent), "(upload)")

        return type(exc)(name, scrub(exc.problem), scrub(exc.fix))  # the class decides the status (TooManyPixels: 413)

    try:
        if max_pixels is not None:
            check_pixels(header_size(path, kind_group), max_pixels, name)
        # the container's frame count is checked before any frame is decoded: a 28 KB loop of 1,001
        # tiny frames would otherwise cost minutes of segmenting before the count was passed
        media = read_media(path, max_frames=max_frames,
                           frames_fix="split the cine loop, or start the server with a higher --max-frames")
        if max_pixels is not None and media.kind == "video":
            check_pixels((media.meta.get("width") or 0, media.meta.get("height") or 0), max_pixels, name)
        frames_iter, meta = media.frames(), media.meta
        spacing = resolve_spacing(options.spacing, media.spacing, name, log=warnings.append)
        header = None
        if spacing is None and meta.get("spacing_problem"):
            header = read_dicom_header(path)
            warnings.append(f"{name}: {meta['spacing_problem']}; each frame uses the region its nerve lies in")
        classes = class_names(predictor)
        frames: list[Frame] = []
        previous = None
        used = 0
        chunk: list[np.ndarray] = []

        route = None

        def flush() -> None:
            nonlocal previous, route
            if route is None and hasattr(predictor, "choose_route"):
                # a file is one scan of one anatomy: a routed model's member is chosen on its first frames and kept
                # (chosen here, not read back from the shared predictor, which other requests use at the same time)
                route = predictor.choose_route(chunk, options.batch_size)
            for image, prob in zip(chunk, class_probabilities(predictor, chunk, options.batch_size, route)):
                if options.temporal_smoothing and previous is not None and previous.shape == prob.shape:
                    prob = options.temporal_smoothing * previous + (1 - options.temporal_smoothing) * prob
                previous = prob
                labels = _labels(prob, classes, options)
                frame_spacing = spacing
                if header is not None and (labels == NERVE).any():
                    try:
                        frame_spacing = dicom_spacing(header, roi=mask_roi(labels == NERVE), path=name)
                    except InputError as exc:
                        if str(exc) not in warnings:  # once per file, not once per frame of a loop
                            warnings.append(str(exc))
                frames.append(Frame(
                    image=np.round(np.clip(image, 0, 1) * 255).astype(np.uint8),
                    prob=prob.astype(np.float16), labels=labels, predicted=labels.copy(), spacing=frame_spacing,
                ))
            chunk.clear()

        for count, image in enumerate(frames_iter, start=1):
            if max_pixels is not None:  # whatever a header said, the decoded frame decides
                check_pixels((image.shape[1], image.shape[0]), max_pixels, name)
            if count > max_frames:
                raise InputError(name, f"has more than {max_frames} frames",
                                 "split the cine loop, or start the server with a higher --max-frames")
            used += image.size * (1 + 1 + 1 + 2 * len(classes))
            if used > max_bytes:
                raise InputError(name, f"is too large for the server's case store after {count} frames "
                                       f"({max_bytes / 2**20:.0f} MB)", "split the cine loop, or start the server with a higher --max-store-mb")
            chunk.append(image)
            if len(chunk) == options.batch_size:
                flush()
        if chunk:
            flush()
        kept, kept_bytes, kept_note = None, 0, ""
        if kind_group == "dicom":  # kept for the case's DICOM SEG/SR; the upload is deleted after this
            try:
                kept, kept_bytes, kept_note = keep_header(header if header is not None else read_dicom_header(path))
            except InputError as exc:  # the frames were read: the case stands, without DICOM results
                kept_note = f"its DICOM header could not be read again ({rename(exc).problem})"
    except InputError as exc:
        raise rename(exc) from None
    if not frames:
        raise InputError(name, "holds no frames", "check the file")
    kind = "video" if kind_group == "video" else ("dicom" if kind_group == "dicom" else "image")
    fps = meta.get("fps")
    case = Case(
        id=case_id or new_case_id(), name=name, kind=kind, frames=frames, classes=classes,
        threshold=options.threshold, postprocess=options.postprocess, min_area_px=options.min_area_px,
        fps=fps, model=model_label, seconds=0.0, warnings=warnings, low_confidence=options.low_confidence,
        model_dir=model_dir, dicom_header=kept, dicom_header_bytes=kept_bytes, dicom_note=kept_note,
        model_route="" if route is None else predictor.route_names[route],
    )
    for index in range(len(frames)):
        case.measure(index)
    case.seconds = time.perf_counter() - t0
    return case


class TooManyPixels(InputError):
    """A frame larger than the server's ``--max-megapixels`` (answered 413)."""


def header_size(path: Path, kind_group: str) -> tuple[int, int] | None:
    """(width, height) of an image's or DICOM's frames from the header alone, without decoding
    the pixels; None when the header does not say (the reader then reports the file)."""
    try:
        if kind_group == "image":
            from PIL import Image

            with Image.open(path) as img:  # lazy: reads the header only
                return img.size
        if kind_group == "dicom":
            ds = read_dicom_header(path)
            return int(getattr(ds, "Columns", 0) or 0), int(getattr(ds, "Rows", 0) or 0)
    except InputError:
        raise
    except Exception:  # unreadable header: read_media says what is wrong, in the library's words
        return None
    return None


def check_pixels(size: tuple[int, int] | None, max_pixels: int, name: str) -> None:
    if size is None:
        return
    width, height = size
    if width * height > max_pixels:
        raise TooManyPixels(name, f"has frames of {width}x{height} ({width * height / 1e6:.1f} million pixels), more "
                                  f"than this server's limit of {max_pixels / 1e6:g} million pixels per frame",
                            "export the image at the scanner's resolution, or start the server with a higher "
                            "--max-megapixels")


# ------------------------------------------------------------------------------------------------
# Corrections
# ------------------------------------------------------------------------------------------------


def keep_region(labels: np.ndarray, prob: np.ndarray, row: int, col: int, threshold: float) -> tuple[np.ndarray, str]:
    """"Click the nerve": keep one nerve region, drop the other nerve regions.

    In order: the predicted (or drawn) nerve region under the click; else the nearest nerve
    region within 5% of the image diagonal; else the most likely region near the click, i.e.
    the connected area where the probability is at least half of its peak within that radius
    (a structure the model saw but left under the threshold). Vessel labels are kept.
    Returns the new labels and what was done; InputError-free: ValueError when nothing is near.
    """
    h, w = labels.shape
    if not (0 <= row < h and 0 <= col < w):
        raise ValueError(f"the click ({col}, {row}) is outside the {w}x{h} frame")
    nerve = labels == NERVE
    comp, n = ndimage.label(nerve, structure=_EIGHT)
    radius = 0.05 * float(np.hypot(h, w))
    out = labels.copy()
    out[nerve] = 0
    del nerve
    if comp[row, col]:
        out[comp == comp[row, col]] = NERVE
        return out, "kept the nerve region under the click"
    # everything within the radius lies in this window: the distance transform (8 bytes per
    # pixel and two index planes) is computed there, not over a frame of millions of pixels
    r0, r1 = max(0, int(row - radius)), min(h, int(row + radius) + 1)
    c0, c1 = max(0, int(col - radius)), min(w, int(col + radius) + 1)
    if n and comp[r0:r1, c0:c1].any():
        window = comp[r0:r1, c0:c1]
        dist, (rr, cc) = ndimage.distance_transform_edt(window == 0, return_indices=True)
        d = float(dist[row - r0, col - c0])
        if d <= radius:
            out[comp == window[rr[row - r0, col - c0], cc[row - r0, col - c0]]] = NERVE
            return out, f"kept the nearest nerve region ({d:.0f} px from the click)"
    del comp
    yy, xx = np.mgrid[r0:r1, c0:c1]
    window = np.where((yy - row) ** 2 + (xx - col) ** 2 <= radius**2, prob[r0:r1, c0:c1], -1.0)
    peak = float(window.max())
    if peak < 0.1:
        raise ValueError("no nerve region or likely structure near the click; draw the nerve with the brush")
    pr, pc = np.unravel_index(int(np.argmax(window)), window.shape)
    candidate, _ = ndimage.label(prob >= min(threshold, peak / 2), structure=_EIGHT)
    out[candidate == candidate[r0 + pr, c0 + pc]] = NERVE
    return out, f"found a likely region (probability peak {peak:.2f}) and kept it"


# ------------------------------------------------------------------------------------------------
# Store
# ------------------------------------------------------------------------------------------------


class CaseStore:
    """Cases by id, least recently used evicted first once there are more than ``max_cases``
    or their arrays pass ``max_bytes``. Thread-safe."""

    def __init__(self, max_cases: int, max_bytes: int, on_evict: Callable[[Case], Any] | None = None):
        self.max_cases, self.max_bytes = max_cases, max_bytes
        self._cases: OrderedDict[str, Case] = OrderedDict()  # least recently used first
        self._added: dict[str, int] = {}  # case id -> upload number: the order list() gives
        self._count = itertools.count()
        self._lock = threading.Lock()
        self.evicted = 0
        self.on_evict = on_evict

    def add(self, case: Case) -> list[str]:
        if case.nbytes > self.max_bytes:
            raise InputError(case.name, f"needs {case.nbytes / 2**20:.0f} MB, more than the server's case store "
                                        f"({self.max_bytes / 2**20:.0f} MB)", "start the server with a higher --max-store-mb")
        gone = []
        with self._lock:
            self._cases[case.id] = case
            self._added.setdefault(case.id, next(self._count))
            while len(self._cases) > self.max_cases or self.nbytes > self.max_bytes:
                old_id, _ = self._cases.popitem(last=False)
                self._added.pop(old_id, None)
                gone.append(old_id)
                self.evicted += 1
        return gone

    def get(self, case_id: str) -> Case:
        with self._lock:
            case = self._cases[case_id]  # KeyError: unknown or evicted
            self._cases.move_to_end(case_id)
            return case

    def remove(self, case_id: str) -> None:
        with self._lock:
            del self._cases[case_id]
            self._added.pop(case_id, None)

    def list(self) -> list[Case]:
        """The cases in the order they were uploaded, oldest first. Not in the eviction order:
        opening a case moves it there, and the page's list would change order on a reload."""
        with self._lock:
            return sorted(self._cases.values(), key=lambda c: self._added[c.id])

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._cases.values())

    def __len__(self) -> int:
        return len(self._cases)
