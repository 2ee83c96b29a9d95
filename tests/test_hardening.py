"""Issue 24's edge cases: numbers at the edges, infinite cut-offs, CSV injection, the command
line's trip-ups, the README's demo, the report's notes, "corrected" instead of low confidence, and
the case list after a reload. Every hostile file is made here, in the test."""

from __future__ import annotations

import csv
import importlib
import io
import math
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nerveseg.cli import main
from nerveseg.clinical.screening import Cutoffs, screen
from nerveseg.errors import ConfigError, InputError
from nerveseg.inference.calibration import Spacing, dicom_spacing, spacing_from_user
from nerveseg.inference.measure import measure_mask
from nerveseg.inference.segment import SegmentOptions, segment_files
from nerveseg.io_utils import atomic_write_csv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def web():
    """The web API's test helpers (a fake two-disc model, the client, upload, errors)."""
    pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[test]'")
    import test_web_api

    return test_web_api


class Discs:
    """The web tests' fake model (two discs of probability 0.9), without needing the web extra."""

    def __init__(self):
        from nerveseg.config import RunConfig

        self.config = RunConfig()

    def predict_many(self, images, batch_size=4):
        out = []
        for img in images:
            h, w = img.shape
            yy, xx = np.mgrid[:h, :w]
            prob = np.full((h, w), 0.02, np.float32)
            prob[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (h / 6) ** 2] = 0.9
            out.append(prob)
        return out


def grey(h=120, w=140, seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w)) * 200 + 20).astype(np.uint8)


def dicom_bytes(tmp_path: Path, dx: float, dy: float, frames: int = 1) -> Path:
    from test_calibration import make_ds, region, save

    pixels = np.stack([grey(seed=i) for i in range(frames)]) if frames > 1 else grey()
    ds = make_ds(pixels, frames=frames if frames > 1 else None)
    ds.SequenceOfUltrasoundRegions = [region(max_x=139, max_y=119, dx=dx, dy=dy)]
    return save(ds, tmp_path / f"calibrated_{frames}.dcm")


# ------------------------------------------------------------------------------------------------
# 7. numbers at the edges: the pixel size is bounded where a Spacing is made


def test_pixel_size_is_bounded_where_a_spacing_is_made(tmp_path):
    for bad in (1e-170, 1e-320, 1e200, 1e4, 1e-7):
        with pytest.raises(ConfigError, match="outside"):
            Spacing(bad, 0.1, "test")
        with pytest.raises(ConfigError, match="--mm-per-pixel") as err:
            spacing_from_user(bad)
        assert f"{bad:g}" in str(err.value) and "millimetres" in str(err.value)
    with pytest.raises(ConfigError, match="--spacing X"):
        spacing_from_user(spacing=(1e200, 0.1))
    assert spacing_from_user(1e-6).row_mm == 1e-6 and spacing_from_user(1e3).col_mm == 1e3  # the bounds are in
    # the largest and smallest pixel measure a frame-sized mask without overflow or a zero area
    mask = np.zeros((120, 140), bool)
    mask[20:100, 30:110] = True
    for size in (1e-6, 1e3):
        m = measure_mask(mask, spacing=Spacing(size, size, "test"))
        assert m["area_mm2"] > 0 and math.isfinite(m["perimeter_mm"]) and math.isfinite(m["circularity"])

    # a DICOM whose PhysicalDeltaX is 1e-170 cm: an InputError naming the file, the value and the fix
    from pydicom import dcmread

    path = dicom_bytes(tmp_path, dx=1e-170, dy=0.01)
    with pytest.raises(InputError) as err:
        dicom_spacing(dcmread(path, stop_before_pixels=True), path=path)
    text = str(err.value)
    assert str(path) in text and "1e-170" in text and "--mm-per-pixel" in text


def test_segment_measures_a_dicom_with_an_absurd_calibration_in_pixels(tmp_path):
    """The batch goes on: the file is measured in pixels, with one warning that says why."""
    path = dicom_bytes(tmp_path, dx=1e-170, dy=1e-170, frames=3)
    messages = []
    result = segment_files([path], Discs(), tmp_path / "out", SegmentOptions(), log=messages.append)
    assert not result.problems and len(result.rows) == 3
    assert all(r["area_mm2"] == "" and r["area_px"] > 0 for r in result.rows)
    warnings = [m for m in messages if "1e-170" in m and "--mm-per-pixel" in m]
    assert len(warnings) == 1, messages  # once for the file, not once per frame
    # the user's pixel size still wins over the file's
    result = segment_files([path], Discs(), tmp_path / "out2", SegmentOptions(spacing=spacing_from_user(0.1)),
                           log=messages.append)
    assert all(r["area_mm2"] != "" for r in result.rows)


def test_web_refuses_absurd_pixel_sizes_and_leaves_the_case_whole(web, tmp_path):
    with web.make_client(tmp_path) as c:
        data = web.png_bytes(web.grey())
        web.assert_error(c.post("/api/cases", params={"mm_per_pixel": 1e200}, content=data), 422, "1e+200", "millimetres")
        # a DICOM of 1e-170 cm per pixel: measured in pixels, and the warning says why and what to do
        case = web.upload(c, dicom_bytes(tmp_path, 1e-170, 0.01).read_bytes(), "tiny.dcm")
        assert case["frames"][0]["area_mm2"] is None and not case["calibrated"]
        assert any("1e-170" in w and "--mm-per-pixel" in w for w in case["warnings"]), case["warnings"]

        case = web.upload(c, data)
        cid = case["id"]
        web.assert_error(c.post(f"/api/cases/{cid}/scale", json={"mm_per_pixel": 1e-320}), 422, "outside")
        web.assert_error(c.post(f"/api/cases/{cid}/scale", json={"x0": -1e300, "y0": 0, "x1": 1e300, "y1": 0,
                                                                  "length_mm": 10}), 422, "scale line", "outside")
        after = c.get(f"/api/cases/{cid}").json()
        assert not after["calibrated"] and after["frames"][0]["area_mm2"] is None
        assert after["frames"] == case["frames"]
        # reset and keep still work on the case
        assert c.post(f"/api/cases/{cid}/frames/0/reset").status_code == 200
        r = c.post(f"/api/cases/{cid}/frames/0/keep", json={"x": web.BIG[1], "y": web.BIG[0]})
        assert r.status_code == 200, r.text
        r = c.post(f"/api/cases/{cid}/scale", json={"mm_per_pixel": 0.1})
        assert r.status_code == 200 and r.json()["calibrated"]


def test_scale_changes_the_case_only_when_every_frame_is_measured(web, tmp_path, monkeypatch):
    from nerveseg.web.cases import Case

    with web.make_client(tmp_path) as c:
        case = web.upload(c, dicom_bytes(tmp_path, 0.01, 0.01, frames=3).read_bytes(), "loop.dcm")
        before = c.get(f"/api/cases/{case['id']}").json()
        measurement = Case.measurement

        def fails_on_the_last_frame(self, index, spacing):
            if index == 2 and spacing is not None and spacing.row_mm == 0.5:
                raise FloatingPointError("a measurement that fails half way")
            return measurement(self, index, spacing)

        monkeypatch.setattr(Case, "measurement", fails_on_the_last_frame)
        r = c.post(f"/api/cases/{case['id']}/scale", json={"mm_per_pixel": 0.5})
        assert r.status_code == 500 and "FloatingPoint" not in r.text
        assert c.get(f"/api/cases/{case['id']}").json() == before  # no frame got the new pixel size


# ------------------------------------------------------------------------------------------------
# 8. non-finite screening cut-offs


def test_non_finite_cutoffs_are_refused(web, tmp_path, capsys):
    for bad in (math.inf, -math.inf, math.nan, 0.0):
        for field in ("wrist_csa_mm2", "wfr", "delta_csa_mm2"):
            with pytest.raises(ConfigError, match="finite"):
                Cutoffs(**{field: bad})
    with web.make_client(tmp_path) as c:
        for endpoint in ("/api/report", "/api/report.md", "/api/report.csv"):
            for query in ("wrist_csa=inf", "wfr=Infinity", "delta_csa=1e309"):
                web.assert_error(c.get(f"{endpoint}?{query}"), 422, "finite", query.split("=")[0])
            web.assert_error(c.get(f"{endpoint}?wfr=nan"), 422, "wfr")
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--manifest", "m.csv", "--measurements", "x.csv", "--out", "o", "--wrist-csa", "inf"])
    assert exit_.value.code == 2 and "finite" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# 9. CSV injection


def test_csv_cells_that_start_like_formulas_are_escaped():
    from nerveseg.io_utils import csv_cell, csv_text, csv_value

    for text in ("=1+1", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\t=1", "\r=1", "-", "=HYPERLINK(\"x\")"):
        assert csv_cell(text) == "'" + text and csv_value(csv_cell(text)) == text
    for kept in ("-1.5", "+2e-3", "-.5", "-inf", "", "a=b", "scan 1.png", -1.5, 3, None):
        assert csv_cell(kept) == kept
    assert csv_cell(csv_cell("=1")) == "'=1"  # a table read back and written again gets one quote, not two
    text = csv_text([{"file": "=1+1.png", "delta": -1.5, "note": "-0.50"}], ["file", "delta", "note"])
    assert text.splitlines()[1] == "'=1+1.png,-1.5,-0.50"


def test_measurements_csv_escapes_file_names_and_resume_still_matches_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = ["=1+1.png", "@cmd.png", "-2+3.png", "+x.png"]
    for name in names:
        Image.fromarray(grey()).save(name)
    result = segment_files([Path(n) for n in names], Discs(), "out", SegmentOptions(), log=lambda m: None)
    assert not result.problems
    lines = (tmp_path / "out" / "measurements.csv").read_text().splitlines()
    assert sorted(line.split(",")[0] for line in lines[1:]) == sorted("'" + n for n in names)
    # --resume reads the escaped names back as the files they are: nothing is segmented again
    again = segment_files([Path(n) for n in names], Discs(), "out", SegmentOptions(), log=lambda m: None, resume=True)
    assert len(again.skipped) == len(names)
    assert (tmp_path / "out" / "measurements.csv").read_text().splitlines() == lines


def test_web_manifest_report_and_case_csv_escape_formulas(web, tmp_path):
    # the page's names already lose "=" and "@" (display_name); "+" and "-" pass, and the CSV must hold them
    subject = "-2+3+cmd|calc"
    with web.make_client(tmp_path) as c:
        data = web.png_bytes(web.grey())
        wrist = web.upload(c, data, "+SUM(1).png", mm_per_pixel=0.08)
        forearm = web.upload(c, data, "forearm.png", mm_per_pixel=0.1)
        for case, region in ((wrist, "wrist"), (forearm, "forearm")):
            r = c.put(f"/api/cases/{case['id']}/tags", json={"subject": subject, "region": region, "side": "left"})
            shown = r.json()["tags"]["subject"]
            assert shown.startswith("-2+3+cmd")
            assert c.post(f"/api/cases/{case['id']}/save", json={}).status_code == 200
        manifest = (tmp_path / "ws" / "manifest.csv").read_text()
        # two saves rewrote the manifest: one quote each, never two
        assert manifest.count(",'-2+3+cmd") == 2 and "''" not in manifest and ",-2+3" not in manifest
        assert ",'+SUM(1).png," in manifest  # the source column: the client's file name
        rows = list(csv.DictReader(io.StringIO(c.get(f"/api/cases/{wrist['id']}/measurements.csv").text)))
        assert rows[0]["file"] == "'+SUM(1).png"
        (row,) = list(csv.DictReader(io.StringIO(c.get("/api/report.csv").text)))
        assert row["subject"] == "'" + shown
        assert float(row["delta_csa_mm2"]) < 0 and row["delta_csa_mm2"].startswith("-")  # a number stays a number
        assert c.get("/api/report").json()["rows"][0]["subject"] == shown  # shown as typed


# ------------------------------------------------------------------------------------------------
# 16. the command line


def test_version_and_suggestions(capsys):
    from nerveseg import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"nerveseg {__version__}"
    cases = [
        (["segmnt", "x.png"], "did you mean 'segment'?", "usage: nerveseg "),
        (["segment", "x.png", "--out", "o", "--mm-per-pixl", "0.1"], "did you mean --mm-per-pixel?",
         "usage: nerveseg segment"),
        (["segment", "x.png", "--ot", "o"], "--ot: did you mean --out?", "usage: nerveseg segment"),
        (["segment", "x.png", "--out", "o", "--postprocess", "larget"], "did you mean 'largest'?", "nerveseg segment"),
        (["train", "--data", "d", "--out", "o", "--epohcs", "3"], "did you mean --epochs?", "usage: nerveseg train"),
    ]
    for argv, hint, usage in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and hint in err and usage in err, err


def test_segment_of_missing_inputs_creates_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    result = segment_files([tmp_path / "nothere.png"], Discs(), out, SegmentOptions(), log=lambda m: None)
    assert len(result.problems) == 1 and result.table is None and not out.exists()
    backend = importlib.import_module("nerveseg.inference.onnx_backend")

    monkeypatch.setattr(backend, "load_predictor", lambda *a, **k: Discs())
    assert main(["segment", str(tmp_path / "nothere.png"), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "nothere.png" in captured.err and "wrote nothing" in captured.out and not out.exists()


def test_serve_on_a_port_in_use_says_so_and_exits_2(tmp_path, capsys):
    pytest.importorskip("uvicorn", reason="the web extra is not installed")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert f"port {port}" in err and "in use" in err and "--port" in err
    assert "open http" not in err and "loading the model" not in err


def test_serve_documents_its_exit_status(capsys):
    """Point 16: serve's exit codes were undocumented (a busy port exited 3 with uvicorn's errno)."""
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert "exit status:" in text and "\n  0  " in text and "\n  2  " in text and "port in\n     use" in text


def test_ctrl_c_during_segment_names_segment(monkeypatch, capsys):
    segment_commands = importlib.import_module("nerveseg.cli.segment_commands")
    clinical_commands = importlib.import_module("nerveseg.cli.clinical_commands")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(segment_commands, "cmd_segment", interrupted)
    assert main(["segment", "x.png", "--out", "o"]) == 130
    err = capsys.readouterr().err
    assert "(segment: --resume continues)" in err and "train:" not in err
    monkeypatch.setattr(clinical_commands, "cmd_report", interrupted)
    assert main(["report", "--manifest", "m", "--measurements", "x", "--out", "o"]) == 130
    assert "--resume" not in capsys.readouterr().err  # report has nothing to resume


def test_evaluate_accepts_model_default(monkeypatch, capsys):
    evaluate = importlib.import_module("nerveseg.evaluation.evaluate")
    from nerveseg.errors import NerveSegError
    from nerveseg.pretrained import pretrained_dir

    seen = []

    def fake_evaluate_run(run_dir, *args, **kwargs):
        seen.append(Path(run_dir))
        raise NerveSegError("stop here")

    monkeypatch.setattr(evaluate, "evaluate_run", fake_evaluate_run)
    assert main(["evaluate", "--model", "default", "--data", "d", "--out", "o"]) == 2
    assert seen == [pretrained_dir()]
    from nerveseg.pretrained import resolve_model

    assert resolve_model(None) == resolve_model("default") == pretrained_dir()
    assert resolve_model("runs/x") == Path("runs/x")


def test_cine_line_says_processing_rate_and_the_csa_plot_starts_at_zero(tmp_path):
    from nerveseg.inference.video import VideoWriter

    writer = VideoWriter(tmp_path / "loop.mp4", fps=10)
    for i in range(4):
        writer.write(np.repeat(grey(48, 64, i)[..., None], 3, axis=2))
    writer.close()
    messages = []
    segment_files([tmp_path / "loop.mp4"], Discs(), tmp_path / "out", SegmentOptions(), log=messages.append)
    (line,) = [m for m in messages if m.startswith("loop.mp4:")]
    assert "4 frames segmented" in line and "processing rate" in line and "plays at 10 frames/s" in line

    from nerveseg.inference.segment import csa_figure

    rows = [{"frame": i, "area_mm2": "", "area_px": 3070 + 40 * i} for i in range(5)]
    fig = csa_figure(rows, "loop")
    low, high = fig.axes[0].get_ylim()
    assert low == 0 and high >= 3230
    import matplotlib.pyplot as plt

    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# 17. the README's demo


def test_readme_demo_and_serve_commands_agree(tmp_path, monkeypatch, capsys):
    demo = importlib.import_module("nerveseg.demo")
    from nerveseg.examples import example_files
    from nerveseg.inference.segment import SegmentResult

    inputs = example_files()
    rows = [{"file": str(p), "frame": 0, "area_mm2": "", "area_px": 100, "qc_flags": ""} for p in inputs]
    monkeypatch.setattr(demo, "run_demo", lambda out, **k: demo.DemoResult(Path(out), inputs, Path("m"),
                                                                          SegmentResult(rows=rows)))
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", "demo"]) == 0
    printed = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "nerveseg demo --out demo" in readme
    command = "nerveseg serve --workspace demo/workspace"
    assert command in printed and command in readme
    # the page starts empty: both say to drop the example files onto it
    assert "drop the example files" in printed and "drop the example files" in readme
    assert str(inputs[0].parent) in printed
    ignored = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()]
    assert "/demo/" in ignored or "demo/" in ignored


# ------------------------------------------------------------------------------------------------
# 14. the screening report's notes


def test_report_notes_carry_qc_flags_corrections_and_drawn_scales(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("file,subject,region,side\nw.png,S1,wrist,right\nf.mp4,S1,forearm,right\n")
    measurements = tmp_path / "measurements.csv"
    fields = ["file", "frame", "component", "area_mm2", "qc_flags", "spacing_source"]
    rows = [{"file": "w.png", "frame": 0, "area_mm2": 6.0, "qc_flags": "touches_border;corrected",
             "spacing_source": "user scale line: 20 mm over 100.0 px (square pixels assumed)"}]
    rows += [{"file": "f.mp4", "frame": i, "area_mm2": 11.0, "qc_flags": "low_confidence" if i < 2 else "",
              "spacing_source": "user --mm-per-pixel"} for i in range(4)]
    atomic_write_csv(measurements, rows, fields)
    (row,) = screen(manifest, measurements)
    assert row["wfr"] == pytest.approx(6 / 11)  # forearm larger than wrist: the notes say what to check
    notes = row["notes"]
    assert "w: nerve touches the image border, mask corrected by hand, pixel size from a scale line drawn by hand" in notes
    assert "f: low model confidence (2 of 4 frames)" in notes
    assert "scale line" not in notes.split("f:")[1]  # a typed pixel size is no drawn scale


def test_web_report_notes_name_the_corrected_case(web, tmp_path):
    with web.make_client(tmp_path) as c:
        data = web.png_bytes(web.grey())
        wrist = web.upload(c, data, "wrist scan.png", mm_per_pixel=0.1)
        forearm = web.upload(c, data, "forearm.png")
        c.put(f"/api/cases/{wrist['id']}/tags", json={"subject": "p1", "region": "wrist", "side": "right"})
        c.put(f"/api/cases/{forearm['id']}/tags", json={"subject": "p1", "region": "forearm", "side": "right"})
        c.post(f"/api/cases/{wrist['id']}/frames/0/keep", json={"x": web.BIG[1], "y": web.BIG[0]})
        c.post(f"/api/cases/{forearm['id']}/scale", json={"x0": 10, "y0": 5, "x1": 10, "y1": 105, "length_mm": 10})
        r = c.get("/api/report").json()
        notes = r["rows"][0]["notes"]
        assert "wrist scan.png: mask corrected by hand" in notes, notes
        # the fake model finds two discs: the uncorrected forearm says so, the kept wrist no longer does
        assert "forearm.png: several regions measured together, pixel size from a scale line drawn by hand" in notes
        assert "mask corrected by hand" in c.get("/api/report.md").text


# ------------------------------------------------------------------------------------------------
# 15. a corrected mask says "corrected", not "low confidence"


def test_corrected_mask_is_flagged_corrected_not_low_confidence(web, tmp_path):
    with web.make_client(tmp_path) as c:
        case = web.upload(c, web.png_bytes(web.grey()))
        cid = case["id"]
        assert "low_confidence" not in case["frames"][0]["qc_flags"]
        labels = np.zeros((120, 140), np.uint8)
        labels[10:110, 95:135] = 1  # drawn where the model saw (almost) nothing
        r = c.put(f"/api/cases/{cid}/frames/0/mask", content=web.png_bytes(labels))
        m = r.json()
        assert m["edited"] and m["confidence"] < 0.7
        assert "low_confidence" not in m["qc_flags"] and "corrected" in m["qc_flags"]
        summary = next(s for s in c.get("/api/cases").json() if s["id"] == cid)
        assert "corrected" in summary["qc_flags"] and "low_confidence" not in summary["qc_flags"]
        # the model's own mask again: no "corrected"
        assert "corrected" not in c.post(f"/api/cases/{cid}/frames/0/reset").json()["qc_flags"]
    app_js = (ROOT / "src" / "nerveseg" / "web" / "static" / "app.js").read_text(encoding="utf-8")
    assert 'f === "corrected"' in app_js  # the page shows it as a fact, not as a warning


# ------------------------------------------------------------------------------------------------
# 13. the case list after a reload


def test_case_list_keeps_upload_order_and_carries_edited_and_saved(web, tmp_path):
    with web.make_client(tmp_path) as c:
        data = web.png_bytes(web.grey())
        ids = [web.upload(c, data, f"{name}.png")["id"] for name in ("a", "b", "c")]
        c.get(f"/api/cases/{ids[0]}")  # opening a case must not move it in the list
        c.post(f"/api/cases/{ids[1]}/frames/0/keep", json={"x": web.SMALL[1], "y": web.SMALL[0]})
        c.post(f"/api/cases/{ids[1]}/save", json={})
        listed = c.get("/api/cases").json()
        assert [s["id"] for s in listed] == ids
        by_id = {s["id"]: s for s in listed}
        assert by_id[ids[1]]["edited_frames"] == 1 and by_id[ids[1]]["saved_frames"] == 1
        assert by_id[ids[0]]["edited_frames"] == 0 and by_id[ids[0]]["saved_frames"] == 0
        c.delete(f"/api/cases/{ids[0]}")
        assert [s["id"] for s in c.get("/api/cases").json()] == ids[1:]
    app_js = (ROOT / "src" / "nerveseg" / "web" / "static" / "app.js").read_text(encoding="utf-8")
    assert "c.edited_frames > 0" in app_js and "c.saved_frames > 0" in app_js  # the page reads the summary's counts
