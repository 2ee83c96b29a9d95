"""Atomic writes: a reader never sees half a file, and an interrupted write loses nothing old.

A kill -9 between the temporary file and ``os.replace`` leaves at most a hidden temporary file
(``.NAME.XXXX.tmp.SUFFIX``) next to the old version; a full disk is an OutputError naming the file.
``leftover_temporaries`` finds what such kills left, for a resumed job to remove.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .errors import OutputError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""A write that fails with one of these becomes an OutputError (a NerveSegError, so the command
line prints one line and exits 2): the disk is full, not the program broken."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder; move it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates the file 0600; give results the permissions a normal write would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except Exception as exc:
        code = _disk_full_errno(exc)
        if code is None or isinstance(exc, OutputError):
            raise
        raise OutputError(path, f"cannot be written: {os.strerror(code)}",
                          "free disk space and run the command again (train: --resume, segment: --resume); "
                          "the previous version of this file, if there was one, is intact", errno_=code) from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# writers that are not Python file objects report the OS error in their message: safetensors
# ("Error while serializing: IoError(Os { code: 28, kind: StorageFull, ... })"), FFmpeg, ...
_DISK_FULL_TEXT = re.compile(r"(?:code: |os error |errno )(\d+)|No space left on device|Disk quota exceeded|StorageFull|QuotaExceeded", re.I)


def _disk_full_errno(exc: BaseException) -> int | None:
    """The errno when ``exc`` says the disk (or quota) is full, else None."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in DISK_FULL_ERRNOS else None
    for match in _DISK_FULL_TEXT.finditer(str(exc)):
        if match.group(1) is None:
            return errno.EDQUOT if "quota" in match.group(0).lower() else errno.ENOSPC
        if int(match.group(1)) in DISK_FULL_ERRNOS:
            return int(match.group(1))
    return None


def leftover_temporaries(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """The temporary files that killed ``atomic_path`` writes of ``folder/NAME`` (for each of
    ``names``) left behind. Writers that go through their own temporary file inside ours leave
    theirs too: safetensors >= 0.8 writes ``.tmpXXXXXX`` (Rust tempfile's name) and renames it."""
    folder = Path(folder)
    found = [p for name in names for p in folder.glob(f".{name}.*.tmp*")]
    found += [p for p in folder.glob(".tmp??????") if p.name[4:].isalnum()]
    return [p for p in found if p.is_file()]


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result into place atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


# OWASP, "CSV Injection": a cell that starts with one of these is run as a formula by Excel,
# LibreOffice and Google Sheets (=HYPERLINK(...), +cmd|..., @SUM(...)); tab and carriage return
# too, since spreadsheets strip them before looking.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:inf|infinity|nan)", re.I)


def csv_cell(value: Any) -> Any:
    """``value`` as it is safe to write into a CSV cell that a spreadsheet may open.

    Text that starts like a formula (``= + - @``, tab, carriage return) gets a leading single
    quote, which spreadsheets show as text and do not evaluate (OWASP's advice). Numbers and
    numeric text (``-1.5``, ``+2e-3``, ``-inf``) are kept: they are data, not formulas. Text that
    already starts with a quote is kept as it is, so writing a table read back from disk
    (``--resume``, a rewritten manifest) never adds a second quote. See :func:`csv_value`."""
    if not isinstance(value, str) or not value.startswith(_FORMULA_START) or _NUMBER.fullmatch(value):
        return value
    return "'" + value


def csv_value(text: str) -> str:
    """The value a cell written by :func:`csv_cell` stood for: the quote it added is removed.

    For readers that match cells against names (file names, subjects) rather than show them."""
    if isinstance(text, str) and text.startswith("'") and text[1:].startswith(_FORMULA_START) \
            and not _NUMBER.fullmatch(text[1:]):
        return text[1:]
    return text


def csv_values(row: dict) -> dict:
    """:func:`csv_value` of every cell of a ``csv.DictReader`` row."""
    return {k: csv_value(v) for k, v in row.items()}


def csv_text(rows: Iterable[dict], fields: Sequence[str]) -> str:
    """CSV text of ``rows`` under the header ``fields`` (keys outside ``fields`` are ignored),
    every cell through :func:`csv_cell`: the one writer of every CSV nerveseg makes."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
    return buf.getvalue()


def atomic_write_csv(path: str | Path, rows: Iterable[dict], fields: Sequence[str]) -> None:
    """Write ``rows`` under the header ``fields`` (keys outside ``fields`` are ignored); text
    that a spreadsheet would run as a formula is escaped (:func:`csv_cell`)."""
    atomic_write_text(path, csv_text(rows, fields))
