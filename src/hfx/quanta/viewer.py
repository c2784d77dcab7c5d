"""Browse a clustering artifact: load it cluster by cluster and render it as one static, self-contained HTML page.

The clustering artifact is the last stage's output directory (``data/clusters.parquet`` + ``clusters.json``, and
``sizes.png`` when the pipeline drew it). ``load_clusters`` reads it into a ``ClusterView`` (clusters largest
first, each cluster's tokens best predicted first); ``write_html`` writes a page that needs no server and no
network. The helpers that turn a token and its context into HTML are shared with the quanta-browser Space.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from hfx.atomic import write_text_atomic

logger = logging.getLogger(__name__)

PARQUET_PATH = Path("data") / "clusters.parquet"
META_FILE = "clusters.json"
SIZES_PLOT = "sizes.png"
COLUMNS = ("token_index", "doc_id", "position", "token_id", "token", "context", "loss_bits", "cluster")
# model and dataset are shown when present; the clustering stage copies them from earlier stages' configs.
META_KEYS = ("n_clusters", "n_tokens", "sizes", "power_law")

# Whitespace would be invisible inside the highlight: show it as visible marks.
_VISIBLE = {"\n": "⏎", "\r": "␍", "\t": "⇥", " ": "·"}

TEMPLATES = Path(__file__).parent / "templates"
#: The examples' style, shared by the static page and the quanta-browser Space.
EXAMPLES_CSS = (TEMPLATES / "examples.css").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _templates():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html", "html.j2"]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
    )


@dataclass(frozen=True)
class TokenExample:
    """One clustered token: where it sits in the corpus, its text, the text before it, and its loss."""

    token_index: int
    doc_id: int
    position: int
    token_id: int
    token: str
    context: str
    loss_bits: float


@dataclass
class Cluster:
    """One cluster's tokens, lowest loss (best predicted) first."""

    cluster_id: int
    examples: list[TokenExample] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.examples)

    @property
    def label(self) -> str:
        noun = "token" if self.size == 1 else "tokens"
        return f"cluster {self.cluster_id} — {self.size} {noun}"

    def top_tokens(self, k: int = 10) -> list[tuple[str, int]]:
        """The ``k`` most frequent token texts in the cluster with their counts (ties: first seen first)."""
        return Counter(example.token for example in self.examples).most_common(k)


@dataclass
class ClusterView:
    """A loaded clustering artifact: its ``clusters.json`` and its clusters, largest first."""

    directory: Path
    meta: dict
    clusters: list[Cluster]

    def cluster(self, cluster_id: int) -> Cluster:
        for cluster in self.clusters:
            if cluster.cluster_id == cluster_id:
                return cluster
        raise KeyError(f"No cluster {cluster_id} in {self.directory} (it has {len(self.clusters)} clusters).")

    def neighbor(self, cluster_id: int, step: int) -> int:
        """The id of the cluster ``step`` places after ``cluster_id`` in size order, wrapping around."""
        order = [cluster.cluster_id for cluster in self.clusters]
        return order[(order.index(cluster_id) + step) % len(order)]

    def find_token(self, query: str) -> list[tuple[Cluster, int]]:
        """Clusters holding the token ``query`` (matched on its stripped text or its display form), with counts.

        Most occurrences first. Whitespace-only tokens are found by their display form (``⏎``, ``·``).
        """
        stripped = query.strip()
        if not stripped:
            return []
        hits = []
        for cluster in self.clusters:
            count = sum(
                1
                for example in cluster.examples
                if example.token.strip() == stripped or display_token(example.token) == stripped
            )
            if count:
                hits.append((cluster, count))
        return sorted(hits, key=lambda hit: -hit[1])

    @property
    def sizes_plot(self) -> Path | None:
        path = self.directory / SIZES_PLOT
        return path if path.is_file() else None


def load_clusters(clusters_dir: str | Path) -> ClusterView:
    """Read a clustering artifact directory into a ``ClusterView``; errors name the file and what is missing."""
    directory = Path(clusters_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"Clustering artifact {directory} is not a directory.")
    meta = _read_meta(directory / META_FILE)
    parquet_path = directory / PARQUET_PATH
    if not parquet_path.is_file():
        raise FileNotFoundError(
            f"{parquet_path} not found: {directory} is not a complete clustering artifact "
            "(run the clustering stage to write data/clusters.parquet)."
        )
    columns = _read_columns(parquet_path)

    n_clusters = int(meta["n_clusters"])
    clusters = [Cluster(cluster_id) for cluster_id in range(n_clusters)]
    for row, cluster_id in enumerate(columns["cluster"]):
        if cluster_id is None or not 0 <= cluster_id < n_clusters:
            raise ValueError(
                f"{parquet_path}: row {row} has cluster {cluster_id!r}, outside 0..{n_clusters - 1} "
                f"(n_clusters in {directory / META_FILE})."
            )
        clusters[cluster_id].examples.append(
            TokenExample(
                token_index=int(columns["token_index"][row]),
                doc_id=int(columns["doc_id"][row]),
                position=int(columns["position"][row]),
                token_id=int(columns["token_id"][row]),
                token=columns["token"][row] or "",
                context=columns["context"][row] or "",
                loss_bits=float("nan")
                if columns["loss_bits"][row] is None
                else float(columns["loss_bits"][row]),
            )
        )
    for cluster in clusters:
        cluster.examples.sort(key=lambda example: (_loss_key(example.loss_bits), example.token_index))
    clusters.sort(key=lambda cluster: (-cluster.size, cluster.cluster_id))

    n_rows = len(columns["cluster"])
    if meta.get("n_tokens") != n_rows:
        logger.warning(
            "%s has %d rows but n_tokens is %s in %s.", parquet_path, n_rows, meta["n_tokens"], META_FILE
        )
    logger.info("Loaded %d tokens in %d clusters from %s.", n_rows, n_clusters, directory)
    return ClusterView(directory=directory, meta=meta, clusters=clusters)


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a clustering artifact needs clusters.json next to data/clusters.parquet."
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}.") from error
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(meta).__name__}.")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{path} lacks the key(s) {', '.join(missing)} (required: {', '.join(META_KEYS)}).")
    if not isinstance(meta["power_law"], dict) or "exponent" not in meta["power_law"]:
        raise ValueError(
            f"{path}: power_law must be an object with an 'exponent' key, got {meta['power_law']!r}."
        )
    if not isinstance(meta["n_clusters"], int) or meta["n_clusters"] < 1:
        raise ValueError(f"{path}: n_clusters must be a positive integer, got {meta['n_clusters']!r}.")
    return meta


def _read_columns(path: Path) -> dict[str, list]:
    schema = pq.read_schema(path)
    missing = [name for name in COLUMNS if name not in schema.names]
    if missing:
        raise ValueError(
            f"{path} lacks the column(s) {', '.join(missing)} (has: {', '.join(schema.names)}; "
            f"required: {', '.join(COLUMNS)})."
        )
    table = pq.read_table(path, columns=list(COLUMNS))
    return {name: table.column(name).to_pylist() for name in COLUMNS}


def _loss_key(loss_bits: float) -> float:
    return math.inf if math.isnan(loss_bits) else loss_bits


# ---------------------------------------------------------------------------------------------------------------
# Rendering helpers shared by the static page and the Space


def display_token(token: str) -> str:
    """The token's text with whitespace made visible (``\\n`` → ``⏎``, space → ``·``); ``∅`` for an empty one."""
    if not token:
        return "∅"
    return "".join(_VISIBLE.get(char, char) for char in token)


def context_tail(context: str, context_chars: int) -> str:
    """The last ``context_chars`` characters of ``context``, starting with ``…`` when something was cut."""
    if context_chars <= 0:
        return "…" if context else ""
    if len(context) <= context_chars:
        return context
    return "…" + context[len(context) - context_chars :]


def top_tokens_summary(cluster: Cluster, k: int = 8) -> str:
    """One line naming the cluster's most frequent tokens, e.g. ``most frequent: "self" ×12, "⏎" ×3``."""
    tokens = ", ".join(f'"{display_token(token)}" ×{count}' for token, count in cluster.top_tokens(k))
    return f"most frequent: {tokens}" if tokens else "no tokens"


def meta_summary(meta: dict) -> list[tuple[str, str]]:
    """The header fields of an artifact, as (label, text) pairs."""
    exponent = meta.get("power_law", {}).get("exponent")
    return [
        ("model", str(meta.get("model", "unknown"))),
        ("dataset", str(meta.get("dataset", "unknown"))),
        ("tokens", str(meta.get("n_tokens", "unknown"))),
        ("clusters", str(meta.get("n_clusters", "unknown"))),
        ("power-law exponent", f"{exponent:.3f}" if isinstance(exponent, (int, float)) else str(exponent)),
    ]


def meta_html(meta: dict) -> str:
    """The header fields as one line of HTML (escaped)."""
    return _templates().get_template("meta.html.j2").render(fields=meta_summary(meta))


def _example_fields(example: TokenExample, context_chars: int) -> dict:
    return {
        "token": example.token,
        "shown": display_token(example.token),
        "context": context_tail(example.context, context_chars),
        "loss_bits": None if math.isnan(example.loss_bits) else round(example.loss_bits, 4),
        "loss": f"{example.loss_bits:.3f}",
        "token_index": example.token_index,
        "doc_id": example.doc_id,
        "position": example.position,
        "token_id": example.token_id,
    }


def cluster_html(cluster: Cluster, max_examples: int = 200, context_chars: int = 300) -> str:
    """A cluster as HTML: its label, a summary line and its first ``max_examples`` examples (lowest loss first)."""
    return (
        _templates()
        .get_template("cluster.html.j2")
        .render(
            cluster=cluster,
            summary=top_tokens_summary(cluster),
            shown=[_example_fields(example, context_chars) for example in cluster.examples[:max_examples]],
        )
    )


# ---------------------------------------------------------------------------------------------------------------
# The static page


def page_data(view: ClusterView, max_examples_per_cluster: int = 200, context_chars: int = 300) -> dict:
    """What the static page embeds: per cluster (largest first) its label, summary and first examples."""
    return {
        "meta": dict(meta_summary(view.meta)),
        "clusters": [
            {
                "id": cluster.cluster_id,
                "size": cluster.size,
                "label": cluster.label,
                "summary": top_tokens_summary(cluster),
                "examples": [
                    {k: v for k, v in _example_fields(example, context_chars).items() if k != "loss"}
                    for example in cluster.examples[:max_examples_per_cluster]
                ],
            }
            for cluster in view.clusters
        ],
    }


def write_html(
    clusters_dir: str | Path,
    output_path: str | Path,
    max_examples_per_cluster: int = 200,
    context_chars: int = 300,
) -> Path:
    """Write one static HTML page browsing the artifact in ``clusters_dir``; returns ``output_path``.

    The page needs no server and no network: CSS, JavaScript, the data (as JSON) and ``sizes.png`` (as a data
    URI) are inline. ←/→ or the prev/next buttons step through the clusters, largest first.
    """
    view = load_clusters(clusters_dir)
    output_path = Path(output_path)
    data = page_data(view, max_examples_per_cluster, context_chars)

    sizes_png = None
    if view.sizes_plot is not None:
        sizes_png = base64.b64encode(view.sizes_plot.read_bytes()).decode("ascii")
    page = (
        _templates()
        .get_template("page.html.j2")
        .render(
            model=view.meta.get("model", ""),
            fields=meta_summary(view.meta),
            sizes_png=sizes_png,
            clusters=view.clusters,
            data=data,
        )
    )
    write_text_atomic(output_path, page)
    logger.info("Wrote %s (%d clusters).", output_path, len(view.clusters))
    return output_path
