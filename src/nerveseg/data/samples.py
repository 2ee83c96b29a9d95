"""Find image/mask pairs in a data folder and split them by subject.

Layout::

    data_dir/
        images/<stem>.png|.jpg|.tif|.bmp|.dcm        still images and single-frame DICOM
        images/<loop>.mp4|.avi|.dcm|...              cine loops (video or multi-frame DICOM)
        masks/<stem>.png|.tif|.bmp|.json             (LabelMe) the mask of a still
        masks/<loop>/frame_00012.png|.json           a labelled frame of a cine loop (0-based, as
                                                     `nerveseg segment` numbers frames); only
                                                     labelled frames become samples
        manifest.csv                       (optional: file, subject, device, region, side, split)

Images of one subject are strongly correlated, so every split here is grouped by subject: a
subject is never in both train and validation, which would inflate validation scores.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nerveseg.data.io import MASK_EXTENSIONS
from nerveseg.data.media import DICOM_EXTENSIONS, MEDIA_EXTENSIONS, VIDEO_EXTENSIONS
from nerveseg.errors import ConfigError, InputError

__all__ = [
    "MANIFEST_COLUMNS",
    "MANIFEST_NAME",
    "SPLIT_VALUES",
    "Sample",
    "discover_datasets",
    "discover_samples",
    "fold_assignment",
    "read_manifest",
    "source_names",
    "split_samples",
]

MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("file", "subject", "device", "region", "side", "split")
SPLIT_VALUES = ("", "train", "val", "test")
"""Accepted values of the manifest ``split`` column. Only ``test`` changes anything (held out);
a typo such as ``testing`` is refused rather than letting test images leak into training."""

# Preference when one stem has several masks: lossless rasters first, then LabelMe.
_MASK_PREFERENCE = (".png", ".tif", ".tiff", ".bmp", ".json")
# Files that operating systems drop into folders; not the user's data.
_JUNK_NAMES = {"thumbs.db", "desktop.ini"}
# masks/<loop>/frame_00012.png: the mask of frame 12 (0-based) of images/<loop>.*
_FRAME_MASK = re.compile(r"frame_(\d+)")

_LAYOUT = (
    "expected <data_dir>/images/ with one image per file and <data_dir>/masks/ with "
    "<stem>.png (or <stem>.json from LabelMe) for each image, plus an optional manifest.csv"
)


@dataclass(frozen=True)
class Sample:
    """One image and its mask, with the metadata used for grouping and reporting.

    ``subject`` is the stem when unknown, so that splits are then by image. ``frame`` is the
    0-based frame of a cine loop (video or multi-frame DICOM) the mask labels, None for a still;
    a labelled frame's ``stem`` is ``<loop>_frame_NNNNN`` and its subject defaults to the loop,
    so frames of one loop are never split between train and validation.
    """

    stem: str
    image_path: Path
    mask_path: Path | None
    subject: str
    device: str = ""
    region: str = ""
    side: str = ""
    split: str = ""
    frame: int | None = None
    # the data folder's name when a run trains on several (``discover_datasets``); "" for one
    source: str = ""


# ------------------------------------------------------------------------------------------------
# Manifest
# ------------------------------------------------------------------------------------------------


def _stem_of(name: str) -> str:
    """Stem of a manifest ``file`` entry, which may be a path, a file name or a bare stem.

    Only known endings are stripped: a bare stem such as ``p01.left`` must stay whole.
    """
    base = Path(name.strip().replace("\\", "/")).name
    suffix = Path(base).suffix.lower()
    if suffix in MEDIA_EXTENSIONS or suffix in MASK_EXTENSIONS:
        return base[: -len(suffix)]
    return base


def read_manifest(path: str | Path) -> dict[str, dict]:
    """Read ``manifest.csv`` into ``{stem: {column: value}}``.

    Parameters
    ----------
    path : str or Path
        CSV with a header row. ``file`` is required (file name, path or stem); ``subject``,
        ``device``, ``region``, ``side`` and ``split`` are optional. Headers are matched
        case-insensitively, values are stripped, ``split`` is lower-cased.

    Returns
    -------
    dict
        stem -> dict of every other column (missing known columns are ``""``).

    Raises
    ------
    InputError
        Unreadable file, no ``file`` column, empty or duplicate ``file``, unknown ``split``.
    """
    path = Path(path)
    try:
        # utf-8-sig: spreadsheets save CSV with a byte-order mark that would corrupt "file".
        with path.open("r", encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            rows = list(reader)
    except FileNotFoundError as e:
        raise InputError(path, "manifest not found", "check the path") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(path, f"manifest cannot be read ({e})", "save it as UTF-8 CSV") from e

    rows = [r for r in rows if any(cell.strip() for cell in r)]  # blank lines carry nothing
    if not rows:
        raise InputError(path, "manifest is empty", "add a header row with at least the column 'file'")
    header = [h.strip().lower() for h in rows[0]]
    if "file" not in header:
        raise InputError(
            path,
            f"manifest has no 'file' column (columns: {', '.join(header) or 'none'})",
            f"add a header row; columns: {', '.join(MANIFEST_COLUMNS)} (all but file optional)",
        )
    named = [h for h in header if h]
    if len(set(named)) != len(named):
        raise InputError(path, "manifest has duplicate column names", "give every column a distinct name")

    entries: dict[str, dict] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        # Unnamed columns (trailing commas from spreadsheets) carry nothing to keep.
        values = {h: (row[i].strip() if i < len(row) else "") for i, h in enumerate(header) if h}
        file_value = values.pop("file")
        if not file_value:
            raise InputError(path, f"row {line_no} has an empty 'file'", "fill in the file name or remove the row")
        stem = _stem_of(file_value)
        if not stem or stem in (".", ".."):
            raise InputError(path, f"row {line_no}: 'file' is {file_value!r}, which names no file",
                             "give the image's file name or stem")
        if stem in entries:
            raise InputError(path, f"file '{stem}' is listed twice (row {line_no})",
                             "keep one row per image")
        for column in MANIFEST_COLUMNS[1:]:
            values.setdefault(column, "")
        values["split"] = values["split"].lower()
        if values["split"] not in SPLIT_VALUES:
            raise InputError(
                path,
                f"row {line_no}: unknown split '{values['split']}'",
                "use train, val, test or leave it empty (only test is held out)",
            )
        entries[stem] = values
    return entries


# ------------------------------------------------------------------------------------------------
# Discovery
# ------------------------------------------------------------------------------------------------


def _is_junk(entry: Path) -> bool:
    return entry.name.startswith(".") or entry.name.lower() in _JUNK_NAMES


def _list_files(folder: Path, allowed: Sequence[str], kind: str,
                problems: list[InputError], folders: dict[str, Path] | None = None) -> dict[str, list[Path]]:
    """Group the usable files of ``folder`` by stem; report what cannot be used. Subfolders go
    into ``folders`` (name -> path) when it is given, else they are reported."""
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for entry in sorted(folder.iterdir()):
        if _is_junk(entry):
            continue
        if entry.is_dir() and folders is not None:
            folders[entry.name] = entry
            continue
        if entry.is_dir():
            problems.append(InputError(entry, f"is a folder inside {folder.name}/; subfolders are not searched",
                                       f"move its files into {folder.name}/ or remove it"))
            continue
        suffix = entry.suffix.lower()
        if suffix not in allowed:
            fix = f"supported {kind} types: {', '.join(allowed)}; convert or remove it"
            if kind == "mask" and suffix in (".jpg", ".jpeg"):
                problems.append(InputError(entry, "mask is JPEG, which changes label values",
                                           "save the mask as grey or palette PNG"))
            else:
                problems.append(InputError(entry, f"unsupported {kind} file type '{suffix or '(none)'}'", fix))
            continue
        by_stem[entry.stem].append(entry)
    return by_stem


def discover_samples(data_dir: str | Path, require_masks: bool = True) -> tuple[list[Sample], list[InputError]]:
    """Pair ``images/`` with ``masks/`` by stem, without decoding any file.

    Parameters
    ----------
    data_dir : str or Path
        Folder with ``images/``, ``masks/`` and optionally ``manifest.csv``.
    require_masks : bool
        If true, images without a mask are problems and skipped; if false they are kept with
        ``mask_path=None`` (inference).

    Returns
    -------
    samples : list of Sample
        Sorted by stem.
    problems : list of InputError
        Non-fatal problems, one per offending file (unpaired, unsupported, ambiguous).

    Raises
    ------
    InputError
        ``data_dir`` or ``images/`` missing, ``masks/`` missing while required, bad manifest.
    """
    data_dir = Path(data_dir)
    images_dir, masks_dir = data_dir / "images", data_dir / "masks"
    if not data_dir.is_dir():
        raise InputError(data_dir, "data folder not found", _LAYOUT)
    if not images_dir.is_dir():
        raise InputError(images_dir, "images folder not found", _LAYOUT)
    if require_masks and not masks_dir.is_dir():
        raise InputError(masks_dir, "masks folder not found", _LAYOUT)

    problems: list[InputError] = []
    image_files = _list_files(images_dir, MEDIA_EXTENSIONS, "image", problems)
    frame_dirs: dict[str, Path] = {}
    mask_files = _list_files(masks_dir, MASK_EXTENSIONS, "mask", problems, frame_dirs) if masks_dir.is_dir() else {}

    manifest_path = data_dir / MANIFEST_NAME
    manifest = read_manifest(manifest_path) if manifest_path.is_file() else {}

    samples: list[Sample] = []
    for stem in sorted(image_files):
        files = image_files[stem]
        if len(files) > 1:
            # Which of a.png and a.jpg is meant cannot be guessed; training on both would
            # duplicate the image.
            names = ", ".join(p.name for p in files)
            problems.append(InputError(files[0], f"several images share the stem '{stem}' ({names})",
                                       "keep one of them"))
            continue
        masks = sorted(mask_files.get(stem, []), key=lambda p: _MASK_PREFERENCE.index(p.suffix.lower()))
        mask_path = masks[0] if masks else None
        meta = manifest.get(stem, {})
        details = dict(subject=meta.get("subject") or stem, device=meta.get("device", ""),
                       region=meta.get("region", ""), side=meta.get("side", ""), split=meta.get("split", ""))
        if stem in frame_dirs or files[0].suffix.lower() in VIDEO_EXTENSIONS:
            frames = _frame_samples(stem, files[0], mask_path, frame_dirs.get(stem), require_masks, problems)
            samples.extend(Sample(stem=f, image_path=files[0], mask_path=m, frame=i, **details) for f, m, i in frames)
            continue
        if mask_path is None and require_masks:
            problems.append(InputError(files[0], "has no mask",
                                       f"add masks/{stem}.png or remove the image"))
            continue
        samples.append(Sample(stem=stem, image_path=files[0], mask_path=mask_path, **details))

    seen: dict[str, Sample] = {}
    for sample in list(samples):  # a still named like a labelled frame: which is meant is unknown
        if sample.stem in seen:
            problems.append(InputError(sample.image_path, f"gives the sample name '{sample.stem}', as "
                                       f"{seen[sample.stem].image_path.name} does", "rename one of them"))
            samples = [s for s in samples if s.stem != sample.stem]
        seen[sample.stem] = sample
    samples.sort(key=lambda s: s.stem)

    for stem in sorted(set(mask_files) - set(image_files)):
        problems.append(InputError(mask_files[stem][0], "has no matching image in images/",
                                   f"add images/{stem}.png or remove the mask"))
    for stem in sorted(set(frame_dirs) - set(image_files)):
        problems.append(InputError(frame_dirs[stem], "is a folder of frame masks with no matching cine loop in images/",
                                   f"add images/{stem}.mp4 (or .dcm) or remove the folder"))
    for stem in sorted(set(manifest) - set(image_files)):
        problems.append(InputError(manifest_path, f"lists '{stem}', which is not in images/",
                                   "remove the row or add the image"))
    return samples, problems


def source_names(data_dirs: Sequence[str | Path]) -> list[str]:
    """A short, distinct name for each data folder: its own name, made unique with its parent's
    (``a/data``, ``b/data``) or, failing that, its position."""
    paths = [Path(d) for d in data_dirs]
    names = [p.name or str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i}:{p.name}" for i, p in enumerate(paths)]
    return names


def discover_datasets(data_dirs: str | Path | Sequence[str | Path],
                      require_masks: bool = True) -> tuple[list[Sample], list[InputError]]:
    """:func:`discover_samples` over one folder or several trained on together.

    With several folders each sample's ``source`` is its folder's name (:func:`source_names`) and
    its subject is prefixed with it, so that patient "P1" of one data set is not patient "P1" of
    another; splits and folds are then made within each source (:func:`fold_assignment`). One
    folder gives exactly :func:`discover_samples`' samples (``source`` ""), so single-folder
    runs keep their splits.

    Raises
    ------
    InputError
        A folder missing (as :func:`discover_samples`), or two folders giving the same sample
        name (which image a mask, an overlay or a split entry means would be ambiguous).
    """
    if isinstance(data_dirs, (str, Path)):
        return discover_samples(data_dirs, require_masks)
    dirs = list(data_dirs)
    if len(dirs) == 1:
        return discover_samples(dirs[0], require_masks)
    samples: list[Sample] = []
    problems: list[InputError] = []
    owner: dict[str, str] = {}
    for name, folder in zip(source_names(dirs), dirs):
        found, found_problems = discover_samples(folder, require_masks)
        problems += found_problems
        for sample in found:
            if sample.stem in owner:
                raise InputError(sample.image_path, f"gives the sample name '{sample.stem}', as an image of "
                                 f"{owner[sample.stem]} does", "rename one of them: sample names must be unique across --data folders")
            owner[sample.stem] = name
            samples.append(replace(sample, source=name, subject=f"{name}/{sample.subject}"))
    samples.sort(key=lambda s: s.stem)
    return samples, problems


def _frame_samples(stem: str, image: Path, mask_file: Path | None, folder: Path | None,
                   require_masks: bool, problems: list[InputError]) -> list[tuple[str, Path | None, int | None]]:
    """(sample stem, mask, frame) of each labelled frame of a cine loop in ``masks/<stem>/``."""
    suffix = image.suffix.lower()
    if folder is not None and suffix not in DICOM_EXTENSIONS + VIDEO_EXTENSIONS:
        problems.append(InputError(folder, f"is a folder of frame masks, but images/{image.name} is a still image",
                                   f"name its mask masks/{stem}.png"))
        return []
    if folder is not None and mask_file is not None:
        problems.append(InputError(folder, f"and {mask_file.name} both label images/{image.name}",
                                   "keep the folder (frames of a cine loop) or the file (a single-frame image)"))
        return []
    if folder is None:  # a video with a single mask file, or none
        if mask_file is not None:
            problems.append(InputError(mask_file, f"is one mask for the cine loop images/{image.name}",
                                       f"put one mask per labelled frame in masks/{stem}/frame_NNNNN.png (frame 0 is the first)"))
            return []
        if require_masks:
            problems.append(InputError(image, "has no frame masks",
                                       f"add masks/{stem}/frame_NNNNN.png for its labelled frames or remove the loop"))
            return []
        return [(stem, None, None)]
    by_frame: dict[int, list[Path]] = defaultdict(list)
    for entry in sorted(folder.iterdir()):
        if _is_junk(entry):
            continue
        match = _FRAME_MASK.fullmatch(entry.stem)
        if not entry.is_file() or match is None or entry.suffix.lower() not in MASK_EXTENSIONS:
            problems.append(InputError(entry, "is not a frame mask",
                                       f"name frame masks frame_NNNNN.png or .json ({', '.join(MASK_EXTENSIONS)}); "
                                       "NNNNN is the 0-based frame"))
            continue
        by_frame[int(match.group(1))].append(entry)
    if not by_frame:
        if require_masks:
            problems.append(InputError(folder, "holds no frame masks", "add frame_NNNNN.png files or remove the folder"))
            return []
        return [(stem, None, None)]
    frames = []
    for index in sorted(by_frame):
        masks = sorted(by_frame[index], key=lambda p: _MASK_PREFERENCE.index(p.suffix.lower()))
        frames.append((f"{stem}_frame_{index:05d}", masks[0], index))
    return frames


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------


def _held_in(samples: Iterable[Sample]) -> list[Sample]:
    """Samples that may be used for training or validation (manifest split 'test' is held out)."""
    return [s for s in samples if s.split.lower() != "test"]


def _permuted_groups(samples: Sequence[Sample], seed: int) -> list[tuple[str, list[Sample]]]:
    """Subjects and their samples, in a seed-determined order independent of input order."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.stem):
        groups[s.subject].append(s)
    subjects = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(subjects))
    return [(subjects[i], groups[subjects[i]]) for i in order]


def _check_folds(folds: int, n_subjects: int | None) -> None:
    """Validate ``folds`` (and, when given, that there are enough subjects for it)."""
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ConfigError(f"folds must be an integer >= 2, got {folds!r}")
    if n_subjects is not None and n_subjects < folds:
        raise ConfigError(
            f"{folds} folds need at least {folds} subjects, but there are {n_subjects} "
            "(test samples excluded); use fewer folds or add data"
        )


def fold_assignment(samples: Sequence[Sample], folds: int, seed: int = 0) -> dict[str, int]:
    """Assign every non-test sample to one of ``folds`` subject-grouped folds.

    Subjects are shuffled by ``seed``, then dealt largest first (stable, so shuffled order
    breaks size ties) to the fold with the fewest images so far (ties: lowest fold index).

    Returns
    -------
    dict
        stem -> fold index in ``0..folds-1``; samples with split ``test`` are absent.

    Raises
    ------
    ConfigError
        ``folds < 2`` or fewer subjects than folds.
    """
    held_in = _held_in(samples)
    sources = sorted({s.source for s in held_in})
    if len(sources) > 1:
        # several data folders: each is dealt into the folds on its own, so every fold holds its
        # share of every folder (and a folder's folds are those it would get alone)
        _check_folds(folds, None)
        assignment = {}
        for source in sources:
            members = [s for s in held_in if s.source == source]
            n_subjects = len({s.subject for s in members})
            if n_subjects < folds:
                raise ConfigError(f"{folds} folds need at least {folds} subjects in every data folder, but "
                                  f"{source} has {n_subjects}; use fewer folds or add data")
            assignment.update(fold_assignment(members, folds, seed))
        return assignment
    groups = _permuted_groups(held_in, seed)
    _check_folds(folds, len(groups))
    groups.sort(key=lambda g: len(g[1]), reverse=True)  # sort is stable
    counts = [0] * int(folds)
    assignment = {}
    for _subject, members in groups:
        target = counts.index(min(counts))  # index() gives the lowest index among ties
        counts[target] += len(members)
        for s in members:
            assignment[s.stem] = target
    return assignment


def split_samples(
    samples: Sequence[Sample],
    seed: int = 0,
    val_fraction: float = 0.2,
    folds: int | None = None,
    fold: int | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """Split samples into (train, val) with no subject in both.

    Parameters
    ----------
    samples : sequence of Sample
        Samples with manifest split ``test`` are excluded from both lists.
    seed : int
        Seed of the subject permutation; the same seed gives the same split.
    val_fraction : float
        Without folds: fraction of images to put in val, taken as whole subjects in permuted
        order, stopping at the subject count nearest the target. Val and train each get at
        least one subject.
    folds, fold : int, optional
        K-fold cross-validation (both or neither): val is fold ``fold`` (0-based) of
        :func:`fold_assignment`, train the other folds.

    Returns
    -------
    train, val : list of Sample
        Each sorted by stem.

    Raises
    ------
    ConfigError
        Invalid ``val_fraction``, ``folds`` or ``fold``, or too few subjects.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    if (folds is None) != (fold is None):
        raise ConfigError("folds and fold go together: give both (e.g. folds=5, fold=0) or neither")

    held_in = sorted(_held_in(samples), key=lambda s: s.stem)
    if folds is not None:
        _check_folds(folds, n_subjects=None)
        if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < folds:
            raise ConfigError(f"fold must be an integer in 0..{folds - 1} (folds={folds}), got {fold!r}")
        assignment = fold_assignment(held_in, folds, seed)
        train = [s for s in held_in if assignment[s.stem] != fold]
        val = [s for s in held_in if assignment[s.stem] == fold]
        return train, val

    sources = sorted({s.source for s in held_in})
    if len(sources) > 1:  # several data folders: each split on its own, in the same proportion
        train, val = [], []
        for source in sources:
            part_train, part_val = split_samples([s for s in held_in if s.source == source], seed, val_fraction)
            train += part_train
            val += part_val
        return sorted(train, key=lambda s: s.stem), sorted(val, key=lambda s: s.stem)
    groups = _permuted_groups(held_in, seed)
    if len(groups) < 2:
        raise ConfigError(
            f"a train/val split needs at least 2 subjects, but there are {len(groups)} "
            "(test samples excluded); add data or set distinct subjects in manifest.csv"
        )
    target = float(val_fraction) * len(held_in)
    val_subjects: set[str] = set()
    n_val = 0
    for subject, members in groups[:-1]:  # the last subject always stays in train
        if n_val > 0 and abs(n_val + len(members) - target) >= abs(n_val - target):
            break  # adding this subject would move val further from the target
        val_subjects.add(subject)
        n_val += len(members)
    train = [s for s in held_in if s.subject not in val_subjects]
    val = [s for s in held_in if s.subject in val_subjects]
    return train, val
