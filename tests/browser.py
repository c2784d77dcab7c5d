"""Headless Chromium for the page and Space tests: the system browser (Debian's ``chromium``) driven by Playwright.

``make test`` installs the browser with apt when it is missing; Playwright's own browser download is not used.
A missing browser fails the test with the fix rather than skipping it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str | None:
    """The Chromium binary: ``$HFX_CHROMIUM`` if set, else the first of ``CANDIDATES`` on the PATH."""
    if os.environ.get("HFX_CHROMIUM"):
        return os.environ["HFX_CHROMIUM"]
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@contextmanager
def chromium_page(timeout_ms: int = 15_000) -> Iterator:
    """A fresh Playwright page in headless Chromium; fails the test (not skip) when the browser is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]' (or `make test`).")
    executable = chromium_path()
    if executable is None:
        pytest.fail(
            f"No Chromium found (looked for {', '.join(CANDIDATES)} on PATH and $HFX_CHROMIUM): "
            "`apt-get install -y chromium` (`make test` does this)."
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            browser.close()
