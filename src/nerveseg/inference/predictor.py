"""Load a trained run folder and turn images into probability maps on their own pixel grid.

Every predictor (PyTorch ``Predictor``, onnxruntime ``OnnxPredictor``, ``EnsemblePredictor``,
``RoutedPredictor``)
shares ``ProbabilityPredictor``'s pipeline: letterbox + standardise, the network's per-class
sigmoid probabilities (averaged with the mirrored input under test-time augmentation, and over
members for an ensemble, at the network's resolution), back to the original grid, then the
post-processing chosen for the model (``config.inference``). Subclasses only supply
``network_probabilities``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..config import RunConfig
from ..data.preprocess import from_network_output, mirror_content, to_network_input
from ..errors import ConfigError, InputError
from ..models import create
from ..training.checkpoint import load_weights
from ..training.trainer import resolve_device


def keep_largest_region(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Zero the probability of every connected region of ``prob >= threshold`` but the largest
    (8-connectivity), so every consumer -- masks, measurements, metrics -- sees one structure."""
    from scipy import ndimage

    labels, n = ndimage.label(prob >= threshold, structure=np.ones((3, 3), dtype=bool))
    if n <= 1:
        return prob
    sizes = np.bincount(labels.ravel())[1:]
    drop = (labels > 0) & (labels != 1 + int(np.argmax(sizes)))
    out = prob.copy()
    out[drop] = 0.0
    return out


class ProbabilityPredictor:
    """The shared prediction pipeline. ``predict(image)`` takes a (H, W) float image in [0, 1]
    and returns (H, W) nerve probabilities (the first class); ``predict_classes(image)`` returns
    (C, H, W), one channel per name in ``class_names``.

    ``tta`` (default: the model's ``config.inference.tta``) averages each prediction with the
    mirror image of the prediction for the left-right mirrored input.
    """

    config: RunConfig
    size: int

    def _init_pipeline(self, config: RunConfig, tta: bool | None = None) -> None:
        self.config = config
        self.size = config.preprocess.size
        self.class_names = list(config.data.class_names)
        self.tta = config.inference.tta if tta is None else bool(tta)
        unknown = [c for c in config.inference.keep_largest if c not in self.class_names]
        if unknown:
            raise ConfigError(f"keep_largest names unknown classes {unknown}; the model has {self.class_names}")

    def network_probabilities(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """(B, 1, S, S) standardised inputs -> (B, C, S, S) float32 probabilities."""
        raise NotImplementedError

    def _batch_probabilities(self, x: torch.Tensor, boxes) -> torch.Tensor:
        if not self.tta:
            return self.network_probabilities(x)
        # the mirrored inputs ride in the same batch: one network call per member, not two
        both = self.network_probabilities(torch.cat([x, mirror_content(x, boxes)]))
        prob, mirrored = both[: len(x)], both[len(x) :]
        return 0.5 * (prob + mirror_content(mirrored, boxes))

    @torch.inference_mode()
    def predict_classes_many(self, images: Iterable[np.ndarray], batch_size: int = 4) -> list[np.ndarray]:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        images = list(images)
        results: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            chunk = [to_network_input(img, self.size) for img in images[start : start + batch_size]]
            boxes = [box for _, box in chunk]
            prob = self._batch_probabilities(torch.cat([t for t, _ in chunk]), boxes)
            for i, box in enumerate(boxes):
                out = from_network_output(prob[i], box)
                out = out[None] if out.ndim == 2 else out
                for c, name in enumerate(self.class_names):
                    if name in self.config.inference.keep_largest:
                        out[c] = keep_largest_region(out[c])
                results.append(out)
        return results

    def predict_classes(self, image: np.ndarray) -> np.ndarray:
        return self.predict_classes_many([image])[0]

    def predict_many(self, images: Iterable[np.ndarray], batch_size: int = 4) -> list[np.ndarray]:
        return [p[0] for p in self.predict_classes_many(images, batch_size)]

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.predict_many([image])[0]


def read_run_config(run_dir: Path) -> RunConfig:
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise InputError(run_dir, "not a nerveseg run folder (no config.json)", "pass the --out folder of `nerveseg train`")
    return RunConfig.load(config_path)


class Predictor(ProbabilityPredictor):
    """A trained PyTorch network plus the preprocessing it was trained with.

    Inference runs in float32 with channels_last (about 3x faster on CPU than the default
    layout, bit-for-bit the same function). ``from_run`` on an ensemble folder returns an
    ``EnsemblePredictor`` of ``Predictor`` members.
    """

    def __init__(self, model: torch.nn.Module, config: RunConfig, device: str = "auto", tta: bool | None = None):
        self._init_pipeline(config, tta)
        self.device = resolve_device(device)
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", tta: bool | None = None) -> "ProbabilityPredictor":
        run_dir = Path(run_dir)
        config = read_run_config(run_dir)
        if config.members:
            return EnsemblePredictor.from_run(run_dir, lambda member: cls.from_run(member, device=device), tta=tta)
        model = create(config.model.arch, **config.model.kwargs)
        load_weights(model, run_dir / "model.safetensors")
        return cls(model, config, device, tta)

    def network_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        return torch.sigmoid(self.model(x).float()).cpu()


class EnsemblePredictor(ProbabilityPredictor):
    """Several trained runs used as one model: the mean of their probabilities at the network's
    resolution (one preprocessing, one resize back, one test-time mirror for all members).

    An ensemble folder is a run folder whose config.json lists ``members`` (folders relative to
    it; ``nerveseg train --all-folds`` writes one). Members must share the input size and classes.
    """

    def __init__(self, members: Sequence[ProbabilityPredictor], config: RunConfig, tta: bool | None = None):
        if not members:
            raise ConfigError("an ensemble needs at least one member")
        self._init_pipeline(config, tta)
        for m in members:
            if m.size != self.size or m.class_names != self.class_names:
                raise ConfigError(f"ensemble members differ: input size {m.size} vs {self.size}, "
                                  f"classes {m.class_names} vs {self.class_names}")
            m.tta = False  # the ensemble mirrors once for all of them
        self.members = list(members)

    @classmethod
    def from_run(cls, run_dir: str | Path, load_member, tta: bool | None = None) -> "ProbabilityPredictor":
        """The ensemble of ``run_dir``'s members (each loaded by ``load_member``), or, for a routed
        model folder (``config.router``), its ``RoutedPredictor``."""
        run_dir = Path(run_dir)
        config = read_run_config(run_dir)
        members = []
        for name in config.members:
            member = (run_dir / name).resolve()
            if run_dir.resolve() not in member.parents:
                raise InputError(run_dir / "config.json", f"ensemble member {name!r} lies outside the ensemble folder",
                                 "members are sub-folders of the ensemble folder")
            members.append(load_member(member))
        if config.router:
            return RoutedPredictor(members, _load_folder_router(run_dir, config), config, tta)
        return cls(members, config, tta)

    def network_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        total = self.members[0].network_probabilities(x)
        for m in self.members[1:]:
            total = total + m.network_probabilities(x)
        return total / len(self.members)


def _load_folder_router(run_dir: Path, config: RunConfig):
    """The router of a routed model folder; its routes must be the members, in order."""
    from ..training.router import load_router

    folder = (run_dir / config.router).resolve()
    if run_dir.resolve() not in folder.parents:
        raise InputError(run_dir / "config.json", f"router {config.router!r} lies outside the model folder",
                         "the router is a sub-folder of the model folder")
    router, info = load_router(folder)
    if int(info.get("size", config.preprocess.size)) != config.preprocess.size:
        raise InputError(folder / "router.json", f"the router was fitted on {info['size']}-px inputs, the model reads "
                         f"{config.preprocess.size} px", "fit the router again with --size equal to the model's input size")
    if list(info["routes"]) != list(config.members):
        raise InputError(folder / "router.json", f"routes {info['routes']} are not the model's members {config.members}",
                         "assemble the model again with `nerveseg ensemble --route-by ROUTER --names ROUTES...`")
    return router


def rescale_to_cut(prob: np.ndarray, member_cut: float, cut: float) -> np.ndarray:
    """Map probabilities so that ``member_cut`` lands on ``cut``: piecewise linear through (0, 0),
    (member_cut, cut) and (1, 1). Monotone, so it keeps every ranking (ROC AUC) and
    ``prob >= member_cut`` is exactly ``mapped >= cut``."""
    if member_cut == cut:
        return prob
    low = prob * (cut / member_cut)
    high = cut + (prob - member_cut) * ((1.0 - cut) / (1.0 - member_cut))
    return np.where(prob < member_cut, low, high).astype(prob.dtype, copy=False)


class RoutedPredictor(ProbabilityPredictor):
    """One model per anatomy: each image goes to the one member its router names (``AnatomyRouter`` on
    the image letterboxed and standardised as the networks read it), so no user says which anatomy an
    image shows. Each member then predicts the image whole (its own letterbox, test-time mirror and
    region removal), and its probabilities are rescaled so that its own cut
    (``member.config.inference.threshold``, chosen on cross-validation for that anatomy) falls on the
    routed model's cut: one threshold serves every route. ``last_routes`` holds the route of every image
    of the last call, in order, for reports. A cine loop is one scan of one anatomy: callers that read one
    choose its route once (``choose_route`` on its first frames) and pass it as ``route``, so the CSA curve
    never switches models mid-loop."""

    def __init__(self, members: Sequence[ProbabilityPredictor], router: torch.nn.Module, config: RunConfig,
                 tta: bool | None = None):
        self._init_pipeline(config, tta)
        if len(members) != len(router.routes):
            raise ConfigError(f"{len(members)} members for the router's {len(router.routes)} routes")
        for m in members:
            if m.class_names != self.class_names:
                raise ConfigError(f"routed members differ in their classes: {m.class_names} vs {self.class_names}")
        self.members = list(members)
        self.router = router.eval()
        self.route_names = list(router.routes)
        self.last_routes: list[str] = []

    def route_probabilities(self, images: Sequence[np.ndarray], batch_size: int = 4) -> torch.Tensor:
        """(N, routes) the router's probabilities of each image."""
        out = [torch.zeros((0, len(self.route_names)))]
        for start in range(0, len(images), batch_size):
            x = torch.cat([to_network_input(img, self.size)[0] for img in images[start : start + batch_size]])
            out.append(torch.softmax(self.router(x), dim=1))
        return torch.cat(out)

    def route_many(self, images: Sequence[np.ndarray], batch_size: int = 4) -> list[int]:
        """The member index of each image."""
        return [int(i) for i in self.route_probabilities(images, batch_size).argmax(dim=1)]

    def choose_route(self, images: Sequence[np.ndarray], batch_size: int = 4) -> int:
        """One member index for frames of one scan: the route of the router's mean probability over them."""
        if not len(images):
            raise ConfigError("choose_route needs at least one frame")
        return int(self.route_probabilities(images, batch_size).mean(dim=0).argmax())

    @torch.inference_mode()
    def predict_classes_many(self, images: Iterable[np.ndarray], batch_size: int = 4,
                             route: int | None = None) -> list[np.ndarray]:
        """Each image's probabilities from its member; ``route`` (a member index, e.g. ``choose_route``'s
        for a cine loop) sends every image to that member instead of routing each."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        images = list(images)
        if route is None:
            routes = self.route_many(images, batch_size)
        elif isinstance(route, bool) or not isinstance(route, int) or not 0 <= route < len(self.members):
            raise ConfigError(f"route must be a member index in [0, {len(self.members)}), not {route!r}")
        else:
            routes = [route] * len(images)
        results: list[np.ndarray | None] = [None] * len(images)
        cut = float(self.config.inference.threshold)
        for index, member in enumerate(self.members):
            chosen = [i for i, r in enumerate(routes) if r == index]
            if not chosen:
                continue
            member.tta = self.tta
            member_cut = float(member.config.inference.threshold)
            for i, prob in zip(chosen, member.predict_classes_many([images[i] for i in chosen], batch_size)):
                results[i] = rescale_to_cut(prob, member_cut, cut)
        self.last_routes = [self.route_names[r] for r in routes]
        return results

    def network_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) inputs -> each one's member's probabilities at the network's resolution, rescaled
        to the routed cut (what a latency benchmark times; predictions go through predict_classes_many)."""
        routes = self.router(x.float().cpu()).argmax(dim=1)
        self.last_routes = [self.route_names[int(i)] for i in routes]
        out = None
        cut = float(self.config.inference.threshold)
        for index, member in enumerate(self.members):
            chosen = torch.nonzero(routes == index).flatten()
            if len(chosen) == 0:
                continue
            prob = member.network_probabilities(x[chosen])
            prob = torch.as_tensor(rescale_to_cut(prob.numpy(), float(member.config.inference.threshold), cut))
            if out is None:
                out = torch.zeros((len(x),) + tuple(prob.shape[1:]), dtype=prob.dtype)
            out[chosen] = prob
        return out
