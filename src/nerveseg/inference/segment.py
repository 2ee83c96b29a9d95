"""Segment images, DICOM files and cine loops: masks, overlays, measurements.

A file that cannot be read is reported and the rest go on; so are files of an unknown type and
sub-folders inside an input folder (never silently skipped, unless ``recursive``). The measurements
table is rewritten atomically after every file (in a long batch less often, see :class:`_Table`), so
an interrupted batch keeps the rows it finished, and ``resume=True`` skips the inputs whose outputs
are complete (:func:`completed_inputs`).

Archives (``recursive=True`` or ``list_file``): every input gets a relative path -- below the folder
given (the common parent of several), or below the list's folder -- and its results are written at
the same place under the output folder, so ``ROOT/a/b/case.png`` gives ``OUT/a/b/case_mask.png``.
``shard=(i, n)`` segments only the inputs :func:`shard_of` assigns to job ``i``; each job writes
its own ``measurements.shard-i-of-n.csv`` and ``archive.collect`` joins them.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import math
import os
import posixpath
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..data.labelme import write_labelme
from ..data.media import DICOM_EXTENSIONS, MEDIA_EXTENSIONS, is_dicom, read_dicom_header, read_media  # noqa: F401 (DICOM_EXTENSIONS: for callers)
from ..data.samples import _is_junk
from ..errors import ConfigError, InputError, OutputError
from ..io_utils import atomic_path, atomic_write_csv, atomic_write_json, csv_values
from .calibration import Spacing, dicom_spacing, mask_roi, resolve_spacing, warn_once_no_calibration
from .measure import MEASUREMENT_FIELDS, POSTPROCESS_MODES, measurement_rows, postprocess
from .overlay import make_overlay, save_png
from .video import VideoWriter

SUPPORTED_EXTENSIONS = MEDIA_EXTENSIONS  # DICOM_EXTENSIONS is imported from data.media for callers


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
    for row in map(csv_values, rows):  # "=a.png" was written as "'=a.png" for spreadsheets
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
                     labelme: bool, log=print, table: Path | None = None) -> dict[Path, list[dict]]:
    """Inputs whose outputs are complete, with their earlier measurement rows.

    Complete means: the measurements table (``table``, default ``out/measurements.csv``; a
    shard's own table) holds rows for the input (its ``file`` column as given), and every file
    :func:`expected_outputs` names for those frames exists. Rows are
    written only after all of an input's files (each written atomically), so an input
    interrupted half-way has no rows and is done again; so is one whose rows remain but whose
    files were removed. A still with one frame and a one-frame loop both have frame 0 only:
    either set of outputs counts."""
    previous = read_previous_rows(table if table is not None else out / "measurements.csv", log)
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


_TEMPORARY = re.compile(r"^\.(?P<final>.+)\.[A-Za-z0-9_]{8}\.tmp(\.\w+)?$")


def remove_own_stale_temporaries(out: Path, names: Sequence[str], class_names: Sequence[str],
                                 own_files: Sequence[str]) -> int:
    """Like :func:`remove_stale_temporaries`, but only the temporaries of this run's own files:
    those of the inputs named ``names`` (in their folders under ``out``, and their frame-mask
    folders) and of ``own_files`` in ``out`` (the job's table, videos and status file). Shards
    share an output folder and run at the same time, so a resumed job must not delete the
    temporary file another job is writing."""
    others = list(class_names)[1:]
    finals: dict[Path, set[str]] = {out: set(own_files)}
    mask_folders: list[Path] = []
    for name in names:
        folder, leaf = (out / name).parent, Path(name).name
        finals.setdefault(folder, set()).update(
            [f"{leaf}_mask.png", f"{leaf}_overlay.png", f"{leaf}.json", f"{leaf}_csa.png", f"{leaf}_overlay.mp4",
             f"{leaf}_overlay.partial.mp4", f"{leaf}_seg.dcm", f"{leaf}_sr.dcm"] + [f"{leaf}_{c}_mask.png" for c in others])
        mask_folders += [out / f"{name}_masks"] + [out / f"{name}_{c}_masks" for c in others]
    removed = 0
    for folder, own in finals.items():
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            match = _TEMPORARY.match(entry.name)
            partial = entry.name.startswith(".") and entry.name[1:] in own and entry.name.endswith(".partial.mp4")
            if entry.is_file() and (partial or (match and match["final"] in own)):
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    for folder in mask_folders:
        if folder.is_dir():
            for entry in os.scandir(folder):
                if entry.is_file() and _TEMPORARY.match(entry.name):
                    Path(entry.path).unlink(missing_ok=True)
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
                        if str(exc) not in warned:  # once per file, not once per frame of a loop
                            warned.add(str(exc))
                            log(f"warning: {exc}")
                frame_rows = measurement_rows(str(path), index, mask, prob, frame_spacing, options.per_component,
                                              low_confidence=options.low_confidence)
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
    old_videos = _previous_videos(out / videos_name) if done else {}

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
