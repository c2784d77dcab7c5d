"""A cartridge library of the documents that have question sets, against RAG and ICL on their mixed questions.

    .venv/bin/python examples/cartridges/library.py --budget_minutes 6
    accelerate launch examples/cartridges/library.py --budget_minutes 6     # processes share the documents
    .venv/bin/python examples/cartridges/library.py --table                 # only the table of a finished run
    .venv/bin/python examples/cartridges/library.py --routing_only          # the routers alone, built libraries

Builds two libraries of the same documents (``hfx cartridge library build``) into ``OUTPUT_ROOT/alone`` (each
cartridge trained alone) and ``OUTPUT_ROOT/distractors`` (trained beside the others' initial cartridges), tunes the
first one's cartridges together into ``OUTPUT_ROOT/tuned`` (``hfx cartridge library tune``; ``--tune_epochs``, 1 and
2 by default, one library per value, ``OUTPUT_ROOT/tuned-<E>ep`` for E other than 1; 0 skips it), then scores every condition of :mod:`hfx.cartridges.library_evaluation` on the documents' questions
shuffled together, and writes ``OUTPUT_ROOT/library_eval.json`` and the markdown table
``OUTPUT_ROOT/library_table.md``. The builds, the tuning and the evaluation are resumable (each scored condition is
kept in ``OUTPUT_ROOT/rows/``); a rerun reuses what is finished.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

#: The documents with a question set in tests/data/questions/ (at least 60 questions each).
DOCUMENTS = ["rcv1", "breast_cancer", "covtype", "digits", "iris", "kddcup99", "lfw", "wine_data"]


def _pending(folder: Path) -> list[str]:
    manifest = json.loads((folder / "library.json").read_text())
    return manifest["pending"]


def paired_comparisons(report: dict) -> list[str]:
    """Each library's composition of all its cartridges against the one trained alone and against oracle ICL, and
    its routed top-1 (BM25) against each RAG row, paired on the same questions (bootstrap 95% intervals)."""
    from hfx.statistics import paired_difference

    rows = {row["condition"]: row for row in report["rows"]}
    composed = {name.rsplit("(", 1)[1].rstrip(")"): name for name in rows if name.startswith("all ")}
    pairs = [
        (name, composed["trained alone"]) for label, name in composed.items() if label != "trained alone"
    ]
    pairs += [(name, "oracle ICL (the question's document)") for name in composed.values()]
    rag = [name for name in rows if name.startswith("RAG")]
    pairs += [(name, other) for name in rows if name.startswith("routed top-1, bm25 (") for other in rag]
    lines = []
    for first, second in pairs:
        diff, interval = paired_difference(rows[first]["correct"], rows[second]["correct"])
        lines.append(f"{first} - {second}: {diff:+.3f} ({interval.low:+.3f} to {interval.high:+.3f})")
    return lines


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--documents", nargs="+", default=DOCUMENTS)
    parser.add_argument("--questions_dir", default="tests/data/questions")
    parser.add_argument("--output_root", default="outputs/library")
    parser.add_argument("--budget_minutes", type=float, default=6.0, help="Minutes per document and library.")
    parser.add_argument("--model_name_or_path", default="embedded")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--tune_epochs",
        type=float,
        nargs="+",
        default=[1.0, 2.0],
        help="Epochs of tuning the cartridges trained alone together (over all documents' conversations), a tuned "
        "library per value; 0: none.",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of every cartridge's synthesis and training (another seed makes other cartridges: give it an "
        "--output_root of its own).",
    )
    parser.add_argument(
        "--compression",
        type=int,
        default=8,
        help="Each cartridge has 1/compression of its document's tokens (hfx cartridge library build --compression).",
    )
    parser.add_argument(
        "--libraries",
        nargs="+",
        choices=["alone", "distractors"],
        default=["alone", "distractors"],
        help="Which libraries to build and score: cartridges trained alone, trained with distractors.",
    )
    parser.add_argument("--routers", nargs="+", default=None, help="Routers to score; default: all.")
    parser.add_argument(
        "--ks", type=int, nargs="+", default=None, help="Routed top-k to score; default: 1 2."
    )
    parser.add_argument(
        "--rag_chunk_tokens",
        type=int,
        default=None,
        help="Tokens per RAG chunk (default 128); RAG's budget is the routed cartridges' KV tokens at the largest k.",
    )
    parser.add_argument("--table", action="store_true", help="Only print the table of a finished evaluation.")
    parser.add_argument(
        "--routing_only",
        action="store_true",
        help="Only each router's routing accuracy on the built libraries (no answers scored); the questions' "
        "likelihoods it computes are kept in OUTPUT_ROOT/rows for the full evaluation.",
    )
    args = parser.parse_args(argv)
    root = Path(args.output_root)
    if args.table:
        print((root / "library_table.md").read_text())
        print("\n".join(paired_comparisons(json.loads((root / "library_eval.json").read_text()))))
        return None

    from hfx.atomic import write_text_atomic
    from hfx.cartridges.library import (
        CartridgeLibrary,
        LibrarySettings,
        build_library,
        leave_launch,
        process_device,
    )
    from hfx.cartridges.library_evaluation import (
        evaluate_library,
        format_library_table,
        mixed_questions,
        routing_accuracy,
    )
    from hfx.cartridges.library_tuning import LibraryTuningArguments, tune_library
    from hfx.models import load_causal_lm

    tuned_epochs = [e for e in args.tune_epochs if e > 0] if "alone" in args.libraries else []

    def tuned_label(epochs: float) -> str:
        return "tuned together" if epochs == 1 else f"tuned together, {epochs:g} epochs"

    def tuned_folder(epochs: float) -> Path:
        return root / ("tuned" if epochs == 1 else f"tuned-{epochs:g}ep")

    built = {"alone": ("trained alone", "none"), "distractors": ("with distractors", "initial")}
    built = {folder: built[folder] for folder in built if folder in args.libraries}

    def libraries_on_disk() -> dict:
        found = {label: CartridgeLibrary(root / folder) for folder, (label, _) in built.items()}
        for epochs in tuned_epochs:
            found[tuned_label(epochs)] = CartridgeLibrary(tuned_folder(epochs))
        return found

    if args.routing_only:
        libraries = libraries_on_disk()
        model, tokenizer = load_causal_lm(args.model_name_or_path, device=args.device, dtype=args.dtype)
        tagged = mixed_questions(next(iter(libraries.values())), args.questions_dir)
        start = time.time()
        routing = routing_accuracy(model, tokenizer, tagged, libraries, likelihoods_dir=root / "rows")
        report = {
            "routing": routing,
            "num_questions": len(tagged),
            "minutes": (time.time() - start) / 60,
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
        }
        write_text_atomic(root / "routing.json", json.dumps(report, indent=2) + "\n")
        routers = list(next(iter(routing.values())))
        print(f"| library | {' | '.join(routers)} |\n|---|{'---|' * len(routers)}")
        for label, values in routing.items():
            print(f"| {label} | {' | '.join(f'{values[r]:.3f}' for r in routers)} |")
        return report

    process_index, num_processes, local_index = leave_launch()
    device = process_device(args.device, num_processes, local_index)
    # the default seed is not written out, so that a library built before this option keeps its manifest
    synthesis = {"seed": args.seed} if args.seed else {}
    minutes = {}
    for label, (_, distractors) in built.items():
        start = time.time()
        report = build_library(
            args.documents,
            root / label,
            LibrarySettings(args.model_name_or_path, args.budget_minutes, synthesis, distractors=distractors),
            device=device,
            dtype=args.dtype,
            process_index=process_index,
            num_processes=num_processes,
            compression=args.compression,
            tune_epochs=0,  # tuned below into libraries of their own, so that the table has both
        )
        minutes[label] = (time.time() - start) / 60
        print(
            f"{label}: trained {sorted(report.trained) or 'nothing'}, kept {report.kept} ({minutes[label]:.1f} min)"
        )
    if process_index != 0:
        return None
    deadline = time.time() + 60 * (2 * args.budget_minutes * len(args.documents) + 30)
    while any(_pending(root / label) for label in built):  # the other processes' documents
        if time.time() > deadline:
            raise SystemExit(
                f"{root}: other processes' documents are still unfinished: "
                f"{ {label: _pending(root / label) for label in built} }; run this again once they are."
            )
        time.sleep(10)
    for epochs in tuned_epochs:
        start = time.time()
        tuning = tune_library(
            root / "alone",
            tuned_folder(epochs),
            LibraryTuningArguments(
                str(tuned_folder(epochs)), num_train_epochs=epochs, use_cpu=device == "cpu"
            ),
            model_name_or_path=args.model_name_or_path,
        )
        minutes[tuned_label(epochs)] = (time.time() - start) / 60
        print(
            f"{tuned_label(epochs)}: {tuning.status}, {tuning.steps} steps ({minutes[tuned_label(epochs)]:.1f} min)"
        )
    libraries = libraries_on_disk()
    model, tokenizer = load_causal_lm(args.model_name_or_path, device=device, dtype=args.dtype)
    tagged = mixed_questions(next(iter(libraries.values())), args.questions_dir)
    start = time.time()
    aliases_file = Path(args.questions_dir) / "aliases.json"
    aliases = json.loads(aliases_file.read_text()) if aliases_file.is_file() else None
    given = {"routers": args.routers, "ks": args.ks, "rag_chunk_tokens": args.rag_chunk_tokens}
    condition_kwargs = {  # the conditions' own defaults for what is not given
        name: tuple(value) if isinstance(value, list) else value
        for name, value in given.items()
        if value is not None
    }
    report = evaluate_library(
        model, tokenizer, tagged, libraries, aliases=aliases, rows_dir=root / "rows", **condition_kwargs
    )
    report["evaluation_minutes"] = (time.time() - start) / 60
    # what each library's cartridges took to train, as their documents recorded it (a rerun keeps finished ones)
    report["build_minutes"] = {
        label: sum(d.report.get("minutes", 0.0) for d in library.documents)
        for label, library in libraries.items()
    }
    # each tuning's own steps and minutes, on top of its source library's
    report["tuning"] = {tuned_label(e): libraries[tuned_label(e)].manifest["tuning"] for e in tuned_epochs}
    report["build_minutes_this_run"] = minutes
    report["budget_minutes_per_document"] = args.budget_minutes
    report["compression"] = args.compression
    report["num_processes"] = num_processes
    report["device"] = str(model.device)
    report["dtype"] = str(model.dtype).removeprefix("torch.")
    table = format_library_table(report)
    report["paired"] = paired_comparisons(report)
    write_text_atomic(root / "library_eval.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(root / "library_table.md", table + "\n")
    print(
        table + "\n\nPaired on the same questions (bootstrap 95% intervals):\n" + "\n".join(report["paired"])
    )
    return report


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
