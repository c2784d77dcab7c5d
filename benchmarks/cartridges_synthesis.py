"""Synthesis throughput: batches sharing one chunk's KV vs one conversation at a time.

.venv/bin/python benchmarks/cartridges_synthesis.py --conversations 16
"""

import argparse
import tempfile
import time

from hfx.cartridges.corpus import load_corpus
from hfx.cartridges.synthesis import SynthesisConfig, synthesize
from hfx.models import load_causal_lm


def run(model, tokenizer, corpus, config: SynthesisConfig) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        dataset = synthesize(model, tokenizer, corpus, out, config, progress=False)
        elapsed = time.perf_counter() - start
    return len(dataset) / elapsed, sum(
        len(ids) - s for ids, s in zip(dataset["input_ids"], dataset["answer_start"], strict=False)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default="rcv1")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="conversations per chunk in the batched run")
    parser.add_argument("--question-tokens", type=int, default=24)
    parser.add_argument("--answer-tokens", type=int, default=48)
    args = parser.parse_args()

    model, tokenizer = load_causal_lm("embedded")
    corpus = load_corpus(args.corpus, tokenizer)
    common = dict(
        num_conversations=args.conversations,
        max_question_tokens=args.question_tokens,
        max_answer_tokens=args.answer_tokens,
        seed=0,
    )
    batched, batched_tokens = run(
        model, tokenizer, corpus, SynthesisConfig(conversations_per_chunk=args.batch, **common)
    )
    single, single_tokens = run(
        model, tokenizer, corpus, SynthesisConfig(conversations_per_chunk=1, **common)
    )
    print(
        f"corpus {corpus.name}, {args.conversations} conversations, <= {args.question_tokens}+{args.answer_tokens} new tokens"
    )
    print(
        f"batched (shared chunk KV, {args.batch}/chunk): {batched:.3f} conv/s ({batched_tokens} answer tokens)"
    )
    print(f"one at a time:                        {single:.3f} conv/s ({single_tokens} answer tokens)")
    print(f"ratio: {batched / single:.2f}x")


if __name__ == "__main__":
    main()
