"""Stage 5: spectral clustering of the gradient affinity, and the cluster-size power law.

`sklearn.cluster.SpectralClustering(affinity="precomputed")` on 1 - arccos(C)/pi with an explicit
`random_state`, so the same similarity gives the same labels. Clusters are renumbered by size (0 = largest) so
that labels are comparable across runs. The rank/frequency of cluster sizes is fitted with a power law
size ~ rank^-exponent (least squares in log-log), the paper's headline quantity.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np

from hfx.artifacts import save_figure_atomic, write_parquet_atomic
from hfx.atomic import write_text_atomic
from hfx.hub import render_card
from hfx.stages import Stage, dataset_fingerprint, stage_fingerprint

from .similarity import SIMILARITY_DIR, SIMILARITY_STAGE, angular_affinity, load_similarity

logger = logging.getLogger(__name__)

CLUSTERS_DIR = "clusters"
#: The stage (hfx.stages) of the clustering artifact, in ``<run>/clusters``.
CLUSTERS_STAGE = "quanta-clusters"
FEATURES = datasets.Features(
    {
        "token_index": datasets.Value("int64"),
        "doc_id": datasets.Value("int64"),
        "position": datasets.Value("int32"),
        "token_id": datasets.Value("int32"),
        "token": datasets.Value("string"),
        "context": datasets.Value("string"),
        "loss_bits": datasets.Value("float32"),
        "cluster": datasets.Value("int32"),
    }
)


@dataclass
class ClusterConfig:
    n_clusters: int = 40
    n_init: int = 10
    random_state: int = 0

    def __post_init__(self):
        if self.n_clusters < 2:
            raise ValueError(f"n_clusters must be at least 2, got {self.n_clusters}.")
        if self.n_init < 1:
            raise ValueError(f"n_init must be at least 1, got {self.n_init}.")


def spectral_labels(similarity, config: ClusterConfig) -> np.ndarray:
    """Cluster labels, renumbered so that cluster 0 is the largest (ties broken by first occurrence)."""
    from sklearn.cluster import SpectralClustering

    n = similarity.shape[0]
    if config.n_clusters >= n:
        raise ValueError(
            f"n_clusters={config.n_clusters} must be smaller than the number of tokens kept ({n}); "
            "lower --n_clusters or keep more tokens (--num_tokens, --loss_threshold_bits)."
        )
    affinity = angular_affinity(similarity).double().numpy()
    model = SpectralClustering(
        n_clusters=config.n_clusters,
        affinity="precomputed",
        n_init=config.n_init,
        random_state=config.random_state,
        assign_labels="kmeans",
    )
    labels = model.fit_predict(affinity)
    sizes = np.bincount(labels, minlength=config.n_clusters)
    first = {label: i for i, label in reversed(list(enumerate(labels)))}
    order = sorted(range(config.n_clusters), key=lambda c: (-sizes[c], first.get(c, n)))
    rename = np.empty(config.n_clusters, dtype=np.int64)
    rename[order] = np.arange(config.n_clusters)
    return rename[labels]


def power_law_fit(sizes) -> dict:
    """Fit size = C * rank^-exponent over the non-empty clusters (least squares on log size vs log rank)."""
    sizes = np.sort(np.asarray([s for s in sizes if s > 0], dtype=float))[::-1]
    if len(sizes) < 2:
        return {"exponent": float("nan"), "intercept": float("nan"), "r2": float("nan")}
    log_rank, log_size = np.log(np.arange(1, len(sizes) + 1)), np.log(sizes)
    slope, intercept = np.polyfit(log_rank, log_size, 1)
    residual = log_size - (slope * log_rank + intercept)
    total = ((log_size - log_size.mean()) ** 2).sum()
    r2 = 1.0 - (residual**2).sum() / total if total > 0 else float("nan")
    return {"exponent": float(-slope), "intercept": float(intercept), "r2": float(r2)}


def plot_sizes(sizes, fit: dict, output: Path, title: str) -> None:
    from matplotlib.figure import Figure

    ranked = np.sort(np.asarray(sizes))[::-1]
    ranks = np.arange(1, len(ranked) + 1)
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    ax.loglog(ranks[ranked > 0], ranked[ranked > 0], "o", ms=4, label="clusters")
    if np.isfinite(fit["exponent"]):
        ax.loglog(
            ranks,
            np.exp(fit["intercept"]) * ranks ** (-fit["exponent"]),
            "-",
            label=f"rank^-{fit['exponent']:.2f}",
        )
    ax.set_xlabel("cluster rank")
    ax.set_ylabel("tokens in cluster")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, output, dpi=110)


def cluster_tokens(
    output_dir: str | Path,
    tokens: datasets.Dataset,
    config: ClusterConfig,
    meta: dict,
    overwrite: bool = False,
) -> Path:
    """Cluster the tokens of `output_dir` and write the clustering artifact to `output_dir/clusters`.

    A stage (hfx.stages): the same settings on the same similarity matrix and tokens reuse the artifact; other
    settings are refused (``overwrite`` clusters again); a new matrix or other tokens cluster again."""
    token_index, similarity = load_similarity(output_dir)
    if token_index.tolist() != tokens["token_index"]:
        raise ValueError(
            f"{output_dir}: the similarity matrix does not match the kept tokens (different token_index); "
            "rerun `hfx quanta gradients` and `hfx quanta similarity` after `hfx quanta filter`."
        )
    out = Path(output_dir) / CLUSTERS_DIR
    stage = Stage(
        out,
        CLUSTERS_STAGE,
        asdict(config),
        {
            "similarity": stage_fingerprint(Path(output_dir) / SIMILARITY_DIR, SIMILARITY_STAGE),
            "tokens": dataset_fingerprint(tokens),
        },
    )
    if stage.begin(overwrite) == "done":
        if (out / "clusters.json").exists():
            return out
        stage.reopen()
    labels = spectral_labels(similarity, config)
    sizes = np.bincount(labels, minlength=config.n_clusters).tolist()
    fit = power_law_fit(sizes)
    rows = [
        {key: row[key] for key in FEATURES if key != "cluster"} | {"cluster": int(label)}
        for row, label in zip(tokens, labels, strict=True)
    ]
    write_parquet_atomic(rows, FEATURES, out / "data" / "clusters.parquet")
    summary = {
        **meta,
        **asdict(config),
        "n_tokens": len(rows),
        "sizes": sizes,
        "power_law": fit,
        "top_tokens": _top_tokens(rows, config.n_clusters),
    }
    write_text_atomic(out / "clusters.json", json.dumps(summary, indent=2))
    plot_sizes(sizes, fit, out / "sizes.png", f"{len(rows)} tokens, {config.n_clusters} clusters")
    render_card(
        "quanta_clusters_card.md",
        out / "README.md",
        card_kind="dataset",
        card_data={
            "tags": ["hfx", "quanta", "interpretability"],
            "configs": [{"config_name": "default", "data_files": "data/clusters.parquet"}],
        },
        summary=summary,
    )
    stage.finish()
    logger.info(
        "%d clusters; size power law exponent %.2f (r2 %.2f)", config.n_clusters, fit["exponent"], fit["r2"]
    )
    return out


def _top_tokens(rows: list[dict], n_clusters: int, k: int = 5) -> list[list[str]]:
    from collections import Counter

    counters = [Counter() for _ in range(n_clusters)]
    for row in rows:
        counters[row["cluster"]][row["token"]] += 1
    return [[token for token, _ in counter.most_common(k)] for counter in counters]
