"""The PEER expert sum, forward + backward: the Triton kernel of hub_kernels/peer vs the model's PyTorch path.

The expert sum is the part of a PEER layer that the kernel replaces (`PeerExperts.forward`, swapped in by
`kernels.kernelize`): out[n] = sum_k w[n, k] * act(down[idx[n, k]] . x[n]) * up[idx[n, k]]. Both sides get the
same inputs: 2048 tokens, 262,144 single-neuron experts (512 x 512 product keys), 8 heads x top-16 = 128 experts
per token, hidden size 1024, GELU, bfloat16, and compute the output and the gradients of the hidden states, the
expert weights and both expert banks. The two alternate; times are medians, the device synchronized around each.

    python benchmarks/peer_kernel.py --device cuda
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/peer_kernel.py --device cpu --tokens 64 --experts 4096 --hidden 64

Prints `RESULT peer_expert_sum_triton_vs_pytorch <PyTorch time / Triton time>` last.
"""

from __future__ import annotations

import argparse
import os

import torch
from _measure import interleaved_times

from hfx.models import resolve_device, synchronize
from hfx.peer_mla.modeling_peer_mla import _PeerExpertsFunction
from hfx.peer_mla.training import peer_kernel_repository

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=262_144)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--per-token", type=int, default=128, help="experts per token (heads x top-k)")
    parser.add_argument("--expert-hidden", type=int, default=1, help="neurons per expert")
    parser.add_argument("--activation", default="gelu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit(
            "On the CPU the Triton kernel runs only under TRITON_INTERPRET=1 (slow; small sizes)."
        )
    dtype = DTYPES[args.dtype]

    from kernels import get_local_kernel

    kernel = get_local_kernel(peer_kernel_repository())
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype)

    shape = (args.experts, args.expert_hidden, args.hidden)
    hidden_states = randn(args.tokens, args.hidden).requires_grad_()
    expert_indices = torch.randint(
        0, args.experts, (args.tokens, args.per_token), generator=generator, device=device
    )
    expert_weights = torch.rand(args.tokens, args.per_token, generator=generator, device=device).to(dtype)
    expert_weights.requires_grad_()
    down_proj = randn(*shape, scale=args.hidden**-0.5).requires_grad_()
    up_proj = randn(*shape, scale=args.hidden**-0.5).requires_grad_()
    grad_out = randn(args.tokens, args.hidden)
    leaves = (hidden_states, expert_weights, down_proj, up_proj)

    def step(function):
        def run():
            out = function(hidden_states, expert_indices, expert_weights, down_proj, up_proj, args.activation)
            grads = torch.autograd.grad(out, leaves, grad_out)
            synchronize(device)
            return out, grads

        return run

    runs = {"pytorch": step(_PeerExpertsFunction.apply), "triton": step(kernel.peer_experts)}
    (out_pt, grads_pt), (out_tr, grads_tr) = runs["pytorch"](), runs["triton"]()
    difference = max(
        ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
        for a, b in zip((out_tr, *grads_tr), (out_pt, *grads_pt), strict=True)
    )
    del out_pt, grads_pt, out_tr, grads_tr
    times = interleaved_times(runs, repeats=args.repeats, warmup=1)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(
        f"PEER expert sum, forward + backward on {name}: {args.tokens} tokens x {args.per_token} of "
        f"{args.experts:,} experts ({args.expert_hidden} neuron(s) each), hidden {args.hidden}, {args.dtype}, "
        f"{args.activation}"
    )
    print(f"largest difference (output and gradients, relative to the PyTorch path): {difference:.2e}")
    print(f"{'':10s} {'time (ms)':>10s}")
    for label, seconds in times.items():
        print(f"{label:10s} {1000 * seconds:10.2f}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print(f"RESULT peer_expert_sum_triton_vs_pytorch {times['pytorch'] / times['triton']:.2f}")


if __name__ == "__main__":
    main()
