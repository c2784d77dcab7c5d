"""The main job over a grid of settings, one run after the other, with a table (and a plot) of what finished.

    .venv/bin/python examples/cartridges/grid.py seeds         # rcv1, 3 seeds x bfloat16/float32 training, 18 min
    .venv/bin/python examples/cartridges/grid.py compression   # rcv1 and lfw, p = 1/32, 1/16, 1/8, 1/4 of the tokens
    .venv/bin/python examples/cartridges/grid.py generated     # rcv1, 0 / 25 / 50% generated conversations, 18 and 60 min
    .venv/bin/python examples/cartridges/grid.py long          # all 14 descriptions (12k tokens), 55 min
    .venv/bin/python examples/cartridges/grid.py seeds --table # only the table of the finished runs
    .venv/bin/python examples/cartridges/grid.py compression --plot docs/figures/compression.png

Each run is ``hfx cartridge run --corpus C --questions tests/data/questions/C.jsonl --budget_minutes B ...`` into
``OUTPUT_ROOT/<grid>/<run>``, in a child process (one torch job at a time). Runs are stages: a finished run is
reused and a killed one resumes, so a grid can be stopped and started again; ``--runs`` picks some of its runs.
The table gives, per run, the plan (conversations, steps), the cartridge's accuracy with its Wilson interval and
per kind of question (recall / combine), the share of the no context -> ICL gap with its bootstrap interval, the
answer log-perplexity, the KV ratio (ICL's KV bytes over the cartridge's) and the minutes; then the mean share of
each group of runs (over seeds). Rows go to ``OUTPUT_ROOT/<grid>/grid.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hfx.atomic import write_text_atomic

QUESTIONS = "tests/data/questions/{corpus}.jsonl"


def corpus_tokens(corpus: str) -> int:
    from hfx.cartridges.corpus import load_corpus
    from hfx.models import load_tokenizer

    return load_corpus(corpus, load_tokenizer("embedded")).num_tokens


def grid(name: str) -> dict[str, dict]:
    """The runs of a grid: run name -> {"group": ..., "args": [hfx cartridge run arguments]}."""
    runs = {}
    if name == "seeds":
        for seed in (0, 1, 2):
            for dtype in ("bfloat16", "float32"):
                runs[f"{dtype}-seed{seed}"] = {
                    "group": dtype,
                    "args": ["--corpus", "rcv1", "--budget_minutes", "18", "--seed", str(seed),
                             "--model_dtype", dtype],
                }  # fmt: skip
    elif name == "compression":
        for corpus in ("rcv1", "lfw"):
            tokens = corpus_tokens(corpus)
            for ratio in (32, 16, 8, 4):
                runs[f"{corpus}-p{ratio}"] = {
                    "group": corpus,
                    "ratio": ratio,
                    "args": ["--corpus", corpus, "--budget_minutes", "18",
                             "--num_virtual_tokens", str(max(1, round(tokens / ratio)))],
                }  # fmt: skip
    elif name == "generated":
        for budget in (18, 60):
            for generated in (0.0, 0.25, 0.5):
                runs[f"b{budget}-gen{int(generated * 100)}"] = {
                    "group": f"{budget} min",
                    "args": ["--corpus", "rcv1", "--budget_minutes", str(budget),
                             "--continuation_fraction", str(1.0 - generated)],
                }  # fmt: skip
    elif name == "long":  # all descriptions, beyond the model's window, against ICL truncated to it
        runs["sklearn_descr"] = {
            "group": "sklearn_descr",
            "args": ["--corpus", "sklearn_descr", "--budget_minutes", "55"],
        }
    else:
        raise SystemExit(f"unknown grid {name!r}: seeds, compression, generated or long")
    for run in runs.values():
        corpus = run["args"][run["args"].index("--corpus") + 1]
        run["args"] += ["--questions", QUESTIONS.format(corpus=corpus)]
    return runs


def read_run(folder: Path) -> dict | None:
    """The row of a finished run (its evaluation, plan and wall time), or None."""
    evaluation = folder / "cartridge" / "eval_results.json"
    if not evaluation.is_file():
        return None
    report = json.loads(evaluation.read_text())
    results = {r["condition"]: r for r in report["results"]}
    cartridge = next(name for name in results if name.startswith("cartridge"))
    icl = next(r for name, r in results.items() if name.startswith("ICL"))
    plan = json.loads((folder / "plan.json").read_text()) if (folder / "plan.json").is_file() else {}
    wall = json.loads((folder / "wall.json").read_text()) if (folder / "wall.json").is_file() else {}
    gap = report.get("gap", {}).get(cartridge, {})
    return {
        "run": folder.name,
        "p": results[cartridge]["kv_tokens"],
        "conversations": plan.get("num_conversations"),
        "steps": plan.get("steps"),
        "training_dtype": plan.get("training_dtype"),
        "accuracy": results[cartridge]["accuracy"],
        "accuracy_interval": results[cartridge].get("accuracy_interval"),
        "by_kind": results[cartridge].get("by_kind", {}),
        "no_context": results["no context"]["accuracy"],
        "icl": icl["accuracy"],
        "share": gap.get("share"),
        "share_interval": gap.get("interval"),
        "answer_log_ppl": results[cartridge]["answer_log_ppl"],
        "kv_ratio": icl["kv_bytes"] / results[cartridge]["kv_bytes"],
        "minutes": wall.get("minutes"),
        "resumed": wall.get("resumed", False),
        "questions": report["num_questions"],
        "corpus": report["corpus"],
    }


def _accuracy(value: float, interval) -> str:
    return f"{value:.3f} ({interval[0]:.2f}–{interval[1]:.2f})" if interval else f"{value:.3f}"


def table(rows: list[dict], groups: dict[str, str]) -> str:
    lines = [
        "| run | p | conversations / steps | accuracy (95% CI) | recall | combine | share of gap (95% CI) | "
        "answer log-ppl | KV ratio | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = "—" if r["share"] is None else f"{r['share']:.0%}"
        if r["share_interval"]:
            share += f" ({r['share_interval']['low']:.0%} to {r['share_interval']['high']:.0%})"
        kinds = [
            _accuracy(r["by_kind"][kind]["accuracy"], r["by_kind"][kind]["interval"])
            if kind in r["by_kind"]
            else "—"
            for kind in ("recall", "combine")
        ]
        minutes = (
            "—" if r["minutes"] is None else f"{r['minutes']:.1f}" + (" (resumed)" if r["resumed"] else "")
        )
        lines.append(
            f"| {r['run']} | {r['p']} | {r['conversations']} / {r['steps']} | "
            f"{_accuracy(r['accuracy'], r['accuracy_interval'])} | {kinds[0]} | {kinds[1]} | {share} | "
            f"{r['answer_log_ppl']:.3f} | {r['kv_ratio']:.1f}× | {minutes} |"
        )
    shares: dict[str, list[float]] = {}
    for r in rows:
        if r["share"] is not None:
            shares.setdefault(groups[r["run"]], []).append(r["share"])
    for group, values in shares.items():
        lines.append(
            f"\n{group}: mean share of the gap {sum(values) / len(values):.0%} over {len(values)} run(s)."
        )
    for corpus in dict.fromkeys(r["corpus"] for r in rows):
        first = next(r for r in rows if r["corpus"] == corpus)
        lines.append(
            f"\n{corpus}: no context {first['no_context']:.3f}, ICL {first['icl']:.3f}; {first['questions']} questions."
        )
    return "\n".join(lines)


def plot(rows: list[dict], runs: dict[str, dict], output: Path) -> None:
    """Accuracy (with its interval) and answer log-perplexity against KV compression, one line per document."""
    from matplotlib.figure import Figure

    from hfx.artifacts import save_figure_atomic

    figure = Figure(figsize=(9, 3.6))
    accuracy, log_ppl = figure.subplots(1, 2)
    for group in dict.fromkeys(runs[r["run"]]["group"] for r in rows):
        points = sorted((runs[r["run"]]["ratio"], r) for r in rows if runs[r["run"]]["group"] == group)
        ratios = [ratio for ratio, _ in points]
        values = [r["accuracy"] for _, r in points]
        errors = [
            [r["accuracy"] - r["accuracy_interval"][0] for _, r in points],
            [r["accuracy_interval"][1] - r["accuracy"] for _, r in points],
        ]
        line = accuracy.errorbar(
            ratios, values, yerr=errors, marker="o", capsize=3, label=f"{group} cartridge"
        )
        color = line[0].get_color()
        icl, none = points[0][1]["icl"], points[0][1]["no_context"]
        accuracy.axhline(icl, color=color, linestyle="--", linewidth=1, label=f"{group} ICL")
        accuracy.axhline(none, color=color, linestyle=":", linewidth=1, label=f"{group} no context")
        log_ppl.plot(ratios, [r["answer_log_ppl"] for _, r in points], marker="o", color=color, label=group)
    for axis in (accuracy, log_ppl):
        axis.set_xscale("log", base=2)
        axis.set_xticks([4, 8, 16, 32], ["4×", "8×", "16×", "32×"])
        axis.set_xlabel("KV cache smaller than ICL (document tokens / p)")
    accuracy.set_ylabel("multiple-choice accuracy (95% CI)")
    log_ppl.set_ylabel("answer log-perplexity (lower is better)")
    accuracy.legend(fontsize=7)
    log_ppl.legend(fontsize=7)
    figure.tight_layout()
    save_figure_atomic(figure, output, dpi=110)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("grid", choices=["seeds", "compression", "generated", "long"])
    parser.add_argument("--runs", nargs="+", help="only these runs of the grid (default: all, in order)")
    parser.add_argument("--output_root", default="outputs")
    parser.add_argument("--table", action="store_true", help="only print the table of the finished runs")
    parser.add_argument("--plot", help="also draw the compression curve into this PNG (the compression grid)")
    args = parser.parse_args(argv)
    runs = grid(args.grid)
    unknown = sorted(set(args.runs or ()) - set(runs))
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; the {args.grid} grid has {list(runs)}")
    names = [name for name in runs if not args.runs or name in args.runs]
    folder = Path(args.output_root) / args.grid
    if not args.table:
        hfx = Path(sys.executable).with_name("hfx")
        for name in names:
            out = folder / name
            if read_run(out) is not None and (out / "wall.json").is_file():
                continue
            command = [str(hfx), "cartridge", "run", *runs[name]["args"], "--output_dir", str(out)]
            print(" ".join(command), flush=True)
            resumed, start = out.exists(), time.time()
            subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            # the wall time of this call; a resumed run's counts only its last part, and says so
            write_text_atomic(
                out / "wall.json", json.dumps({"minutes": (time.time() - start) / 60, "resumed": resumed})
            )
    rows = [row for name in names if (row := read_run(folder / name)) is not None]
    print(table(rows, {name: run["group"] for name, run in runs.items()}))
    if rows:
        write_text_atomic(folder / "grid.json", json.dumps(rows, indent=2) + "\n")
    if args.plot and rows:
        plot(rows, runs, Path(args.plot))
    return rows


if __name__ == "__main__":
    main()
