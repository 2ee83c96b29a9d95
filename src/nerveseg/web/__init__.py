"""``nerveseg serve``: the web page and REST API (FastAPI) where a clinician sees, corrects and
measures the nerve, and saves corrected masks for fine-tuning. A thin layer over the library,
like ``cli/``; needs the optional dependencies ``pip install nerveseg[web]``."""

from __future__ import annotations

from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def create_app(*args, **kwargs):
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
