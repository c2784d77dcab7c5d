"""Per-token gradients: hfx's batched, sketched gradients vs the reference approach (one forward and backward per
token, the full gradient of every selected layer kept), on the same tokens of the same model.

The tokens are real: windows of the default corpus (Python reference topics and standard-library source), each
token predicted from its preceding context. Also reported: hfx's exact batched mode (no sketch), and how well the
sketch's cosine similarities match the exact ones.

    .venv/bin/python benchmarks/quanta_gradients.py
    .venv/bin/python benchmarks/quanta_gradients.py --tokens 32 --context 64 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch

from hfx.documents import DEFAULT_DATASET, load_documents
from hfx.quanta.gradients import PerTokenGradients, reference_gradients
from hfx.quanta.pipeline import RunArguments, load_model


def sample_tokens(tokenizer, count: int, context: int, seed: int = 0):
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


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16, help="the reference keeps ~425 MB per token (fp32)")
    parser.add_argument("--context", type=int, default=64, help="contexts of context/2 .. context tokens")
    parser.add_argument("--projection-dim", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    model, tokenizer = load_model(RunArguments(dtype=args.dtype))
    contexts, targets = sample_tokens(tokenizer, args.tokens, args.context)

    def batched(projection_dim):
        engine = PerTokenGradients(model, projection_dim=projection_dim, seed=0)
        order = sorted(range(len(targets)), key=lambda i: len(contexts[i]))
        rows = [None] * len(targets)
        for start in range(0, len(order), args.batch_size):
            picked = order[start : start + args.batch_size]
            out = engine([contexts[i] for i in picked], [targets[i] for i in picked])
            for i, row in zip(picked, out, strict=True):
                rows[i] = row
        return torch.stack(rows)

    results = {}
    for name, run in (
        ("reference: 1 backward/token, full grads", lambda: reference_gradients(model, contexts, targets)),
        (f"hfx batched, sketch m={args.projection_dim}", lambda: batched(args.projection_dim)),
        ("hfx batched, exact", lambda: batched(0)),
    ):
        start = time.perf_counter()
        rows = run()
        seconds = time.perf_counter() - start
        unit = torch.nn.functional.normalize(rows.float(), dim=1)
        results[name] = (seconds, rows.shape[1] * 4, unit @ unit.t())  # keep the similarities, not the rows
        del rows, unit
    print(
        f"{args.tokens} tokens, contexts {args.context // 2}-{args.context}, {type(model).__name__} {args.dtype}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'':42s} {'tokens/s':>9s} {'kept per token':>15s}")
    for name, (seconds, nbytes, _) in results.items():
        print(f"{name:42s} {args.tokens / seconds:9.2f} {nbytes / 2**20:12.2f} MB")
    (ref_s, ref_b, exact_similarity), (sk_s, sk_b, sketch_similarity), (ex_s, _, batched_similarity) = (
        results.values()
    )
    print(f"throughput vs reference: sketch {ref_s / sk_s:.2f}x, exact batched {ref_s / ex_s:.2f}x")
    print(f"memory per token vs reference: {ref_b / sk_b:.0f}x smaller with the sketch")
    sketch_error = (sketch_similarity - exact_similarity).abs()
    print(
        f"cosine similarity error of the sketch: max {sketch_error.max():.3f}, mean {sketch_error.mean():.3f}; "
        f"exact batched vs reference: max {(batched_similarity - exact_similarity).abs().max():.1e}"
    )


if __name__ == "__main__":
    main()
