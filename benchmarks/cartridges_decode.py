"""Decode throughput after a cartridge (p KV tokens) vs after the whole document in context (ICL).

    .venv/bin/python benchmarks/cartridges_decode.py --corpus rcv1 --p 96
    python benchmarks/cartridges_decode.py --random-model llama-3.2-1b --contexts 2048 8192 32768 --p 2048 \\
        --batch 32 --device cuda

    python benchmarks/cartridges_decode.py --random-model llama-3.2-1b --contexts 32768 131072 --p 2048 \
        --peak-memory-gib 60 --new-tokens 128 --device cuda

The first form uses the embedded model and a real document. The second builds a random-weight model of a public
shape (no weights needed, for a GPU machine with no network) and prefills random token ids as the "document" of each
context length; only shapes matter for throughput. The cartridge's prefix has p tokens whatever the context, so its
share of the KV cache (and of each decode step's memory traffic) shrinks as the context grows.

Decoding goes through ``hfx.cartridges.evaluation.decode_throughput`` (the loop synthesis uses): on a GPU one
untimed call builds the batch's decode step, then the mean of ``--repeats`` timed calls is taken.

``--peak-memory-gib`` measures as the Cartridges paper does: for each condition, the largest batch whose KV cache
(prefix, prompt and new tokens of every sequence, at the cache length the decode loop allocates) fits that many GiB,
and the tokens/s at that batch (``RESULT cartridge_decode_peak_<context>``, the cartridge's over ICL's). The paper
reports 26.4x at ICL quality on an H100.
"""

import argparse
import random

import torch

from hfx.cartridges.evaluation import Condition, decode_throughput
from hfx.cartridges.prefix import PrefixKV
from hfx.models import resolve


def prompts_for(batch: int) -> list[str]:
    return [f"Question {i}: what does the document say about its data?" for i in range(batch)]


def measure(model, tokenizer, icl: Condition, cartridge: Condition, args) -> dict[str, float]:
    results = {}
    for condition in (icl, cartridge):
        results[condition.name] = decode_throughput(
            model,
            tokenizer,
            condition,
            prompts_for(args.batch),
            new_tokens=args.new_tokens,
            repeats=args.repeats,
        )
    return results


def embedded_document(args, device, dtype) -> None:
    from peft import CartridgeConfig, get_peft_model

    from hfx.cartridges.corpus import load_corpus
    from hfx.cartridges.evaluation import cartridge_condition, icl_condition
    from hfx.models import load_causal_lm

    model, tokenizer = load_causal_lm("embedded", device=device, dtype=dtype)
    corpus = load_corpus(args.corpus, tokenizer)
    icl = icl_condition(model, tokenizer, corpus.text)
    peft_model = get_peft_model(model, CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.p))
    cartridge = cartridge_condition(peft_model)
    with peft_model.disable_adapter():
        results = measure(peft_model.get_base_model(), tokenizer, icl, cartridge, args)
    print(
        f"corpus {corpus.name}: ICL prefix {icl.prefix.num_tokens} tokens ({icl.prefix.nbytes / 2**20:.1f} MiB/seq), "
        f"cartridge {args.p} tokens ({cartridge.prefix.nbytes / 2**20:.1f} MiB/seq)"
    )
    for name, tps in results.items():
        print(
            f"{name:24s} {tps:8.1f} tokens/s (batch {args.batch}, {args.new_tokens} new tokens, best of {args.repeats})"
        )
    ratio = results[cartridge.name] / results[icl.name]
    print(
        f"ratio cartridge/ICL throughput: {ratio:.2f}x; "
        f"KV bytes ICL/cartridge: {icl.prefix.nbytes / cartridge.prefix.nbytes:.1f}x"
    )
    print(f"RESULT cartridge_decode_{corpus.name} {ratio:.3f}")


def kv_bytes_per_sequence(model, prefix_tokens: int, tokenizer, new_tokens: int) -> int:
    """KV bytes one sequence holds in the decode loop: the cache length it allocates for the prefix, the prompt
    (bucketed width) and the new tokens."""
    from hfx.cartridges.corpus import user_turn_ids
    from hfx.generation import WIDTH_FLOOR, bucket, bucket_length, kv_bytes_per_token

    prompt = max(len(user_turn_ids(tokenizer, p, after_system=True)) for p in prompts_for(1))
    return kv_bytes_per_token(model) * bucket_length(prefix_tokens + bucket(prompt, WIDTH_FLOOR) + new_tokens)


def peak_throughput(
    model, tokenizer, icl: Condition, cartridge: Condition, args
) -> tuple[int, float, int, float]:
    from hfx.generation import bucket_at_most

    budget = int(args.peak_memory_gib * 2**30)
    per_sequence = {
        c.name: kv_bytes_per_sequence(model, c.prefix.num_tokens, tokenizer, args.new_tokens)
        for c in (icl, cartridge)
    }
    # the largest batch of the decode loop's ladder whose KV fits the budget
    batches = {
        name: bucket_at_most(min(args.max_batch, budget // size)) for name, size in per_sequence.items()
    }
    # Each decode step reads the whole cache it holds: where that reading bounds a step, tokens/s come to about
    # bandwidth / KV per sequence whatever the batch, so the cartridge's tokens/s exceed ICL's by about the ratio of
    # their KV per sequence; beyond it only by what ICL's smaller batch pays more per token for the rest (the
    # weights read once per step, launches). The KV ratio is printed beside the measured one.
    kv_ratio = per_sequence[icl.name] / per_sequence[cartridge.name]
    context = icl.prefix.num_tokens
    print(
        f"  KV per sequence (the cache length the loop allocates): ICL {per_sequence[icl.name] / 2**20:.0f} MiB, "
        f"cartridge {per_sequence[cartridge.name] / 2**20:.0f} MiB: {kv_ratio:.1f}x, about the most the throughput "
        "ratio reaches where reading the cache bounds a decode step",
        flush=True,
    )
    print(f"RESULT cartridge_decode_peak_kv_ratio_{context} {kv_ratio:.3f}")
    row = []
    for condition in (icl, cartridge):
        batch = batches[condition.name]
        tps = decode_throughput(
            model,
            tokenizer,
            condition,
            prompts_for(batch),
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            max_seconds=args.max_seconds,
        )
        row.append((batch, tps))
        # as soon as it is known: a run stopped by its time limit still shows the conditions it measured
        print(
            f"  {condition.name}: batch {batch} ({batch * per_sequence[condition.name] / 2**30:.1f} GiB of KV), "
            f"{tps:.0f} tok/s",
            flush=True,
        )
        if model.device.type == "cuda":
            from hfx.generation import decoder_for

            decoder_for(model).clear()  # this batch's cache is not needed again
            torch.cuda.empty_cache()
    (icl_batch, icl_tps), (cart_batch, cart_tps) = row
    return icl_batch, icl_tps, cart_batch, cart_tps


def random_documents(args, device, dtype) -> None:
    from _random_models import random_causal_lm

    from hfx.tokenization import small_chat_tokenizer

    tokenizer = small_chat_tokenizer()
    model = random_causal_lm(args.random_model, tokenizer, device, dtype)
    rng = random.Random(0)
    random_ids = [rng.randrange(len(tokenizer)) for _ in range(max(args.contexts + [args.p]))]
    cartridge = Condition(f"cartridge (p={args.p})", PrefixKV.prefill(model, random_ids[: args.p]), False)
    print(
        f"{args.random_model} (random weights) on {device}, {str(dtype).removeprefix('torch.')}: batch {args.batch}, "
        f"{args.new_tokens} new tokens, mean of {args.repeats}; cartridge p={args.p} "
        f"({cartridge.prefix.nbytes / 2**20:.0f} MiB/seq)"
    )
    print(f"{'context':>8} {'ICL tok/s':>10} {'cartridge tok/s':>16} {'ratio':>7} {'KV ratio':>9}")
    for context in args.contexts:
        icl = Condition(f"ICL ({context})", PrefixKV.prefill(model, random_ids[:context]), True)
        if not args.skip_fixed:
            results = measure(model, tokenizer, icl, cartridge, args)
            ratio = results[cartridge.name] / results[icl.name]
            print(
                f"{context:>8} {results[icl.name]:>10.0f} {results[cartridge.name]:>16.0f} {ratio:>6.2f}x "
                f"{icl.prefix.nbytes / cartridge.prefix.nbytes:>8.1f}x"
            )
            print(f"RESULT cartridge_decode_{context} {ratio:.3f}")
        if args.peak_memory_gib:
            icl_batch, icl_tps, cart_batch, cart_tps = peak_throughput(model, tokenizer, icl, cartridge, args)
            print(
                f"{context:>8} peak within {args.peak_memory_gib:g} GiB of KV: ICL batch {icl_batch} "
                f"{icl_tps:.0f} tok/s, cartridge batch {cart_batch} {cart_tps:.0f} tok/s, "
                f"{cart_tps / icl_tps:.2f}x"
            )
            print(f"RESULT cartridge_decode_peak_{context} {cart_tps / icl_tps:.3f}")
        del icl
        if device.type == "cuda":
            from hfx.generation import decoder_for

            decoder_for(model).clear()
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default="rcv1", help="document of the embedded-model form")
    parser.add_argument(
        "--random-model",
        default=None,
        help="a random-weight model of this shape instead: smollm2-135m, llama-3.2-1b",
    )
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=[2048, 8192, 32768], help="ICL lengths of the random form"
    )
    parser.add_argument(
        "--p", type=int, default=96, help="cartridge tokens (throughput does not depend on its values)"
    )
    parser.add_argument("--batch", type=int, default=16, help="the fixed batch of both conditions")
    parser.add_argument(
        "--peak-memory-gib",
        type=float,
        default=0.0,
        help="also the peak batch of each condition within this much KV memory, and its tokens/s (random form)",
    )
    parser.add_argument("--max-batch", type=int, default=1024, help="the largest peak batch tried")
    parser.add_argument(
        "--skip-fixed", action="store_true", help="only the peak batches (with --peak-memory-gib)"
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="fewer timed repeats of a peak batch when they would take longer than this (one at least)",
    )
    parser.add_argument("--device", default=None, help="default: accelerate's device of this process")
    parser.add_argument(
        "--dtype", default="auto", help="default: bfloat16 on a GPU that supports it, else float32"
    )
    args = parser.parse_args()
    device, dtype = resolve(args.device, args.dtype)
    if args.random_model:
        random_documents(args, device, dtype)
    else:
        embedded_document(args, device, dtype)


if __name__ == "__main__":
    main()
