"""Quanta on CUDA: a whole `hfx quanta run` (losses -> filter -> gradients -> similarity -> cluster -> view) with a
tiny random-weight Llama in float32 matches the same run on the CPU.

Stated tolerances (float32 on both devices; TF32 stays off, PyTorch's default for float32 matmuls):
  per-token losses           atol 1e-4 nats (rtol 1e-4)
  kept tokens                identical (every token passes the loss threshold, so rounding cannot change them)
  per-token gradient rows    cosine(CPU row, CUDA row) > 1 - 1e-4 (exact gradients: a sketch's projections are drawn
                             on each device by its own generator; the sketch is compared with shared projections)
  gradient cosine similarity atol 1e-3
In bfloat16 on CUDA (the GPU default) against that float32 CPU run: every value finite (position 0 of a window,
which has no context, is the only NaN loss), losses atol 0.15 nats + rtol 0.02, gradient rows cosine > 0.9,
similarity atol 0.1.
No download and no embedded model: the tokenizer is conftest's `tiny_tokenizer`, the model is built from a config.
"""

from __future__ import annotations

import json
import math
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


def quanta_run(out: Path, model_dir: Path, device: str, dtype: str = "float32") -> dict:
    main(
        ["quanta", "run", "--output_dir", str(out), "--model_name_or_path", str(model_dir)]
        + ["--device", device, "--dtype", dtype, "--dataset", "sklearn_descr"]
        + ["--context_length", "32", "--max_tokens", "1500", "--loss_windows_per_shard", "16"]
        + ["--loss_threshold_bits", "100", "--num_tokens", "64"]  # a random model: every candidate passes
        + ["--projection_dim", "0", "--gradient_batch_size", "16", "--gradient_tokens_per_shard", "32"]
        + ["--n_clusters", "4"]
    )
    return json.loads((out / "run.json").read_text())


def gradient_rows(out: Path) -> torch.Tensor:
    return torch.cat([load_file(str(path))["gradients"] for path in gradient_shards(out)])


FP32 = dict(losses=dict(atol=1e-4, rtol=1e-4), cosine=1 - 1e-4, similarity=1e-3)
BF16 = dict(losses=dict(atol=0.15, rtol=0.02), cosine=0.9, similarity=0.1)


def assert_same_run(cpu: Path, other: Path, tolerance: dict = FP32) -> None:
    """`other` reproduces the CPU run `cpu` within the tolerances stated above."""
    cpu_losses, other_losses = load_losses(cpu), load_losses(other)
    assert cpu_losses["input_ids"] == other_losses["input_ids"]
    for expected, actual in zip(cpu_losses["losses_nats"], other_losses["losses_nats"], strict=True):
        assert math.isnan(actual[0]) and math.isnan(expected[0])  # position 0 has no context
        actual, expected = torch.tensor(actual[1:]), torch.tensor(expected[1:])
        assert torch.isfinite(actual).all()
        torch.testing.assert_close(actual, expected, **tolerance["losses"])

    assert load_tokens(other)["token_index"] == load_tokens(cpu)["token_index"]
    expected, actual = gradient_rows(cpu), gradient_rows(other)
    assert expected.shape == actual.shape and expected.shape[0] == 64
    assert torch.isfinite(actual).all()
    assert (expected * actual).sum(dim=1).min() > tolerance["cosine"]

    cpu_index, cpu_similarity = load_similarity(cpu)
    other_index, other_similarity = load_similarity(other)
    assert torch.equal(cpu_index, other_index)
    assert torch.isfinite(other_similarity).all()
    torch.testing.assert_close(other_similarity, cpu_similarity, atol=tolerance["similarity"], rtol=0)
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


@pytest.mark.gpu
def test_a_quanta_run_on_cuda_in_bfloat16_is_finite_and_close_to_the_cpu(tmp_path, tiny_tokenizer):
    model_dir = save_tiny_model(tmp_path / "model", tiny_tokenizer)
    on_cpu = quanta_run(tmp_path / "cpu", model_dir, "cpu")
    on_cuda = quanta_run(tmp_path / "cuda", model_dir, "cuda", dtype="bfloat16")
    assert on_cpu["dtype"] == "float32" and on_cuda["dtype"] == "bfloat16"
    assert_same_run(tmp_path / "cpu", tmp_path / "cuda", BF16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_sketch_on_cuda_matches_the_cpu_with_the_same_projections(tiny_tokenizer, dtype):
    from hfx.quanta.gradients import PerTokenGradients

    model = make_tiny_llama(tiny_tokenizer, layers=2, hidden=64, init_std=0.1)
    generator = torch.Generator().manual_seed(0)
    contexts = [torch.randint(5, 200, (n,), generator=generator).tolist() for n in (3, 9, 17, 1)]
    targets = [7, 8, 9, 10]
    on_cuda = PerTokenGradients(model.to("cuda", dtype), projection_dim=64, seed=0)
    assert on_cuda.spec.projection_device == "cuda"
    assert all(r.device.type == "cuda" for pair in on_cuda.projections.values() for r in pair)
    cuda_rows = on_cuda(contexts, targets).cpu()
    on_cpu = PerTokenGradients(model.to("cpu", torch.float32), projection_dim=64, seed=0)
    on_cpu.projections = {name: (a.cpu(), b.cpu()) for name, (a, b) in on_cuda.projections.items()}
    cpu_rows = on_cpu(contexts, targets)
    assert torch.isfinite(cuda_rows).all()
    cosine = torch.nn.functional.cosine_similarity(cuda_rows, cpu_rows, dim=1)
    assert cosine.min() > (1 - 1e-4 if dtype == torch.float32 else 0.9), cosine
