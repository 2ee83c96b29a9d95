"""Real DICOM written by other tools: pydicom's own test files (dcmtk, GDCM, vendors; they ship in
the pydicom wheel) through ``segment``. Every image among them segments, whatever its
compression; every other file gets a clear message naming it. A stub predictor: no network runs.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom.data
import pytest

from nerveseg.data.media import read_dicom
from nerveseg.inference.calibration import _reset_no_calibration_warning
from nerveseg.inference.segment import segment_files
from test_segment_media import DiscPredictor

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"

NOT_IMAGES = {
    # no Pixel Data: structured reports, RT plans/structures, waveforms, header-only test sets
    **dict.fromkeys([
        "ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm", "UN_sequence.dcm", "empty_charset_LEI.dcm",
        "no_meta_group_length.dcm", "priv_SQ.dcm", "reportsi.dcm", "reportsi_with_empty_number_tags.dcm",
        "rtplan.dcm", "rtplan_truncated.dcm", "rtstruct.dcm", "test-SR.dcm", "waveform_ecg.dcm",
    ], "holds no pixel data"),
    # two bytes of Pixel Data and no Rows/Columns (private-sequence parsing tests)
    **dict.fromkeys(["meta_missing_tsyntax.dcm", "nested_priv_SQ.dcm"], "has pixel data but no Rows/Columns"),
}
DAMAGED = {  # images broken on purpose (pydicom's test_files/README.txt)
    "JPEG2000-embedded-sequence-delimiter.dcm": "pixel data cannot be decoded",  # 4 bytes of the J2K SIZ replaced
    "MR_truncated.dcm": "pixel data cannot be decoded",  # Pixel Data cut short
    "badVR.dcm": "Number of Frames '1A' is not a whole number",
    "no_meta.dcm": "is not a DICOM file",  # one stray byte (0x20) before the data set of CT_small.dcm
}


def _all_files() -> list[Path]:
    if not TEST_FILES.is_dir():
        pytest.skip(f"pydicom's test files are not installed at {TEST_FILES}")
    return sorted(TEST_FILES.glob("*.dcm"))


def test_every_image_segments_and_every_other_file_gets_its_message(tmp_path):
    files = _all_files()
    names = {p.name for p in files}
    assert set(NOT_IMAGES) | set(DAMAGED) <= names
    images = names - set(NOT_IMAGES) - set(DAMAGED)
    assert {"JPGExtended.dcm", "JPEG-lossy.dcm", "SC_rgb_jpeg_gdcm.dcm", "JPEGLSNearLossless_16.dcm",
            "SC_rgb_jls_lossy_sample.dcm", "GDCMJ2K_TextGBR.dcm", "693_J2KI.dcm", "examples_jpeg2k.dcm"} <= images

    out = tmp_path / "out"
    _reset_no_calibration_warning()
    result = segment_files(files, DiscPredictor(r=6), out, log=lambda message: None)

    problems = {p.path.name: str(p) for p in result.problems}
    assert set(problems) == set(NOT_IMAGES) | set(DAMAGED)
    for name, expected in {**NOT_IMAGES, **DAMAGED}.items():
        assert expected in problems[name] and name in problems[name], problems[name]
    with open(out / "measurements.csv", newline="") as f:
        segmented = {Path(r["file"]).name for r in csv.DictReader(f)}
    assert segmented == images
    print(f"\n{len(images)} of {len(files)} pydicom test files segmented, {len(problems)} clear messages")


def test_decoders_agree_with_the_uncompressed_original():
    """Lossless encodings of one picture decode to the same pixels; the JPEG with a broken scan
    header (JPEG-lossy.dcm) decodes to its fixed copy (JPGExtended.dcm)."""
    _all_files()
    reference = read_dicom(TEST_FILES / "MR_small.dcm")[0]
    for name in ("MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm",
                 "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm"):
        np.testing.assert_array_equal(read_dicom(TEST_FILES / name)[0], reference, err_msg=name)
    np.testing.assert_array_equal(read_dicom(TEST_FILES / "JPEG-lossy.dcm")[0],
                                  read_dicom(TEST_FILES / "JPGExtended.dcm")[0])
