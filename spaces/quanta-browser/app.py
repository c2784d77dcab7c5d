"""Quanta browser: step through the clusters of a quanta clustering artifact, largest first.

Run locally with ``python app.py --artifact DIR [--port N]``; on a Space, set the variable ``QUANTA_ARTIFACT``
to a local path or a Hub dataset repo id. Loading and rendering come from ``hfx.quanta.viewer``.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import tempfile
from pathlib import Path

# Run locally, the Space sends Gradio no usage analytics unless asked (GRADIO_ANALYTICS_ENABLED=True).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from hfx.quanta.viewer import EXAMPLES_CSS, ClusterView, cluster_html, load_clusters, meta_html

logger = logging.getLogger("quanta-browser")

MAX_EXAMPLES = 200
CONTEXT_CHARS = 300

CSS = (
    EXAMPLES_CSS
    + """
#cluster-view { max-height: 70vh; overflow-y: auto; }
.quanta-title { margin: 4px 0; }
.quanta-summary { color: #374151; font-size: 13px; margin: 0 0 8px; }
"""
)

# ←/→ anywhere outside a text field step through the clusters, like the static page.
KEYS_JS = """
<script>
window.addEventListener("keydown", function (event) {
  if (event.altKey || event.ctrlKey || event.metaKey) return;
  const tag = event.target && event.target.tagName;
  if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") return;
  const id = event.key === "ArrowRight" ? "next" : event.key === "ArrowLeft" ? "prev" : null;
  const button = id && document.getElementById(id);
  if (button) { event.preventDefault(); button.click(); }
});
</script>
"""


def resolve_artifact(source: str) -> Path:
    """A local clustering artifact directory, or a Hub dataset repo id downloaded to the local cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        logger.info("%s is not a local path: downloading it as a Hub dataset repo.", source)
        return Path(snapshot_download(repo_id=source, repo_type="dataset"))
    raise FileNotFoundError(
        f"Clustering artifact {source} not found (neither a directory nor a dataset repo id)."
    )


def sizes_plot_path(view: ClusterView) -> str:
    """The artifact's ``sizes.png``, or the rank/frequency plot drawn now (log-log) when it has none."""
    if view.sizes_plot is not None:
        return str(view.sizes_plot)
    from matplotlib.figure import Figure

    sizes = sorted((size for size in view.meta["sizes"] if size > 0), reverse=True)
    figure = Figure(figsize=(5, 3.5), dpi=100)
    axes = figure.subplots()
    axes.loglog(range(1, len(sizes) + 1), sizes, marker="o", markersize=3, linewidth=1)
    axes.set_xlabel("cluster rank")
    axes.set_ylabel("tokens in cluster")
    exponent = view.meta["power_law"].get("exponent")
    if isinstance(exponent, (int, float)):
        axes.text(
            0.97, 0.95, f"power-law exponent {exponent:.3f}", transform=axes.transAxes, ha="right", va="top"
        )
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    path = Path(tempfile.mkdtemp(prefix="quanta-browser-")) / "sizes.png"
    figure.savefig(path)
    return str(path)


def build_app(view: ClusterView) -> gr.Blocks:
    """The Blocks UI for one loaded artifact."""

    def show(cluster_id):
        if cluster_id is None:
            return gr.skip()
        return cluster_html(view.cluster(int(cluster_id)), MAX_EXAMPLES, CONTEXT_CHARS)

    def step(cluster_id, offset: int):
        current = view.clusters[0].cluster_id if cluster_id is None else int(cluster_id)
        return view.neighbor(current, offset)

    def search(query: str):
        text = (query or "").strip()
        if not text:
            return gr.Radio(choices=[], value=None), ""
        hits = view.find_token(text)
        choices = [
            (f"cluster {cluster.cluster_id}: {count} of its {cluster.size}", cluster.cluster_id)
            for cluster, count in hits
        ]
        if not hits:
            status = f"no cluster contains “{html.escape(text)}”"
        elif len(hits) == 1:
            status = f"1 cluster contains “{html.escape(text)}”"
        else:
            status = f"{len(hits)} clusters contain “{html.escape(text)}”"
        return gr.Radio(choices=choices, value=None), status

    def jump(cluster_id):
        return gr.skip() if cluster_id is None else int(cluster_id)

    first = view.clusters[0]
    with gr.Blocks(title=f"Quanta browser — {view.meta.get('model', '')}") as demo:
        gr.HTML(f"<h2>Quanta clusters</h2><p>{meta_html(view.meta)}</p>", elem_id="meta")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row(equal_height=True):
                    prev_button = gr.Button("◀ prev", elem_id="prev", scale=0, min_width=90)
                    select = gr.Dropdown(
                        choices=[(cluster.label, cluster.cluster_id) for cluster in view.clusters],
                        value=first.cluster_id,
                        label="cluster (largest first; ← / → step)",
                        elem_id="cluster-select",
                        scale=4,
                    )
                    next_button = gr.Button("next ▶", elem_id="next", scale=0, min_width=90)
                examples = gr.HTML(cluster_html(first, MAX_EXAMPLES, CONTEXT_CHARS), elem_id="cluster-view")
            with gr.Column(scale=2):
                query = gr.Textbox(label="find a token", placeholder="e.g. self", elem_id="token-search")
                status = gr.HTML(elem_id="search-status")
                results = gr.Radio(choices=[], label="clusters containing it", elem_id="search-results")
                gr.Image(
                    sizes_plot_path(view),
                    type="filepath",
                    interactive=False,
                    label="cluster sizes (rank / frequency)",
                    elem_id="sizes-plot",
                )

        select.change(show, select, examples)
        prev_button.click(lambda cluster_id: step(cluster_id, -1), select, select)
        next_button.click(lambda cluster_id: step(cluster_id, 1), select, select)
        query.change(search, query, [results, status])
        results.input(jump, results, select)
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--artifact",
        default=os.environ.get("QUANTA_ARTIFACT"),
        help="clustering artifact: a local directory or a Hub dataset repo id (default: $QUANTA_ARTIFACT)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        help="port (default: $GRADIO_SERVER_PORT or 7860)",
    )
    args = parser.parse_args(argv)
    if not args.artifact:
        parser.error("no clustering artifact: pass --artifact DIR or set QUANTA_ARTIFACT")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    artifact = resolve_artifact(args.artifact)
    view = load_clusters(artifact)
    demo = build_app(view)
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=args.port,
        css=CSS,
        head=KEYS_JS,
        ssr_mode=False,
        allowed_paths=[str(artifact)],
    )


if __name__ == "__main__":
    main()
