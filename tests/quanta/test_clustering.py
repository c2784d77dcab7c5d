"""Clustering: reproducible labels, recovery of planted groups, size ordering, power-law fit, errors, artifact."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch

from hfx.artifacts import save_safetensors_atomic
from hfx.quanta.clustering import ClusterConfig, cluster_tokens, power_law_fit, spectral_labels
from hfx.quanta.filters import FEATURES
from hfx.quanta.similarity import SIMILARITY_STAGE, angular_affinity
from hfx.stages import Stage, StageMismatch


def planted_similarity(sizes=(12, 7, 4), dim=32, noise=0.3, seed=0):
    """Unit vectors around one direction per group: their cosine matrix has planted clusters."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(len(sizes), dim, generator=generator), dim=1)
    rows, truth = [], []
    for group, size in enumerate(sizes):
        rows.append(centers[group] + noise * torch.randn(size, dim, generator=generator) / dim**0.5)
        truth += [group] * size
    vectors = torch.nn.functional.normalize(torch.cat(rows), dim=1)
    permutation = torch.randperm(len(truth), generator=generator)
    vectors = vectors[permutation]
    return (vectors @ vectors.t()).clamp(-1, 1), np.array(truth)[permutation.numpy()]


def test_angular_affinity_range():
    similarity = torch.tensor([[1.0, 0.0, -1.0]])
    torch.testing.assert_close(angular_affinity(similarity), torch.tensor([[1.0, 0.5, 0.0]]))


def test_clustering_recovers_planted_groups_ordered_by_size_and_is_reproducible():
    similarity, truth = planted_similarity()
    labels = spectral_labels(similarity, ClusterConfig(n_clusters=3, n_init=5, random_state=7))
    again = spectral_labels(similarity, ClusterConfig(n_clusters=3, n_init=5, random_state=7))
    assert np.array_equal(labels, again)
    # the planted group of 12 is cluster 0, of 7 cluster 1, of 4 cluster 2
    assert np.array_equal(labels, truth)
    assert np.bincount(labels).tolist() == [12, 7, 4]


def test_bad_cluster_counts_are_clear_errors():
    similarity, _ = planted_similarity(sizes=(3, 2))
    with pytest.raises(
        ValueError, match=r"n_clusters=5 must be smaller than the number of tokens kept \(5\)"
    ):
        spectral_labels(similarity, ClusterConfig(n_clusters=5))
    with pytest.raises(ValueError, match="n_clusters must be at least 2"):
        ClusterConfig(n_clusters=1)


def test_power_law_fit_recovers_the_exponent():
    ranks = np.arange(1, 31)
    sizes = np.round(500 * ranks**-1.3)
    fit = power_law_fit(list(sizes) + [0, 0])  # empty clusters are ignored
    assert abs(fit["exponent"] - 1.3) < 0.05 and fit["r2"] > 0.99


def test_cluster_artifact(tmp_path):
    similarity, truth = planted_similarity()
    n = len(truth)
    tokens = planted_tokens(truth, context="some <b>context</b>")
    write_similarity(tmp_path, torch.arange(n) * 10, similarity)
    out = cluster_tokens(tmp_path, tokens, ClusterConfig(3, 5, 0), {"model": "tiny", "dataset": "planted"})
    summary = json.loads((out / "clusters.json").read_text())
    assert summary["sizes"] == [12, 7, 4] and summary["n_tokens"] == n and summary["random_state"] == 0
    assert summary["top_tokens"][0] == [" tok0"]
    clusters = datasets.Dataset.from_parquet(str(out / "data" / "clusters.parquet"))
    assert clusters["cluster"] == truth.tolist()
    assert (out / "sizes.png").read_bytes()[:4] == b"\x89PNG"
    card = (out / "README.md").read_text()
    assert (
        "SpectralClustering(n_clusters=3, n_init=5, random_state=0)" in card
        and "data/clusters.parquet" in card
    )

    write_similarity(tmp_path, torch.arange(n), similarity, gradients="other")
    with pytest.raises(ValueError, match="does not match the kept tokens"):
        cluster_tokens(tmp_path, tokens, ClusterConfig(3, 5, 0), {})


def write_similarity(run, token_index, similarity, gradients="planted"):
    """A finished similarity stage in ``run``, as if made from gradients whose fingerprint is ``gradients``."""
    stage = Stage(run / "similarity", SIMILARITY_STAGE, {}, {"gradients": gradients})
    stage.begin()
    save_safetensors_atomic(
        {"token_index": token_index, "similarity": similarity}, run / "similarity" / "similarity.safetensors"
    )
    stage.finish()


def planted_tokens(truth, context="context"):
    return datasets.Dataset.from_list(
        [
            {
                "token_index": 10 * i,
                "window_id": i,
                "doc_id": 0,
                "position": 3,
                "token_id": int(g),
                "token": f" tok{g}",
                "context": context,
                "context_ids": [1, 2, 3],
                "loss_bits": 0.01,
            }
            for i, g in enumerate(truth)
        ],
        features=FEATURES,
    )


def test_the_clustering_is_a_stage(tmp_path, monkeypatch):
    """Reused for the same settings and inputs, refused for others (naming them), made again from a new matrix."""
    import hfx.quanta.clustering as clustering

    similarity, truth = planted_similarity()
    tokens = planted_tokens(truth)
    write_similarity(tmp_path, torch.arange(len(truth)) * 10, similarity)
    with pytest.raises(FileNotFoundError, match="no finished similarity"):
        (tmp_path / "similarity" / "hfx_stage_quanta-similarity.done").rename(tmp_path / "away")
        cluster_tokens(tmp_path, tokens, ClusterConfig(3, 5, 0), {})
    (tmp_path / "away").rename(tmp_path / "similarity" / "hfx_stage_quanta-similarity.done")

    calls = []
    real = clustering.spectral_labels
    monkeypatch.setattr(clustering, "spectral_labels", lambda *a: calls.append(a) or real(*a))
    out = cluster_tokens(tmp_path, tokens, ClusterConfig(3, 5, 0), {})
    first = (out / "data" / "clusters.parquet").read_bytes()
    assert cluster_tokens(tmp_path, tokens, ClusterConfig(3, 5, 0), {}) == out and len(calls) == 1  # reused
    with pytest.raises(StageMismatch, match=r"settings.n_clusters: 3 -> 4"):
        cluster_tokens(tmp_path, tokens, ClusterConfig(4, 5, 0), {})
    assert (out / "data" / "clusters.parquet").read_bytes() == first and len(calls) == 1
    cluster_tokens(tmp_path, tokens, ClusterConfig(4, 5, 0), {}, overwrite=True)
    assert len(calls) == 2 and json.loads((out / "clusters.json").read_text())["n_clusters"] == 4

    # the similarity made again (from other gradients): the clustering is made again, without --overwrite
    write_similarity(tmp_path, torch.arange(len(truth)) * 10, similarity, gradients="recomputed")
    cluster_tokens(tmp_path, tokens, ClusterConfig(4, 5, 0), {})
    assert len(calls) == 3
    # other kept tokens (same indices, other token ids): made again too
    cluster_tokens(
        tmp_path, tokens.map(lambda row: {"token_id": row["token_id"] + 1}), ClusterConfig(4, 5, 0), {}
    )
    assert len(calls) == 4
