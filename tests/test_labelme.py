"""LabelMe JSON: rasterising shapes, label filtering, errors and the write -> read round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nerveseg.data import read_labelme_mask, read_mask, write_labelme
from nerveseg.errors import InputError


def _write(path: Path, shapes: list[dict], height: int = 60, width: int = 80, **extra) -> Path:
    doc = {"version": "5.2.1", "flags": {}, "shapes": shapes, "imagePath": "x.png",
           "imageData": None, "imageHeight": height, "imageWidth": width}
    doc.update(extra)
    path.write_text(json.dumps(doc))
    return path


def _shape(label: str, points, shape_type: str | None = "polygon") -> dict:
    shape = {"label": label, "points": points, "group_id": None, "flags": {}}
    if shape_type is not None:
        shape["shape_type"] = shape_type
    return shape


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# Half-pixel corners put no pixel centre on the boundary, so the area is exact: columns 10..29 and
# rows 5..24 have their centres inside, 20 x 20 = 400 pixels.
SQUARE = [[9.5, 4.5], [29.5, 4.5], [29.5, 24.5], [9.5, 24.5]]


def test_polygon(tmp_path):
    mask = read_labelme_mask(_write(tmp_path / "a.json", [_shape("nerve", SQUARE)]))
    assert mask.dtype == bool and mask.shape == (60, 80)
    assert mask.sum() == 400
    assert mask[5:25, 10:30].all()


def test_polygon_is_default_shape_type(tmp_path):
    mask = read_labelme_mask(_write(tmp_path / "a.json", [_shape("nerve", SQUARE, shape_type=None)]))
    assert mask.sum() == 400


def test_triangle_area(tmp_path):
    # Right triangle whose hypotenuse is x + y = 9.4: the pixel centres inside are x, y >= 0 with
    # x + y <= 9, i.e. 10 + 9 + ... + 1 = 55 pixels.
    tri = [[-0.5, -0.5], [9.9, -0.5], [-0.5, 9.9]]
    assert read_labelme_mask(_write(tmp_path / "t.json", [_shape("n", tri)])).sum() == 55


def test_rectangle_corners_any_order(tmp_path):
    # Corners inclusive: x 10..29 (20 columns), y 20..39 (20 rows) = 400 pixels.
    shapes = [_shape("nerve", [[29, 39], [10, 20]], "rectangle")]
    mask = read_labelme_mask(_write(tmp_path / "r.json", shapes))
    assert mask.sum() == 400
    assert mask[20:40, 10:30].all()


def test_circle(tmp_path):
    # Centre (x=40, y=30), radius 10: pixel centres strictly inside the circle are the lattice
    # points with dx^2 + dy^2 < 100: 317 with <= 100, minus the 12 exactly on it = 305.
    shapes = [_shape("nerve", [[40, 30], [50, 30]], "circle")]
    mask = read_labelme_mask(_write(tmp_path / "c.json", shapes))
    assert mask.sum() == 305
    assert mask[30, 40] and mask[30, 49] and not mask[30, 50] and mask[21, 40]


def test_shapes_clipped_to_image(tmp_path):
    shapes = [
        _shape("a", [[-10.5, -10.5], [4.5, -10.5], [4.5, 4.5], [-10.5, 4.5]]),  # 5 x 5 inside
        _shape("b", [[75, 55], [100, 100]], "rectangle"),  # x 75..79, y 55..59 inside
        _shape("c", [[200, 200], [300, 300]], "rectangle"),  # entirely outside
        _shape("d", [[0, 0], [3, 0]], "circle"),  # partly outside
    ]
    mask = read_labelme_mask(_write(tmp_path / "clip.json", shapes))
    assert mask[:5, :5].all() and mask[55:, 75:].all()
    assert mask.sum() == 25 + 25


def test_line_and_point_ignored(tmp_path):
    shapes = [
        _shape("nerve", [[1, 1], [50, 50]], "line"),
        _shape("nerve", [[1, 1], [5, 5], [9, 1]], "linestrip"),
        _shape("nerve", [[3, 3]], "point"),
    ]
    assert read_labelme_mask(_write(tmp_path / "l.json", shapes)).sum() == 0


def test_label_filter(tmp_path):
    shapes = [
        _shape("nerve", SQUARE),
        _shape("artery", [[50, 40], [59, 49]], "rectangle"),  # 100 pixels
    ]
    path = _write(tmp_path / "f.json", shapes)
    assert read_labelme_mask(path, label="nerve").sum() == 400
    assert read_labelme_mask(path, label="artery").sum() == 100
    assert read_labelme_mask(path).sum() == 500
    with pytest.raises(InputError) as e:
        read_labelme_mask(path, label="vein")
    msg = str(e.value)
    assert "f.json" in msg and "'vein'" in msg and "'artery'" in msg and "'nerve'" in msg


def test_read_mask_delegates_json(tmp_path):
    path = _write(tmp_path / "d.json", [_shape("nerve", SQUARE)])
    np.testing.assert_array_equal(read_mask(path, label="nerve"), read_labelme_mask(path))


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a LabelMe annotation"),
        (json.dumps({"imageWidth": 10, "shapes": []}), "imageHeight"),
        (json.dumps({"imageHeight": 10, "imageWidth": 0, "shapes": []}), "imageWidth"),
        (json.dumps({"imageHeight": 10, "imageWidth": 10}), "shapes"),
        (json.dumps({"imageHeight": 10, "imageWidth": 10,
                     "shapes": [{"label": "n", "points": [[1, 2, 3]]}]}), "malformed points"),
        (json.dumps({"imageHeight": 10, "imageWidth": 10,
                     "shapes": [{"label": "n", "points": [], "shape_type": "cuboid"}]}), "cuboid"),
    ],
)
def test_malformed(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InputError) as e:
        read_labelme_mask(path)
    assert "bad.json" in str(e.value) and problem in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="gone.json.*not found"):
        read_labelme_mask(tmp_path / "gone.json")


# ------------------------------------------------------------------------------------------------
# write_labelme
# ------------------------------------------------------------------------------------------------


def _disc(shape=(64, 80), centre=(32, 40), radius=20) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 < radius**2


def test_round_trip_disc(tmp_path):
    mask = _disc()
    path = tmp_path / "out" / "disc.json"
    write_labelme(path, mask, image_path="../images/disc.png")
    doc = json.loads(path.read_text())
    assert set(doc) == {"version", "flags", "shapes", "imagePath", "imageData", "imageHeight", "imageWidth"}
    assert doc["version"].startswith("5.") and doc["imageData"] is None
    assert (doc["imageHeight"], doc["imageWidth"]) == (64, 80)
    assert doc["imagePath"] == "../images/disc.png"
    assert len(doc["shapes"]) == 1
    shape = doc["shapes"][0]
    assert shape["label"] == "nerve" and shape["shape_type"] == "polygon"
    assert shape["group_id"] is None and shape["flags"] == {}
    assert all(len(p) == 2 and all(isinstance(v, float) for v in p) for p in shape["points"])
    # Simplified, not one point per boundary pixel.
    assert 8 <= len(shape["points"]) < 4 * 20 * 2
    # Points are [x, y]: the disc is centred at x=40, y=32.
    xs, ys = zip(*shape["points"])
    assert abs(np.mean(xs) - 40) < 1.5 and abs(np.mean(ys) - 32) < 1.5
    assert _iou(read_labelme_mask(path), mask) > 0.95
    assert [p.name for p in path.parent.iterdir()] == ["disc.json"]  # no temporary file left


def test_round_trip_two_blobs(tmp_path):
    mask = _disc((60, 100), (30, 25), 12) | _disc((60, 100), (20, 75), 9)
    mask[45:55, 60:90] = True  # a rectangle as a third, separate blob
    path = tmp_path / "two.json"
    write_labelme(path, mask, image_path="two.png", label="median")
    doc = json.loads(path.read_text())
    assert len(doc["shapes"]) == 3
    assert {s["label"] for s in doc["shapes"]} == {"median"}
    back = read_labelme_mask(path, label="median")
    assert _iou(back, mask) > 0.95


def test_round_trip_border_and_tiny(tmp_path):
    mask = np.zeros((20, 20), bool)
    mask[:6, :8] = True  # touches two borders
    mask[15, 15] = True  # one pixel
    mask[10:12, 18:] = True  # touches the right border
    path = tmp_path / "edge.json"
    write_labelme(path, mask, image_path="edge.png")
    doc = json.loads(path.read_text())
    assert len(doc["shapes"]) == 3
    assert all(len(s["points"]) >= 3 for s in doc["shapes"])
    np.testing.assert_array_equal(read_labelme_mask(path), mask)


def test_write_empty_mask(tmp_path):
    path = tmp_path / "empty.json"
    write_labelme(path, np.zeros((5, 6), bool), image_path="e.png")
    doc = json.loads(path.read_text())
    assert doc["shapes"] == [] and (doc["imageHeight"], doc["imageWidth"]) == (5, 6)
    assert read_labelme_mask(path).sum() == 0


def test_write_rejects_non_2d(tmp_path):
    with pytest.raises(ValueError):
        write_labelme(tmp_path / "x.json", np.zeros((2, 3, 4), bool), image_path="x.png")
