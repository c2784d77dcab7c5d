"""Triton kernels for the PEER expert sum (Parameter Efficient Expert Retrieval, arXiv 2407.04153).

    out[n] = sum_k weights[n, k] * sum_j act(down[idx[n, k], j] . x[n]) * up[idx[n, k], j]

hidden_states x (N, D), expert_indices idx (N, K), expert_weights (N, K), down/up (E, m, D) -> (N, D).

The retrieved expert rows are read straight from the (E, m, D) banks inside the kernels; the gathered
(N, K, m, D) weights are never materialised. Forward runs two kernels:

1. `_peer_rowdot_kernel`, grid (token blocks, K): pre[n, k, j] = down[idx[n, k], j] . x[n], looping over D in
   BLOCK_D tiles, so any D works. The (N, K, m) fp32 pre-activations are the only saved intermediate.
2. `_peer_fwd_out_kernel`, grid (token blocks, D tiles): out tile = sum_{k, j} w * act(pre) * up row tile.

Backward recomputes act(pre) from the saved pre-activations:

1. `_peer_rowdot_kernel` again with (grad_out, up): gu[n, k, j] = up[idx[n, k], j] . grad_out[n].
2. `_peer_bwd_coef_kernel`: grad_w[n, k] = sum_j act(pre) * gu and grad_pre = w * gu * act'(pre).
3. `_peer_bwd_rows_kernel`, grid (token blocks, D tiles): grad_x = sum grad_pre * down rows, and the expert
   gradients accumulated with `tl.atomic_add` into dense fp32 (E, m, D) buffers (cast to the parameter dtype
   afterwards): grad_down[e, j] += grad_pre * x, grad_up[e, j] += w * act(pre) * grad_out.

All arithmetic is fp32 whatever the input dtype (fp32, bf16, fp16). The kernels run on CUDA, and on CPU tensors
under the Triton interpreter (`TRITON_INTERPRET=1` in the environment before this module is imported).

The entry point `peer_experts` is a `torch.library` custom op with a registered fake and autograd formula, so it
is opaque to (and safe under) `torch.compile`.
"""

from __future__ import annotations

import contextlib
import re

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

ACTIVATIONS = ("identity", "relu", "gelu", "gelu_tanh", "silu")
_ACT_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}

# Default tile sizes. BLOCK_D is capped so that D up to any size is handled by looping over tiles.
_BLOCK_N = 16
_MAX_BLOCK_D = 128


# ------------------------------------------------------------------------------------------------------------
# Activations (fp32, selected at compile time)
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 0:  # identity
        y = x
    elif ACT == 1:  # relu
        y = tl.maximum(x, 0.0)
    elif ACT == 2:  # gelu (erf)
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 3:  # gelu (tanh approximation)
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    else:  # silu
        y = x * tl.sigmoid(x)
    return y


@triton.jit
def _activation_grad(x, ACT: tl.constexpr):
    if ACT == 0:
        dy = x * 0.0 + 1.0
    elif ACT == 1:
        dy = tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        dy = cdf + x * pdf
    elif ACT == 3:
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        dy = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    else:
        s = tl.sigmoid(x)
        dy = s * (1.0 + x * (1.0 - s))
    return dy


# ------------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _peer_rowdot_kernel(
    vec_ptr,  # (N, D): hidden states (forward) or grad_out (backward)
    idx_ptr,  # (N, K) expert indices
    bank_ptr,  # (E, M, D): down (forward) or up (backward)
    dots_ptr,  # (N, K, M) fp32 output: bank[idx[n, k], j] . vec[n]
    N,
    K,
    M,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    k = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    experts = tl.load(idx_ptr + offs_n * K + k, mask=mask_n, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    for j in range(0, M):
        rows = (experts * M + j) * D
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            mask = mask_n[:, None] & (d < D)[None, :]
            v = tl.load(vec_ptr + offs_n[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
            r = tl.load(bank_ptr + rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(v * r, axis=1)
        tl.store(dots_ptr + (offs_n * K + k) * M + j, acc, mask=mask_n)


@triton.jit
def _peer_fwd_out_kernel(
    idx_ptr,  # (N, K)
    w_ptr,  # (N, K)
    pre_ptr,  # (N, K, M) fp32
    up_ptr,  # (E, M, D)
    out_ptr,  # (N, D)
    N,
    K,
    M,
    D,
    ACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_d < D)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for k in range(0, K):
        experts = tl.load(idx_ptr + offs_n * K + k, mask=mask_n, other=0).to(tl.int64)
        weight = tl.load(w_ptr + offs_n * K + k, mask=mask_n, other=0.0).to(tl.float32)
        for j in range(0, M):
            pre = tl.load(pre_ptr + (offs_n * K + k) * M + j, mask=mask_n, other=0.0)
            coef = _activation(pre, ACT) * weight
            rows = (experts * M + j) * D
            up = tl.load(up_ptr + rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += coef[:, None] * up
    tl.store(out_ptr + offs_n[:, None] * D + offs_d[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _peer_bwd_coef_kernel(
    w_ptr,  # (N, K)
    pre_ptr,  # (N, K, M) fp32
    gu_ptr,  # (N, K, M) fp32: up[idx] . grad_out; overwritten in place with grad_pre
    gw_ptr,  # (N, K): grad of expert_weights
    NK,
    M,
    ACT: tl.constexpr,
    NEED_W: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = offs < NK
    weight = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gw = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(0, M):
        pre = tl.load(pre_ptr + offs * M + j, mask=mask, other=0.0)
        gu = tl.load(gu_ptr + offs * M + j, mask=mask, other=0.0)
        gw += _activation(pre, ACT) * gu
        tl.store(gu_ptr + offs * M + j, weight * gu * _activation_grad(pre, ACT), mask=mask)
    if NEED_W:
        tl.store(gw_ptr + offs, gw.to(gw_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _peer_bwd_rows_kernel(
    x_ptr,  # (N, D)
    g_ptr,  # (N, D) grad_out
    idx_ptr,  # (N, K)
    w_ptr,  # (N, K)
    pre_ptr,  # (N, K, M) fp32
    gpre_ptr,  # (N, K, M) fp32
    down_ptr,  # (E, M, D)
    gx_ptr,  # (N, D)
    gdown_ptr,  # (E, M, D) fp32, accumulated atomically
    gup_ptr,  # (E, M, D) fp32, accumulated atomically
    N,
    K,
    M,
    D,
    ACT: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_DOWN: tl.constexpr,
    NEED_UP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_d < D)[None, :]
    tile = offs_n[:, None] * D + offs_d[None, :]
    if NEED_DOWN:
        x = tl.load(x_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    if NEED_UP:
        g = tl.load(g_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    acc_x = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for k in range(0, K):
        experts = tl.load(idx_ptr + offs_n * K + k, mask=mask_n, other=0).to(tl.int64)
        if NEED_UP:
            weight = tl.load(w_ptr + offs_n * K + k, mask=mask_n, other=0.0).to(tl.float32)
        for j in range(0, M):
            rows = (experts * M + j) * D
            bank = rows[:, None] + offs_d[None, :]
            gpre = tl.load(gpre_ptr + (offs_n * K + k) * M + j, mask=mask_n, other=0.0)
            if NEED_X:
                down = tl.load(down_ptr + bank, mask=mask, other=0.0).to(tl.float32)
                acc_x += gpre[:, None] * down
            if NEED_DOWN:
                tl.atomic_add(gdown_ptr + bank, gpre[:, None] * x, mask=mask, sem="relaxed")
            if NEED_UP:
                pre = tl.load(pre_ptr + (offs_n * K + k) * M + j, mask=mask_n, other=0.0)
                coef = _activation(pre, ACT) * weight
                tl.atomic_add(gup_ptr + bank, coef[:, None] * g, mask=mask, sem="relaxed")
    if NEED_X:
        tl.store(gx_ptr + tile, acc_x.to(gx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------------

_INTERPRETED = not isinstance(_peer_rowdot_kernel, JITFunction)


def _check_inputs(hidden_states, expert_indices, expert_weights, down_proj, up_proj, activation):
    if activation not in _ACT_CODE:
        raise ValueError(f"Unknown expert activation {activation!r}; expected one of {ACTIVATIONS}.")
    if hidden_states.dim() != 2 or expert_indices.dim() != 2 or down_proj.dim() != 3:
        raise ValueError(
            "Expected hidden_states (N, D), expert_indices (N, K), expert_weights (N, K), down_proj/up_proj "
            f"(E, m, D); got {tuple(hidden_states.shape)}, {tuple(expert_indices.shape)}, "
            f"{tuple(expert_weights.shape)}, {tuple(down_proj.shape)}, {tuple(up_proj.shape)}."
        )
    if expert_weights.shape != expert_indices.shape or expert_indices.shape[0] != hidden_states.shape[0]:
        raise ValueError(
            f"expert_indices {tuple(expert_indices.shape)} and expert_weights {tuple(expert_weights.shape)} "
            f"must both be (N, K) with N = {hidden_states.shape[0]}."
        )
    if down_proj.shape != up_proj.shape or down_proj.shape[-1] != hidden_states.shape[-1]:
        raise ValueError(
            f"down_proj {tuple(down_proj.shape)} and up_proj {tuple(up_proj.shape)} must both be (E, m, D) "
            f"with D = {hidden_states.shape[-1]}."
        )
    if expert_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"expert_indices must be int32 or int64, got {expert_indices.dtype}.")
    if hidden_states.device.type == "cpu" and not _INTERPRETED:
        raise RuntimeError(
            "The PEER Triton kernel got CPU tensors but Triton is not in interpreter mode. Set TRITON_INTERPRET=1 "
            "in the environment before the kernel is loaded to run it on CPU, or kernelize for a GPU device."
        )


def _block_d(D: int, block_d: int | None) -> int:
    if block_d is None:
        block_d = min(triton.next_power_of_2(max(D, 1)), _MAX_BLOCK_D)
    return max(16, block_d)


def _forward_impl(
    hidden_states: torch.Tensor,
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    down_proj: torch.Tensor,
    up_proj: torch.Tensor,
    activation: str,
    block_n: int | None = None,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (N, D) in hidden_states.dtype, pre-activations (N, K, m) fp32)."""
    _check_inputs(hidden_states, expert_indices, expert_weights, down_proj, up_proj, activation)
    x = hidden_states.contiguous()
    idx = expert_indices.contiguous()
    w = expert_weights.contiguous()
    down = down_proj.contiguous()
    up = up_proj.contiguous()
    N, D = x.shape
    K = idx.shape[1]
    M = down.shape[1]
    out = torch.empty_like(x)
    pre = torch.empty((N, K, M), device=x.device, dtype=torch.float32)
    if N == 0 or D == 0:
        return out, pre
    if K == 0 or M == 0:
        return out.zero_(), pre
    BLOCK_N = block_n or _BLOCK_N
    BLOCK_D = _block_d(D, block_d)
    with _device_guard(x):
        _peer_rowdot_kernel[(triton.cdiv(N, BLOCK_N), K)](
            x, idx, down, pre, N, K, M, D, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=4
        )
        _peer_fwd_out_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D))](
            idx,
            w,
            pre,
            up,
            out,
            N,
            K,
            M,
            D,
            ACT=_ACT_CODE[activation],
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            num_warps=4,
        )
    return out, pre


def _backward_impl(
    grad_out: torch.Tensor,
    hidden_states: torch.Tensor,
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    down_proj: torch.Tensor,
    up_proj: torch.Tensor,
    pre: torch.Tensor,
    activation: str,
    need_x: bool = True,
    need_w: bool = True,
    need_down: bool = True,
    need_up: bool = True,
    block_n: int | None = None,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients wrt (hidden_states, expert_weights, down_proj, up_proj); the ones not needed are empty (0,)."""
    x = hidden_states.contiguous()
    idx = expert_indices.contiguous()
    w = expert_weights.contiguous()
    down = down_proj.contiguous()
    up = up_proj.contiguous()
    g = grad_out.contiguous().to(x.dtype)
    pre = pre.contiguous()
    N, D = x.shape
    K = idx.shape[1]
    M = down.shape[1]
    # Gradients that are not needed come back as distinct empty tensors (custom-op outputs may not alias).
    gx = torch.zeros_like(x) if need_x else x.new_empty(0)
    gw = torch.zeros_like(w) if need_w else x.new_empty(0)
    gdown = torch.zeros(down.shape, device=down.device, dtype=torch.float32) if need_down else x.new_empty(0)
    gup = torch.zeros(up.shape, device=up.device, dtype=torch.float32) if need_up else x.new_empty(0)
    if N > 0 and D > 0 and K > 0 and M > 0 and (need_x or need_w or need_down or need_up):
        BLOCK_N = block_n or _BLOCK_N
        BLOCK_D = _block_d(D, block_d)
        act = _ACT_CODE[activation]
        gpre = torch.empty((N, K, M), device=x.device, dtype=torch.float32)
        with _device_guard(x):
            _peer_rowdot_kernel[(triton.cdiv(N, BLOCK_N), K)](
                g, idx, up, gpre, N, K, M, D, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=4
            )
            block = 256
            _peer_bwd_coef_kernel[(triton.cdiv(N * K, block),)](
                w, pre, gpre, gw if need_w else w, N * K, M, ACT=act, NEED_W=need_w, BLOCK=block, num_warps=4
            )
            if need_x or need_down or need_up:
                _peer_bwd_rows_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D))](
                    x,
                    g,
                    idx,
                    w,
                    pre,
                    gpre,
                    down,
                    gx if need_x else x,
                    gdown if need_down else pre,
                    gup if need_up else pre,
                    N,
                    K,
                    M,
                    D,
                    ACT=act,
                    NEED_X=need_x,
                    NEED_DOWN=need_down,
                    NEED_UP=need_up,
                    BLOCK_N=BLOCK_N,
                    BLOCK_D=BLOCK_D,
                    num_warps=4,
                )
    if need_down:
        gdown = gdown.to(down_proj.dtype)
    if need_up:
        gup = gup.to(up_proj.dtype)
    return gx, gw, gdown, gup


def _device_guard(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) with autograd
# ------------------------------------------------------------------------------------------------------------

# One namespace per loaded copy of this package (`kernels` imports each build variant under its own unique
# module name), so several copies can coexist in one process.
_NAMESPACE = re.sub(r"\W", "_", __name__.rpartition(".")[0] or __name__)


@torch.library.custom_op(f"{_NAMESPACE}::peer_experts_fwd", mutates_args=())
def _peer_experts_fwd(
    hidden_states: torch.Tensor,
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    down_proj: torch.Tensor,
    up_proj: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(hidden_states, expert_indices, expert_weights, down_proj, up_proj, activation)


@_peer_experts_fwd.register_fake
def _(hidden_states, expert_indices, expert_weights, down_proj, up_proj, activation):
    N, D = hidden_states.shape
    K = expert_indices.shape[1]
    M = down_proj.shape[1]
    return torch.empty_like(hidden_states), hidden_states.new_empty((N, K, M), dtype=torch.float32)


@torch.library.custom_op(f"{_NAMESPACE}::peer_experts_bwd", mutates_args=())
def _peer_experts_bwd(
    grad_out: torch.Tensor,
    hidden_states: torch.Tensor,
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    down_proj: torch.Tensor,
    up_proj: torch.Tensor,
    pre: torch.Tensor,
    activation: str,
    need_x: bool,
    need_w: bool,
    need_down: bool,
    need_up: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(
        grad_out,
        hidden_states,
        expert_indices,
        expert_weights,
        down_proj,
        up_proj,
        pre,
        activation,
        need_x,
        need_w,
        need_down,
        need_up,
    )


@_peer_experts_bwd.register_fake
def _(
    grad_out,
    hidden_states,
    expert_indices,
    expert_weights,
    down_proj,
    up_proj,
    pre,
    activation,
    need_x,
    need_w,
    need_down,
    need_up,
):
    return (
        torch.empty_like(hidden_states) if need_x else hidden_states.new_empty(0),
        torch.empty_like(expert_weights) if need_w else hidden_states.new_empty(0),
        torch.empty_like(down_proj) if need_down else hidden_states.new_empty(0),
        torch.empty_like(up_proj) if need_up else hidden_states.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden_states, expert_indices, expert_weights, down_proj, up_proj, activation = inputs
    _, pre = output
    ctx.save_for_backward(hidden_states, expert_indices, expert_weights, down_proj, up_proj, pre)
    ctx.activation = activation


def _backward(ctx, grad_out, _grad_pre):
    hidden_states, expert_indices, expert_weights, down_proj, up_proj, pre = ctx.saved_tensors
    need_x, _, need_w, need_down, need_up, _ = ctx.needs_input_grad
    gx, gw, gdown, gup = _peer_experts_bwd(
        grad_out,
        hidden_states,
        expert_indices,
        expert_weights,
        down_proj,
        up_proj,
        pre,
        ctx.activation,
        need_x,
        need_w,
        need_down,
        need_up,
    )
    return (
        gx if need_x else None,
        None,
        gw if need_w else None,
        gdown if need_down else None,
        gup if need_up else None,
        None,
    )


_peer_experts_fwd.register_autograd(_backward, setup_context=_setup_context)


def peer_experts(
    hidden_states: torch.Tensor,
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    down_proj: torch.Tensor,
    up_proj: torch.Tensor,
    activation: str = "gelu",
) -> torch.Tensor:
    """PEER expert sum, differentiable wrt hidden_states, expert_weights, down_proj and up_proj.

    hidden_states (N, D), expert_indices (N, K) int64/int32, expert_weights (N, K), down_proj/up_proj (E, m, D)
    -> (N, D) in hidden_states.dtype. `activation` is one of `ACTIVATIONS`.
    """
    return _peer_experts_fwd(hidden_states, expert_indices, expert_weights, down_proj, up_proj, activation)[0]
