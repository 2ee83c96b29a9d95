"""Carpal tunnel screening: pairing, ratios and flags against hand-computed values."""

from __future__ import annotations

import csv

import pytest

from nerveseg.cli import main
from nerveseg.clinical.screening import Cutoffs, screen
from nerveseg.errors import ConfigError


def _write(tmp_path, manifest_rows, measurement_rows):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("file,subject,region,side\n" + "".join(",".join(r) + "\n" for r in manifest_rows))
    measurements = tmp_path / "seg" / "measurements.csv"
    measurements.parent.mkdir()
    with open(measurements, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "frame", "area_px", "area_mm2", "qc_flags"])
        writer.writeheader()
        writer.writerows(measurement_rows)
    return manifest, measurements


def test_pairs_wrist_and_forearm_and_flags(tmp_path):
    manifest, measurements = _write(
        tmp_path,
        [("a_w1.png", "A", "wrist", "right"), ("a_w2.png", "A", "wrist", "right"), ("a_f.png", "A", "forearm", "right"),
         ("b_w.png", "B", "wrist", "left"), ("b_f.png", "B", "forearm", "left"),
         ("c_w.png", "C", "wrist", "left"), ("d_x.png", "D", "elbow", "left")],
        [
            {"file": "in/a_w1.png", "area_mm2": "12.0"}, {"file": "in/a_w2.png", "area_mm2": "14.0"},
            {"file": "in/a_f.png", "area_mm2": "8.0"},
            {"file": "b_w.png", "area_mm2": "9.0"}, {"file": "b_f.png", "area_mm2": "7.5"},
            {"file": "c_w.png", "area_mm2": "", "area_px": "500"},
            {"file": "d_x.png", "area_mm2": "5"},
        ],
    )
    rows = {r["subject"]: r for r in screen(manifest, measurements)}
    a = rows["A"]
    assert a["wrist_csa_mm2"] == pytest.approx(13.0) and a["n_wrist"] == 2  # mean of two images
    assert a["wfr"] == pytest.approx(13 / 8) and a["delta_csa_mm2"] == pytest.approx(5.0)
    assert a["wrist_csa_flag"] and a["wfr_flag"] and a["delta_csa_flag"] and a["any_flag"]
    b = rows["B"]
    assert b["wfr"] == pytest.approx(1.2) and b["delta_csa_mm2"] == pytest.approx(1.5)
    assert not (b["wrist_csa_flag"] or b["wfr_flag"] or b["delta_csa_flag"] or b["any_flag"])
    c = rows["C"]  # uncalibrated: never turned into mm²
    assert c["wrist_csa_mm2"] is None and "no calibration" in c["notes"] and not c["any_flag"]
    assert "D" not in rows  # elbow is neither site
    # cut-offs are configurable: at 9 mm² B's wrist is flagged
    b9 = {r["subject"]: r for r in screen(manifest, measurements, Cutoffs(wrist_csa_mm2=9.0))}["B"]
    assert b9["wrist_csa_flag"]
    with pytest.raises(ConfigError):
        Cutoffs(wfr=0)


def test_report_command_writes_csv_and_markdown(tmp_path, capsys):
    manifest, measurements = _write(
        tmp_path,
        [("w.png", "S1", "wrist", "right"), ("f.png", "S1", "forearm", "right")],
        [{"file": "w.png", "area_mm2": "11"}, {"file": "f.png", "area_mm2": "7"}],
    )
    (measurements.parent / "w_overlay.png").write_bytes(b"png")
    out = tmp_path / "report"
    assert main(["report", "--manifest", str(manifest), "--measurements", str(measurements), "--out", str(out)]) == 0
    with open(out / "screening.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["wfr"] == "1.57" and row["delta_csa_mm2"] == "4.00" and row["any_flag"] == "yes"
    md = (out / "report.md").read_text()
    assert "Decision support only" in md and "Hobson-Webb" in md and "../seg/w_overlay.png" in md
    assert "1 with a flag" in capsys.readouterr().out
