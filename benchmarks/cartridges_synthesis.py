"""Synthesis throughput: batches sharing one chunk's KV vs one conversation at a time.

    .venv/bin/python benchmarks/cartridges_synthesis.py --conversations 16
    python benchmarks/cartridges_synthesis.py --random-model smollm2-135m --device cuda --cpu-reference 0.5
    python benchmarks/cartridges_synthesis.py --random-model smollm2-135m --device cuda --batch auto --conversations 2048

The second form synthesizes with a random-weight model of SmolLM2-135M's shape (no weights needed: a GPU machine
with no network) and a small tokenizer trained on bundled text; every answer then runs to its token limit, so the
work per conversation is fixed. ``--cpu-reference`` is the batched conv/s of the same command with ``--device cpu``
on another machine: the GPU/CPU ratio is printed against it. ``--batch auto`` sizes the batch to the device
(``hfx.cartridges.synthesis.resolve_conversations_per_chunk``: 32 on a CPU, what the GPU's memory holds there).

Before the timed run, the same number of conversations is synthesized once with another seed (other chunks, other
lengths): the decode loop's buckets are warmed up there (a CUDA graph captured per bucket on a GPU). The counters of
``hfx.generation`` are printed for the warm-up and for the timed run: graph captures and compilations after warm-up
should be 0, and the shapes few.
"""

import argparse
import dataclasses
import tempfile
import time

from hfx.cartridges.corpus import load_corpus
from hfx.cartridges.synthesis import SynthesisConfig, resolve_conversations_per_chunk, synthesize
from hfx.generation import decoder_for
from hfx.models import load_causal_lm, resolve, synchronize


def run(model, tokenizer, corpus, config: SynthesisConfig) -> tuple[float, int, dict]:
    """conv/s, answer tokens, and what the decode loop did (its counters' change) in one synthesis."""
    before = decoder_for(model).stats.snapshot()
    with tempfile.TemporaryDirectory() as out:
        synchronize(model.device)
        start = time.perf_counter()
        dataset = synthesize(model, tokenizer, corpus, out, config, progress=False)
        synchronize(model.device)
        elapsed = time.perf_counter() - start
    after = decoder_for(model).stats.snapshot()
    counters = {k: after[k] - before[k] for k in after if k != "shapes"} | {"shapes (all)": after["shapes"]}
    return (
        len(dataset) / elapsed,
        sum(len(ids) - s for ids, s in zip(dataset["input_ids"], dataset["answer_start"], strict=False)),
        counters,
    )


def warm_then_time(model, tokenizer, corpus, config: SynthesisConfig, label: str) -> float:
    _, _, warm = run(model, tokenizer, corpus, dataclasses.replace(config, seed=config.seed + 1))
    rate, tokens, timed = run(model, tokenizer, corpus, config)
    print(f"{label}: {rate:.3f} conv/s ({tokens} answer tokens)")
    print(f"  decode loop, warm-up: {warm}")
    print(f"  decode loop, timed:   {timed}")
    print(
        f"RESULT synthesis_graph_captures_after_warmup_{config.conversations_per_chunk} {timed['graph_captures']}"
    )
    print(f"RESULT synthesis_compiles_after_warmup_{config.conversations_per_chunk} {timed['compiles']}")
    return rate


def profile(model, tokenizer, corpus, config: SynthesisConfig, rows: int) -> None:
    """Where one batch's time goes: operators by self time, and the share of the three that dominate."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from hfx.cartridges.synthesis import synthesize_batch

    synthesize_batch(model, tokenizer, corpus, config, 0)  # warm-up
    cuda = model.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        synthesize_batch(model, tokenizer, corpus, config, 1)
        synchronize(model.device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    print(events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=rows))
    if cuda:  # the GPU's busy time (its kernels, copies and fills) against the batch's wall time, profiled
        busy = sum(e.self_device_time_total for e in events) / 1e6
        print(f"the device busy {busy:.3f} s of the profiled batch's {wall:.3f} s")
        print(f"RESULT synthesis_profile_device_busy_share {busy / wall:.3f}")
    total = sum(e.self_cpu_time_total for e in events)
    groups = {
        "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
        "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_flash_attention_forward"),
        "sampling": ("aten::exponential_", "aten::multinomial", "aten::sort", "aten::topk"),
    }
    for group, names in groups.items():
        share = sum(e.self_cpu_time_total for e in events if e.key in names) / total
        print(f"RESULT synthesis_profile_{group}_share {share:.3f}")
    phases(model, tokenizer, corpus, config)


def phases(model, tokenizer, corpus, config: SynthesisConfig) -> dict[str, float]:
    """Where one batch's wall time goes, on any device: each part timed with the device synchronized around it.

    The chunk's prefill; in each decode call, the prompts' prefill (the model's eager forward), the decode steps
    (one replayed CUDA graph each on a GPU: its kernels' time, and its launch) and the rest of the call (the
    prompts' padding and mask, the first token's choice, the tokens back to the host); the re-scoring of quoted conversations; and the host's
    work around them (chat templates, tokenizing, detokenizing, the rows). A GPU that waits on the host shows here
    as a large host share beside short decode steps."""
    import hfx.cartridges.synthesis as synthesis_module
    from hfx.cartridges.prefix import PrefixKV
    from hfx.cartridges.synthesis import synthesize_batch

    device = model.device
    decoder = decoder_for(model)
    seconds: dict[str, float] = dict.fromkeys(
        ("chunk prefill", "prompt prefill", "decode steps", "decode call, rest", "re-scoring"), 0.0
    )
    calls = dict.fromkeys(seconds, 0)
    inside: list[str] = []  # the part being timed (an inner part's time is taken out of its outer part's)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            if inside and inside[-1] in ("chunk prefill", "re-scoring", "decode steps"):
                return fn(*args, **kwargs)  # the model's forward inside these counts as theirs
            synchronize(device)
            inside.append(name)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(device)
                spent = time.perf_counter() - start
                inside.pop()
                seconds[name] += spent
                calls[name] += 1
                if inside:
                    seconds[inside[-1]] -= spent

        return wrapper

    prefill = PrefixKV.__dict__["prefill"]
    rescore = synthesis_module.rescore
    synthesize_batch(model, tokenizer, corpus, config, 0)  # warm-up: this batch's buckets built
    PrefixKV.prefill = classmethod(timed("chunk prefill", prefill.__func__))
    synthesis_module.rescore = timed("re-scoring", rescore)
    decoder.generate = timed("decode call, rest", decoder.generate)
    decoder._run_step = timed("decode steps", decoder._run_step)
    model.forward = timed("prompt prefill", model.forward)
    try:
        synchronize(device)
        start = time.perf_counter()
        rows = synthesize_batch(model, tokenizer, corpus, config, 1)
        synchronize(device)
        batch_seconds = time.perf_counter() - start
    finally:
        PrefixKV.prefill = prefill
        synthesis_module.rescore = rescore
        for name in ("generate", "_run_step"):
            del decoder.__dict__[name]
        del model.forward  # the class's forward again
    seconds["host"] = batch_seconds - sum(seconds.values())
    print(
        f"one batch of {len(rows)} conversations: {batch_seconds:.3f} s ({1000 * batch_seconds / max(1, len(rows)):.2f}"
        " ms each), the device synchronized around each part:"
    )
    for name, spent in seconds.items():
        count = f"{calls[name]} calls, {1000 * spent / calls[name]:.2f} ms each" if calls.get(name) else ""
        print(f"  {name:18s} {spent:8.3f} s  {100 * spent / batch_seconds:5.1f}%  {count}")
        print(
            f"RESULT synthesis_phase_{name.replace(',', '').replace(' ', '_')}_share {spent / batch_seconds:.3f}"
        )
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default="rcv1")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument(
        "--batch",
        default="16",
        help="conversations per chunk in the batched run, or auto (sized to the device)",
    )
    parser.add_argument("--question-tokens", type=int, default=24)
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument(
        "--random-model", default=None, help="random weights of this shape: smollm2-135m, ..."
    )
    parser.add_argument("--device", default=None, help="default: accelerate's device of this process")
    parser.add_argument(
        "--dtype", default="auto", help="default: bfloat16 on a GPU that supports it, else float32"
    )
    parser.add_argument("--skip-single", action="store_true", help="only the batched run")
    parser.add_argument(
        "--cpu-reference", type=float, default=None, help="batched conv/s of the same command on a CPU"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile one batch with torch.profiler and print its N most expensive operators (and --phases)",
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also time the parts of one more batch (prefills, decode steps, the host's work around them)",
    )
    args = parser.parse_args()

    device, dtype = resolve(args.device, args.dtype)
    if args.random_model:
        from _random_models import random_causal_lm, tokenizer_for

        tokenizer = tokenizer_for(args.random_model)
        model = random_causal_lm(args.random_model, tokenizer, device, dtype)
    else:
        model, tokenizer = load_causal_lm("embedded", device=device, dtype=dtype)
    corpus = load_corpus(args.corpus, tokenizer)
    common = dict(
        num_conversations=args.conversations,
        max_question_tokens=args.question_tokens,
        max_answer_tokens=args.answer_tokens,
        # Generated conversations (agents A and B) about 256-512-token chunks: what this benchmark measures.
        continuation_fraction=0.0,
        chunk_min_tokens=256,
        chunk_max_tokens=512,
        seed=0,
    )
    batch = None if args.batch == "auto" else int(args.batch)
    config = resolve_conversations_per_chunk(SynthesisConfig(conversations_per_chunk=batch, **common), model)
    print(
        f"corpus {corpus.name}, {args.conversations} conversations, <= {args.question_tokens}+{args.answer_tokens} "
        f"new tokens, {model.device}, {str(model.dtype).removeprefix('torch.')}"
    )
    batched = warm_then_time(
        model, tokenizer, corpus, config, f"batched (shared chunk KV, {config.conversations_per_chunk}/chunk)"
    )
    print(f"RESULT synthesis_conv_per_s_{config.conversations_per_chunk} {batched:.3f}")
    if not args.skip_single:
        single, single_tokens, _ = run(
            model, tokenizer, corpus, SynthesisConfig(conversations_per_chunk=1, **common)
        )
        print(f"one at a time:                        {single:.3f} conv/s ({single_tokens} answer tokens)")
        print(f"ratio: {batched / single:.2f}x")
        print(f"RESULT synthesis_batched_vs_single {batched / single:.3f}")
    if args.profile:
        profile(
            model,
            tokenizer,
            corpus,
            config,
            args.profile,
        )
    if args.phases and not args.profile:
        phases(model, tokenizer, corpus, config)
    if args.cpu_reference:
        print(f"vs the CPU reference {args.cpu_reference:.3f} conv/s: {batched / args.cpu_reference:.1f}x")
        print(
            f"RESULT synthesis_{model.device.type}_vs_cpu_{config.conversations_per_chunk} "
            f"{batched / args.cpu_reference:.3f}"
        )


if __name__ == "__main__":
    main()
