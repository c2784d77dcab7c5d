"""Numerical and integration checks of the PEER Triton kernel (hub_kernels/peer), run in a fresh interpreter.

Triton decides at import time whether kernels are compiled or interpreted, so these checks run in their own
process (started by test_peer_kernel.py) with TRITON_INTERPRET=1 in the environment, which executes the kernels
on CPU tensors. Usage:

    TRITON_INTERPRET=1 python tests/peer_mla/kernel_peer_checks.py interpreter
    python tests/peer_mla/kernel_peer_checks.py no-interpreter
    TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 HF_HUB_CACHE=... python tests/peer_mla/kernel_peer_checks.py hub-cache REPO_ID

    TRITON_INTERPRET=1 /path/to/fresh-venv/bin/python tests/peer_mla/kernel_peer_checks.py installed

(hub-cache: the kernel repository REPO_ID must be in that Hub cache, as `kernels.get_kernel` leaves it; it runs in
a process of its own, since huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported.
installed: run by the python of a venv that holds hfx installed from its wheel.)

Prints one line `PEER_RESULTS <json>`: per check either its measurements or {"error": traceback}.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNEL_REPO = REPO_ROOT / "hub_kernels" / "peer"
MARKER = "PEER_RESULTS "


def load_kernel():
    from kernels import get_local_kernel

    return get_local_kernel(KERNEL_REPO)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 for empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    scale = expected.double().abs().max().clamp_min(1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def make_inputs(N, D, K, E, M, dtype=torch.float32, index_dtype=torch.int64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen)
    idx = torch.randint(0, E, (N, K), generator=gen).to(index_dtype)
    w = torch.rand(N, K, generator=gen)
    down = torch.randn(E, M, D, generator=gen) * D**-0.5
    up = torch.randn(E, M, D, generator=gen)
    grad = torch.randn(N, D, generator=gen)
    return x.to(dtype), idx, w.to(dtype), down.to(dtype), up.to(dtype), grad.to(dtype)


def reference(x, idx, w, down, up, grad, activation, requires=(True, True, True, True)):
    """Output and gradients of the plain reference, computed in float64 from the same (rounded) inputs."""
    from hfx.peer_mla.modeling_peer_mla import peer_experts_reference

    leaves = [t.detach().double().requires_grad_(r) for t, r in zip((x, w, down, up), requires, strict=True)]
    out = peer_experts_reference(leaves[0], idx.long(), leaves[1], leaves[2], leaves[3], activation)
    wanted = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad.double()) if wanted else ())
    return out.detach(), [next(grads) if t.requires_grad else None for t in leaves]


GRAD_NAMES = ("grad_hidden_states", "grad_expert_weights", "grad_down_proj", "grad_up_proj")


def check_autograd_case(
    kernel,
    N,
    D,
    K,
    E,
    M,
    activation,
    dtype=torch.float32,
    index_dtype=torch.int64,
    requires=(True, True, True, True),
):
    x, idx, w, down, up, grad = make_inputs(N, D, K, E, M, dtype, index_dtype)
    leaves = [t.clone().requires_grad_(r) for t, r in zip((x, w, down, up), requires, strict=True)]
    out = kernel.peer_experts(leaves[0], idx, leaves[1], leaves[2], leaves[3], activation)
    wanted = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
    got = [next(grads) if t.requires_grad else None for t in leaves]
    ref_out, ref_grads = reference(x, idx, w, down, up, grad, activation, requires)
    result = {"out": rel_err(out, ref_out), "out_dtype": str(out.dtype)}
    for name, g, r in zip(GRAD_NAMES, got, ref_grads, strict=True):
        if r is not None:
            result[name] = rel_err(g, r)
            result[name + "_dtype"] = str(g.dtype)
    return result


def check_tiled_case(kernel, N, D, K, E, M, activation, block_n, block_d):
    """Calls the launchers directly with small tiles, so that D spans several (partial) BLOCK_D tiles."""
    impl = kernel._peer_triton
    x, idx, w, down, up, grad = make_inputs(N, D, K, E, M)
    out, pre = impl._forward_impl(x, idx, w, down, up, activation, block_n=block_n, block_d=block_d)
    grads = impl._backward_impl(grad, x, idx, w, down, up, pre, activation, block_n=block_n, block_d=block_d)
    ref_out, ref_grads = reference(x, idx, w, down, up, grad, activation)
    result = {"out": rel_err(out, ref_out), "pre_shape": list(pre.shape)}
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        result[name] = rel_err(g, r)
    return result


def check_empty(kernel):
    x = torch.zeros(0, 32, requires_grad=True)
    down = torch.randn(8, 1, 32, requires_grad=True)
    up = torch.randn(8, 1, 32, requires_grad=True)
    w = torch.zeros(0, 4, requires_grad=True)
    out = kernel.peer_experts(x, torch.zeros(0, 4, dtype=torch.long), w, down, up, "gelu")
    out.sum().backward()
    return {"shape": list(out.shape), "grad_down_zero": bool((down.grad == 0).all())}


def check_compile(kernel):
    x, idx, w, down, up, grad = make_inputs(29, 40, 8, 64, 2)
    leaves = [t.clone().requires_grad_() for t in (x, w, down, up)]
    fn = torch.compile(
        lambda a, b, c, d: kernel.peer_experts(a, idx, b, c, d, "silu"), backend="aot_eager", fullgraph=True
    )
    out = fn(*leaves)
    got = torch.autograd.grad(out, leaves, grad)
    ref_out, ref_grads = reference(x, idx, w, down, up, grad, "silu")
    result = {"out": rel_err(out, ref_out)}
    for name, g, r in zip(GRAD_NAMES, got, ref_grads, strict=True):
        result[name] = rel_err(g, r)
    return result


def check_opcheck(kernel):
    x, idx, w, down, up, _ = make_inputs(20, 32, 4, 16, 2)
    args = (x.requires_grad_(), idx, w.requires_grad_(), down.requires_grad_(), up.requires_grad_(), "gelu")
    return {k: str(v) for k, v in torch.library.opcheck(kernel._peer_triton._peer_experts_fwd, args).items()}


def tiny_model_config():
    from hfx.peer_mla.configuration_peer_mla import PeerMlaConfig

    return PeerMlaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        intermediate_size=64,
        product_key_dim=[8, 8],
        peer_num_heads=2,
        num_experts_per_tok=4,
        peer_query_dim=16,
    )


def peer_expert_modules(model):
    from hfx.peer_mla.modeling_peer_mla import PeerExperts

    return [m for m in model.modules() if isinstance(m, PeerExperts)]


def kernel_mapping(modes=None):
    from kernels import LocalLayerRepository

    repo = LocalLayerRepository(repo_path=KERNEL_REPO, layer_name="PeerExperts")
    entry = repo if modes is None else dict.fromkeys(modes, repo)
    return {"PeerExperts": {"cuda": entry, "cpu": entry}}


def check_kernelize(kernel):
    from kernels import Mode, kernelize, use_kernel_mapping

    from hfx.peer_mla.modeling_peer_mla import PeerExperts, PeerMlaForCausalLM

    torch.manual_seed(0)
    reference_model = PeerMlaForCausalLM(tiny_model_config()).train()
    model = copy.deepcopy(reference_model)
    with use_kernel_mapping(kernel_mapping()):
        model = kernelize(model, mode=Mode.TRAINING, device="cpu", use_fallback=False)

    layer_cls = kernel.layers.PeerExperts
    experts = peer_expert_modules(model)
    replaced = [getattr(m.forward, "__func__", None) is layer_cls.forward for m in experts]
    untouched = [
        "forward" not in m.__dict__ and type(m).forward is PeerExperts.forward
        for m in peer_expert_modules(reference_model)
    ]

    # Count launches of the Triton path while the kernelized model runs.
    impl = kernel._peer_triton
    calls = {"forward": 0, "backward": 0}
    original = impl._forward_impl, impl._backward_impl

    def counted_forward(*args, **kwargs):
        calls["forward"] += 1
        return original[0](*args, **kwargs)

    def counted_backward(*args, **kwargs):
        calls["backward"] += 1
        return original[1](*args, **kwargs)

    impl._forward_impl, impl._backward_impl = counted_forward, counted_backward
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 64, (2, 8), generator=gen)
    try:
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
    finally:
        impl._forward_impl, impl._backward_impl = original
    ref = reference_model(input_ids=input_ids, labels=input_ids)
    ref.loss.backward()

    grad_errors = {}
    ref_params = dict(reference_model.named_parameters())
    for name, param in model.named_parameters():
        ref_grad = ref_params[name].grad
        if ref_grad is None and param.grad is None:
            continue
        grad_errors[name] = rel_err(param.grad, ref_grad)
    expert_grad_names = [n for n in grad_errors if n.endswith(("down_proj", "up_proj"))]
    return {
        "num_peer_experts": len(experts),
        "replaced": replaced,
        "reference_untouched": untouched,
        "kernel_calls": calls,
        "logits": rel_err(out.logits, ref.logits),
        "loss": abs(out.loss.item() - ref.loss.item()),
        "max_grad_error": max(grad_errors.values()),
        "worst_grad": max(grad_errors, key=grad_errors.get),
        "num_grads": len(grad_errors),
        "expert_grads": expert_grad_names,
        "grad_errors_missing": sorted(set(ref_params) - set(grad_errors)),
    }


def check_kernelize_modes(kernel):
    """Which forward each kernelize mode installs (the layer declares has_backward and can_torch_compile)."""
    from kernels import Mode, kernelize, use_kernel_mapping

    from hfx.peer_mla.modeling_peer_mla import PeerMlaForCausalLM

    torch.manual_seed(0)
    base = PeerMlaForCausalLM(tiny_model_config())
    layer_cls = kernel.layers.PeerExperts
    result = {}
    modes = {
        "inference": Mode.INFERENCE,
        "training": Mode.TRAINING,
        "training_compile": Mode.TRAINING | Mode.TORCH_COMPILE,
        "inference_compile": Mode.INFERENCE | Mode.TORCH_COMPILE,
    }
    for label, mode in modes.items():
        model = copy.deepcopy(base)
        with use_kernel_mapping(kernel_mapping(), inherit_mapping=False):
            kernelize(model, mode=mode, device="cpu", use_fallback=False)
        result[label] = all(m.forward.__func__ is layer_cls.forward for m in peer_expert_modules(model))
    # Mode-keyed mapping: registered only for training, so an inference kernelize also picks it (fallback
    # priority INFERENCE -> ... -> TRAINING).
    model = copy.deepcopy(base)
    with use_kernel_mapping(kernel_mapping(modes=[Mode.TRAINING]), inherit_mapping=False):
        kernelize(model, mode=Mode.INFERENCE, device="cpu", use_fallback=False)
    result["mode_keyed_training_used_for_inference"] = all(
        m.forward.__func__ is layer_cls.forward for m in peer_expert_modules(model)
    )
    return result


def check_pretrain_kernelize():
    """hfx.peer_mla.training.kernelize_peer_experts, as pretraining calls it, on a model with a dense SwiGLU layer
    beside the PEER one (transformers' activations are hub-decorated too and must be left alone)."""
    from hfx.peer_mla.modeling_peer_mla import PeerMlaForCausalLM
    from hfx.peer_mla.training import choose_peer_kernel, kernelize_peer_experts

    torch.manual_seed(0)
    config = tiny_model_config()
    config.peer_layers = [1]
    reference_model = PeerMlaForCausalLM(config).train()
    model = copy.deepcopy(reference_model)
    swapped = kernelize_peer_experts(model, "cpu", KERNEL_REPO)
    input_ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    ref = reference_model(input_ids=input_ids, labels=input_ids)
    ref.loss.backward()
    ref_params = dict(reference_model.named_parameters())
    errors = {name: rel_err(p.grad, ref_params[name].grad) for name, p in model.named_parameters()}
    act_fn = model.model.layers[0].mlp.act_fn
    return {
        "choice": choose_peer_kernel("triton", torch.device("cpu")),
        "swapped": swapped,
        "activation_untouched": "forward" not in act_fn.__dict__,
        "loss": abs(out.loss.item() - ref.loss.item()),
        "max_grad_error": max(errors.values()),
    }


def check_layout():
    from kernels._rust import Build
    from kernels.resolver import resolve_local_kernel

    local = resolve_local_kernel(KERNEL_REPO, backend=None)
    build = Build.open(KERNEL_REPO)
    return {
        "variant": local.variant_str,
        "name": str(local.metadata.name),
        "id": local.metadata.id,
        "version": local.metadata.version,
        "build_backends": sorted(str(b) for b in build.general.backends),
    }


def run_interpreter_checks() -> dict:
    kernel = load_kernel()
    results: dict = {"interpreted": bool(kernel._peer_triton._INTERPRETED), "module": kernel.__name__}
    checks = {
        "layout": check_layout,
        # m = 1 and m = 2, every activation, token counts that are not multiples of BLOCK_N.
        "fp32_m1_gelu": lambda: check_autograd_case(kernel, 37, 48, 8, 64, 1, "gelu"),
        "fp32_m1_relu": lambda: check_autograd_case(kernel, 37, 48, 8, 64, 1, "relu"),
        "fp32_m1_gelu_tanh": lambda: check_autograd_case(kernel, 16, 32, 8, 64, 1, "gelu_tanh"),
        "fp32_m2_silu": lambda: check_autograd_case(kernel, 24, 64, 8, 64, 2, "silu"),
        "fp32_m2_gelu_tanh": lambda: check_autograd_case(kernel, 24, 40, 8, 64, 2, "gelu_tanh"),
        "fp32_m2_identity_int32": lambda: check_autograd_case(
            kernel, 24, 32, 8, 64, 2, "identity", index_dtype=torch.int32
        ),
        # Gradients for a subset of the inputs (the other kernels paths are compiled out).
        "fp32_m2_only_experts": lambda: check_autograd_case(
            kernel, 24, 32, 8, 64, 2, "gelu", requires=(False, False, True, True)
        ),
        "fp32_m1_only_inputs": lambda: check_autograd_case(
            kernel, 24, 32, 8, 64, 1, "silu", requires=(True, True, False, False)
        ),
        # D spanning several BLOCK_D tiles, the last one partial.
        "fp32_tiled_m2_gelu": lambda: check_tiled_case(kernel, 21, 80, 8, 64, 2, "gelu", 8, 32),
        "fp32_tiled_m1_relu": lambda: check_tiled_case(kernel, 21, 72, 8, 64, 1, "relu", 16, 16),
        "bf16_m1_gelu": lambda: check_autograd_case(kernel, 32, 64, 8, 64, 1, "gelu", dtype=torch.bfloat16),
        "bf16_m2_silu": lambda: check_autograd_case(kernel, 32, 64, 8, 64, 2, "silu", dtype=torch.bfloat16),
        "empty": lambda: check_empty(kernel),
        "compile": lambda: check_compile(kernel),
        "opcheck": lambda: check_opcheck(kernel),
        "kernelize": lambda: check_kernelize(kernel),
        "kernelize_modes": lambda: check_kernelize_modes(kernel),
        "pretrain_kernelize": check_pretrain_kernelize,
    }
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    return results


def check_cuda_codegen(kernel, capability: int = 90) -> dict:
    """Compiles every kernel (all activations, both dtypes, every gradient subset) to a CUDA binary ahead of
    time; needs no GPU, only the ptxas that ships with Triton. Catches what the interpreter does not check
    (types, constexpr branches, lowering)."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    impl = kernel._peer_triton
    target = GPUTarget("cuda", capability, 32)
    compiled = []

    def build(fn, signature, constexprs):
        signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        triton_compile(ASTSource(fn, signature, constexprs), target=target, options={"num_warps": 4})
        compiled.append(fn.__name__)

    ints = dict.fromkeys(("N", "K", "M", "D"), "i32")
    blocks = {"BLOCK_N": 16, "BLOCK_D": 128}
    for dt in ("fp32", "bf16"):
        build(
            impl._peer_rowdot_kernel,
            {"vec_ptr": f"*{dt}", "idx_ptr": "*i64", "bank_ptr": f"*{dt}", "dots_ptr": "*fp32", **ints},
            blocks,
        )
        for act in range(len(impl.ACTIVATIONS)):
            build(
                impl._peer_fwd_out_kernel,
                {
                    "idx_ptr": "*i64",
                    "w_ptr": f"*{dt}",
                    "pre_ptr": "*fp32",
                    "up_ptr": f"*{dt}",
                    "out_ptr": f"*{dt}",
                }
                | ints,
                {"ACT": act, **blocks},
            )
            build(
                impl._peer_bwd_coef_kernel,
                {
                    "w_ptr": f"*{dt}",
                    "pre_ptr": "*fp32",
                    "gu_ptr": "*fp32",
                    "gw_ptr": f"*{dt}",
                    "NK": "i32",
                    "M": "i32",
                },
                {"ACT": act, "NEED_W": True, "BLOCK": 256},
            )
        rows = {
            "x_ptr": f"*{dt}",
            "g_ptr": f"*{dt}",
            "idx_ptr": "*i64",
            "w_ptr": f"*{dt}",
            "pre_ptr": "*fp32",
            "gpre_ptr": "*fp32",
            "down_ptr": f"*{dt}",
            "gx_ptr": f"*{dt}",
            "gdown_ptr": "*fp32",
            "gup_ptr": "*fp32",
            **ints,
        }
        for need_x, need_down, need_up in ((True, True, True), (False, True, True), (True, False, False)):
            flags = {"NEED_X": need_x, "NEED_DOWN": need_down, "NEED_UP": need_up}
            build(impl._peer_bwd_rows_kernel, rows, {"ACT": 2, **flags, **blocks})
    return {"compiled": len(compiled), "kernels": sorted(set(compiled))}


def run_no_interpreter_checks() -> dict:
    """Without the interpreter the kernels are compiled for a GPU: CPU tensors must be refused clearly, and the
    kernels must compile for CUDA."""
    kernel = load_kernel()
    results: dict = {"interpreted": bool(kernel._peer_triton._INTERPRETED)}
    try:
        results["cuda_codegen"] = check_cuda_codegen(kernel)
    except Exception:
        results["cuda_codegen"] = {"error": traceback.format_exc()}
    x, idx, w, down, up, _ = make_inputs(4, 16, 2, 8, 1)
    try:
        kernel.peer_experts(x, idx, w, down, up, "gelu")
        results["cpu_call"] = "no error"
    except RuntimeError as err:
        results["cpu_call"] = str(err)
    try:
        kernel.peer_experts(x, idx, w, down, up, "swish")
        results["bad_activation"] = "no error"
    except ValueError as err:
        results["bad_activation"] = str(err)
    return results


def compare_training_step(model, reference_model) -> dict:
    """Loss, logits and every gradient of one training step of ``model`` against ``reference_model``."""
    input_ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    ref = reference_model(input_ids=input_ids, labels=input_ids)
    ref.loss.backward()
    ref_params = dict(reference_model.named_parameters())
    errors = {name: rel_err(p.grad, ref_params[name].grad) for name, p in model.named_parameters()}
    return {
        "logits": rel_err(out.logits, ref.logits),
        "loss": abs(out.loss.item() - ref.loss.item()),
        "max_grad_error": max(errors.values()),
    }


def expert_forwards(model) -> list[str]:
    """Per PEER expert bank: the file its forward comes from ("own" when it is the model's own forward)."""
    banks = [m for m in model.modules() if type(m).__name__ == "PeerExperts"]
    return [
        "own" if m.forward.__func__ is type(m).forward else inspect.getfile(m.forward.__func__) for m in banks
    ]


def from_hub_cache(files: list[str]) -> bool:
    cache = Path(os.environ["HF_HUB_CACHE"]).resolve()
    return bool(files) and all(Path(f).resolve().is_relative_to(cache) for f in files)


def run_hub_cache_checks(repo_id: str) -> dict:
    """A model folder whose config names the kernel repository ``repo_id``, loaded with trust_remote_code (its own
    exported code, not hfx's) and kernelized from the Hub cache, offline: by its kernelize_peer_experts method and
    by transformers' use_kernels; at a revision; and a repository that is not cached."""
    from transformers import AutoModelForCausalLM

    from hfx.peer_mla.modeling_peer_mla import PeerMlaForCausalLM

    torch.manual_seed(0)
    config = tiny_model_config()
    config.peer_kernel_repo = repo_id
    folder = Path(tempfile.mkdtemp(prefix="peer-hub-model-"))
    PeerMlaForCausalLM(config).save_pretrained(folder / "model")

    def load(**kwargs):
        model = AutoModelForCausalLM.from_pretrained(folder / "model", trust_remote_code=True, **kwargs)
        return model, AutoModelForCausalLM.from_pretrained(folder / "model", trust_remote_code=True)

    def kernelize_method():
        model, reference = load()
        model.train(), reference.train()
        swapped = model.kernelize_peer_experts(device="cpu")
        files = expert_forwards(model)
        return {
            "config": [model.config.peer_kernel_repo, model.config.peer_kernel_revision],
            "model_module": type(model).__module__,
            "swapped": swapped,
            "from_hub_cache": from_hub_cache(files),
            "layer_file": Path(files[0]).name,
            **compare_training_step(model, reference),
        }

    def use_kernels():
        model, reference = load(use_kernels=True)
        files = expert_forwards(model)
        input_ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            logits = rel_err(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits)
        return {"training": model.training, "from_hub_cache": from_hub_cache(files), "logits": logits}

    def at_revision():
        model, _ = load()
        model.config.peer_kernel_revision = "v1"
        return {
            "swapped": model.kernelize_peer_experts(device="cpu"),
            "from_hub_cache": from_hub_cache(expert_forwards(model)),
        }

    def not_cached():
        model, _ = load()
        model.config.peer_kernel_repo = "hfx-test/not-cached"
        try:
            model.kernelize_peer_experts(device="cpu")
            raised = "no error"
        except Exception as err:  # noqa: BLE001 - reported to the test
            raised = f"{type(err).__name__}: {err}"
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger(type(model).__module__).addHandler(handler)
        model.set_use_kernels(True)
        return {
            "raised": raised,
            "use_kernels_forwards": expert_forwards(model),
            "warnings": [r.getMessage() for r in records if r.levelno >= logging.WARNING],
        }

    results: dict = {}
    for name, check in {
        "kernelize_method": kernelize_method,
        "use_kernels": use_kernels,
        "at_revision": at_revision,
        "not_cached": not_cached,
    }.items():
        try:
            results[name] = check()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    return results


def run_installed_checks() -> dict:
    """hfx installed from its wheel: the pretraining kernelize finds the kernel in the installed package (no
    checkout, no $HFX_PEER_KERNEL_REPO), a training step matches the PyTorch path, and push-kernel stages it."""
    import hfx
    from hfx.peer_mla.hub import peer_kernel_repository, push_peer_kernel
    from hfx.peer_mla.modeling_peer_mla import PeerMlaForCausalLM
    from hfx.peer_mla.training import kernelize_peer_experts

    repo = peer_kernel_repository()
    torch.manual_seed(0)
    reference_model = PeerMlaForCausalLM(tiny_model_config()).train()
    model = copy.deepcopy(reference_model)
    swapped = kernelize_peer_experts(model, "cpu")
    staged = push_peer_kernel("hfx-test/peer-kernel", dry_run_dir=Path(tempfile.mkdtemp()) / "staged")
    return {
        "hfx_file": hfx.__file__,
        "sys_path": sys.path,
        "kernel_repo": str(repo),
        "links_in_kernel_repo": sorted(str(p) for p in repo.rglob("*") if p.is_symlink()),
        "swapped": swapped,
        "layer_files": expert_forwards(model),
        "staged_files": staged["files"],
        **compare_training_step(model, reference_model),
    }


def main(argv: list[str]) -> None:
    mode = argv[1] if len(argv) > 1 else "interpreter"
    if mode == "hub-cache":
        results = run_hub_cache_checks(argv[2])
    elif mode == "installed":
        results = {"installed": run_installed_checks()}
    else:
        results = run_interpreter_checks() if mode == "interpreter" else run_no_interpreter_checks()
    print(MARKER + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv)
