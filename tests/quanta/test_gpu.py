"""Quanta on CUDA: a whole `hfx quanta run` (losses -> filter -> gradients -> similarity -> cluster -> view) with a
tiny random-weight Llama in float32 matches the same run on the CPU.

Stated tolerances (float32 on both devices; TF32 stays off, PyTorch's default for float32 matmuls):
  per-token losses           atol 1e-4 nats (rtol 1e-4)
  kept tokens                identical (every token passes the loss threshold, so rounding cannot change them)
  per-token gradient rows    cosine(CPU row, CUDA row) > 1 - 1e-4 (the projections are drawn on the CPU for both)
  gradient cosine similarity atol 1e-3
No download and no embedded model: the tokenizer is conftest's `tiny_tokenizer`, the model is built from a config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hfx.cli import main
from hfx.quanta.filters import load_tokens
from hfx.quanta.losses import load_losses
from hfx.quanta.similarity import gradient_shards, load_similarity
from tests.conftest import make_tiny_llama


def save_tiny_model(path: Path, tokenizer) -> Path:
    make_tiny_llama(tokenizer, layers=2, hidden=64, init_std=0.1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def quanta_run(out: Path, model_dir: Path, device: str) -> dict:
    main(
        ["quanta", "run", "--output_dir", str(out), "--model_name_or_path", str(model_dir)]
        + ["--device", device, "--dtype", "float32", "--dataset", "sklearn_descr"]
        + ["--context_length", "32", "--max_tokens", "1500", "--loss_windows_per_shard", "16"]
        + ["--loss_threshold_bits", "100", "--num_tokens", "64"]  # a random model: every candidate passes
        + ["--projection_dim", "32", "--gradient_batch_size", "16", "--gradient_tokens_per_shard", "32"]
        + ["--n_clusters", "4"]
    )
    return json.loads((out / "run.json").read_text())


def gradient_rows(out: Path) -> torch.Tensor:
    return torch.cat([load_file(str(path))["gradients"] for path in gradient_shards(out)])


def assert_same_run(cpu: Path, other: Path) -> None:
    """`other` reproduces the CPU run `cpu` within the tolerances stated above."""
    cpu_losses, other_losses = load_losses(cpu), load_losses(other)
    assert cpu_losses["input_ids"] == other_losses["input_ids"]
    for expected, actual in zip(cpu_losses["losses_nats"], other_losses["losses_nats"], strict=True):
        torch.testing.assert_close(
            torch.tensor(actual), torch.tensor(expected), atol=1e-4, rtol=1e-4, equal_nan=True
        )

    assert load_tokens(other)["token_index"] == load_tokens(cpu)["token_index"]
    expected, actual = gradient_rows(cpu), gradient_rows(other)
    assert expected.shape == actual.shape and expected.shape[0] == 64
    assert (expected * actual).sum(dim=1).min() > 1 - 1e-4

    cpu_index, cpu_similarity = load_similarity(cpu)
    other_index, other_similarity = load_similarity(other)
    assert torch.equal(cpu_index, other_index)
    torch.testing.assert_close(other_similarity, cpu_similarity, atol=1e-3, rtol=0)
    clusters = [json.loads((out / "clusters" / "clusters.json").read_text()) for out in (cpu, other)]
    assert clusters[0]["n_tokens"] == clusters[1]["n_tokens"] == 64


@pytest.mark.gpu
def test_a_quanta_run_on_cuda_matches_the_cpu(tmp_path, tiny_tokenizer):
    model_dir = save_tiny_model(tmp_path / "model", tiny_tokenizer)
    on_cpu = quanta_run(tmp_path / "cpu", model_dir, "cpu")
    on_cuda = quanta_run(tmp_path / "cuda", model_dir, "cuda")
    assert on_cpu["device"] == "cpu" and on_cuda["device"].startswith("cuda")
    assert on_cpu["dtype"] == on_cuda["dtype"] == "float32"
    assert_same_run(tmp_path / "cpu", tmp_path / "cuda")
