"""GET /api/cases/{id}/dicom.zip: a DICOM case's SEG and SR from its current (corrected) masks.

The fake predictor of test_web_api (two discs of known size, instant) segments a small synthetic
ultrasound DICOM; the clinician's correction is a PUT mask. The SEG's pixels must be the case's
current labels, the SR's CSA the case's measurement, and both must reference the uploaded
image's UIDs. dciodvfy (Debian's dicom3tools) checks both documents where it is installed.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[test]'")
hd = pytest.importorskip("highdicom")

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from nerveseg.web.dicom_results import MAX_KEPT_HEADER_BYTES, keep_header  # noqa: E402
from test_calibration import make_ds, region, save  # noqa: E402
from test_web_api import assert_error, grey, make_client, png_bytes, upload  # noqa: E402

H, W = 120, 140  # the fake model's frame: a large disc at (60, 70) r 14 and a small one at (25, 20) r 6
MM = 0.06  # the DICOM's pixel size: 0.006 cm in its ultrasound region


def _dicom_bytes(tmp_path: Path, calibrated: bool = True, uids: bool = True, extra=None, frames=None) -> bytes:
    ds = make_ds(np.stack([grey(H, W, seed=i) for i in range(frames)]) if frames else grey(H, W), frames=frames)
    ds.PatientName, ds.PatientID = "Test^Web", "W-1"
    if uids:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    if calibrated:
        ds.SequenceOfUltrasoundRegions = [region(max_x=W - 1, max_y=H - 1, dx=MM / 10, dy=MM / 10)]
    if extra:
        extra(ds)
    return save(ds, tmp_path / "src.dcm").read_bytes()


def _model_folder(tmp_path: Path) -> Path:
    """What identifies the fake model in the SEG: a run folder's config.json and weights file."""
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model": {"arch": "two_discs"}}), encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"not really weights")
    return folder


@pytest.fixture
def client(tmp_path):
    _model_folder(tmp_path)
    with make_client(tmp_path) as c:
        yield c


def _download(c, case_id: str):
    r = c.get(f"/api/cases/{case_id}/dicom.zip")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert "attachment" in r.headers["content-disposition"]
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    return r, {name: archive.read(name) for name in archive.namelist()}


def _dataset(data: bytes):
    return pydicom.dcmread(io.BytesIO(data))


def _refs(dataset) -> set[str]:
    return {str(e.value) for e in dataset.iterall() if e.keyword == "ReferencedSOPInstanceUID"}


def _dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (Debian package dicom3tools; .ci/run installs it)")
    path = tmp_path / "check.dcm"
    path.write_bytes(data)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_seg_and_sr_are_the_corrected_mask_and_its_measurements(client, tmp_path):
    source = _dicom_bytes(tmp_path)
    src = _dataset(source)
    case = upload(client, source, "wrist.dcm")
    assert case["kind"] == "dicom" and case["calibrated"]
    # the correction: the large disc only, plus a vessel box drawn by hand (the model has no vessel class)
    labels = np.zeros((H, W), np.uint8)
    yy, xx = np.mgrid[:H, :W]
    labels[(yy - 60) ** 2 + (xx - 70) ** 2 <= 12**2] = 1
    labels[100:110, 10:40] = 2
    m = client.put(f"/api/cases/{case['id']}/frames/0/mask", content=png_bytes(labels)).json()
    assert m["edited"] and m["n_components"] == 1

    r, files = _download(client, case["id"])
    assert sorted(files) == ["wrist_seg.dcm", "wrist_sr.dcm"] and "x-nerveseg-notes" not in r.headers
    assert r.headers["content-disposition"] == 'attachment; filename="wrist_dicom.zip"'
    seg = hd.seg.Segmentation.from_dataset(_dataset(files["wrist_seg.dcm"]))
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.PatientID == "W-1"
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID  # a new series in the same study
    assert src.SOPInstanceUID in _refs(seg)
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == ["nerve", "vessel"]
    # corrected by hand: calculated with user assistance, and the algorithm is named
    description = seg.get_segment_description(1)
    assert description.SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert "model" in description.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    pixels = seg.get_pixels_by_source_instance([src.SOPInstanceUID], segment_numbers=[1, 2])
    current = client.app.state.nerveseg.store.get(case["id"]).frames[0].labels
    assert np.array_equal(pixels[0, ..., 0] != 0, current == 1) and np.array_equal(pixels[0, ..., 1] != 0, current == 2)
    assert np.array_equal(current, labels)

    sr = hd.sr.Comprehensive3DSR.from_dataset(_dataset(files["wrist_sr.dcm"]))
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    (group,) = sr.content.get_planar_roi_measurement_groups()
    values = {v.name.meaning: float(v.value) for v in group.get_measurements()}
    measured = client.get(f"/api/cases/{case['id']}").json()["frames"][0]
    assert values["Area"] == measured["area_mm2"] == pytest.approx(m["area_px"] * MM**2, rel=1e-3)
    assert values["Perimeter"] == measured["perimeter_mm"]
    flags = [q.value.value for q in group.get_qualitative_evaluations() if q.name.value == "qc_flag"]
    assert "corrected" in flags
    reference = group.referenced_segmentation_frame
    assert reference[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert {seg.SOPInstanceUID, src.SOPInstanceUID} <= _refs(sr)
    for name, data in files.items():
        assert _dciodvfy_errors(data, tmp_path) == [], name


def test_cine_dicom_gets_one_seg_and_a_group_per_frame(client, tmp_path):
    source = _dicom_bytes(tmp_path, frames=3)
    src = _dataset(source)
    case = upload(client, source, "loop.dcm")
    assert case["n_frames"] == 3
    labels = np.zeros((H, W), np.uint8)
    labels[50:70, 60:90] = 1
    client.put(f"/api/cases/{case['id']}/frames/1/mask", content=png_bytes(labels))
    _, files = _download(client, case["id"])
    seg = hd.seg.Segmentation.from_dataset(_dataset(files["loop_seg.dcm"]))
    pixels = seg.get_pixels_by_source_frame(src.SOPInstanceUID, source_frame_numbers=[1, 2, 3], segment_numbers=[1],
                                            assert_missing_frames_are_empty=True)
    stored = client.app.state.nerveseg.store.get(case["id"]).frames
    for index in range(3):
        assert np.array_equal(pixels[index, ..., 0] != 0, stored[index].labels == 1), index
    assert np.array_equal(pixels[1, ..., 0] != 0, labels == 1)
    sr = hd.sr.Comprehensive3DSR.from_dataset(_dataset(files["loop_sr.dcm"]))
    areas = [float(next(v.value for v in g.get_measurements() if v.name.meaning == "Area"))
             for g in sr.content.get_planar_roi_measurement_groups()]
    assert areas == [f["area_mm2"] for f in client.get(f"/api/cases/{case['id']}").json()["frames"]]
    for name, data in files.items():
        assert _dciodvfy_errors(data, tmp_path) == [], name


def test_a_png_case_is_refused_there_is_no_study(client):
    case = upload(client, png_bytes(grey()), "frame.png")
    r = client.get(f"/api/cases/{case['id']}/dicom.zip")
    assert_error(r, 409, "frame.png", "not DICOM", "no study to attach")
    assert r.json()["code"] == "not_dicom"


def test_uncalibrated_dicom_gets_an_sr_without_mm_and_says_so(client, tmp_path):
    case = upload(client, _dicom_bytes(tmp_path, calibrated=False), "plain.dcm")
    assert not case["calibrated"]
    r, files = _download(client, case["id"])
    assert "not calibrated" in r.headers["x-nerveseg-notes"] and "mm^2" in r.headers["x-nerveseg-notes"]
    assert "not calibrated" in files["notes.txt"].decode("utf-8") and "mm²" in files["notes.txt"].decode("utf-8")
    sr = hd.sr.Comprehensive3DSR.from_dataset(_dataset(files["plain_sr.dcm"]))
    (group,) = sr.content.get_planar_roi_measurement_groups()
    names = {v.name.meaning for v in group.get_measurements()}
    assert "Area" not in names and "Perimeter" not in names and names
    # calibrated on the page, the same case's SR has the CSA
    client.post(f"/api/cases/{case['id']}/scale", json={"mm_per_pixel": 0.05})
    r, files = _download(client, case["id"])
    group = hd.sr.Comprehensive3DSR.from_dataset(_dataset(files["plain_sr.dcm"])).content.get_planar_roi_measurement_groups()[0]
    area = {v.name.meaning: float(v.value) for v in group.get_measurements()}["Area"]
    assert area == client.get(f"/api/cases/{case['id']}").json()["frames"][0]["area_mm2"]
    assert "notes.txt" not in files


def test_dicom_without_uids_is_refused_with_the_reason(client, tmp_path):
    case = upload(client, _dicom_bytes(tmp_path, uids=False), "nouid.dcm")
    r = client.get(f"/api/cases/{case['id']}/dicom.zip")
    assert_error(r, 422, "nouid.dcm", "StudyInstanceUID", "SeriesInstanceUID", "cannot be attached")
    assert r.json()["code"] == "missing_uids"


def test_an_empty_mask_gives_the_sr_alone(client, tmp_path):
    case = upload(client, _dicom_bytes(tmp_path), "empty.dcm")
    client.put(f"/api/cases/{case['id']}/frames/0/mask", content=png_bytes(np.zeros((H, W), np.uint8)))
    r, files = _download(client, case["id"])
    assert sorted(files) == ["empty_sr.dcm", "notes.txt"] and "no SEG" in r.headers["x-nerveseg-notes"]
    sr = hd.sr.Comprehensive3DSR.from_dataset(_dataset(files["empty_sr.dcm"]))
    assert sr.content.get_planar_roi_measurement_groups() == []


def test_unknown_model_and_unknown_case(tmp_path):
    """Without the run folder (config.json, weights) the SEG could not name its algorithm."""
    with make_client(tmp_path) as c:
        case = upload(c, _dicom_bytes(tmp_path), "wrist.dcm")
        r = c.get(f"/api/cases/{case['id']}/dicom.zip")
        assert_error(r, 422, "wrist.dcm", "cannot be identified")
        assert r.json()["code"] == "model_unknown"
        assert_error(c.get("/api/cases/" + "x" * 22 + "/dicom.zip"), 404, "unknown case")


def test_the_case_keeps_a_pruned_header_counted_in_its_bytes(client, tmp_path):
    def extra(ds):
        ds.add_new(0x00091010, "LO", "private")  # a private tag (group 0009) with no creator: dropped
        ds.TextValue = "x" * 100_000  # larger than an attribute the header keeps (UT: no length limit)
    case = upload(client, _dicom_bytes(tmp_path, extra=extra), "big.dcm")
    kept = client.app.state.nerveseg.store.get(case["id"])
    header = kept.dicom_header
    assert header is not None and "TextValue" not in header and 0x00091010 not in header
    assert header.SOPInstanceUID and "PixelData" not in header and "SequenceOfUltrasoundRegions" in header
    assert 0 < kept.dicom_header_bytes < 10_000
    assert kept.nbytes == sum(f.nbytes for f in kept.frames) + kept.dicom_header_bytes
    # a header that is large in many small attributes is not kept: the download says why
    ds = pydicom.Dataset()
    ds.ReferencedImageSequence = [pydicom.Dataset() for _ in range(3)]
    for item in ds.ReferencedImageSequence:
        item.TextValue = "y" * 60_000
    many = pydicom.Dataset()
    many.ReferencedImageSequence = [ds] * (MAX_KEPT_HEADER_BYTES // 150_000 + 1)
    header, size, why = keep_header(many)
    assert header is None and size == 0 and "more than the 1 MB a case keeps" in why


def test_openapi_documents_the_download_and_its_errors(client):
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/api/cases/{case_id}/dicom.zip"]["get"]
    responses = operation["responses"]
    assert "application/zip" in responses["200"]["content"] and "X-Nerveseg-Notes" in responses["200"]["headers"]
    for status in ("404", "409", "422"):
        schema = responses[status]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/Error"), status
    assert "not_dicom" in responses["409"]["description"] and "missing_uids" in responses["422"]["description"]
