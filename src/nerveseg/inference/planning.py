"""Which inputs a ``segment`` run works on, and under which names: folders expanded (or searched
with ``recursive``), input lists read, every input given its output name (:func:`plan_inputs`),
and the inputs of a job of N chosen by a stable hash of that name (:func:`shard_of`).

Nothing here reads an image or a model: planning is cheap, so every job of a split plans all
the inputs and keeps its own (see ``segment.segment_files`` and ``archive.collect``).
"""

from __future__ import annotations

import csv
import hashlib
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..data.media import MEDIA_EXTENSIONS, is_dicom
from ..data.samples import _is_junk
from ..errors import ConfigError, InputError

SUPPORTED_EXTENSIONS = MEDIA_EXTENSIONS


def expand_inputs(paths: Iterable[str | Path], exclude: Iterable[str | Path] = (),
                  recursive: bool = False) -> tuple[list[Path], list[InputError]]:
    """Files as given; folders expanded to their image, DICOM and video files (sorted, DICOM
    without an ending found by its first bytes). Missing paths, files of another type and
    sub-folders inside a folder (not searched unless ``recursive``) are reported. Hidden and
    system files and folders (``.name``, Thumbs.db, desktop.ini) and the folders in ``exclude``
    (the output folder) are passed over without a word."""
    excluded = {Path(e).resolve() for e in exclude}
    files, problems = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found, folder_problems = _folder_files(p, excluded, recursive)
            files.extend(path for path, _ in found)
            problems.extend(folder_problems)
        elif p.exists():
            files.append(p)
        else:
            problems.append(InputError(p, "no such file or folder", "check the path"))
    return files, problems


def _folder_files(folder: Path, excluded: set[Path], recursive: bool) -> tuple[list[tuple[Path, str]], list[InputError]]:
    """The usable files below ``folder`` with their paths relative to it ("a/b/case.png"), in
    sorted order, and a problem for each thing that is not segmented (see expand_inputs)."""
    found: list[tuple[Path, str]] = []
    problems: list[InputError] = []
    searched = {folder.resolve()}  # a link back up the tree would otherwise be walked forever

    def walk(current: Path, prefix: str) -> None:
        try:
            entries = sorted(current.iterdir())
        except OSError as exc:  # a sub-folder without read permission: report it, go on
            problems.append(InputError(current, f"cannot be listed ({exc.strerror or exc})", "check its permissions"))
            return
        for f in entries:
            if _is_junk(f):
                continue
            rel = prefix + f.name
            if f.is_dir():
                if f.resolve() in excluded:
                    continue
                if recursive:
                    if f.resolve() in searched:
                        problems.append(InputError(f, "links to a folder that is already searched; not searched again",
                                                   "nothing to do if its files are segmented once, as they are"))
                        continue
                    searched.add(f.resolve())
                    walk(f, rel + "/")
                else:
                    problems.append(InputError(f, f"is a folder inside {folder}; sub-folders are not searched, so it was "
                                               "not segmented", "give it as an input of its own, or pass --recursive"))
            elif f.suffix.lower() in SUPPORTED_EXTENSIONS or (not f.suffix and is_dicom(f)):
                found.append((f, rel))
            else:
                problems.append(InputError(f, f"unsupported file type '{f.suffix or '(none)'}', not segmented",
                                           f"supported: {', '.join(SUPPORTED_EXTENSIONS)} and DICOM without an ending"))

    walk(folder, "")
    if not found and not problems:
        problems.append(InputError(folder, "folder holds no image, DICOM or video files",
                                   f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"))
    return found, problems


def assign_stems(files: Sequence[Path]) -> list[str]:
    """Output name of each input: its stem, with _2, _3, ... for a repeated stem (a.png and
    a.jpg, or two folders), so no result overwrites another. Depends only on the input order,
    so a resumed run gives every input the names it had."""
    return unique_names([path.stem for path in files])


def unique_names(names: Sequence[str]) -> list[str]:
    """``names`` with _2, _3, ... appended to a repeat (in order), so every one is unique."""
    used: set[str] = set()
    out = []
    for name in names:
        if name in used:
            name = next(f"{name}_{i}" for i in range(2, len(names) + 2) if f"{name}_{i}" not in used)
        used.add(name)
        out.append(name)
    return out


# ------------------------------------------------------------------------------------------------
# archives: relative paths, input lists, shards


@dataclass(frozen=True)
class PlannedInput:
    """One input of a run: ``path`` as read (the ``file`` column), ``name`` its results' path
    below the output folder without the ending ("a/b/case" -> a/b/case_mask.png), and in an
    archive run ``relpath``, its path relative to the folder or list it came from (the
    ``relpath`` column, and the sort key of the collected table)."""

    path: Path
    name: str
    relpath: str | None = None


def shard_of(name: str, count: int) -> int:
    """The job (0 .. count-1) that segments the input whose output name is ``name``.

    A stable hash (the first 8 bytes of SHA-256 of the name), not the input's position in the
    list: it needs nothing but the name, so jobs that start at different times agree even if
    the archive gained files in between (a new file goes to one job or none, never to two, and
    every earlier file keeps its job -- unless the new one takes its name: case.jpg added beside
    case.png makes that one case_2), and a resumed job finds its own earlier results. The price
    is shards that differ in size by chance (about 1/sqrt(inputs per shard))."""
    if count == 1:
        return 0
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % count


def shard_file_names(shard: tuple[int, int]) -> tuple[str, str, str]:
    """(measurements table, videos file, status file) of a job: ``measurements.csv``,
    ``videos.json`` and ``segment.json`` for one job, ``measurements.shard-I-of-N.csv`` ... for job
    I of N, so jobs sharing an output folder never write the same file. The status file (the
    job's inputs and problems, for collect) is written by archive and sharded runs only."""
    index, count = shard
    if count == 1:
        return "measurements.csv", "videos.json", "segment.json"
    tag = f"shard-{index}-of-{count}"
    return f"measurements.{tag}.csv", f"videos.{tag}.json", f"segment.{tag}.json"


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    index, count = (int(v) for v in shard)
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard {index}/{count}: need 0 <= I < N (I is 0-based)")
    return index, count


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), as ``nerveseg benchmark --shard`` reads it (kept here so segment and
    collect need not import the training code)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 0/4 (I is 0-based)") from None
    return check_shard((index, count))


def read_input_list(list_file: str | Path) -> tuple[list[tuple[Path, int]], list[InputError]]:
    """The paths in a list of inputs with their line numbers: a CSV with a column ``path`` (other
    columns are ignored), or plain text with one path per line (blank lines and ``#`` comments
    skipped). Relative paths are read from the list's folder. Empty cells are reported; a list
    that cannot be read is an InputError (nothing to do)."""
    list_file = Path(list_file)
    try:
        text = list_file.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark
    except FileNotFoundError:
        raise InputError(list_file, "no such list of inputs", "check the --list path") from None
    except UnicodeDecodeError:
        raise InputError(list_file, "is not UTF-8 text", "save the list as UTF-8 CSV (a column 'path') or text") from None
    except OSError as exc:
        raise InputError(list_file, f"cannot be read ({exc.strerror or exc})", "check the --list path") from None
    base = list_file.parent
    entries: list[tuple[Path, int]] = []
    problems: list[InputError] = []
    lines = text.splitlines()
    try:
        header = next(csv.reader(lines[:1]), [])
    except csv.Error:
        header = []
    columns = [h.strip().lower() for h in header]
    if "path" in columns:
        reader = csv.reader(lines)
        next(reader)
        column = columns.index("path")
        try:
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                cell = row[column].strip() if column < len(row) else ""
                if not cell:
                    problems.append(InputError(list_file, f"line {reader.line_num}: the 'path' cell is empty",
                                               "fill it in or delete the line"))
                else:
                    entries.append((base / cell, reader.line_num))
        except csv.Error as exc:
            problems.append(InputError(list_file, f"line {reader.line_num}: {exc}; the lines after it were not read",
                                       "fix the quoting of that line"))
        return entries, problems
    if list_file.suffix.lower() == ".csv" and len(header) > 1:
        raise InputError(list_file, f"has no column 'path' (its columns: {', '.join(h.strip() for h in header)})",
                         "name the column of file paths 'path' in the first line")
    for number, line in enumerate(lines, start=1):  # plain text: paths may hold commas, so no CSV splitting
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append((base / line, number))
    return entries, problems


def _list_relpath(path: Path, base: Path) -> str:
    """Where a listed input goes below the output folder: its path relative to the list's folder;
    one outside that folder (``../x.png``, an absolute path elsewhere) mirrors its whole absolute
    path without the leading ``/``, which cannot escape the output folder or meet another."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(os.path.abspath(base)).as_posix()
    except ValueError:
        return absolute.relative_to(absolute.anchor).as_posix()


def plan_inputs(paths: Iterable[str | Path], out: Path, recursive: bool = False, list_file: str | Path | None = None,
                log=print) -> tuple[list[PlannedInput], list[InputError]]:
    """Every input of a run with its output name, and the problems found on the way.

    Without ``recursive`` or ``list_file``, as before: inputs in the order given (folders
    expanded, sorted), named by :func:`assign_stems`, results flat in ``out``. In an archive
    run, each input gets a relative path: a file below a folder given, relative to that folder
    (to the deepest folder holding all of them when several are given, so ``day1/`` and ``day2/``
    stay apart); a file in the list, relative to the list's folder (see :func:`_list_relpath`);
    a file given by itself, its name. Results go to ``out/<relative folder>/<stem>_...``; inputs
    are sorted by relative path, so the order (and any _2 for a.png beside a.jpg) does not
    depend on how the inputs were given, and a file reached twice is segmented once."""
    out_resolved = [Path(out).resolve()]
    paths = [Path(p) for p in paths]
    if not recursive and list_file is None:
        files, problems = expand_inputs(paths, exclude=out_resolved)
        return [PlannedInput(f, stem) for f, stem in zip(files, assign_stems(files))], problems
    excluded = set(out_resolved)
    found: list[tuple[Path, str]] = []
    problems: list[InputError] = []
    folders = [p for p in paths if p.is_dir()]
    common = os.path.commonpath([os.path.abspath(f) for f in folders]) if folders else ""
    for p in paths:
        if p.is_dir():
            prefix = Path(os.path.relpath(os.path.abspath(p), common)).as_posix()
            prefix = "" if prefix == "." else prefix + "/"
            files, folder_problems = _folder_files(p, excluded, recursive)
            found.extend((f, prefix + rel) for f, rel in files)
            problems.extend(folder_problems)
        elif p.exists():
            found.append((p, p.name))
        else:
            problems.append(InputError(p, "no such file or folder", "check the path"))
    if list_file is not None:
        list_file = Path(list_file)
        entries, list_problems = read_input_list(list_file)
        problems.extend(list_problems)
        for entry, line in entries:
            where = f"listed in {list_file} (line {line})"
            if entry.is_dir():
                prefix = _list_relpath(entry, list_file.parent)
                prefix = "" if prefix == "." else prefix + "/"
                files, folder_problems = _folder_files(entry, excluded, recursive)
                found.extend((f, prefix + rel) for f, rel in files)
                problems.extend(folder_problems)
            elif not entry.exists():
                problems.append(InputError(entry, f"{where}: no such file",
                                           f"correct or delete that line; relative paths are read from {list_file.parent}"))
            elif entry.suffix.lower() in SUPPORTED_EXTENSIONS or (not entry.suffix and is_dicom(entry)):
                found.append((entry, _list_relpath(entry, list_file.parent)))
            else:
                problems.append(InputError(entry, f"{where}: unsupported file type '{entry.suffix or '(none)'}', not segmented",
                                           f"supported: {', '.join(SUPPORTED_EXTENSIONS)} and DICOM without an ending"))
    found.sort(key=lambda item: (item[1], str(item[0])))
    seen: dict[str, str] = {}
    unique: list[tuple[Path, str]] = []
    for path, rel in found:
        key = os.path.abspath(path)
        if key in seen:
            log(f"warning: {path}: given twice (also as {seen[key]}); segmented once")
            continue
        seen[key] = str(path)
        unique.append((path, rel))
    names = unique_names([posixpath.join(posixpath.dirname(rel), Path(rel).stem) for _, rel in unique])
    return [PlannedInput(path, name, rel) for (path, rel), name in zip(unique, names)], problems
