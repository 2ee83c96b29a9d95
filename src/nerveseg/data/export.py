"""Write a nerveseg dataset in nnU-Net v2's raw format, with our exact fold split.

nnU-Net is the generic baseline reviewers ask about. With the same images, masks and folds, a
user with a GPU can train it (``nnUNetv2_train DATASET 2d FOLD``) and compare fold by fold.
Layout written (nnU-Net v2 "dataset format" documentation)::

    OUT/DatasetNNN_Name/imagesTr/<case>_0000.png   one grey channel, 8-bit
    OUT/DatasetNNN_Name/labelsTr/<case>.png        0 = background, 1 = nerve
    OUT/DatasetNNN_Name/dataset.json
    OUT/DatasetNNN_Name/splits_final.json          copy to nnUNet_preprocessed/DatasetNNN_Name/
    OUT/DatasetNNN_Name/imagesTs/<case>_0000.png   manifest rows with split = test, if any
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError, InputError
from ..io_utils import atomic_path, atomic_write_json
from .io import check_mask_not_empty, read_mask
from .media import read_frame
from .samples import discover_samples, fold_assignment


def nnunet_case_name(stem: str) -> str:
    """nnU-Net's case identifier for an image stem: characters other than letters, digits, ``_``
    and ``-`` become ``_`` (the predictions nnU-Net writes carry this name)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def _save_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def export_nnunet(
    data_dir: str | Path,
    out_dir: str | Path,
    label=None,
    folds: int = 5,
    seed: int = 0,
    dataset_id: int = 501,
    name: str = "NerveUS",
    log=print,
) -> Path:
    """Export; returns the dataset folder. Unusable pairs are reported and left out."""
    if not 1 <= dataset_id <= 999:
        raise ConfigError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ConfigError(f"dataset name must be letters, digits, _ or -, got {name!r}")
    samples, problems = discover_samples(data_dir)
    root = Path(out_dir) / f"Dataset{dataset_id:03d}_{name}"
    assignment = fold_assignment(samples, folds, seed)  # the same folds `nerveseg train --folds` uses
    written: dict[str, str] = {}
    n_test = 0
    for sample in samples:
        case = nnunet_case_name(sample.stem)
        try:
            image = read_frame(sample.image_path, sample.frame)[0]
            mask = read_mask(sample.mask_path, label=label, image_shape=image.shape)
            check_mask_not_empty(mask, sample.mask_path, label)
        except InputError as exc:
            problems.append(exc)
            continue
        pixels = np.round(image * 255).astype(np.uint8)
        if sample.stem not in assignment:  # a held-out test row
            _save_png(pixels, root / "imagesTs" / f"{case}_0000.png")
            _save_png(mask.astype(np.uint8), root / "labelsTs" / f"{case}.png")
            n_test += 1
            continue
        _save_png(pixels, root / "imagesTr" / f"{case}_0000.png")
        _save_png(mask.astype(np.uint8), root / "labelsTr" / f"{case}.png")
        written[sample.stem] = case
    for problem in problems:
        log(f"warning: skipped {problem}")
    if not written:
        raise InputError(data_dir, "no usable image/mask pairs to export", "see the warnings above")
    atomic_write_json(
        root / "dataset.json",
        {
            "channel_names": {"0": "ultrasound"},
            "labels": {"background": 0, "nerve": 1},
            "numTraining": len(written),
            "file_ending": ".png",
            "name": name,
            "description": f"exported by nerveseg from {Path(data_dir).name} (label {label}); folds seed {seed}",
        },
    )
    splits = []
    for fold in range(folds):
        val = sorted(case for stem, case in written.items() if assignment[stem] == fold)
        train = sorted(case for stem, case in written.items() if assignment[stem] != fold)
        splits.append({"train": train, "val": val})
    atomic_write_json(root / "splits_final.json", splits)
    log(f"exported {len(written)} training case(s) and {n_test} test case(s) to {root}")
    return root
