"""Pixel size from the user and from DICOM files, and reading DICOM frames."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from nerveseg.errors import ConfigError, InputError
from nerveseg.inference.calibration import (
    NO_CALIBRATION_MESSAGE,
    Spacing,
    _reset_no_calibration_warning,
    dicom_spacing,
    mask_roi,
    read_dicom,
    read_dicom_header,
    resolve_spacing,
    spacing_from_user,
    warn_once_no_calibration,
)

# ------------------------------------------------------------------------------------------------
# Building DICOM files
# ------------------------------------------------------------------------------------------------


def make_ds(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
            signed: bool = False, frames: int | None = None, tsyntax=ExplicitVRLittleEndian,
            pixel_data: bytes | None = None) -> Dataset:
    """An ultrasound dataset holding ``pixels`` ((F,) H, W (, 3)), uncompressed unless told."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = tsyntax
    sop_class = UltrasoundMultiFrameImageStorage if frames else UltrasoundImageStorage
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    samples = 3 if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") else 1
    shape = pixels.shape[1:] if frames else pixels.shape
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames:
        ds.NumberOfFrames = frames
    allocated = pixels.dtype.itemsize * 8
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored or allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixel_data if pixel_data is not None else pixels.tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def region(min_x=0, min_y=0, max_x=99, max_y=79, dx=0.006, dy=0.006, units=3, data_type=1) -> Dataset:
    item = Dataset()
    item.RegionSpatialFormat = 1
    item.RegionDataType = data_type
    item.RegionFlags = 0
    item.RegionLocationMinX0 = min_x
    item.RegionLocationMinY0 = min_y
    item.RegionLocationMaxX1 = max_x
    item.RegionLocationMaxY1 = max_y
    item.PhysicalUnitsXDirection = units
    item.PhysicalUnitsYDirection = units
    item.PhysicalDeltaX = dx
    item.PhysicalDeltaY = dy
    return item


def header(*regions: Dataset, pixel_spacing=None) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns = 80, 100
    if regions:
        ds.SequenceOfUltrasoundRegions = Sequence(list(regions))
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    return ds


# ------------------------------------------------------------------------------------------------
# Spacing from the user
# ------------------------------------------------------------------------------------------------


def test_spacing_from_user_mm_per_pixel():
    s = spacing_from_user(mm_per_pixel=0.08)
    assert (s.row_mm, s.col_mm, s.source) == (0.08, 0.08, "user --mm-per-pixel")
    assert s.area_mm2_per_px == pytest.approx(0.0064, rel=1e-12)


def test_spacing_from_user_xy_is_column_then_row():
    s = spacing_from_user(spacing=(0.2, 0.1))
    assert (s.col_mm, s.row_mm, s.source) == (0.2, 0.1, "user --spacing")
    assert s.text == "0.1 x 0.2"


def test_spacing_from_user_none_and_errors():
    assert spacing_from_user() is None
    with pytest.raises(ConfigError, match="not both"):
        spacing_from_user(mm_per_pixel=0.1, spacing=(0.1, 0.1))
    for bad in (0, -0.1, float("nan"), float("inf"), "abc"):
        with pytest.raises(ConfigError):
            spacing_from_user(mm_per_pixel=bad)
    with pytest.raises(ConfigError):
        spacing_from_user(spacing=(0.1, 0.0))
    with pytest.raises(ConfigError):
        spacing_from_user(spacing=(0.1,))
    with pytest.raises(ConfigError):
        Spacing(row_mm=-1.0, col_mm=1.0, source="x")


def test_resolve_spacing_user_wins_and_says_so():
    user = spacing_from_user(mm_per_pixel=0.1)
    dicom = Spacing(0.06, 0.06, "DICOM PixelSpacing")
    messages = []
    assert resolve_spacing(user, dicom, "a.dcm", log=messages.append) is user
    assert len(messages) == 1 and "a.dcm" in messages[0] and "overrides" in messages[0]
    assert resolve_spacing(None, dicom, "a.dcm") is dicom
    assert resolve_spacing(user, None, "a.dcm", log=messages.append) is user
    assert resolve_spacing(None, None, "a.dcm") is None
    assert len(messages) == 1  # no override, no warning


def test_warn_once_no_calibration():
    _reset_no_calibration_warning()
    messages = []
    assert warn_once_no_calibration(messages.append) is True
    assert warn_once_no_calibration(messages.append) is False
    assert messages == [f"warning: {NO_CALIBRATION_MESSAGE}"]
    assert "--mm-per-pixel" in messages[0] and "pixels only" in messages[0]
    _reset_no_calibration_warning()


# ------------------------------------------------------------------------------------------------
# Spacing from DICOM
# ------------------------------------------------------------------------------------------------


def test_region_delta_in_cm_gives_mm_and_area_factor():
    s = dicom_spacing(header(region(dx=0.006, dy=0.006)))
    assert s.row_mm == pytest.approx(0.06, rel=1e-12) and s.col_mm == pytest.approx(0.06, rel=1e-12)
    assert s.area_mm2_per_px == pytest.approx(0.0036, rel=1e-9)
    assert s.source == "DICOM SequenceOfUltrasoundRegions[0] (PhysicalDeltaX/Y, cm)"


def test_region_anisotropic_x_is_columns_y_is_rows():
    s = dicom_spacing(header(region(dx=0.02, dy=0.01)))
    assert s.col_mm == pytest.approx(0.2) and s.row_mm == pytest.approx(0.1)


def test_two_regions_containing_roi_disagree():
    ds = header(region(dx=0.006, dy=0.006), region(dx=0.008, dy=0.008))
    with pytest.raises(InputError, match="disagree") as info:
        dicom_spacing(ds, roi=(10, 10, 20, 20), path="x.dcm")
    assert "x.dcm" in str(info.value) and "--mm-per-pixel" in str(info.value)
    with pytest.raises(InputError, match="disagree"):  # the whole image: either region
        dicom_spacing(ds)


def test_two_agreeing_regions_are_fine():
    ds = header(region(dx=0.006, dy=0.006), region(dx=0.006 * (1 + 1e-9), dy=0.006))
    s = dicom_spacing(ds, roi=(10, 10, 20, 20))
    assert s.area_mm2_per_px == pytest.approx(0.0036, rel=1e-6)
    assert "[0,1]" in s.source


def test_only_the_region_containing_the_roi_counts():
    # Dual view: left half 0.006 cm, right half 0.008 cm per pixel (region 1).
    ds = header(region(0, 0, 49, 79, dx=0.006, dy=0.006), region(50, 0, 99, 79, dx=0.008, dy=0.008))
    right = dicom_spacing(ds, roi=(10, 60, 30, 90))
    assert right.row_mm == pytest.approx(0.08) and "[1]" in right.source
    left = dicom_spacing(ds, roi=mask_roi(np.pad(np.ones((5, 5), bool), ((10, 65), (0, 95)))))
    assert left.row_mm == pytest.approx(0.06) and "[0]" in left.source
    # Straddling both: no region contains it, and there is nothing else.
    assert dicom_spacing(ds, roi=(10, 40, 20, 60)) is None


def test_regions_not_in_cm_fall_back_to_pixel_spacing():
    ds = header(region(units=4), pixel_spacing=(0.05, 0.07))  # 4 = seconds
    s = dicom_spacing(ds)
    assert (s.row_mm, s.col_mm, s.source) == (0.05, 0.07, "DICOM PixelSpacing")
    # A colour-flow region in cm is not the tissue picture either.
    assert dicom_spacing(header(region(data_type=2))) is None


def test_no_calibration_is_none():
    assert dicom_spacing(header()) is None
    assert dicom_spacing(header(region(units=0))) is None


def test_mask_roi():
    mask = np.zeros((10, 12), bool)
    assert mask_roi(mask) is None
    mask[2:5, 3:9] = True
    assert mask_roi(mask) == (2, 3, 5, 9)
    with pytest.raises(ConfigError):
        dicom_spacing(header(region()), roi=(5, 5, 5, 9))


# ------------------------------------------------------------------------------------------------
# Reading DICOM files
# ------------------------------------------------------------------------------------------------


def test_read_monochrome2_8bit(tmp_path):
    pixels = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    ds = make_ds(pixels)
    ds.SequenceOfUltrasoundRegions = Sequence([region(0, 0, 7, 5)])
    ds.FrameTime = 33.3
    frames, spacing, meta = read_dicom(save(ds, tmp_path / "a.dcm"))
    assert frames.shape == (1, 6, 8) and frames.dtype == np.float32
    np.testing.assert_allclose(frames[0], pixels / 255.0, atol=1e-7)
    assert spacing.area_mm2_per_px == pytest.approx(0.0036, rel=1e-9)
    assert meta == {"n_frames": 1, "photometric": "MONOCHROME2", "frame_time_ms": pytest.approx(33.3),
                    "modality": "US", "spacing_problem": None}


def test_read_monochrome1_is_inverted(tmp_path):
    pixels = np.array([[0, 255], [51, 204]], dtype=np.uint8)
    frames, spacing, meta = read_dicom(save(make_ds(pixels, "MONOCHROME1"), tmp_path / "m1.dcm"))
    np.testing.assert_allclose(frames[0], 1.0 - pixels / 255.0, atol=1e-7)
    assert spacing is None and meta["photometric"] == "MONOCHROME1" and meta["frame_time_ms"] is None


def test_read_rgb_is_luminance(tmp_path):
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    rgb[0, 0] = (255, 255, 255)
    frames, _, _ = read_dicom(save(make_ds(rgb, "RGB"), tmp_path / "rgb.dcm"))
    expected = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255.0
    assert frames[0, 1, 1] == pytest.approx(expected, abs=1e-6)
    assert frames[0, 0, 0] == pytest.approx(1.0, abs=1e-6)


def _ybr_to_rgb(ybr: np.ndarray) -> np.ndarray:
    """DICOM PS3.3 C.7.6.3.1.2 (YBR_FULL, ITU-R BT.601 full range), by hand."""
    y, cb, cr = (ybr[..., i].astype(np.float64) for i in range(3))
    r = y + 1.402 * (cr - 128)
    g = y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128)
    b = y + 1.772 * (cb - 128)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255)


def test_read_uncompressed_ybr_full_matches_hand_conversion(tmp_path):
    rgb = np.zeros((3, 4, 3), dtype=np.float64)
    rgb[..., 0] = np.linspace(40, 220, 12).reshape(3, 4)
    rgb[..., 1] = 120
    rgb[..., 2] = np.linspace(200, 30, 12).reshape(3, 4)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    ybr = np.stack([0.299 * r + 0.587 * g + 0.114 * b,
                    128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
                    128 + 0.5 * r - 0.418688 * g - 0.081312 * b], axis=-1)
    ybr = np.clip(np.round(ybr), 0, 255).astype(np.uint8)
    frames, _, meta = read_dicom(save(make_ds(ybr, "YBR_FULL"), tmp_path / "ybr.dcm"))
    expected = _ybr_to_rgb(ybr) @ np.array([0.299, 0.587, 0.114]) / 255.0
    # pydicom rounds to uint8 after its conversion: within one grey level, never converted twice.
    np.testing.assert_allclose(frames[0], expected, atol=1.0 / 255)
    # Luminance is Y itself: a second conversion (or none) would be far off.
    np.testing.assert_allclose(frames[0], ybr[..., 0] / 255.0, atol=1.0 / 255)
    assert meta["photometric"] == "YBR_FULL"


def test_read_jpeg_ybr_full_422_is_converted_once(tmp_path):
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[..., 0] = 180
    rgb[..., 1] = np.arange(16, dtype=np.uint8)[None, :] * 12
    rgb[..., 2] = 60
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95)
    ds = make_ds(rgb, "YBR_FULL_422", tsyntax=JPEGBaseline8Bit, pixel_data=encapsulate([buf.getvalue()]))
    if not get_decoder(JPEGBaseline8Bit).is_available:
        pytest.skip("no JPEG decoder installed")
    frames, _, _ = read_dicom(save(ds, tmp_path / "jpeg.dcm"))
    expected = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
    np.testing.assert_allclose(frames[0], expected, atol=6 / 255)  # JPEG loss only


def test_read_multiframe(tmp_path):
    pixels = np.stack([np.full((4, 6), 10 * i, dtype=np.uint8) for i in range(5)])
    ds = make_ds(pixels, frames=5)
    ds.CineRate = 25
    frames, _, meta = read_dicom(save(ds, tmp_path / "cine.dcm"))
    assert frames.shape == (5, 4, 6)
    np.testing.assert_allclose(frames[:, 0, 0], np.arange(5) * 10 / 255.0, atol=1e-7)
    assert meta["n_frames"] == 5 and meta["frame_time_ms"] == pytest.approx(40.0)


def test_read_12_and_16_bit(tmp_path):
    pixels = np.array([[0, 4095], [2048, 1000]], dtype=np.uint16)
    frames, _, _ = read_dicom(save(make_ds(pixels, bits_stored=12), tmp_path / "b12.dcm"))
    np.testing.assert_allclose(frames[0], pixels / 4095.0, atol=1e-7)
    pixels = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    frames, _, _ = read_dicom(save(make_ds(pixels, bits_stored=16), tmp_path / "b16.dcm"))
    np.testing.assert_allclose(frames[0], pixels / 65535.0, atol=1e-7)


def test_read_signed_is_shifted_by_min(tmp_path):
    pixels = np.array([[-2048, 2047], [0, -1]], dtype=np.int16)
    frames, _, _ = read_dicom(save(make_ds(pixels, bits_stored=12, signed=True), tmp_path / "s.dcm"))
    np.testing.assert_allclose(frames[0], (pixels + 2048) / 4095.0, atol=1e-7)


def test_read_palette_color(tmp_path):
    pixels = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    ds = make_ds(pixels, "PALETTE COLOR")
    lut = np.array([[0, 0, 0], [65535, 0, 0], [0, 65535, 0], [65535, 65535, 65535]], dtype=np.uint16)
    for name, channel in (("Red", 0), ("Green", 1), ("Blue", 2)):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [4, 0, 16])
        setattr(ds, f"{name}PaletteColorLookupTableData", lut[:, channel].tobytes())
    frames, _, _ = read_dicom(save(ds, tmp_path / "pal.dcm"))
    np.testing.assert_allclose(frames[0], [[0.0, 0.299], [0.587, 1.0]], atol=1e-5)


def test_read_dicom_regions_disagreeing_is_not_fatal(tmp_path):
    ds = make_ds(np.zeros((80, 100), dtype=np.uint8))
    ds.SequenceOfUltrasoundRegions = Sequence([region(0, 0, 49, 79, 0.006, 0.006),
                                               region(50, 0, 99, 79, 0.008, 0.008)])
    path = save(ds, tmp_path / "dual.dcm")
    frames, spacing, meta = read_dicom(path)
    assert spacing is None and "disagree" in meta["spacing_problem"]
    s = dicom_spacing(read_dicom_header(path), roi=(5, 60, 20, 80))
    assert s.col_mm == pytest.approx(0.08)


def test_non_dicom_and_corrupt_files(tmp_path):
    text = tmp_path / "notes.dcm"
    text.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(InputError, match="not a DICOM file") as info:
        read_dicom(text)
    assert "notes.dcm" in str(info.value)

    good = save(make_ds(np.zeros((64, 64), dtype=np.uint8)), tmp_path / "good.dcm")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:-2000])
    with pytest.raises(InputError) as info:
        read_dicom(cut)
    assert "cut.dcm" in str(info.value)

    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_dicom(empty)
    with pytest.raises(InputError, match="not found"):
        read_dicom(tmp_path / "missing.dcm")
