"""Read and replace one activation of a frozen causal LM: the output (residual stream) of decoder layer `layer` at
one position per sequence.

`replace_activations(model, layer, positions, values)` is a context manager under which every forward of `model`
sees `values[b]` instead of the layer's output at `positions[b]` of row b (and nothing else changes);
`next_token_logits` / `patched_next_token_logits` are the cheap form of it for the last token (what
training and evaluation measure). Reading them is
`hfx.lens.data.capture_batch`.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from hfx.batching import left_padded

from .modeling_lens import decoder_layers


def decoder_layer(model: nn.Module, layer: int) -> nn.Module:
    """Decoder layer `layer`, or a clear error naming the valid range."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(
            f"layer {layer} is out of range: {type(model).__name__} has decoder layers 0..{len(layers) - 1}."
        )
    return layers[layer]


def hidden_states_of(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def replace_activations(model: nn.Module, layer: int, positions: torch.Tensor, values: torch.Tensor):
    """Within the block, decoder layer `layer` outputs `values[b]` at `positions[b]` of row b; gradients flow into
    `values` (on any device: they are moved to the layer's)."""
    module = decoder_layer(model, layer)

    def hook(module, args, output):
        hidden = hidden_states_of(output)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        # The replacement may come from a lens on another device or in another dtype: it joins the hidden states.
        patched = hidden.index_put(
            (rows, positions.to(hidden.device)), values.to(device=hidden.device, dtype=hidden.dtype)
        )
        return (patched, *output[1:]) if isinstance(output, tuple) else patched

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def patched_next_token_logits(
    model: nn.Module, layer: int, input_ids: list[list[int]], values: torch.Tensor
) -> torch.Tensor:
    """The model's next-token logits (B, V) after each row's last token, with `values[b]` in place of the output
    of decoder layer `layer` at that token (gradients flow into `values`)."""
    return next_token_logits(model, layer, input_ids, {"patched": values})["patched"]


def next_token_logits(
    model: nn.Module, layer: int, input_ids: list[list[int]], replacements: dict[str, torch.Tensor | None]
) -> dict[str, torch.Tensor]:
    """For each named replacement, the next-token logits (B, V) after each row's last token with the output of
    decoder layer `layer` there replaced by it (None: the model's own activation).

    Only the last token depends on a replacement (the model is causal), so everything before it runs once,
    without autograd, and each replacement reruns just the last token against that KV cache."""
    device = next(model.parameters()).device
    ids, mask, position_ids = left_padded(input_ids, device)
    last = torch.zeros(ids.shape[0], dtype=torch.long, device=device)
    prefix = None
    if ids.shape[1] > 1:
        with torch.no_grad():
            prefix = model(
                input_ids=ids[:, :-1],
                attention_mask=mask[:, :-1],
                position_ids=position_ids[:, :-1],
                use_cache=True,
                logits_to_keep=1,
            ).past_key_values
    logits = {}
    names = list(replacements)
    for name in names:
        # a forward appends the last token to its cache: every pass but the last gets a copy
        cache = prefix if prefix is None or name == names[-1] else copy.deepcopy(prefix)
        values = replacements[name]
        patch = replace_activations(model, layer, last, values) if values is not None else nullcontext()
        with patch:
            logits[name] = model(
                input_ids=ids[:, -1:],
                attention_mask=mask,
                position_ids=position_ids[:, -1:],
                past_key_values=cache,
                use_cache=cache is not None,
            ).logits[:, -1]
    return logits
