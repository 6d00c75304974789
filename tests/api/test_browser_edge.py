"""In a real browser (headless Debian Chromium through Playwright, as the playground's test):
the docs pages render with every request to another host blocked, and a page on another origin
cannot make the browser run inference on a server without keys, while a same-origin page can."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route

from moondream_server.api.docs_pages import DOCS_CSP
from tests.api.browser import chromium
from tests.api.support import IMAGES, LiveServer


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


def _offline_page(browser: Browser, server: LiveServer, outside: list[str]) -> Page:
    context = browser.new_context()

    def route(r: Route) -> None:
        if r.request.url.startswith((server.base_url + "/", "data:", "blob:")):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    return context.new_page()


def test_docs_html_names_no_other_host(server: LiveServer) -> None:
    with server.client() as c:
        for path in ("/docs", "/redoc"):
            page = c.get(path)
            assert page.headers["content-security-policy"] == DOCS_CSP
            html = page.text
            assert not re.search(r"https?://", html), (path, re.findall(r"https?://[^\"' ]+", html))
            assets = re.findall(r"(?:src|href)=[\"']([^\"']+)[\"']", html)
            assert assets and all(a.startswith("/docs/assets/") for a in assets), assets
            for asset in assets:
                r = c.get(asset)
                assert r.status_code == 200 and len(r.content) > 1000, asset


def test_swagger_ui_and_redoc_render_offline(browser: Browser, server: LiveServer) -> None:
    outside: list[str] = []
    page = _offline_page(browser, server, outside)
    page.goto(server.base_url + "/docs")
    page.wait_for_selector('.opblock-summary-path[data-path="/v1/caption"]', timeout=30_000)
    assert page.locator(".opblock").count() >= 12
    page.goto(server.base_url + "/redoc")
    page.wait_for_selector('[data-section-id^="operation/"]', timeout=30_000)
    assert page.locator('[data-section-id^="operation/"]').count() >= 12
    assert outside == []


def test_a_foreign_page_cannot_run_inference(browser: Browser, server: LiveServer) -> None:
    """http://localhost:PORT and http://127.0.0.1:PORT are different origins to the browser."""
    png = list(IMAGES[0].read_bytes())
    script = """async ([url, bytes]) => {
        const form = new FormData();
        form.append("file", new Blob([new Uint8Array(bytes)], {type: "image/png"}), "a.png");
        form.append("length", "short");
        try {
            const r = await fetch(url, {method: "POST", body: form, mode: "no-cors"});
            return r.type === "opaque" ? "opaque" : String(r.status);
        } catch (e) { return "failed"; }
    }"""
    target = server.base_url + "/upload/caption"
    before = httpx.get(server.base_url + "/health", trust_env=False).json()["requests"]["completed"]
    page = browser.new_page()
    page.goto(server.base_url.replace("127.0.0.1", "localhost") + "/health")
    page.evaluate(script, [target, png])  # the "simple" multipart POST any web page can send
    after = httpx.get(server.base_url + "/health", trust_env=False).json()["requests"]["completed"]
    assert after == before, "a cross-origin page made the server run inference"
    page.goto(server.base_url + "/health")
    assert page.evaluate(script.replace('mode: "no-cors"', 'mode: "same-origin"'), [target, png]) == "200"
    done = httpx.get(server.base_url + "/health", trust_env=False).json()["requests"]["completed"]
    assert done == after + 1
    page.close()
