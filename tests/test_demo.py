"""``nerveseg demo`` on the example files shipped in the package (works without ../shared)."""

from __future__ import annotations

import csv

import pytest

from nerveseg.cli.main import main
from nerveseg.examples import example_files, examples_dir


def test_examples_are_shipped_small_attributed_and_free_of_local_paths():
    folder = examples_dir()
    names = [p.name for p in example_files(folder)]
    assert names == ["usgra_0045.png", "usgra_0045_cine.mp4", "usgra_0053.png", "usgra_0053_calibrated.dcm",
                     "usgra_0067.png", "wrist_Pz002-001_calibrated.dcm", "wrist_Pz010-001.png"]
    assert sum(p.stat().st_size for p in example_files(folder)) < 650_000
    attribution = (folder / "ATTRIBUTION.md").read_text()
    assert "usgra-seg dataset, T. M. K., CC-BY 4.0" in attribution and "made-up calibration" in attribution
    assert "mn-wrist images from the DL-UNet project (SasageyoOrg/dl-unet), GPL-3.0" in attribution
    # at most 5 frames of each data set are shipped (../shared/README.md)
    assert len([n for n in names if n.startswith("usgra_")]) <= 5 and len([n for n in names if n.startswith("wrist_")]) <= 5
    for p in example_files(folder):
        data = p.read_bytes()
        assert b"/work/" not in data and b"/home/" not in data and b"/tmp/" not in data, p.name


def test_demo_segments_every_example(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nerveseg serve" in printed and str(out) in printed and "CC-BY 4.0" in printed and "GPL-3.0" in printed
    with open(out / "measurements.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_file = {}
    for r in rows:
        by_file.setdefault(r["file"].rsplit("/", 1)[-1], []).append(r)
    assert sorted(by_file) == sorted(p.name for p in example_files())
    assert len(by_file["usgra_0045_cine.mp4"]) == 10
    dicom = by_file["usgra_0053_calibrated.dcm"][0]
    assert float(dicom["area_mm2"]) == pytest.approx(int(dicom["area_px"]) * 0.075**2, rel=1e-3)
    wrist = by_file["wrist_Pz002-001_calibrated.dcm"][0]
    assert float(wrist["area_mm2"]) == pytest.approx(int(wrist["area_px"]) * 0.065**2, rel=1e-3)
    assert all(int(r["area_px"]) > 0 for r in rows)  # the shipped model finds a nerve in every example
    # the router sends the wrist frames to the wrist model and the rest to the regional-anaesthesia one
    for name, mine in by_file.items():
        assert {r["model_route"] for r in mine} == {"wrist" if name.startswith("wrist_") else "nerves"}, name
    assert "wrist_Pz010-001.png: nerve CSA" in printed and "model route wrist" in printed
    for stem in ("usgra_0045", "usgra_0053", "usgra_0067"):
        assert (out / f"{stem}_mask.png").is_file() and (out / f"{stem}_overlay.png").is_file()
    assert (out / "usgra_0045_cine_overlay.mp4").is_file() and (out / "usgra_0045_cine_csa.png").is_file()
