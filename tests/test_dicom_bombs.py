"""DICOM files that are small on disk but huge once read (issue 24, point 1): refused or cut
before they cost memory, with a message naming the file; generated here, never committed."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import pytest

from nerveseg.data import media
from nerveseg.data.media import read_dicom
from nerveseg.errors import InputError


def _write(path: Path, rows: int, cols: int, pixel_bytes: bytes, frames: int | None = None, samples: int = 1,
           bits: int = 8) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.PixelData = pixel_bytes
    ds.save_as(path, enforce_file_format=True)
    return path


def test_excess_frames_are_not_decoded(tmp_path):
    # the header says 1 frame of 256x256; the pixel data holds 300 (a few KB once deflated)
    frame = np.arange(256 * 256, dtype=np.uint8).tobytes()
    path = _write(tmp_path / "excess.dcm", 256, 256, frame * 300, frames=1)
    assert path.stat().st_size < 200_000
    frames, _, meta = read_dicom(path)
    assert frames.shape == (1, 256, 256) and meta["n_frames"] == 1


def test_huge_declared_rgb_32_bit_image_is_refused_before_decoding(tmp_path):
    # 7000x7000 RGB at 32 bits a sample: about 2 GB to decode; the file is a few MB of zeros deflated.
    # Its data set (588 MB inflated) is refused by the inflation cap before pydicom parses it
    path = _write(tmp_path / "rgb32.dcm", 7000, 7000, bytes(7000 * 7000 * 3 * 4), samples=3, bits=32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError, match="inflates to more than") as info:
        read_dicom(path)
    assert "rgb32.dcm" in str(info.value)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 1500


def test_declared_size_over_the_decode_budget_is_refused_before_decoding(tmp_path, monkeypatch):
    # 1000x1000 RGB, 32 bits a sample: 12 MB stored, 40 MB to decode (stored + float64 copy + grey frame)
    monkeypatch.setattr(media, "MAX_DICOM_DECODE_BYTES", 30_000_000)
    path = _write(tmp_path / "rgb32.dcm", 1000, 1000, bytes(1000 * 1000 * 3 * 4), samples=3, bits=32)

    def never(*args, **kwargs):  # the refusal comes from the header, before any decoding
        raise AssertionError("decoded")

    monkeypatch.setattr(media, "_decode", never)
    with pytest.raises(InputError, match="GB to decode") as info:
        read_dicom(path)
    assert "rgb32.dcm" in str(info.value) and "fewer frames" in str(info.value)


def test_deflated_bomb_is_refused_before_inflating(tmp_path, monkeypatch):
    monkeypatch.setattr(media, "MAX_DICOM_INFLATED_BYTES", 1_000_000)
    path = _write(tmp_path / "bomb.dcm", 1024, 1024, bytes(1024 * 1024 * 2), frames=2)
    assert path.stat().st_size < 20_000
    with pytest.raises(InputError, match="inflates to more than 1,000,000 bytes"):
        read_dicom(path)
    # under the limit the same kind of file reads
    small = _write(tmp_path / "small.dcm", 256, 256, bytes(256 * 256), frames=1)
    assert read_dicom(small)[0].shape == (1, 256, 256)


def test_memory_error_becomes_a_clear_input_error(tmp_path, monkeypatch):
    path = _write(tmp_path / "ok.dcm", 64, 64, bytes(64 * 64))

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(media, "_decode", no_memory)
    with pytest.raises(InputError, match="more memory") as info:
        read_dicom(path)
    assert "ok.dcm" in str(info.value)


def test_a_bomb_in_a_segment_batch_is_reported_and_the_batch_goes_on(tmp_path, monkeypatch, capsys):
    """Point 1, the CLI: the refused file is one ``error:`` line, the good one is segmented, exit 1."""
    from nerveseg.cli.main import main

    monkeypatch.setattr(media, "MAX_DICOM_INFLATED_BYTES", 1_000_000)
    bomb = _write(tmp_path / "bomb.dcm", 1024, 1024, bytes(1024 * 1024 * 2), frames=2)
    good = _write(tmp_path / "good.dcm", 96, 96, (np.arange(96 * 96) % 251).astype(np.uint8).tobytes())
    assert main(["segment", str(bomb), str(good), "--out", str(tmp_path / "out"), "--backend", "torch"]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "bomb.dcm" in err and "inflates to more than 1,000,000 bytes" in err
    assert "Traceback" not in err
    rows = (tmp_path / "out" / "measurements.csv").read_text().splitlines()
    assert len(rows) == 2 and "good.dcm" in rows[1] and "bomb.dcm" not in "".join(rows)
    assert (tmp_path / "out" / "good_mask.png").is_file()


def test_the_server_answers_a_bomb_and_a_memory_error_with_a_clear_4xx(tmp_path, monkeypatch):
    """Point 1, the server: a DICOM that inflates past the cap is 422 naming the file; a MemoryError
    while decoding is a 4xx that says what to do, never a 500; the server goes on serving."""
    pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[test]'")
    from test_web_api import assert_error, make_client

    monkeypatch.setattr(media, "MAX_DICOM_INFLATED_BYTES", 1_000_000)
    bomb = _write(tmp_path / "bomb.dcm", 1024, 1024, bytes(1024 * 1024 * 2), frames=2).read_bytes()
    good = _write(tmp_path / "good.dcm", 64, 64, bytes(64 * 64)).read_bytes()
    with make_client(tmp_path) as c:
        r = c.post("/api/cases", params={"name": "bomb.dcm"}, content=bomb)
        assert_error(r, 422, "bomb.dcm", "inflates to more than 1,000,000 bytes")

        def no_memory(*args, **kwargs):
            raise MemoryError

        monkeypatch.setattr(media, "_decode", no_memory)
        r = c.post("/api/cases", params={"name": "big.dcm"}, content=good)
        assert 400 <= r.status_code < 500
        assert_error(r, r.status_code, "big.dcm", "more memory")
        monkeypatch.undo()
        assert c.post("/api/cases", params={"name": "good.dcm"}, content=good).status_code == 201
