"""``nerveseg serve`` under hostile and careless clients (issue 24, the web points 2, 5, 6, 10-12).

Every hostile file is made here, in the test: a 48 KB PNG that declares 7000x7000 pixels, a
frame of 16 million pixels, a mask whose header is larger than its frame, slow and stalled
request bodies, half-sent headers and an upload cut off mid-way over raw sockets against a real
uvicorn server started as ``nerveseg serve`` starts it (``web.server.uvicorn_config``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import struct
import sys
import threading
import time
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[test]'")

import uvicorn  # noqa: E402

from nerveseg.config import RunConfig  # noqa: E402
from nerveseg.data.samples import read_manifest  # noqa: E402
from nerveseg.errors import ConfigError  # noqa: E402
from nerveseg.examples import examples_dir  # noqa: E402
from nerveseg.web import ServeSettings, create_app  # noqa: E402
from nerveseg.web.jobs import FinetuneRunner, Job, finetune_command, job_json, plan_validation  # noqa: E402
from nerveseg.web.server import uvicorn_config  # noqa: E402
from test_web_api import TwoDiscs, assert_error, grey, make_client, png_bytes, upload  # noqa: E402

MB = 2**20


class Blocks:
    """A cheap fake model for large frames: nerve probability 0.9 in two rectangles (a large one
    and a small one in the lower right), 0.02 elsewhere; no per-pixel coordinate grids."""

    config = RunConfig()

    def predict_many(self, images, batch_size=4):
        out = []
        for img in images:
            h, w = img.shape
            prob = np.full((h, w), 0.02, np.float32)
            prob[h // 4: h // 2, w // 4: w // 2] = 0.9
            prob[3 * h // 4: 3 * h // 4 + h // 20, 3 * w // 4: 3 * w // 4 + w // 20] = 0.9
            out.append(prob)
        return out

    def predict(self, image):
        return self.predict_many([image])[0]


def peak_mb(call) -> tuple[object, float]:
    """``call()`` and the peak of memory traced (numpy, Python) above what was in use before, in MB."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    result = call()
    return result, (tracemalloc.get_traced_memory()[1] - before) / MB


@pytest.fixture
def traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()


# ------------------------------------------------------------------------------------------------
# 2. a pixel limit of the server's own; display images shrunk once; heavy endpoints limited


def zero_png(width: int, height: int) -> bytes:
    """An all-zero grey PNG: 7000x7000 is 48 KB on disk and 49 million pixels decoded."""
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_pixel_limit_refuses_a_tiny_png_of_7000x7000_before_decoding(tmp_path, traced):
    bomb = zero_png(7000, 7000)
    assert len(bomb) < 100_000
    with make_client(tmp_path) as c:
        r, grown = peak_mb(lambda: c.post("/api/cases", params={"name": "bomb.png"}, content=bomb))
        assert_error(r, 413, "bomb.png", "7000x7000", "49.0 million pixels", "limit of 40 million pixels",
                     "--max-megapixels")
        assert r.json()["code"] == "too_many_pixels"
        assert grown < 20, f"{grown:.0f} MB: the frame was decoded before it was refused"
        assert c.get("/api/cases").json() == []
    # the setting moves the limit; DICOM (from its header) and video (from the container) too
    with make_client(tmp_path / "b", max_megapixels=0.1) as c:
        for name in ("usgra_0053_calibrated.dcm", "usgra_0045_cine.mp4"):
            r = c.post("/api/cases", params={"name": name}, content=(examples_dir() / name).read_bytes())
            assert_error(r, 413, name, "limit of 0.1 million pixels")
        assert upload(c, png_bytes(grey(120, 140)))["n_frames"] == 1
    with pytest.raises(ConfigError, match="--max-megapixels"):
        ServeSettings(model_dir=".", workspace=".", max_megapixels=0)


def test_large_frame_endpoints_stay_bounded_in_memory(tmp_path, traced, monkeypatch):
    """A frame of 16 million pixels (inside the limit): before, each thumbnail and overlay cost
    about 320 MB (float32 RGB of the whole frame) and a click to keep a region 650 MB."""
    side = 4000
    image = (np.add.outer(np.arange(side), np.arange(side)) % 251).astype(np.uint8)
    with make_client(tmp_path, predictor=Blocks(), max_store_mb=2048) as c:
        cid = upload(c, png_bytes(image), "big.png")["id"]
        import nerveseg.web.images as web_images

        drawn = []
        real_overlay = web_images.make_overlay
        monkeypatch.setattr(web_images, "make_overlay", lambda *a, **k: drawn.append(a[0].shape) or real_overlay(*a, **k))
        # four at once, as the page's list asks after a reload: drawn once, from a shrunk copy
        with ThreadPoolExecutor(4) as pool:
            (responses, grown) = peak_mb(lambda: list(pool.map(lambda _: c.get(f"/api/cases/{cid}/thumbnail.png"), range(4))))
        assert [r.status_code for r in responses] == [200] * 4
        assert Image.open(io.BytesIO(responses[0].content)).size == (160, 160)
        assert grown < 32, f"thumbnails: {grown:.0f} MB"
        assert drawn == [(160, 160)]
        r, grown = peak_mb(lambda: c.get(f"/api/cases/{cid}/frames/0/overlay.png"))
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (2048, 2048)  # display size
        assert grown < 120, f"overlay: {grown:.0f} MB"
        # click next to the large region: kept (the nearest within 5% of the diagonal)
        r, grown = peak_mb(lambda: c.post(f"/api/cases/{cid}/frames/0/keep", json={"x": side // 2 + 30, "y": 3 * side // 8}))
        assert r.status_code == 200 and "nearest" in r.json()["action"], r.text
        assert r.json()["measurement"]["area_px"] == (side // 4) ** 2
        assert grown < 160, f"keep: {grown:.0f} MB"
        r, grown = peak_mb(lambda: c.post(f"/api/cases/{cid}/frames/0/reset"))
        assert r.status_code == 200 and r.json()["n_components"] == 2 and grown < 200, f"reset: {grown:.0f} MB"
        # the thumbnail follows the mask: drawn again once frame 0 changed, then cached again
        drawn.clear()
        c.get(f"/api/cases/{cid}/thumbnail.png")
        c.get(f"/api/cases/{cid}/thumbnail.png")
        assert drawn == [(160, 160)]


def test_image_endpoints_are_behind_the_limiter(tmp_path):
    with make_client(tmp_path) as c:
        cid = upload(c, png_bytes(grey()))["id"]
        limiter = c.app.state.nerveseg.limiter
        limiter.admitted = limiter.workers + limiter.max_queue
        try:
            for path in ("thumbnail.png", "frames/0/overlay.png", "frames/0/image.png", "frames/0/mask.png"):
                r = c.get(f"/api/cases/{cid}/{path}")
                assert_error(r, 503, "try again")
                assert r.headers["retry-after"] == "2"
            assert_error(c.post(f"/api/cases/{cid}/frames/0/keep", json={"x": 70, "y": 60}), 503)
        finally:
            limiter.admitted = 0
        assert c.get(f"/api/cases/{cid}/frames/0/overlay.png").status_code == 200
        # the overlay of a frame that fits the display size is the frame's own size
        assert Image.open(io.BytesIO(c.get(f"/api/cases/{cid}/frames/0/overlay.png").content)).size == (140, 120)


# ------------------------------------------------------------------------------------------------
# 5. save: each pair once, the manifest once


def test_save_writes_each_pair_and_the_manifest_once(tmp_path, monkeypatch):
    import nerveseg.web.workspace as ws_module

    writes = {"manifest": 0, "mask": 0}
    real_csv, real_label = ws_module.atomic_write_csv, ws_module.label_png
    monkeypatch.setattr(ws_module, "atomic_write_csv",
                        lambda *a, **k: writes.__setitem__("manifest", writes["manifest"] + 1) or real_csv(*a, **k))
    monkeypatch.setattr(ws_module, "label_png",
                        lambda *a, **k: writes.__setitem__("mask", writes["mask"] + 1) or real_label(*a, **k))
    from test_calibration import make_ds, save

    dicom = save(make_ds(np.stack([grey(seed=i) for i in range(3)]), frames=3), tmp_path / "three.dcm").read_bytes()
    with make_client(tmp_path) as c:
        image = upload(c, png_bytes(grey()))["id"]
        r = c.post(f"/api/cases/{image}/save", json={"frames": [0] * 300})
        assert_error(r, 422, "300 frame indices", "has 1 frame(s)", "once")
        assert writes == {"manifest": 0, "mask": 0}
        cine = upload(c, dicom, "three.dcm")["id"]
        r = c.post(f"/api/cases/{cine}/save", json={"frames": [2, 0, 2]})
        assert r.status_code == 200, r.text
        assert [p["stem"][-6:] for p in r.json()["saved"]] == ["f00002", "f00000"]
        assert writes == {"manifest": 1, "mask": 2} and r.json()["workspace_pairs"] == 2
        # a second save that meets an existing pair writes nothing at all (not frame 1 then 409)
        assert_error(c.post(f"/api/cases/{cine}/save", json={"frames": [1, 2]}), 409, "frame 2", "nothing was saved")
        assert writes == {"manifest": 1, "mask": 2}
        assert len(read_manifest(tmp_path / "ws" / "manifest.csv")) == 2
        assert_error(c.post(f"/api/cases/{cine}/save", json={"frames": [0, 1, 2, 3]}), 422, "4 frame indices")


# ------------------------------------------------------------------------------------------------
# 6 and 10. slow clients, half-sent headers, a disconnect mid-upload: a real uvicorn server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(tmp_path: Path, predictor=None, **settings):
    """The app under uvicorn, configured as ``nerveseg serve`` configures it, in a thread."""
    port = free_port()
    s = ServeSettings(model_dir=tmp_path / "model", workspace=tmp_path / "ws", port=port, **settings)
    app = create_app(s, loader=lambda run_dir: predictor or TwoDiscs())
    server = uvicorn.Server(uvicorn_config(app, s, lifespan="on", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield {"port": port, "app": app}
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def request(port: int, method: str, path: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a new connection: (status, body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body or None, headers={"Content-Type": "application/octet-stream"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def open_body(port: int, method: str, path: str, length: int, first: bytes = b"") -> socket.socket:
    """A connection that sent a request's headers (Content-Length ``length``) and ``first``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + first)
    return sock


def read_status(sock: socket.socket, timeout: float) -> tuple[int | None, float]:
    """The status of the response on ``sock`` (None if closed without one) and the seconds it took."""
    sock.settimeout(timeout)
    t0 = time.time()
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        return None, time.time() - t0
    return (int(data.split()[1]) if data.startswith(b"HTTP/") else None), time.time() - t0


def test_slow_uploads_hold_no_slot_and_stalled_bodies_never_block_the_page(tmp_path):
    """Before: the limiter's slot was taken before the body came, so 17 uploads at 1 byte/s
    made every other upload 503; 64 mask bodies that sent nothing made / and /api/health 503."""
    with running_server(tmp_path, body_timeout_s=30) as srv:  # the limiter admits 1 + 16
        port = srv["port"]
        status, body = request(port, "POST", "/api/cases?name=a.png", png_bytes(grey()))
        assert status == 201
        case_id = json.loads(body)["id"]
        stop = threading.Event()
        trickling = [open_body(port, "POST", "/api/cases?name=slow.png", 10_000, b"\x89") for _ in range(17)]

        def trickle():  # a byte a second per upload, as the issue's attacker sent
            while not stop.wait(1.0):
                for s in trickling:
                    with contextlib.suppress(OSError):
                        s.sendall(b"\0")

        feeder = threading.Thread(target=trickle, daemon=True)
        feeder.start()
        stalled: list[socket.socket] = []
        try:
            time.sleep(1.5)  # every slow upload is in the app, its body awaited
            t0 = time.time()
            status, _ = request(port, "POST", "/api/cases?name=b.png", png_bytes(grey(seed=1)))
            assert status == 201, "an upload was refused while slow uploads were arriving"
            assert time.time() - t0 < 10
            for s in trickling:
                s.close()
            # 70 corrected masks whose bodies never come: more than the API's 64 requests in flight
            stalled += [open_body(port, "PUT", f"/api/cases/{case_id}/frames/0/mask", 1000) for _ in range(70)]
            time.sleep(1.5)
            t0 = time.time()
            for path in ("/", "/api/health", "/static/app.js", "/docs"):
                status, _ = request(port, "GET", path)
                assert status == 200, path
            assert time.time() - t0 < 10
        finally:
            stop.set()
            for s in trickling + stalled:
                s.close()


def test_stalled_bodies_hold_no_in_flight_place_an_upload_needs(tmp_path):
    """Before: 64 PUT bodies that sent nothing held the API's 64 in-flight places, so the next
    upload was answered 503 until they timed out. A place is now taken once the body is here."""
    with running_server(tmp_path, body_timeout_s=30) as srv:
        port = srv["port"]
        status, body = request(port, "POST", "/api/cases?name=a.png", png_bytes(grey()))
        assert status == 201
        case_id = json.loads(body)["id"]
        stalled = [open_body(port, "PUT", f"/api/cases/{case_id}/frames/0/mask", 1000) for _ in range(70)]
        try:
            time.sleep(1.5)  # every stalled body is in the app, awaited
            status, _ = request(port, "POST", "/api/cases?name=b.png", png_bytes(grey(seed=1)))
            assert status == 201, "an upload was refused while stalled bodies were open"
            status, _ = request(port, "GET", f"/api/cases/{case_id}")
            assert status == 200
        finally:
            for s in stalled:
                s.close()


def test_connections_beyond_max_connections_get_503_and_the_server_recovers(tmp_path):
    """Point 6's connection limit: with --max-connections 4, three connections that hold a request
    open make the request on a fourth 503 (uvicorn's limit_concurrency counts the connection that
    asks); once they close it is served."""
    with running_server(tmp_path, body_timeout_s=30, max_connections=4) as srv:
        port = srv["port"]
        held = []
        try:
            for _ in range(3):
                held.append(open_body(port, "POST", "/api/cases?name=x.png", 1000, b"\x89PNG"))
                time.sleep(0.3)  # each in the app, its body awaited
            status, _ = request(port, "GET", "/api/health")
            assert status == 503
        finally:
            for s in held:
                s.close()
        deadline = time.time() + 10
        while time.time() < deadline:
            status, _ = request(port, "GET", "/api/health")
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200


@pytest.mark.parametrize("headers, expected", [
    ({}, False),
    ({b"content-length": b"0"}, False),
    ({b"content-length": b"12"}, True),
    ({b"content-length": b" 7 "}, True),
    ({b"content-length": b"-1"}, False),
    ({b"content-length": b"abc"}, False),
    ({b"transfer-encoding": b"chunked"}, True),
    ({b"transfer-encoding": b"gzip, Chunked"}, True),
])
def test_announces_body_reads_content_length_and_chunked(headers, expected):
    from nerveseg.web.security import announces_body
    assert announces_body(headers) is expected


def test_in_flight_cap_counts_a_body_request_once_its_body_has_arrived(tmp_path):
    """The middleware alone, with one place: a GET while the place is taken gets 503 at once; a
    body request passes the door, and is refused with 503 busy only when its body is complete."""
    from nerveseg.web.security import InFlightFull, SecurityMiddleware

    seen = []

    async def app(scope, receive, send):  # reads the body, then answers 204
        while True:
            message = await receive()
            seen.append(message["type"])
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = SecurityMiddleware(app, ServeSettings(model_dir=tmp_path, workspace=tmp_path), max_in_flight=1)

    def call(method, headers, parts):
        sent = []
        queue = [{"type": "http.request", "body": b, "more_body": i < len(parts) - 1} for i, b in enumerate(parts)]

        async def receive():
            return queue.pop(0)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": method, "path": "/api/cases", "headers": [(b"host", b"127.0.0.1")] + headers}
        asyncio.run(middleware(scope, receive, send))
        return sent[0]["status"]

    assert call("GET", [], [b""]) == 204 and middleware.in_flight == 0  # a free place: served, then given back
    middleware.in_flight = 1  # the one place is taken
    assert call("GET", [], [b""]) == 503 and len(seen) == 1  # refused at the door: the app never ran
    with pytest.raises(InFlightFull) as refused:
        call("PUT", [(b"content-length", b"6")], [b"abc", b"def"])
    assert refused.value.status_code == 503 and refused.value.headers["Retry-After"] == "2"
    assert len(seen) == 2  # the first part reached the app; the refusal came with the last one
    assert middleware.in_flight == 1  # a refused request gives back nothing it did not take
    middleware.in_flight = 0
    assert call("PUT", [(b"content-length", b"6")], [b"abc", b"def"]) == 204 and middleware.in_flight == 0


def test_stalled_and_crawling_bodies_get_408_and_half_headers_are_closed(tmp_path):
    with running_server(tmp_path, body_timeout_s=1, header_timeout_s=1) as srv:
        port = srv["port"]
        stalled = open_body(port, "POST", "/api/cases?name=x.png", 5000, b"\x89PNG")
        status, took = read_status(stalled, 10)
        assert status == 408 and took < 5
        stalled.close()
        # a body that keeps coming, but at a few bytes a second, is cut off after the timeout too
        crawling = open_body(port, "POST", "/api/cases?name=x.png", 5000, b"\x89PNG")
        t0 = time.time()
        status = None
        crawling.settimeout(0.2)
        while time.time() - t0 < 10:
            with contextlib.suppress(OSError):
                crawling.sendall(b"\0")
            try:
                data = crawling.recv(4096)
            except TimeoutError:
                continue
            status = int(data.split()[1]) if data.startswith(b"HTTP/") else None
            break
        crawling.close()
        assert status == 408 and time.time() - t0 < 8
        # half a request's headers: the connection is closed after --header-timeout
        half = socket.create_connection(("127.0.0.1", port), timeout=10)
        half.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        t0 = time.time()
        half.settimeout(10)
        assert half.recv(4096) == b"" and time.time() - t0 < 5
        half.close()
        assert request(port, "GET", "/api/health")[0] == 200


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_client_disconnect_mid_upload_is_one_log_line(tmp_path):
    """Before: "unexpected error on POST /api/cases" and two tracebacks per aborted upload."""
    handler = Records()
    loggers = [logging.getLogger(n) for n in ("nerveseg.web", "uvicorn.error", "uvicorn")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with running_server(tmp_path) as srv:
            sock = open_body(srv["port"], "POST", "/api/cases?name=cut.png", 200_000, png_bytes(grey())[:1000])
            time.sleep(0.5)
            sock.close()
            deadline = time.time() + 10
            while not handler.records and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            assert request(srv["port"], "GET", "/api/health")[0] == 200
            assert list((tmp_path / "ws").rglob("*.png")) == []
            assert not any(p.name.startswith(".upload-") for p in Path(srv["app"].state.nerveseg.upload_dir).iterdir())
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    lines = [r.getMessage() for r in handler.records]
    assert lines == ["client disconnected during upload: POST /api/cases"], lines
    assert not any(r.exc_info for r in handler.records)


# ------------------------------------------------------------------------------------------------
# 10. Host parser, token, OpenAPI error bodies, the mask decode, fine-tune folders


def test_host_header_is_parsed_strictly(tmp_path):
    with make_client(tmp_path) as c:
        for host in ("[::1]evil.com", "[::1]:80evil.com", "localhost:80:80", "127.0.0.1.evil.com", "localhost.evil.com",
                     "[::1", "127.0.0.1:8000/x"):
            assert_error(c.get("/api/cases", headers={"Host": host}), 421, "localhost only")
        for host in ("[::1]:8000", "[::1]", "localhost", "127.0.0.1:8000", "127.1.2.3"):
            assert c.get("/api/cases", headers={"Host": host}).status_code == 200, host


def test_non_ascii_token_is_refused_at_start_and_ascii_tokens_compare_as_bytes(tmp_path):
    with pytest.raises(ConfigError, match="printable ASCII"):
        ServeSettings(model_dir=".", workspace=".", token="geheimes-pässwort-123")
    with pytest.raises(ConfigError, match="printable ASCII"):
        ServeSettings(model_dir=".", workspace=".", token="has a space in it 123")
    from nerveseg.cli.main import main

    assert main(["serve", "--token", "geheimes-pässwort-123", "--workspace", str(tmp_path / "ws")]) == 2
    token = "A~!#$%&*+-./:;<=>?@^_`|" + "z" * 8
    with make_client(tmp_path, token=token) as c:
        assert c.get("/api/cases", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert_error(c.get("/api/cases", headers={"Authorization": b"Bearer " + token.encode()[:-1] + b"\xfa"}), 401)


def test_openapi_documents_the_real_error_body(tmp_path):
    with make_client(tmp_path) as c:
        spec = c.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert set(schemas["Error"]["properties"]) == {"detail", "code"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/Error", (method, path, status)
            assert "422" in op["responses"], (method, path)
    paths = spec["paths"]
    assert {"404", "413", "408"} <= set(paths["/api/cases/{case_id}/frames/{index}/mask"]["put"]["responses"])
    assert {"413", "415", "503"} <= set(paths["/api/cases"]["post"]["responses"])
    assert "409" in paths["/api/cases/{case_id}/save"]["post"]["responses"]
    assert "409" in paths["/api/finetune"]["post"]["responses"]
    assert "404" in paths["/api/finetune/{job_id}/cancel"]["post"]["responses"]
    assert "404" in paths["/api/cases/{case_id}"]["get"]["responses"]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` grey pixels with one tiny IDAT: its header says
    far more than the few bytes it holds."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_corrected_mask_is_decoded_off_the_event_loop_and_never_beyond_the_frame(tmp_path, monkeypatch):
    from PIL import ImageFile

    import nerveseg.web.routers.cases as routes

    threads = []
    real = routes.read_label_png

    def spy(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            threads.append("event loop")
        except RuntimeError:
            threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(routes, "read_label_png", spy)
    with make_client(tmp_path) as c:
        cid = upload(c, png_bytes(grey()))["id"]
        labels = np.zeros((120, 140), np.uint8)
        labels[10:30, 10:40] = 1
        r = c.put(f"/api/cases/{cid}/frames/0/mask", content=png_bytes(labels))
        assert r.status_code == 200 and r.json()["area_px"] == 600
        assert threads and threads[0].startswith("nerveseg-image"), threads
        # a mask whose header is 7000x7000 on a 140x120 frame is refused from its header, undecoded
        loads = []
        real_load = ImageFile.ImageFile.load
        monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or real_load(self))
        r = c.put(f"/api/cases/{cid}/frames/0/mask", content=png_header_only(7000, 7000))
        assert_error(r, 422, "7000x7000", "the frame is 140x120")
        assert loads == []


def test_finetune_runs_beyond_the_newest_are_deleted(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    earlier = runs / "20200101-000000-abcdef"  # a run of an earlier server process
    earlier.mkdir()
    in_use = runs / "20200101-000001-abcdef"  # the model the server is using: never deleted
    in_use.mkdir()
    (runs / "my notes").mkdir()  # not a run folder: never touched
    runner = FinetuneRunner(runs, keep=2, protected=lambda: [in_use])
    ids = []
    for _ in range(4):
        job = runner.start(tmp_path, epochs=1, build=lambda out: [sys.executable, "-c", "pass"])
        ids.append(job.id)
        deadline = time.time() + 30
        while job.state == "running" and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.1)  # job ids are made to the second
    deadline = time.time() + 10
    while len([p for p in runs.iterdir() if p.name in ids]) > 2 and time.time() < deadline:
        time.sleep(0.05)
    left = sorted(p.name for p in runs.iterdir())
    assert left == sorted([*ids[-2:], in_use.name, "my notes"]), left
    assert sorted(runner.jobs) == sorted(ids[-2:])


# ------------------------------------------------------------------------------------------------
# 11 and 12. small workspaces fine-tune; uncorrected saves are marked; what the figure means


def test_one_saved_case_fine_tunes_without_a_split_and_says_so(tmp_path):
    with make_client(tmp_path) as c:
        st = c.app.state.nerveseg
        started = {}

        def fake_start(base, epochs, build=None, plan=None, corrected=None, command=None):
            started.update(argv=build(tmp_path / "run"), plan=plan, corrected=corrected)
            return Job("20200101-000000-abcdef", tmp_path / "run", base, epochs, [], plan=plan, corrected=corrected)

        st.runner.start = fake_start
        cid = upload(c, png_bytes(grey()))["id"]
        assert c.post(f"/api/cases/{cid}/save", json={}).json()["saved"][0]["corrected"] is False
        r = c.post("/api/finetune", json={"epochs": 1})
        assert r.status_code == 202, r.text
        argv = started["argv"]
        assert argv[argv.index("--val-fraction") + 1] == "0"  # before: "needs at least 2 subjects", a failed job
        assert r.json()["validation"]["held_out"] is False and "no held-out check" in r.json()["validation"]["note"]
        # a second case (its own subject): a split is possible, and the default one is used
        other = upload(c, png_bytes(grey(seed=3)))["id"]
        c.post(f"/api/cases/{other}/frames/0/keep", json={"x": 70, "y": 60})
        assert c.post(f"/api/cases/{other}/save", json={}).json()["saved"][0]["corrected"] is True
        c.post("/api/finetune", json={"epochs": 1})
        assert "--val-fraction" not in started["argv"] and started["plan"]["held_out"]
        assert started["plan"]["uncorrected"] == 1
        ws = c.get("/api/workspace").json()
        assert (ws["pairs"], ws["corrected"], ws["uncorrected"]) == (2, 1, 1)
    manifest = read_manifest(tmp_path / "ws" / "manifest.csv")
    assert sorted(row["corrected"] for row in manifest.values()) == ["no", "yes"]
    assert {row["subject"] for row in manifest.values()} == {f"case-{cid}", f"case-{other}"}


def test_frames_of_one_loop_are_one_subject(tmp_path):
    """An untagged cine saved frame by frame is one subject: never split into training and
    validation (near-identical frames on both sides gave "best validation Dice 0.97")."""
    from test_calibration import make_ds, save

    dicom = save(make_ds(np.stack([grey(seed=i) for i in range(3)]), frames=3), tmp_path / "three.dcm").read_bytes()
    with make_client(tmp_path) as c:
        cid = upload(c, dicom, "three.dcm")["id"]
        c.post(f"/api/cases/{cid}/save", json={})
        ws = c.app.state.nerveseg.workspace
        plan = plan_validation(ws.root, ws.corrected_stems())
    assert plan == {**plan, "held_out": False, "subjects": 1, "pairs": 3, "uncorrected": 3}
    argv = finetune_command(Path("m"), ws.root, Path("o"), 1, 64, held_out=plan["held_out"])
    assert argv[-2:] == ["--val-fraction", "0"]


def test_job_says_what_its_validation_figure_is(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    job = Job("20200101-000000-abcdef", out, tmp_path, 3, [], plan={"held_out": True, "note": "x"},
              corrected={"a": True, "b": False})
    assert job.validation()["held_out"] is True
    (out / "config.json").write_text(json.dumps({"val_stems": ["a", "b"]}))
    v = job.status()["validation"]
    assert v["val_images"] == 2 and v["val_uncorrected"] == 1
    assert "on 2 workspace pair(s) the run held out" in v["note"] and "agreeing with itself" in v["note"]
    # a run without validation writes val_dice "nan": the job's JSON says null (before: a 500 on
    # every progress poll of a one-case fine-tune, as JSON has no NaN)
    (out / "history.csv").write_text("epoch,train_loss,val_dice,lr,seconds\n1,0.9,nan,5e-05,12.5\n")
    status = job_json(job)
    json.dumps(status, allow_nan=False)
    assert status["history"][0]["val_dice"] is None and status["best_val_dice"] is None and status["epochs_done"] == 1
