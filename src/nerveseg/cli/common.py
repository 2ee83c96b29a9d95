"""What the command modules share: argument types (a finite positive number, a label, a list of
names, a JSON object, an X,Y pixel size) and whether this process reports under torchrun."""

from __future__ import annotations

import argparse
import json
import math
import os


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):  # inf: a cut-off that never flags, a pixel size that overflows
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _label(text: str) -> int | str:
    """An integer pixel value for raster masks, or a LabelMe shape name."""
    return int(text) if text.lstrip("-").isdigit() else text


def _labels(text: str) -> tuple[int | str, ...]:
    return tuple(_label(t.strip()) for t in text.split(",") if t.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as '{\"features\": [8, 16, 32, 64, 128]}'")
    return value


def _spacing_xy(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y in mm per pixel, got {text!r}") from None
    return x, y


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
