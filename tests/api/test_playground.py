"""The playground in a real browser: headless Chromium (Debian's package, driven by Playwright for
Python; no browser is downloaded) against a live server with the tiny checkpoint.

What the page shows is checked against what the API answers to the same request sent with httpx:
the boxes and points drawn over the image must sit where those coordinates say on the image's
rendered rectangle, the listed coordinates must be those numbers, and a streamed answer must arrive
piece by piece (the same pieces as the SSE stream) and end equal to the non-streamed greedy answer.

``PLAYGROUND_SCREENSHOT=path.png`` keeps a copy of the screenshot (taken after the detect).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Page

from moondream_server.api.playground.router import ASSETS
from tests.api.browser import chromium
from tests.api.support import IMAGES, LiveServer, file_data_url, tiny_settings

IMG2 = IMAGES[1]  # 640 × 480: not square, so a swapped x/y shows
assert IMG2.name == "img2.png"
OBJECT = "cat"
MAX_OBJECTS = 4
QUESTION = "What is in this image?"
GREEDY = {"temperature": 0.0, "max_tokens": 12}
# Layout is in fractional CSS pixels; an error of a pixel would be a visible misplacement.
TOLERANCE_PX = 0.75


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """A fresh page on a server's playground. Any script error in the page fails the test, and so
    does any failed request except those the test expects to provoke (``allowed``: parts of the
    console messages they cause)."""
    contexts = []
    errors: list[str] = []

    def open_(server: LiveServer, allowed: tuple[str, ...] = ()) -> Page:
        context = browser.new_context(viewport={"width": 1000, "height": 760}, device_scale_factor=1)
        contexts.append(context)
        page = context.new_page()

        def on_console(msg: ConsoleMessage) -> None:
            if msg.type == "error" and not any(a in msg.text for a in allowed):
                errors.append(f"console: {msg.text}")

        page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
        page.on("console", on_console)
        page.goto(server.base_url + "/")
        page.wait_for_selector("#server-status[data-state=ready]")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert errors == []


# --------------------------------------------------------------------------- helpers


def choose_image(page: Page, path: Path) -> None:
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#stage:not([hidden])")


def choose_skill(page: Page, skill: str) -> None:
    page.check(f"input[name=skill][value={skill}]")


def open_settings(page: Page) -> None:
    if page.get_attribute("details.settings", "open") is None:
        page.click("details.settings > summary")


def run_and_wait(page: Page) -> str:
    page.click("#run")
    # A selector, not a JS predicate: the page's CSP (kept on in the test) forbids eval.
    page.wait_for_selector("#result:is([data-state=done], [data-state=error], [data-state=stopped])")
    return str(page.get_attribute("#result", "data-state"))


def run_ok(page: Page) -> None:
    state = run_and_wait(page)
    assert state == "done", page.text_content("#error")


def image_rect(page: Page) -> dict[str, float]:
    rect: dict[str, float] = page.eval_on_selector(
        "#image",
        "e => { const r = e.getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width, h: r.height}; }",
    )
    return rect


def shape_rects(page: Page, selector: str) -> list[dict[str, float]]:
    rects: list[dict[str, float]] = page.eval_on_selector_all(
        selector,
        "es => es.map(e => { const r = e.getBoundingClientRect(); "
        "return {x: r.x, y: r.y, w: r.width, h: r.height, i: Number(e.dataset.index)}; })",
    )
    return sorted(rects, key=lambda r: r["i"])


def assert_points_drawn(page: Page, points: list[dict[str, float]]) -> None:
    """Each point's circle is centred where its coordinates fall on the rendered image, and the
    table lists the coordinates."""
    img = image_rect(page)
    circles = shape_rects(page, "#overlay circle.point")
    assert len(circles) == len(points)
    for circle, p in zip(circles, points, strict=True):
        assert circle["x"] + circle["w"] / 2 == pytest.approx(img["x"] + p["x"] * img["w"], abs=TOLERANCE_PX)
        assert circle["y"] + circle["h"] / 2 == pytest.approx(img["y"] + p["y"] * img["h"], abs=TOLERANCE_PX)
    assert table_rows(page) == [[str(i + 1), f"{p['x']:.3f}", f"{p['y']:.3f}"] for i, p in enumerate(points)]


def table_rows(page: Page) -> list[list[str]]:
    rows: list[list[str]] = page.eval_on_selector_all(
        "#coords-body tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
    )
    return rows


def timing_ms(page: Page, key: str) -> int:
    text = page.text_content(f"#timings dd[data-key={key}]")
    assert text is not None and text.endswith(" ms"), text
    return int(text.removesuffix(" ms").replace(",", ""))


def api(server: LiveServer, route: str, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    with server.client(**kwargs) as client:
        r = client.post(route, json=body)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def health(server: LiveServer) -> dict[str, Any]:
    with server.client() as client:
        result: dict[str, Any] = client.get("/health").json()
    return result


def sse_chunks(server: LiveServer, route: str, body: dict[str, Any]) -> list[str]:
    chunks: list[str] = []
    with server.client() as client, client.stream("POST", route, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line.removeprefix("data:").strip())
                if event["chunk"]:
                    chunks.append(event["chunk"])
    return chunks


def record_answer_pieces(page: Page) -> None:
    """Record each piece of text added to the answer, as it is added."""
    page.evaluate(
        """() => {
        window.__pieces = [];
        new MutationObserver(records => {
          for (const r of records) for (const n of r.addedNodes) window.__pieces.push(n.textContent);
        }).observe(document.getElementById('answer'), {childList: true});
      }"""
    )


def save_screenshot(page: Page, tmp_path: Path) -> None:
    shot = page.screenshot(full_page=True)
    (tmp_path / "playground.png").write_bytes(shot)
    extra = os.environ.get("PLAYGROUND_SCREENSHOT")
    if extra:
        Path(extra).write_bytes(shot)


# --------------------------------------------------------------------------- tests


def test_page_and_assets_are_served(server: LiveServer) -> None:
    with server.client() as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for asset, mime in (
            ("/static/playground.js", "javascript"),
            ("/static/playground.css", "css"),
        ):
            r = client.get(asset)
            assert r.status_code == 200 and mime in r.headers["content-type"], asset
            assert asset in page.text
        # Only the playground's own paths are claimed: other unknown paths keep the JSON 404.
        missing = client.get("/no-such-route")
        assert missing.status_code == 404 and missing.headers["content-type"] == "application/json"
        assert client.get("/static/no-such-file.js").status_code == 404


def test_the_wheel_ships_the_page(tmp_path: Path) -> None:
    """`pip install .` installs the page: its files are package data of the built wheel."""
    root = Path(__file__).resolve().parents[2]
    project = tmp_path / "project"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(root / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, project / name)
    out = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(project),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("moondream_server-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    static = root / "src" / "moondream_server" / "api" / "playground" / "static"
    needed = {"index.html", *ASSETS}
    assert needed == {f.name for f in static.iterdir()}, "every file in static/ is served, and only those"
    for name in needed:
        assert f"moondream_server/api/playground/static/{name}" in shipped, name


def test_detect_point_and_streamed_answers(
    server: LiveServer, open_page: Callable[..., Page], tmp_path: Path
) -> None:
    page = open_page(server)
    assert "ready" in (page.text_content("#server-status") or "")

    # Nothing to work on yet: the page says so instead of sending a request.
    choose_skill(page, "detect")
    assert run_and_wait(page) == "error"
    assert page.text_content("#error") == "Choose an image first."
    # ...except a query, which the model answers without an image.
    choose_skill(page, "query")
    page.fill("#question", QUESTION)
    open_settings(page)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(GREEDY["max_tokens"]))
    with page.expect_request("**/v1/query") as sent:
        run_ok(page)
    assert "image_url" not in sent.value.post_data_json
    assert (
        page.text_content("#answer")
        == api(server, "/v1/query", {"question": QUESTION, "settings": GREEDY})["answer"]
    )

    choose_image(page, IMG2)
    assert "640 × 480" in (page.text_content("#image-info") or "")
    image_url = file_data_url(IMG2)

    # ---- point
    choose_skill(page, "point")
    page.fill("#object", OBJECT)
    page.fill("#max-objects", str(MAX_OBJECTS))
    with page.expect_request("**/v1/point") as sent:
        run_ok(page)
    assert sent.value.post_data_json == {
        "image_url": image_url,
        "object": OBJECT,
        "settings": {"max_objects": MAX_OBJECTS},
    }
    points = api(
        server,
        "/v1/point",
        {"image_url": image_url, "object": OBJECT, "settings": {"max_objects": MAX_OBJECTS}},
    )["points"]
    assert points, "the tiny model points at something in img2 (see expected.json)"
    img = image_rect(page)
    assert img["w"] < 640, "the image must be drawn scaled for the geometry check to mean something"
    assert img["w"] / img["h"] == pytest.approx(640 / 480, abs=0.01)
    assert_points_drawn(page, points)
    assert timing_ms(page, "total") >= 0

    # ---- detect
    choose_skill(page, "detect")
    run_ok(page)
    objects = api(
        server,
        "/v1/detect",
        {"image_url": image_url, "object": OBJECT, "settings": {"max_objects": MAX_OBJECTS}},
    )["objects"]
    assert len(objects) >= 2
    img = image_rect(page)
    rects = shape_rects(page, "#overlay rect.box")
    assert len(rects) == len(objects)
    for rect, b in zip(rects, objects, strict=True):
        assert rect["x"] == pytest.approx(img["x"] + b["x_min"] * img["w"], abs=TOLERANCE_PX)
        assert rect["y"] == pytest.approx(img["y"] + b["y_min"] * img["h"], abs=TOLERANCE_PX)
        assert rect["x"] + rect["w"] == pytest.approx(img["x"] + b["x_max"] * img["w"], abs=TOLERANCE_PX)
        assert rect["y"] + rect["h"] == pytest.approx(img["y"] + b["y_max"] * img["h"], abs=TOLERANCE_PX)
    assert table_rows(page) == [
        [str(i + 1), *(f"{b[k]:.3f}" for k in ("x_min", "y_min", "x_max", "y_max"))]
        for i, b in enumerate(objects)
    ]
    save_screenshot(page, tmp_path)

    # ---- query, streamed: the same pieces as the SSE stream, ending in the non-streamed answer
    choose_skill(page, "query")
    assert page.is_checked("#stream")
    body = {"image_url": image_url, "question": QUESTION, "settings": GREEDY}
    expected = api(server, "/v1/query", body)["answer"]
    expected_pieces = sse_chunks(server, "/v1/query", {**body, "stream": True})
    assert len(expected_pieces) >= 2 and "".join(expected_pieces) == expected
    record_answer_pieces(page)
    with page.expect_response("**/v1/query") as answered:
        run_ok(page)
    assert answered.value.request.post_data_json == {**body, "stream": True}
    assert answered.value.headers["content-type"].startswith("text/event-stream")
    assert page.evaluate("window.__pieces") == expected_pieces
    assert page.text_content("#answer") == expected
    assert 0 <= timing_ms(page, "ttft") <= timing_ms(page, "total")

    # ---- query with reasoning: not streamed; the reasoning is shown, its grounded points drawn
    page.check("#reasoning")
    with page.expect_request("**/v1/query") as sent:
        run_ok(page)
    assert sent.value.post_data_json == {**body, "stream": False, "reasoning": True}
    reasoned = api(server, "/v1/query", {**body, "reasoning": True})
    assert page.text_content("#answer") == reasoned["answer"]
    text, grounding = reasoned["reasoning"]["text"], reasoned["reasoning"]["grounding"]
    assert grounding, "img2's greedy reasoning grounds a point (see expected.json)"
    assert page.text_content("#reasoning-text") == text
    marks = page.eval_on_selector_all("#reasoning-text mark", "ms => ms.map(m => m.textContent)")
    assert marks == [text[g["start_idx"] : g["end_idx"]] for g in grounding]
    assert_points_drawn(page, [{"x": x, "y": y} for g in grounding for x, y in g["points"]])
    page.uncheck("#reasoning")

    # ---- caption, streamed, then the same request not streamed
    choose_skill(page, "caption")
    page.select_option("#length", "short")
    caption_body = {"image_url": image_url, "length": "short", "settings": GREEDY}
    expected = api(server, "/v1/caption", caption_body)["caption"]
    run_ok(page)
    assert page.text_content("#answer") == expected
    page.uncheck("#stream")
    with page.expect_response("**/v1/caption") as answered:
        run_ok(page)
    assert answered.value.headers["content-type"] == "application/json"
    assert page.text_content("#answer") == expected
    assert timing_ms(page, "ttft") <= timing_ms(page, "total")


def test_api_key_and_errors(
    start_server: Callable[..., LiveServer], open_page: Callable[..., Page], tmp_path: Path
) -> None:
    key = "playground-key"
    server = start_server(tiny_settings(api_keys=key))
    page = open_page(server, allowed=("status of 401 ", "status of 413 ", "ERR_CONNECTION_REFUSED"))
    choose_image(page, IMG2)
    choose_skill(page, "detect")
    page.fill("#object", OBJECT)

    assert run_and_wait(page) == "error"
    error = page.text_content("#error") or ""
    assert error.startswith("Error 401: Invalid or missing API key"), error
    assert page.is_visible("#error") and page.get_attribute("#error", "role") == "alert"
    assert page.locator("#overlay rect").count() == 0

    assert page.get_attribute("#api-key", "aria-invalid") == "true"
    assert page.evaluate("() => document.activeElement.id") == "api-key"
    page.fill("#api-key", key)
    assert page.get_attribute("#api-key", "aria-invalid") is None
    with page.expect_request("**/v1/detect") as sent:
        run_ok(page)
    assert sent.value.headers["x-moondream-auth"] == key
    assert not page.is_visible("#error")
    expected = api(
        server,
        "/v1/detect",
        {"image_url": file_data_url(IMG2), "object": OBJECT},
        headers={"X-Moondream-Auth": key},
    )["objects"]
    assert page.locator("#overlay rect.box").count() == len(expected)

    # The page checks what it can before sending...
    open_settings(page)
    page.fill("#max-objects", "5000")
    choose_skill(page, "point")
    assert run_and_wait(page) == "error"
    assert (page.text_content("#error") or "").startswith("Max objects:")
    page.fill("#max-objects", "")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    page.set_input_files("#file", str(notes))
    page.wait_for_selector("#result[data-state=error]")
    assert page.text_content("#error") == '"notes.txt" is not an image file.'
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    page.set_input_files("#file", str(broken))
    page.wait_for_selector("#error:has-text('cannot display')")
    assert (page.text_content("#image-info") or "").startswith("img2.png"), "the last good image stays"

    # ...and shows the server's own message for what only the server can refuse.
    big = tmp_path / "big.png"
    Image.new("RGB", (2000, 1001), "gray").save(big)  # over the test server's 2,000,000 pixels
    choose_image(page, big)
    assert run_and_wait(page) == "error"
    error = page.text_content("#error") or ""
    assert error.startswith("Error 413: ") and "pixels" in error, error

    # ...and says so in words when the server cannot be reached (the browser is told the
    # connection was refused: deterministic, unlike racing a stopping server).
    page.route("**/v1/**", lambda route: route.abort("connectionrefused"))
    choose_image(page, IMG2)
    assert run_and_wait(page) == "error"
    error = page.text_content("#error") or ""
    assert error.startswith("Could not reach the server: "), error


def test_stop_ends_the_stream_and_the_generation(
    start_server: Callable[..., LiveServer], open_page: Callable[..., Page], never_stop_checkpoint: Path
) -> None:
    # End-of-text is unreachable in this checkpoint: a long budget streams for many seconds.
    server = start_server(tiny_settings(model=str(never_stop_checkpoint)))
    page = open_page(server)
    before = health(server)["requests"]
    choose_image(page, IMG2)
    choose_skill(page, "caption")
    open_settings(page)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "2000")
    page.click("#run")
    page.wait_for_selector("#result[data-state=streaming]")
    assert page.get_attribute("#result", "aria-busy") == "true"
    page.wait_for_function("() => document.getElementById('answer').childNodes.length >= 3")
    page.click("#stop")
    page.wait_for_selector("#result[data-state=stopped]")
    assert page.get_attribute("#result", "aria-busy") == "false"
    assert page.is_enabled("#run") and not page.is_visible("#stop")
    shown = page.text_content("#answer") or ""
    assert shown, "what had arrived stays on the page"
    # The page closed the stream, and the server stopped generating instead of running to 2000.
    deadline = time.monotonic() + 20
    while health(server)["requests"]["interrupted"] == before["interrupted"]:
        assert time.monotonic() < deadline, health(server)
        time.sleep(0.1)
    assert health(server)["requests"]["completed"] == before["completed"]


def test_boxes_follow_the_exif_orientation(
    server: LiveServer, open_page: Callable[..., Page], tmp_path: Path
) -> None:
    """A phone photo stores its pixels sideways with an EXIF orientation; the server's coordinates
    are for the upright image, and the browser shows it upright: the boxes must land on it."""
    photo = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    with Image.open(IMG2) as img:
        img.convert("RGB").save(photo, "JPEG", quality=90, exif=exif.tobytes())
    page = open_page(server)
    choose_image(page, photo)
    assert "480 × 640" in (page.text_content("#image-info") or "")
    img_rect = image_rect(page)
    assert img_rect["h"] > img_rect["w"], "shown upright"
    choose_skill(page, "detect")
    page.fill("#object", OBJECT)
    run_ok(page)
    body = {"image_url": file_data_url(photo, "image/jpeg"), "object": OBJECT}
    objects = api(server, "/v1/detect", body)["objects"]
    assert objects
    rects = shape_rects(page, "#overlay rect.box")
    assert len(rects) == len(objects)
    for rect, b in zip(rects, objects, strict=True):
        assert rect["x"] == pytest.approx(img_rect["x"] + b["x_min"] * img_rect["w"], abs=TOLERANCE_PX)
        assert rect["y"] == pytest.approx(img_rect["y"] + b["y_min"] * img_rect["h"], abs=TOLERANCE_PX)
        assert rect["w"] == pytest.approx((b["x_max"] - b["x_min"]) * img_rect["w"], abs=TOLERANCE_PX)
        assert rect["h"] == pytest.approx((b["y_max"] - b["y_min"]) * img_rect["h"], abs=TOLERANCE_PX)
