"""``nerveseg demo``: segment the example files shipped in the package with the shipped model.

Works on a fresh machine with nothing but nerveseg installed: three usgra-seg frames (PNG), a
DICOM with a (demonstration) calibration, and a 10-frame cine loop (``nerveseg.examples``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .examples import example_files, examples_dir
from .inference.segment import SegmentOptions, SegmentResult, segment_files


@dataclass
class DemoResult:
    out: Path
    inputs: list[Path]
    model_dir: Path
    result: SegmentResult


def run_demo(out_dir: str | Path, model_dir: str | Path | None = None, backend: str = "auto", log=print) -> DemoResult:
    """Segment every example file into ``out_dir`` (masks, overlays, measurements.csv, the cine
    loop's overlay video and CSA plot), exactly as ``nerveseg segment`` would."""
    from .inference.onnx_backend import load_predictor
    from .pretrained import resolve_model

    model_dir = resolve_model(model_dir)
    inputs = example_files(examples_dir())
    predictor = load_predictor(model_dir, backend=backend)
    result = segment_files(inputs, predictor, out_dir, SegmentOptions(), log=log)
    return DemoResult(Path(out_dir), inputs, model_dir, result)
