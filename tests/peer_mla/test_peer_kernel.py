"""The PEER Triton kernel of hub_kernels/peer: values and gradients against `peer_experts_reference`, the
`kernels` build layout, and `kernelize` of a PeerMla model.

Triton picks compiled vs interpreted kernels when they are defined, so the numerical checks run in a separate
process (tests/peer_mla/kernel_peer_checks.py) with TRITON_INTERPRET=1, which runs the kernels on CPU tensors;
this module only asserts on the JSON it prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNEL_REPO = REPO_ROOT / "hub_kernels" / "peer"
CHECKS = Path(__file__).with_name("kernel_peer_checks.py")
MARKER = "PEER_RESULTS "

FP32_TOL = 1e-5  # max |kernel - reference| / max |reference|, reference in float64
BF16_TOL = 2e-2
GRADS = ("grad_hidden_states", "grad_expert_weights", "grad_down_proj", "grad_up_proj")


def run_checks(mode: str, interpret: bool) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(CHECKS), mode],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        pytest.fail(
            f"{CHECKS.name} {mode} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(lines[-1][len(MARKER) :])


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_checks("interpreter", interpret=True)


def result_of(results: dict, name: str) -> dict:
    result = results[name]
    if "error" in result:
        pytest.fail(f"check {name} raised:\n{result['error']}")
    return result


def test_build_layout():
    """The local repository resolves, for the `kernels` version installed here, to a noarch variant whose package
    is the torch-ext source tree (linked, not copied), and build.toml parses."""
    from kernels._rust import Build
    from kernels.resolver import resolve_local_kernel

    build = Build.open(KERNEL_REPO)
    assert sorted(str(b) for b in build.general.backends) == ["cpu", "cuda"]
    for variant, backend in (("torch-cpu", "cpu"), ("torch-cuda", "cuda")):
        package = KERNEL_REPO / "build" / variant / "peer"
        assert package.is_symlink() and package.resolve() == (KERNEL_REPO / "torch-ext" / "peer").resolve()
        metadata = json.loads((KERNEL_REPO / "build" / variant / "metadata.json").read_text())
        assert metadata["name"] == "peer" and metadata["backend"]["type"] == backend
    local = resolve_local_kernel(KERNEL_REPO, backend="cpu")
    assert local.variant_str == "torch-cpu"
    assert str(local.metadata.name) == "peer" and local.metadata.version == 1


def test_kernel_loads_under_interpreter(interpreter_results):
    assert interpreter_results["interpreted"] is True
    layout = result_of(interpreter_results, "layout")
    assert layout["name"] == "peer" and layout["variant"] in ("torch-cpu", "torch-cuda")


@pytest.mark.parametrize(
    "case",
    [
        "fp32_m1_gelu",
        "fp32_m1_relu",
        "fp32_m1_gelu_tanh",
        "fp32_m2_silu",
        "fp32_m2_gelu_tanh",
        "fp32_m2_identity_int32",
        "fp32_tiled_m2_gelu",
        "fp32_tiled_m1_relu",
        "compile",
    ],
)
def test_fp32_values_and_gradients(interpreter_results, case):
    result = result_of(interpreter_results, case)
    for key in ("out", *GRADS):
        assert result[key] < FP32_TOL, (case, key, result)


@pytest.mark.parametrize(
    "case, present",
    [
        ("fp32_m2_only_experts", ("grad_down_proj", "grad_up_proj")),
        ("fp32_m1_only_inputs", ("grad_hidden_states", "grad_expert_weights")),
    ],
)
def test_fp32_partial_gradients(interpreter_results, case, present):
    result = result_of(interpreter_results, case)
    assert set(present) == {key for key in GRADS if key in result}
    for key in ("out", *present):
        assert result[key] < FP32_TOL, (case, key, result)


@pytest.mark.parametrize("case", ["bf16_m1_gelu", "bf16_m2_silu"])
def test_bf16(interpreter_results, case):
    result = result_of(interpreter_results, case)
    assert result["out_dtype"] == "torch.bfloat16"
    for key in ("out", *GRADS):
        assert result[key] < BF16_TOL, (case, key, result)
        if key != "out":
            assert result[key + "_dtype"] == "torch.bfloat16"


def test_empty_batch(interpreter_results):
    result = result_of(interpreter_results, "empty")
    assert result == {"shape": [0, 32], "grad_down_zero": True}


def test_custom_op_registration(interpreter_results):
    result = result_of(interpreter_results, "opcheck")
    assert set(result.values()) == {"SUCCESS"}, result


def test_kernelize_peer_mla(interpreter_results):
    result = result_of(interpreter_results, "kernelize")
    assert result["num_peer_experts"] == 2
    assert all(result["replaced"]) and all(result["reference_untouched"])
    assert result["kernel_calls"] == {"forward": 2, "backward": 2}
    assert result["logits"] < FP32_TOL
    assert result["loss"] < 1e-5
    assert len(result["expert_grads"]) == 4 and not result["grad_errors_missing"]
    assert result["max_grad_error"] < 1e-4, result


def test_kernelize_modes(interpreter_results):
    result = result_of(interpreter_results, "kernelize_modes")
    assert all(result.values()), result


def test_pretraining_kernelizes_only_the_expert_banks(interpreter_results):
    result = result_of(interpreter_results, "pretrain_kernelize")
    assert result["choice"] == "triton" and result["swapped"] == 1 and result["activation_untouched"]
    assert result["loss"] < 1e-5 and result["max_grad_error"] < 1e-4, result


@pytest.fixture(scope="module")
def compiled_results() -> dict:
    return run_checks("no-interpreter", interpret=False)


def test_cpu_tensors_need_the_interpreter(compiled_results):
    assert compiled_results["interpreted"] is False
    assert "TRITON_INTERPRET=1" in compiled_results["cpu_call"]
    assert "Unknown expert activation" in compiled_results["bad_activation"]


def test_kernels_compile_for_cuda(compiled_results):
    """Ahead-of-time CUDA compilation (sm_90) of every kernel specialisation; runs without a GPU."""
    result = compiled_results["cuda_codegen"]
    if "error" in result and "ptxas" in result["error"].lower():
        pytest.skip("Triton's ptxas is not available")
    result = result_of(compiled_results, "cuda_codegen")
    assert result["compiled"] == 2 * (1 + 2 * 5 + 3)
    assert len(result["kernels"]) == 4
