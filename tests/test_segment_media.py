"""segment on DICOM, cine loops and LabelMe output, with a predictor whose output is known."""

from __future__ import annotations

import csv
import json

import av
import numpy as np
import pytest
from PIL import Image

from nerveseg.data import read_labelme_mask
from nerveseg.inference.calibration import _reset_no_calibration_warning
from nerveseg.inference.segment import SegmentOptions, segment_files
from nerveseg.inference.video import VideoWriter
from test_calibration import make_ds, region, save


class DiscPredictor:
    """Probability 0.9 inside a disc of radius ``r`` at the image centre; frames listed in
    ``empty_frames`` (counted across calls) get 0 everywhere."""

    def __init__(self, r: float = 12, empty_frames=()):
        self.r, self.empty, self.calls = r, set(empty_frames), 0

    def predict_many(self, images, batch_size=4):
        out = []
        for image in images:
            h, w = image.shape
            yy, xx = np.mgrid[:h, :w]
            prob = np.where((yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= self.r**2, 0.9, 0.02).astype(np.float32)
            out.append(np.zeros_like(prob) if self.calls in self.empty else prob)
            self.calls += 1
        return out


def _rows(out):
    with open(out / "measurements.csv", newline="") as f:
        return list(csv.DictReader(f))


def _frames_in(path):
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def test_multiframe_dicom_with_ultrasound_region_gives_mm2(tmp_path):
    pixels = (np.random.default_rng(0).random((3, 80, 100)) * 255).astype(np.uint8)
    ds = make_ds(pixels, frames=3)
    ds.SequenceOfUltrasoundRegions = [region(dx=0.006, dy=0.006)]
    path = save(ds, tmp_path / "cine.dcm")
    out = tmp_path / "out"
    result = segment_files([path], DiscPredictor(), out, log=lambda m: None)
    rows = _rows(out)
    assert [int(r["frame"]) for r in rows] == [0, 1, 2] and not result.problems
    for row in rows:
        area_px = int(row["area_px"])
        assert area_px > 400
        assert float(row["area_mm2"]) == pytest.approx(area_px * 0.0036, rel=0.005)
        assert "region" in row["spacing_source"].lower() and row["spacing_mm"] == "0.06 x 0.06"
    assert _frames_in(out / "cine_overlay.mp4") == 3
    assert len(list((out / "cine_masks").glob("frame_*.png"))) == 3
    assert (out / "cine_csa.png").stat().st_size > 1000
    assert json.loads((out / "videos.json").read_text())[0]["frames"] == 3


def _write_cine(path, n, h=48, w=64):
    writer = VideoWriter(path, fps=10)
    rng = np.random.default_rng(1)
    for _ in range(n):
        writer.write((rng.random((h, w, 3)) * 255).astype(np.uint8))
    writer.close()


def test_mp4_cine_gives_one_row_per_frame_and_overlay_video(tmp_path):
    _write_cine(tmp_path / "loop.mp4", 7)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "out"
    messages = []
    _reset_no_calibration_warning()
    result = segment_files([tmp_path / "broken.mp4", tmp_path / "loop.mp4"], DiscPredictor(), out, log=messages.append)
    rows = _rows(out)
    assert len(rows) == 7 and {r["area_mm2"] for r in rows} == {""}
    assert _frames_in(out / "loop_overlay.mp4") == 7
    assert result.videos[0]["frames"] == 7 and result.videos[0]["fps"] > 0
    assert any("broken.mp4" in m for m in messages)
    assert sum("no calibration" in m for m in messages) == 1  # warned once, never guessed


def test_temporal_smoothing_carries_the_nerve_through_a_dropped_frame(tmp_path):
    _write_cine(tmp_path / "loop.mp4", 4)
    plain = tmp_path / "plain"
    segment_files([tmp_path / "loop.mp4"], DiscPredictor(empty_frames={2}), plain, log=lambda m: None)
    assert "no_nerve" in _rows(plain)[2]["qc_flags"]
    smooth = tmp_path / "smooth"
    options = SegmentOptions(temporal_smoothing=0.6)
    segment_files([tmp_path / "loop.mp4"], DiscPredictor(empty_frames={2}), smooth, options, log=lambda m: None)
    rows = _rows(smooth)
    assert "no_nerve" not in rows[2]["qc_flags"] and int(rows[2]["area_px"]) > 0  # 0.6 * 0.9 >= 0.5


def test_labelme_output_round_trips(tmp_path):
    Image.fromarray((np.random.default_rng(2).random((70, 90)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    segment_files([tmp_path / "a.png"], DiscPredictor(r=15), out, SegmentOptions(labelme=True), log=lambda m: None)
    mask = np.array(Image.open(out / "a_mask.png")) > 0
    back = read_labelme_mask(out / "a.json", label="nerve")
    iou = (mask & back).sum() / (mask | back).sum()
    assert iou > 0.95


def test_postprocess_and_per_component_options(tmp_path):
    Image.fromarray(np.zeros((60, 80), np.uint8)).save(tmp_path / "a.png")

    class TwoBlobs:
        def predict_many(self, images, batch_size=4):
            prob = np.zeros((60, 80), np.float32)
            prob[10:30, 10:30] = 0.9
            prob[40:44, 60:64] = 0.9
            return [prob for _ in images]

    out = tmp_path / "all"
    segment_files([tmp_path / "a.png"], TwoBlobs(), out, SegmentOptions(per_component=True), log=lambda m: None)
    rows = _rows(out)
    assert [r["component"] for r in rows] == ["1", "2"] and [r["area_px"] for r in rows] == ["400", "16"]
    assert all("multi_component" in r["qc_flags"] for r in rows)
    out = tmp_path / "largest"
    segment_files([tmp_path / "a.png"], TwoBlobs(), out, SegmentOptions(postprocess="largest"), log=lambda m: None)
    (row,) = _rows(out)
    assert row["area_px"] == "400" and row["n_components"] == "1"
