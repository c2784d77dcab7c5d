"""Grouped-query SDPA without copying the KV cache on the CPU, registered with transformers' ``AttentionInterface``.

transformers' ``sdpa`` attention repeats every key/value head for its query group (``repeat_kv``) whenever an
attention mask is present: a full copy of the cache per layer per step. Self-study always runs with a mask (a shared
prefix, then padded prompts), so on CPU that copy is most of the decode time. PyTorch's SDPA takes grouped heads
directly (``enable_gqa=True``), which on CPU is ~10x faster for SmolLM2's 9 query / 3 KV heads at 700 cached tokens.

The choice is made per call, from the device the tensors are on: a model loaded on the CPU and later moved to a GPU
runs transformers' own SDPA there (flash / memory-efficient kernels), since ``enable_gqa`` with a mask would send
CUDA's SDPA to its slow math path.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "sdpa_gqa"


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


AttentionInterface.register(NAME, sdpa_gqa_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_grouped_sdpa(model) -> None:
    """Route a model's ``sdpa`` attention through :func:`sdpa_gqa_attention_forward` (same math as ``sdpa``).

    Safe on any device: the grouped path runs only while the tensors are on the CPU."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(NAME)
