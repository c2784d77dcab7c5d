"""Check the question sets against the model: no context should stay near chance, the document in context (ICL)
well above it, on both kinds of question.

    .venv/bin/python examples/cartridges/question_sets.py                  # every document's set
    .venv/bin/python examples/cartridges/question_sets.py rcv1 iris --output results.json

Each set ``tests/data/questions/<name>.jsonl`` is scored with the embedded model (or ``--model_name_or_path``)
under no context and ICL (the named corpus in the system turn, truncated to the model's window), with 95% Wilson
intervals; a Markdown table is printed and, with ``--output``, the results are written as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from hfx.atomic import write_text_atomic
from hfx.cartridges.corpus import load_corpus
from hfx.cartridges.evaluation import (
    Condition,
    default_context_tokens,
    evaluate_conditions,
    icl_condition,
    load_questions,
)
from hfx.models import load_causal_lm

QUESTIONS = Path(__file__).resolve().parents[2] / "tests" / "data" / "questions"
#: The sets of one document each (two_documents.jsonl is for composed cartridges).
DOCUMENT_SETS = ("rcv1", "breast_cancer", "covtype", "digits", "iris", "kddcup99", "lfw", "wine_data")


def cell(result: dict | None) -> str:
    if not result:
        return "—"
    low, high = result["interval"]
    return f"{result['accuracy']:.3f} ({low:.2f}–{high:.2f})"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "sets", nargs="*", default=list(DOCUMENT_SETS), help="set names (default: every document's)"
    )
    parser.add_argument("--model_name_or_path", default="embedded")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model, tokenizer = load_causal_lm(args.model_name_or_path, device="cpu", dtype=args.dtype)
    rows = []
    for name in args.sets:
        start = time.perf_counter()
        questions = load_questions(QUESTIONS / f"{name}.jsonl")
        corpus = load_corpus(name, tokenizer)
        conditions = [
            Condition("no context", None, prompt_after_system=False),
            icl_condition(model, tokenizer, corpus.text, default_context_tokens(model)),
        ]
        results = evaluate_conditions(
            model, tokenizer, conditions, questions, throughput_batch=0, progress=False
        )
        row = {"set": name, "questions": len(questions), "seconds": time.perf_counter() - start}
        for result in results:
            key = "icl" if result.condition.startswith("ICL") else "no_context"
            row[key] = {"accuracy": result.accuracy, "interval": result.accuracy_interval}
            for kind, value in result.by_kind.items():
                row[f"{key}_{kind}"] = value
        rows.append(row)
        logging.info("%s: no context %s, ICL %s", name, cell(row["no_context"]), cell(row["icl"]))

    print(
        "| set | questions | no context (95% CI) | ICL (95% CI) | ICL, recall | ICL, combine | no context, combine |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['set']} | {row['questions']} | {cell(row['no_context'])} | {cell(row['icl'])} | "
            f"{cell(row.get('icl_recall'))} | {cell(row.get('icl_combine'))} | {cell(row.get('no_context_combine'))} |"
        )
    if args.output:
        write_text_atomic(Path(args.output), json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
