"""What ``segment --resume`` needs from an earlier run in the same output folder: its rows
(:func:`read_previous_rows`), which inputs are complete (:func:`completed_inputs`, every file of
:func:`expected_outputs` present and rows written), and the temporary files a killed run left
behind (:func:`remove_stale_temporaries`; a job of N removes only its own,
:func:`remove_own_stale_temporaries`).
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Sequence

from ..io_utils import csv_values


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


def read_previous_videos(path: Path) -> dict[str, dict]:
    """The entries of an earlier videos.json by input (``file``); an unreadable file counts as none."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {e["file"]: e for e in entries if isinstance(e, dict) and isinstance(e.get("file"), str)} if isinstance(entries, list) else {}
