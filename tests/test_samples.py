"""Finding image/mask pairs, the manifest, and subject-grouped splits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from nerveseg.data import Sample, discover_samples, fold_assignment, read_manifest, split_samples
from nerveseg.errors import ConfigError, InputError


def _touch(path: Path, data: bytes = b"not decoded") -> Path:
    # Garbage content on purpose: discovery must pair files without decoding them.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _dataset(root: Path, images: list[str], masks: list[str], manifest: str | None = None) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for name in images:
        _touch(root / "images" / name)
    for name in masks:
        _touch(root / "masks" / name)
    if manifest is not None:
        (root / "manifest.csv").write_text(manifest)
    return root


def _samples(subjects: dict[str, int], test: set[str] = frozenset()) -> list[Sample]:
    """``{subject: n_images}`` -> samples named ``<subject>_<i>``."""
    out = []
    for subject, n in subjects.items():
        for i in range(n):
            stem = f"{subject}_{i}"
            out.append(Sample(stem, Path(f"images/{stem}.png"), Path(f"masks/{stem}.png"), subject,
                              split="test" if subject in test else ""))
    return out


# ------------------------------------------------------------------------------------------------
# discover_samples
# ------------------------------------------------------------------------------------------------


def test_pairing_by_stem(tmp_path):
    root = _dataset(tmp_path, ["b.png", "a.jpg", "c.tif"], ["c.png", "a.png", "b.json"])
    samples, problems = discover_samples(root)
    assert problems == []
    assert [s.stem for s in samples] == ["a", "b", "c"]  # sorted
    a, b, c = samples
    assert a.image_path == root / "images" / "a.jpg" and a.mask_path == root / "masks" / "a.png"
    assert b.mask_path == root / "masks" / "b.json"  # LabelMe mask
    assert c.image_path.name == "c.tif"
    assert all(s.subject == s.stem for s in samples)  # no manifest: one subject per image


def test_png_preferred_over_json(tmp_path):
    root = _dataset(tmp_path, ["a.png"], ["a.json", "a.png"])
    samples, problems = discover_samples(root)
    assert problems == [] and samples[0].mask_path.name == "a.png"


def test_missing_masks_reported_not_fatal(tmp_path):
    root = _dataset(tmp_path, ["a.png", "b.png", "c.png"], ["a.png", "orphan.png"])
    samples, problems = discover_samples(root)
    assert [s.stem for s in samples] == ["a"]
    messages = [str(p) for p in problems]
    assert any("b.png" in m and "add masks/b.png or remove the image" in m for m in messages)
    assert any("c.png" in m and "has no mask" in m for m in messages)
    assert any("orphan.png" in m and "no matching image" in m for m in messages)
    assert len(problems) == 3
    assert all(isinstance(p, InputError) for p in problems)


def test_masks_not_required(tmp_path):
    root = _dataset(tmp_path, ["a.png", "b.png"], ["a.png"])
    samples, problems = discover_samples(root, require_masks=False)
    assert problems == []
    assert [(s.stem, s.mask_path is None) for s in samples] == [("a", False), ("b", True)]
    (tmp_path / "only_images" / "images").mkdir(parents=True)
    _touch(tmp_path / "only_images" / "images" / "x.png")
    samples, _ = discover_samples(tmp_path / "only_images", require_masks=False)
    assert samples[0].mask_path is None


def test_unknown_types_and_hidden_files(tmp_path):
    root = _dataset(tmp_path, ["a.png", "notes.txt", ".DS_Store", "._a.png"],
                    ["a.png", ".DS_Store", "b.jpg"])
    samples, problems = discover_samples(root)
    assert [s.stem for s in samples] == ["a"]
    messages = [str(p) for p in problems]
    assert len(messages) == 2
    assert any("notes.txt" in m and ".png" in m for m in messages)  # lists supported types
    assert any("b.jpg" in m and "JPEG" in m for m in messages)  # lossy mask refused early
    assert not any("DS_Store" in m for m in messages)


def test_ambiguous_image_stem(tmp_path):
    root = _dataset(tmp_path, ["a.png", "a.jpg", "b.png"], ["a.png", "b.png"])
    samples, problems = discover_samples(root)
    assert [s.stem for s in samples] == ["b"]
    assert len(problems) == 1 and "several images share the stem 'a'" in str(problems[0])


def test_missing_folders_fatal(tmp_path):
    with pytest.raises(InputError, match="images.*not found.*masks/"):
        discover_samples(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(InputError, match="masks.*not found"):
        discover_samples(tmp_path)
    with pytest.raises(InputError, match="data folder not found"):
        discover_samples(tmp_path / "nowhere")


def test_manifest_metadata(tmp_path):
    manifest = (
        "\ufeffFile,Subject,device,region,side,split\n"  # BOM and capitalised headers, as Excel saves
        "a.png,p1,GE,wrist,left,train\n"
        "b,p1,GE,wrist,right,\n"
        "images/c.jpg, p2 ,Sono,elbow,left,TEST\n"
    )
    root = _dataset(tmp_path, ["a.png", "b.png", "c.jpg", "d.png"], ["a.png", "b.png", "c.png", "d.png"],
                    manifest)
    samples, problems = discover_samples(root)
    assert problems == []
    by = {s.stem: s for s in samples}
    assert by["a"] == Sample("a", root / "images/a.png", root / "masks/a.png", "p1", "GE", "wrist", "left", "train")
    assert by["b"].subject == "p1" and by["b"].side == "right"
    assert by["c"].subject == "p2" and by["c"].split == "test"
    assert by["d"].subject == "d" and by["d"].device == ""  # not in manifest: defaults


def test_manifest_row_without_image_reported(tmp_path):
    root = _dataset(tmp_path, ["a.png"], ["a.png"], "file,subject\na,p1\nghost.png,p2\n")
    samples, problems = discover_samples(root)
    assert len(samples) == 1 and len(problems) == 1
    assert "manifest.csv" in str(problems[0]) and "ghost" in str(problems[0])


def test_read_manifest_stems(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("file,subject,extra\np01.left.png,s1,x\np01.right,s2,\n")
    entries = read_manifest(path)
    # Only known endings are stripped: "p01.right" is a stem, not "p01" with suffix ".right".
    assert set(entries) == {"p01.left", "p01.right"}
    assert entries["p01.left"]["subject"] == "s1" and entries["p01.left"]["extra"] == "x"
    assert entries["p01.right"]["split"] == "" and entries["p01.right"]["device"] == ""


@pytest.mark.parametrize(
    "content, problem",
    [
        ("name,subject\na.png,p1\n", "no 'file' column"),
        ("file,subject\na.png,p1\na,p2\n", "listed twice"),
        ("file,split\na.png,testing\n", "unknown split 'testing'"),
        ("file,subject\n,p1\n", "empty 'file'"),
        ("", "empty"),
    ],
)
def test_read_manifest_errors(tmp_path, content, problem):
    path = tmp_path / "manifest.csv"
    path.write_text(content)
    with pytest.raises(InputError) as e:
        read_manifest(path)
    assert "manifest.csv" in str(e.value) and problem in str(e.value)


def test_bad_manifest_is_fatal_for_discovery(tmp_path):
    root = _dataset(tmp_path, ["a.png"], ["a.png"], "file\na\na.png\n")
    with pytest.raises(InputError, match="listed twice"):
        discover_samples(root)


# ------------------------------------------------------------------------------------------------
# split_samples / fold_assignment
# ------------------------------------------------------------------------------------------------

# 12 subjects with 1..4 images each (30 images), subject "t" held out as test.
SUBJECTS = {f"s{i:02d}": 1 + i % 4 for i in range(12)}
SUBJECTS["t"] = 3


def _subjects(samples: list[Sample]) -> set[str]:
    return {s.subject for s in samples}


def test_fraction_split_grouped_and_sized():
    samples = _samples(SUBJECTS, test={"t"})
    train, val = split_samples(samples, seed=0, val_fraction=0.25)
    assert not _subjects(train) & _subjects(val)
    assert "t" not in _subjects(train) | _subjects(val)  # held out
    assert len(train) + len(val) == 30
    assert abs(len(val) - 7.5) <= 2  # whole subjects of up to 4 images, nearest to 25% of 30
    assert train == sorted(train, key=lambda s: s.stem) and val == sorted(val, key=lambda s: s.stem)


def test_fraction_split_one_image_per_subject():
    samples = _samples({f"p{i:03d}": 1 for i in range(100)})
    train, val = split_samples(samples, seed=3, val_fraction=0.2)
    assert (len(train), len(val)) == (80, 20)


def test_fraction_split_small_keeps_both_sides():
    samples = _samples({"a": 1, "b": 9})
    for seed in range(6):
        for fraction in (0.01, 0.5, 0.99):
            train, val = split_samples(samples, seed=seed, val_fraction=fraction)
            assert len(_subjects(train)) == 1 and len(_subjects(val)) == 1


def test_split_deterministic_and_seed_dependent():
    samples = _samples(SUBJECTS, test={"t"})
    first = split_samples(samples, seed=7)
    assert split_samples(list(reversed(samples)), seed=7) == first  # input order does not matter
    vals = {tuple(s.stem for s in split_samples(samples, seed=seed)[1]) for seed in range(5)}
    assert len(vals) > 1
    folds = {tuple(sorted(fold_assignment(samples, 4, seed=seed).items())) for seed in range(5)}
    assert len(folds) > 1
    assert fold_assignment(samples, 4, seed=1) == fold_assignment(samples, 4, seed=1)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_partition_non_test_samples(k):
    samples = _samples(SUBJECTS, test={"t"})
    non_test = {s.stem for s in samples if s.split != "test"}
    assignment = fold_assignment(samples, k, seed=1)
    assert set(assignment) == non_test and set(assignment.values()) == set(range(k))
    val_stems: list[str] = []
    for i in range(k):
        train, val = split_samples(samples, seed=1, folds=k, fold=i)
        assert not _subjects(train) & _subjects(val)  # no subject on both sides, every fold
        assert {s.stem for s in train} | {s.stem for s in val} == non_test
        assert {s.stem for s in val} == {stem for stem, f in assignment.items() if f == i}
        val_stems += [s.stem for s in val]
    assert sorted(val_stems) == sorted(non_test)  # every sample validated exactly once
    sizes = Counter(assignment.values())
    assert max(sizes.values()) - min(sizes.values()) <= 4  # greedy balance, groups of <= 4


def test_folds_balanced_by_image_count():
    # Greedy largest first: 6,5,4,3,2,1 into 3 folds -> 6+1, 5+2, 4+3 = 7 each.
    samples = _samples({"a": 6, "b": 5, "c": 4, "d": 3, "e": 2, "f": 1})
    sizes = Counter(fold_assignment(samples, 3, seed=0).values())
    assert sorted(sizes.values()) == [7, 7, 7]
    # Ties go to the lowest fold: 4 single images in 4 folds fill folds 0..3 in dealt order.
    assert sorted(fold_assignment(_samples({c: 1 for c in "wxyz"}), 4).values()) == [0, 1, 2, 3]


def test_manifest_groups_hold_in_every_fold(tmp_path):
    lines = ["file,subject,split"]
    images = []
    for i in range(30):
        lines.append(f"img{i:02d}.png,subj{i % 7},{'test' if i % 7 == 6 else ''}")
        images.append(f"img{i:02d}.png")
    root = _dataset(tmp_path, images, images, "\n".join(lines) + "\n")
    samples, problems = discover_samples(root)
    assert problems == [] and len(samples) == 30
    for k in (2, 3, 6):
        for i in range(k):
            train, val = split_samples(samples, seed=2, folds=k, fold=i)
            assert not _subjects(train) & _subjects(val)
            assert "subj6" not in _subjects(train) | _subjects(val)
    train, val = split_samples(samples, seed=2)
    assert not _subjects(train) & _subjects(val)


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"folds": 5}, "folds and fold"),
        ({"fold": 0}, "folds and fold"),
        ({"folds": 1, "fold": 0}, "folds must be an integer >= 2"),
        ({"folds": 3, "fold": 3}, "fold must be an integer in 0..2"),
        ({"folds": 3, "fold": -1}, "fold must be"),
        ({"folds": 5, "fold": 0}, "at least 5 subjects"),
    ],
)
def test_bad_split_arguments(kwargs, problem):
    samples = _samples({"a": 2, "b": 2, "c": 1, "z": 4}, test={"z"})  # 3 usable subjects
    with pytest.raises(ConfigError, match=problem):
        split_samples(samples, **kwargs)


def test_too_few_subjects():
    with pytest.raises(ConfigError, match="at least 2 subjects"):
        split_samples(_samples({"only": 5}))
    with pytest.raises(ConfigError, match="at least 2 subjects"):
        fold_assignment(_samples({"only": 5, "t": 1}, test={"t"}), 2)
