"""A case's results into the clinical record: the DICOM SEG and SR of ``GET /api/cases/{id}/dicom.zip``.

The documents are made by the library functions ``nerveseg segment --dicom-out`` uses
(``clinical.dicom_out.build_seg`` / ``build_sr``), from the case's *current* masks (the
clinician's corrections included) and measurement rows, on the uploaded source's header. The
server deletes its temporary upload once the file is segmented, so a DICOM case keeps its header
instead (:func:`keep_header`: no pixels, no private or bulk attributes, at most
:data:`MAX_KEPT_HEADER_BYTES`), counted in the case store's bytes.

Both documents are answered together, in one zip, because they refer to each other: the SR's
measurements reference the SEG's SOP Instance UID, which is new each time a SEG is made, so a
SEG and an SR fetched by two requests would not match.

Refusals are :class:`DicomOutRefused` (answered with the server's ``{detail, code}`` body): a case
that is not DICOM (409 ``not_dicom``: there is no study to attach results to), a DICOM whose header
was not kept (409 ``no_dicom_header``), a DICOM without the UIDs that attach results to its study
(422 ``missing_uids``), a model that cannot be identified (422 ``model_unknown``). An uncalibrated
image is no refusal: its SR holds no mm² or mm (nerveseg never guesses a scale), and the answer's
``X-Nerveseg-Notes`` header and the zip's ``notes.txt`` say so.
"""

from __future__ import annotations

import io
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from .images import NERVE, VESSEL

if TYPE_CHECKING:  # pragma: no cover
    from .cases import Case

MAX_KEPT_HEADER_BYTES = 1 << 20
"""Largest DICOM header a case keeps (after :func:`keep_header`'s pruning). A scanner's header is
a few KB; a larger one is refused at download time with a message, never kept unbounded."""

_MAX_ELEMENT_BYTES = 64 << 10
"""An attribute longer than this (an embedded document, a thumbnail, a waveform) is dropped:
no SEG or SR copies such a thing from its source."""

# (group, element) of bulk data no SEG or SR needs from its source: Icon Image Sequence, Waveform
# Sequence, Encapsulated Document, Original Attributes Sequence (an audit trail of any size)
_BULKY = {(0x0088, 0x0200), (0x5400, 0x0100), (0x0042, 0x0011), (0x0400, 0x0561)}


class DicomOutRefused(Exception):
    """A case whose DICOM SEG/SR cannot be made: answered ``status`` with ``{detail, code}``."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


# ------------------------------------------------------------------------------------------------
# The header a DICOM case keeps


def _value_bytes(element) -> int:
    value = element.value
    if value is None:
        return 0
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return sum(len(str(v)) + 1 for v in value)
    return len(str(value))


def _prune(dataset) -> int:
    """Drop private, overlay and bulk attributes from ``dataset`` (in place, nested sequences
    too); returns the size of what is left, in bytes, about as it would be written."""
    size = 0
    for tag in list(dataset.keys()):
        if tag.is_private or (tag.group, tag.element) in _BULKY or (0x6000 <= tag.group <= 0x60FF and tag.group % 2 == 0):
            del dataset[tag]
            continue
        raw = dataset.get_item(tag)
        length = getattr(raw, "length", None)  # a raw element's length as read: no conversion needed
        if length is not None and length != 0xFFFFFFFF and length > _MAX_ELEMENT_BYTES:
            del dataset[tag]
            continue
        element = dataset[tag]
        if element.VR == "SQ":
            size += 12 + sum(8 + _prune(item) for item in element.value)
            continue
        n = _value_bytes(element)
        if n > _MAX_ELEMENT_BYTES:
            del dataset[tag]
            continue
        size += 12 + n
    return size


def keep_header(header) -> tuple[Any | None, int, str]:
    """What a DICOM case keeps of its upload's ``header`` (a pydicom dataset read without pixels,
    pruned in place): ``(dataset, bytes, "")``, or ``(None, 0, why)`` when it is larger than
    :data:`MAX_KEPT_HEADER_BYTES` even without its private and bulk attributes."""
    size = _prune(header)
    if size > MAX_KEPT_HEADER_BYTES:
        return None, 0, (f"its DICOM header is {size / 2**20:.1f} MB without private and bulk attributes, more than the "
                         f"{MAX_KEPT_HEADER_BYTES / 2**20:g} MB a case keeps, so the server did not keep it")
    return header, size, ""


# ------------------------------------------------------------------------------------------------
# The model that made the masks

_identities: dict[str, Any] = {}
_identities_lock = threading.Lock()


def _model_identity(model_dir: Path | None):
    """``clinical.dicom_out.model_identity`` of a run folder, hashed once per server: a run
    folder's weights never change (fine-tuning writes a new folder)."""
    from ..clinical.dicom_out import model_identity

    if model_dir is None:
        raise InputError(None, "the case does not say which model segmented it")
    key = str(Path(model_dir).resolve())
    with _identities_lock:
        if key not in _identities:
            _identities[key] = model_identity(key)
        return _identities[key]


# ------------------------------------------------------------------------------------------------
# The documents


@dataclass
class DicomDownload:
    data: bytes  # the zip
    filename: str
    files: list[str]
    notes: list[str] = field(default_factory=list)


def _frame_count(header) -> int:
    try:
        return max(1, int(str(header.get("NumberOfFrames", 1) or 1).strip()))
    except ValueError:
        return 1


def _serialize(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_download(case: "Case") -> DicomDownload:
    """The zip of ``<stem>_seg.dcm`` (absent when no frame has a nerve or vessel pixel: DICOM SEG
    has no empty segments) and ``<stem>_sr.dcm`` of a DICOM case, plus ``notes.txt`` when there is
    something to say (no calibration, no SEG). Raises :class:`DicomOutRefused` or InputError."""
    from ..clinical.dicom_out import SEG_SUFFIX, SR_SUFFIX, _number, attachable, build_seg, build_sr, missing_uids

    name = case.name
    if case.kind != "dicom":
        kind = "a video" if case.kind == "video" else "an image file"
        raise DicomOutRefused(409, "not_dicom", (
            f"{name} was uploaded as {kind}, not DICOM, so there is no study to attach a DICOM SEG or SR to -- upload "
            "the DICOM file exported from the scanner or PACS to get them; this case's results are its mask PNG "
            "and measurements CSV"))
    header = case.dicom_header
    if header is None:
        raise DicomOutRefused(409, "no_dicom_header", (
            f"{name}: {case.dicom_note or 'the server did not keep its DICOM header'}, so no DICOM SEG or SR can be "
            "made here -- run `nerveseg segment FILE --dicom-out` on the file itself"))
    missing = missing_uids(header)
    if missing:
        raise DicomOutRefused(422, "missing_uids", (
            f"{name} has no {', '.join(missing)}, so its results cannot be attached to its study: no DICOM SEG or SR "
            "made -- export the image from the scanner or PACS with its UIDs and upload it again (its mask PNG and "
            "measurements CSV are available meanwhile)"))
    try:
        identity = _model_identity(case.model_dir)
    except InputError as exc:  # the run folder's file by its name only: no server path in an answer
        what = f"its run folder's {exc.path.name} is missing or unreadable" if exc.path is not None else exc.problem
        raise DicomOutRefused(422, "model_unknown", (
            f"the model that segmented {name} ({case.model}) cannot be identified ({what}), and a DICOM SEG "
            "names the algorithm that made it (name and weights' hash) -- upload the file again with a model "
            "from `nerveseg train` or the shipped one")) from None

    with case.lock:  # one consistent state: labels are replaced on a change, never changed in place
        labels = [f.labels for f in case.frames]
        rows = [dict(f.row, frame=i, file=name) for i, f in enumerate(case.frames)]
        corrected = any(f.edited for f in case.frames)
    rows_n, cols_n = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
    if _frame_count(header) != len(labels) or any(lab.shape != (rows_n, cols_n) for lab in labels):
        raise InputError(name, f"its header declares {_frame_count(header)} frame(s) of {cols_n}x{rows_n}, the case "
                               f"holds {len(labels)} of {labels[0].shape[1]}x{labels[0].shape[0]}, so a SEG on the "
                               "source's grid cannot be made", "run `nerveseg segment FILE --dicom-out` on the file")
    # the SEG's classes: the nerve, and vessels where the model has them or a frame holds any
    classes = ["nerve"]
    if "vessel" in case.classes or any((lab == VESSEL).any() for lab in labels):
        classes.append("vessel")
    values = {"nerve": NERVE, "vessel": VESSEL}
    masks = np.zeros((len(labels), rows_n, cols_n, len(classes)), dtype=bool)
    for f, lab in enumerate(labels):
        for c, cls in enumerate(classes):
            masks[f, :, :, c] = lab == values[cls]

    source = attachable(header)
    seg = build_seg(source, masks, classes, identity, case.threshold, path=Path(name), corrected=corrected)
    del masks
    try:
        sr = build_sr(source, rows, seg, identity, case.threshold, nerve_class="nerve")
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom refusing something in the header
        raise InputError(name, f"a DICOM SR cannot be made for this image ({type(exc).__name__}: {exc})",
                         "report it with the file's header (dcmdump)") from exc

    stem = Path(name).stem
    files: dict[str, bytes] = {}
    if seg is not None:
        files[f"{stem}{SEG_SUFFIX}"] = _serialize(seg.dataset)
    files[f"{stem}{SR_SUFFIX}"] = _serialize(sr)
    notes = []
    if not any(_number(r.get("area_mm2")) is not None for r in rows):
        notes.append(f"{name} is not calibrated (no DICOM ultrasound region or Pixel Spacing, no pixel size set on the "
                     f"page), so {stem}{SR_SUFFIX} holds no area in mm² or perimeter in mm: circularity, flattening and "
                     "QC flags only; set the scale on the page and download again to have them")
    if seg is None:
        notes.append(f"{name}: no nerve or vessel pixel in any frame, so there is no SEG (DICOM SEG has no empty "
                     f"segments); {stem}{SR_SUFFIX} says no nerve was found")
    elif len(seg.segment_numbers) < len(classes):
        left_out = [c for c in classes if c not in seg.segment_numbers]
        notes.append(f"{name}: no {', '.join(left_out)} pixel in any frame: left out of {stem}{SEG_SUFFIX} "
                     "(DICOM SEG has no empty segments)")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for filename, data in files.items():
            archive.writestr(filename, data)
        if notes:
            archive.writestr("notes.txt", "\n".join(notes) + "\n")
    return DicomDownload(buffer.getvalue(), f"{stem}_dicom.zip", list(files), notes)
