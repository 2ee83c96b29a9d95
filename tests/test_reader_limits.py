"""Small inputs that cost a reader far more than their size (issue 24, points 3 and 4): a cine
loop of too many frames is refused before a frame is decoded, and a LabelMe polygon of tens of
thousands of vertices is filled by a scanline in milliseconds (or refused when even that would be
slow). The files are generated here, never committed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from skimage import draw

from nerveseg.data import labelme, media
from nerveseg.data.labelme import read_labelme_mask
from nerveseg.data.media import read_media, read_video_frames, video_frame_count
from nerveseg.errors import InputError


def _loop(path: Path, n_frames: int, size: int = 32) -> Path:
    """A cine loop of ``n_frames`` small frames (MPEG-4 Part 2: the fastest encoder PyAV ships)."""
    import av

    base = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.roll(base, i, axis=0), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ------------------------------------------------------------------------------------------------
# cine loops: the frame count before decoding
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop_1001(tmp_path_factory) -> Path:
    return _loop(tmp_path_factory.mktemp("loops") / "loop1001.mp4", 1001)


def test_too_many_frames_are_refused_before_decoding(loop_1001):
    assert loop_1001.stat().st_size < 200_000
    t0 = time.perf_counter()
    with pytest.raises(InputError) as info:
        read_media(loop_1001, max_frames=1000)  # refused on opening, where a video is not decoded
    assert time.perf_counter() - t0 < 15.0  # not a speed test: the server spent 130 s of CPU on the first 1000 frames
    message = str(info.value)
    assert "loop1001.mp4" in message and "1,001 frames" in message and "the limit is 1,000" in message
    assert "split the cine loop" in message


def test_the_servers_advice_replaces_the_default(loop_1001):
    with pytest.raises(InputError, match="--max-frames"):
        read_media(loop_1001, max_frames=1000, frames_fix="split the cine loop, or start the server with a higher --max-frames")


def test_a_loop_within_the_limit_opens_without_decoding(loop_1001):
    t0 = time.perf_counter()
    loop = read_media(loop_1001, max_frames=1001)
    assert loop.n_frames == 1001 and time.perf_counter() - t0 < 15.0  # nothing decoded (reliability.py times it)
    assert next(loop.frames()).shape == (32, 32)


def test_decoding_stops_before_the_frame_past_the_limit(loop_1001):
    # a container whose count is missing or wrong: the frames stop at the limit, frame 1001 is not decoded
    frames = []
    with pytest.raises(InputError, match="more than 1,000 frames") as info:
        for frame in read_video_frames(loop_1001, max_frames=1000):
            frames.append(frame)
    assert len(frames) == 1000 and "loop1001.mp4" in str(info.value)


def test_a_container_without_a_frame_count_is_counted_by_demuxing(tmp_path):
    # Matroska stores no frame count: the packets are counted (no decoding), up to the limit
    path = _loop(tmp_path / "loop.mkv", 30)
    assert read_media(path).n_frames == 0  # unknown, as before
    assert video_frame_count(path) == 30
    assert video_frame_count(path, stop_after=10) == 11
    with pytest.raises(InputError, match="more than 29 frames; the limit is 29"):
        read_media(path, max_frames=29)
    assert sum(1 for _ in read_media(path, max_frames=30).frames()) == 30


def test_without_a_limit_every_frame_is_read(tmp_path):
    path = _loop(tmp_path / "loop.avi", 12)
    assert sum(1 for _ in read_media(path).frames()) == 12


# ------------------------------------------------------------------------------------------------
# LabelMe polygons: a scanline, the same pixels as skimage.draw.polygon
# ------------------------------------------------------------------------------------------------


def _document(path: Path, points, height: int = 512, width: int = 512, shape_type: str = "polygon") -> Path:
    shapes = [{"label": "nerve", "points": p, "shape_type": shape_type} for p in points]
    path.write_text(json.dumps({"shapes": shapes, "imageHeight": height, "imageWidth": width}))
    return path


def _skimage(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    rr, cc = draw.polygon(points[:, 1], points[:, 0], shape=shape)
    mask[rr, cc] = True
    return mask


def test_a_20k_vertex_polygon_is_filled_fast_with_the_right_area(tmp_path):
    # a circle of radius 200 drawn with 20,000 vertices (skimage.draw.polygon took 40 s for it)
    t = np.linspace(0, 2 * np.pi, 20_000, endpoint=False)
    points = np.c_[256 + 200 * np.cos(t), 256 + 200 * np.sin(t)]
    path = _document(tmp_path / "circle.json", [points.tolist()])
    t0 = time.perf_counter()
    mask = read_labelme_mask(path)
    assert time.perf_counter() - t0 < 10.0  # not a speed test: the old fill took 40 s (reliability.py times it)
    assert abs(int(mask.sum()) - np.pi * 200**2) < 0.002 * np.pi * 200**2
    disk = np.zeros_like(mask)
    rr, cc = draw.disk((256, 256), 200, shape=mask.shape)
    disk[rr, cc] = True
    assert int((mask ^ disk).sum()) < 50  # at most a few pixels on the rim differ


def test_a_20k_vertex_rectangle_is_exactly_its_pixels(tmp_path):
    # a rectangle whose sides are cut into 20,000 collinear vertices: exactly rows 100..300, columns 50..450
    side = 5000
    top = np.c_[np.linspace(50, 450, side, endpoint=False), np.full(side, 100.0)]
    right = np.c_[np.full(side, 450.0), np.linspace(100, 300, side, endpoint=False)]
    bottom = np.c_[np.linspace(450, 50, side, endpoint=False), np.full(side, 300.0)]
    left = np.c_[np.full(side, 50.0), np.linspace(300, 100, side, endpoint=False)]
    points = np.concatenate([top, right, bottom, left])
    assert len(points) == 20_000
    path = _document(tmp_path / "rectangle.json", [points.tolist()])
    t0 = time.perf_counter()
    mask = read_labelme_mask(path)
    assert time.perf_counter() - t0 < 10.0  # not a speed test: the old fill took 40 s (reliability.py times it)
    expected = np.zeros((512, 512), bool)
    expected[100:301, 50:451] = True
    assert np.array_equal(mask, expected)


@pytest.mark.parametrize("kind", ["integer", "float", "half", "grid"])
def test_the_scanline_gives_skimages_pixels(kind):
    # random polygons -- concave, self-intersecting, partly outside, with vertices and edges on
    # pixel centres -- filled both ways
    rng = np.random.default_rng(["integer", "float", "half", "grid"].index(kind))
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(5, 60, 2))
        n = int(rng.integers(3, 25))
        span = max(h, w) + 5
        if kind == "integer":
            points = rng.integers(-5, span, (n, 2)).astype(float)
        elif kind == "float":
            points = rng.uniform(-5, span, (n, 2))
        elif kind == "half":
            points = np.round(rng.uniform(-5, span, (n, 2)) * 2) / 2
        else:
            points = rng.integers(0, 8, (n, 2)).astype(float) * 3
        mask = np.zeros((h, w), bool)
        labelme._fill_polygon(mask, points[:, 1], points[:, 0])
        assert np.array_equal(mask, _skimage(points, (h, w))), points.tolist()


def test_a_polygon_over_the_vertex_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(labelme, "MAX_POLYGON_VERTICES", 1000)
    t = np.linspace(0, 2 * np.pi, 1001, endpoint=False)
    path = _document(tmp_path / "dense.json", [[[0, 0], [10, 0], [0, 10]], np.c_[50 + 40 * np.cos(t), 50 + 40 * np.sin(t)].tolist()])
    with pytest.raises(InputError) as info:
        read_labelme_mask(path)
    message = str(info.value)
    assert "dense.json" in message and "shape 1" in message and "1,001 vertices" in message and "the limit is 1,000" in message
    assert "simplify the outline" in message


def test_a_polygon_zigzagging_over_the_image_is_refused_quickly(tmp_path):
    # 20,000 vertices alternating between the top and the bottom of a 2000-row image: 20 M row
    # crossings, which no outline has (the limit is 5 M)
    n = 20_000
    points = np.c_[np.linspace(0, 1999, n), np.where(np.arange(n) % 2, 1999.0, 0.0)]
    path = _document(tmp_path / "zigzag.json", [points.tolist()], height=2000, width=2000)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="cross the image rows") as info:
        read_labelme_mask(path)
    assert time.perf_counter() - t0 < 15.0  # not a speed test (reliability.py times it)
    assert "zigzag.json" in str(info.value) and "shape 0" in str(info.value)


def test_extreme_coordinates_are_filled_without_error(tmp_path):
    path = _document(tmp_path / "far.json", [[[1e308, 0], [-1e308, 10], [5, 1e308]], [[-1e308, -1e308], [3, 3], [1e-320, 5]]],
                     height=20, width=20)
    mask = read_labelme_mask(path)
    assert mask.shape == (20, 20) and mask.any()


# ------------------------------------------------------------------------------------------------
# the benchmark's streamed deflated DICOM (benchmarks/reliability.py) is a valid file
# ------------------------------------------------------------------------------------------------


def test_the_benchmarks_streamed_deflated_dicom_reads_as_pydicom_writes_it(tmp_path, monkeypatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("reliability", Path(__file__).resolve().parents[1] / "benchmarks" / "reliability.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "reliability", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    pixels = (np.arange(3 * 16 * 24) % 251).astype(np.uint8)
    path = bench.write_deflated_dicom(tmp_path / "streamed.dcm", bench._dataset(16, 24, 3, 1, 8, True),
                                      [pixels[:500].tobytes(), pixels[500:].tobytes()], pixels.size)
    frames, _, meta = media.read_dicom(path)
    assert meta["n_frames"] == 3
    np.testing.assert_allclose(frames, pixels.reshape(3, 16, 24) / 255.0, atol=1e-6)
