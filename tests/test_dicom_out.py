"""segment --dicom-out: DICOM SEG + SR per DICOM input, and import-seg back to a training pair.

Most tests run segment_files with a predictor whose output is known (a nerve disc and a vessel
box); one runs the command line with the shipped model. dciodvfy (Debian's dicom3tools) checks
every SEG and SR against the standard where it is installed.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

hd = pytest.importorskip("highdicom")
import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from nerveseg.clinical.dicom_out import (  # noqa: E402
    NERVESEG_SCHEME,
    DicomResultWriter,
    ModelIdentity,
    import_seg,
    model_identity,
)
from nerveseg.errors import InputError  # noqa: E402
from nerveseg.inference.calibration import _reset_no_calibration_warning  # noqa: E402
from nerveseg.inference.segment import segment_files  # noqa: E402
from test_calibration import make_ds, region, save  # noqa: E402

MODEL = ModelIdentity(name="disc_model", arch="test", weights_sha256="ab" * 32)
H, W = 80, 100


class TwoClassPredictor:
    """Nerve: a disc whose radius grows by 2 px a frame (0.9 inside); vessel: a box (0.8) away
    from it. Calls listed in ``empty`` (counted across images) get nothing of either class."""

    class_names = ["nerve", "vessel"]

    def __init__(self, empty=(), vessel=True):
        self.empty, self.vessel, self.calls = set(empty), vessel, 0

    def predict_classes_many(self, images, batch_size=4):
        out = []
        for image in images:
            h, w = image.shape
            yy, xx = np.mgrid[:h, :w]
            r = 10 + 2 * (self.calls % 4)
            nerve = np.where((yy - h / 2) ** 2 + (xx - w / 3) ** 2 <= r**2, 0.9, 0.02)
            vessel = np.zeros((h, w))
            if self.vessel:
                vessel[5:15, w - 25:w - 5] = 0.8
            probs = np.stack([nerve, vessel]).astype(np.float32)
            out.append(np.zeros_like(probs) if self.calls in self.empty else probs)
            self.calls += 1
        return out


def _dicom(tmp_path: Path, name: str, frames: int | None = None, calibrated: bool = True, uids: bool = True) -> Path:
    """A synthetic ultrasound DICOM (single- or multi-frame) with patient, study and series."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((frames, H, W) if frames else (H, W)) * 255).astype(np.uint8)
    ds = make_ds(pixels, frames=frames)
    ds.PatientName = "Test^Patient"
    ds.PatientID = "P-1"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "101500", "1", "A1"
    if uids:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    if calibrated:
        ds.SequenceOfUltrasoundRegions = [region(max_x=W - 1, max_y=H - 1, dx=0.006, dy=0.006)]
    if frames:
        ds.FrameTime = 40
    return save(ds, tmp_path / name)


def _rows(out: Path) -> list[dict]:
    with open(out / "measurements.csv", newline="") as f:
        return list(csv.DictReader(f))


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)) != 0


def _run(inputs, out: Path, predictor=None, model=MODEL):
    messages: list[str] = []
    predictor = predictor or TwoClassPredictor()
    writer = DicomResultWriter(out, model, predictor.class_names, threshold=0.5, log=messages.append)
    result = segment_files(inputs, predictor, out, log=messages.append, on_input=writer)
    return result, writer, messages


def _dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (Debian package dicom3tools; .ci/run installs it)")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _source_refs(dataset) -> set[str]:
    """Every ReferencedSOPInstanceUID anywhere in a dataset."""
    found = set()
    for element in dataset.iterall():
        if element.keyword == "ReferencedSOPInstanceUID":
            found.add(str(element.value))
    return found


def _segmented_image(reference):
    """The source image item ("Source Image for Segmentation") of a Referenced Segmentation Frame."""
    (item,) = [i for i in reference if i.ConceptNameCodeSequence[0].CodeValue == "121233"]
    return item.ReferencedSOPSequence[0]


def _measurements(group) -> dict[str, float]:
    return {m.name.meaning: float(m.value) for m in group.get_measurements()}


def _evaluations(group) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for q in group.get_qualitative_evaluations():
        if q.value.scheme_designator == NERVESEG_SCHEME:
            found.setdefault(q.name.value, []).append(q.value.value)
    return found


# ------------------------------------------------------------------------------------------------


def test_single_frame_seg_and_sr_agree_with_masks_and_measurements(tmp_path):
    source = _dicom(tmp_path, "wrist.dcm")
    out = tmp_path / "out"
    result, writer, messages = _run([source], out)
    assert not result.problems and not writer.problems, messages
    src = pydicom.dcmread(source)

    seg = hd.seg.segread(out / "wrist_seg.dcm")
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.PatientID == "P-1"
    assert seg.segment_numbers == [1, 2]
    nerve_d, vessel_d = (seg.get_segment_description(n) for n in (1, 2))
    assert (nerve_d.segmented_property_type.value, nerve_d.segmented_property_type.scheme_designator) == ("91728009", "SCT")
    assert vessel_d.segmented_property_type.value == "59820001"
    assert nerve_d.segmented_property_category.value == "91723000"
    algorithm = nerve_d.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "nerveseg disc_model" and algorithm.AlgorithmVersion
    assert "ab" * 32 in algorithm.AlgorithmParameters
    pixels = seg.get_pixels_by_source_instance([src.SOPInstanceUID], segment_numbers=[1, 2])
    assert np.array_equal(pixels[0, ..., 0] != 0, _png(out / "wrist_mask.png"))
    assert np.array_equal(pixels[0, ..., 1] != 0, _png(out / "wrist_vessel_mask.png"))
    assert src.SOPInstanceUID in _source_refs(seg)

    sr = hd.sr.srread(out / "wrist_sr.dcm")
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == 1
    row = _rows(out)[0]
    values = _measurements(groups[0])
    assert values["Area"] == float(row["area_mm2"]) > 0  # the number measurements.csv holds, as written
    assert values["Perimeter"] == float(row["perimeter_mm"])
    assert values["Circularity (4 pi area / perimeter^2)"] == float(row["circularity"])
    assert values["Flattening (major / minor axis)"] == float(row["flattening"])
    assert _evaluations(groups[0])["pixel_size_src"] == ["us_region"]
    reference = groups[0].referenced_segmentation_frame
    assert reference[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert _segmented_image(reference).ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert {seg.SOPInstanceUID, src.SOPInstanceUID} <= _source_refs(sr)
    for path in (out / "wrist_seg.dcm", out / "wrist_sr.dcm"):
        assert _dciodvfy_errors(path) == [], path


def test_cine_gives_one_seg_with_every_frame_and_a_group_per_frame(tmp_path):
    source = _dicom(tmp_path, "loop.dcm", frames=4)
    out = tmp_path / "out"
    result, writer, messages = _run([source], out, TwoClassPredictor(empty={2}))
    assert not result.problems and not writer.problems, messages
    src = pydicom.dcmread(source)
    seg = hd.seg.segread(out / "loop_seg.dcm")
    assert int(seg.NumberOfFrames) == 3 + 3  # nerve and vessel in frames 1, 2 and 4 (frame 3 is empty)
    pixels = seg.get_pixels_by_source_frame(src.SOPInstanceUID, source_frame_numbers=[1, 2, 3, 4], segment_numbers=[1, 2],
                                            assert_missing_frames_are_empty=True)
    for frame in range(4):
        assert np.array_equal(pixels[frame, ..., 0] != 0, _png(out / "loop_masks" / f"frame_{frame:05d}.png"))
        assert np.array_equal(pixels[frame, ..., 1] != 0, _png(out / "loop_vessel_masks" / f"frame_{frame:05d}.png"))

    sr = hd.sr.srread(out / "loop_sr.dcm")
    planar = sr.content.get_planar_roi_measurement_groups()
    image_level = sr.content.get_image_measurement_groups()
    rows = _rows(out)
    assert [r["frame"] for r in rows] == ["0", "1", "2", "3"]
    areas = [_measurements(g)["Area"] for g in planar]
    assert areas == [float(r["area_mm2"]) for r in rows if r["frame"] != "2"]
    assert len(set(areas)) == 3  # the disc grows: every frame has its own CSA
    assert len(image_level) == 1 and "no_nerve" in _evaluations(image_level[0])["qc_flag"]
    frames = [_segmented_image(g.referenced_segmentation_frame).ReferencedFrameNumber for g in planar]
    assert [int(f) for f in frames] == [1, 2, 4]
    for path in (out / "loop_seg.dcm", out / "loop_sr.dcm"):
        assert _dciodvfy_errors(path) == [], path


def test_cine_of_a_nerve_only_model_gets_its_one_segment_in_every_frame(tmp_path):
    """One segment: highdicom shares its identification across frames, which each frame needs its
    own of here (before, a nerve-only model's cine failed with an AttributeError)."""
    source = _dicom(tmp_path, "loop.dcm", frames=3)
    out = tmp_path / "out"
    result, writer, messages = _run([source], out, TwoClassPredictor(vessel=False))
    assert not result.problems and not writer.problems, messages
    src = pydicom.dcmread(source)
    seg = hd.seg.segread(out / "loop_seg.dcm")
    assert seg.segment_numbers == [1] and int(seg.NumberOfFrames) == 3
    pixels = seg.get_pixels_by_source_frame(src.SOPInstanceUID, source_frame_numbers=[1, 2, 3], segment_numbers=[1])
    for frame in range(3):
        assert np.array_equal(pixels[frame, ..., 0] != 0, _png(out / "loop_masks" / f"frame_{frame:05d}.png"))
    assert _dciodvfy_errors(out / "loop_seg.dcm") == []


def test_uncalibrated_dicom_gets_an_sr_without_mm_and_says_why(tmp_path):
    _reset_no_calibration_warning()
    source = _dicom(tmp_path, "plain.dcm", calibrated=False)
    out = tmp_path / "out"
    result, writer, messages = _run([source], out)
    assert not writer.problems
    group = hd.sr.srread(out / "plain_sr.dcm").content.get_planar_roi_measurement_groups()[0]
    values = _measurements(group)
    assert "Area" not in values and "Perimeter" not in values
    assert set(values) == {"Circularity (4 pi area / perimeter^2)", "Flattening (major / minor axis)"}
    assert _evaluations(group)["pixel_size_src"] == ["none"]
    assert any("not calibrated" in m and "plain_sr.dcm" in m for m in messages), messages
    assert _rows(out)[0]["area_mm2"] == ""


def test_non_dicom_input_gets_a_note_and_the_batch_goes_on(tmp_path):
    image = tmp_path / "still.png"
    Image.fromarray((np.random.default_rng(1).random((H, W)) * 255).astype(np.uint8)).save(image)
    source = _dicom(tmp_path, "wrist.dcm")
    out = tmp_path / "out"
    result, writer, messages = _run([image, source], out)
    assert not result.problems and not writer.problems
    assert writer.not_dicom == [image]
    assert any(m.startswith("note: ") and "still.png: not DICOM" in m and "no study" in m for m in messages), messages
    assert (out / "still_mask.png").is_file() and not list(out.glob("still_*.dcm"))
    assert (out / "wrist_seg.dcm").is_file() and (out / "wrist_sr.dcm").is_file()


def test_missing_uids_are_a_clear_error_and_nothing_is_half_written(tmp_path):
    broken = _dicom(tmp_path, "nouid.dcm", uids=False)  # no Study/Series Instance UID
    good = _dicom(tmp_path, "good.dcm")
    out = tmp_path / "out"
    result, writer, messages = _run([broken, good], out)
    assert not result.problems  # segmented: masks and rows are there
    assert (out / "nouid_mask.png").is_file() and {r["file"] for r in _rows(out)} == {str(broken), str(good)}
    assert len(writer.problems) == 1
    problem = writer.problems[0]
    assert isinstance(problem, InputError) and problem.path == broken
    assert "StudyInstanceUID" in str(problem) and "SeriesInstanceUID" in str(problem) and "UIDs" in problem.fix
    assert any(m.startswith("error: ") and "nouid.dcm" in m for m in messages)
    assert not list(out.glob("nouid_*.dcm")) and not list(out.glob(".*"))  # no SEG, no SR, no temporary file
    assert (out / "good_seg.dcm").is_file() and (out / "good_sr.dcm").is_file()  # the batch went on


def test_empty_mask_gives_no_seg_and_an_sr_saying_no_nerve(tmp_path):
    source = _dicom(tmp_path, "empty.dcm")
    out = tmp_path / "out"
    result, writer, messages = _run([source], out, TwoClassPredictor(empty={0}))
    assert not writer.problems
    assert not (out / "empty_seg.dcm").exists()
    sr = hd.sr.srread(out / "empty_sr.dcm")
    assert sr.content.get_planar_roi_measurement_groups() == []
    (group,) = sr.content.get_image_measurement_groups()
    assert _evaluations(group)["qc_flag"] == ["no_nerve"]
    assert "Area" not in _measurements(group)
    assert pydicom.dcmread(source).SOPInstanceUID in _source_refs(sr)
    assert any("no nerve or other class found" in m and "no SEG" in m for m in messages), messages
    assert _dciodvfy_errors(out / "empty_sr.dcm") == []


def test_a_class_without_pixels_is_left_out_of_the_seg(tmp_path):
    source = _dicom(tmp_path, "nerve_only.dcm")
    out = tmp_path / "out"
    _, writer, messages = _run([source], out, TwoClassPredictor(vessel=False))
    seg = hd.seg.segread(out / "nerve_only_seg.dcm")
    assert seg.segment_numbers == [1] and seg.get_segment_description(1).segment_label == "nerve"
    assert any("no vessel pixel" in m for m in messages), messages


def test_resume_keeps_finished_dicom_results_and_writes_missing_ones(tmp_path):
    source = _dicom(tmp_path, "wrist.dcm")
    out = tmp_path / "out"
    _run([source], out)
    first = pydicom.dcmread(out / "wrist_sr.dcm").SOPInstanceUID

    def resume():
        writer = DicomResultWriter(out, MODEL, TwoClassPredictor.class_names, threshold=0.5, log=lambda m: None)
        result = segment_files([source], TwoClassPredictor(), out, log=lambda m: None, resume=True, on_input=writer)
        assert result.skipped == [source]
        return writer

    assert resume().kept == [source] and pydicom.dcmread(out / "wrist_sr.dcm").SOPInstanceUID == first
    (out / "wrist_sr.dcm").unlink()  # a run killed between the masks and the SR
    writer = resume()
    assert len(writer.written) == 1 and (out / "wrist_sr.dcm").is_file()


def test_import_seg_round_trip_is_lossless(tmp_path):
    source = _dicom(tmp_path, "wrist.dcm")
    out = tmp_path / "out"
    _run([source], out)
    data = tmp_path / "data"
    pair = import_seg(out / "wrist_seg.dcm", data, [tmp_path])  # the source is found in the folder by its UID
    assert pair.image == data / "images" / "wrist.png" and pair.masks == [data / "masks" / "wrist.png"]
    assert pair.segments == {1: "nerve", 2: "vessel"} and not pair.warnings
    labels = np.asarray(Image.open(pair.masks[0]))
    expected = _png(out / "wrist_mask.png") * 1 + _png(out / "wrist_vessel_mask.png") * 2
    assert labels.dtype == np.uint8 and np.array_equal(labels, expected)
    assert np.array_equal(np.asarray(Image.open(pair.image)), pydicom.dcmread(source).pixel_array)

    from nerveseg.data.samples import discover_samples

    samples, problems = discover_samples(data)
    assert [s.stem for s in samples] == ["wrist"] and not problems
    with pytest.raises(InputError, match="source image"):
        import_seg(out / "wrist_seg.dcm", tmp_path / "other", [tmp_path / "out"])


def test_import_seg_of_a_cine_writes_its_frames(tmp_path):
    source = _dicom(tmp_path, "loop.dcm", frames=3)
    out = tmp_path / "out"
    _run([source], out, TwoClassPredictor(empty={1}))
    pair = import_seg(out / "loop_seg.dcm", tmp_path / "data", [source], stem="case7")
    assert pair.image == tmp_path / "data" / "images" / "case7.dcm"
    assert [p.name for p in pair.masks] == ["frame_00000.png", "frame_00002.png"]  # frame 1 has no label
    for path in pair.masks:
        frame = path.stem
        expected = _png(out / "loop_masks" / f"{frame}.png") * 1 + _png(out / "loop_vessel_masks" / f"{frame}.png") * 2
        assert np.array_equal(np.asarray(Image.open(path)), expected)
    assert pair.image.read_bytes() == source.read_bytes()


def test_command_line_with_the_shipped_model(tmp_path, monkeypatch, capsys):
    """`nerveseg segment --dicom-out` on a calibrated DICOM made from a shipped example frame,
    with a PNG in the same batch; then `nerveseg import-seg` back."""
    from nerveseg.cli.main import main
    from nerveseg.examples import __file__ as examples_init
    from nerveseg.pretrained import pretrained_dir

    monkeypatch.setenv("NERVESEG_NATIVE", "0")  # the standard ONNX graph: no compiler run in this test
    examples = Path(examples_init).parent
    pixels = np.asarray(Image.open(examples / "usgra_0053.png").convert("L"))
    ds = make_ds(pixels)
    ds.PatientName, ds.PatientID = "Example^Wrist", "E-1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SequenceOfUltrasoundRegions = [region(max_x=pixels.shape[1] - 1, max_y=pixels.shape[0] - 1, dx=0.0075, dy=0.0075)]
    source = save(ds, tmp_path / "case.dcm")
    out = tmp_path / "out"
    code = main(["segment", str(source), str(examples / "usgra_0045.png"), "--out", str(out), "--dicom-out"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "1 SEG and 1 SR" in captured.out and "usgra_0045.png: not DICOM" in captured.err
    row = next(r for r in _rows(out) if r["file"] == str(source))
    seg = hd.seg.segread(out / "case_seg.dcm")
    mask = seg.get_pixels_by_source_instance([ds.SOPInstanceUID], segment_numbers=[1])[0, ..., 0] != 0
    assert np.array_equal(mask, _png(out / "case_mask.png")) and mask.sum() == int(row["area_px"]) > 0
    identity = model_identity(pretrained_dir())
    assert identity.weights_sha256 in seg.get_segment_description(1).SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    group = hd.sr.srread(out / "case_sr.dcm").content.get_planar_roi_measurement_groups()[0]
    assert _measurements(group)["Area"] == float(row["area_mm2"])
    for path in (out / "case_seg.dcm", out / "case_sr.dcm"):
        assert _dciodvfy_errors(path) == [], path

    data = tmp_path / "data"
    assert main(["import-seg", str(out / "case_seg.dcm"), "--source", str(source), "--out", str(data)]) == 0
    assert np.array_equal(np.asarray(Image.open(data / "masks" / "case.png")), mask.astype(np.uint8))
    assert np.array_equal(np.asarray(Image.open(data / "images" / "case.png")), pixels)
