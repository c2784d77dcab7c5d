"""The Consistency Lens on CUDA: dump -> train -> eval with a tiny random-weight Llama in float32 match the CPU.

Each stage is compared on the same inputs (float32 on both devices; TF32 stays off, PyTorch's default):
  dump   activations and top-k next-token log-probabilities (by rank)   atol 1e-4, rtol 1e-4
         top-k token ids                                                  >= 95% equal (near-ties may swap)
  train  from the CPU dump, the context warm-up steps (teacher-forced, no sampling): logged losses rtol 1e-3;
         the KL steps that follow (Gumbel noise comes from each device's own generator) run on CUDA, with the
         frozen model there too, and log a finite KL
  eval   the CPU-trained lens evaluated on each device: every KL atol 1e-4 + rtol 1e-3, FVEs atol 1e-3, and the
         same explanations
In bfloat16 on CUDA (the GPU default), against the float32 CPU dump: every value finite, activations and top-k
log-probabilities atol 0.1 + rtol 0.05, at least half the top-k ids in the same rank (a random model has near-ties;
bfloat16 on the CPU keeps 77%); training and evaluation in bfloat16 log and report finite values only.
No download and no embedded model: the tokenizer is conftest's `tiny_tokenizer`, the model is built from a config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hfx.cli import main
from hfx.lens.data import load_activations
from tests.conftest import make_tiny_llama

WARMUP_STEPS, STEPS = 3, 5


def save_tiny_model(path: Path, tokenizer) -> Path:
    make_tiny_llama(tokenizer, layers=3, hidden=64, init_std=0.1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def on(device: str, model_dir: Path, dtype: str = "float32") -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--device", device, "--dtype", dtype]


def dump(out: Path, model_dir: Path, device: str, dtype: str = "float32"):
    main(
        [
            "lens",
            "dump",
            "--output_dir",
            str(out),
            *on(device, model_dir, dtype),
            "--dataset",
            "sklearn_descr",
        ]
        + ["--layer", "1", "--context_length", "32", "--min_position", "4", "--max_examples", "48"]
        + ["--topk", "16", "--batch_size", "16"]
    )
    return load_activations(out)


def train(out: Path, activations: Path, model_dir: Path, device: str, dtype: str = "float32") -> list[dict]:
    # Trainer picks its own device: the CPU needs --use_cpu on a machine with a GPU.
    main(
        [
            "lens",
            "train",
            "--activations_dir",
            str(activations),
            *on(device, model_dir, dtype),
            "--output_dir",
            str(out),
        ]
        + ["--eval_examples", "8", "--explanation_length", "3", "--decoder_num_layers", "1"]
        + ["--context_warmup_steps", str(WARMUP_STEPS), "--max_steps", str(STEPS), "--save_steps", str(STEPS)]
        + [
            "--per_device_train_batch_size",
            "8",
            "--learning_rate",
            "1e-3",
            "--logging_steps",
            "1",
            "--seed",
            "0",
        ]
        + (["--use_cpu", "true"] if device == "cpu" else [])
    )
    state = json.loads((out / "trainer_state.json").read_text())  # the finished lens keeps its loss curve
    return [entry for entry in state["log_history"] if "loss" in entry]


def evaluate(
    out: Path, activations: Path, lens: Path, model_dir: Path, device: str, dtype: str = "float32"
) -> dict:
    main(
        [
            "lens",
            "eval",
            "--activations_dir",
            str(activations),
            *on(device, model_dir, dtype),
            "--eval_examples",
            "8",
        ]
        + ["--lens", str(lens), "--output", str(out)]
    )
    return json.loads(out.read_text())


def assert_same_dump(cpu, other, atol: float = 1e-4, rtol: float = 1e-4, same_ids: float = 0.95) -> None:
    assert cpu["input_ids"] == other["input_ids"]
    for column in ("activation", "reference_topk_logprobs"):
        values = torch.tensor(other[column])
        assert torch.isfinite(values).all(), column
        torch.testing.assert_close(values, torch.tensor(cpu[column]), atol=atol, rtol=rtol)
    equal = torch.tensor(other["reference_topk_ids"]) == torch.tensor(cpu["reference_topk_ids"])
    assert equal.float().mean() >= same_ids, equal.float().mean()


def assert_same_warmup(cpu: list[dict], other: list[dict]) -> None:
    assert len(cpu) == len(other) == STEPS
    for expected, actual in zip(cpu[:WARMUP_STEPS], other[:WARMUP_STEPS], strict=True):
        assert "kl" not in actual
        for key in ("loss", "context_ce"):
            assert math.isclose(actual[key], expected[key], rel_tol=1e-3, abs_tol=1e-5), (
                key,
                expected,
                actual,
            )
    assert all("kl" in entry and math.isfinite(entry["kl"]) for entry in other[WARMUP_STEPS:])


def assert_same_eval(cpu: dict, other: dict) -> None:
    assert other["examples"] == cpu["examples"] == 8 and other["layer"] == cpu["layer"] == 1
    for name, expected in cpu["kl"].items():
        assert abs(other["kl"][name] - expected) <= 1e-4 + 1e-3 * abs(expected), (name, expected, other["kl"])
    for key in ("fve", "fve_encoder_reading_context"):
        assert abs(other[key] - cpu[key]) <= 1e-3, (key, cpu[key], other[key])
    assert [s["explanation"] for s in other["samples"]] == [s["explanation"] for s in cpu["samples"]]


@pytest.mark.gpu
def test_lens_dump_train_eval_on_cuda_match_the_cpu(tmp_path, tiny_tokenizer):
    model_dir = save_tiny_model(tmp_path / "model", tiny_tokenizer)
    acts = tmp_path / "acts-cpu"
    assert_same_dump(dump(acts, model_dir, "cpu"), dump(tmp_path / "acts-cuda", model_dir, "cuda"))
    lens = tmp_path / "lens-cpu"
    assert_same_warmup(
        train(lens, acts, model_dir, "cpu"), train(tmp_path / "lens-cuda", acts, model_dir, "cuda")
    )
    assert_same_eval(
        evaluate(tmp_path / "eval-cpu.json", acts, lens, model_dir, "cpu"),
        evaluate(tmp_path / "eval-cuda.json", acts, lens, model_dir, "cuda"),
    )


def all_finite(value) -> bool:
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(all_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


@pytest.mark.gpu
def test_lens_in_bfloat16_on_cuda_is_finite_and_close_to_the_cpu(tmp_path, tiny_tokenizer):
    model_dir = save_tiny_model(tmp_path / "model", tiny_tokenizer)
    acts = tmp_path / "acts-cuda"
    cuda = dump(acts, model_dir, "cuda", dtype="bfloat16")
    assert_same_dump(dump(tmp_path / "acts-cpu", model_dir, "cpu"), cuda, atol=0.1, rtol=0.05, same_ids=0.5)
    logged = train(tmp_path / "lens", acts, model_dir, "cuda", dtype="bfloat16")
    assert len(logged) == STEPS and all_finite(logged)
    report = evaluate(tmp_path / "eval.json", acts, tmp_path / "lens", model_dir, "cuda", dtype="bfloat16")
    assert report["examples"] == 8 and all_finite(report["kl"]) and math.isfinite(report["fve"])
