"""The REST API of ``nerveseg serve`` (FastAPI's TestClient): every endpoint and every bad input.

Most tests use a fake predictor (two discs of known size, instant) so the numbers are exact; the
``real`` client runs the shipped model on the shipped example frames.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[test]'")

from fastapi.testclient import TestClient  # noqa: E402

from nerveseg.config import RunConfig  # noqa: E402
from nerveseg.data.io import read_mask  # noqa: E402
from nerveseg.data.samples import discover_samples, read_manifest  # noqa: E402
from nerveseg.errors import ConfigError  # noqa: E402
from nerveseg.examples import examples_dir  # noqa: E402
from nerveseg.inference.measure import MEASUREMENT_FIELDS  # noqa: E402
from nerveseg.web import ServeSettings, create_app  # noqa: E402
from nerveseg.web.jobs import FinetuneRunner, JobBusy  # noqa: E402

EXAMPLES = examples_dir()
BASE = "http://127.0.0.1"
BIG = (60, 70, 14)  # row, col, radius of the fake model's large disc
SMALL = (25, 20, 6)


class TwoDiscs:
    """Nerve probability 0.9 in a large and a small disc, 0.3 in a faint ring-free blob, else 0.02."""

    config = RunConfig()

    def __init__(self, fail: bool = False):
        self.fail = fail

    def _prob(self, shape):
        h, w = shape
        yy, xx = np.mgrid[:h, :w]
        prob = np.full((h, w), 0.02, np.float32)
        for r, c, rad in (BIG, SMALL):
            prob[(yy - r * h / 120) ** 2 + (xx - c * w / 140) ** 2 <= (rad * h / 120) ** 2] = 0.9
        prob[(yy - 0.85 * h) ** 2 + (xx - 0.85 * w) ** 2 <= (0.05 * h) ** 2] = 0.3  # below the threshold
        return prob

    def predict_many(self, images, batch_size=4):
        if self.fail and any(img.size > 64 * 64 for img in images):  # the start-up warm-up works
            raise RuntimeError("secret internal detail /srv/private")
        return [self._prob(img.shape) for img in images]

    def predict(self, image):
        return self.predict_many([image])[0]


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def grey(h=120, w=140, seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w)) * 200 + 20).astype(np.uint8)


def make_client(tmp_path: Path, predictor=None, **settings) -> TestClient:
    s = ServeSettings(model_dir=tmp_path / "model", workspace=tmp_path / "ws", **settings)
    app = create_app(s, loader=lambda run_dir: predictor or TwoDiscs())
    return TestClient(app, base_url=BASE, raise_server_exceptions=False)


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as c:
        yield c


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The shipped model, loaded once for the module."""
    from nerveseg.pretrained import pretrained_dir

    tmp = tmp_path_factory.mktemp("real")
    app = create_app(ServeSettings(model_dir=pretrained_dir(), workspace=tmp / "ws"))
    with TestClient(app, base_url=BASE) as c:
        yield c


def upload(c, data: bytes, name="frame.png", expect=201, **params):
    r = c.post("/api/cases", params={"name": name, **params}, content=data)
    assert r.status_code == expect, r.text
    return r.json()


def assert_error(r, status, *words):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail", "code"}
    for w in words:
        assert w in body["detail"], body["detail"]
    assert "Traceback" not in r.text and "/work/" not in r.text and "/tmp/" not in body["detail"]


# ------------------------------------------------------------------------------------------------
# the shipped model on the shipped examples


def test_real_png_dicom_and_cine(real):
    png = upload(real, (EXAMPLES / "usgra_0045.png").read_bytes(), "usgra_0045.png")
    assert png["kind"] == "image" and png["n_frames"] == 1 and png["width"] == 534 and png["height"] == 512
    f = png["frames"][0]
    assert f["area_px"] > 500 and f["area_mm2"] is None and f["spacing_source"] is None and not png["calibrated"]
    assert 0.5 < f["confidence"] <= 1 and f["circularity"] > 0.3

    dcm = upload(real, (EXAMPLES / "usgra_0053_calibrated.dcm").read_bytes(), "usgra_0053_calibrated.dcm")
    f = dcm["frames"][0]
    assert dcm["kind"] == "dicom" and dcm["calibrated"]
    assert f["area_mm2"] == pytest.approx(f["area_px"] * 0.075**2, rel=1e-3)
    assert "UltrasoundRegions" in f["spacing_source"] and f["spacing_mm"] == "0.075 x 0.075"

    cine = upload(real, (EXAMPLES / "usgra_0045_cine.mp4").read_bytes(), "usgra_0045_cine.mp4")
    assert cine["kind"] == "video" and cine["n_frames"] == 10 and cine["fps"] == pytest.approx(10)
    assert [f["frame"] for f in cine["frames"]] == list(range(10))
    assert all(f["area_px"] > 500 for f in cine["frames"])
    # the shipped model is one model per anatomy: each case says which one drew it (a loop: one for all frames)
    assert png["model_route"] == dcm["model_route"] == cine["model_route"] == "nerves"
    wrist = upload(real, (EXAMPLES / "wrist_Pz010-001.png").read_bytes(), "wrist_Pz010-001.png")
    assert wrist["model_route"] == "wrist" and wrist["frames"][0]["area_px"] > 500
    r = real.get(f"/api/cases/{cine['id']}/frames/9/overlay.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (496, 480)


def test_real_server_time_for_a_534x512_png_is_under_300_ms(real):
    data = (EXAMPLES / "usgra_0067.png").read_bytes()
    upload(real, data, "warm.png")  # first call: onnxruntime's warm-up
    times = []
    for _ in range(3):
        r = real.post("/api/cases", params={"name": "x.png"}, content=data)
        case_ms = float(r.headers["server-timing"].split("total;dur=")[1])
        overlay = real.get(f"/api/cases/{r.json()['id']}/frames/0/overlay.png")
        times.append(case_ms + float(overlay.headers["server-timing"].split("dur=")[1]))
    # the budget is 300 ms on 2 idle cores; allow for a busy CI machine here, and report
    # the figure measured on an idle machine in docs/WEB.md (benchmarks/load.py)
    assert min(times) < 600, times


def test_model_info_health_and_offline_pages(real):
    m = real.get("/api/model").json()
    from nerveseg.models import count_parameters, create
    from nerveseg.pretrained import pretrained_dir

    shipped_arch = RunConfig.load(pretrained_dir() / "config.json").model.arch
    assert m["architecture"] == shipped_arch and m["shipped"]
    assert m["parameters"] == count_parameters(create(shipped_arch))  # SA-UNet: 455,603
    assert m["classes"][0] == "nerve" and m["card"]["use"].startswith("Not a medical device")
    assert m["recipe"]["epochs"] >= 1 and m["input_size"] >= 64
    from nerveseg.pretrained import pretrained_dir

    shipped = RunConfig.load(pretrained_dir() / "config.json")
    assert m["threshold"] == shipped.inference.threshold and m["members"] == (len(shipped.members) or 1)
    assert m["routes"] == (shipped.members if shipped.router else [])  # a routed model names its routes
    assert m["low_confidence"] == shipped.inference.low_confidence
    # an upload that names no threshold is cut where the model's config says; one that does, there
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(7).random((64, 80)) * 255).astype(np.uint8)).save(buf, format="PNG")
    case = real.post("/api/cases", params={"name": "t.png"}, content=buf.getvalue()).json()
    assert case["threshold"] == shipped.inference.threshold
    case = real.post("/api/cases", params={"name": "t.png", "threshold": 0.3}, content=buf.getvalue()).json()
    assert case["threshold"] == 0.3
    h = real.get("/api/health").json()
    assert h["status"] == "ok" and h["auth_required"] is False
    page = real.get("/")
    assert page.status_code == 200 and "<script type=\"module\" src=\"/static/app.js\">" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
    for path in ("/static/app.js", "/static/app.css", "/docs", "/static/docs.js"):
        r = real.get(path)
        assert r.status_code == 200
        assert "http://" not in r.text and "https://" not in r.text.replace("https://creativecommons", "")  # no CDN
    assert "<script>" not in page.text and "<script>" not in real.get("/docs").text  # no inline script
    spec = real.get("/openapi.json").json()
    assert "/api/cases" in spec["paths"] and "/api/cases/{case_id}/frames/{index}/mask" in spec["paths"]


# ------------------------------------------------------------------------------------------------
# formats and options (fake model: exact areas)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP"])
def test_every_image_format_decided_by_content(client, fmt):
    data = png_bytes(grey(), fmt)
    # the name says PNG whatever the content: the bytes decide
    case = upload(client, data, "scan.png")
    assert case["kind"] == "image" and case["frames"][0]["n_components"] == 2


def test_multiframe_dicom_and_user_scale(client, tmp_path):
    from test_calibration import make_ds, region, save

    pixels = np.stack([grey(seed=i) for i in range(3)])
    ds = make_ds(pixels, frames=3)
    ds.SequenceOfUltrasoundRegions = [region(max_x=139, max_y=119, dx=0.01, dy=0.01)]
    data = save(ds, tmp_path / "cine.dcm").read_bytes()
    case = upload(client, data, "cine.dcm")
    assert case["kind"] == "dicom" and case["n_frames"] == 3
    assert all(f["area_mm2"] == pytest.approx(f["area_px"] * 0.01, rel=1e-3) for f in case["frames"])
    # the user's pixel size wins over the file's, and says so
    case = upload(client, data, "cine.dcm", mm_per_pixel=0.2)
    assert case["frames"][0]["area_mm2"] == pytest.approx(case["frames"][0]["area_px"] * 0.04, rel=1e-3)
    assert any("overrides" in w for w in case["warnings"])


def test_threshold_and_postprocess_options(client):
    data = png_bytes(grey())
    assert upload(client, data, postprocess="largest")["frames"][0]["n_components"] == 1
    assert upload(client, data, threshold=0.25)["frames"][0]["n_components"] == 3  # the faint blob too
    assert_error(client.post("/api/cases", params={"postprocess": "blur"}, content=data), 422, "postprocess")
    assert_error(client.post("/api/cases", params={"threshold": 1.5}, content=data), 422, "threshold")
    assert_error(client.post("/api/cases", params={"mm_per_pixel": 0.1, "spacing": "0.1,0.1"}, content=data), 422,
                 "not both")


# ------------------------------------------------------------------------------------------------
# bad uploads


def test_corrupt_truncated_empty_and_wrong_type(client):
    good = png_bytes(grey())
    assert_error(client.post("/api/cases", params={"name": "cut.png"}, content=good[: len(good) // 2]), 422,
                 "cut.png", "corrupt or truncated")
    assert_error(client.post("/api/cases", params={"name": "junk.png"}, content=good[:16] + b"\0" * 500), 422, "junk.png")
    assert_error(client.post("/api/cases", params={"name": "notes.png"}, content=b"patient notes " * 40), 415,
                 "notes.png", "decided from the file's bytes")
    assert_error(client.post("/api/cases", params={"name": "empty.png"}, content=b""), 422, "empty")
    assert_error(client.post("/api/cases", params={"name": "a.dcm"}, content=b"\0" * 128 + b"DICM" + b"\xff" * 300), 422, "a.dcm")
    assert_error(client.post("/api/cases", params={"name": "a.mp4"}, content=b"\0\0\0\x18ftypmp42" + b"\x01" * 400), 422, "a.mp4")
    assert_error(client.post("/api/cases", files={"file": ("x.png", good)}), 422, "multipart", "--data-binary")


def test_upload_limit_is_enforced_while_streaming(tmp_path):
    with make_client(tmp_path, max_image_mb=0.01) as c:  # 10 KB
        big = png_bytes((np.random.default_rng(0).random((200, 200)) * 255).astype(np.uint8))
        assert len(big) > 10_240

        def chunks():  # no Content-Length: the server must count as the bytes arrive
            for i in range(0, len(big), 4096):
                yield big[i:i + 4096]

        assert_error(c.post("/api/cases", content=chunks()), 413, "limit", "10 KB" if False else "MB")
        assert_error(c.post("/api/cases", content=big), 413, "limit")
        assert upload(c, png_bytes(grey(40, 40)))["n_frames"] == 1
        assert list((tmp_path / "ws").rglob("*.png")) == []  # nothing left behind


def test_pixel_and_frame_limits(tmp_path, monkeypatch):
    import nerveseg.data.io as dio

    monkeypatch.setattr(dio, "MAX_IMAGE_PIXELS", 10_000)
    with make_client(tmp_path) as c:
        assert_error(c.post("/api/cases", params={"name": "huge.png"}, content=png_bytes(grey(120, 140))), 422,
                     "huge.png", "too large")
    from nerveseg.inference.video import VideoWriter

    writer = VideoWriter(tmp_path / "loop.mp4", fps=10)
    for i in range(6):
        writer.write(np.repeat(grey(48, 64, i)[..., None], 3, axis=2))
    writer.close()
    with make_client(tmp_path / "b", max_frames=4) as c:
        assert_error(c.post("/api/cases", params={"name": "loop.mp4"}, content=(tmp_path / "loop.mp4").read_bytes()),
                     422, "loop.mp4", "more than 4 frames", "--max-frames")


def test_path_like_names_never_become_paths(client, tmp_path):
    data = png_bytes(grey())
    for name in ("../../../etc/passwd.png", "..\\..\\windows\\x.png", "/abs/olute.png", "a\x00b.png", "<script>.png"):
        case = upload(client, data, name)
        assert "/" not in case["name"] and "\\" not in case["name"] and "<" not in case["name"] and "\x00" not in case["name"]
        saved = client.post(f"/api/cases/{case['id']}/save", json={}).json()["saved"][0]
        assert saved["stem"].startswith("web_" + case["id"])
    written = {p.relative_to(tmp_path / "ws").parts[0] for p in (tmp_path / "ws").rglob("*") if p.is_file()}
    assert written == {"images", "masks", "manifest.csv"}
    assert not (tmp_path / "etc").exists() and not Path("/abs/olute.png").exists()


# ------------------------------------------------------------------------------------------------
# cases, images, corrections


def test_unknown_case_and_frame(client):
    assert_error(client.get("/api/cases/AAAAAAAAAAAAAAAAAAAAAA"), 404, "unknown case")
    assert_error(client.get("/api/cases/..%2F..%2Fetc"), 404)
    assert_error(client.get("/api/cases/nope/frames/0/mask.png"), 404, "unknown case")
    case = upload(client, png_bytes(grey()))
    assert_error(client.get(f"/api/cases/{case['id']}/frames/3/image.png"), 404, "frames 0-0")
    assert_error(client.put(f"/api/cases/{case['id']}/frames/-1/mask", content=b""), 404)
    assert client.delete(f"/api/cases/{case['id']}").status_code == 204
    assert_error(client.get(f"/api/cases/{case['id']}"), 404, "unknown case")


def test_images_list_and_csv(client):
    case = upload(client, png_bytes(grey()), "scan one.png")
    cid = case["id"]
    image = Image.open(io.BytesIO(client.get(f"/api/cases/{cid}/frames/0/image.png").content))
    assert image.size == (140, 120) and image.mode == "L"
    mask = Image.open(io.BytesIO(client.get(f"/api/cases/{cid}/frames/0/mask.png").content))
    assert mask.mode == "P" and (np.asarray(mask) == 1).sum() == case["frames"][0]["area_px"]
    binary = np.asarray(Image.open(io.BytesIO(client.get(f"/api/cases/{cid}/frames/0/mask.png?format=binary").content)))
    assert set(np.unique(binary)) == {0, 255}
    prob = np.asarray(Image.open(io.BytesIO(client.get(f"/api/cases/{cid}/frames/0/probability.png").content)))
    assert abs(int(prob.max()) - 0.9 * 255) <= 1  # stored as float16
    assert_error(client.get(f"/api/cases/{cid}/frames/0/probability.png?cls=tendon"), 404, "tendon")
    assert client.get(f"/api/cases/{cid}/thumbnail.png").headers["content-type"] == "image/png"
    r = client.get(f"/api/cases/{cid}/frames/0/mask.png?download=true")
    assert 'filename="scan one_f00000_mask.png"' in r.headers["content-disposition"]
    assert r.headers["cache-control"] == "no-store"
    rows = list(csv.DictReader(io.StringIO(client.get(f"/api/cases/{cid}/measurements.csv").text)))
    assert list(rows[0]) == list(MEASUREMENT_FIELDS) and rows[0]["file"] == "scan one.png"
    assert [c["id"] for c in client.get("/api/cases").json()] == [cid]


def test_corrected_mask_is_remeasured(client):
    case = upload(client, png_bytes(grey()), mm_per_pixel=0.1)
    cid, before = case["id"], case["frames"][0]
    labels = np.asarray(Image.open(io.BytesIO(client.get(f"/api/cases/{cid}/frames/0/mask.png").content))).copy()
    labels[100:110, 10:30] = 1  # paint a 10x20 patch
    r = client.put(f"/api/cases/{cid}/frames/0/mask", content=png_bytes(labels.astype(np.uint8)))
    assert r.status_code == 200, r.text
    after = r.json()
    assert after["area_px"] == before["area_px"] + 200 and after["edited"] and after["n_components"] == 3
    assert after["area_mm2"] == pytest.approx(after["area_px"] * 0.01)
    # 0/255 masks work too
    r = client.put(f"/api/cases/{cid}/frames/0/mask", content=png_bytes(((labels == 1) * 255).astype(np.uint8)))
    assert r.json()["area_px"] == after["area_px"]
    # reset puts the model's mask back
    assert client.post(f"/api/cases/{cid}/frames/0/reset").json()["area_px"] == before["area_px"]


def test_bad_corrected_masks(client):
    case = upload(client, png_bytes(grey()))
    url = f"/api/cases/{case['id']}/frames/0/mask"
    assert_error(client.put(url, content=png_bytes(np.zeros((60, 70), np.uint8))), 422, "70x60", "140x120")
    assert_error(client.put(url, content=png_bytes(np.zeros((120, 140, 3), np.uint8))), 422, "colour mode RGB")
    assert_error(client.put(url, content=png_bytes(np.full((120, 140), 7, np.uint8))), 422, "values [7]")
    assert_error(client.put(url, content=png_bytes(np.zeros((120, 140), np.uint8), "JPEG")), 422, "not PNG")
    assert_error(client.put(url, content=b"garbage" * 10), 422, "not a readable PNG")
    assert_error(client.put(url, content=png_bytes(np.zeros((120, 140), np.uint8))[:40]), 422)


def test_click_the_nerve_keeps_one_region(client):
    case = upload(client, png_bytes(grey()))
    cid = case["id"]
    assert case["frames"][0]["n_components"] == 2
    url = f"/api/cases/{cid}/frames/0/keep"
    # on the small disc: it alone stays
    r = client.post(url, json={"x": SMALL[1], "y": SMALL[0]}).json()
    assert r["measurement"]["n_components"] == 1 and "under the click" in r["action"]
    small_area = r["measurement"]["area_px"]
    assert small_area == pytest.approx(np.pi * SMALL[2] ** 2, rel=0.2)
    # near (not on) the large disc after a reset: the nearest region is kept
    client.post(f"/api/cases/{cid}/frames/0/reset")
    r = client.post(url, json={"x": BIG[1] + BIG[2] + 4, "y": BIG[0]}).json()
    assert r["measurement"]["n_components"] == 1 and r["measurement"]["area_px"] > small_area and "nearest" in r["action"]
    # on the faint blob the model left under the threshold: the likely region is found and kept
    r = client.post(url, json={"x": int(0.85 * 140), "y": int(0.85 * 120)}).json()
    assert r["measurement"]["n_components"] == 1 and "likely region" in r["action"]
    # far from everything: a clear message
    assert_error(client.post(url, json={"x": 139, "y": 0}), 422, "brush")
    assert_error(client.post(url, json={"x": 500, "y": 0}), 422, "outside")


def test_scale_line_calibrates_the_case(client):
    case = upload(client, png_bytes(grey()))
    cid, area = case["id"], case["frames"][0]["area_px"]
    r = client.post(f"/api/cases/{cid}/scale", json={"x0": 10, "y0": 5, "x1": 10, "y1": 105, "length_mm": 20})
    f = r.json()["frames"][0]
    assert f["area_mm2"] == pytest.approx(area * 0.2**2, rel=1e-3) and "scale line" in f["spacing_source"]
    assert r.json()["calibrated"]
    r = client.post(f"/api/cases/{cid}/scale", json={"mm_per_pixel": 0.05})
    assert r.json()["frames"][0]["area_mm2"] == pytest.approx(area * 0.0025, rel=1e-3)
    assert_error(client.post(f"/api/cases/{cid}/scale", json={"x0": 1, "y0": 1, "x1": 2, "y1": 2, "length_mm": 5}), 422, "pixels long")
    assert_error(client.post(f"/api/cases/{cid}/scale", json={"length_mm": 5}), 422, "mm_per_pixel")
    assert_error(client.post(f"/api/cases/{cid}/scale", json={"mm_per_pixel": -1}), 422)


# ------------------------------------------------------------------------------------------------
# workspace and report


def test_save_to_workspace_trains_as_a_data_folder(client, tmp_path):
    case = upload(client, png_bytes(grey()))
    cid = case["id"]
    client.put(f"/api/cases/{cid}/tags", json={"subject": "s01", "region": "wrist", "side": "left"})
    r = client.post(f"/api/cases/{cid}/save", json={})
    assert r.status_code == 200 and r.json()["workspace_pairs"] == 1
    stem = r.json()["saved"][0]["stem"]
    ws = tmp_path / "ws"
    mask = read_mask(ws / "masks" / f"{stem}.png", label=1)
    assert mask.sum() == case["frames"][0]["area_px"]
    samples, problems = discover_samples(ws)
    assert [s.stem for s in samples] == [stem] and not problems
    manifest = read_manifest(ws / "manifest.csv")
    assert manifest[stem]["subject"] == "s01" and manifest[stem]["region"] == "wrist"
    # never overwritten silently
    before = (ws / "masks" / f"{stem}.png").read_bytes()
    assert_error(client.post(f"/api/cases/{cid}/save", json={}), 409, "already in the workspace", "overwrite")
    client.post(f"/api/cases/{cid}/frames/0/keep", json={"x": SMALL[1], "y": SMALL[0]})
    assert (ws / "masks" / f"{stem}.png").read_bytes() == before
    r = client.post(f"/api/cases/{cid}/save", json={"overwrite": True})
    assert r.status_code == 200 and read_mask(ws / "masks" / f"{stem}.png", label=1).sum() < mask.sum()
    assert len(read_manifest(ws / "manifest.csv")) == 1
    assert client.get(f"/api/cases/{cid}").json()["frames"][0]["saved_as"] == stem
    assert not list(ws.rglob("*.tmp*"))
    assert_error(client.post(f"/api/cases/{cid}/save", json={"frames": [4]}), 404)
    info = client.get("/api/workspace").json()
    assert info["pairs"] == 1 and "--init-from default" in info["train_command"]


def test_cts_report_of_tagged_cases(client):
    wrist = upload(client, png_bytes(grey()), "wrist.png", mm_per_pixel=0.1)
    forearm = upload(client, png_bytes(grey()), "forearm.png", mm_per_pixel=0.08)
    untagged = upload(client, png_bytes(grey()), "other.png")
    client.put(f"/api/cases/{wrist['id']}/tags", json={"subject": "p1", "region": "wrist", "side": "right"})
    client.put(f"/api/cases/{forearm['id']}/tags", json={"subject": "p1", "region": "forearm", "side": "right"})
    assert_error(client.put(f"/api/cases/{untagged['id']}/tags", json={"region": "knee"}), 422, "region")
    r = client.get("/api/report").json()
    assert r["n_tagged_cases"] == 2 and len(r["rows"]) == 1
    row = r["rows"][0]
    w, f = wrist["frames"][0]["area_mm2"], forearm["frames"][0]["area_mm2"]
    assert row["wrist_csa_mm2"] == pytest.approx(w, rel=1e-3) and row["wfr"] == pytest.approx(w / f, rel=1e-3)
    assert row["delta_csa_mm2"] == pytest.approx(w - f, rel=1e-2)
    assert "Hobson-Webb" in r["sources"]["wfr"] and r["cutoffs"]["wfr"] == 1.4
    md = client.get("/api/report.md")
    assert "Decision support only" in md.text and "p1" in md.text
    assert "wfr" in client.get("/api/report.csv").text.splitlines()[0]
    assert client.get("/api/report?wfr=1.1").json()["rows"][0]["wfr_flag"] == (w / f >= 1.1)


# ------------------------------------------------------------------------------------------------
# security and limits


def test_token_auth(tmp_path):
    token = "s3cret-token-abcdefgh"
    with make_client(tmp_path, token=token) as c:
        assert c.get("/api/health").status_code == 200  # liveness stays open
        assert_error(c.get("/api/cases"), 401, "Bearer")
        assert c.get("/api/cases").headers["www-authenticate"].startswith("Bearer")
        assert_error(c.get("/api/cases", headers={"Authorization": "Bearer wrong-token-abcdefgh"}), 401)
        assert_error(c.get("/api/cases", headers={"Authorization": token}), 401)
        ok = c.get("/api/cases", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and ok.json() == []
        assert c.get("/").status_code == 200  # the page itself asks for the token


def test_binding_rules():
    ServeSettings(model_dir=".", workspace=".", host="127.0.0.1")
    ServeSettings(model_dir=".", workspace=".", host="::1")
    with pytest.raises(ConfigError, match="--token"):
        ServeSettings(model_dir=".", workspace=".", host="0.0.0.0")
    ServeSettings(model_dir=".", workspace=".", host="0.0.0.0", token="x" * 16)
    ServeSettings(model_dir=".", workspace=".", host="0.0.0.0", no_auth=True)
    with pytest.raises(ConfigError, match="16 characters"):
        ServeSettings(model_dir=".", workspace=".", token="short")
    from nerveseg.cli.main import main

    assert main(["serve", "--host", "0.0.0.0", "--workspace", "ws"]) == 2


def test_host_and_origin_checks(client):
    assert_error(client.get("/api/cases", headers={"Host": "evil.example"}), 421, "localhost only")
    assert client.get("/api/cases", headers={"Host": "localhost:8000"}).status_code == 200
    r = client.post("/api/cases", content=png_bytes(grey()), headers={"Origin": "http://evil.example"})
    assert_error(r, 403, "cross-origin")
    r = client.post("/api/cases", content=png_bytes(grey()), headers={"Origin": BASE})
    assert r.status_code == 201


def test_saturated_server_answers_503_with_retry_after(client):
    limiter = client.app.state.nerveseg.limiter
    limiter.admitted = limiter.workers + limiter.max_queue
    try:
        r = client.post("/api/cases", content=png_bytes(grey()))
        assert_error(r, 503, "try again")
        assert r.headers["retry-after"] == "2"
    finally:
        limiter.admitted = 0
    assert client.post("/api/cases", content=png_bytes(grey())).status_code == 201


def test_store_is_bounded_and_evicts_the_oldest(tmp_path):
    with make_client(tmp_path, max_cases=2) as c:
        ids = [upload(c, png_bytes(grey(seed=i)))["id"] for i in range(3)]
        assert c.get(f"/api/cases/{ids[0]}").status_code == 404
        assert [x["id"] for x in c.get("/api/cases").json()] == ids[1:]
    # by bytes: one 120x140 case needs 120*140*5 = 84 KB
    with make_client(tmp_path / "b", max_store_mb=0.2) as c:
        ids = [upload(c, png_bytes(grey(seed=i)))["id"] for i in range(3)]
        assert len(c.get("/api/cases").json()) == 2
        assert_error(c.post("/api/cases", params={"name": "big.png"}, content=png_bytes(grey(400, 400))), 422,
                     "big.png", "--max-store-mb")


def test_unexpected_errors_are_json_without_internals(tmp_path):
    with make_client(tmp_path, predictor=TwoDiscs(fail=True)) as c:
        r = c.post("/api/cases", content=png_bytes(grey()))
        assert r.status_code == 500 and r.json() == {"detail": "internal error; the server log has the details", "code": "internal"}
        assert "secret" not in r.text


def test_validation_errors_are_plain_json(client):
    case = upload(client, png_bytes(grey()))
    assert_error(client.post(f"/api/cases/{case['id']}/frames/0/keep", json={"x": "left"}), 422, "invalid request")


# ------------------------------------------------------------------------------------------------
# fine-tuning


def test_finetune_needs_corrected_cases(client):
    r = client.post("/api/finetune", json={})
    assert_error(r, 409, "no corrected cases")
    assert client.get("/api/finetune").json()["pairs"] == 0
    assert_error(client.get("/api/finetune/nope"), 404)
    assert_error(client.post("/api/model", json={"run": "nope"}), 404)
    assert client.post("/api/model", json={"run": "original"}).status_code == 200


def test_job_runner_one_at_a_time_with_progress(tmp_path):
    import sys
    import time

    script = ("import csv, sys, time, pathlib\n"
              "out = pathlib.Path(sys.argv[1])\n"
              "rows = []\n"
              "for e in range(1, 4):\n"
              "    rows.append(dict(epoch=e, train_loss=1/e, val_dice=0.5+e/10, lr=1e-3, seconds=e))\n"
              "    w = csv.DictWriter(open(out / 'history.csv', 'w', newline=''), fieldnames=list(rows[0]))\n"
              "    w.writeheader(); w.writerows(rows); time.sleep(0.3)\n")
    runner = FinetuneRunner(tmp_path / "runs", compare=lambda base, new: {"old": 0.5, "new": 0.8})
    job = runner.start(tmp_path, epochs=3, build=lambda out: [sys.executable, "-c", script, str(out)])
    with pytest.raises(JobBusy):
        runner.start(tmp_path, epochs=3, build=lambda out: [sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while job.state in ("running", "evaluating") and time.time() < deadline:
        time.sleep(0.1)
    status = job.status()
    assert status["state"] == "finished" and status["epochs_done"] == 3 and status["progress"] == 1.0
    assert status["best_val_dice"] == pytest.approx(0.8) and status["comparison"] == {"old": 0.5, "new": 0.8}
    failed = runner.start(tmp_path, epochs=2, build=lambda out: [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    while failed.state == "running" and time.time() < deadline:
        time.sleep(0.1)
    assert failed.status()["state"] == "failed" and "boom" in failed.status()["log_tail"]
