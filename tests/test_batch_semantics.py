"""Batch semantics of `nerveseg segment` (issue 12): nothing in the inputs is skipped without a
word, the exit status says whether every input was segmented, --resume skips what is complete,
and a full disk stops the batch with a clear error and the earlier results intact."""

from __future__ import annotations

import csv
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nerveseg.errors import OutputError
from nerveseg.inference import segment as segment_module
from nerveseg.inference.planning import expand_inputs
from nerveseg.inference.resume import completed_inputs
from nerveseg.inference.segment import SegmentOptions, segment_files
from test_segment_media import DiscPredictor, _frames_in, _write_cine


class CountingPredictor(DiscPredictor):
    """DiscPredictor that records which image sizes it was asked about (one call per frame)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.frames = 0

    def predict_many(self, images, batch_size=4):
        self.frames += len(images)
        return super().predict_many(images, batch_size)


def _rows(out: Path) -> list[dict]:
    with open(out / "measurements.csv", newline="") as f:
        return list(csv.DictReader(f))


def _images(folder: Path, n: int, size=(40, 50)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i:02d}.png"
        Image.fromarray((rng.random(size) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------
# nothing vanishes


def test_unknown_types_and_subfolders_are_reported(tmp_path):
    folder = tmp_path / "in"
    _images(folder, 2)
    Image.new("L", (20, 20)).save(folder / "anim.gif")
    (folder / "notes.txt").write_text("scan notes")
    (folder / "day2").mkdir()
    _images(folder / "day2", 1)
    (folder / ".DS_Store").write_bytes(b"\0")  # hidden and system files are no input
    (folder / "Thumbs.db").write_bytes(b"\0")
    files, problems = expand_inputs([folder])
    assert [f.name for f in files] == ["img00.png", "img01.png"]
    reported = {p.path.name: str(p) for p in problems}
    assert set(reported) == {"anim.gif", "notes.txt", "day2"}
    assert "unsupported file type '.gif'" in reported["anim.gif"]
    assert "sub-folders are not searched" in reported["day2"]


def test_extensionless_dicom_in_a_folder_is_segmented(tmp_path):
    from test_calibration import make_ds, save

    folder = tmp_path / "pacs"
    folder.mkdir()
    save(make_ds((np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)), folder / "IM0001")
    (folder / "README").write_text("not a DICOM")
    files, problems = expand_inputs([folder])
    assert [f.name for f in files] == ["IM0001"]
    assert [p.path.name for p in problems] == ["README"]


def test_output_folder_inside_the_input_folder_is_not_reported(tmp_path):
    folder = tmp_path / "in"
    _images(folder, 2)
    result = segment_files([folder], DiscPredictor(), folder / "seg", log=lambda m: None)
    assert not result.problems and len(result.rows) == 2
    result = segment_files([folder], DiscPredictor(), folder / "seg", log=lambda m: None)  # again: seg/ exists now
    assert not result.problems


def test_exit_status_is_1_after_every_other_input_is_done(tmp_path, capsys):
    from nerveseg.cli.main import main

    folder = tmp_path / "in"
    _images(folder, 2, size=(64, 64))
    Image.new("L", (20, 20)).save(folder / "anim.gif")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "sub").mkdir()
    out = tmp_path / "out"
    assert main(["segment", str(folder), "--out", str(out), "--backend", "torch"]) == 1
    err = capsys.readouterr().err
    for name in ("anim.gif", "broken.png", "sub", "exit status 1"):
        assert name in err
    assert {Path(r["file"]).name for r in _rows(out)} == {"img00.png", "img01.png"}  # the good ones are done
    assert (out / "img01_overlay.png").is_file()

    clean = tmp_path / "clean"
    _images(clean, 1, size=(64, 64))
    assert main(["segment", str(clean), "--out", str(tmp_path / "out2"), "--backend", "torch"]) == 0


def test_exit_codes_are_in_the_help(capsys):
    from nerveseg.cli.main import main

    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = capsys.readouterr().out
    assert "exit status:" in text and "--resume" in text
    for code in ("0 ", "1 ", "2 "):
        assert f"\n  {code}" in text


# ------------------------------------------------------------------------------------------------
# --resume


def test_resume_skips_complete_inputs_and_keeps_every_row(tmp_path):
    folder = tmp_path / "in"
    _images(folder, 5)
    _write_cine(folder / "loop.mp4", 4)
    out = tmp_path / "out"
    full = CountingPredictor()
    segment_files([folder], full, out, log=lambda m: None)
    reference = _rows(out)
    assert full.frames == 9 and len(reference) == 9

    # damage the set the way an interrupted run leaves it
    (out / "img01_overlay.png").unlink()                       # a still missing one file
    rows = [r for r in reference if not r["file"].endswith("img03.png")]  # a still without its rows
    with open(out / "measurements.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(reference[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "loop_overlay.mp4").unlink()                        # a loop whose video never got its name

    again = CountingPredictor()
    messages = []
    result = segment_files([folder], again, out, log=messages.append, resume=True)
    assert again.frames == 1 + 1 + 4  # img01, img03 and the loop; img00, img02, img04 kept
    assert sorted(p.name for p in result.skipped) == ["img00.png", "img02.png", "img04.png"]
    assert any("3 input(s) already complete" in m for m in messages)
    final = _rows(out)
    assert [(r["file"], r["frame"]) for r in final] == [(r["file"], r["frame"]) for r in reference]  # input order
    assert [r["area_px"] for r in final] == [r["area_px"] for r in reference]
    assert _frames_in(out / "loop_overlay.mp4") == 4
    assert json.loads((out / "videos.json").read_text())[0]["frames"] == 4

    # everything complete: nothing is predicted, the csv is unchanged, videos.json keeps the loop
    idle = CountingPredictor()
    result = segment_files([folder], idle, out, log=lambda m: None, resume=True)
    assert idle.frames == 0 and len(result.skipped) == 6 and not result.problems
    assert _rows(out) == final
    assert json.loads((out / "videos.json").read_text())[0]["file"].endswith("loop.mp4")


def test_complete_means_rows_and_files(tmp_path):
    folder = tmp_path / "in"
    paths = _images(folder, 2)
    out = tmp_path / "out"
    segment_files(paths, DiscPredictor(), out, SegmentOptions(labelme=True), log=lambda m: None)
    stems = ["img00", "img01"]
    assert set(completed_inputs(paths, stems, out, ["nerve"], labelme=True)) == set(paths)
    (out / "img00.json").unlink()  # LabelMe asked for and missing: not complete
    assert set(completed_inputs(paths, stems, out, ["nerve"], labelme=True)) == {paths[1]}
    assert set(completed_inputs(paths, stems, out, ["nerve"], labelme=False)) == set(paths)
    # a two-class model also needs the vessel masks
    assert set(completed_inputs(paths, stems, out, ["nerve", "vessel"], labelme=False)) == set()
    # an unreadable measurements.csv: everything is done again
    (out / "measurements.csv").write_bytes(b"\xff\xfe\x00broken")
    messages = []
    assert completed_inputs(paths, stems, out, ["nerve"], False, log=messages.append) == {}
    assert "cannot read the earlier measurements" in messages[0]


def test_resume_without_earlier_output_segments_everything(tmp_path):
    paths = _images(tmp_path / "in", 2)
    pred = CountingPredictor()
    result = segment_files(paths, pred, tmp_path / "new", log=lambda m: None, resume=True)
    assert pred.frames == 2 and not result.skipped and len(_rows(tmp_path / "new")) == 2


def test_repeated_stems_keep_their_names_on_resume(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pa, pb = _images(a, 1)[0], _images(b, 1)[0]  # both img00.png
    out = tmp_path / "out"
    segment_files([pa, pb], DiscPredictor(), out, log=lambda m: None)
    assert (out / "img00_mask.png").is_file() and (out / "img00_2_mask.png").is_file()
    (out / "img00_2_overlay.png").unlink()
    pred = CountingPredictor()
    result = segment_files([pa, pb], pred, out, log=lambda m: None, resume=True)
    assert pred.frames == 1 and result.skipped == [pa] and (out / "img00_2_overlay.png").is_file()


# ------------------------------------------------------------------------------------------------
# a full disk (simulated: a small tmpfs needs a root mount, so the write path raises ENOSPC)


def test_full_disk_stops_with_a_clear_error_and_earlier_results_intact(tmp_path, monkeypatch):
    paths = _images(tmp_path / "in", 4)
    out = tmp_path / "out"
    segment_files(paths[:2], DiscPredictor(), out, log=lambda m: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real_replace = os.replace
    calls = {"n": 0}

    def replace(src, dst, *args, **kwargs):  # the third atomic write from now finds the disk full
        calls["n"] += 1
        if calls["n"] >= 3:
            Path(src).unlink(missing_ok=True)
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError, match="No space left on device") as info:
        segment_files(paths, DiscPredictor(), out, log=lambda m: None, resume=True)
    message = str(info.value)
    assert str(out) in message and "--resume" in message and "intact" in message
    monkeypatch.undo()
    # every earlier file is unchanged, no temporary file is left, nothing half-written has a final name
    for name, data in before.items():
        assert (out / name).read_bytes() == data, name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert {Path(r["file"]).name for r in _rows(out)} == {"img00.png", "img01.png"}
    # space again: --resume completes the set
    pred = CountingPredictor()
    segment_files(paths, pred, out, log=lambda m: None, resume=True)
    assert {Path(r["file"]).name for r in _rows(out)} == {p.name for p in paths}
    assert pred.frames == 2


def test_full_disk_through_the_cli_is_exit_2(tmp_path, monkeypatch, capsys):
    from nerveseg.cli.main import main

    paths = _images(tmp_path / "in", 1, size=(64, 64))

    def full(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    assert main(["segment", str(paths[0]), "--out", str(tmp_path / "out"), "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err


def test_full_disk_during_a_loop_leaves_no_video_under_its_final_name(tmp_path, monkeypatch):
    _write_cine(tmp_path / "loop.mp4", 6)
    from nerveseg.inference import overlay

    real_save = overlay.save_png
    count = {"n": 0}

    def save_png(array, path):
        count["n"] += 1
        if count["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(array, path)

    monkeypatch.setattr(segment_module, "save_png", save_png)
    out = tmp_path / "out"
    with pytest.raises(OutputError):
        segment_files([tmp_path / "loop.mp4"], DiscPredictor(), out, log=lambda m: None)
    assert not (out / "loop_overlay.mp4").exists()
    assert not list(out.glob(".*partial*"))


def test_resume_removes_only_what_an_interrupted_write_left(tmp_path):
    from nerveseg.inference.resume import remove_stale_temporaries

    out = tmp_path / "out"
    (out / "loop_masks").mkdir(parents=True)
    stale = [out / ".a_mask.png.k3j_x9aq.tmp.png", out / ".measurements.csv.abcdefgh.tmp.csv",
             out / ".loop_overlay.partial.mp4", out / "loop_masks" / ".frame_00003.png.Zz09ab_c.tmp.png"]
    kept = [out / "a_mask.png", out / ".hidden_by_the_user", out / "notes.tmp", out / "loop_masks" / "frame_00000.png"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert remove_stale_temporaries(out) == len(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
