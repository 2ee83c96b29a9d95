"""Models shipped inside the package, so `nerveseg segment IMAGE` works with no --model.

Each model is a run folder (config.json + model.safetensors) or an ensemble folder (config.json
naming member run folders inside it) under this package; see docs/MODEL_CARD.md for how it was
trained and how well it does.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import InputError

DEFAULT_MODEL = "sa_unet_usgra"


def pretrained_dir(name: str = DEFAULT_MODEL) -> Path:
    """The folder of a shipped model; InputError when this install does not carry it."""
    folder = Path(str(resources.files(__package__).joinpath(name)))
    weights = (folder / "model.safetensors").is_file() or (folder / "fold_0" / "model.safetensors").is_file()
    if not weights or not (folder / "config.json").is_file():
        raise InputError(
            folder,
            "the pretrained model is not in this installation",
            "reinstall nerveseg, or pass --model RUN from `nerveseg train`",
        )
    return folder
