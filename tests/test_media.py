"""data/media.py: one reader for images, DICOM and cine loops; datasets of DICOM images and
labelled cine frames through discovery, the training cache, evaluation and the command line."""

from __future__ import annotations

import csv
import io
import json
import types

import numpy as np
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, JPEGBaseline8Bit

from conftest import ellipse_pair
from nerveseg.data.cache import load_tensor_set
from nerveseg.data.media import looks_like_dicom, read_dicom, read_frame, read_media
from nerveseg.data.samples import discover_samples, split_samples
from nerveseg.errors import InputError
from nerveseg.evaluation.evaluate import evaluate_samples
from nerveseg.inference.video import VideoWriter
from test_calibration import make_ds, region, save

# ------------------------------------------------------------------------------------------------
# read_media / read_frame
# ------------------------------------------------------------------------------------------------


def _cine_dcm(path, n=4, h=40, w=50, spacing=None):
    pixels = (np.random.default_rng(3).random((n, h, w)) * 255).astype(np.uint8)
    ds = make_ds(pixels, frames=n)
    if spacing:
        ds.PixelSpacing = [spacing, spacing]
    return save(ds, path), pixels


def _mp4(path, n=5, h=48, w=64):
    writer = VideoWriter(path, fps=10)
    for i in range(n):
        writer.write(np.full((h, w, 3), 40 * i, np.uint8))
    writer.close()
    return path


def test_read_media_kinds_frames_and_spacing(tmp_path):
    Image.fromarray(np.full((30, 40), 128, np.uint8)).save(tmp_path / "a.png")
    still = read_media(tmp_path / "a.png")
    assert (still.kind, still.n_frames, still.spacing) == ("image", 1, None)
    assert [f.shape for f in still.frames()] == [(30, 40)]

    path, pixels = _cine_dcm(tmp_path / "cine.dcm", spacing=0.1)
    dicom = read_media(path)
    assert (dicom.kind, dicom.n_frames) == ("dicom", 4)
    assert dicom.spacing.row_mm == pytest.approx(0.1) and dicom.spacing.source == "DICOM PixelSpacing"
    np.testing.assert_allclose(dicom.frame(2), pixels[2] / 255.0, atol=1e-6)

    video = read_media(_mp4(tmp_path / "loop.mp4"))
    assert video.kind == "video" and video.spacing is None and video.meta["fps"] == pytest.approx(10)
    frames = video.frames()
    assert not isinstance(frames, (list, tuple))  # lazy: decoded while iterated
    assert len(list(frames)) == 5
    assert video.frame(3).mean() == pytest.approx(120 / 255, abs=0.03)

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="unsupported file type .txt"):
        read_media(tmp_path / "notes.txt")


def test_read_frame_decodes_one_frame_and_refuses_ambiguity(tmp_path):
    path, pixels = _cine_dcm(tmp_path / "cine.dcm")
    image, spacing, meta = read_frame(path, 3)
    np.testing.assert_allclose(image, pixels[3] / 255.0, atol=1e-6)
    assert spacing is None and meta["n_frames"] == 4
    with pytest.raises(InputError, match="no frame 4"):
        read_frame(path, 4)
    with pytest.raises(InputError, match="cine loop .*masks/cine/frame_NNNNN.png"):
        read_frame(path, None)  # a multi-frame file needs one mask per labelled frame
    mp4 = _mp4(tmp_path / "loop.mp4")
    assert read_frame(mp4, 1)[0].mean() == pytest.approx(40 / 255, abs=0.03)
    with pytest.raises(InputError, match="no frame 9"):
        read_frame(mp4, 9)


def _strip_preamble(path, keep_meta: bool) -> bytes:
    raw = path.read_bytes()
    if keep_meta:
        return raw[132:]
    meta_length = int.from_bytes(raw[140:144], "little")  # (0002,0000) UL: the group's length
    return raw[144 + meta_length:]


@pytest.mark.parametrize("keep_meta", [True, False], ids=["file-meta-no-preamble", "bare-data-set"])
def test_dicom_without_preamble_is_read(tmp_path, keep_meta):
    pixels = (np.arange(60 * 80) % 251).astype(np.uint8).reshape(60, 80)
    ds = make_ds(pixels, tsyntax=ImplicitVRLittleEndian)
    ds.SequenceOfUltrasoundRegions = Sequence([region(max_x=79, max_y=59, dx=0.005, dy=0.005)])
    full = save(ds, tmp_path / "full.dcm")
    head = _strip_preamble(full, keep_meta)
    assert head[128:132] != b"DICM" and looks_like_dicom(head[:132])
    for name in ("bare.dcm", "EXPORT0001"):  # extension-less PACS export too
        (tmp_path / name).write_bytes(head)
        media = read_media(tmp_path / name)
        assert media.kind == "dicom"
        np.testing.assert_allclose(next(media.frames()), pixels / 255.0, atol=1e-6)
        assert media.spacing.row_mm == pytest.approx(0.05)


def test_what_is_not_dicom_stays_refused(tmp_path):
    assert not looks_like_dicom(b"\x89PNG\r\n\x1a\n" + bytes(124))
    assert not looks_like_dicom(b"this is not a DICOM file\n" * 6)
    assert not looks_like_dicom(b"\x00\x00\x00\x20ftypisom" + bytes(120))
    text = tmp_path / "notes.dcm"
    text.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(InputError, match="not a DICOM file"):
        read_media(text)


def test_sequential_jpeg_with_wrong_scan_header_is_read_as_libjpeg_6b_does(tmp_path):
    grey = (np.add.outer(np.arange(32), np.arange(48)) * 2).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, "JPEG", quality=95)
    good = buf.getvalue()
    sos = good.index(b"\xff\xda")
    bad = bytearray(good)
    p = sos + 5 + 2 * good[sos + 4]
    assert bad[p:p + 3] == b"\x00\x3f\x00"
    bad[p + 1] = 0  # Se = 0, as in NEMA's NM1_JPLY (pydicom's JPEG-lossy.dcm)
    frames = {}
    for name, stream in (("good", good), ("bad", bytes(bad))):
        ds = make_ds(grey, tsyntax=JPEGBaseline8Bit, pixel_data=encapsulate([stream]))
        frames[name], _, _ = read_dicom(save(ds, tmp_path / f"{name}.dcm"))
    # the same picture; decoders (Pillow's libjpeg-turbo, pylibjpeg's libjpeg) may round the IDCT apart
    np.testing.assert_allclose(frames["bad"], frames["good"], atol=1.5 / 255)


def test_missing_decoder_names_transfer_syntax_and_package(tmp_path, monkeypatch):
    import pydicom.pixels

    missing = types.SimpleNamespace(is_available=False,
                                    missing_dependencies=["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"])
    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda tsyntax: missing)
    ds = make_ds(np.zeros((8, 8), dtype=np.uint8), tsyntax=JPEGBaseline8Bit,
                 pixel_data=encapsulate([b"\xff\xd8" + b"\x00" * 30 + b"\xff\xd9"]))
    with pytest.raises(InputError) as info:
        read_dicom(save(ds, tmp_path / "jpeg.dcm"))
    message = str(info.value)
    assert "jpeg.dcm" in message and "JPEG Baseline" in message and "pip install pylibjpeg pylibjpeg-libjpeg" in message


# ------------------------------------------------------------------------------------------------
# Datasets of DICOM images and labelled cine frames
# ------------------------------------------------------------------------------------------------

SPACING_MM = 0.08


def _write_media_dataset(root, n_dicom=6, spacing=SPACING_MM):
    """images/dNN.dcm (PixelSpacing) + masks/dNN.png; a multi-frame DICOM and an MP4 with two
    labelled frames each (masks/<loop>/frame_NNNNN.png)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n_dicom):
        image, mask = ellipse_pair(rng, 60, 76)
        ds = make_ds(image)
        ds.PixelSpacing = [spacing, spacing]
        save(ds, root / "images" / f"d{i:02d}.dcm")
        Image.fromarray(mask).save(root / "masks" / f"d{i:02d}.png")
    pairs = [ellipse_pair(rng, 60, 76) for _ in range(4)]
    save(make_ds(np.stack([p[0] for p in pairs]), frames=4), root / "images" / "cine.dcm")
    writer = VideoWriter(root / "images" / "loop.mp4", fps=10)
    for image, _ in pairs:
        writer.write(np.repeat(image[..., None], 3, axis=2))
    writer.close()
    for loop in ("cine", "loop"):
        (root / "masks" / loop).mkdir()
        for index in (1, 3):
            Image.fromarray(pairs[index][1]).save(root / "masks" / loop / f"frame_{index:05d}.png")
    return root


def test_discovery_of_dicom_images_and_labelled_frames(tmp_path):
    data = _write_media_dataset(tmp_path / "data")
    samples, problems = discover_samples(data)
    assert not problems
    by_stem = {s.stem: s for s in samples}
    assert set(by_stem) == {f"d{i:02d}" for i in range(6)} | {
        "cine_frame_00001", "cine_frame_00003", "loop_frame_00001", "loop_frame_00003"}
    assert by_stem["d00"].frame is None and by_stem["loop_frame_00003"].frame == 3
    assert by_stem["cine_frame_00001"].subject == "cine"  # frames of one loop: one subject
    for seed in range(5):
        train, val = split_samples(samples, seed=seed, val_fraction=0.3)
        assert not {s.subject for s in train} & {s.subject for s in val}


def test_discovery_reports_what_cannot_be_used(tmp_path):
    data = _write_media_dataset(tmp_path / "data", n_dicom=2)
    (data / "images" / "solo.mp4").write_bytes((data / "images" / "loop.mp4").read_bytes())
    Image.fromarray(np.zeros((60, 76), np.uint8)).save(data / "masks" / "solo.png")  # one mask for a video
    Image.fromarray(np.zeros((60, 76), np.uint8)).save(data / "masks" / "loop.png")  # and a frame folder
    (data / "masks" / "d00").mkdir()  # frame folder beside the DICOM's mask file
    Image.fromarray(np.zeros((60, 76), np.uint8)).save(data / "images" / "still.png")
    (data / "masks" / "still").mkdir()  # frame folder for a still image
    Image.fromarray(np.zeros((60, 76), np.uint8)).save(data / "masks" / "still" / "frame_00000.png")
    (data / "masks" / "gone").mkdir()  # no such loop
    (data / "masks" / "cine" / "notes.txt").write_text("x")  # not a frame mask
    samples, problems = discover_samples(data)
    text = "\n".join(str(p) for p in problems)
    assert "solo.png: is one mask for the cine loop images/solo.mp4" in text
    assert "masks/loop: and loop.png both label images/loop.mp4" in text
    assert "masks/d00: and d00.png both label images/d00.dcm" in text
    assert "masks/still: is a folder of frame masks, but images/still.png is a still image" in text
    assert "gone: is a folder of frame masks with no matching cine loop" in text
    assert "notes.txt: is not a frame mask" in text
    assert {s.stem for s in samples} == {"d01", "cine_frame_00001", "cine_frame_00003"}


def test_cache_reads_dicom_and_frames(tmp_path):
    data = _write_media_dataset(tmp_path / "data", n_dicom=2)
    (data / "masks" / "cine" / "frame_00009.png").write_bytes((data / "masks" / "cine" / "frame_00001.png").read_bytes())
    samples, _ = discover_samples(data)
    tensors, problems = load_tensor_set(samples, 32, 1)
    assert len(tensors) == 6 and tensors.images.shape == (6, 1, 32, 32)
    assert [str(p) for p in problems] == [f"{data / 'images' / 'cine.dcm'}: has 4 frame(s), so there is no frame 9 -- "
                                          "number frame masks from 0 (frame_00000.png is the first frame), as "
                                          "`nerveseg segment` does"]


class TruthPredictor:
    """Predicts a mask shifted by ``shift`` pixels (so HD is known)."""

    class_names = ["nerve"]

    def __init__(self, masks, shift=2):
        self.masks, self.shift = masks, shift

    def predict(self, image):
        key = image.tobytes()
        return np.roll(self.masks[key], self.shift, axis=1).astype(np.float32)


def test_dicom_calibration_reaches_hd_in_mm(tmp_path):
    data = _write_media_dataset(tmp_path / "data", n_dicom=3)
    samples, _ = discover_samples(data)
    masks = {}
    from nerveseg.data.io import read_mask

    for s in samples:
        image = read_frame(s.image_path, s.frame)[0]
        masks[image.tobytes()] = read_mask(s.mask_path, label=1)
    predictor = TruthPredictor(masks)
    rows, _, problems = evaluate_samples(predictor, samples, tmp_path / "eval", label=1, class_labels=[1],
                                         overlays=False, progress=False)
    assert not problems
    for row in rows["nerve"]:
        if row["stem"].startswith("d"):  # DICOM with PixelSpacing: mm on its own
            assert row["hd"] == pytest.approx(2) and row["hd_mm"] == pytest.approx(2 * SPACING_MM)
        else:  # the cine loops carry no calibration
            assert row["hd_mm"] is None
    rows, _, _ = evaluate_samples(predictor, samples, tmp_path / "eval", label=1, class_labels=[1], mm_per_pixel=0.5,
                                  overlays=False, progress=False)
    assert all(r["hd_mm"] == pytest.approx(1.0) for r in rows["nerve"])  # the user's value wins


def test_train_and_evaluate_on_dicom_and_cine_frames(tmp_path, capsys):
    from nerveseg.cli import main

    data = _write_media_dataset(tmp_path / "data")
    run, out = tmp_path / "run", tmp_path / "eval"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--size", "32",
                 "--label", "1", "--quiet"]) == 0
    config = json.loads((run / "config.json").read_text())
    stems = set(config["train_stems"] + config["val_stems"])
    assert {"d00", "cine_frame_00001", "loop_frame_00003"} <= stems
    assert main(["evaluate", "--model", str(run), "--data", str(data), "--out", str(out), "--backend", "torch",
                 "--no-overlays", "--quiet"]) == 0
    with open(out / "per_image.csv", newline="") as f:
        rows = {r["stem"]: r for r in csv.DictReader(f)}
    assert len(rows) == 10
    assert rows["d00"]["hd_mm"] != "" and rows["loop_frame_00001"]["hd_mm"] == ""
    assert float(rows["d00"]["hd_mm"]) == pytest.approx(float(rows["d00"]["hd"]) * SPACING_MM, rel=1e-4)
