"""The clustering artifact viewer: loading, the static page's content and escaping, and the page in a browser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hfx.quanta.viewer import (
    ClusterView,
    context_tail,
    display_token,
    load_clusters,
    page_data,
    write_html,
)
from tests.browser import chromium_page

LONG_CONTEXT = "x" * 500 + "def method(self, other):\n    return "

# (cluster, token, context, loss_bits): sizes 3, 5, 1, 4, so size order is clusters 1, 3, 0, 2.
ROWS = [
    (0, " self", "class A:\n    def f(", 0.30),
    (0, " self", LONG_CONTEXT, 0.10),
    (0, "self", "print(\"quoted\" and 'single') ", 0.20),
    (1, "\n", "end of a line </script><script>alert(1)</script>", 0.05),
    (1, "\n", "bold <b>text</b> & more", 0.50),
    (1, "\n", "entity &amp; stays literal", 0.25),
    (1, "\n\n", "two newlines after this", 0.40),
    (1, "\n", "", 0.15),
    (2, "&amp;", "<!-- comment --> \u2028 line separator", 1.25),
    (3, " self", "unicode: naïve café 日本語 🙂 ", 0.70),
    (3, "é", "caf", 0.60),
    (3, "日本", "こんにちは ", 0.80),
    (3, "</script>", "a token that closes a script: ", 0.90),
]
SIZE_ORDER = [1, 3, 0, 2]
META = {
    "n_clusters": 4,
    "random_state": 0,
    "n_tokens": len(ROWS),
    "sizes": [3, 5, 1, 4],
    "power_law": {"exponent": 0.8123, "intercept": 1.5, "r2": 0.9},
    "model": "tiny <model> & co",
    "dataset": "toy/corpus",
    "extra_key": "ignored",
}
SCHEMA = pa.schema(
    [
        ("token_index", pa.int64()),
        ("doc_id", pa.int64()),
        ("position", pa.int32()),
        ("token_id", pa.int32()),
        ("token", pa.string()),
        ("context", pa.string()),
        ("loss_bits", pa.float32()),
        ("cluster", pa.int32()),
    ]
)


def make_artifact(directory: Path, rows=ROWS, meta=META, drop_column: str | None = None) -> Path:
    """A hand-made clustering artifact (parquet + clusters.json, no sizes.png) in ``directory``."""
    (directory / "data").mkdir(parents=True, exist_ok=True)
    columns = {
        "token_index": [100 + index for index in range(len(rows))],
        "doc_id": [index % 3 for index in range(len(rows))],
        "position": [10 + index for index in range(len(rows))],
        "token_id": [1000 + index for index in range(len(rows))],
        "token": [row[1] for row in rows],
        "context": [row[2] for row in rows],
        "loss_bits": [row[3] for row in rows],
        "cluster": [row[0] for row in rows],
    }
    table = pa.table(columns, schema=SCHEMA)
    if drop_column:
        table = table.drop_columns([drop_column])
    pq.write_table(table, directory / "data" / "clusters.parquet")
    (directory / "clusters.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    return directory


@pytest.fixture
def artifact(tmp_path) -> Path:
    return make_artifact(tmp_path / "clusters")


def embedded_data(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="cluster-data">(.*?)</script>', page, re.DOTALL)
    assert match, "no embedded cluster data"
    return json.loads(match.group(1))


# ---------------------------------------------------------------------------------------------------------------
# loading


def test_load_orders_clusters_by_size_and_examples_by_loss(artifact):
    view = load_clusters(artifact)
    assert isinstance(view, ClusterView)
    assert [cluster.cluster_id for cluster in view.clusters] == SIZE_ORDER
    assert [cluster.size for cluster in view.clusters] == [5, 4, 3, 1]
    for cluster in view.clusters:
        losses = [example.loss_bits for example in cluster.examples]
        assert losses == sorted(losses)
    newline_cluster = view.cluster(1)
    assert [example.token for example in newline_cluster.examples][:2] == ["\n", "\n"]
    assert newline_cluster.examples[0].context.endswith("</script>")
    assert view.meta["extra_key"] == "ignored"
    assert view.cluster(0).top_tokens(2) == [(" self", 2), ("self", 1)]
    assert view.sizes_plot is None


def test_load_ties_broken_by_cluster_id(tmp_path):
    rows = [(1, "a", "", 0.1), (0, "b", "", 0.2), (2, "c", "", 0.3), (2, "d", "", 0.4)]
    meta = {**META, "n_clusters": 3, "n_tokens": 4, "sizes": [1, 1, 2]}
    view = load_clusters(make_artifact(tmp_path / "ties", rows=rows, meta=meta))
    assert [cluster.cluster_id for cluster in view.clusters] == [2, 0, 1]
    assert view.neighbor(2, 1) == 0 and view.neighbor(2, -1) == 1 and view.neighbor(1, 1) == 2


def test_find_token(artifact):
    view = load_clusters(artifact)
    assert [(cluster.cluster_id, count) for cluster, count in view.find_token("self")] == [(0, 3), (3, 1)]
    assert [(cluster.cluster_id, count) for cluster, count in view.find_token("⏎")] == [(1, 4)]
    assert view.find_token("   ") == [] and view.find_token("absent") == []


def test_missing_parquet_names_the_file(artifact):
    (artifact / "data" / "clusters.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"clusters\.parquet"):
        load_clusters(artifact)


def test_missing_meta_names_the_file(artifact):
    (artifact / "clusters.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"clusters\.json"):
        load_clusters(artifact)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_clusters(tmp_path / "nowhere")


def test_missing_column_names_file_and_column(tmp_path):
    directory = make_artifact(tmp_path / "clusters", drop_column="loss_bits")
    with pytest.raises(ValueError, match=r"clusters\.parquet lacks the column\(s\) loss_bits"):
        load_clusters(directory)


@pytest.mark.parametrize("key", ["n_clusters", "n_tokens", "sizes", "power_law"])
def test_missing_key_names_file_and_key(tmp_path, key):
    meta = {name: value for name, value in META.items() if name != key}
    directory = make_artifact(tmp_path / "clusters", meta=meta)
    with pytest.raises(ValueError, match=rf"clusters\.json lacks the key\(s\) {key}"):
        load_clusters(directory)


def test_optional_keys_may_be_missing(tmp_path):
    meta = {key: value for key, value in META.items() if key not in ("model", "dataset")}
    meta["power_law"] = {"exponent": float("nan"), "intercept": float("nan")}
    directory = make_artifact(tmp_path / "clusters", meta=meta)
    page = write_html(directory, tmp_path / "page.html").read_text(encoding="utf-8")
    assert embedded_data(page)["meta"] == {
        "model": "unknown",
        "dataset": "unknown",
        "tokens": "13",
        "clusters": "4",
        "power-law exponent": "nan",
    }


def test_invalid_json_and_out_of_range_cluster(tmp_path):
    directory = make_artifact(tmp_path / "bad-json")
    (directory / "clusters.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"clusters\.json is not valid JSON"):
        load_clusters(directory)
    directory = make_artifact(tmp_path / "bad-cluster", meta={**META, "n_clusters": 3})
    with pytest.raises(ValueError, match=r"clusters\.parquet: row 9 has cluster 3, outside 0\.\.2"):
        load_clusters(directory)


# ---------------------------------------------------------------------------------------------------------------
# rendering helpers


def test_display_token_and_context_tail():
    assert display_token("\n") == "⏎"
    assert display_token(" self") == "·self"
    assert display_token("\t\r\n") == "⇥␍⏎"
    assert display_token("") == "∅"
    assert display_token("日本") == "日本"
    assert context_tail("abcdef", 3) == "…def"
    assert context_tail("abc", 3) == "abc"
    assert context_tail("abc", 0) == "…" and context_tail("", 0) == ""


# ---------------------------------------------------------------------------------------------------------------
# the static page


def test_write_html_is_self_contained_and_round_trips(artifact, tmp_path):
    output = write_html(
        artifact, tmp_path / "out" / "page.html", max_examples_per_cluster=3, context_chars=40
    )
    assert output == tmp_path / "out" / "page.html"
    assert not list(output.parent.glob(".*tmp*")), "temp file left behind"
    page = output.read_text(encoding="utf-8")

    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.IGNORECASE)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert page.count("<script") == 2 and page.lower().count("</script") == 2

    data = embedded_data(page)
    assert data == page_data(load_clusters(artifact), 3, 40)
    assert [cluster["id"] for cluster in data["clusters"]] == SIZE_ORDER
    assert [cluster["size"] for cluster in data["clusters"]] == [5, 4, 3, 1]
    assert data["clusters"][0]["label"] == "cluster 1 — 5 tokens"
    assert data["clusters"][-1]["label"] == "cluster 2 — 1 token"
    assert [len(cluster["examples"]) for cluster in data["clusters"]] == [3, 3, 3, 1]

    by_loss = {(row[0], row[3]): row for row in ROWS}  # (cluster, loss) is unique in ROWS
    for cluster in data["clusters"]:
        for example in cluster["examples"]:
            _, token, context, _ = by_loss[(cluster["id"], round(example["loss_bits"], 4))]
            assert example["token"] == token
            assert example["shown"] == display_token(token)
            assert example["context"] == context_tail(context, 40)
    first = data["clusters"][0]["examples"][0]
    assert first == {
        "token": "\n",
        "shown": "⏎",
        "context": "… line </script><script>alert(1)</script>",
        "loss_bits": 0.05,
        "token_index": 103,
        "doc_id": 0,
        "position": 13,
        "token_id": 1003,
    }
    assert data["meta"]["model"] == "tiny <model> & co"
    assert data["meta"]["power-law exponent"] == "0.812"


def test_write_html_escapes_markup(artifact, tmp_path):
    page = write_html(artifact, tmp_path / "page.html").read_text(encoding="utf-8")
    assert "alert(1)" in page  # the text is there, only as escaped JSON
    assert "<script>alert(1)" not in page
    assert "<b>text</b>" not in page
    assert "<!-- comment" not in page
    assert "tiny <model>" not in page and "tiny &lt;model&gt; &amp; co" in page
    assert '<option value="1">cluster 1 — 5 tokens</option>' in page


def test_write_html_embeds_the_sizes_plot(artifact, tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
    (artifact / "sizes.png").write_bytes(png)
    page = write_html(artifact, tmp_path / "page.html").read_text(encoding="utf-8")
    assert 'id="sizes-plot"' in page and 'src="data:image/png;base64,iVBORw0KGgo' in page


# ---------------------------------------------------------------------------------------------------------------
# the static page in a real browser


@pytest.fixture(scope="module")
def page_file(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("viewer")
    return write_html(make_artifact(directory / "clusters"), directory / "page.html", context_chars=60)


def test_static_page_in_browser(page_file):
    with chromium_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(page_file.as_uri())

        options = page.locator("#cluster-select option")
        assert options.all_inner_texts() == [
            "cluster 1 — 5 tokens",
            "cluster 3 — 4 tokens",
            "cluster 0 — 3 tokens",
            "cluster 2 — 1 token",
        ]
        title = page.locator("#cluster-title")
        assert title.inner_text() == "cluster 1 — 5 tokens"
        assert page.locator("#examples li").count() == 5
        assert page.locator("#summary").inner_text().startswith('most frequent: "⏎" ×4, "⏎⏎" ×1')

        # The token is highlighted right after its context; markup in the text stays text.
        first = page.locator("#examples li").first
        assert first.locator("span.context").inner_text().endswith("</script><script>alert(1)</script>")
        assert first.locator("mark.token").inner_text() == "⏎"
        assert first.evaluate(
            "li => li.querySelector('span.context').nextElementSibling === li.querySelector('mark.token')"
        )
        assert page.locator("#examples b").count() == 0 and page.locator("#examples script").count() == 0

        page.keyboard.press("ArrowRight")
        assert title.inner_text() == "cluster 3 — 4 tokens"
        assert page.locator("#cluster-select").input_value() == "3"
        marks = page.locator("#examples mark.token").all_inner_texts()
        assert marks == ["é", "·self", "日本", "</script>"]
        page.keyboard.press("ArrowRight")
        assert title.inner_text() == "cluster 0 — 3 tokens"
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("ArrowLeft")
        assert title.inner_text() == "cluster 1 — 5 tokens"
        page.keyboard.press("ArrowLeft")  # wraps around to the smallest cluster
        assert title.inner_text() == "cluster 2 — 1 token"
        assert page.locator("#examples mark.token").all_inner_texts() == ["&amp;"]

        page.select_option("#cluster-select", "0")
        assert title.inner_text() == "cluster 0 — 3 tokens"
        texts = page.locator("#examples li").all_inner_texts()
        assert texts[0].startswith("…") and "return ·self" in texts[0]
        # Arrow keys on the focused dropdown step once, not twice (the page handles them, not the select).
        page.focus("#cluster-select")
        page.keyboard.press("ArrowRight")
        assert title.inner_text() == "cluster 2 — 1 token"

        page.click("#prev")
        assert title.inner_text() == "cluster 0 — 3 tokens"
        page.click("#next")
        page.click("#next")
        assert title.inner_text() == "cluster 1 — 5 tokens"
        assert errors == []
