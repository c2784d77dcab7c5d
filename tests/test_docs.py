"""The documentation site: built strictly (broken links and missing references fail), its Python snippets run,
and the built site works in headless Chromium (it loads, navigation and search work)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import chromium_page
from tests.prewarmed import run_prewarmed
from tests.servers import static_files

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets() -> list[tuple[str, int, str]]:
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        for index, match in enumerate(SNIPPET.finditer(page.read_text())):
            found.append((str(page.relative_to(DOCS)), index, match.group(1)))
    return found


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "NO_MKDOCS_2_WARNING": "1"}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """`mkdocs build --strict`: a warning (broken link, missing docstring reference, page not in the nav) fails."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_the_site_builds_strictly_with_every_page_and_the_api_reference(site):
    for page in (
        "index.html",
        "getting-started/index.html",
        "cartridges/index.html",
        "how-to/own-document/index.html",
    ):
        assert (site / page).is_file(), page
    api = (site / "api" / "index.html").read_text()
    assert "create_cartridge" in api and "PeerMlaForCausalLM" in api and "ConsistencyLens" in api


@pytest.mark.parametrize(("page", "index", "code"), snippets(), ids=lambda v: str(v)[:40])
def test_every_python_snippet_in_the_docs_runs(page, index, code, tmp_path):
    # a process of its own for each snippet, forked from one that has imported torch, transformers and hfx
    result = run_prewarmed(code, [], env=env(), timeout=600, cwd=tmp_path)
    assert result.returncode == 0, f"{page}, snippet {index + 1}:\n{result.stderr[-3000:]}"


def test_the_docs_have_snippets_on_every_system_page():
    pages = {page for page, _, _ in snippets()}
    assert {"cartridges.md", "peer-mla.md", "quanta.md", "lens.md", "how-to/own-document.md"} <= pages


@pytest.fixture
def served(site):
    with static_files(site) as url:
        yield url


def test_the_built_site_loads_navigates_and_searches_in_chromium(served):
    from playwright.sync_api import expect

    with chromium_page(timeout_ms=20_000) as page:
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        failed: list[str] = []
        page.on("requestfailed", lambda request: failed.append(request.url))
        page.goto(served)
        expect(page.locator("article h1")).to_have_text("hfx")
        page.locator("nav.md-nav a", has_text="Getting started").first.click()
        expect(page.locator("article h1")).to_have_text("Getting started")
        assert page.url.endswith("/getting-started/")
        page.keyboard.press("s")  # the site's search shortcut focuses the search box
        page.keyboard.type("cartridge", delay=20)
        results = page.locator(".md-search-result__item")
        expect(results.first).to_be_visible()
        assert results.count() > 1
        results.first.locator("a").first.click()
        expect(page.locator("article h1")).to_be_visible()
        assert not errors, errors
        assert not failed, failed  # nothing is fetched from outside the site (fonts, scripts)
