"""One reader for every medium nerveseg reads: image files, DICOM files and cine loops.

:func:`read_media` opens any supported file and gives its frames (decoded lazily for video), the
pixel size the file itself declares (with where it came from) and facts about it; it is what
``segment``, ``evaluate``, ``train``, ``benchmark`` and ``serve`` all read with.
:func:`read_frame` reads the one frame a dataset sample points at (a still image, a DICOM frame
or a frame of a cine loop).

Every frame is float32 (H, W) grey in [0, 1], whatever the format: image files as
:func:`nerveseg.data.io.read_image` reads them, DICOM as :func:`read_dicom` describes, video as
the luminance of the decoded RGB. Every problem is an :class:`~nerveseg.errors.InputError` naming
the file and saying what to do.

DICOM decoding is pydicom's, with the pylibjpeg plugins: pylibjpeg-libjpeg for JPEG Baseline,
Extended (12-bit), Lossless and JPEG-LS, pylibjpeg-openjpeg for JPEG 2000; RLE is pydicom's own.
Files without the 128-byte preamble are read when their first bytes are a DICOM data element.
The pixel size rules (ultrasound regions, Pixel Spacing) live in :mod:`nerveseg.data.spacing`.
"""

from __future__ import annotations

import contextlib
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from nerveseg.data.io import IMAGE_EXTENSIONS, LUMA_WEIGHTS, MAX_IMAGE_PIXELS, read_image
from nerveseg.data.spacing import Spacing, dicom_spacing, finite_float
from nerveseg.errors import InputError

__all__ = [
    "DICOM_EXTENSIONS",
    "MAX_DICOM_PIXELS",
    "MEDIA_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "Media",
    "is_dicom",
    "looks_like_dicom",
    "read_dicom",
    "read_dicom_header",
    "read_frame",
    "read_media",
    "read_video_frames",
    "video_frame_count",
    "video_info",
]

DICOM_EXTENSIONS: tuple[str, ...] = (".dcm", ".dicom")
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".m4v")
MEDIA_EXTENSIONS: tuple[str, ...] = IMAGE_EXTENSIONS + DICOM_EXTENSIONS + VIDEO_EXTENSIONS
"""Every file ending :func:`read_media` accepts (extension-less files are read when they are DICOM)."""

MAX_DICOM_PIXELS: int = 250_000_000
"""Largest number of pixels (frames * rows * columns) :func:`read_dicom` decodes: 1 GB as
float32. Each frame must also stay under :data:`nerveseg.data.io.MAX_IMAGE_PIXELS`."""

MAX_DICOM_DECODE_BYTES: int = 1_000_000_000
"""Largest memory :func:`read_dicom` may need for the pixels: the stored array (frames x rows x
columns x samples x bytes allocated), its float copy (4 or 8 bytes a sample) and the grey frames
(4 bytes a pixel). A small compressed file can declare a huge image; this bounds what it costs
before anything is decoded."""

MAX_DICOM_INFLATED_BYTES: int = 320_000_000
"""Largest data set a Deflated Explicit VR Little Endian file may inflate to. pydicom inflates
the whole data set in memory before parsing it, so a 300 KB file of zeros could cost gigabytes;
the size is measured by streaming the inflation first, in bounded chunks. No data set above about
300 MB could pass MAX_DICOM_DECODE_BYTES anyway (16-bit RGB, the widest pixels an ultrasound frame
has, needs 22 bytes a pixel to decode: 1 GB is 45M pixels, 272 MB stored), and pydicom holds the
inflated bytes twice while parsing, so a larger cap only lets a bomb cost more before it is refused."""


# ------------------------------------------------------------------------------------------------
# One reader
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Media:
    """An opened file: what it is, how many frames, its own pixel size, and its frames.

    ``kind`` is ``"image"``, ``"dicom"`` or ``"video"``. ``n_frames`` is 0 for a video whose
    container does not say. ``spacing`` is the file's own calibration (``spacing.source`` says
    where it came from; None for image files and video, which carry none). ``meta`` holds
    ``kind``, ``n_frames`` and ``fps`` (None when unknown), plus for DICOM ``photometric``,
    ``frame_time_ms``, ``modality`` and ``spacing_problem``, for video ``width`` and ``height``.
    """

    path: Path
    kind: str
    n_frames: int
    spacing: "Spacing | None"
    meta: dict
    _frames: Callable[[], Iterator[np.ndarray]] = field(repr=False)

    def frames(self) -> Iterator[np.ndarray]:
        """Every frame in order; a video is decoded as it is iterated (a decoding error is an
        InputError raised then, after the frames before it)."""
        return self._frames()

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` (0-based); a video is decoded up to it."""
        count = 0
        for count, image in enumerate(self.frames(), start=1):
            if count - 1 == index:
                return image
        raise _no_such_frame(self.path, index, count)


def _no_such_frame(path: Path, index: int, n_frames: int) -> InputError:
    return InputError(path, f"has {n_frames} frame(s), so there is no frame {index}",
                      "number frame masks from 0 (frame_00000.png is the first frame), as `nerveseg segment` does")


def read_media(path: str | Path, *, max_frames: int | None = None, frames_fix: str | None = None) -> Media:
    """Open an image file, DICOM file or cine loop.

    Image files and DICOM are decoded now (so a broken file is reported before anything is
    written); a video's frames are decoded while :meth:`Media.frames` is iterated.

    ``max_frames`` bounds a cine loop: one whose container holds more frames is refused now,
    before any frame is decoded (:func:`video_frame_count`), and :meth:`Media.frames` stops with
    the same InputError before decoding frame ``max_frames + 1`` when the container's count was
    wrong. ``frames_fix`` replaces the message's advice (the server names its --max-frames).

    Raises
    ------
    InputError
        Unsupported type, or what the format's reader raises (missing, empty, corrupt, too large,
        undecodable compression), or a cine loop of more than ``max_frames`` frames.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        info = video_info(path)
        if max_frames is not None:
            if info["n_frames"] > max_frames:  # the stream's own count
                raise _too_many_frames(path, max_frames, frames_fix, info["n_frames"])
            if not info["n_frames"] and video_frame_count(path, stop_after=max_frames) > max_frames:
                raise _too_many_frames(path, max_frames, frames_fix)  # packets counted up to the limit
        return Media(path, "video", info["n_frames"], None, {"kind": "video", **info},
                     lambda: read_video_frames(path, max_frames=max_frames, frames_fix=frames_fix))
    if is_dicom(path):
        frames, spacing, meta = read_dicom(path)
        fps = 1000.0 / meta["frame_time_ms"] if meta.get("frame_time_ms") else None
        meta = {"kind": "dicom", "n_frames": len(frames), "fps": fps, **meta}
        return Media(path, "dicom", len(frames), spacing, meta, lambda: iter(frames))
    if suffix in IMAGE_EXTENSIONS:
        image = read_image(path)
        return Media(path, "image", 1, None, {"kind": "image", "n_frames": 1, "fps": None}, lambda: iter([image]))
    if not path.exists():
        raise InputError(path, "file not found", "check the path and the file name")
    raise InputError(path, f"unsupported file type {suffix or '(none)'}", f"supported: {', '.join(MEDIA_EXTENSIONS)}")


def read_frame(path: str | Path, frame: int | None = None) -> tuple[np.ndarray, "Spacing | None", dict]:
    """One frame of a file, the file's own pixel size and its facts (as :class:`Media`'s ``meta``).

    ``frame`` None means a still: an image file or a single-frame DICOM (a multi-frame file is
    refused: its labelled frames need one mask each). A DICOM frame is decoded alone; a video is
    decoded up to the frame.
    """
    path = Path(path)
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        media = read_media(path)
        if frame is None:
            raise _needs_frame_masks(path, media.n_frames)
        return media.frame(frame), None, media.meta
    if is_dicom(path):
        frames, spacing, meta = _read_dicom(path, index=frame if frame is not None else None, single=frame is None)
        fps = 1000.0 / meta["frame_time_ms"] if meta.get("frame_time_ms") else None
        return frames[0], spacing, {"kind": "dicom", "fps": fps, **meta}
    media = read_media(path)
    if frame not in (None, 0):
        raise _no_such_frame(path, frame, 1)
    return next(media.frames()), media.spacing, media.meta


def _needs_frame_masks(path: Path, n_frames: int) -> InputError:
    frames = f"{n_frames} frames" if n_frames else "several frames"
    return InputError(path, f"is a cine loop ({frames}) but its mask is one file",
                      f"put one mask per labelled frame in masks/{path.stem}/frame_NNNNN.png (frame 0 is the first)")


# ------------------------------------------------------------------------------------------------
# Recognising DICOM
# ------------------------------------------------------------------------------------------------

# Value representations (PS3.5 6.2): an explicit-VR data set has one of these after the first tag.
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
# Groups a data set without the Part 10 header begins with: file meta (0002), DICOMDIR (0004),
# identification (0008); each may open with its group length (gggg,0000).
_FIRST_GROUPS = (0x0002, 0x0004, 0x0008)


def looks_like_dicom(head: bytes) -> bool:
    """True when ``head`` (a file's first bytes, at least 132 for the Part 10 check) is DICOM:
    "DICM" after a 128-byte preamble, or a data set written without the preamble, i.e. one
    whose first element has a group of 0002/0004/0008 (little or big endian) followed by an
    explicit VR or a short implicit length."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    for order in "<>":
        group, element = struct.unpack(order + "HH", head[:4])
        if group not in _FIRST_GROUPS or element > 0x1FFF:
            continue
        if head[4:6] in _VRS:
            return True
        (length,) = struct.unpack(order + "I", head[4:8])
        if order == "<" and 0 < length < 1024:  # implicit VR is little endian only
            return True
    return False


def is_dicom(path: str | Path) -> bool:
    """A file is DICOM by its ending (.dcm, .dicom) or, without an ending (PACS exports), by
    its first bytes (:func:`looks_like_dicom`)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as f:
            return looks_like_dicom(f.read(132))
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------------


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "DICOM file not found", "check the path and the file name")
    if not path.is_file():
        raise InputError(path, "is not a file (expected a DICOM file)", "give the path of a file")
    if path.stat().st_size == 0:
        raise InputError(path, "is empty (zero-size file)", "copy the file again; it was not written completely")


def _deflated_size_within(path: Path, limit: int) -> bool:
    """For a Deflated transfer syntax file: whether its data set inflates to at most ``limit``
    bytes (True for any other file). Streams the inflation in 1 MB steps, holding at most that."""
    import zlib

    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    try:
        with open(path, "rb") as f:
            if read_preamble(f, force=True) is None:
                return True  # no preamble, no file meta: not a Deflated file
            meta = _read_file_meta_info(f)
            if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
                return True
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            total = 0
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    return True
                data = inflater.decompress(chunk, 1 << 20)
                total += len(data)
                # inflate what is left of this chunk, 1 MB at a time. At the end of the stream zlib may
                # leave a trailing byte in unconsumed_tail for ever: stop at eof or when nothing comes out
                while inflater.unconsumed_tail and not inflater.eof and data:
                    data = inflater.decompress(inflater.unconsumed_tail, 1 << 20)
                    total += len(data)
                    if total > limit:
                        return False
                if total > limit:
                    return False
                if inflater.eof:
                    return True
    except zlib.error:
        return True  # pydicom reports the corrupt stream itself
    except Exception:  # a damaged file meta: pydicom's own reading reports it
        return True


def _dcmread(path: Path, stop_before_pixels: bool) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    _check_file(path)
    if not _deflated_size_within(path, MAX_DICOM_INFLATED_BYTES):
        raise InputError(path, f"is a deflated DICOM whose data set inflates to more than {MAX_DICOM_INFLATED_BYTES:,} bytes",
                         "export the image uncompressed or with fewer frames")
    try:
        try:
            return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError as e:
            with open(path, "rb") as f:
                head = f.read(132)
            if not looks_like_dicom(head):
                raise InputError(path, "is not a DICOM file (no DICM marker after the 128-byte preamble)",
                                 "give a DICOM file, or an image file (PNG, JPEG, TIFF, BMP)") from e
            # A data set written without the preamble (and often without file meta): PACS
            # exports and older scanners write these; pydicom reads them when forced.
            return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    except InputError:
        raise
    except MemoryError:
        raise _out_of_memory(path) from None
    except Exception as e:  # truncated or corrupt: EOFError, struct.error, ValueError, ...
        raise InputError(path, f"is a corrupt or truncated DICOM file ({type(e).__name__}: {e})",
                         "copy or export the file again") from e


def _out_of_memory(path: Path) -> InputError:
    return InputError(path, "needs more memory to read than this machine has free",
                      "export the image with fewer frames or a smaller size")


def read_dicom_header(path: str | Path) -> Any:
    """The DICOM dataset without its pixel data (cheap), for
    :func:`~nerveseg.data.spacing.dicom_spacing` with a roi.

    Raises InputError for a missing, non-DICOM or corrupt file.
    """
    return _dcmread(Path(path), stop_before_pixels=True)


def _pip_names(requirement: str) -> str:
    """``"pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"`` -> ``"pylibjpeg pylibjpeg-libjpeg"``."""
    _, _, needs = requirement.partition("requires")
    names = [re.split(r"[<>=!~ ]", part.strip(), maxsplit=1)[0] for part in needs.split(" and ")]
    return " ".join(n for n in names if n and n != "numpy")


def _decoder_missing(path: Path, tsyntax: Any, missing: list[str]) -> InputError:
    options = [_pip_names(m) for m in missing]
    options = [o for o in options if o]
    preferred = [o for o in options if o.startswith("pylibjpeg")] + [o for o in options if o == "pillow"]
    suggestion = preferred[0] if preferred else (options[0] if options else "pylibjpeg pylibjpeg-libjpeg")
    every = "; ".join(missing) if missing else "a pydicom decoder plugin"
    return InputError(
        path,
        f"pixel data is compressed with {tsyntax.name} ({tsyntax}), and no installed decoder can read it",
        f"pip install {suggestion} (any one of: {every}), or export the file uncompressed",
    )


def _transfer_syntax(path: Path, ds: Any) -> Any:
    """The Transfer Syntax UID; for a file whose meta lacks one (no preamble, no file meta) the
    uncompressed syntax pydicom read the data set in, which is then the pixel data's too."""
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    file_meta = getattr(ds, "file_meta", None)
    tsyntax = UID(str(file_meta.get("TransferSyntaxUID", "") if file_meta is not None else ""))
    if tsyntax:
        return tsyntax
    element = ds.data_element("PixelData") if "PixelData" in ds else None
    encoding = getattr(ds, "original_encoding", (None, None))
    if element is not None and not element.is_undefined_length and None not in encoding:
        implicit, little = encoding
        tsyntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.file_meta.TransferSyntaxUID = tsyntax
        return tsyntax
    raise InputError(path, "has no Transfer Syntax UID in its file meta information",
                     "re-save the file with a DICOM tool (e.g. dcmconv, gdcmconv)")


def _repair_sequential_sos(ds: Any) -> bool:
    """Set Ss=0, Se=63, Ah=Al=0 in the scan headers of sequential (baseline/extended) JPEG frames
    whose encoder wrote other values; True when something was changed.

    Those fields mean nothing in sequential JPEG, and IJG libjpeg (dcmtk, GDCM) warns ("Invalid
    SOS parameters for sequential JPEG") and decodes; libjpeg (pylibjpeg) refuses. Scanners write
    such files (NEMA's NM1_JPLY, pydicom's JPEG-lossy.dcm). The patch keeps every length, so the
    encapsulation is rewritten byte for byte.
    """
    raw = bytearray(ds.PixelData)
    changed = False
    offset = 0
    while offset + 8 <= len(raw) and raw[offset:offset + 4] == b"\xfe\xff\x00\xe0":  # items
        length = int.from_bytes(raw[offset + 4:offset + 8], "little")
        start, end = offset + 8, offset + 8 + length
        offset = end
        if raw[start:start + 2] != b"\xff\xd8":  # not the start of a frame (offset table, continuation)
            continue
        i, sequential = start + 2, False
        while i + 4 <= end and raw[i] == 0xFF:
            marker, size = raw[i + 1], int.from_bytes(raw[i + 2:i + 4], "big")
            if marker in (0xC0, 0xC1):
                sequential = True
            elif marker == 0xDA:
                if sequential:
                    p = i + 5 + 2 * raw[i + 4]
                    if p + 3 <= end and bytes(raw[p:p + 3]) != b"\x00\x3f\x00":
                        raw[p:p + 3] = b"\x00\x3f\x00"
                        changed = True
                break
            i += 2 + size
    if changed:
        ds.PixelData = bytes(raw)
    return changed


def _decode(path: Path, ds: Any, index: int | None = None) -> tuple[np.ndarray, dict]:
    """Pixel data as pydicom returns it (all frames, or frame ``index``), plus the pixel
    properties that describe that array.

    ``Decoder.as_array`` is what ``Dataset.pixel_array`` runs (same defaults), but it also says
    which photometric interpretation the returned array has. That matters for YCbCr: pydicom 3
    converts YBR_FULL and YBR_FULL_422 to RGB by default (compressed or not), and a JPEG
    plugin may already have done so; converting again would shift every colour.
    """
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit

    tsyntax = _transfer_syntax(path, ds)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise InputError(
            path,
            f"pixel data uses {tsyntax.name} ({tsyntax}), which pydicom cannot decode (e.g. an MPEG/H.264 cine loop)",
            "export the frames uncompressed or as PNG images from the scanner or PACS",
        ) from None
    if not decoder.is_available:
        raise _decoder_missing(path, tsyntax, list(decoder.missing_dependencies))
    try:
        try:
            # allow_excess_frames=False: pixel data holding more frames than the header declares is
            # cut to the declared ones (pydicom keeps the excess by default, which the limits above
            # would not have counted)
            arr, props = decoder.as_array(ds, index=index, allow_excess_frames=False)
        except MemoryError:
            raise
        except Exception:
            if tsyntax not in (JPEGBaseline8Bit, JPEGExtended12Bit) or not _repair_sequential_sos(ds):
                raise
            arr, props = decoder.as_array(ds, index=index, allow_excess_frames=False)
    except MemoryError:
        raise
    except Exception as e:
        raise InputError(path, f"pixel data cannot be decoded ({tsyntax.name}: {type(e).__name__}: {e})",
                         "copy or export the file again, or export it uncompressed") from e
    return arr, dict(props)


def _frames_axis(arr: np.ndarray, samples: int) -> np.ndarray:
    """Give every array a leading frame axis: (N, H, W) or (N, H, W, samples)."""
    single = 2 if samples == 1 else 3
    if arr.ndim == single:
        return arr[np.newaxis]
    return arr


def _unit_scale(path: Path, arr: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Stored values -> float32 in [0, 1] by the full range of ``bits`` (signed: shifted by its min)."""
    if arr.dtype.kind == "f":
        raise InputError(path, "holds floating-point pixel data, which has no fixed grey range",
                         "export the image as 8- or 16-bit integer pixel data")
    bits = max(1, min(int(bits), 32))
    out = arr.astype(np.float64 if bits > 24 else np.float32)
    if signed:
        out += 2.0 ** (bits - 1)
    out /= 2.0 ** bits - 1.0
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)


def _positive_float(ds: Any, keyword: str) -> float | None:
    number = finite_float(ds, keyword)
    return number if number is not None and number > 0 else None


def _frame_time_ms(ds: Any) -> float | None:
    """Time between frames in ms: FrameTime, else from CineRate or RecommendedDisplayFrameRate."""
    frame_time = _positive_float(ds, "FrameTime")
    if frame_time is not None:
        return frame_time
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = _positive_float(ds, keyword)
        if rate is not None:
            return 1000.0 / rate
    return None


def _declared_frames(path: Path, ds: Any) -> int:
    value = ds.get("NumberOfFrames")
    if value is None or str(value).strip() == "":
        return 1
    try:
        n = int(str(value).strip())
    except ValueError:
        raise InputError(path, f"Number of Frames '{value}' is not a whole number",
                         "fix the header (e.g. with dcmodify) or export the file again") from None
    if n < 1:
        raise InputError(path, f"Number of Frames is {n}", "fix the header or export the file again")
    return n


def read_dicom(path: str | Path) -> tuple[np.ndarray, "Spacing | None", dict]:
    """Read the frames of a DICOM file as grey float images, with the file's pixel size.

    Parameters
    ----------
    path : str or Path
        A DICOM file (Part 10 with preamble, or a data set without it), single- or
        multi-frame, uncompressed or compressed with a transfer syntax an installed pydicom
        plugin decodes.

    Returns
    -------
    frames : np.ndarray
        float32 ``(N, H, W)`` in [0, 1]; N = 1 for a single frame. Values are divided by the
        full range of Bits Stored (8 bits: /255, 12 bits: /4095); signed data is first shifted
        by its minimum (+2^(bits-1)). MONOCHROME2 is kept, MONOCHROME1 inverted (so bright is
        always echogenic), RGB becomes ITU-R 601-2 luminance (0.299, 0.587, 0.114) as for
        image files, YBR_FULL/YBR_FULL_422 is converted to RGB first, and PALETTE COLOR is
        looked up through its palette first. Modality/VOI LUTs are not applied.
    spacing : Spacing or None
        :func:`~nerveseg.data.spacing.dicom_spacing` for the whole image. None when
        the file has no calibration, or when it has several calibrated regions that disagree;
        then ``meta["spacing_problem"]`` says so, and ``dicom_spacing(read_dicom_header(path),
        roi=mask_roi(mask))`` gives the pixel size of the region a mask lies in.
    meta : dict
        ``n_frames``, ``photometric`` (as stored in the file), ``frame_time_ms`` (FrameTime,
        else 1000 / CineRate, else 1000 / RecommendedDisplayFrameRate, else None),
        ``modality`` (e.g. "US", None when absent) and ``spacing_problem`` (None or a message).

    Raises
    ------
    InputError
        Missing, empty, non-DICOM or corrupt file; no pixel data; a compression no installed
        plugin decodes (the message names the transfer syntax and the package to install);
        an unsupported photometric interpretation; too many pixels.
    """
    return _read_dicom(Path(path))


def _read_dicom(path: Path, index: int | None = None, single: bool = False) -> tuple[np.ndarray, Any, dict]:
    """:func:`read_dicom`; ``index``: decode only that frame; ``single``: refuse a multi-frame file."""
    ds = _dcmread(path, stop_before_pixels=False)
    try:
        return _read_dataset(path, ds, index, single)
    except InputError:
        raise
    except MemoryError:  # a batch reports the file and goes on; the server answers 422, not 500
        raise _out_of_memory(path) from None
    except Exception as e:  # pydicom parses elements lazily: a damaged element fails where it is used
        raise InputError(path, f"is a corrupt DICOM file (a header element cannot be read: {type(e).__name__}: {e})",
                         "copy or export the file again") from e


def _read_dataset(path: Path, ds: Any, index: int | None, single: bool) -> tuple[np.ndarray, Any, dict]:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InputError(path, "holds no pixel data (it is not an image, e.g. a report or DICOMDIR)",
                         "give the DICOM image file")
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise InputError(path, "holds floating-point pixel data, which has no fixed grey range",
                         "export the image as 8- or 16-bit integer pixel data")
    if "Rows" not in ds or "Columns" not in ds:
        raise InputError(path, "has pixel data but no Rows/Columns, so it holds no image",
                         "give the DICOM image file")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    n_declared = _declared_frames(path, ds)
    if rows <= 0 or cols <= 0:
        raise InputError(path, f"image has zero size ({rows}x{cols})", "remove or replace the file")
    if rows * cols > MAX_IMAGE_PIXELS:
        raise InputError(path, f"frame is too large ({rows * cols:,} pixels); the limit is {MAX_IMAGE_PIXELS:,}",
                         "downsample or crop the image to the ultrasound field of view")
    if index is None and rows * cols * n_declared > MAX_DICOM_PIXELS:
        raise InputError(path, f"{n_declared} frames of {rows}x{cols} are too many pixels to load "
                               f"({rows * cols * n_declared:,}; the limit is {MAX_DICOM_PIXELS:,})",
                         "export fewer frames (e.g. split the cine loop)")
    samples_declared = max(1, int(ds.get("SamplesPerPixel", 1) or 1))
    bytes_allocated = max(1, -(-int(ds.get("BitsAllocated", 8) or 8) // 8))
    n_decoded = 1 if index is not None else n_declared
    needed = rows * cols * n_decoded * (samples_declared * (bytes_allocated + (8 if bytes_allocated > 3 else 4)) + 4)
    if needed > MAX_DICOM_DECODE_BYTES:
        raise InputError(path, f"{n_decoded} frame(s) of {rows}x{cols} with {samples_declared} sample(s) of "
                               f"{8 * bytes_allocated} bits would need about {needed / 1e9:.1f} GB to decode "
                               f"(the limit is {MAX_DICOM_DECODE_BYTES / 1e9:.1f} GB)",
                         "export fewer frames, a smaller image, or grey 8-bit pixels")
    if single and n_declared > 1:
        raise _needs_frame_masks(path, n_declared)
    if index is not None and not 0 <= index < n_declared:
        raise _no_such_frame(path, index, n_declared)

    stored_pi = str(ds.get("PhotometricInterpretation", "")).strip()
    arr, props = _decode(path, ds, index=index)
    pi = str(props.get("photometric_interpretation", stored_pi)).strip()
    samples = int(props.get("samples_per_pixel", ds.get("SamplesPerPixel", 1)) or 1)
    bits = int(props.get("bits_stored", ds.get("BitsStored", ds.get("BitsAllocated", 8))) or 8)
    signed = int(props.get("pixel_representation", ds.get("PixelRepresentation", 0)) or 0) == 1
    arr = _frames_axis(arr, samples)

    if pi in ("YBR_FULL", "YBR_FULL_422") and samples == 3:
        from pydicom.pixels import convert_color_space

        if arr.dtype != np.uint8:
            raise InputError(path, f"{pi} pixel data with {bits} bits stored cannot be converted to RGB",
                             "export the image as RGB or grey")
        arr = convert_color_space(arr, pi, "RGB")
        pi = "RGB"

    if pi == "MONOCHROME2" and samples == 1:
        frames = _unit_scale(path, arr, bits, signed)
    elif pi == "MONOCHROME1" and samples == 1:
        frames = 1.0 - _unit_scale(path, arr, bits, signed)
    elif pi == "RGB" and samples == 3:
        frames = _unit_scale(path, arr, bits, signed) @ LUMA_WEIGHTS
    elif pi == "PALETTE COLOR" and samples == 1:
        from pydicom.pixels import apply_color_lut

        try:
            rgb = apply_color_lut(arr, ds)
        except MemoryError:
            raise
        except Exception as e:
            raise InputError(path, f"its palette colour lookup table cannot be applied ({e})",
                             "export the image as RGB or grey") from e
        lut_bits = 16
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        if descriptor is not None and len(descriptor) == 3 and int(descriptor[2]) in (8, 16):
            lut_bits = int(descriptor[2])
        if rgb.size and int(rgb.max()) > 2 ** lut_bits - 1:  # 8-bit descriptor, 16-bit entries
            lut_bits = 16
        frames = _unit_scale(path, rgb[..., :3], lut_bits, False) @ LUMA_WEIGHTS
    else:
        raise InputError(path, f"unsupported photometric interpretation '{pi}' with {samples} sample(s) per pixel",
                         "export the image as MONOCHROME2 grey or RGB")

    spacing_problem = None
    try:
        spacing = dicom_spacing(ds, path=path)
    except InputError as e:
        spacing, spacing_problem = None, e.problem
    meta = {
        "n_frames": int(frames.shape[0]) if index is None else n_declared,
        "photometric": stored_pi,
        "frame_time_ms": _frame_time_ms(ds),
        "modality": str(ds.get("Modality", "") or "").strip() or None,
        "spacing_problem": spacing_problem,
    }
    return np.ascontiguousarray(frames, dtype=np.float32), spacing, meta


# ------------------------------------------------------------------------------------------------
# Video (PyAV: its wheel ships FFmpeg, so no system codec is needed)
# ------------------------------------------------------------------------------------------------


def _av():
    try:
        import av
    except ImportError:  # pragma: no cover - av is a dependency
        raise InputError(None, "reading video needs PyAV", "pip install av") from None
    return av


@contextlib.contextmanager
def _video_stream(path: str | Path, failure: str = "cannot open video",
                  fix: str = "check the file is a complete MP4/AVI") -> Iterator[tuple]:
    """(container, its first video stream), open for the ``with`` block. Whatever PyAV or FFmpeg
    raises on a damaged file, in the block too, becomes ``InputError(path, failure (...), fix)``;
    MemoryError outside FFmpeg's own passes through to the caller's limits."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(path, "file has no video stream", "pass an MP4/AVI cine loop or export frames as PNG")
            yield container, container.streams.video[0]
    except InputError:
        raise
    except av.error.FFmpegError as exc:  # includes av.error.MemoryError: FFmpeg's ENOMEM for a damaged header
        raise InputError(path, f"{failure} ({type(exc).__name__}: {exc})", fix) from None
    except MemoryError:
        raise
    except Exception as exc:  # PyAV also raises AttributeError, UnicodeDecodeError, ValueError ... on damaged files
        raise InputError(path, f"{failure} ({type(exc).__name__}: {exc})", fix) from None


def video_info(path: str | Path) -> dict:
    """Frame count (may be 0 when the container does not say), frame rate, size."""
    with _video_stream(path) as (_, stream):
        rate = float(stream.average_rate) if stream.average_rate else None
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            rate = None
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        n_frames = max(int(stream.frames or 0), 0)
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(path, f"video frames are too large ({width}x{height}); the limit is {MAX_IMAGE_PIXELS:,} pixels",
                         "export the cine loop at the scanner's resolution")
    return {"n_frames": n_frames, "fps": rate, "width": width, "height": height}


def _too_many_frames(path: str | Path, max_frames: int, fix: str | None, count: int | None = None) -> InputError:
    frames = f"{count:,} frames, more than {max_frames:,} frames" if count is not None else f"more than {max_frames:,} frames"
    return InputError(path, f"is a cine loop of {frames}; the limit is {max_frames:,}",
                      fix or f"split the cine loop into loops of at most {max_frames:,} frames")


def video_frame_count(path: str | Path, stop_after: int | None = None) -> int:
    """The number of frames a cine loop's container holds, without decoding any.

    The stream's own count (MP4 and MOV write it) when there is one; else the video packets
    are counted by demuxing (MKV, most AVI), which reads the file but decodes nothing --
    exact where a duration x frame rate estimate can be off by one, and cheap. ``stop_after``
    stops counting at ``stop_after + 1``: enough to know a limit is passed.
    """
    with _video_stream(path) as (container, stream):
        if int(stream.frames or 0) > 0:
            return int(stream.frames)
        count = 0
        for packet in container.demux(stream):
            if packet.size:  # the last, empty packet only flushes the decoder
                count += 1
                if stop_after is not None and count > stop_after:
                    break
        return count


def read_video_frames(path: str | Path, max_frames: int | None = None, frames_fix: str | None = None) -> Iterator[np.ndarray]:
    """Yield each frame as float32 (H, W) grey in [0, 1] (luminance of the decoded RGB).

    With ``max_frames``, an InputError instead of frame ``max_frames + 1``: raised when packet
    ``max_frames + 1`` is demuxed, before it is decoded (a packet holds one frame; decoded
    frames are counted too, for the odd container that packs two)."""
    packets = frames = 0
    with _video_stream(path, "video decoding failed", "re-export the cine loop; frames read so far are kept") as (container, stream):
        for packet in container.demux(stream):
            if packet.size:
                packets += 1
                if max_frames is not None and packets > max_frames:
                    raise _too_many_frames(path, max_frames, frames_fix)
            for frame in packet.decode():
                frames += 1
                if max_frames is not None and frames > max_frames:
                    raise _too_many_frames(path, max_frames, frames_fix)
                if frame.width * frame.height > MAX_IMAGE_PIXELS or frame.width <= 0 or frame.height <= 0:
                    raise InputError(path, f"a video frame is {frame.width}x{frame.height}; the limit is "
                                           f"{MAX_IMAGE_PIXELS:,} pixels", "export the cine loop at the scanner's resolution")
                rgb = frame.to_ndarray(format="rgb24").astype(np.float32)
                yield (rgb @ LUMA_WEIGHTS) / 255.0
