"""Training-step throughput: PEER-MLA vs its dense-FFN baseline at the same active parameters per token.

Both models come from the same pretraining config (`examples/peer_mla/configs/model_cpu.yaml`, 8192-token
vocabulary); the dense one is `--mlp dense` (`hfx.peer_mla.training.dense_baseline_config`: every PEER layer a
SwiGLU MLP, width chosen so the active parameters per token match). One step = forward + backward + AdamW step on
a (batch, block) of token ids, as in `pretrain.py`. The steps of the two models alternate; tokens/s are medians.

With `--precisions` the same comparison runs per precision on a CUDA device: fp32, bf16 (autocast) and fp8
(torchao float8 training of the Linear layers, under bf16 autocast), each also as a ratio to fp32. On CUDA the
PEER experts run the Triton kernel of hub_kernels/peer, kernelized as pretraining does (`--peer-kernel auto`, or
`triton`; `pytorch` keeps the model's own forward), the defaults are bf16 and batch 32 x 256 tokens, and the device
is synchronized around every timed step.

    .venv/bin/python benchmarks/peer_mla_train_step.py
    python benchmarks/peer_mla_train_step.py --device cuda --peer-kernel triton
    python benchmarks/peer_mla_train_step.py --device cuda --batch 32 --block 1024 --precisions fp32 bf16 fp8

Prints `RESULT peer_mla_vs_dense_train_step_<precision> <PEER-MLA tokens/s / dense tokens/s>` last (the last
precision).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext

import torch
from _measure import profile_call

from hfx.models import resolve_device, synchronize
from hfx.peer_mla.analysis import analyze_parameters
from hfx.peer_mla.modeling_peer_mla import PeerMlaForCausalLM
from hfx.peer_mla.training import (
    PEER_KERNELS,
    ModelArguments,
    build_config,
    choose_peer_kernel,
    convert_to_fp8,
    kernelize_peer_experts,
)


def make_step(model, batch, precision: str, device: torch.device):
    # fused: a few kernels per step, on any device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision in ("bf16", "fp8") else nullcontext()
    )

    def step():
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return loss

    return step


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model_config", default="examples/peer_mla/configs/model_cpu.yaml")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on the CPU, 32 on a GPU")
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=None,
        choices=["fp32", "bf16", "fp8"],
        help="default: fp32 on the CPU, bf16 on a GPU",
    )
    parser.add_argument(
        "--peer-kernel",
        choices=PEER_KERNELS,
        default="auto",
        help="PEER experts: triton (hub_kernels/peer, kernelized), pytorch, or auto (triton on CUDA)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile one step of each model and print its N most expensive operators (kernels on a GPU)",
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    on_gpu = device.type != "cpu"
    args.batch = args.batch or (32 if on_gpu else 8)
    args.precisions = args.precisions or (["bf16"] if on_gpu else ["fp32"])
    peer_kernel = choose_peer_kernel(args.peer_kernel, device)  # refuses triton where it cannot run
    torch.manual_seed(0)
    batch = torch.randint(0, args.vocab_size, (args.batch, args.block), device=device)
    tokens = batch.numel()

    configs = {
        mlp: build_config(
            ModelArguments(
                model_config=args.model_config, mlp=mlp, model_overrides={"vocab_size": args.vocab_size}
            )
        )
        for mlp in ("peer", "dense")
    }
    for mlp, config in configs.items():
        report = analyze_parameters(config)
        extra = (
            f", {config.num_experts:,} experts"
            if config.num_experts
            else f", MLP width {config.intermediate_size}"
        )
        print(f"{mlp:5s}: {report.total:>12,} parameters, {report.active:>10,} active per token{extra}")
    print(
        f"device {device}, batch {args.batch} x block {args.block} = {tokens:,} tokens per step, "
        f"PEER experts on {peer_kernel}\n"
    )

    base = {mlp: PeerMlaForCausalLM(config) for mlp, config in configs.items()}
    results: dict[str, dict[str, float]] = {}
    for precision in args.precisions:
        steps = {}
        for mlp, model in base.items():
            model = copy.deepcopy(model).to(device).train()
            if precision == "fp8":
                convert_to_fp8(model)
            if peer_kernel == "triton" and model.model.peer_layers():
                kernelize_peer_experts(model, device)
            steps[mlp] = make_step(model, batch, precision, device)
        for fn in steps.values():  # warm-up (allocations, kernel selection)
            fn()
            fn()
        times = {mlp: [] for mlp in steps}
        for _ in range(args.repeats):
            for mlp, fn in steps.items():
                start = time.perf_counter()
                fn()
                times[mlp].append(time.perf_counter() - start)
        results[precision] = {mlp: tokens / statistics.median(t) for mlp, t in times.items()}
        if args.profile:
            for mlp, fn in steps.items():
                profile_call(
                    fn,
                    f"{mlp}, {precision}: one step",
                    device,
                    args.profile,
                    f"peer_mla_step_{mlp}_{precision}",
                )
        del steps

    print("| precision | PEER-MLA tokens/s | dense tokens/s | PEER / dense | PEER vs fp32 | dense vs fp32 |")
    print("|---|---|---|---|---|---|")
    for precision, speed in results.items():
        fp32 = results.get("fp32")
        vs = (
            (f"{speed['peer'] / fp32['peer']:.2f}x", f"{speed['dense'] / fp32['dense']:.2f}x")
            if fp32
            else ("", "")
        )
        print(
            f"| {precision} | {speed['peer']:,.0f} | {speed['dense']:,.0f} | {speed['peer'] / speed['dense']:.2f} "
            f"| {vs[0]} | {vs[1]} |"
        )
    precision, speed = list(results.items())[-1]
    print(f"RESULT peer_mla_vs_dense_train_step_{precision} {speed['peer'] / speed['dense']:.2f}")


if __name__ == "__main__":
    main()
