"""The page of ``nerveseg serve`` in a real browser: Playwright driving Debian's Chromium.

Playwright cannot download its own browsers here, so it launches /usr/bin/chromium (CI installs
it: `.ci/run`). The server runs the shipped model under uvicorn in a thread on a free loopback
port. With NERVESEG_SCREENSHOTS=DIR the tests also save the screenshots of docs/WEB.md there.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium) to run the browser tests",
                allow_module_level=True)
pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[test]'")
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")

import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from nerveseg.examples import examples_dir  # noqa: E402
from nerveseg.pretrained import pretrained_dir  # noqa: E402
from nerveseg.web import ServeSettings, create_app  # noqa: E402

EXAMPLES = examples_dir()
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = os.environ.get("NERVESEG_SCREENSHOTS")
TIMEOUT = 20_000  # ms, for waits on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(workspace: Path):
    """The shipped model under uvicorn in a thread, on a free loopback port."""
    port = free_port()
    app = create_app(ServeSettings(model_dir=pretrained_dir(), workspace=workspace, port=port))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    try:
        yield {"url": f"http://127.0.0.1:{port}", "workspace": workspace, "app": app}
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("browser") / "ws") as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@contextlib.contextmanager
def opened(browser, url: str):
    """The page at ``url`` in a new browser context; no script error or CSP violation allowed."""
    context = browser.new_context(viewport={"width": 1400, "height": 860})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT)
    errors = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    pg.goto(url + "/")
    wait_js(pg, "document.getElementById('model-summary').textContent.includes('efficientnet_unet')")  # the shipped model's architecture
    yield pg
    context.close()
    assert not errors, errors  # no script error, no CSP violation


@pytest.fixture
def page(browser, server):
    with opened(browser, server["url"]) as pg:
        yield pg


def wait_js(pg, expression: str, timeout_ms: int = TIMEOUT) -> None:
    """Poll a JavaScript expression until it is true. (Playwright's wait_for_function evaluates
    strings with eval, which the page's Content-Security-Policy rightly forbids.)"""
    deadline = time.time() + timeout_ms / 1000
    while not pg.evaluate(f"() => Boolean({expression})"):
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        time.sleep(0.05)


def shot(pg, name):
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(Path(SHOTS) / f"{name}.png"))


def area(pg) -> int:
    return int(pg.get_attribute("#csa-value", "data-area-px"))


def settled(pg) -> None:
    """Wait until the server's re-measurement replaced the browser's instant area."""
    wait_js(pg, "!document.getElementById('csa-value').textContent.endsWith('…')")


def to_screen(pg, x: float, y: float) -> tuple[float, float]:
    """Image pixel (x, y) -> page coordinates, for the fitted view (zoom and pan from the page)."""
    box = pg.locator("#view").bounding_box()
    w, h = (int(v) for v in pg.evaluate("[document.getElementById('viewer').dataset.w, document.getElementById('viewer').dataset.h]"))
    zoom = min(box["width"] / w, box["height"] / h)
    left = box["x"] + (box["width"] - w * zoom) / 2
    top = box["y"] + (box["height"] - h * zoom) / 2
    return left + (x + 0.5) * zoom, top + (y + 0.5) * zoom


def upload(pg, *names):
    pg.set_input_files("#file-input", [str(EXAMPLES / n) for n in names])
    wait_js(pg, "document.getElementById('upload-status').textContent.startsWith('Done')")
    pg.wait_for_selector("#csa-value")
    wait_js(pg, "+document.getElementById('viewer').dataset.outlinePixels > 0")


def mask_components(server, case_id: str) -> list[tuple[int, int, int]]:
    """(area, row, col) of each nerve component of the case's current mask, largest first
    (read from the server's case store: the test knows where to click)."""
    case = server["app"].state.nerveseg.store.get(case_id)
    labels, n = ndimage.label(case.frames[0].labels == 1, structure=np.ones((3, 3)))
    out = []
    for k in range(1, n + 1):
        rows, cols = np.nonzero(labels == k)
        i = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
        out.append((rows.size, int(rows[i]), int(cols[i])))
    return sorted(out, reverse=True)


def test_upload_see_correct_keep_and_save(page, server):
    upload(page, "usgra_0067.png")
    assert "px" in page.text_content("#csa-value")
    # the shipped model is one model per anatomy: the page says which one drew this image
    assert page.text_content("#m-model-route") == "nerves"
    assert "nerves model" in page.text_content("#case-list li.selected .muted")
    before = area(page)
    assert before > 500 and int(page.get_attribute("#viewer", "data-nerve-pixels")) == before
    case_id = page.get_attribute("#case-list li.selected", "data-id")
    assert page.locator("#case-list li.selected img").get_attribute("src").startswith("blob:")
    # the QC badge says what the server's mask holds (the shipped model finds one region here)
    badges = page.text_content("#case-list li.selected .badges")
    assert ("multi component" in badges) == (len(mask_components(server, case_id)) > 1), badges
    shot(page, "1_viewer")

    # brush a correction in an empty corner: the area grows at once, then the server agrees
    page.click("[data-tool=brush]")
    page.locator("#brush-size").fill("20")
    x0, y0 = to_screen(page, 40, 40)
    x1, y1 = to_screen(page, 90, 40)
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=8)
    page.mouse.up()
    settled(page)
    painted = area(page)
    assert painted > before + 500
    shot(page, "2_brush")
    page.click("#undo")
    wait_js(page, f"+document.getElementById('csa-value').dataset.areaPx === {before}")
    settled(page)

    # paint the patch again, so the mask has two regions, then click one: the tool keeps the region
    # clicked (here the second-largest, the patch), not the largest, and drops the others
    page.click("[data-tool=brush]")
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=8)
    page.mouse.up()
    settled(page)
    assert area(page) > before + 500
    components = mask_components(server, case_id)
    assert len(components) >= 2
    keep_area, row, col = components[1]
    page.click("[data-tool=keep]")
    page.mouse.click(*to_screen(page, col, row))
    wait_js(page, "document.getElementById('m-components').textContent === '1'")
    assert area(page) == keep_area
    shot(page, "3_keep")

    # zoom and pan do not change the mask
    page.click("[data-tool=pan]")
    page.mouse.move(*to_screen(page, 267, 256))
    page.mouse.wheel(0, -400)
    page.mouse.down()
    page.mouse.move(700, 400, steps=4)
    page.mouse.up()
    page.click("#zoom-fit")
    assert area(page) == keep_area

    # save to the workspace: the pair is there, the mask is the corrected one
    page.click("#save")
    wait_js(page, "document.getElementById('save-status').textContent.startsWith('Saved')")
    stem = f"web_{case_id}_f00000"
    image = server["workspace"] / "images" / f"{stem}.png"
    mask = server["workspace"] / "masks" / f"{stem}.png"
    assert image.is_file() and mask.is_file()
    assert (np.asarray(Image.open(mask)) == 1).sum() == keep_area
    assert "saved" in page.text_content("#case-list li.selected .badges")


def test_scale_tool_gives_mm2(page):
    upload(page, "usgra_0045.png")
    px = area(page)
    assert "not calibrated" in page.text_content("#m-pixel-size")
    page.click("[data-tool=scale]")
    x0, y0 = to_screen(page, 20, 100)
    x1, y1 = to_screen(page, 20, 400)  # 300 px
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=5)
    page.mouse.up()
    page.wait_for_selector("#scale-form:not([hidden])")
    assert abs(float(page.text_content("#scale-px")) - 300) < 3
    page.fill("#scale-mm", "30")
    page.click("#scale-apply")
    wait_js(page, "document.getElementById('csa-value').textContent.includes('mm²')")
    mm2 = float(page.text_content("#csa-value").split()[0])
    pixel = 30 / float(page.text_content("#scale-px"))
    assert mm2 == pytest.approx(px * pixel**2, rel=0.02)
    assert "scale line" in page.text_content("#m-calibration")


def test_cine_play_scrub_and_correct_a_frame(page, server):
    upload(page, "usgra_0045_cine.mp4")
    assert page.is_visible("#cine") and page.text_content("#frame-label") == "frame 1 / 10"
    page.click("#play")
    wait_js(page, "+document.getElementById('viewer').dataset.frame >= 3")
    shot(page, "4_cine")
    page.click("#play")  # pause
    stopped = int(page.get_attribute("#viewer", "data-frame"))
    page.wait_for_timeout(400)
    assert int(page.get_attribute("#viewer", "data-frame")) in (stopped, (stopped + 1) % 10)
    # scrub to frame 7 and correct it
    page.locator("#scrub").fill("6")
    wait_js(page, "document.getElementById('viewer').dataset.frame === '6'")
    assert page.text_content("#frame-label") == "frame 7 / 10"
    before = area(page)
    page.click("[data-tool=eraser]")
    page.locator("#brush-size").fill("60")
    case = server["app"].state.nerveseg.store.get(page.get_attribute("#case-list li.selected", "data-id"))
    rows, cols = np.nonzero(case.frames[6].labels == 1)
    page.mouse.click(*to_screen(page, cols.mean(), rows.mean()))
    settled(page)
    assert area(page) < before
    # the CSA plot is drawn (not blank)
    blank = page.evaluate("(() => { const c = document.getElementById('csa-plot'); const d = c.getContext('2d')"
                          ".getImageData(0, 0, c.width, c.height).data; let n = 0; for (let i = 3; i < d.length; i += 4) "
                          "if (d[i]) n++; return n; })()")
    assert blank > 200


def test_cts_tags_and_report(page):
    upload(page, "usgra_0053_calibrated.dcm")
    assert "mm²" in page.text_content("#csa-value")
    page.fill("#tag-subject", "volunteer-1")
    page.select_option("#tag-region", "wrist")
    page.select_option("#tag-side", "right")
    wait_js(page, "document.querySelector('#case-list li.selected .badges').textContent.includes('wrist right')")
    upload(page, "usgra_0053_calibrated.dcm")
    page.fill("#tag-subject", "volunteer-1")
    page.select_option("#tag-region", "forearm")
    page.select_option("#tag-side", "right")
    wait_js(page, "document.querySelector('#case-list li.selected .badges').textContent.includes('forearm right')")
    page.click("#report")
    page.wait_for_selector("#report-out table")
    text = page.text_content("#report-out")
    assert "volunteer-1" in text and "1.00" in text and "Hobson-Webb" in text and "Decision support only" in text
    page.locator("#ft-info").scroll_into_view_if_needed()
    shot(page, "5_cts")


def test_dicom_seg_and_sr_download_for_a_dicom_case_only(page, tmp_path):
    upload(page, "usgra_0067.png")
    assert page.is_disabled("#dl-dicom") and "no study" in page.get_attribute("#dl-dicom", "title")
    upload(page, "usgra_0053_calibrated.dcm")
    assert page.is_enabled("#dl-dicom")
    with page.expect_download() as info:
        page.click("#dl-dicom")
    download = info.value
    assert download.suggested_filename == "usgra_0053_calibrated_dicom.zip"
    download.save_as(tmp_path / "dicom.zip")
    with zipfile.ZipFile(tmp_path / "dicom.zip") as archive:
        names = sorted(archive.namelist())
    assert names == ["usgra_0053_calibrated_seg.dcm", "usgra_0053_calibrated_sr.dcm"]  # calibrated: no notes


def test_badges_and_order_survive_a_reload(page, server):
    """After a reload the list is rebuilt from GET /api/cases (counts, not frames): the "edited"
    and "saved" badges stay, and so does the order of the cases."""
    upload(page, "usgra_0053_calibrated.dcm")  # two cases at least, so that an order can change
    upload(page, "usgra_0067.png")
    case_id = page.get_attribute("#case-list li.selected", "data-id")
    page.click("[data-tool=brush]")
    page.locator("#brush-size").fill("20")
    x0, y0 = to_screen(page, 40, 40)
    x1, y1 = to_screen(page, 90, 40)
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=8)
    page.mouse.up()
    settled(page)
    page.click("#save")
    wait_js(page, "document.getElementById('save-status').textContent.startsWith('Saved')")
    badges = f'#case-list li[data-id="{case_id}"] .badges'
    assert "edited" in page.text_content(badges) and "saved" in page.text_content(badges)
    ids = "[...document.querySelectorAll('#case-list li')].map((li) => li.dataset.id)"
    order = page.evaluate(f"() => {ids}")
    page.click(f'#case-list li[data-id="{order[0]}"]')  # opening a case must not move it either

    page.reload()
    wait_js(page, "document.getElementById('model-summary').textContent.includes('efficientnet_unet')")  # the shipped model's architecture
    wait_js(page, f"document.querySelectorAll('#case-list li').length === {len(order)}")
    assert page.evaluate(f"() => {ids}") == order
    text = page.text_content(badges)
    assert "edited" in text and "saved" in text, text


def test_an_upload_while_the_list_loads_goes_after_the_older_cases(browser, tmp_path):
    """The page lists the server's cases in upload order, whatever the timing. Before, it fetched
    each older case's thumbnail before listing the next one, so a file uploaded meanwhile landed
    between the older cases (and CI saw the order change on a reload). Here the older cases'
    thumbnails are held until the upload is done: the new case must still come last."""
    import urllib.request

    with serving(tmp_path / "ws") as server:
        body = (EXAMPLES / "usgra_0067.png").read_bytes()
        for name in ("older_1.png", "older_2.png", "older_3.png"):
            request = urllib.request.Request(f"{server['url']}/api/cases?name={name}", data=body, method="POST",
                                             headers={"Content-Type": "application/octet-stream"})
            with urllib.request.urlopen(request, timeout=60) as response:
                assert response.status == 201
        older = [c.id for c in server["app"].state.nerveseg.store.list()]
        held, holding = [], [True]

        def hold_older_thumbnails(route):
            if holding[0] and any(f"/api/cases/{i}/thumbnail" in route.request.url for i in older):
                held.append(route)
            else:
                route.continue_()

        context = browser.new_context(viewport={"width": 1400, "height": 860})
        try:
            context.route("**/thumbnail.png", hold_older_thumbnails)
            pg = context.new_page()
            pg.set_default_timeout(TIMEOUT)
            errors = []
            pg.on("pageerror", lambda exc: errors.append(str(exc)))
            pg.goto(server["url"] + "/")
            wait_js(pg, "document.getElementById('model-summary').textContent.includes('efficientnet_unet')")
            upload(pg, "usgra_0053_calibrated.dcm")
            assert held, "no thumbnail of an older case was requested: the test did not hold the list's loading"
            holding[0] = False
            for route in held:
                route.continue_()
            ids = "[...document.querySelectorAll('#case-list li')].map((li) => li.dataset.id)"
            wait_js(pg, "document.querySelectorAll('#case-list li').length === 4")
            server_order = [c.id for c in server["app"].state.nerveseg.store.list()]
            assert server_order[:3] == older
            assert pg.evaluate(f"() => {ids}") == server_order
            assert not errors, errors
        finally:
            context.close()


def test_finetune_with_one_saved_case_starts_and_stops_from_the_page(browser, tmp_path):
    """One saved case (a workspace of its own): before, the job failed at once ("a train/val
    split needs at least 2 subjects"), and a running job had no Stop button on the page."""
    from nerveseg.web.jobs import train_supports_init_from

    if not train_supports_init_from():
        pytest.skip("this nerveseg's `train` has no --init-from, which fine-tuning needs")
    with serving(tmp_path / "ws") as server, opened(browser, server["url"]) as pg:
        upload(pg, "usgra_0067.png")
        pg.click("#save")  # the model's mask, not corrected: the page and the manifest say so
        wait_js(pg, "document.getElementById('save-status').textContent.startsWith('Saved')")
        assert "the model's own mask, not corrected" in pg.text_content("#save-status")
        wait_js(pg, "!document.getElementById('ft-start').disabled")
        assert "1 pair(s)" in pg.text_content("#ft-info") and "0 corrected by hand" in pg.text_content("#ft-info")
        assert pg.is_hidden("#ft-stop")
        pg.fill("#ft-epochs", "50")  # far more than the test waits for: it is stopped while it runs
        pg.click("#ft-start")
        wait_js(pg, "document.getElementById('ft-status').textContent.includes('running')")
        assert pg.is_visible("#ft-stop")
        assert "no held-out check" in pg.text_content("#ft-status")
        assert "no held-out check" in pg.text_content("#ft-note") and "one subject" in pg.text_content("#ft-note")
        runner = server["app"].state.nerveseg.runner
        job = next(iter(runner.jobs.values()))
        # training is under way: the split passed (config.json is written after it) and the job runs
        deadline = time.time() + 120
        while not (job.out / "config.json").is_file() and job.state == "running" and time.time() < deadline:
            time.sleep(0.2)
        assert job.state == "running" and (job.out / "config.json").is_file(), job.log_tail()
        assert job.command[-2:] == ["--val-fraction", "0"]
        pg.click("#ft-stop")
        wait_js(pg, "document.getElementById('ft-status').textContent.includes('stopped')", timeout_ms=30_000)
        assert job.state == "cancelled" and job.process.wait(timeout=30) is not None  # the process ends
        assert pg.is_hidden("#ft-stop") and "Stopped" in pg.text_content("#ft-result")
        wait_js(pg, "!document.getElementById('ft-start').disabled")  # a new run may start
