"""Helpers the routers share: the server state, the case lookup, JSON of a case."""

from __future__ import annotations

import re

from fastapi import HTTPException, Request
from fastapi.responses import Response

from .. import schemas
from ..cases import CASE_ID_PATTERN, Case
from ..state import ServerState

_CASE_ID = re.compile(CASE_ID_PATTERN)

# Every error is the JSON {detail, code} of app.py's handlers, never FastAPI's default array of
# validation errors: the OpenAPI schema says so for each status an operation can answer.
_ERROR_TEXT = {
    401: "missing or wrong token (only when the server was started with --token)",
    404: "unknown case, frame, class or job",
    408: "the request body stalled or arrived too slowly; the connection is closed",
    409: "conflict: the pair is already in the workspace (save with overwrite), or a fine-tuning job is running",
    413: "larger than the server's limits: the upload (--max-image-mb / --max-video-mb), a frame (--max-megapixels), "
         "or the mask",
    415: "the body is no file type nerveseg reads (decided from its bytes)",
    422: "invalid request or unreadable input: what is wrong and how to fix it",
    501: "this nerveseg cannot fine-tune (its train has no --init-from)",
    503: "busy: try again after Retry-After seconds",
}


def errors(*statuses: int) -> dict:
    """OpenAPI ``responses`` for these error statuses, each with the body :class:`schemas.Error`."""
    return {s: {"model": schemas.Error, "description": _ERROR_TEXT[s]} for s in statuses}


ERRORS = errors(401, 422, 503)  # any API call: the token, a bad parameter or body, a full server


def state(request: Request) -> ServerState:
    return request.app.state.nerveseg


def get_case(request: Request, case_id: str) -> Case:
    if not _CASE_ID.match(case_id):
        raise HTTPException(404, f"unknown case {case_id!r}: case ids are the ones the server returned on upload")
    try:
        return state(request).store.get(case_id)
    except KeyError:
        raise HTTPException(404, f"unknown case {case_id!r}: never uploaded, deleted, or evicted from the server's "
                                 "bounded case store (upload the file again)") from None


def get_frame_index(case: Case, index: int) -> int:
    if not 0 <= index < len(case.frames):
        raise HTTPException(404, f"{case.name} has frames 0-{len(case.frames) - 1}, not {index}")
    return index


def _value(v):
    return None if v == "" else v


def measurement_json(case: Case, index: int) -> dict:
    frame = case.frames[index]
    r = frame.row
    return {
        "frame": index, "area_px": r["area_px"], "area_mm2": _value(r["area_mm2"]),
        "perimeter_mm": _value(r["perimeter_mm"]), "perimeter_px": _value(r.get("perimeter_px")),
        "circularity": _value(r["circularity"]), "flattening": _value(r["flattening"]),
        "centroid_row": _value(r["centroid_row"]), "centroid_col": _value(r["centroid_col"]),
        "n_components": r["n_components"], "confidence": _value(r["confidence"]),
        "spacing_mm": _value(r["spacing_mm"]), "spacing_source": _value(r["spacing_source"]),
        "qc_flags": [f for f in r["qc_flags"].split(";") if f], "vessel_area_px": r.get("vessel_area_px"),
        "edited": frame.edited, "saved_as": case.saved.get(index),
    }


def summary_json(case: Case) -> dict:
    first = case.frames[0]
    flags = sorted({f for fr in case.frames for f in fr.row["qc_flags"].split(";") if f})
    return {
        "id": case.id, "name": case.name, "kind": case.kind, "n_frames": len(case.frames), "fps": case.fps,
        "width": int(first.image.shape[1]), "height": int(first.image.shape[0]), "classes": case.classes,
        "qc_flags": flags, "calibrated": all(f.spacing is not None for f in case.frames), "tags": case.tags,
        "model": case.model, "server_ms": round(case.seconds * 1000, 1), "saved_frames": len(case.saved),
        "edited_frames": sum(f.edited for f in case.frames), "model_route": case.model_route,
    }


def case_json(case: Case) -> dict:
    return {
        **summary_json(case), "threshold": case.threshold, "postprocess": case.postprocess,
        "warnings": case.warnings, "frames": [measurement_json(case, i) for i in range(len(case.frames))],
    }


def png(data: bytes, server_ms: float | None = None, filename: str | None = None) -> Response:
    headers = {}
    if server_ms is not None:
        headers["Server-Timing"] = f"encode;dur={server_ms:.1f}"
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return Response(data, media_type="image/png", headers=headers)
