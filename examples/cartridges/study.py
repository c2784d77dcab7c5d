"""One row of the self-study lever study: synthesize (cached), train, score the cartridge against cached baselines.

    .venv/bin/python examples/cartridges/study.py --name baseline --corpus rcv1 \
        --questions tests/data/questions/rcv1.jsonl
    .venv/bin/python examples/cartridges/study.py --name lr-5e-2 --corpus rcv1 \
        --questions tests/data/questions/rcv1.jsonl --learning_rate 5e-2

Every option of ``hfx cartridge synthesize`` (SynthesisConfig) and ``hfx cartridge train``
(CartridgeTrainingArguments) is accepted; one change at a time against the defaults is one row. Synthesized
datasets are cached under ``--study_dir`` by their settings, so rows that change only training reuse them (their
synthesis minutes are the ones it took when it ran); ``--train_conversations M`` trains on the first M.
No-context and ICL scores are computed once per (document, questions) and cached. Each row is appended to
``--results`` (JSONL); ``python examples/cartridges/study.py --table`` prints the Markdown table of the rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_RESULTS = Path(__file__).parent / "results" / "study.jsonl"


@dataclass
class StudyArguments:
    name: str = field(default="", metadata={"help": "Name of the row (what changed against the defaults)."})
    corpus: str = field(default="rcv1", metadata={"help": "Bundled corpus name or a text file/folder."})
    questions: str = field(default="", metadata={"help": "Questions JSONL the row is scored on."})
    study_dir: str = field(
        default="outputs/study", metadata={"help": "Cache of datasets, runs and baselines."}
    )
    results: str = field(
        default=str(DEFAULT_RESULTS), metadata={"help": "JSONL file the row is appended to."}
    )
    synthesis_tag: str = field(
        default="",
        metadata={"help": "Part of the dataset cache key: a new tag synthesizes again (new code)."},
    )
    train_conversations: int | None = field(
        default=None, metadata={"help": "Train on the first M synthesized conversations (default: all)."}
    )
    cartridge_fraction: int = field(
        default=8, metadata={"help": "p = corpus tokens // this when --num_virtual_tokens is not given."}
    )
    table: bool = field(default=False, metadata={"help": "Print the Markdown table of --results and exit."})


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _timed_json(path: Path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    from hfx.atomic import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(value, indent=2))
    return value


def baselines(model, tokenizer, corpus, questions_path: str, cache: Path) -> dict:
    """No-context and ICL accuracy (and ICL's KV bytes) for a document and question set, computed once."""
    from hfx.cartridges.evaluation import Condition, evaluate_conditions, icl_condition, load_questions

    def compute():
        window = model.config.max_position_embeddings
        conditions = [
            Condition("no context", None, prompt_after_system=False),
            icl_condition(model, tokenizer, corpus.text, max_context_tokens=window - 256),
        ]
        none, icl = evaluate_conditions(model, tokenizer, conditions, load_questions(questions_path), 0)
        return {
            "no_context": none.accuracy,
            "icl": icl.accuracy,
            "icl_kv_tokens": icl.kv_tokens,
            "icl_kv_bytes": icl.kv_bytes,
        }

    return _timed_json(cache / f"{corpus.name}-{Path(questions_path).stem}.json", compute)


def run_row(study, synthesis, training) -> dict:
    import torch

    from hfx.atomic import write_text_atomic
    from hfx.cartridges.corpus import load_corpus
    from hfx.cartridges.evaluation import cartridge_condition, evaluate_conditions, load_questions
    from hfx.cartridges.pipeline import train_cartridge
    from hfx.cartridges.synthesis import synthesize
    from hfx.cartridges.training import load_cartridge
    from hfx.models import load_causal_lm

    root = Path(study.study_dir)
    model, tokenizer = load_causal_lm("embedded", device="cpu", dtype="float32")
    corpus = load_corpus(study.corpus, tokenizer)
    base = baselines(model, tokenizer, corpus, study.questions, root / "baselines")

    settings = dataclasses.asdict(synthesis)
    if not synthesis.continuation_fraction:  # without continuations their settings change no row
        settings.pop("continuation_fraction")
        settings.pop("continuation_cue_tokens")
    if not (synthesis.continuation_fraction and synthesis.quote_fraction):  # likewise for quotes
        settings.pop("quote_fraction")
        settings.pop("quote_cue_tokens")
    if study.synthesis_tag:
        settings["tag"] = study.synthesis_tag
    synthesis_dir = root / "synthesis" / f"{corpus.name}-{_digest(settings)}"
    timing_path = synthesis_dir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {"seconds": 0.0}
    start = time.perf_counter()
    dataset = synthesize(model, tokenizer, corpus, synthesis_dir, synthesis)
    if not timing.get("complete"):
        timing = {"seconds": timing["seconds"] + time.perf_counter() - start, "complete": True}
        write_text_atomic(timing_path, json.dumps(timing))
    synthesis_seconds = timing["seconds"]
    if study.train_conversations is not None:
        keep = min(study.train_conversations, len(dataset))
        synthesis_seconds *= keep / len(dataset)
        dataset = dataset.select(range(keep))
    del model

    if training.num_virtual_tokens is None:
        training.num_virtual_tokens = max(1, corpus.num_tokens // study.cartridge_fraction)
    training_settings = {
        k: getattr(training, k)
        for k in (
            "num_virtual_tokens",
            "num_frozen_tokens",
            "initialization",
            "learning_rate",
            "lr_scheduler_type",
            "warmup_steps",
            "per_device_train_batch_size",
            "num_train_epochs",
            "max_steps",
            "model_dtype",
            "seed",
        )
    }
    run_dir = root / "runs" / f"{synthesis_dir.name}-{len(dataset)}-{_digest(training_settings)}"
    training.output_dir = str(run_dir)
    start = time.perf_counter()
    if not (run_dir / "hfx_cartridge.json").is_file():
        train_cartridge(study.corpus, dataset, training)
    metadata = json.loads((run_dir / "hfx_cartridge.json").read_text())
    train_seconds = metadata.get("train_runtime_s") or time.perf_counter() - start

    model, tokenizer = load_causal_lm("embedded", device="cpu", dtype="float32")
    peft_model = load_cartridge(model, run_dir)
    condition = cartridge_condition(peft_model, name="cartridge")
    with torch.no_grad(), peft_model.disable_adapter():
        (result,) = evaluate_conditions(
            peft_model.get_base_model(), tokenizer, [condition], load_questions(study.questions), 0
        )
    gap = base["icl"] - base["no_context"]
    row = {
        "name": study.name,
        "corpus": corpus.name,
        "corpus_tokens": corpus.num_tokens,
        "questions": Path(study.questions).name,
        "conversations": len(dataset),
        "steps": metadata["global_steps"],
        "synthesis_min": round(synthesis_seconds / 60, 2),
        "train_min": round(train_seconds / 60, 2),
        "minutes": round((synthesis_seconds + train_seconds) / 60, 2),
        "no_context": base["no_context"],
        "icl": base["icl"],
        "accuracy": result.accuracy,
        "answer_log_ppl": result.answer_log_ppl,
        "gap_share": (result.accuracy - base["no_context"]) / gap if gap > 0 else None,
        "kv_ratio": base["icl_kv_bytes"] / result.kv_bytes,
        "train_loss": metadata.get("train_loss"),
        "synthesis": dataclasses.asdict(synthesis),
        "training": training_settings,
    }
    results = Path(study.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
    return row


def table(results: Path) -> str:
    lines = [
        "| row | document | conversations | steps | minutes (synth + train) | accuracy | share of gap | answer log-ppl "
        "| KV ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for line in results.read_text().splitlines():
        r = json.loads(line)
        lines.append(
            f"| {r['name']} | {r['corpus']} | {r['conversations']} | {r['steps']} | "
            f"{r['minutes']:.1f} ({r['synthesis_min']:.1f} + {r['train_min']:.1f}) | {r['accuracy']:.3f} | "
            f"{r['gap_share']:.0%} | {r['answer_log_ppl']:.3f} | {r['kv_ratio']:.1f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    from hfx.cartridges.synthesis import SynthesisConfig
    from hfx.cartridges.training import CartridgeTrainingArguments

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if "--table" in argv:
        print(table(Path(DEFAULT_RESULTS if "--results" not in argv else argv[argv.index("--results") + 1])))
        return
    # --seed is synthesis's and also seeds training, as in `hfx cartridge run`; the rest goes to training.
    study, synthesis, rest = HfArgumentParser((StudyArguments, SynthesisConfig)).parse_args_into_dataclasses(
        argv, return_remaining_strings=True
    )
    (training,) = HfArgumentParser(CartridgeTrainingArguments).parse_args_into_dataclasses(
        [*rest, "--output_dir", "unused", "--seed", str(synthesis.seed), "--use_cpu", "true"]
    )
    if not study.name or not study.questions:
        raise SystemExit("study.py: --name and --questions are required.")
    if "--num_virtual_tokens" not in argv:
        training.num_virtual_tokens = None
    row = run_row(study, synthesis, training)
    print(json.dumps({k: v for k, v in row.items() if k not in ("synthesis", "training")}, indent=2))


if __name__ == "__main__":
    main()
