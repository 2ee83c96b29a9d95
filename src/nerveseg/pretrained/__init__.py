"""Models shipped inside the package, so `nerveseg segment IMAGE` works with no --model.

Each model is a run folder (config.json + model.safetensors) or an ensemble folder (config.json
naming member run folders inside it) under this package; see docs/MODEL_CARD.md for how it was
trained and how well it does.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import InputError

DEFAULT_MODEL = "nerveseg_nerves"


def pretrained_dir(name: str = DEFAULT_MODEL) -> Path:
    """The folder of a shipped model; InputError when this install does not carry it."""
    folder = Path(str(resources.files(__package__).joinpath(name)))
    if not _has_weights(folder):
        raise InputError(
            folder,
            "the pretrained model is not in this installation",
            "reinstall nerveseg, or pass --model RUN from `nerveseg train`",
        )
    return folder


def _has_weights(folder: Path) -> bool:
    """config.json plus weights: its own, or every member's for an ensemble (fold models or seeds)."""
    try:
        members = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("members") or []
    except (OSError, ValueError, AttributeError):
        return False
    return all((folder / m / "model.safetensors").is_file() for m in members) if members \
        else (folder / "model.safetensors").is_file()


def resolve_model(value: str | Path | None) -> Path:
    """The run folder a ``--model`` option means: none, or ``default`` (as ``train --init-from
    default``), is the shipped model; anything else is the folder given (a folder that is really
    named ``default`` and holds a run still wins)."""
    if value is None or (str(value) == "default" and not (Path(value) / "config.json").is_file()):
        return pretrained_dir()
    return Path(value)
