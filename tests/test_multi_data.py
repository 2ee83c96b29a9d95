"""Several data folders in one training (issue 22): folds grouped by subject within each folder,
balanced across folders, saved in config.json, and reported per folder by evaluate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import write_ellipse_dataset
from nerveseg.cli.main import main
from nerveseg.config import DataConfig, RunConfig
from nerveseg.data.samples import Sample, discover_datasets, fold_assignment, source_names, split_samples
from nerveseg.errors import ConfigError, InputError


def _with_manifest(root: Path, subjects: list[str]) -> Path:
    stems = sorted(p.stem for p in (root / "images").iterdir())
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "subject"])
        for stem, subject in zip(stems, subjects):
            writer.writerow([f"{stem}.png", subject])
    return root


def _rename(root: Path, prefix: str) -> Path:
    for sub in ("images", "masks"):
        for p in sorted((root / sub).iterdir()):
            p.rename(p.with_name(prefix + p.name))
    return root


@pytest.fixture
def two_folders(tmp_path: Path) -> tuple[Path, Path]:
    # folder a: 10 images of 5 patients (2 each); folder b: 6 images of 6 patients, another naming
    a = _with_manifest(write_ellipse_dataset(tmp_path / "a", 10, seed=1), [f"P{i // 2}" for i in range(10)])
    b = _rename(write_ellipse_dataset(tmp_path / "b", 6, seed=2), "b")
    # the same subject name in both folders must stay two patients
    _with_manifest(b, ["P0"] + [f"Q{i}" for i in range(5)])
    return a, b


def test_discover_datasets_tags_sources_and_keeps_subjects_apart(two_folders):
    a, b = two_folders
    samples, problems = discover_datasets([a, b])
    assert not problems and len(samples) == 16
    assert {s.source for s in samples} == {"a", "b"}
    assert {s.subject for s in samples if s.source == "a"} == {f"a/P{i}" for i in range(5)}
    assert "b/P0" in {s.subject for s in samples}
    # one folder: exactly discover_samples' samples, untagged (single-folder splits unchanged)
    single, _ = discover_datasets([a])
    assert {s.source for s in single} == {""} and {s.subject for s in single} == {f"P{i}" for i in range(5)}


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_folds_never_split_a_subject_and_cover_each_folder(two_folders, folds):
    samples, _ = discover_datasets(list(two_folders))
    assignment = fold_assignment(samples, folds, seed=0)
    assert set(assignment) == {s.stem for s in samples}
    by_subject: dict[str, set[int]] = {}
    for s in samples:
        by_subject.setdefault(s.subject, set()).add(assignment[s.stem])
    assert all(len(f) == 1 for f in by_subject.values())
    for source in ("a", "b"):  # every fold holds images of every folder
        assert {assignment[s.stem] for s in samples if s.source == source} == set(range(folds))
    # each folder's folds are the ones it gets alone (so single-folder figures stay comparable)
    alone, _ = discover_datasets([two_folders[0]])
    assert fold_assignment(alone, folds, seed=0) == {s.stem: assignment[s.stem] for s in samples if s.source == "a"}


def test_too_few_subjects_in_one_folder_is_refused(two_folders):
    samples, _ = discover_datasets(list(two_folders))
    with pytest.raises(ConfigError, match="in every data folder.*a has 5"):
        fold_assignment(samples, 6, seed=0)


def test_val_fraction_split_is_made_within_each_folder(two_folders):
    samples, _ = discover_datasets(list(two_folders))
    train, val = split_samples(samples, seed=3, val_fraction=0.34)
    assert {s.source for s in val} == {"a", "b"} and {s.source for s in train} == {"a", "b"}
    assert not {s.subject for s in train} & {s.subject for s in val}


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.lists(st.integers(1, 4), min_size=3, max_size=9), min_size=2, max_size=3),
       folds=st.integers(2, 3), seed=st.integers(0, 99))
def test_fold_property_over_random_sources(sizes, folds, seed):
    samples = []
    for k, subject_sizes in enumerate(sizes):
        for j, n in enumerate(subject_sizes):
            samples += [Sample(stem=f"s{k}_{j}_{i}", image_path=Path("x"), mask_path=None,
                               subject=f"src{k}/p{j}", source=f"src{k}") for i in range(n)]
    assignment = fold_assignment(samples, folds, seed)
    for s in samples:
        same_subject = {assignment[t.stem] for t in samples if t.subject == s.subject}
        assert same_subject == {assignment[s.stem]}
    for k in range(len(sizes)):
        assert {assignment[s.stem] for s in samples if s.source == f"src{k}"} == set(range(folds))


def test_same_sample_name_in_two_folders_is_refused(tmp_path):
    a = write_ellipse_dataset(tmp_path / "a", 3)
    b = write_ellipse_dataset(tmp_path / "b", 3)
    with pytest.raises(InputError, match="unique across --data folders"):
        discover_datasets([a, b])


def test_source_names_are_distinct():
    assert source_names(["x/usgra", "y/wrist"]) == ["usgra", "wrist"]
    assert source_names(["x/data", "y/data"]) == ["x/data", "y/data"]
    assert source_names(["data", "data/"]) != ["data", "data"]


def test_data_config_keeps_one_folder_a_string_and_refuses_repeats():
    assert DataConfig(data_dir=["only"]).data_dir == "only"
    assert DataConfig(data_dir=["a", "b"]).data_dirs == ("a", "b")
    with pytest.raises(ConfigError, match="twice"):
        DataConfig(data_dir=["a", "a"])
    with pytest.raises(ConfigError):
        DataConfig(data_dir=[])
    config = RunConfig(data=DataConfig(data_dir=("a", "b")))
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))).data.data_dirs == ("a", "b")


def test_train_and_evaluate_on_two_folders(two_folders, tmp_path, capsys):
    a, b = two_folders
    run = tmp_path / "run"
    assert main(["train", "--data", str(a), "--data", str(b), "--folds", "2", "--fold", "0", "--size", "64",
                 "--epochs", "1", "--out", str(run), "--quiet", "--no-amp"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["data_dir"] == [str(a.resolve()), str(b.resolve())]
    assert any(s.startswith("b") for s in config["val_stems"]) and any(not s.startswith("b") for s in config["val_stems"])
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run), "--data", str(a), "--data", str(b), "--subset", "val",
                 "--out", str(out), "--quiet", "--no-overlays"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["by_source"]) == {"a", "b"}
    assert sum(m["n_images"] for m in metrics["by_source"].values()) == metrics["n_images"] == len(config["val_stems"])
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["source"] for r in rows} == {"a", "b"}
    # each folder's mean Dice is the mean over its own rows
    for source, m in metrics["by_source"].items():
        dice = [float(r["dice"]) for r in rows if r["source"] == source]
        assert m["dice"]["mean"] == pytest.approx(np.mean(dice), abs=1e-6)
    assert "area_agreement" in metrics and (out / "bland_altman.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "a: dice" in printed and "b: dice" in printed


def test_evaluate_predictions_takes_one_folder(two_folders, tmp_path, capsys):
    a, b = two_folders
    assert main(["evaluate", "--predictions", str(tmp_path), "--data", str(a), "--data", str(b),
                 "--out", str(tmp_path / "e")]) == 2
    assert "one --data" in capsys.readouterr().err
