"""What one server process holds: settings, the model, the case store, the workspace, the
fine-tuning runner and the pool that runs segmentation off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .cases import CaseStore
from .jobs import FinetuneRunner, compare_on_validation
from .model_slot import ModelSlot
from .settings import ServeSettings
from .workspace import Workspace


class Busy(Exception):
    """More heavy requests than workers + queue: answered 503 with Retry-After."""


@dataclass
class WorkLimiter:
    """Admits at most ``workers + max_queue`` heavy requests at once (:meth:`slot`; more get
    :class:`Busy`) and runs them off the event loop, ``workers`` at a time in each of two pools:
    segmentations (:meth:`run`), and the work whose memory grows with the frame's pixels
    (:meth:`run_image`: PNGs of a frame, overlays, thumbnails, corrections, saves). Two pools, so
    the page's images do not wait behind a long cine loop, yet no more than ``workers`` of them
    hold a large frame's copies at once (without it, four thumbnails of a 7000x7000 frame at once
    in Starlette's 40-thread pool took the server from 2.1 to 5.7 GB)."""

    workers: int
    max_queue: int
    admitted: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="nerveseg-infer")
        self.image_pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="nerveseg-image")

    @property
    def full(self) -> bool:
        """Whether :meth:`slot` would refuse now (reserves nothing)."""
        return self.admitted >= self.workers + self.max_queue

    @contextlib.asynccontextmanager
    async def slot(self):
        with self._lock:
            if self.admitted >= self.workers + self.max_queue:
                raise Busy()
            self.admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self.admitted -= 1

    async def run(self, fn: Callable[..., Any], *args) -> Any:
        """Run ``fn`` in the inference pool (call inside :meth:`slot`)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def run_image(self, fn: Callable[..., Any], *args) -> Any:
        """Admit (503 when full) and run ``fn`` in the image pool."""
        async with self.slot():
            return await asyncio.get_running_loop().run_in_executor(self.image_pool, fn, *args)

    def shutdown(self) -> None:
        for pool in (self.pool, self.image_pool):
            pool.shutdown(wait=False, cancel_futures=True)


def _torch_loader(settings: ServeSettings) -> Callable[[Path], object]:
    from ..inference.onnx_backend import load_predictor

    return lambda run_dir: load_predictor(run_dir, backend="torch", device=settings.device)


class ServerState:
    def __init__(self, settings: ServeSettings, loader: Callable[[Path], object], shipped_dir: Path | None = None):
        self.settings = settings
        self.loader = loader
        self.model = ModelSlot(settings.model_dir, loader, shipped_dir)
        self.store = CaseStore(settings.max_cases, settings.max_store_bytes)
        self.workspace = Workspace(settings.workspace)
        # old vs new model on the run's validation pairs: the torch backend (the same function as
        # onnxruntime, tests/test_onnx.py) needs no ONNX export of the new weights first
        self.runner = FinetuneRunner(self.workspace.finetune,
                                     compare=lambda base, new: compare_on_validation(base, new, _torch_loader(settings)),
                                     keep=settings.keep_finetune_runs,
                                     protected=lambda: (self.model.run_dir, self.model.original))
        self.limiter = WorkLimiter(settings.workers, settings.max_queue)
        self.upload_dir = Path(tempfile.mkdtemp(prefix="nerveseg-uploads-"))

    def close(self) -> None:
        self.runner.shutdown()
        self.limiter.shutdown()
        shutil.rmtree(self.upload_dir, ignore_errors=True)
