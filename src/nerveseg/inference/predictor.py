"""Load a trained run folder and turn images into probability maps on their own pixel grid."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..config import RunConfig
from ..data.preprocess import from_network_output, to_network_input
from ..errors import InputError
from ..models import create
from ..training.checkpoint import load_weights
from ..training.trainer import resolve_device


class Predictor:
    """A trained network plus the preprocessing it was trained with.

    ``predict(image)`` takes a (H, W) float image in [0, 1] and returns (H, W) probabilities.
    Inference runs in float32 with channels_last (about 3x faster on CPU than the default
    layout, bit-for-bit the same function).
    """

    def __init__(self, model: torch.nn.Module, config: RunConfig, device: str = "auto"):
        self.config = config
        self.size = config.preprocess.size
        self.device = resolve_device(device)
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto") -> "Predictor":
        run_dir = Path(run_dir)
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise InputError(run_dir, "not a nerveseg run folder (no config.json)", "pass the --out folder of `nerveseg train`")
        config = RunConfig.load(config_path)
        model = create(config.model.arch, **config.model.kwargs)
        load_weights(model, run_dir / "model.safetensors")
        return cls(model, config, device)

    @torch.inference_mode()
    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.predict_many([image])[0]

    @torch.inference_mode()
    def predict_many(self, images: Iterable[np.ndarray], batch_size: int = 4) -> list[np.ndarray]:
        images = list(images)
        results: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            chunk = [to_network_input(img, self.size) for img in images[start : start + batch_size]]
            x = torch.cat([t for t, _ in chunk]).to(self.device).contiguous(memory_format=torch.channels_last)
            prob = torch.sigmoid(self.model(x).float())
            results.extend(from_network_output(prob[i], box) for i, (_, box) in enumerate(chunk))
        return results
