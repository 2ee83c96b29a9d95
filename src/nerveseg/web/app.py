"""``create_app(settings)``: the FastAPI application of ``nerveseg serve``.

A thin layer, like ``cli/``: routers parse requests and call library functions
(``inference.segment``'s readers, ``inference.measure``, ``clinical.screening``); the page is
static HTML/CSS/JS served from ``web/static`` (no CDN, no external font, no inline script).
Every error is JSON ``{"detail": ..., "code": ...}`` with the message the CLI would print.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..errors import ConfigError, InputError, NerveSegError
from .cases import TooManyPixels
from .dicom_results import DicomOutRefused
from .media import UnsupportedMediaType, UploadTooLarge
from .routers import cases, service
from .security import SecurityMiddleware
from .settings import ServeSettings
from .state import Busy, ServerState

log = logging.getLogger("nerveseg.web")

STATIC = Path(str(resources.files(__package__).joinpath("static")))


def default_loader(settings: ServeSettings) -> Callable[[Path], object]:
    from ..inference.onnx_backend import load_predictor

    return lambda run_dir: load_predictor(run_dir, backend=settings.backend, device=settings.device)


def _error(status: int, detail: str, code: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


def create_app(settings: ServeSettings, loader: Callable[[Path], object] | None = None) -> FastAPI:
    """Build the app: the model is loaded here, once, and shared by every request."""
    from ..pretrained import pretrained_dir

    try:
        shipped = pretrained_dir()
    except InputError:
        shipped = None
    state = ServerState(settings, loader or default_loader(settings), shipped)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.close()

    app = FastAPI(
        title="nerveseg", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
        description="Segment, correct and measure peripheral nerves in ultrasound. Not a medical device. "
                    "Upload a file as the raw request body to POST /api/cases; every error is JSON "
                    "{detail, code}. With --token, send 'Authorization: Bearer <token>'.",
    )
    app.state.nerveseg = state

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError):
        status = 415 if isinstance(exc, UnsupportedMediaType) else 422
        return _error(status, str(exc), "unsupported_type" if status == 415 else "bad_input")

    @app.exception_handler(TooManyPixels)
    async def too_many_pixels(request: Request, exc: TooManyPixels):
        return _error(413, str(exc), "too_many_pixels")

    @app.exception_handler(ClientDisconnect)
    async def client_disconnect(request: Request, exc: ClientDisconnect):
        # routine (a closed tab, a cancelled upload): one line, not "unexpected error" and two
        # tracebacks; the answer goes nowhere
        log.warning("client disconnected during upload: %s %s", request.method, request.url.path)
        return _error(400, "the client disconnected before the request body was complete", "disconnected")

    @app.exception_handler(DicomOutRefused)
    async def dicom_out_refused(request: Request, exc: DicomOutRefused):
        return _error(exc.status, exc.detail, exc.code)

    @app.exception_handler(ConfigError)
    async def config_error(request: Request, exc: ConfigError):
        return _error(422, str(exc), "bad_option")

    @app.exception_handler(NerveSegError)
    async def nerveseg_error(request: Request, exc: NerveSegError):
        return _error(422, str(exc), "error")

    @app.exception_handler(UploadTooLarge)
    async def too_large(request: Request, exc: UploadTooLarge):
        return _error(413, f"{exc} -- send a smaller file, or start the server with a higher "
                           f"--max-image-mb / --max-video-mb", "too_large", {"Connection": "close"})

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy):
        return _error(503, "the server is segmenting as many files as it can queue; try again in a few seconds",
                      "busy", {"Retry-After": "2"})

    @app.exception_handler(HTTPException)  # Starlette's: also the router's own 404/405
    async def http_error(request: Request, exc: HTTPException):
        code = getattr(exc, "code", None) or "http_" + str(exc.status_code)
        return _error(exc.status_code, str(exc.detail), code, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
            parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
        return _error(422, "invalid request: " + "; ".join(parts), "bad_request")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # never a stack trace to the client
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, "internal error; the server log has the details", "internal")

    app.include_router(cases.router)
    app.include_router(service.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    def docs():  # the API described from /openapi.json by our own page: no CDN, works offline
        return FileResponse(STATIC / "docs.html", headers={"Cache-Control": "no-cache"})

    app.add_middleware(SecurityMiddleware, settings=settings)
    return app
