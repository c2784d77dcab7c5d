"""Multiple-choice scoring (``hfx.cartridges.evaluation.score_questions``) against a whole read per choice.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/evaluation_scoring.py --corpus rcv1 --questions 40

``score_questions`` reads each question's prompt once (after the prompts' common start, read once for the whole
set) and continues every choice from that cache, projecting onto the vocabulary only over the
choices' tokens. The baseline reads prefix + prompt + choice in full for every choice, as one padded batch of choices,
with logits at every position. Both score the same questions under no context and the document in context (ICL);
the script checks that they pick the same answers and prints the time ratio per condition.
"""

import argparse
import time

import torch

from hfx.batching import padded
from hfx.cartridges.corpus import load_corpus, user_turn_ids
from hfx.cartridges.evaluation import Condition, icl_condition, load_questions, score_questions
from hfx.cartridges.prefix import forward_with_prefix
from hfx.models import load_causal_lm, synchronize


@torch.no_grad()
def whole_reads(model, tokenizer, condition, questions, batch_size=16) -> list[bool]:
    """The baseline: every choice read in full after the prefix, logits everywhere; whether each pick is right."""
    rows = []
    for q_idx, question in enumerate(questions):
        prompt = user_turn_ids(tokenizer, question.question, after_system=condition.prompt_after_system)
        for choice in question.choices:
            answer = tokenizer(choice, add_special_tokens=False)["input_ids"]
            rows.append((q_idx, len(prompt), prompt + answer))
    means = [[] for _ in questions]
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids, mask = padded([row[2] for row in batch], tokenizer.pad_token_id)
        logits = forward_with_prefix(
            model, condition.prefix, ids.to(model.device), mask.to(model.device)
        ).logits
        for row, (q_idx, prompt_len, seq) in enumerate(batch):
            targets = torch.tensor(seq[prompt_len:], device=logits.device)
            logprobs = torch.log_softmax(logits[row, prompt_len - 1 : len(seq) - 1].float(), -1)
            means[q_idx].append(logprobs.gather(-1, targets[:, None]).mean().item())
    return [max(range(len(m)), key=m.__getitem__) == q.answer for m, q in zip(means, questions, strict=True)]


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default="rcv1", help="a bundled corpus with a question set")
    parser.add_argument("--questions", type=int, default=40, help="the first N questions of its set")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    model, tokenizer = load_causal_lm("embedded", device=args.device, dtype=args.dtype)
    questions = load_questions(f"tests/data/questions/{args.corpus}.jsonl")[: args.questions]
    corpus = load_corpus(args.corpus, tokenizer)
    conditions = [Condition("no context", None, False), icl_condition(model, tokenizer, corpus.text)]
    print(f"{len(questions)} questions of {args.corpus}, {model.dtype} on {model.device}")
    for condition in conditions:
        scores, shared = timed(
            lambda c=condition: score_questions(model, tokenizer, c, questions, progress=False), model.device
        )
        baseline, whole = timed(lambda c=condition: whole_reads(model, tokenizer, c, questions), model.device)
        if scores.correct != baseline:
            raise SystemExit(f"{condition.name}: the two scorings pick different answers")
        key = "no_context" if condition.prefix is None else "icl"
        print(
            f"{condition.name:12s} shared prompts {shared:6.1f} s, whole reads {whole:6.1f} s, "
            f"speed-up {whole / shared:.2f}x (same picks, accuracy {scores.accuracy:.3f})"
        )
        print(f"RESULT evaluation_scoring_{key} {whole / shared:.3f}")


if __name__ == "__main__":
    main()
