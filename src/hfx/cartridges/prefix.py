"""A KV-cache prefix shared by many sequences: a document prefilled once (ICL, synthesis) or a cartridge.

Both are the same object to the model, a per-layer (key, value) cache that later tokens attend to, so the
evaluation conditions and the synthesis teacher share one code path: prefill or load the prefix once, then
expand it to each batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache

from hfx.batching import padded


@dataclass
class PrefixKV:
    """Per-layer keys and values ``[1, kv_heads, tokens, head_dim]`` of a prefix."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes the prefix occupies in the KV cache of one sequence."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @classmethod
    def from_cache(cls, cache, detach: bool = True) -> PrefixKV:
        """The first sequence's keys and values of a cache (or of legacy ``(key, value)`` pairs); ``detach=False``
        keeps them in the autograd graph (a cartridge being trained)."""
        layers = cache.layers if hasattr(cache, "layers") else cache
        keys, values = [], []
        for layer in layers:
            k, v = (layer.keys, layer.values) if hasattr(layer, "keys") else (layer[0], layer[1])
            keys.append(k[:1].detach() if detach else k[:1])
            values.append(v[:1].detach() if detach else v[:1])
        return cls(keys, values)

    @classmethod
    @torch.no_grad()
    def prefill(cls, model, input_ids: list[int]) -> PrefixKV:
        """Run the model once over ``input_ids`` and keep its cache."""
        ids = torch.tensor([input_ids], device=model.device)
        # only the cache is kept: logits of the last position only (a long document's would fill the memory)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return cls.from_cache(out.past_key_values)

    @classmethod
    def concat(cls, prefixes: list[PrefixKV]) -> PrefixKV:
        """Several prefixes one after the other (cartridge composition): concatenated along the token axis."""
        if not prefixes:
            raise ValueError("Nothing to concatenate.")
        layers = {len(p.keys) for p in prefixes}
        if len(layers) != 1:
            raise ValueError(f"Prefixes have different numbers of layers: {sorted(layers)}.")
        return cls(
            [torch.cat([p.keys[i] for p in prefixes], dim=2) for i in range(len(prefixes[0].keys))],
            [torch.cat([p.values[i] for p in prefixes], dim=2) for i in range(len(prefixes[0].values))],
        )

    @classmethod
    def from_peft_model(cls, peft_model) -> PrefixKV:
        """The prefix a PEFT prompt-learning adapter (CARTRIDGE) feeds the base model."""
        with torch.no_grad():
            return cls.from_cache(peft_model.get_prompt(batch_size=1))

    def cache(self, batch_size: int, config, max_cache_len: int | None = None) -> DynamicCache | StaticCache:
        """A fresh cache holding this prefix for ``batch_size`` sequences (the model appends to it).

        With ``max_cache_len`` it is a preallocated ``StaticCache``: decoding then writes each new token in place
        instead of re-concatenating the whole cache at every step, which dominates decode time on CPU.
        """
        cache = (
            StaticCache(config=config, max_cache_len=max_cache_len)
            if max_cache_len
            else DynamicCache(config=config)
        )
        for layer_idx, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            cache.update(
                k.expand(batch_size, -1, -1, -1).contiguous(),
                v.expand(batch_size, -1, -1, -1).contiguous(),
                layer_idx,
            )
        return cache


def forward_with_prefix(
    model, prefix: PrefixKV | None, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs
):
    """Forward ``input_ids`` (right-padded) after ``prefix``; returns the model output."""
    if prefix is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    batch = input_ids.shape[0]
    prefix_mask = torch.ones(
        batch, prefix.num_tokens, dtype=attention_mask.dtype, device=attention_mask.device
    )
    return model(
        input_ids=input_ids,
        attention_mask=torch.cat([prefix_mask, attention_mask], dim=1),
        past_key_values=prefix.cache(batch, model.config),
        **kwargs,
    )


def generate_after_prefix(
    model, prefix: PrefixKV | None, prompts: list[list[int]], pad_token_id: int, **generate_kwargs
):
    """``model.generate`` for a batch of prompts that all continue the same prefix.

    The prefix's KV is expanded to the batch instead of being recomputed per sequence. Prompts are left-padded
    *between* the prefix and themselves; ``generate`` derives positions from the attention mask, so each prompt
    starts right after the prefix. Returns generate's output; new tokens start at ``output.sequences[:, width:]``
    where ``width`` is the returned second value.
    """
    prefix_len = prefix.num_tokens if prefix is not None else 0
    prompt_ids, prompt_mask = padded(prompts, pad_token_id, side="left")
    width = prompt_ids.shape[1]
    # The prefix's own ids are never read (its KV is already in the cache), but its columns are attended.
    ids = torch.cat([prompt_ids.new_full((len(prompts), prefix_len), pad_token_id), prompt_ids], dim=1)
    mask = torch.cat([prompt_mask.new_ones((len(prompts), prefix_len)), prompt_mask], dim=1)
    max_new_tokens = generate_kwargs.get("max_new_tokens") or model.generation_config.max_new_tokens
    cache = None
    if prefix is not None:
        cache = prefix.cache(len(prompts), model.config, max_cache_len=prefix_len + width + max_new_tokens)
        if model.device.type != "cpu":
            # generate compiles its decode step for a StaticCache on an accelerator; every call here has its own
            # cache length, so it would compile on every call (bulk decoding goes through hfx.generation)
            generate_kwargs.setdefault("disable_compile", True)
    output = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        past_key_values=cache,
        pad_token_id=pad_token_id,
        **generate_kwargs,
    )
    return output, prefix_len + width
