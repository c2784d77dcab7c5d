"""PEER-MLA on CUDA: the Triton PEER kernel against the reference, pretraining steps with the kernel against the
PyTorch path, and absorbed against naive MLA decode in bf16.

Run by the GPU check script (`benchmarks/gpu_check.sh`); skipped without CUDA. Random-weight models built from
configs, token ids fed directly (one test goes through the pretraining command with its bundled data and trained
tokenizer): the GPU machine has no network and no model weights.

Tolerances (rel = max |actual - expected| / max |expected| per tensor; norm = ||actual - expected|| / ||expected||):
* Triton expert sum vs `peer_experts_reference` in float64 on the same (rounded) inputs, output and the four
  gradients: fp32 rel < 2e-5; bf16 rel < 2e-2; the model's PyTorch path on CUDA against the same reference too.
* Training steps, Triton-kernelized model vs the PyTorch path from the same weights and batches: first-step
  gradients of every parameter fp32 rel < 1e-4, bf16 autocast norm < 2e-2; losses of every step fp32 rtol 1e-3,
  bf16 autocast rtol 2e-2 (after the first update, near-tied expert choices may flip).
* MLA decode in bf16, absorbed vs naive, and each against the fp32 naive reference: logits norm < 3e-2 (about
  1e-2 is bf16 rounding), and absorbed no further from the fp32 reference than twice the naive path.
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import nullcontext

import pytest
import torch

from hfx.peer_mla.configuration_peer_mla import PeerMlaConfig
from hfx.peer_mla.modeling_peer_mla import PeerMlaForCausalLM, _PeerExpertsFunction, peer_experts_reference
from hfx.peer_mla.training import kernelize_peer_experts, peer_kernel_repository

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
#: Expert-sum test size: tokens (not a multiple of a block), hidden size, experts per token, experts.
EXPERT_SUM_SIZE = (1000, 384, 32, 16384)

KERNEL_FP32_TOL = 2e-5
KERNEL_BF16_TOL = 2e-2
STEP_GRAD_FP32_TOL = 1e-4
STEP_GRAD_BF16_TOL = 2e-2
STEP_LOSS_RTOL = {"fp32": 1e-3, "bf16": 2e-2}
DECODE_BF16_TOL = 3e-2
GRADS = ("hidden_states", "expert_weights", "down_proj", "up_proj")


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    scale = expected.double().abs().max().clamp_min(1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def norm_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().norm().clamp_min(1e-30)
    return ((actual.double() - expected.double()).norm() / scale).item()


# --- the Triton expert sum ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peer_kernel():
    from kernels import get_local_kernel

    kernel = get_local_kernel(peer_kernel_repository())
    assert not kernel._peer_triton._INTERPRETED, "TRITON_INTERPRET=1 is set: the kernel would not be compiled"
    return kernel


def expert_inputs(tokens, hidden, per_token, experts, expert_hidden, dtype, seed=0):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    hidden_states = torch.randn(tokens, hidden, generator=generator, device=DEVICE)
    indices = torch.randint(0, experts, (tokens, per_token), generator=generator, device=DEVICE)
    weights = torch.rand(tokens, per_token, generator=generator, device=DEVICE)
    down = torch.randn(experts, expert_hidden, hidden, generator=generator, device=DEVICE) * hidden**-0.5
    up = torch.randn(experts, expert_hidden, hidden, generator=generator, device=DEVICE) * hidden**-0.5
    grad = torch.randn(tokens, hidden, generator=generator, device=DEVICE)
    return hidden_states.to(dtype), indices, weights.to(dtype), down.to(dtype), up.to(dtype), grad.to(dtype)


def expert_sum_and_grads(function, hidden_states, indices, weights, down, up, grad, activation):
    """Output and the gradients wrt (hidden_states, expert_weights, down_proj, up_proj) of one expert sum."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden_states, weights, down, up)]
    out = function(leaves[0], indices, leaves[1], leaves[2], leaves[3], activation)
    return out.detach(), torch.autograd.grad(out, leaves, grad.to(out.dtype))


def expert_sum_errors(function, inputs, activation) -> dict[str, float]:
    """rel error of the output and of each gradient against the reference in float64 on the same inputs."""
    out, grads = expert_sum_and_grads(function, *inputs, activation)
    hidden_states, indices, weights, down, up, grad = inputs
    wide = [t.double() for t in (hidden_states, weights, down, up, grad)]
    expected, expected_grads = expert_sum_and_grads(
        peer_experts_reference, wide[0], indices, wide[1], wide[2], wide[3], wide[4], activation
    )
    assert out.dtype == hidden_states.dtype and all(g.dtype == hidden_states.dtype for g in grads)
    errors = {"out": rel(out, expected)}
    errors.update({name: rel(g, e) for name, g, e in zip(GRADS, grads, expected_grads, strict=True)})
    return errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("expert_hidden", "activation"), [(1, "gelu"), (2, "silu")])
def test_triton_expert_sum_matches_the_reference_forward_and_backward(
    peer_kernel, dtype, expert_hidden, activation
):
    inputs = expert_inputs(*EXPERT_SUM_SIZE, expert_hidden, dtype)
    errors = expert_sum_errors(peer_kernel.peer_experts, inputs, activation)
    assert max(errors.values()) < (KERNEL_FP32_TOL if dtype == torch.float32 else KERNEL_BF16_TOL), errors
    # The model's own PyTorch path (PeerExperts.forward: sampled matmul, embedding_bag, sparse @ dense) on CUDA.
    errors = expert_sum_errors(_PeerExpertsFunction.apply, inputs, activation)
    assert max(errors.values()) < (KERNEL_FP32_TOL if dtype == torch.float32 else KERNEL_BF16_TOL), errors


# --- pretraining steps --------------------------------------------------------------------------------------


def training_config() -> PeerMlaConfig:
    # PEER in the last layer only: the router of a PEER layer then sees identical inputs in both runs at the first
    # step, so first-step gradients can be compared elementwise (an earlier kernelized layer's rounding could flip
    # a near-tied expert choice downstream, a legitimate difference that is not the kernel's error).
    return PeerMlaConfig(
        vocab_size=512,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        kv_lora_rank=64,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        intermediate_size=256,
        peer_layers=[1],
        product_key_dim=[64, 64],
        peer_num_heads=4,
        num_experts_per_tok=8,
        peer_query_dim=64,
        attention_kernel="sdpa",
    )


def run_training_steps(model, batches, precision: str, device: torch.device) -> tuple[list[float], dict]:
    """Losses of every AdamW step on `batches`, and the gradients of the first one."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    losses, first_grads = [], None
    for batch in batches:
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if first_grads is None:
            first_grads = {
                name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None
            }
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, first_grads


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_steps_with_the_triton_kernel_follow_the_pytorch_path(precision):
    device = DEVICE
    torch.manual_seed(0)
    reference = PeerMlaForCausalLM(training_config()).to(device).train()
    kernelized = copy.deepcopy(reference)
    assert kernelize_peer_experts(kernelized, device) == 1
    generator = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randint(0, 512, (8, 128), generator=generator, device=device) for _ in range(4)]

    kernel_losses, kernel_grads = run_training_steps(kernelized, batches, precision, device)
    reference_losses, reference_grads = run_training_steps(reference, batches, precision, device)

    assert all(math.isfinite(loss) for loss in kernel_losses)
    assert kernel_losses == pytest.approx(reference_losses, rel=STEP_LOSS_RTOL[precision])
    assert set(kernel_grads) == set(reference_grads)
    assert any(name.endswith("experts.down_proj") for name in kernel_grads)
    if precision == "fp32":
        errors = {name: rel(kernel_grads[name], reference_grads[name]) for name in reference_grads}
        tolerance = STEP_GRAD_FP32_TOL
    else:
        errors = {name: norm_rel(kernel_grads[name], reference_grads[name]) for name in reference_grads}
        tolerance = STEP_GRAD_BF16_TOL
    worst = max(errors, key=errors.get)
    assert errors[worst] < tolerance, (worst, errors[worst])


def test_pretrain_on_cuda_kernelizes_the_experts_and_trains_in_bf16(tmp_path):
    """The pretraining command's defaults on a GPU: this process's GPU, bf16 autocast, Triton experts."""
    from transformers import AutoModelForCausalLM

    from hfx.peer_mla.training import pretrain
    from tests.peer_mla.test_training import parse, tiny_config

    output = tmp_path / "run"
    config = tiny_config(tmp_path, max_steps=3, eval_steps=3, save_steps=100, expert_log_freq=3)
    model_args, data_args, training_args = parse(config, "--output_dir", str(output))
    results = pretrain(model_args, data_args, training_args)

    assert (results["device"], results["precision"], results["peer_kernel"]) == ("cuda", "bfloat16", "triton")
    assert (
        results["steps"] == 3 and math.isfinite(results["train_loss"]) and math.isfinite(results["eval_loss"])
    )
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    assert any("experts/layer_1/used_fraction" in entry for entry in history)  # usage counted on the GPU
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # mixed precision: float32 weights saved


# --- MLA decode ---------------------------------------------------------------------------------------------


def decode_logits(model, prompt, tokens, mode: str) -> torch.Tensor:
    """Logits of decoding `tokens` one at a time after `prompt` (teacher-forced), attention path `mode`."""
    model.config.mla_absorb = "never"
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
        model.config.mla_absorb = mode
        steps = [
            model(tokens[:, i : i + 1], past_key_values=cache, use_cache=True).logits[:, -1]
            for i in range(tokens.shape[1])
        ]
    return torch.stack(steps, 1).float()


def test_absorbed_decode_matches_naive_in_bf16():
    device = DEVICE
    config = PeerMlaConfig(
        vocab_size=1024,
        hidden_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        intermediate_size=1024,
        peer_layers=None,
        max_position_embeddings=1024,
    )  # attention_kernel "auto": FlashMLA / flash-attn 3 when loadable here, SDPA otherwise (offline)
    torch.manual_seed(0)
    reference = PeerMlaForCausalLM(config).to(device).eval()
    model = copy.deepcopy(reference).to(torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randint(0, 1024, (4, 300), generator=generator, device=device)
    tokens = torch.randint(0, 1024, (4, 12), generator=generator, device=device)

    expected = decode_logits(reference, prompt, tokens, "never")
    naive = decode_logits(model, prompt, tokens, "never")
    absorbed = decode_logits(model, prompt, tokens, "always")
    errors = {
        "absorbed vs naive": norm_rel(absorbed, naive),
        "naive vs fp32": norm_rel(naive, expected),
        "absorbed vs fp32": norm_rel(absorbed, expected),
    }
    assert max(errors.values()) < DECODE_BF16_TOL, errors
    assert errors["absorbed vs fp32"] <= 2 * errors["naive vs fp32"], errors
