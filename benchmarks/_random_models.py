"""Random-weight causal LMs shaped like real ones, for benchmarks on machines without their weights (a GPU machine
with no network: only code and configs travel). Throughput depends on the shapes, not on the values."""

from __future__ import annotations

import torch

#: Llama-family shapes of public checkpoints (their config.json values that set compute and memory).
SHAPES = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
}


def tokenizer_for(shape: str):
    """A small chat tokenizer (trained on bundled text) filled up to the shape's vocabulary with plain added tokens,
    so every id a random model samples decodes to some text (synthesis drops empty questions)."""
    from hfx.tokenization import small_chat_tokenizer

    tokenizer = small_chat_tokenizer()
    tokenizer.add_tokens([f"<r{i}>" for i in range(SHAPES[shape]["vocab_size"] - len(tokenizer))])
    return tokenizer


def random_causal_lm(shape: str, tokenizer, device: torch.device, dtype: torch.dtype):
    """A ``LlamaForCausalLM`` of ``shape`` with random weights on ``device`` in ``dtype``, in eval mode, with the
    special tokens of ``tokenizer`` (whose ids must fit the vocabulary) and hfx's per-device attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hfx.attention import use_grouped_sdpa

    if shape not in SHAPES:
        raise SystemExit(f"--random-model must be one of {', '.join(SHAPES)}, got {shape!r}.")
    config = LlamaConfig(
        **SHAPES[shape],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config._attn_implementation = "sdpa"
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    torch.random.set_rng_state(generator_state)
    use_grouped_sdpa(model)
    return model
