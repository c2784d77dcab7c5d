"""Grouped-query SDPA without copying the KV cache on the CPU, registered with transformers' ``AttentionInterface``.

transformers' ``sdpa`` attention repeats every key/value head for its query group (``repeat_kv``) whenever an
attention mask is present: a full copy of the cache per layer per step. Self-study always runs with a mask (a shared
prefix, then padded prompts), so on CPU that copy is most of the decode time. PyTorch's SDPA takes grouped heads
directly (``enable_gqa=True``), which on CPU is ~10x faster for SmolLM2's 9 query / 3 KV heads at 700 cached tokens.

The choice is made per call, from the device the tensors are on: a model loaded on the CPU and later moved to a GPU
runs transformers' own SDPA there (flash / memory-efficient kernels), since ``enable_gqa`` with a mask would send
CUDA's SDPA to its slow math path. There the backend is chosen on purpose: flash, memory-efficient or math, never
cuDNN, which builds a plan for every new (batch, query, key) shape of masked attention and returns NaN for a query
whose keys are all masked.

Off the CPU, a decode step (one query per row) never copies the cache either: transformers' SDPA would repeat every
key/value head for its query group (the whole cache, several times over, at every step), so instead the group's
query heads are folded into the query axis of their shared key/value head (:func:`grouped_decode_attention`): the
same attention, with the cache read in place by a kernel that takes the mask (memory-efficient).

The mask (:func:`sdpa_mask_without_empty_rows`) never has such a query either: a padding position with nothing to
attend to (left padding, a row of padding only) attends to every key. Its output is never read, but a NaN there
would reach the real positions through the next layer's keys and values.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "sdpa_gqa"
#: SDPA backends on an accelerator, in PyTorch's order of preference: cuDNN left out on purpose (see above).
ACCELERATOR_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_gqa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if query.device.type != "cpu":
        with sdpa_kernel(ACCELERATOR_BACKENDS):
            if query.shape[2] == 1 and key.shape[1] != query.shape[1] and not (dropout and module.training):
                folded = grouped_decode_attention(query, key, value, attention_mask, scaling=scaling)
                if folded is not None:
                    return folded, None
            return sdpa_attention_forward(
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                is_causal=is_causal,
                **kwargs,
            )
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout if module.training else 0.0,
        scale=scaling,
        is_causal=is_causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def grouped_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
) -> torch.Tensor | None:
    """SDPA of one query per row against grouped key/value heads, without repeating them: query ``[B, H, 1, D]``,
    key and value ``[B, H_kv, L, D]``, a mask ``[B, 1, 1, >=L]`` (boolean or additive) or None. The ``H / H_kv``
    query heads of a group become the query axis of their key/value head (``[B, H_kv, H / H_kv, D]``), which the
    mask broadcasts over. Returns ``[B, 1, H, D]`` as transformers' attention functions do, or None where the
    shapes are not those (several queries, a mask per head): the caller then takes the general path."""
    batch, heads, queries, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    if queries != 1 or heads % kv_heads:
        return None
    if attention_mask is not None:
        if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[2] != 1:
            return None
        attention_mask = attention_mask[:, :, :, :length]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, kv_heads, heads // kv_heads, dim),
        key,
        value,
        attn_mask=attention_mask,
        scale=scaling,
    )
    return out.reshape(batch, 1, heads, dim)


def sdpa_mask_without_empty_rows(*args, **kwargs) -> torch.Tensor | None:
    """transformers' SDPA mask, where a query that may attend to no key attends to every key instead (its output is
    padding, never read: only finite)."""
    mask = sdpa_mask(*args, **kwargs)
    if mask is None or mask.dtype != torch.bool:
        return mask
    return mask | ~mask.any(dim=-1, keepdim=True)


AttentionInterface.register(NAME, sdpa_gqa_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask_without_empty_rows)


def use_grouped_sdpa(model) -> None:
    """Route a model's ``sdpa`` attention through :func:`sdpa_gqa_attention_forward` (same math as ``sdpa``).

    Safe on any device: the grouped path runs only while the tensors are on the CPU."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(NAME)
