"""Reading images and masks: every format and mode, EXIF orientation and every error case."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nerveseg.data import check_mask_not_empty, image_size, read_image, read_mask
from nerveseg.data import io as dio
from nerveseg.errors import InputError

# ITU-R 601-2 luminance, hand-computed: what one RGB pixel must become.
R, G, B = 0.299, 0.587, 0.114


def _save(path: Path, img: Image.Image, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` but that holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def _palette_image(indices: np.ndarray, colours: list[tuple[int, int, int]]) -> Image.Image:
    img = Image.fromarray(indices.astype(np.uint8), mode="P")
    flat = [v for c in colours for v in c]
    img.putpalette(flat + [0] * (768 - len(flat)))
    return img


# ------------------------------------------------------------------------------------------------
# read_image: formats and modes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".tiff"])
def test_grey_8bit(tmp_path, ext):
    arr = np.array([[0, 51, 255]], dtype=np.uint8)
    out = read_image(_save(tmp_path / f"g{ext}", Image.fromarray(arr)))
    assert out.dtype == np.float32 and out.shape == (1, 3)
    np.testing.assert_allclose(out, [[0.0, 0.2, 1.0]], atol=1e-6)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_grey_16bit(tmp_path, ext):
    arr = np.array([[0, 1000, 65535]], dtype=np.uint16)
    path = _save(tmp_path / f"g16{ext}", Image.fromarray(arr))
    with Image.open(path) as img:
        assert img.mode.startswith("I;16")  # really 16-bit on disk
    out = read_image(path)
    np.testing.assert_allclose(out, [[0.0, 1000 / 65535, 1.0]], atol=1e-6)


def test_int32_tiff_in_16bit_range(tmp_path):
    arr = np.array([[0, 65535]], dtype=np.int32)
    out = read_image(_save(tmp_path / "i.tif", Image.fromarray(arr, mode="I")))
    np.testing.assert_allclose(out, [[0.0, 1.0]], atol=1e-6)


def test_int32_tiff_out_of_range_refused(tmp_path):
    arr = np.array([[0, 70000]], dtype=np.int32)
    with pytest.raises(InputError, match="i.tif.*outside 0..65535"):
        read_image(_save(tmp_path / "i.tif", Image.fromarray(arr, mode="I")))


RGB_PIXELS = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], dtype=np.uint8)
RGB_EXPECTED = [[R, G, B, (R * 10 + G * 20 + B * 30) / 255]]


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif"])
def test_rgb_luminance_in_float(tmp_path, ext):
    out = read_image(_save(tmp_path / f"rgb{ext}", Image.fromarray(RGB_PIXELS)))
    assert out.shape == (1, 4)
    # PIL's convert("L") would round (255,0,0) to 76/255 = 0.2980; float keeps 0.299.
    np.testing.assert_allclose(out, RGB_EXPECTED, atol=1e-6)


def test_rgba_alpha_dropped(tmp_path):
    alpha = np.array([[[0], [255], [128], [7]]], dtype=np.uint8)
    rgba = np.concatenate([RGB_PIXELS, alpha], axis=-1)
    out = read_image(_save(tmp_path / "rgba.png", Image.fromarray(rgba, mode="RGBA")))
    np.testing.assert_allclose(out, RGB_EXPECTED, atol=1e-6)


def test_palette_looked_up_then_grey(tmp_path):
    img = _palette_image(np.array([[0, 1, 2]]), [(0, 0, 0), (255, 0, 0), (0, 0, 255)])
    path = _save(tmp_path / "p.png", img)
    with Image.open(path) as img:
        assert img.mode == "P"
    np.testing.assert_allclose(read_image(path), [[0.0, R, B]], atol=1e-6)


def test_grey_alpha(tmp_path):
    la = np.array([[[100, 7], [255, 0]]], dtype=np.uint8)
    out = read_image(_save(tmp_path / "la.png", Image.fromarray(la, mode="LA")))
    np.testing.assert_allclose(out, [[100 / 255, 1.0]], atol=1e-6)


def test_jpeg_grey_and_rgb(tmp_path):
    grey = read_image(_save(tmp_path / "g.jpg", Image.new("L", (16, 16), 128), quality=95))
    np.testing.assert_allclose(grey, 128 / 255, atol=2 / 255)  # lossy, but flat areas survive
    rgb = read_image(_save(tmp_path / "c.jpeg", Image.new("RGB", (16, 16), (200, 100, 50)), quality=95))
    np.testing.assert_allclose(rgb, (R * 200 + G * 100 + B * 50) / 255, atol=4 / 255)


def test_uppercase_extension(tmp_path):
    out = read_image(_save(tmp_path / "UP.PNG", Image.new("L", (3, 2), 255), format="PNG"))
    assert out.shape == (2, 3) and out.min() == 1.0


def _oriented_jpeg(path: Path, orientation: int) -> Path:
    # Stored 30 wide x 10 high with a white block in the stored top-left corner.
    arr = np.zeros((10, 30), dtype=np.uint8)
    arr[:4, :4] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)
    return path


def test_exif_orientation_jpeg(tmp_path):
    path = _oriented_jpeg(tmp_path / "rot.jpg", 6)
    out = read_image(path)
    # Orientation 6 = displayed rotated 90 degrees clockwise: (10, 30) becomes (30, 10) and the
    # stored top-left corner is shown at the top right.
    assert out.shape == (30, 10)
    assert out[:4, -4:].mean() > 0.8 and out[:4, :4].mean() < 0.2
    assert image_size(path) == (30, 10)  # header-only size agrees with the decoded one


def test_exif_orientation_1_unchanged(tmp_path):
    path = _oriented_jpeg(tmp_path / "up.jpg", 1)
    assert read_image(path).shape == (10, 30)
    assert image_size(path) == (10, 30)


def test_image_size_from_header(tmp_path):
    path = _save(tmp_path / "s.png", Image.new("L", (7, 5)))
    assert image_size(path) == (5, 7)
    # A header-only file has no pixel data: image_size must not decode it.
    assert image_size(_png_header_only(tmp_path / "h.png", 40, 30)) == (30, 40)


# ------------------------------------------------------------------------------------------------
# read_image: errors, each naming the file
# ------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="missing.png.*not found"):
        read_image(tmp_path / "missing.png")


def test_unknown_extension_lists_supported(tmp_path):
    path = _save(tmp_path / "anim.gif", Image.new("L", (4, 4)))
    with pytest.raises(InputError) as e:
        read_image(path)
    msg = str(e.value)
    assert "anim.gif" in msg and ".gif" in msg
    for ext in dio.IMAGE_EXTENSIONS:
        assert ext in msg


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a PNG")
    with pytest.raises(InputError, match="notes.png.*not a readable image"):
        read_image(path)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated(tmp_path, ext):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    path = _save(tmp_path / f"cut{ext}", Image.fromarray(noise))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=f"cut{ext}.*corrupt or truncated"):
        read_image(path)


def test_zero_size_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InputError, match="empty.png.*empty"):
        read_image(path)
    with pytest.raises(InputError, match="empty.png"):
        image_size(path)


def test_directory_is_not_a_file(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(InputError, match="dir.png.*not a file"):
        read_image(tmp_path / "dir.png")


def test_too_large_checked_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(dio, "MAX_IMAGE_PIXELS", 100)
    path = _save(tmp_path / "big.png", Image.new("L", (20, 20)))
    for reader in (read_image, image_size, read_mask):
        with pytest.raises(InputError, match="big.png.*too large.*400 pixels") as e:
            reader(path)
        assert "downsample" in str(e.value)
    # The header alone decides: a file without pixel data is refused the same way.
    with pytest.raises(InputError, match="too large"):
        read_image(_png_header_only(tmp_path / "hdr.png", 20, 20))


def test_decompression_bomb_refused(tmp_path):
    # 1e10 pixels: PIL itself refuses this at open (DecompressionBombError).
    path = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(InputError, match="bomb.png.*too large"):
        read_image(path)
    # 1e8 pixels: between our limit and PIL's error threshold (PIL only warns).
    with pytest.raises(InputError, match="too large"):
        read_image(_png_header_only(tmp_path / "warn.png", 10_000, 10_000))


# ------------------------------------------------------------------------------------------------
# read_mask
# ------------------------------------------------------------------------------------------------


def _grey_mask(tmp_path: Path, name: str = "m.png") -> Path:
    arr = np.zeros((4, 5), dtype=np.uint8)
    arr[1:3, 1:4] = 255
    return _save(tmp_path / name, Image.fromarray(arr))


def test_mask_0_255(tmp_path):
    path = _grey_mask(tmp_path)
    mask = read_mask(path)
    assert mask.dtype == bool and mask.shape == (4, 5) and mask.sum() == 6
    assert read_mask(path, label=255).sum() == 6
    assert read_mask(path, label=1).sum() == 0  # not an error: emptiness is the caller's call


def test_mask_palette_uses_raw_indices(tmp_path):
    idx = np.array([[0, 1, 2, 1], [2, 2, 0, 1]])
    # Colours chosen so that nothing derived from RGB could give indices 1 and 2.
    path = _save(tmp_path / "p.png", _palette_image(idx, [(0, 0, 0), (200, 10, 10), (10, 200, 10)]))
    np.testing.assert_array_equal(read_mask(path, label=1), idx == 1)
    np.testing.assert_array_equal(read_mask(path, label=2), idx == 2)
    np.testing.assert_array_equal(read_mask(path), idx != 0)
    np.testing.assert_array_equal(read_mask(path, label="1"), idx == 1)  # CLI text label


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_mask_16bit_label(tmp_path, ext):
    arr = np.array([[0, 300, 1]], dtype=np.uint16)
    path = _save(tmp_path / f"m16{ext}", Image.fromarray(arr))
    np.testing.assert_array_equal(read_mask(path, label=300), [[False, True, False]])
    np.testing.assert_array_equal(read_mask(path), [[False, True, True]])


def test_mask_bmp(tmp_path):
    path = _grey_mask(tmp_path, "m.bmp")
    assert read_mask(path).sum() == 6


def test_mask_size_mismatch(tmp_path):
    path = _grey_mask(tmp_path)
    assert read_mask(path, image_shape=(4, 5)).shape == (4, 5)
    with pytest.raises(InputError) as e:
        read_mask(path, image_shape=(6, 5))
    msg = str(e.value)
    assert "m.png" in msg and "4x5" in msg and "6x5" in msg and "same pixel grid" in msg


def test_mask_rgb(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 2] = (0, 0, 9)
    path = _save(tmp_path / "c.png", Image.fromarray(rgb))
    np.testing.assert_array_equal(read_mask(path), [[True, False, False], [False, False, True]])
    with pytest.raises(InputError, match="c.png.*grey or palette PNG"):
        read_mask(path, label=1)


def test_mask_rgba_alpha_not_a_label(tmp_path):
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[..., 3] = 255  # opaque black: background
    rgba[0, 1, 1] = 255
    path = _save(tmp_path / "a.png", Image.fromarray(rgba, mode="RGBA"))
    np.testing.assert_array_equal(read_mask(path), [[False, True]])


def test_mask_jpeg_refused(tmp_path):
    path = _save(tmp_path / "m.jpg", Image.new("L", (8, 8), 255))
    with pytest.raises(InputError, match="m.jpg.*JPEG"):
        read_mask(path)


def test_mask_name_label_needs_json(tmp_path):
    with pytest.raises(InputError, match="m.png.*LabelMe"):
        read_mask(_grey_mask(tmp_path), label="nerve")


def test_mask_errors_name_file(tmp_path):
    with pytest.raises(InputError, match="nope.png.*not found"):
        read_mask(tmp_path / "nope.png")
    (tmp_path / "m.txt").write_text("0 1")
    with pytest.raises(InputError, match="m.txt.*unsupported"):
        read_mask(tmp_path / "m.txt")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(InputError, match="bad.png"):
        read_mask(bad)


def test_mask_labelme_json_with_int_label(tmp_path):
    doc = {
        "imageHeight": 10, "imageWidth": 10,
        "shapes": [
            {"label": "1", "points": [[1, 1], [3, 3]], "shape_type": "rectangle"},
            {"label": "2", "points": [[6, 6], [8, 8]], "shape_type": "rectangle"},
        ],
    }
    path = tmp_path / "m.json"
    path.write_text(json.dumps(doc))
    assert read_mask(path, label=1).sum() == 9  # int 1 -> shape name "1"
    assert read_mask(path).sum() == 18
    with pytest.raises(InputError, match="m.json.*same pixel grid"):
        read_mask(path, image_shape=(10, 11))


def test_check_mask_not_empty(tmp_path):
    check_mask_not_empty(np.ones((2, 2), bool), tmp_path / "m.png", 1)  # no error
    with pytest.raises(InputError) as e:
        check_mask_not_empty(np.zeros((2, 2), bool), tmp_path / "m.png", 1)
    msg = str(e.value)
    assert "m.png" in msg and "contains no pixel of label 1" in msg
    assert "check --label (usgra-seg: nerve = 1) or remove the pair" in msg
    with pytest.raises(InputError, match="no non-zero"):
        check_mask_not_empty(np.zeros((2, 2), bool), tmp_path / "m.png")
