"""Headless Chromium for the browser tests: Debian's ``chromium`` package driven by Playwright for
Python through ``executable_path``. Playwright's own browser download is never used; ``make test``
installs the package with apt-get where it runs as root, and the tests skip, saying why, where no
Chromium exists."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from playwright.sync_api import Browser, sync_playwright

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
NO_CHROMIUM = (
    "no Chromium on this machine: install Debian's `chromium` package (`make test` does, as root "
    "where apt-get is available) or set CHROMIUM=/path/to/chromium"
)


def find_chromium() -> str | None:
    """``$CHROMIUM``, else the first Chromium or Chrome on PATH."""
    configured = os.environ.get("CHROMIUM")
    if configured:
        return configured
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium for the duration of the block; skips the test where there is none."""
    executable = find_chromium()
    if executable is None:
        pytest.skip(NO_CHROMIUM)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True)
        try:
            yield browser
        finally:
            browser.close()
