"""PEER layer forward+backward: hfx's PeerLayer vs PEER-pytorch's PEER (PyPI `peer-pytorch`) at the same size.

Same configuration for both: hidden size, experts (a square number: PEER-pytorch supports two product-key parts
only), retrieval heads, experts per head, key size, GELU experts, softmax over the kept scores
(`non_competing_scores=False`), no pre-norm; hfx's BatchNorm on queries is switched off to match. Reports the
median time of forward+backward and the peak resident memory each adds (Linux VmHWM), and the ratios.

    .venv/bin/python benchmarks/peer_vs_peer_pytorch.py
    .venv/bin/python benchmarks/peer_vs_peer_pytorch.py --tokens 4096 --experts 65536 --hidden 1024
"""

from __future__ import annotations

import argparse
import math

import torch
from _measure import interleaved_times, peak_memory
from PEER_pytorch import PEER

from hfx.peer_mla.configuration_peer_mla import PeerMlaConfig
from hfx.peer_mla.modeling_peer_mla import PeerLayer


def build(args):
    side = math.isqrt(args.experts)
    if side * side != args.experts:
        raise SystemExit("--experts must be a square number (PEER-pytorch uses two equal product-key parts)")
    baseline = PEER(
        dim=args.hidden,
        heads=args.heads,
        num_experts=args.experts,
        num_experts_per_head=args.topk,
        dim_key=args.key_dim,
        product_key_topk=args.topk,
        non_competing_scores=False,
        pre_rmsnorm=False,
    )
    config = PeerMlaConfig(
        hidden_size=args.hidden,
        product_key_dim=[side, side],
        peer_num_heads=args.heads,
        num_experts_per_tok=args.topk,
        peer_query_dim=2 * args.key_dim,
        peer_batch_norm=False,
        peer_activation="gelu",
    )
    ours = PeerLayer(config)
    for module in (ours, baseline):
        for param in module.parameters():
            torch.nn.init.normal_(param, std=0.02)
    return ours, baseline


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per batch (batch 4 x tokens/4)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--key-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours, baseline = build(args)
    x = torch.randn(4, args.tokens // 4, args.hidden)

    def step(module):
        def run():
            inputs = x.clone().requires_grad_(True)
            module(inputs).square().mean().backward()
            module.zero_grad(set_to_none=True)

        return run

    runs = {"hfx PeerLayer": step(ours), "PEER-pytorch": step(baseline)}
    times = interleaved_times(runs, repeats=args.repeats)
    memory = {name: peak_memory(run) for name, run in runs.items()}
    print(
        f"PEER fwd+bwd: {args.tokens} tokens, hidden {args.hidden}, {args.experts} experts, "
        f"{args.heads} heads x top-{args.topk}, key {args.key_dim}, {args.threads} threads"
    )
    print(f"{'':16s} {'time (ms)':>10s} {'peak MB':>9s}")
    for name in runs:
        print(f"{name:16s} {1000 * times[name]:10.1f} {memory[name] / 2**20:9.1f}")
    print(f"speed-up: {times['PEER-pytorch'] / times['hfx PeerLayer']:.2f}x")
    print(f"peak memory ratio (PEER-pytorch / hfx): {memory['PEER-pytorch'] / memory['hfx PeerLayer']:.2f}x")


if __name__ == "__main__":
    main()
