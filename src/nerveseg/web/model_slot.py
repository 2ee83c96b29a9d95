"""The model the server segments with: loaded once, shared by every request, swappable for a
fine-tuned one from the page."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from ..config import RunConfig

# From docs/MODEL_CARD.md (the shipped model's validation, issue 4); shown for the shipped model.
SHIPPED_CARD = {
    "name": "nerveseg_nerves",
    "data": "usgra-seg dataset, T. M. K., CC-BY 4.0: 204 peripheral-nerve ultrasound images, one machine, one examiner; "
            "mn-wrist images from the DL-UNet project (SasageyoOrg/dl-unet), GPL-3.0: 190 carpal-tunnel images of 75 patients",
    "validation": "one EfficientNet-Lite0 U-Net per anatomy, each trained on every image of its data set, and a router "
                  "that sends each image to one of them; the recipe, cross-validated on 5 folds (by patient for the wrist), "
                  "each member at its own cut chosen by nested CV: wrist nerve Dice 0.903 (190 images), no complete miss, "
                  "median area error 7.4%; usgra-seg 0.697 (204 images), 2.9% complete misses "
                  "(docs/MODEL_CARD.md; the package's model_card.json has the latest figures)",
    "limits": "trained on plexus, elbow, femoral and sciatic nerves (one machine) and the median nerve at the carpal tunnel "
              "inlet (one wrist data set); not on the forearm, other machines, children or pathology; the router was "
              "tested on these two data sets only; check every outline and its route",
    "use": "Not a medical device. Research and decision support only.",
}


def _card(run_dir: Path, shipped: bool) -> dict | None:
    """The run folder's own ``model_card.json`` (keys as SHIPPED_CARD) when it has one; else the
    shipped model's summary above for the shipped model; else None."""
    import json

    path = run_dir / "model_card.json"
    if path.is_file():
        try:
            return {str(k): str(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
        except (OSError, ValueError, AttributeError):
            pass
    return SHIPPED_CARD if shipped else None


def warm_up(predictor) -> None:
    """One prediction at start-up, so the first clinician's upload does not pay onnxruntime's
    first-run cost (the network input is always the letterbox size, so any image will do)."""
    import numpy as np

    predictor.predict(np.zeros((64, 64), np.float32))


def model_info(run_dir: Path, predictor, shipped: bool) -> dict:
    from ..models import count_parameters, create

    config: RunConfig = predictor.config
    try:
        import torch

        with torch.device("meta"):
            params = count_parameters(create(config.model.arch, **config.model.kwargs))
    except Exception:  # an architecture that cannot be built on the meta device
        params = None
    t = config.train
    info = {
        "run": str(run_dir),
        "shipped": shipped,
        "architecture": config.model.arch,
        "parameters": params,
        "classes": list(getattr(predictor, "class_names", None) or ["nerve"]),
        "input_size": config.preprocess.size,
        "members": len(config.members) or 1,  # an ensemble averages this many models
        # a routed model sends each image to one of these (one model per anatomy), it does not average them
        "routes": list(getattr(predictor, "route_names", None) or []),
        "threshold": config.inference.threshold,  # the page's default probability cut
        "low_confidence": config.inference.low_confidence,  # the QC flag's cut, chosen with the model
        "backend": type(predictor).__name__ + (" (native SAConv)" if getattr(predictor, "native_ops", False) else ""),
        "recipe": {
            "epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr, "schedule": t.schedule,
            "augment": list(t.augment), "train_images": len(config.train_stems), "val_images": len(config.val_stems),
            "label": config.data.label,
        },
        "card": _card(Path(run_dir), shipped),
    }
    from .jobs import read_history

    history = read_history(Path(run_dir) / "history.csv")
    val = [r["val_dice"] for r in history if r.get("val_dice") is not None and r["val_dice"] >= 0]
    info["best_val_dice"] = max(val) if val else None
    return info


class ModelSlot:
    def __init__(self, run_dir: Path, loader: Callable[[Path], object], shipped_dir: Path | None):
        self._loader = loader
        self._shipped = Path(shipped_dir).resolve() if shipped_dir else None
        self._lock = threading.Lock()
        self.original = Path(run_dir)
        self.run_dir = Path(run_dir)
        self.predictor = loader(self.run_dir)
        warm_up(self.predictor)
        self.info = model_info(self.run_dir, self.predictor, self.is_shipped(self.run_dir))

    def is_shipped(self, run_dir: Path) -> bool:
        return self._shipped is not None and Path(run_dir).resolve() == self._shipped

    @property
    def label(self) -> str:
        return f"{self.info['architecture']} ({'shipped' if self.info['shipped'] else self.run_dir.name})"

    def current(self):
        with self._lock:
            return self.predictor, self.label

    def current_with_dir(self):
        """The predictor, its label and its run folder, consistently (a switch may happen between
        two calls): the folder is what a case's DICOM SEG names as the algorithm."""
        with self._lock:
            return self.predictor, self.label, self.run_dir

    def switch(self, run_dir: Path) -> dict:
        predictor = self._loader(Path(run_dir))  # outside the lock: requests keep the old one meanwhile
        warm_up(predictor)
        info = model_info(Path(run_dir), predictor, self.is_shipped(run_dir))
        with self._lock:
            self.predictor, self.run_dir, self.info = predictor, Path(run_dir), info
        return info
