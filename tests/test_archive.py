"""Segmenting an archive (issue 13): folder trees and lists of files, results that mirror the
inputs' relative paths, --shard I/N jobs that need no coordination, --resume per job, and one
measurements table from `nerveseg collect` that is the same bytes however the work was split."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nerveseg.cli import main
from nerveseg.errors import InputError
from nerveseg.inference.archive import collect
from nerveseg.inference.planning import plan_inputs, read_input_list, shard_file_names, shard_of
from nerveseg.inference.segment import segment_files
from test_batch_semantics import CountingPredictor
from test_segment_media import DiscPredictor, _write_cine

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis: pip install -e '.[test]'")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

QUIET = dict(log=lambda m: None)


def _image(path: Path, seed: int = 0, size=(40, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image = (0.3 + 0.1 * rng.standard_normal(size)).clip(0, 1)
    yy, xx = np.mgrid[: size[0], : size[1]]
    image[((yy - size[0] / 2) / 8) ** 2 + ((xx - size[1] / 2) / 11) ** 2 <= 1] += 0.4
    Image.fromarray((image.clip(0, 1) * 255).astype(np.uint8)).save(path)
    return path


ARCHIVE = ["a/case.png", "b/case.png", "a/deep/x.png", "top.png", "b/c/scan1.png", "b/c/scan2.png",
           "a/other.png", "z/last.png", "b/c/d/e.png"]


def _archive(root: Path, names=ARCHIVE) -> Path:
    for i, name in enumerate(names):
        _image(root / name, seed=i, size=(40 + 4 * (i % 3), 50 + 6 * (i % 2)))
    return root


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------
# the output tree mirrors the inputs


def test_same_named_files_in_different_subfolders_never_collide(tmp_path):
    root = _archive(tmp_path / "root")
    _image(root / "a" / "case.jpg", seed=42)  # same stem in the same folder: case and case_2
    (root / "loops").mkdir()
    _write_cine(root / "loops" / "loop.mp4", 3)
    (root / "a" / ".hidden").mkdir()  # hidden folders are passed over, as hidden files are
    _image(root / "a" / ".hidden" / "junk.png")
    out = root / "seg"  # the output folder inside the archive is not an input
    result = segment_files([root], DiscPredictor(), out, recursive=True, **QUIET)
    assert not result.problems
    for name in ("a/case", "a/case_2", "b/case", "a/deep/x", "top", "b/c/d/e"):
        assert (out / f"{name}_mask.png").is_file() and (out / f"{name}_overlay.png").is_file(), name
    assert (out / "loops" / "loop_overlay.mp4").is_file() and len(list((out / "loops" / "loop_masks").glob("*.png"))) == 3
    rows = _rows(out / "measurements.csv")
    assert list(rows[0])[:3] == ["file", "relpath", "frame"]
    # sorted by relative path: the order does not depend on how the inputs were given
    stills = [r["relpath"] for r in rows if r["frame"] == "0"]
    assert stills == sorted(stills) and "a/case.jpg" in stills and "b/c/d/e.png" in stills
    assert {r["file"] for r in rows} >= {str(root / "a" / "case.png"), str(root / "b" / "case.png")}
    assert not (out / "seg").exists() and not list(out.rglob("junk*"))


def test_several_folders_are_relative_to_their_common_parent_and_plain_folders_stay_flat(tmp_path):
    _archive(tmp_path / "day1", ["case.png", "sub/x.png"])
    _archive(tmp_path / "day2", ["case.png"])
    items, problems = plan_inputs([tmp_path / "day1", tmp_path / "day2"], tmp_path / "out", recursive=True)
    assert not problems
    assert [(it.relpath, it.name) for it in items] == [("day1/case.png", "day1/case"), ("day1/sub/x.png", "day1/sub/x"),
                                                       ("day2/case.png", "day2/case")]
    # a link back up the tree is reported, not walked forever
    os.symlink(tmp_path / "day1", tmp_path / "day1" / "sub" / "up")
    items, problems = plan_inputs([tmp_path / "day1"], tmp_path / "out", recursive=True)
    assert [it.relpath for it in items] == ["case.png", "sub/x.png"]
    assert [p.path.name for p in problems] == ["up"] and "already searched" in str(problems[0])
    (tmp_path / "day1" / "sub" / "up").unlink()
    # without --recursive or --list: today's flat names, and the sub-folder is reported
    items, problems = plan_inputs([tmp_path / "day1", tmp_path / "day2"], tmp_path / "out")
    assert [it.name for it in items] == ["case", "case_2"] and {it.relpath for it in items} == {None}
    assert [p.path.name for p in problems] == ["sub"] and "--recursive" in str(problems[0])


# ------------------------------------------------------------------------------------------------
# a list of files


def test_csv_list_with_bad_lines_reports_them_and_goes_on(tmp_path):
    root = _archive(tmp_path / "root", ["a/case.png", "b/case.png"])
    outside = _image(tmp_path / "elsewhere" / "far.png")
    (root / "notes.txt").write_text("not an image")
    listing = root / "files.csv"
    listing.write_text("subject,path\n"
                       "s1,a/case.png\n"
                       "s2,missing/x.png\n"
                       "s3,\n"
                       "s4,notes.txt\n"
                       f"s5,{outside}\n"
                       "s6,b/case.png\n", encoding="utf-8")
    out = tmp_path / "out"
    messages = []
    result = segment_files([], DiscPredictor(), out, list_file=listing, log=messages.append)
    assert (out / "a" / "case_mask.png").is_file() and (out / "b" / "case_mask.png").is_file()
    # outside the list's folder: the whole absolute path is mirrored (cannot leave OUT or collide)
    far = out / Path(str(outside.parent).lstrip("/")) / "far_mask.png"
    assert far.is_file()
    problems = {str(p) for p in result.problems}
    assert len(problems) == 3
    missing = next(p for p in problems if "missing" in p)
    assert "line 3" in missing and "no such file" in missing and str(root) in missing  # names the file and the fix
    assert any("line 4" in p and "'path' cell is empty" in p for p in problems)
    assert any("notes.txt" in p and "unsupported file type" in p for p in problems)
    assert {r["relpath"] for r in _rows(out / "measurements.csv")} == {"a/case.png", "b/case.png",
                                                                        str(outside).lstrip("/")}
    assert sum(m.startswith("error:") for m in messages) == 3


def test_plain_text_list_and_a_csv_without_a_path_column(tmp_path):
    root = _archive(tmp_path / "root", ["a/one, two.png", "b.png"])
    text = root / "list.txt"
    text.write_text("# scans of 2024\n\na/one, two.png\nb.png\n")
    entries, problems = read_input_list(text)
    assert [(p.name, line) for p, line in entries] == [("one, two.png", 3), ("b.png", 4)] and not problems
    bad = root / "list.csv"
    bad.write_text("file,subject\na/x.png,1\n")
    with pytest.raises(InputError, match="no column 'path'") as info:
        read_input_list(bad)
    assert "first line" in info.value.fix
    with pytest.raises(InputError, match="no such list"):
        read_input_list(root / "nope.csv")


# ------------------------------------------------------------------------------------------------
# shards


@settings(max_examples=60, deadline=None)
@given(names=st.lists(st.text(alphabet="abc/_.0123456789", min_size=1, max_size=12), unique=True, max_size=40),
       count=st.integers(1, 4))
def test_shards_partition_any_set_of_names(names, count):
    shards = [[n for n in names if shard_of(n, count) == i] for i in range(count)]
    assert sorted(n for s in shards for n in s) == sorted(names)  # every input exactly once
    assert all(0 <= shard_of(n, count) < count for n in names)


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shard_jobs_segment_every_input_exactly_once(tmp_path, count):
    root = _archive(tmp_path / "root")
    out = tmp_path / "out"
    seen, frames = [], 0
    for index in range(count):
        pred = CountingPredictor()
        result = segment_files([root], pred, out, recursive=True, shard=(index, count), **QUIET)
        seen += [str(p) for p in (r["file"] for r in result.rows)]
        frames += pred.frames
        table = out / shard_file_names((index, count))[0]
        assert table.is_file() and {r["file"] for r in _rows(table)} == {r["file"] for r in result.rows}
    assert sorted(seen) == sorted(str(root / n) for n in ARCHIVE) and frames == len(ARCHIVE)
    assert len(list(out.rglob("*_mask.png"))) == len(ARCHIVE)
    assert collect(out, **QUIET).complete


def test_flat_inputs_can_be_sharded_too(tmp_path):
    folder = _archive(tmp_path / "in", ["a.png", "b.png", "c.png", "d.png"])
    for index in range(2):
        segment_files([folder], DiscPredictor(), tmp_path / "out", shard=(index, 2), **QUIET)
    result = collect(tmp_path / "out", **QUIET)
    rows = _rows(result.table)
    assert [Path(r["file"]).name for r in rows] == ["a.png", "b.png", "c.png", "d.png"] and "relpath" not in rows[0]


# ------------------------------------------------------------------------------------------------
# one table, whatever the split: through the command line, with a real (tiny, untrained) network


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from nerveseg.config import DataConfig, ModelConfig, PreprocessConfig, RunConfig
    from nerveseg.models import create
    from nerveseg.training.checkpoint import save_weights

    run = tmp_path_factory.mktemp("tiny") / "run"
    run.mkdir()
    config = RunConfig(model=ModelConfig("sa_unet", {"features": [4, 8, 16, 32, 64]}),
                       preprocess=PreprocessConfig(size=32), data=DataConfig(label=1))
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    torch.manual_seed(0)
    save_weights(create("sa_unet", features=[4, 8, 16, 32, 64]), run / "model.safetensors")
    return run


def _segment(root, run, out, *extra) -> int:
    return main(["segment", str(root), "--recursive", "--model", str(run), "--out", str(out), "--backend", "torch",
                 "--threads", "1", *extra])


def test_collected_table_is_byte_identical_for_one_job_three_jobs_and_a_resumed_job(tmp_path, tiny_run, capsys):
    root = _archive(tmp_path / "root")
    one, three = tmp_path / "one", tmp_path / "three"
    assert _segment(root, tiny_run, one) == 0
    assert main(["collect", str(one)]) == 0
    reference = (one / "measurements.csv").read_bytes()
    assert len(_rows(one / "measurements.csv")) == len(ARCHIVE)

    for index in range(3):
        assert _segment(root, tiny_run, three, "--shard", f"{index}/3") == 0
    assert "nerveseg collect" in capsys.readouterr().out
    assert main(["collect", str(three)]) == 0
    assert (three / "measurements.csv").read_bytes() == reference
    for mask in one.rglob("*_mask.png"):  # and the same masks, at the same relative paths
        assert (three / mask.relative_to(one)).read_bytes() == mask.read_bytes(), mask

    # interrupt job 1: its last input lost its rows (killed before the table was rewritten), an
    # earlier one lost a file, and it left a temporary; job 2 is writing one of its own right now
    table = three / "measurements.shard-1-of-3.csv"
    rows = _rows(table)
    assert len(rows) >= 2, "the hash gives job 1 at least two of the nine inputs"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:-1])
    first = three / (Path(rows[0]["relpath"]).with_suffix("").as_posix() + "_overlay.png")
    first.unlink()
    own_tmp = first.parent / f".{first.name}.abcd1234.tmp.png"
    own_tmp.write_bytes(b"half")
    status = three / "segment.shard-1-of-3.json"
    status.write_text(json.dumps({**json.loads(status.read_text()), "finished": False}))
    job2 = _rows(three / "measurements.shard-2-of-3.csv")[0]
    foreign_tmp = (three / job2["relpath"]).parent / ".writing_mask.png.zz99yy88.tmp.png"
    foreign_tmp.write_bytes(b"in progress")

    assert main(["collect", str(three)]) == 1  # incomplete: says so, and which input is missing
    err = capsys.readouterr().err
    assert "job 1/3 has not finished" in err and f"missing: {rows[-1]['file']}" in err
    report = json.loads((three / "collect.json").read_text())
    assert report["missing"] == [rows[-1]["file"]] and not report["complete"]

    assert _segment(root, tiny_run, three, "--shard", "1/3", "--resume") == 0
    assert f"({len(rows) - 2} already complete, kept)" in capsys.readouterr().out  # the two damaged ones redone
    assert not own_tmp.exists() and foreign_tmp.exists()  # a job removes only its own leftovers
    assert first.is_file()
    assert main(["collect", str(three)]) == 0
    assert (three / "measurements.csv").read_bytes() == reference
    # --collect-only with the inputs: the same table, and every input accounted for
    foreign_tmp.unlink()
    assert _segment(root, tiny_run, three, "--collect-only") == 0
    assert (three / "measurements.csv").read_bytes() == reference


def test_resumed_job_redoes_only_what_it_lost(tmp_path):
    root = _archive(tmp_path / "root")
    out = tmp_path / "out"
    for index in range(2):
        segment_files([root], DiscPredictor(), out, recursive=True, shard=(index, 2), **QUIET)
    reference = collect(out, **QUIET)
    expected = reference.table.read_bytes()
    rows = _rows(out / "measurements.shard-0-of-2.csv")
    lost = out / (Path(rows[0]["relpath"]).with_suffix("").as_posix() + "_mask.png")
    lost.unlink()
    again = CountingPredictor()
    result = segment_files([root], again, out, recursive=True, shard=(0, 2), resume=True, **QUIET)
    assert again.frames == 1 and len(result.skipped) == len(rows) - 1 and lost.is_file()
    assert collect(out, **QUIET).table.read_bytes() == expected


def test_collect_reports_jobs_that_did_not_run_and_refuses_mixed_splits(tmp_path, capsys):
    root = _archive(tmp_path / "root")
    out = tmp_path / "out"
    segment_files([root], DiscPredictor(), out, recursive=True, shard=(0, 3), **QUIET)
    (root / "top.png").write_bytes(b"\x89PNG broken")
    segment_files([root], DiscPredictor(), out, recursive=True, shard=(2, 3), **QUIET)
    result = collect(out, **QUIET)
    assert any("job 1/3 wrote no table" in p and "--shard 1/3 --resume" in p for p in result.problems)
    assert shard_of("top", 3) == 2  # a stable hash: the same job on every machine and Python
    assert [f["file"] for f in result.failed] == [str(root / "top.png")]  # failed, reported by its job
    assert not result.missing  # job 1's inputs are unknown without its status file; --collect-only knows them
    assert _segment_plan_missing(root, out) == sorted(str(root / n) for n in ("a/case.png", "a/deep/x.png", "z/last.png"))
    assert main(["collect", str(out)]) == 1
    # a table of another split in the same folder: which one to trust cannot be guessed
    (out / "measurements.shard-0-of-2.csv").write_text("file,frame\n")
    assert main(["collect", str(out)]) == 2
    assert "different splits" in capsys.readouterr().err
    assert main(["collect", str(tmp_path / "empty_nothing")]) == 2


def _segment_plan_missing(root, out) -> list[str]:
    items, _ = plan_inputs([root], out, recursive=True)
    return collect(out, planned=[it.path for it in items], **QUIET).missing


def test_segment_needs_inputs_or_a_list_and_a_valid_shard(tmp_path, capsys):
    assert main(["segment", "--out", str(tmp_path / "o")]) == 2
    assert "--list" in capsys.readouterr().err
    image = _image(tmp_path / "x.png")
    assert main(["segment", str(image), "--out", str(tmp_path / "o"), "--shard", "3/3"]) == 2
    assert "0-based" in capsys.readouterr().err
    assert main(["segment", str(image), "--out", str(tmp_path / "o"), "--shard", "two"]) == 2


def test_table_rewrites_are_throttled_in_a_long_batch(tmp_path, monkeypatch):
    """A rewrite costs O(rows): the table is rewritten only after 20x its last rewrite's time."""
    from nerveseg.inference import segment as segment_module

    clock = {"t": 0.0}
    monkeypatch.setattr(segment_module.time, "monotonic", lambda: clock["t"])
    writes = []
    monkeypatch.setattr(segment_module, "write_measurements", lambda path, rows: writes.append(len(rows)))
    table = segment_module._Table(tmp_path / "m.csv")
    table.write([{}] * 1)
    for n in range(2, 6):
        clock["t"] += 0.001  # the inputs come faster than 20 rewrites (the clock is frozen in a rewrite)
        table.write([{}] * n)
    assert writes == [1, 2, 3, 4, 5]  # a zero-cost rewrite is always due
    monkeypatch.setattr(segment_module, "write_measurements",
                        lambda path, rows: (writes.append(len(rows)), clock.__setitem__("t", clock["t"] + 0.01)))
    writes.clear()
    for n in range(6, 1000):
        clock["t"] += 0.001
        table.write([{}] * n)
    gaps = np.diff(writes)
    assert len(writes) >= 3 and gaps.min() >= 190  # 10 ms a rewrite: the next one 0.2 s (200 inputs) later
    assert table.written == writes[-1] < 999
    table.write([{}] * 999, force=True)
    assert table.written == 999
