"""Per-token gradients: hfx's batched, sketched gradients vs the reference approach (one forward and backward per
token, the full gradient of every selected layer kept), on the same tokens of the same model, on one device.

By default the tokens are real: windows of the default corpus (Python reference topics and standard-library
source) read by the embedded model, each token predicted from its preceding context. With `--random-model [SHAPE]`
the model is a random-weight Llama of a public shape (`_random_models.SHAPES`; SmolLM2-135M's by default) and the
tokens are random ids: no weights or corpus needed (what the GPU check runs). Also reported: hfx's exact batched
mode (no sketch), and how well the sketch's cosine similarities match the exact ones. Each method runs once on a
few tokens first (CUDA start-up, kernel selection), then once timed, with the device synchronized around the
timer. Setting up hfx's methods (drawing the sketch's projections on the device) happens before the timer and is
printed apart. The `RESULT` lines: `quanta_gradients` is the sketch's tokens/s over the reference's,
`quanta_sketch_vs_exact` the sketch's over the exact batched mode's, `quanta_sketch_cosine_error` the largest error
of the sketch's cosine similarities (finite, or the run failed).

    .venv/bin/python benchmarks/quanta_gradients.py
    .venv/bin/python benchmarks/quanta_gradients.py --tokens 32 --context 64 --dtype bfloat16
    python benchmarks/quanta_gradients.py --device cuda --random-model
    python benchmarks/quanta_gradients.py --device cuda --random-model llama-3.2-1b --tokens 8
"""

from __future__ import annotations

import argparse
import time

import torch
from _measure import profile_call
from _random_models import SHAPES, random_causal_lm

from hfx import models
from hfx.quanta.gradients import PerTokenGradients, reference_gradients


def sample_tokens(tokenizer, count: int, context: int, seed: int = 0):
    from hfx.documents import DEFAULT_DATASET, load_documents

    documents = load_documents(DEFAULT_DATASET)
    generator = torch.Generator().manual_seed(seed)
    contexts, targets = [], []
    for _name, text in documents:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= context + 1:
            continue
        start = int(torch.randint(0, len(ids) - context - 1, (1,), generator=generator))
        length = int(torch.randint(context // 2, context + 1, (1,), generator=generator))
        contexts.append(ids[start : start + length])
        targets.append(ids[start + length])
        if len(targets) == count:
            break
    return contexts, targets


def random_tokens(vocab_size: int, count: int, context: int, seed: int = 0):
    """Contexts of context/2 .. context random ids, each with a random target."""
    generator = torch.Generator().manual_seed(seed)
    contexts, targets = [], []
    for _ in range(count):
        length = int(torch.randint(context // 2, context + 1, (1,), generator=generator))
        contexts.append(torch.randint(0, vocab_size, (length,), generator=generator).tolist())
        targets.append(int(torch.randint(0, vocab_size, (1,), generator=generator)))
    return contexts, targets


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16, help="the reference keeps ~425 MB per token (fp32)")
    parser.add_argument("--context", type=int, default=64, help="contexts of context/2 .. context tokens")
    parser.add_argument("--projection-dim", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="default: this process's accelerator, else the CPU")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU that has it, else float32")
    parser.add_argument("--warmup-tokens", type=int, default=2, help="tokens each method runs before timing")
    parser.add_argument(
        "--random-model",
        nargs="?",
        const="smollm2-135m",
        choices=sorted(SHAPES),
        help="a random-weight model of this shape (default smollm2-135m) on random token ids, no weights",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile one batch of the sketch and of the exact mode: N operators (kernels on a GPU)",
    )
    args = parser.parse_args()

    try:
        device, dtype = models.resolve(args.device, args.dtype)
    except ValueError as error:
        raise SystemExit(f"quanta_gradients: {error}") from None
    if args.random_model:
        from hfx.tokenization import small_chat_tokenizer

        # The tokenizer only lends the model its special-token ids: the inputs are random ids.
        model = random_causal_lm(args.random_model, small_chat_tokenizer(), device, dtype)
        vocab_size = SHAPES[args.random_model]["vocab_size"]
        contexts, targets = random_tokens(vocab_size, args.tokens + args.warmup_tokens, args.context)
    else:
        model, tokenizer = models.load_causal_lm(device=device, dtype=dtype)
        contexts, targets = sample_tokens(tokenizer, args.tokens + args.warmup_tokens, args.context)
    if len(targets) < args.tokens + args.warmup_tokens:
        raise SystemExit(f"only {len(targets)} tokens could be sampled; ask for fewer --tokens")
    warmup = (contexts[: args.warmup_tokens], targets[: args.warmup_tokens])
    contexts, targets = contexts[args.warmup_tokens :], targets[args.warmup_tokens :]

    setup = {}

    def engine_for(projection_dim):
        models.synchronize(device)
        start = time.perf_counter()
        engine = PerTokenGradients(model, projection_dim=projection_dim, seed=0)
        models.synchronize(device)
        setup[projection_dim] = time.perf_counter() - start
        return engine

    sketch, exact = engine_for(args.projection_dim), engine_for(0)

    def batched(engine, contexts, targets):
        order = sorted(range(len(targets)), key=lambda i: len(contexts[i]))
        rows = [None] * len(targets)
        for start in range(0, len(order), args.batch_size):
            picked = order[start : start + args.batch_size]
            out = engine([contexts[i] for i in picked], [targets[i] for i in picked])
            for i, row in zip(picked, out, strict=True):
                rows[i] = row
        return torch.stack(rows)

    methods = {
        "reference: 1 backward/token, full grads": lambda c, t: reference_gradients(model, c, t),
        f"hfx batched, sketch m={args.projection_dim}": lambda c, t: batched(sketch, c, t),
        "hfx batched, exact": lambda c, t: batched(exact, c, t),
    }
    results = {}
    for name, run in methods.items():
        if warmup[0]:
            run(*warmup)
        models.synchronize(device)
        start = time.perf_counter()
        rows = run(contexts, targets)
        models.synchronize(device)
        seconds = time.perf_counter() - start
        unit = torch.nn.functional.normalize(rows.float(), dim=1)
        # keep the similarities (on the CPU), not the rows
        results[name] = (seconds, rows.shape[1] * 4, (unit @ unit.t()).cpu())
        del rows, unit
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{args.tokens} tokens, contexts {args.context // 2}-{args.context}, {type(model).__name__} "
        f"({parameters / 1e6:.0f}M parameters{f', random {args.random_model}' if args.random_model else ''}) on "
        f"{device} in "
        f"{models.dtype_name(dtype)}, {torch.get_num_threads()} CPU threads"
    )
    print(f"{'':42s} {'tokens/s':>9s} {'kept per token':>15s}")
    for name, (seconds, nbytes, _) in results.items():
        print(f"{name:42s} {args.tokens / seconds:9.2f} {nbytes / 2**20:12.2f} MB")
    (ref_s, ref_b, exact_similarity), (sk_s, sk_b, sketch_similarity), (ex_s, _, batched_similarity) = (
        results.values()
    )
    print(
        f"setup before the timer: sketch projections {setup[args.projection_dim]:.3f} s, exact {setup[0]:.3f} s"
    )
    print(f"throughput vs reference: sketch {ref_s / sk_s:.2f}x, exact batched {ref_s / ex_s:.2f}x")
    print(f"memory per token vs reference: {ref_b / sk_b:.0f}x smaller with the sketch")
    sketch_error = (sketch_similarity - exact_similarity).abs()
    print(
        f"cosine similarity error of the sketch: max {sketch_error.max():.3f}, mean {sketch_error.mean():.3f}; "
        f"exact batched vs reference: max {(batched_similarity - exact_similarity).abs().max():.1e}"
    )
    print(f"RESULT quanta_gradients {ref_s / sk_s:.2f}")
    print(f"RESULT quanta_sketch_vs_exact {ex_s / sk_s:.2f}")
    print(f"RESULT quanta_sketch_cosine_error {sketch_error.max():.4f}")
    print(f"RESULT quanta_sketch_setup_s {setup[args.projection_dim]:.3f}")
    if args.profile:
        batch = (contexts[: args.batch_size], targets[: args.batch_size])
        for engine, tag in ((sketch, "sketch"), (exact, "exact")):

            def one_batch(engine=engine):
                engine(*batch)
                models.synchronize(device)

            profile_call(one_batch, f"hfx batched, {tag}: one batch", device, args.profile, f"quanta_{tag}")


if __name__ == "__main__":
    main()
