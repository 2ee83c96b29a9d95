"""Uploads: the file type from its first bytes (never its name), and a body stream cut off at
the size limit while it arrives, written to a server-named temporary file."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from ..data.media import looks_like_dicom
from ..errors import InputError

SNIFF_BYTES = 132  # DICOM's "DICM" marker sits after a 128-byte preamble

SUPPORTED_TEXT = "PNG, JPEG, TIFF, BMP, DICOM (single or multi-frame), MP4, AVI, MOV, MKV"


@dataclass(frozen=True)
class Kind:
    name: str  # png, jpeg, tiff, bmp, dicom, mp4, avi, mkv
    suffix: str  # what the temporary file is called, so the readers pick the right decoder
    group: str  # image | dicom | video: which size limit applies


KINDS = {
    "png": Kind("png", ".png", "image"),
    "jpeg": Kind("jpeg", ".jpg", "image"),
    "tiff": Kind("tiff", ".tif", "image"),
    "bmp": Kind("bmp", ".bmp", "image"),
    "dicom": Kind("dicom", ".dcm", "dicom"),
    "mp4": Kind("mp4", ".mp4", "video"),
    "avi": Kind("avi", ".avi", "video"),
    "mkv": Kind("mkv", ".mkv", "video"),
}


def sniff(head: bytes) -> Kind | None:
    """The file type from its magic bytes, or None when it is none nerveseg reads.

    DICOM's marker is checked first: a DICOM preamble may itself be a TIFF header (dual-format
    files). A data set without the preamble is recognised by its first element."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return KINDS["dicom"]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return KINDS["png"]
    if head.startswith(b"\xff\xd8\xff"):
        return KINDS["jpeg"]
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return KINDS["tiff"]
    if head.startswith(b"BM") and len(head) >= 26:
        return KINDS["bmp"]
    if len(head) >= 12 and head[4:8] == b"ftyp":  # ISO base media: MP4, MOV, M4V
        return KINDS["mp4"]
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return KINDS["avi"]
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # Matroska / WebM
        return KINDS["mkv"]
    if looks_like_dicom(head):
        return KINDS["dicom"]
    return None


_SAFE = re.compile(r"[^A-Za-z0-9._ ()+-]+")


def display_name(name: str | None, fallback: str) -> str:
    """A file name for people to read: the last path part only, odd characters replaced,
    at most 100 characters. It is shown and written into CSV cells, never used as a path."""
    if not name:
        return fallback
    last = re.split(r"[\\/]", name)[-1]
    clean = _SAFE.sub("_", last).strip(" .")
    return clean[:100] or fallback


class UnsupportedMediaType(InputError):
    """The upload's bytes are no format nerveseg reads (answered 415)."""


class UploadTooLarge(Exception):
    def __init__(self, limit: int, what: str):
        self.limit, self.what = limit, what
        super().__init__(f"{what} upload is larger than the server's limit of {limit / 2**20:g} MB")


@dataclass
class Upload:
    path: Path
    kind: Kind
    size: int


async def receive_upload(
    chunks: AsyncIterator[bytes],
    name: str,
    folder: Path,
    stem: str,
    limits: dict[str, int],
    declared_length: int | None = None,
) -> Upload:
    """Write the body to ``folder/stem<suffix>`` (suffix from the content), stopping as soon as
    it passes the limit of its kind (``limits``: image, dicom, video -> bytes).

    Raises UploadTooLarge, or InputError (named ``name``) for an empty or unknown-type body.
    The partial file is removed on any error.
    """
    largest = max(limits.values())
    if declared_length is not None and declared_length > largest:
        raise UploadTooLarge(largest, "the")
    head = b""
    fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=folder)
    size = 0
    kind = None
    limit = largest
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in chunks:
                if not chunk:
                    continue
                if kind is None:
                    head += chunk[: SNIFF_BYTES - len(head)]
                    if len(head) >= SNIFF_BYTES:
                        kind = _kind_or_raise(head, name)
                        limit = limits[kind.group]
                        if declared_length is not None and declared_length > limit:
                            raise UploadTooLarge(limit, f"{kind.name.upper()}")
                size += len(chunk)
                if size > limit:
                    raise UploadTooLarge(limit, kind.name.upper() if kind else "the")
                f.write(chunk)
        if size == 0:
            raise InputError(name, "the upload is empty (0 bytes)", "choose the file again; it may not have been read")
        if kind is None:
            kind = _kind_or_raise(head, name)
            if size > limits[kind.group]:
                raise UploadTooLarge(limits[kind.group], kind.name.upper())
        final = folder / f"{stem}{kind.suffix}"
        os.replace(tmp, final)
        return Upload(final, kind, size)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _kind_or_raise(head: bytes, name: str) -> Kind:
    kind = sniff(head)
    if kind is None:
        raise UnsupportedMediaType(name, "the content is not an image, DICOM or video file nerveseg can read "
                               "(decided from the file's bytes, not its name)", f"upload one of: {SUPPORTED_TEXT}")
    return kind
