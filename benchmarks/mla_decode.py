"""MLA decode, absorbed vs naive, on the same model and cache at a short and a long context.

Naive: every step up-projects the whole latent cache to per-head keys and values. Absorbed: the key
up-projection is folded into the query and the value up-projection into the output, and attention runs over the
latent directly. Both start from the same prefilled latent cache (prefill not timed); the decode steps of the
two modes alternate, and tokens/s are medians over repeats.

    .venv/bin/python benchmarks/mla_decode.py
    .venv/bin/python benchmarks/mla_decode.py --contexts 256 8192 --steps 16
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from hfx.peer_mla.configuration_peer_mla import PeerMlaConfig
from hfx.peer_mla.modeling_peer_mla import PeerMlaForCausalLM


def decode(model, cache, token, steps):
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return steps * token.shape[0] / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 4096])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = PeerMlaConfig(
        vocab_size=1024,
        hidden_size=1024,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        intermediate_size=1024,
        peer_layers=None,
        max_position_embeddings=max(args.contexts) + args.steps + 1,
    )
    model = PeerMlaForCausalLM(config).eval()
    print(
        f"decode tokens/s, {args.layers} layers, 16 heads, kv_lora_rank 512 + rope 64, batch {args.batch}, "
        f"{args.steps} steps, fp32, {torch.get_num_threads()} threads"
    )
    print(f"{'context':>8s} {'naive':>9s} {'absorbed':>9s} {'ratio':>6s}")
    with torch.no_grad():
        for context in args.contexts:
            ids = torch.randint(0, config.vocab_size, (args.batch, context))
            config.mla_absorb = "never"
            prefill = model(ids, use_cache=True)
            token = prefill.logits[:, -1:].argmax(-1)
            rates = {"never": [], "always": []}
            for _ in range(args.repeats):
                for mode in rates:
                    config.mla_absorb = mode
                    rates[mode].append(
                        decode(model, copy.deepcopy(prefill.past_key_values), token, args.steps)
                    )
            naive, absorbed = statistics.median(rates["never"]), statistics.median(rates["always"])
            print(f"{context:8d} {naive:9.1f} {absorbed:9.1f} {absorbed / naive:5.2f}x")


if __name__ == "__main__":
    main()
