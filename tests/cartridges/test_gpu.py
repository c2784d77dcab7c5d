"""Cartridges on CUDA against the CPU: synthesize -> train -> evaluate with a tiny random-weight model.

The GPU test runs where CUDA is (the GPU check script, `benchmarks/gpu_check.sh`); the same stages run twice on the
CPU in CI, so the harness itself is tested everywhere. Random weights and a tokenizer trained on bundled text: the
GPU machine has neither network nor the embedded model.

Tolerances, fp32 on both devices (TF32 off, PyTorch's default for matmuls):
* teacher top-k log-probabilities of the same conversations: atol 1e-4;
* training losses of the same data: rtol 1e-3; trained cartridges: atol 1e-3;
* evaluation of the same cartridge: equal accuracy, answer log-perplexity atol 1e-3.
In bfloat16 on CUDA (the GPU default; the decode step replayed as CUDA graphs): every stage's values finite, the
teacher's re-scored top-k log-probabilities atol 0.1 + rtol 0.05 of the float32 CPU's, answer log-perplexities atol 0.1.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from hfx.cartridges.corpus import load_corpus
from hfx.cartridges.pipeline import evaluate_cartridge, train_cartridge
from hfx.cartridges.synthesis import SynthesisConfig, load_synthesis, rescore, synthesize
from hfx.cartridges.training import CartridgeTrainingArguments
from hfx.models import load_causal_lm
from tests.conftest import DATA, make_tiny_llama

CORPUS = "rcv1"
SYNTHESIS = SynthesisConfig(
    num_conversations=8,
    conversations_per_chunk=4,
    chunk_min_tokens=48,
    chunk_max_tokens=96,
    max_question_tokens=8,
    max_answer_tokens=8,
    top_k=8,
    continuation_fraction=0.0,  # generation is what differs between devices
)


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("cartridge-devices")
    # A large init scale keeps the random logits far apart, so top-k ids do not swap on rounding.
    make_tiny_llama(tiny_tokenizer, init_std=0.3).save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    questions = root / "questions.jsonl"
    questions.write_text(
        "\n".join((DATA / "questions" / f"{CORPUS}.jsonl").read_text().splitlines()[:6]) + "\n"
    )
    return root, str(root / "model"), questions


def run_stages(root, model_dir: str, questions, device: str, dataset=None, dtype: str = "float32") -> dict:
    """Synthesize, re-score, train and evaluate on ``device``; training and re-scoring read ``dataset`` when given
    (the other device's conversations), so that both devices score and learn the same data."""
    model, tokenizer = load_causal_lm(model_dir, device=device, dtype=dtype)
    assert {p.device.type for p in model.parameters()} == {torch.device(device).type}
    corpus = load_corpus(CORPUS, tokenizer)
    synthesized = synthesize(
        model, tokenizer, corpus, root / f"synthesis-{device}", SYNTHESIS, progress=False
    )
    dataset = synthesized if dataset is None else dataset
    row = dataset[0]
    conversations = [(row["messages"][0]["content"], row["input_ids"][row["answer_start"] :])]
    chunk = tokenizer.decode(tokenizer(corpus.text, add_special_tokens=False)["input_ids"][:96])
    ((top_ids, top_logprobs),) = rescore(model, tokenizer, chunk, conversations, top_k=4)
    del model

    args = CartridgeTrainingArguments(
        output_dir=str(root / f"cartridge-{device}"),
        max_steps=3,
        per_device_train_batch_size=4,
        num_virtual_tokens=16,
        model_dtype=dtype,
        use_cpu=device == "cpu",
        logging_steps=1,
        disable_tqdm=True,
        report_to=[],
    )
    cartridge = train_cartridge(CORPUS, dataset, args, model_name_or_path=model_dir)
    losses = [
        entry["loss"]
        for entry in json.loads((cartridge / "trainer_state.json").read_text())["log_history"]
        if "loss" in entry
    ]
    from safetensors.torch import load_file

    weights = load_file(cartridge / "adapter_model.safetensors")
    return {
        "synthesized": synthesized,
        "teacher_logprobs": torch.tensor(top_logprobs),
        "losses": losses,
        "weights": weights,
        "cartridge": cartridge,
    }


def evaluate_on(cartridge, model_dir, questions, device: str, dtype: str = "float32") -> dict:
    report = evaluate_cartridge(
        cartridge,
        CORPUS,
        questions,
        model_name_or_path=model_dir,
        throughput_batch=2,
        throughput_tokens=4,
        device=device,
        dtype=dtype,
    )
    assert report["device"].startswith(device) and report["dtype"] == dtype
    return {r["condition"]: r for r in report["results"]}


def compare(reference: dict, other: dict, reference_eval: dict, other_eval: dict) -> None:
    torch.testing.assert_close(other["teacher_logprobs"], reference["teacher_logprobs"], atol=1e-4, rtol=0)
    assert len(other["losses"]) == len(reference["losses"]) == 3
    torch.testing.assert_close(
        torch.tensor(other["losses"]), torch.tensor(reference["losses"]), rtol=1e-3, atol=0
    )
    for name, tensor in reference["weights"].items():
        torch.testing.assert_close(other["weights"][name], tensor, atol=1e-3, rtol=0)
    assert reference_eval.keys() == other_eval.keys()
    for name, result in reference_eval.items():
        assert other_eval[name]["accuracy"] == result["accuracy"], name
        assert other_eval[name]["answer_log_ppl"] == pytest.approx(result["answer_log_ppl"], abs=1e-3), name
        if name != "no context":  # decode throughput is timed after a prefix (device synchronized)
            assert other_eval[name]["decode_tokens_per_s"] > 0


def test_the_stages_are_deterministic_on_the_cpu(stage_inputs):
    """The harness of the GPU test, run twice on the CPU: the same inputs give the same results."""
    root, model_dir, questions = stage_inputs
    first = run_stages(root / "first", model_dir, questions, "cpu")
    second = run_stages(root / "second", model_dir, questions, "cpu", dataset=first["synthesized"])
    assert first["synthesized"]["input_ids"] == second["synthesized"]["input_ids"]
    evaluation = evaluate_on(first["cartridge"], model_dir, questions, "cpu")
    compare(first, second, evaluation, evaluate_on(second["cartridge"], model_dir, questions, "cpu"))


@pytest.mark.gpu
def test_cartridge_stages_on_cuda_match_the_cpu(stage_inputs):
    root, model_dir, questions = stage_inputs
    cpu = run_stages(root / "cpu", model_dir, questions, "cpu")
    cuda = run_stages(root / "cuda", model_dir, questions, "cuda", dataset=cpu["synthesized"])
    assert len(cuda["synthesized"]) == len(load_synthesis(root / "cuda" / "synthesis-cuda")) > 0
    compare(
        cpu,
        cuda,
        evaluate_on(cpu["cartridge"], model_dir, questions, "cpu"),
        evaluate_on(cpu["cartridge"], model_dir, questions, "cuda"),
    )


@pytest.mark.gpu
def test_cartridge_stages_in_bfloat16_on_cuda_are_finite_and_close_to_the_cpu(stage_inputs):
    root, model_dir, questions = stage_inputs
    cpu = run_stages(root / "cpu-ref", model_dir, questions, "cpu")
    cuda = run_stages(root / "cuda-bf16", model_dir, questions, "cuda", dtype="bfloat16")
    synthesized = cuda["synthesized"]
    assert len(synthesized) > 0
    assert all(torch.isfinite(torch.tensor(row)).all() for row in synthesized["topk_logprobs"])
    # the same conversation (the CPU's first) re-scored by each: the teacher's numbers agree to bfloat16 rounding
    rescored = run_stages(
        root / "cuda-bf16-same", model_dir, questions, "cuda", cpu["synthesized"], "bfloat16"
    )
    torch.testing.assert_close(rescored["teacher_logprobs"], cpu["teacher_logprobs"], atol=0.1, rtol=0.05)
    assert len(cuda["losses"]) == 3 and all(math.isfinite(loss) for loss in cuda["losses"])
    assert all(torch.isfinite(w).all() for w in cuda["weights"].values())
    reference = evaluate_on(cpu["cartridge"], model_dir, questions, "cpu")
    other = evaluate_on(cpu["cartridge"], model_dir, questions, "cuda", dtype="bfloat16")
    for name, result in reference.items():
        assert math.isfinite(other[name]["answer_log_ppl"]), name
        assert other[name]["answer_log_ppl"] == pytest.approx(result["answer_log_ppl"], abs=0.1), name
