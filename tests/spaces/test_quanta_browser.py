"""The quanta-browser Space as a real server, driven in headless Chromium."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from tests.browser import chromium_page
from tests.quanta.test_viewer import make_artifact
from tests.servers import free_port, serving

APP = Path(__file__).resolve().parents[2] / "spaces" / "quanta-browser" / "app.py"
STARTUP_SECONDS = 60


def load_app_module():
    spec = importlib.util.spec_from_file_location("quanta_browser_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The Space serving a hand-made artifact (no sizes.png, so the app draws the plot) on a free port."""
    directory = tmp_path_factory.mktemp("quanta-browser")
    artifact = make_artifact(directory / "clusters")
    port = free_port()
    log_path = directory / "server.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "MPLBACKEND": "Agg",
    }
    command = [sys.executable, str(APP), "--artifact", str(artifact), "--port", str(port)]
    url = f"http://127.0.0.1:{port}/"
    with serving(command, url, log_path, env, STARTUP_SECONDS):
        yield url


def test_browse_clusters_in_the_space(server):
    with chromium_page(timeout_ms=20_000) as page:
        from playwright.sync_api import expect

        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server)
        title = page.locator("#cluster-view .quanta-title")
        expect(title).to_have_text("cluster 1 — 5 tokens")
        expect(page.locator("#cluster-view li")).to_have_count(5)
        assert page.locator("#cluster-view mark.token").first.inner_text() == "⏎"
        assert page.locator("#cluster-view span.context").first.inner_text().endswith("</script>")
        assert page.locator("#cluster-view script, #cluster-view b").count() == 0
        assert "tiny <model> & co" in page.locator("#meta").inner_text()

        # The rank/frequency plot is drawn (the artifact has no sizes.png) and loads.
        plot = page.locator("#sizes-plot img")
        expect(plot).to_be_visible()
        page.wait_for_function("() => document.querySelector('#sizes-plot img').naturalWidth > 0")

        # The dropdown lists the clusters largest first and switches the examples.
        page.click("#cluster-select input")
        options = page.locator("#cluster-select [role=option]")
        expect(options).to_have_count(4)
        assert options.evaluate_all("items => items.map(item => item.getAttribute('aria-label'))") == [
            "cluster 1 — 5 tokens",
            "cluster 3 — 4 tokens",
            "cluster 0 — 3 tokens",
            "cluster 2 — 1 token",
        ]
        options.nth(2).click()
        expect(title).to_have_text("cluster 0 — 3 tokens")
        expect(page.locator("#cluster-view mark.token")).to_have_text(["·self", "self", "·self"])

        # prev / next step in size order and wrap around; ← / → press them.
        page.click("#next")
        expect(title).to_have_text("cluster 2 — 1 token")
        expect(page.locator("#cluster-view mark.token")).to_have_text(["&amp;"])
        page.click("#next")
        expect(title).to_have_text("cluster 1 — 5 tokens")
        page.click("#prev")
        expect(title).to_have_text("cluster 2 — 1 token")
        expect(page.locator("#cluster-select input")).to_have_value("cluster 2 — 1 token")
        page.click("#cluster-view")
        page.keyboard.press("ArrowLeft")
        expect(title).to_have_text("cluster 0 — 3 tokens")

        # Searching a token lists the clusters holding it (most occurrences first); picking one jumps there.
        page.fill("#token-search textarea", "self")
        results = page.locator("#search-results label")
        expect(results).to_have_text(["cluster 0: 3 of its 3", "cluster 3: 1 of its 4"])
        expect(page.locator("#search-status")).to_contain_text("2 clusters contain")
        results.nth(1).click()
        expect(title).to_have_text("cluster 3 — 4 tokens")
        expect(page.locator("#cluster-select input")).to_have_value("cluster 3 — 4 tokens")
        expect(page.locator("#cluster-view mark.token")).to_have_text(["é", "·self", "日本", "</script>"])

        page.fill("#token-search textarea", "⏎")
        expect(results).to_have_text(["cluster 1: 4 of its 5"])
        results.first.click()
        expect(title).to_have_text("cluster 1 — 5 tokens")

        page.fill("#token-search textarea", "absent")
        expect(page.locator("#search-status")).to_contain_text("no cluster contains")
        expect(results).to_have_count(0)
        assert errors == []


def test_resolve_artifact_and_sizes_plot(tmp_path):
    app = load_app_module()
    artifact = make_artifact(tmp_path / "clusters")
    assert app.resolve_artifact(str(artifact)) == artifact
    with pytest.raises(FileNotFoundError, match="not found"):
        app.resolve_artifact(str(tmp_path / "missing"))

    view = app.load_clusters(artifact)
    drawn = Path(app.sizes_plot_path(view))
    assert drawn.read_bytes().startswith(b"\x89PNG")
    (artifact / "sizes.png").write_bytes(drawn.read_bytes())
    assert app.sizes_plot_path(app.load_clusters(artifact)) == str(artifact / "sizes.png")
