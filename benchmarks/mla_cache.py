"""KV-cache memory: PEER-MLA vs transformers' DeepseekV3 attention at the same dimensions.

Both models get DeepSeek-V3's attention sizes (128 heads, q_lora_rank 1536, kv_lora_rank 512, qk_nope 128,
qk_rope 64, v 128) on a narrow, shallow body (the cache does not depend on it), in bf16.

1. Cache bytes per token per layer after a prefill, counted tensor by tensor, next to the per-head K/V layout
   (what an attention that caches expanded keys and values holds).
2. One decode step against a long cache (the same random latent cache for both): the peak memory the step adds
   (Linux VmHWM) and its time. DeepseekV3 expands the whole cache to per-head keys and values at every step;
   PEER-MLA attends over the latent with weight absorption.

    .venv/bin/python benchmarks/mla_cache.py
    .venv/bin/python benchmarks/mla_cache.py --decode-context 8192
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _measure import peak_memory
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.cache_utils import DynamicCache

from hfx.peer_mla.configuration_peer_mla import PeerMlaConfig
from hfx.peer_mla.modeling_peer_mla import PeerMlaForCausalLM, latent_cache_bytes_per_token

ATTENTION = dict(
    num_attention_heads=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
)


def cache_bytes(cache) -> int:
    return sum(
        tensor.numel() * tensor.element_size()
        for layer in cache.layers
        for tensor in (layer.keys, layer.values)
        if tensor is not None
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--decode-context", type=int, default=4096)
    args = parser.parse_args()
    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=512, num_hidden_layers=args.layers, intermediate_size=512)
    deepseek = DeepseekV3ForCausalLM(
        DeepseekV3Config(
            **common,
            **ATTENTION,
            num_key_value_heads=128,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=args.layers,
            num_mtp_layers=0,
        )
    )
    ours = PeerMlaForCausalLM(PeerMlaConfig(**common, **ATTENTION, peer_layers=None))
    ids = torch.randint(0, 512, (1, args.tokens))
    per_token = {}
    with torch.no_grad():
        for name, model in (("transformers DeepseekV3", deepseek), ("hfx PEER-MLA", ours)):
            model = model.to(torch.bfloat16).eval()
            cache = model(ids, use_cache=True).past_key_values
            per_token[name] = cache_bytes(cache) / args.tokens / args.layers
    expected = latent_cache_bytes_per_token(ours.config, torch.bfloat16) / args.layers
    print(
        f"bf16 KV cache after a {args.tokens}-token prefill, DeepSeek-V3 attention sizes, per token per layer:"
    )
    for name, value in per_token.items():
        print(f"  {name:24s} {value:9.0f} bytes")
    print(f"  (latent: (kv_lora_rank + qk_rope_head_dim) x 2 bytes = {expected:.0f})")
    per_head = (
        ATTENTION["num_attention_heads"]
        * (ATTENTION["qk_nope_head_dim"] + ATTENTION["qk_rope_head_dim"] + ATTENTION["v_head_dim"])
        * 2
    )
    print(f"  {'per-head K/V layout':24s} {per_head:9.0f} bytes")
    ratio = per_token["transformers DeepseekV3"] / per_token["hfx PEER-MLA"]
    print(
        f"cache ratio, DeepseekV3 / PEER-MLA: {ratio:.2f}x; per-head K/V / PEER-MLA: {per_head / expected:.1f}x"
    )

    # 2. one decode step against a long latent cache
    config = ours.config
    cache = DynamicCache(config=config)
    generator = torch.Generator().manual_seed(0)
    for layer in range(args.layers):
        latent = torch.randn(1, 1, args.decode_context, config.kv_lora_rank, generator=generator)
        rope = torch.randn(1, 1, args.decode_context, config.qk_rope_head_dim, generator=generator)
        cache.update(latent.bfloat16(), rope.bfloat16(), layer)
    token = torch.tensor([[7]])
    position = torch.tensor([[args.decode_context]])
    results = {}
    with torch.no_grad():
        for name, model in (("transformers DeepseekV3", deepseek), ("hfx PEER-MLA", ours)):

            def step(model=model, cache=None):
                model(token, past_key_values=cache, position_ids=position, use_cache=True)

            step(cache=copy.deepcopy(cache))  # warm-up
            fresh = copy.deepcopy(cache)  # copied outside the measurement: each step appends to its cache
            start = time.perf_counter()
            step(cache=fresh)
            seconds = time.perf_counter() - start
            fresh = copy.deepcopy(cache)
            results[name] = (peak_memory(lambda step=step, fresh=fresh: step(cache=fresh)), seconds)
    print(f"one decode step against a {args.decode_context}-token cache, {args.layers} layers, bf16:")
    for name, (memory, seconds) in results.items():
        print(f"  {name:24s} peak +{memory / 2**20:8.1f} MB {1000 * seconds:8.1f} ms")
    (mem_ds, t_ds), (mem_ours, t_ours) = results.values()
    # Allocations under ~1 MB come from memory the process already holds and do not move the high-water mark.
    floor = 2**20
    memory_ratio = (
        f"{mem_ds / mem_ours:.1f}x" if mem_ours >= floor else f"> {mem_ds / floor:.0f}x (PEER-MLA < 1 MB)"
    )
    print(
        f"decode-step peak memory ratio (DeepseekV3 / PEER-MLA): {memory_ratio}; time ratio {t_ds / t_ours:.1f}x"
    )


if __name__ == "__main__":
    main()
