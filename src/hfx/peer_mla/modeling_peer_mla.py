"""PEER-MLA: a causal LM whose MLPs retrieve tiny experts by product keys (PEER, arXiv 2407.04153) and whose
attention is DeepSeek-style multi-head latent attention (MLA) with a latent KV cache.

Read top to bottom: norms and RoPE, PEER (router -> experts -> layer), MLA attention, decoder layer, model.
This file and `configuration_peer_mla.py` are exported next to the weights by `save_pretrained` and loaded with
`trust_remote_code=True`; they import only torch, transformers and each other.
"""

# No `from __future__ import annotations`: transformers reads the forward's `**kwargs: Unpack[TransformersKwargs]`
# annotation at run time to learn which outputs (attentions, hidden states) the model can return.
import contextlib
import importlib.util
import logging
import math
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations import use_kernel_forward_from_hub
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask, eager_mask, sdpa_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_peer_mla import PeerMlaConfig

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Norms and rotary embeddings
# ----------------------------------------------------------------------------------------------------------------


class PeerMlaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rope_inverse_frequencies(config: PeerMlaConfig, device=None, seq_len=None) -> tuple[torch.Tensor, float]:
    """Plain RoPE over the decoupled key/query part (`qk_rope_head_dim`); (inverse frequencies, scaling 1.0)."""
    dim = config.qk_rope_head_dim
    base = config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    return inv_freq, 1.0


class PeerMlaRotaryEmbedding(nn.Module):
    """RoPE for the decoupled (position-carrying) part of queries and keys, from transformers' RoPE utilities:
    `config.rope_parameters["rope_type"]` selects the scaling ("default", "linear", "dynamic", "yarn", "llama3"...)
    over `qk_rope_head_dim` (the config's `head_dim`)."""

    def __init__(self, config: PeerMlaConfig, device=None):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        init_fn: Callable = (
            self.compute_default_rope_parameters
            if self.rope_type == "default"
            else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
        inv_freq, self.attention_scaling = init_fn(config, device)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: PeerMlaConfig, device=None, seq_len=None, **kwargs):
        return rope_inverse_frequencies(config, device=device)

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :].to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(
            x.dtype
        )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, rope_dim); cos/sin: (batch, seq, rope_dim)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------------------------
# PEER: product-key router -> expert bank -> layer
# ----------------------------------------------------------------------------------------------------------------


def expert_activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "silu":
        return F.silu(x)
    if name == "identity":
        return x
    raise ValueError(f"Unknown expert activation {name!r}.")


def expert_activation_grad(name: str, x: torch.Tensor) -> torch.Tensor:
    """d activation / dx, elementwise (used by the memory-light backward)."""
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + x * pdf
    if name == "gelu_tanh":
        k = math.sqrt(2.0 / math.pi)
        inner = k * (x + 0.044715 * x.pow(3))
        tanh = torch.tanh(inner)
        return 0.5 * (1.0 + tanh) + 0.5 * x * (1.0 - tanh * tanh) * k * (1.0 + 3 * 0.044715 * x * x)
    if name == "relu":
        return (x > 0).to(x.dtype)
    if name == "silu":
        sig = torch.sigmoid(x)
        return sig * (1.0 + x * (1.0 - sig))
    if name == "identity":
        return torch.ones_like(x)
    raise ValueError(f"Unknown expert activation {name!r}.")


def peer_experts_reference(
    hidden_states: torch.Tensor,
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    down_proj: torch.Tensor,
    up_proj: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """The PEER expert sum written plainly (gathers every retrieved expert's weights per token).

    hidden_states (N, D), expert_indices (N, K), expert_weights (N, K), down_proj/up_proj (E, m, D) -> (N, D):
    out[n] = sum_k weights[n, k] * sum_j act(down[idx[n, k], j] . x[n]) * up[idx[n, k], j].
    """
    down = down_proj[expert_indices]  # (N, K, m, D)
    up = up_proj[expert_indices]
    pre = torch.einsum("nkmd,nd->nkm", down, hidden_states)
    act = expert_activation(activation, pre) * expert_weights[..., None]
    return torch.einsum("nkm,nkmd->nd", act, up)


def _sampled_dot(vectors: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """out[n, c] = rows[columns[n, c]] . vectors[n], without gathering the rows: a sampled dense-dense matmul
    (`torch.sparse.sampled_addmm`) for fp32/fp64, token chunks of gather + bmm for the dtypes it lacks."""
    num_tokens, per_token = columns.shape
    if vectors.dtype in (torch.float32, torch.float64):
        sorted_columns, order = columns.sort(dim=1)  # CSR wants sorted column indices per row
        crow = torch.arange(0, num_tokens * per_token + 1, per_token, device=columns.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            pattern = torch.sparse_csr_tensor(
                crow,
                sorted_columns.flatten(),
                torch.zeros(num_tokens * per_token, dtype=vectors.dtype, device=vectors.device),
                (num_tokens, rows.shape[0]),
                check_invariants=False,  # built valid by construction; the check costs a pass over the indices
            )
        values = torch.sparse.sampled_addmm(pattern, vectors, rows.t(), beta=0.0).values().view_as(columns)
        return torch.empty_like(values).scatter_(1, order, values)
    chunk = max(1, (1 << 24) // max(1, per_token * rows.shape[1]))
    return torch.cat(
        [
            torch.bmm(rows[columns[i : i + chunk]], vectors[i : i + chunk, :, None])[..., 0]
            for i in range(0, num_tokens, chunk)
        ]
    )


def _scatter_outer(
    grad: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor
) -> None:
    """grad[columns[n, c]] += values[n, c] * vectors[n], in place, as one sparse (rows x tokens) @ dense matmul."""
    num_tokens, per_token = columns.shape
    tokens = torch.arange(num_tokens, device=columns.device).repeat_interleave(per_token)
    pattern = torch.sparse_coo_tensor(
        torch.stack([columns.flatten(), tokens]),
        values.flatten().to(grad.dtype),
        (grad.shape[0], num_tokens),
        check_invariants=False,
    )
    grad.addmm_(pattern, vectors.to(grad.dtype))


class _PeerExpertsFunction(torch.autograd.Function):
    """Memory-light PEER expert sum: the retrieved expert rows are never gathered per token.

    Expert neuron rows are addressed as row `expert * m + j` of (E*m, D) matrices. Forward: pre-activations by a
    sampled matmul, output by `embedding_bag` with the activations as per-sample weights. Backward: the same two
    primitives for the input and weight-score gradients, and sparse @ dense `addmm_` into the weight gradients.
    Only the inputs and the (tokens, K*m) pre-activations are saved. The Triton kernel in hub_kernels/peer is the
    GPU counterpart."""

    @staticmethod
    def forward(ctx, hidden_states, expert_indices, expert_weights, down_proj, up_proj, activation):
        num_experts, m, hidden_size = up_proj.shape
        columns = (expert_indices[..., None] * m + torch.arange(m, device=expert_indices.device)).flatten(1)
        down_rows = down_proj.reshape(num_experts * m, hidden_size)
        up_rows = up_proj.reshape(num_experts * m, hidden_size)
        pre = _sampled_dot(hidden_states, down_rows, columns)  # (N, K*m)
        weights = expert_weights.repeat_interleave(m, dim=1)
        act = expert_activation(activation, pre) * weights
        out = F.embedding_bag(columns, up_rows, per_sample_weights=act.to(up_rows.dtype), mode="sum")
        ctx.save_for_backward(hidden_states, columns, expert_weights, down_proj, up_proj, pre)
        ctx.activation = activation
        return out.to(hidden_states.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        hidden_states, columns, expert_weights, down_proj, up_proj, pre = ctx.saved_tensors
        num_experts, m, hidden_size = up_proj.shape
        need_x, _, need_w, need_down, need_up = ctx.needs_input_grad[:5]
        grad_out = grad_out.to(hidden_states.dtype).contiguous()
        down_rows = down_proj.reshape(num_experts * m, hidden_size)
        up_rows = up_proj.reshape(num_experts * m, hidden_size)
        weights = expert_weights.repeat_interleave(m, dim=1)
        act = expert_activation(ctx.activation, pre)
        grad_act = _sampled_dot(grad_out, up_rows, columns)  # g . up_row
        grad_pre = weights * grad_act * expert_activation_grad(ctx.activation, pre)
        grad_x = grad_w = grad_down = grad_up = None
        if need_x:
            grad_x = F.embedding_bag(
                columns, down_rows, per_sample_weights=grad_pre.to(down_rows.dtype), mode="sum"
            )
            grad_x = grad_x.to(hidden_states.dtype)
        if need_w:
            grad_w = (act * grad_act).view(*expert_weights.shape, m).sum(-1).to(expert_weights.dtype)
        # Expert gradients accumulate in float32 for half/bf16 banks, like the Triton kernel's: CUDA's sparse @ dense
        # product has no half types, and many tokens' contributions to one expert add up better in float32.
        accumulate = torch.promote_types(down_proj.dtype, torch.float32)
        if need_down:
            grad_down = torch.zeros(down_proj.shape, dtype=accumulate, device=down_proj.device)
            _scatter_outer(grad_down.view(num_experts * m, hidden_size), columns, grad_pre, hidden_states)
            grad_down = grad_down.to(down_proj.dtype)
        if need_up:
            grad_up = torch.zeros(up_proj.shape, dtype=accumulate, device=up_proj.device)
            _scatter_outer(grad_up.view(num_experts * m, hidden_size), columns, act * weights, grad_out)
            grad_up = grad_up.to(up_proj.dtype)
        return grad_x, None, grad_w, grad_down, grad_up, None


@use_kernel_forward_from_hub("PeerExperts")
class PeerExperts(nn.Module):
    """The expert pool: `num_experts` experts of `expert_hidden_size` neurons, each a down and an up vector per
    neuron. The forward returns the score-weighted sum of the retrieved experts' outputs.

    `kernels.kernelize` replaces this forward with the Triton kernel of hub_kernels/peer (same signature)."""

    def __init__(self, config: PeerMlaConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.expert_hidden_size = config.expert_hidden_size
        self.activation = config.peer_activation
        self.down_proj = nn.Parameter(
            torch.empty(config.num_experts, config.expert_hidden_size, config.hidden_size)
        )
        self.up_proj = nn.Parameter(
            torch.empty(config.num_experts, config.expert_hidden_size, config.hidden_size)
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, expert_hidden_size={self.expert_hidden_size}, "
            f"hidden_size={self.up_proj.shape[-1]}, activation={self.activation}"
        )

    def forward(
        self, hidden_states: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states (N, D), expert_indices (N, K) int64, expert_weights (N, K) -> (N, D).

        Eager: the memory-light sparse form (`_PeerExpertsFunction`), the faster one for CPU training. Under
        `torch.compile` and `torch.export`: the gather form (`peer_experts_reference`), plain tensor ops without
        branches or sparse layouts, which both can trace."""
        if torch.compiler.is_compiling():
            return peer_experts_reference(
                hidden_states, expert_indices, expert_weights, self.down_proj, self.up_proj, self.activation
            )
        return _PeerExpertsFunction.apply(
            hidden_states, expert_indices, expert_weights, self.down_proj, self.up_proj, self.activation
        )


# The PEER kernel from the Hub: a kernel repository in the `kernels` layout (hfx ships one and pushes it with
# `hfx peer-mla push-kernel`) named by `config.peer_kernel_repo`. `kernels.kernelize` loads its `PeerExperts` layer
# through `kernels.get_kernel` (the Hub cache; downloaded when online) when the model is kernelized, never in forward.
PEER_KERNEL_LAYER = "PeerExperts"
#: The kernel version (branch `v1`) a `peer_kernel_repo` is read at when `peer_kernel_revision` is not set.
PEER_KERNEL_VERSION = 1


def peer_kernel_layer_repository(config: PeerMlaConfig, trust_remote_code: bool = False):
    """The `kernels.LayerRepository` of `config.peer_kernel_repo` at `config.peer_kernel_revision` (else version
    `PEER_KERNEL_VERSION`), or None when the config names none. `trust_remote_code` allows this repository even
    when the Hub does not mark its publisher as a trusted kernel publisher."""
    if config.peer_kernel_repo is None:
        return None
    from kernels import LayerRepository

    if config.peer_kernel_revision is not None:
        where = {"revision": config.peer_kernel_revision}
    else:
        where = {"version": PEER_KERNEL_VERSION}
    return LayerRepository(
        repo_id=config.peer_kernel_repo,
        layer_name=PEER_KERNEL_LAYER,
        trust_remote_code=[config.peer_kernel_repo] if trust_remote_code else False,
        **where,
    )


def kernelize_experts(model: nn.Module, repository, device: torch.device | str, mode=None) -> int:
    """Swap the forward of every `PeerExperts` of `model` for the `PeerExperts` layer of `repository` (a `kernels`
    layer repository) with `kernels.kernelize`; returns how many were swapped. `mode`: a `kernels.Mode`, by default
    TRAINING for a model in training mode (the kernel's backward is kept) and INFERENCE otherwise.

    One expert bank at a time and with `use_fallback=False`: the model's other hub-decorated layers (transformers'
    activations) keep their forward, and a kernel that cannot be loaded or cannot serve the experts raises instead
    of silently leaving the PyTorch forward in place."""
    from kernels import Mode, kernelize, use_kernel_mapping

    device = torch.device(device)
    if mode is None:
        mode = Mode.TRAINING if model.training else Mode.INFERENCE
    experts = [module for module in model.modules() if isinstance(module, PeerExperts)]
    with use_kernel_mapping({PEER_KERNEL_LAYER: {device.type: repository}}, inherit_mapping=False):
        for module in experts:
            kernelize(module, mode=mode, device=device.type, use_fallback=False)
    return sum(getattr(module.forward, "__func__", None) is not PeerExperts.forward for module in experts)


_RECOMPUTING = threading.local()


@contextlib.contextmanager
def recomputing_for_backward():
    """Marks a gradient-checkpointing recomputation: the forward runs again for its activations only, so
    statistics that a forward updates (the query BatchNorm's running mean and variance) are left alone."""
    previous = getattr(_RECOMPUTING, "active", False)
    _RECOMPUTING.active = True
    try:
        yield
    finally:
        _RECOMPUTING.active = previous


def checkpoint_contexts():
    """`context_fn` for non-reentrant `torch.utils.checkpoint`: nothing around the forward, the mark around the
    recomputation."""
    return contextlib.nullcontext(), recomputing_for_backward()


class PeerQueryBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the router's queries, one row per token, for any batch shape.

    In training the statistics are those of the real tokens: `token_mask` (False at padding) keeps padding out of
    them. With fewer than two real tokens (one-token batches) there are no batch statistics, so the running ones
    normalise and nothing is updated. The running statistics are updated by the training forward, not by the
    recomputation of gradient checkpointing (`recomputing_for_backward`), so once per forward as without it.
    With no padding (no `token_mask`: packed pretraining blocks) and two or more tokens it is PyTorch's fused batch
    norm, one kernel forward and one backward; otherwise the masked statistics below, ~30 small kernels, branch-free
    (the choice depends on shapes only), so both compile. Same parameters and buffers as `nn.BatchNorm1d`:
    checkpoints load unchanged."""

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training or not self.track_running_stats:
            return super().forward(x)
        if token_mask is None and x.shape[0] >= 2:
            # a checkpoint's recomputation updates copies (thrown away): the same kernel, the same saved tensors
            recomputing = getattr(_RECOMPUTING, "active", False)
            if not recomputing:
                self.num_batches_tracked.add_(1)
            return F.batch_norm(
                x,
                self.running_mean.clone() if recomputing else self.running_mean,
                self.running_var.clone() if recomputing else self.running_var,
                self.weight,
                self.bias,
                training=True,
                momentum=self.momentum if self.momentum is not None else 0.1,
                eps=self.eps,
            )
        weights = x.new_ones(x.shape[0], 1) if token_mask is None else token_mask.reshape(-1, 1).to(x.dtype)
        count = weights.sum()
        enough = count >= 2
        mean = (x * weights).sum(0) / count.clamp(min=1)
        var = ((x - mean).pow(2) * weights).sum(0) / count.clamp(min=1)
        running_mean = self.running_mean.to(x.dtype)
        running_var = self.running_var.to(x.dtype)
        use_mean = torch.where(enough, mean, running_mean)
        use_var = torch.where(enough, var, running_var)
        if not getattr(_RECOMPUTING, "active", False):
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 0.1
                unbiased = var * count / (count - 1).clamp(min=1)
                step = momentum * enough.to(self.running_mean.dtype)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), step)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), step)
                self.num_batches_tracked.add_(enough.to(self.num_batches_tracked.dtype))
        out = (x - use_mean) * torch.rsqrt(use_var + self.eps)
        if self.affine:
            out = out * self.weight.to(x.dtype) + self.bias.to(x.dtype)
        return out


class PeerProductKeyRouter(nn.Module):
    """Multi-head product-key retrieval.

    Each head's query is split into `len(product_key_dim)` parts; part i is scored against its own sub-key set of
    size `product_key_dim[i]` and keeps its top `product_key_topk`. Survivors are combined one part at a time
    (score = sum of part scores, expert index = mixed-radix combination) and pruned to `num_experts_per_tok`
    after each combination, which yields exactly the top-k of the full cartesian product of survivors.
    The kept scores are softmax-normalised per head, as in the paper.
    """

    def __init__(self, config: PeerMlaConfig):
        super().__init__()
        self.num_heads = config.peer_num_heads
        self.query_dim = config.peer_query_dim
        self.product_key_dim = list(config.product_key_dim)
        self.part_dim = config.peer_query_dim // len(self.product_key_dim)
        self.topk = config.num_experts_per_tok
        self.part_topk = config.product_key_topk
        self.query_proj = nn.Linear(config.hidden_size, self.num_heads * self.query_dim, bias=False)
        self.query_norm = (
            PeerQueryBatchNorm(self.num_heads * self.query_dim) if config.peer_batch_norm else None
        )
        # All sub-key sets in one tensor, (heads, sum(product_key_dim), part_dim); part i is the i-th split.
        self.sub_keys = nn.Parameter(torch.empty(self.num_heads, sum(self.product_key_dim), self.part_dim))

    def queries(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) -> (N, heads, parts, part_dim); `token_mask` (N,) is False at padding (kept out of BatchNorm)."""
        queries = self.query_proj(hidden_states)
        if self.query_norm is not None:
            queries = self.query_norm(queries, token_mask)
        return queries.view(-1, self.num_heads, len(self.product_key_dim), self.part_dim)

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) -> expert_indices (N, heads, k) int64, expert_weights (N, heads, k) softmax over k."""
        queries = self.queries(hidden_states, token_mask)
        beam_scores = beam_indices = None
        sub_keys = self.sub_keys.to(queries.dtype).split(self.product_key_dim, dim=1)
        for part, (size, keys) in enumerate(zip(self.product_key_dim, sub_keys, strict=True)):
            part_scores = torch.einsum("nhq,hsq->nhs", queries[:, :, part], keys)
            top_scores, top_indices = part_scores.topk(min(self.part_topk, size), dim=-1)
            if beam_scores is None:
                beam_scores, beam_indices = top_scores, top_indices
                continue
            scores = (beam_scores[..., :, None] + top_scores[..., None, :]).flatten(-2)
            indices = (beam_indices[..., :, None] * size + top_indices[..., None, :]).flatten(-2)
            beam_scores, kept = scores.topk(min(self.topk, scores.shape[-1]), dim=-1)
            beam_indices = indices.gather(-1, kept)
        if beam_scores.shape[-1] > self.topk:  # single-part keys
            beam_scores, kept = beam_scores.topk(self.topk, dim=-1)
            beam_indices = beam_indices.gather(-1, kept)
        return beam_indices, beam_scores.float().softmax(dim=-1).to(hidden_states.dtype)

    def all_expert_scores(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Scores of every expert, (N, heads, num_experts): brute force, for tests and analysis at small sizes."""
        queries = self.queries(hidden_states)
        total = None
        for part, keys in enumerate(self.sub_keys.to(queries.dtype).split(self.product_key_dim, dim=1)):
            part_scores = torch.einsum("nhq,hsq->nhs", queries[:, :, part], keys)
            total = (
                part_scores
                if total is None
                else (total[..., :, None] + part_scores[..., None, :]).flatten(-2)
            )
        return total


class PeerLayer(nn.Module):
    """A PEER MLP: route each token to `peer_num_heads * num_experts_per_tok` experts and sum their outputs."""

    def __init__(self, config: PeerMlaConfig):
        super().__init__()
        self.router = PeerProductKeyRouter(config)
        self.experts = PeerExperts(config)
        # Per-expert retrieval counts; None (the default) keeps the forward free of bookkeeping.
        self.expert_counts: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`token_mask` (batch, seq), False at padding: those tokens stay out of the query statistics."""
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        mask = token_mask.reshape(-1) if token_mask is not None else None
        expert_indices, expert_weights = self.router(flat, mask)
        if self.expert_counts is not None:
            self.expert_counts += torch.bincount(
                expert_indices.flatten().detach(), minlength=self.experts.num_experts
            ).to(self.expert_counts.device)
        out = self.experts(flat, expert_indices.flatten(1), expert_weights.flatten(1))
        return out.view(shape)


class PeerMlaMLP(nn.Module):
    """Dense SwiGLU MLP for layers that are not PEER layers."""

    def __init__(self, config: PeerMlaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------------------------------------------
# Multi-head latent attention
# ----------------------------------------------------------------------------------------------------------------


def latent_cache_bytes_per_token(config: PeerMlaConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes the latent KV cache holds per token, over all layers."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * itemsize


def _latent_attention(query, key, value, attention_mask, scale):
    """Multi-query attention over the latent cache with the heads folded into the query length.

    query (b, h, s, d), key (b, 1, t, d), value (b, 1, t, r) -> (b, h, s, r). All heads share one key/value
    "head", so (b, 1, h*s, d) against (b, 1, t, d) is a single-head attention: no per-head copies of the cache
    (SDPA's enable_gqa path on CPU materialises them), the layout FlashMLA also uses. `attention_mask`: None
    (causal, queries at the end of the keys), boolean (True = attend) or additive, broadcastable to (b, 1, s, t)."""
    batch, heads, q_len, dim = query.shape
    kv_len = key.shape[-2]
    if attention_mask is None and q_len > 1:
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    if attention_mask is not None:
        attention_mask = (
            attention_mask[..., -q_len:, :]
            .expand(batch, 1, q_len, kv_len)[:, :, None]
            .expand(batch, 1, heads, q_len, kv_len)
        )
        attention_mask = attention_mask.reshape(batch, 1, heads * q_len, kv_len)
    out = F.scaled_dot_product_attention(
        query.reshape(batch, 1, heads * q_len, dim), key, value, attn_mask=attention_mask, scale=scale
    )
    return out.view(batch, heads, q_len, value.shape[-1])


def _latent_attention_weights(query, key, value, attention_mask, scale):
    """`_latent_attention` written out, for eager attention: also returns the weights (b, h, s, t), which are the
    same probabilities the per-head (naive) path computes."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # key's single head broadcasts over h
    if attention_mask is None and q_len > 1:
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    if attention_mask is not None:
        attention_mask = attention_mask[..., -q_len:, :]
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = scores.float().softmax(dim=-1).to(query.dtype)
    return torch.matmul(weights, value), weights


# GPU attention kernels from the Hub, through the `kernels` library: FlashMLA for absorbed decode, flash-attn 3 for
# the naive path. They are loaded when the model is built (`resolve_attention_kernels`, also
# `PeerMlaPreTrainedModel.load_attention_kernels`), never inside forward: forward only looks up what was loaded.
# Each wrapper takes (query, key, value, scale) in (batch, heads, seq, dim) layout with bottom-right causal masking
# and returns (batch, heads, q_len, v_dim).
FLASH_MLA_REPO = ("kernels-community/flash-mla", 1)
FLASH_ATTN_REPO = ("kernels-community/flash-attn3", 1)
ATTENTION_KERNEL_REPOS = {"flash_mla": FLASH_MLA_REPO, "flash_attn": FLASH_ATTN_REPO}
# Per process: repo id -> the loaded kernel, or the error its load raised; the fallbacks already logged.
_HUB_KERNELS: dict[str, object] = {}
_REPORTED_FALLBACKS: set[str] = set()


def _load_hub_kernel(repo: tuple[str, int]):
    """Load (once per process) a kernel through `kernels.get_kernel` (the Hub cache, or a download when online);
    a failure is remembered and re-raised, not retried."""
    if repo[0] not in _HUB_KERNELS:
        try:
            from kernels import get_kernel
        except ImportError:
            _HUB_KERNELS[repo[0]] = ImportError(
                "the `kernels` package is not installed (pip install kernels)"
            )
        else:
            try:
                with torch.device("cpu"):  # from_pretrained builds under a meta-device context
                    _HUB_KERNELS[repo[0]] = get_kernel(repo[0], version=repo[1])
            except Exception as error:  # noqa: BLE001 - offline, wrong arch, missing build: all mean "not loaded"
                _HUB_KERNELS[repo[0]] = error
    loaded = _HUB_KERNELS[repo[0]]
    if isinstance(loaded, Exception):
        raise loaded
    return loaded


def _loaded_hub_kernel(repo: tuple[str, int]):
    """A kernel loaded earlier by `_load_hub_kernel`; never loads (this runs inside forward)."""
    loaded = _HUB_KERNELS.get(repo[0])
    if loaded is None or isinstance(loaded, Exception):
        raise RuntimeError(
            f"The attention kernel {repo[0]} is not loaded: kernels are loaded when the model is built, or by "
            "model.load_attention_kernels(), never inside forward."
        )
    return loaded


def flash_mla_attention(query, key, value, scale):
    """Absorbed MLA decode with FlashMLA: query (b, h, s, 576), latent key (b, 1, t, 576), value = key[..., :512].

    FlashMLA reads a paged cache (pages of 64 tokens); the contiguous latent cache is padded and viewed as pages."""
    flash_mla = _loaded_hub_kernel(FLASH_MLA_REPO)
    batch, _, kv_len, dim = key.shape
    page = 64
    pages = -(-kv_len // page)
    k_cache = F.pad(key[:, 0], (0, 0, 0, pages * page - kv_len)).reshape(batch * pages, page, 1, dim)
    block_table = torch.arange(batch * pages, device=key.device, dtype=torch.int32).view(batch, pages)
    cache_seqlens = torch.full((batch,), kv_len, device=key.device, dtype=torch.int32)
    metadata, _ = flash_mla.get_mla_metadata()
    out, _ = flash_mla.flash_mla_with_kvcache(
        query.transpose(1, 2).contiguous(),
        k_cache,
        block_table,
        cache_seqlens,
        value.shape[-1],
        metadata,
        num_splits=None,
        softmax_scale=scale,  # FlashMLA's default, 1/sqrt(576), is wrong for MLA
        causal=True,
    )
    return out.transpose(1, 2)


def flash_attn_attention(query, key, value, scale):
    """Naive-path attention with flash-attn 3 (allows a value head size different from the key's)."""
    flash_attn = _loaded_hub_kernel(FLASH_ATTN_REPO)
    out = flash_attn.flash_attn_func(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=scale, causal=True
    )
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)


def _kernel_not_applicable(name: str, config: PeerMlaConfig) -> str | None:
    """Why the kernel `name` cannot run for `config` on this machine, before trying to load it (None: try)."""
    if not torch.cuda.is_available():
        return "this machine has no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:  # FlashMLA and flash-attn 3 are Hopper (sm90) kernels
        return f"it needs a GPU of compute capability 9.0 or newer, this one is {major}.{minor}"
    if name == "flash_mla" and (config.kv_lora_rank != 512 or config.qk_rope_head_dim != 64):
        return (
            f"FlashMLA needs kv_lora_rank=512 and qk_rope_head_dim=64 (got {config.kv_lora_rank} and "
            f"{config.qk_rope_head_dim})"
        )
    return None


def _log_fallback_once(level: int, message: str) -> None:
    if message not in _REPORTED_FALLBACKS:
        _REPORTED_FALLBACKS.add(message)
        logger.log(level, message)


def resolve_attention_kernels(config: PeerMlaConfig) -> tuple[str, ...]:
    """Load the GPU attention kernels `config.attention_kernel` asks for; returns the names of those loaded.

    Runs when a model is built (and from `load_attention_kernels`); forward only uses what this returned.
    "auto": each kernel that applies to this machine and config (none on a machine without CUDA, silently); one
    that should apply but cannot be loaded (offline, no build for this setup) is skipped with one warning naming
    the reason, and attention runs on SDPA. "flash_mla" / "flash_attn": that kernel, or a RuntimeError saying why
    it cannot be used. "sdpa": none.
    """
    choice = config.attention_kernel
    if choice == "sdpa":
        return ()
    loaded = []
    for name in ATTENTION_KERNEL_REPOS if choice == "auto" else (choice,):
        repo = ATTENTION_KERNEL_REPOS[name]
        reason = _kernel_not_applicable(name, config)
        if reason is not None:
            if choice == name:
                raise RuntimeError(
                    f"attention_kernel={name!r} cannot be used: {reason}. Use attention_kernel='auto' (the kernel "
                    "where it applies, SDPA elsewhere) or 'sdpa'."
                )
            no_gpu = not torch.cuda.is_available()
            _log_fallback_once(
                logging.DEBUG if no_gpu else logging.INFO,
                f"attention_kernel='auto': {name} is not used ({reason}); attention runs on SDPA there.",
            )
            continue
        try:
            _load_hub_kernel(repo)
        except Exception as error:  # noqa: BLE001 - offline, wrong arch, missing package: all mean "use SDPA"
            if choice == name:
                raise RuntimeError(
                    f"attention_kernel={name!r} cannot be used: {repo[0]} (version {repo[1]}) could not be loaded "
                    f"({type(error).__name__}: {error}). Install `kernels` and fetch the kernel while online (it is "
                    "then cached), or use attention_kernel='auto' or 'sdpa'."
                ) from error
            _log_fallback_once(
                logging.WARNING,
                f"attention_kernel='auto': {repo[0]} (version {repo[1]}) could not be loaded "
                f"({type(error).__name__}: {error}); {name} attention falls back to SDPA.",
            )
            continue
        loaded.append(name)
    return tuple(loaded)


def select_attention_kernel(
    choice: str,
    query: torch.Tensor,
    value: torch.Tensor,
    absorbed: bool,
    masked: bool,
    loaded: tuple[str, ...] = (),
):
    """The GPU kernel for this call, or None for SDPA. Never loads anything: `loaded` names the kernels loaded
    when the model was built (`resolve_attention_kernels`).

    "auto" uses a loaded kernel only where it applies (CUDA, bf16/fp16, no padding mask, FlashMLA's 576/512 head
    sizes for absorbed decode) and SDPA elsewhere, without a word: these are per-call conditions (autocast,
    padded batches), not failures. An explicit "flash_mla" or "flash_attn" raises instead of falling back."""
    if choice == "sdpa":
        return None
    wanted = "flash_mla" if absorbed else "flash_attn"
    if choice not in ("auto", wanted) or (choice == "auto" and wanted not in loaded):
        return None
    problems = []
    if query.device.type != "cuda":
        problems.append(f"tensors are on {query.device.type}, not cuda")
    if query.dtype not in (torch.bfloat16, torch.float16):
        problems.append(f"dtype is {query.dtype}, not bf16/fp16")
    if masked:
        problems.append("a padding mask is present")
    if absorbed and (query.shape[-1] != 576 or value.shape[-1] != 512):
        problems.append(
            f"FlashMLA needs kv_lora_rank=512 and qk_rope_head_dim=64 (got {value.shape[-1]} and "
            f"{query.shape[-1] - value.shape[-1]})"
        )
    if wanted not in loaded:
        problems.append(
            "the kernel was not loaded when the model was built (after changing config.attention_kernel, call "
            "model.load_attention_kernels())"
        )
    if not problems:
        return flash_mla_attention if absorbed else flash_attn_attention
    if choice == wanted:
        raise RuntimeError(f"attention_kernel={choice!r} cannot be used: " + "; ".join(problems) + ".")
    return None


class PeerMlaAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention whose cache holds the latent, not per-head keys and values.

    Per token and layer the cache stores `kv_lora_rank` (normalised latent c_kv) + `qk_rope_head_dim`
    (the RoPE key shared by all heads) values. Two equivalent ways to attend from it:
      * naive: up-project the latent to per-head keys and values (cheap when there are many queries: prefill,
        training);
      * absorbed: fold the key up-projection into the query and the value up-projection into the output, and
        attend in latent space as multi-query attention with head size `kv_lora_rank + qk_rope_head_dim`
        (cheap when there are few queries against a long cache: decoding). This is the layout FlashMLA takes.
    Both use softmax scale 1/sqrt(qk_nope_head_dim + qk_rope_head_dim), passed explicitly.
    """

    def __init__(self, config: PeerMlaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.scaling = self.qk_head_dim**-0.5
        # Read by transformers' attention functions: the naive path's keys and values have one head per query head.
        self.is_causal = True
        self.num_key_value_groups = 1
        # Names of the GPU attention kernels loaded for this model (set by load_attention_kernels); SDPA otherwise.
        self.attention_kernels: tuple[str, ...] = ()

        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=False)
            self.q_a_layernorm = PeerMlaRMSNorm(config.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=False
        )
        self.kv_a_layernorm = PeerMlaRMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=False)

    def project_queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.config.q_lora_rank is None:
            query = self.q_proj(hidden_states)
        else:
            query = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        batch, seq = hidden_states.shape[:2]
        return query.view(batch, seq, self.num_heads, self.qk_head_dim).transpose(1, 2)

    def project_latent(self, hidden_states: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, seq, D) -> latent (batch, 1, seq, kv_lora_rank), rope key (batch, 1, seq, qk_rope_head_dim)."""
        compressed = self.kv_a_proj_with_mqa(hidden_states)
        latent, key_rope = compressed.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)[:, None]
        key_rope = apply_rotary(key_rope[:, None], cos, sin)
        return latent, key_rope

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq = hidden_states.shape[:2]
        cos, sin = position_embeddings
        query = self.project_queries(hidden_states)
        query_nope, query_rope = query.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        query_rope = apply_rotary(query_rope, cos, sin)
        latent, key_rope = self.project_latent(hidden_states, cos, sin)
        if past_key_values is not None:
            latent, key_rope = past_key_values.update(latent, key_rope, self.layer_idx)
        path = attention_path(self.config, seq, latent.shape[2], self.training)
        if not torch.compiler.is_compiling():  # once per process and path
            _log_fallback_once(
                logging.DEBUG,
                f"PEER-MLA attention ({self.config._attn_implementation}): "
                + (
                    "absorbed (hfx's latent decode)"
                    if path == "absorbed"
                    else "naive (transformers' registry)"
                ),
            )
        if path == "absorbed":
            out, weights = self.absorbed_attention(query_nope, query_rope, latent, key_rope, attention_mask)
        else:
            out, weights = self.naive_attention(
                query_nope, query_rope, latent, key_rope, attention_mask, **kwargs
            )
        out = out.reshape(batch, seq, self.num_heads * self.v_head_dim)
        return self.o_proj(out), weights

    def _hub_kernel(self, query, value, absorbed: bool, attention_mask):
        """The loaded GPU kernel for this call (`select_attention_kernel`), or None for the SDPA path."""
        return select_attention_kernel(
            self.config.attention_kernel,
            query,
            value,
            absorbed=absorbed,
            masked=attention_mask is not None,
            loaded=self.attention_kernels,
        )

    def _kv_up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.kv_b_proj.weight.view(
            self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank
        )
        return weight[:, : self.qk_nope_head_dim], weight[:, self.qk_nope_head_dim :]

    def naive_attention(self, query_nope, query_rope, latent, key_rope, attention_mask, **kwargs):
        """Up-project the latent to per-head keys/values, then the attention function of
        `config._attn_implementation` from transformers' registry (eager, sdpa, flex_attention, flash...).
        Returns (output (b, s, h, v), weights or None)."""
        batch, _, kv_len, _ = latent.shape
        key_value = self.kv_b_proj(latent[:, 0]).view(batch, kv_len, self.num_heads, -1).transpose(1, 2)
        key_nope, value = key_value.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key = torch.cat([key_nope, key_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)
        query = torch.cat([query_nope, query_rope], dim=-1)
        implementation = self.config._attn_implementation or "sdpa"
        dropout = self.config.attention_dropout if self.training else 0.0
        if implementation != "eager" and reads_tensor_masks(implementation) and not dropout:
            kernel = self._hub_kernel(query, value, absorbed=False, attention_mask=attention_mask)
            if kernel is not None:
                return kernel(query, key, value, self.scaling).transpose(1, 2), None
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        return interface(
            self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
        )

    def absorbed_attention(self, query_nope, query_rope, latent, key_rope, attention_mask):
        """Attend in latent space: q_latent = q_nope W_UK, out = softmax(...) c_kv W_UV^T. hfx's own decode path
        (FlashMLA on Hopper, folded multi-query SDPA elsewhere; written out with weights under eager attention).
        Returns (output (b, s, h, v), weights or None)."""
        key_up, value_up = self._kv_up_weights()
        query_latent = torch.einsum("bhsn,hnr->bhsr", query_nope, key_up)
        query = torch.cat([query_latent, query_rope], dim=-1)
        key = torch.cat([latent, key_rope], dim=-1)
        weights = None
        if self.config._attn_implementation == "eager":
            out_latent, weights = _latent_attention_weights(query, key, latent, attention_mask, self.scaling)
        else:
            kernel = self._hub_kernel(query, latent, absorbed=True, attention_mask=attention_mask)
            if kernel is not None:
                out_latent = kernel(query, key, latent, self.scaling)
            else:
                out_latent = _latent_attention(query, key, latent, attention_mask, self.scaling)
        return torch.einsum("bhsr,hvr->bshv", out_latent, value_up), weights


def reads_tensor_masks(implementation: str | None) -> bool:
    """Whether an attention implementation's masks are what the absorbed path reads: None, or a boolean or
    additive tensor (transformers' `sdpa_mask` / `eager_mask`, also for implementations registered with them)."""
    mask_function = ALL_MASK_ATTENTION_FUNCTIONS.get(implementation or "sdpa")
    return mask_function in (sdpa_mask, eager_mask)


def attention_path(config: PeerMlaConfig, query_len: int, kv_len: int, training: bool) -> str:
    """Which path one attention call takes: "absorbed" (attend in latent space, hfx's own: fewer queries than
    cached tokens at inference, the decode steps) or "naive" (per-head keys and values through transformers'
    attention registry: prefill and training). `config.mla_absorb` forces one ("always" needs sdpa or eager
    attention, whose masks the latent path reads; flex and flash attention always take the naive path)."""
    mode = config.mla_absorb
    implementation = config._attn_implementation or "sdpa"
    if not reads_tensor_masks(implementation):
        if mode == "always":
            raise ValueError(
                f"mla_absorb='always' needs attn_implementation 'sdpa' or 'eager'; this model uses "
                f"{implementation!r}, which attends through the naive path. Use mla_absorb='auto'."
            )
        return "naive"
    if mode == "always":
        return "absorbed"
    if mode == "never":
        return "naive"
    return "absorbed" if query_len < kv_len and not training else "naive"


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention written out (transformers' "eager"): softmax(q k^T * scaling + mask) v, and the weights."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = scores.float().softmax(dim=-1).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


# ----------------------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------------------


class PeerMlaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: PeerMlaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = PeerMlaAttention(config, layer_idx)
        self.mlp = PeerLayer(config) if config.is_peer_layer(layer_idx) else PeerMlaMLP(config)
        self.input_layernorm = PeerMlaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = PeerMlaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states), token_mask=token_mask)


class PeerMlaPreTrainedModel(PreTrainedModel):
    config_class = PeerMlaConfig
    config: PeerMlaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PeerMlaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": PeerMlaDecoderLayer, "attentions": PeerMlaAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, PeerExperts):
            init.normal_(module.down_proj, mean=0.0, std=std)
            init.normal_(module.up_proj, mean=0.0, std=std)
        elif isinstance(module, PeerProductKeyRouter):
            init.normal_(module.sub_keys, mean=0.0, std=std)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """transformers' gradient checkpointing, with the recomputation marked (`checkpoint_contexts`) so that the
        query BatchNorm updates its running statistics once per training forward, not again in the backward.
        With `use_reentrant=True` (no `context_fn` there) they are updated twice, and a warning says so."""
        kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": False})
        if kwargs.get("use_reentrant", False):
            if self.config.peer_batch_norm and any(
                self.config.is_peer_layer(i) for i in range(self.config.num_hidden_layers)
            ):
                logger.warning(
                    "Reentrant gradient checkpointing recomputes each layer's forward without a way to tell it "
                    "apart: the PEER query BatchNorm's running statistics are updated twice per forward. "
                    "Use use_reentrant=False (the default) to update them once."
                )
        else:
            kwargs.setdefault("context_fn", checkpoint_contexts)
        super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def load_attention_kernels(self) -> tuple[str, ...]:
        """Load the GPU attention kernels `config.attention_kernel` asks for (see `resolve_attention_kernels`) and
        hand them to every attention layer; returns their names. Runs when the model is built; call it again
        after changing `config.attention_kernel`. Forward never loads a kernel."""
        loaded = resolve_attention_kernels(self.config)
        for module in self.modules():
            if isinstance(module, PeerMlaAttention):
                module.attention_kernels = loaded
        return loaded

    def kernelize_peer_experts(self, device=None, mode=None, trust_remote_code: bool = False) -> int:
        """Swap the forward of every `PeerExperts` for the `PeerExperts` layer of the Hub kernel repository
        `config.peer_kernel_repo` (`kernelize_experts`); returns how many were swapped.

        The kernel is loaded through `kernels.get_kernel`: from the Hub cache (offline, only there), downloaded when
        online. `device`: the model's by default; `mode`: see `kernelize_experts`. `trust_remote_code=True` allows a
        repository whose publisher the Hub does not mark as a trusted kernel publisher. The Triton kernel runs on
        CUDA, and on the CPU only under `TRITON_INTERPRET=1` (set before it is loaded)."""
        repository = peer_kernel_layer_repository(self.config, trust_remote_code=trust_remote_code)
        if repository is None:
            raise ValueError(
                "config.peer_kernel_repo names no kernel repository: set it to a Hub kernel repository "
                "('user/peer-kernel', published with `hfx peer-mla push-kernel`), or with hfx installed use "
                "hfx.peer_mla.training.kernelize_peer_experts, which loads the kernel hfx ships."
            )
        return kernelize_experts(self, repository, self.device if device is None else device, mode)

    def set_use_kernels(self, use_kernels, kernel_config=None, mode=None):
        """transformers' kernelize (`from_pretrained(..., use_kernels=True)`, `model.use_kernels = True`), with the
        PEER experts mapped to `config.peer_kernel_repo` (a `kernel_config` that maps `PeerExperts` wins).

        As for transformers' own kernels, one that cannot be used leaves the PyTorch forward: a repository that
        cannot be loaded (offline and not cached, an untrusted publisher: `kernelize_peer_experts` raises instead)
        is skipped with a warning naming the reason. On the CPU the Triton kernel runs only under
        `TRITON_INTERPRET=1`; without it the experts keep their PyTorch forward there."""
        device_type = self.device.type
        if (
            not use_kernels
            or self.config.peer_kernel_repo is None
            or (device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1")
            or importlib.util.find_spec("kernels") is None  # transformers raises its own error
        ):
            return super().set_use_kernels(use_kernels, kernel_config, mode)
        repository = peer_kernel_layer_repository(self.config)
        try:
            repository.load()  # here, so that a failure is this repository's and not one inside transformers
        except Exception as error:  # noqa: BLE001 - offline, untrusted, no build for this machine: all mean "not used"
            logger.warning(
                "use_kernels: the PEER kernel %s (revision %s) could not be loaded (%s: %s); the PEER experts "
                "keep their PyTorch forward.",
                self.config.peer_kernel_repo,
                self.config.peer_kernel_revision or f"v{PEER_KERNEL_VERSION}",
                type(error).__name__,
                error,
            )
            return super().set_use_kernels(use_kernels, kernel_config, mode)
        from kernels import use_kernel_mapping
        from transformers.integrations.hub_kernels import register_kernel_mapping_transformers

        # transformers registers its mapping process-wide; registered inside the context below, it would be dropped
        # when the context ends.
        register_kernel_mapping_transformers()
        with use_kernel_mapping({PEER_KERNEL_LAYER: {device_type: repository}}):
            return super().set_use_kernels(use_kernels, kernel_config, mode)


class PeerMlaModel(PeerMlaPreTrainedModel):
    def __init__(self, config: PeerMlaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [PeerMlaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = PeerMlaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = PeerMlaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.load_attention_kernels()
        self.post_init()

    def peer_layers(self) -> dict[int, PeerLayer]:
        return {i: layer.mlp for i, layer in enumerate(self.layers) if isinstance(layer.mlp, PeerLayer)}

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if not use_cache:
            past_key_values = None
        seq = inputs_embeds.shape[1]
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(seq, device=inputs_embeds.device) + past_seen).unsqueeze(0)
        # 2-D padding, 4-D custom masks, packed sequences (position_ids restarting inside a row), static caches:
        # transformers' mask utilities, in the form `config._attn_implementation` takes.
        # An empty dynamic cache gives the same mask as none; passed as none, the mask utilities also recognise
        # packed sequences (position_ids restarting inside a row, as TRL's padding-free batches have), which they
        # look for only without a cache.
        empty = isinstance(past_key_values, DynamicCache) and past_key_values.get_seq_length() == 0
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=None if empty else past_key_values,
            position_ids=position_ids,
        )
        # The PEER query BatchNorm leaves padding out of its statistics.
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and self.training:
            token_mask = attention_mask[:, -seq:].bool()
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                token_mask=token_mask,
                **kwargs,
            )
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values
        )


@dataclass
class ExpertUsage:
    """Per-layer retrieval counts since tracking was switched on: `counts[layer_idx]` is a (num_experts,) tensor."""

    counts: dict[int, torch.Tensor]

    def fraction_used(self) -> dict[int, float]:
        return {i: float((c > 0).float().mean()) for i, c in self.counts.items()}


class PeerMlaForCausalLM(PeerMlaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PeerMlaConfig):
        super().__init__(config)
        self.model = PeerMlaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    # Expert-usage statistics: off by default, so the forward pays nothing for them.
    def track_expert_usage(self, enabled: bool = True) -> None:
        for layer in self.model.peer_layers().values():
            if enabled and layer.expert_counts is None:
                layer.expert_counts = torch.zeros(
                    layer.experts.num_experts, dtype=torch.long, device=layer.experts.up_proj.device
                )
            elif not enabled:
                layer.expert_counts = None

    def reset_expert_usage(self) -> None:
        for layer in self.model.peer_layers().values():
            if layer.expert_counts is not None:
                layer.expert_counts.zero_()

    def expert_usage(self) -> ExpertUsage:
        counts = {
            i: layer.expert_counts.clone()
            for i, layer in self.model.peer_layers().items()
            if layer.expert_counts is not None
        }
        if not counts:
            raise RuntimeError("Expert usage is not being tracked; call model.track_expert_usage() first.")
        return ExpertUsage(counts)


PeerMlaConfig.register_for_auto_class()
PeerMlaModel.register_for_auto_class("AutoModel")
PeerMlaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "PeerMlaConfig",
    "PeerMlaModel",
    "PeerMlaForCausalLM",
    "PeerMlaPreTrainedModel",
    "PeerExperts",
    "PeerLayer",
    "kernelize_experts",
    "peer_kernel_layer_repository",
    "PeerProductKeyRouter",
    "PeerMlaAttention",
    "PeerQueryBatchNorm",
    "attention_path",
    "peer_experts_reference",
    "latent_cache_bytes_per_token",
    "resolve_attention_kernels",
]
