"""The main job several times: seeds x training dtypes at one budget, to tell a difference from a draw.

    .venv/bin/python examples/cartridges/seeds.py                       # 3 seeds x bfloat16/float32, 18 min each
    .venv/bin/python examples/cartridges/seeds.py --seeds 0 1 --dtypes float32 --budget_minutes 18
    .venv/bin/python examples/cartridges/seeds.py --table               # the table of what is finished

Each run is ``hfx cartridge run --corpus CORPUS --questions QUESTIONS --budget_minutes B --seed S --model_dtype D``
into ``OUTPUT_DIR/<dtype>-seed<S>``, one after the other in child processes (one torch job at a time). Runs are
stages: a finished run is reused, a killed one resumes, so the script can be stopped and started again. Its table
gives per run the plan (conversations, steps), accuracy with its Wilson interval, the share of the no context ->
ICL gap with its bootstrap interval, log-ppl and minutes, then the mean share per dtype over its seeds; the rows
are also written to ``OUTPUT_DIR/seeds.json``.
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


def run_dir(output_dir: Path, dtype: str, seed: int) -> Path:
    return output_dir / f"{dtype}-seed{seed}"


def read_run(folder: Path) -> dict | None:
    """The row of a finished run (its evaluation and plan), or None."""
    evaluation = folder / "cartridge" / "eval_results.json"
    if not evaluation.is_file():
        return None
    report = json.loads(evaluation.read_text())
    results = {r["condition"]: r for r in report["results"]}
    cartridge = next(name for name in results if name.startswith("cartridge"))
    plan = json.loads((folder / "plan.json").read_text()) if (folder / "plan.json").is_file() else {}
    timing = json.loads((folder / "wall.json").read_text()) if (folder / "wall.json").is_file() else {}
    minutes = timing.get("minutes")
    gap = report.get("gap", {}).get(cartridge, {})
    return {
        "run": folder.name,
        "conversations": plan.get("num_conversations"),
        "steps": plan.get("steps"),
        "accuracy": results[cartridge]["accuracy"],
        "accuracy_interval": results[cartridge].get("accuracy_interval"),
        "no_context": results["no context"]["accuracy"],
        "icl": next(r["accuracy"] for n, r in results.items() if n.startswith("ICL")),
        "share": gap.get("share"),
        "share_interval": gap.get("interval"),
        "answer_log_ppl": results[cartridge]["answer_log_ppl"],
        "by_kind": results[cartridge].get("by_kind", {}),
        "minutes": minutes,
        "resumed": timing.get("resumed", False),
        "questions": report["num_questions"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| run | conversations / steps | accuracy (95% CI) | share of gap (95% CI) | answer log-ppl | minutes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["accuracy_interval"] or (float("nan"), float("nan"))
        interval = r["share_interval"]
        share = "—" if r["share"] is None else f"{r['share']:.0%}"
        if interval:
            share += f" ({interval['low']:.0%} to {interval['high']:.0%})"
        minutes = f"{r['minutes']:.1f}" if r["minutes"] is not None else "—"
        minutes += " (resumed)" if r.get("resumed") else ""
        lines.append(
            f"| {r['run']} | {r['conversations']} / {r['steps']} | {r['accuracy']:.3f} ({low:.2f}–{high:.2f}) | "
            f"{share} | {r['answer_log_ppl']:.3f} | {minutes} |"
        )
    by_dtype: dict[str, list[float]] = {}
    for r in rows:
        if r["share"] is not None:
            by_dtype.setdefault(r["run"].rsplit("-seed", 1)[0], []).append(r["share"])
    for dtype, shares in by_dtype.items():
        lines.append(
            f"\n{dtype}: mean share of the gap {sum(shares) / len(shares):.0%} over {len(shares)} run(s)."
        )
    if rows:
        lines.append(
            f"\nno context {rows[0]['no_context']:.3f}, ICL {rows[0]['icl']:.3f}; {rows[0]['questions']} questions."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default="rcv1")
    parser.add_argument("--questions", default="tests/data/questions/rcv1.jsonl")
    parser.add_argument("--budget_minutes", type=float, default=18)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"]
    )
    parser.add_argument("--output_dir", default="outputs/seeds")
    parser.add_argument("--table", action="store_true", help="only print the table of the finished runs")
    args, extra = parser.parse_known_args(argv)
    output_dir = Path(args.output_dir)
    plan = [(seed, dtype) for seed in args.seeds for dtype in args.dtypes]
    if not args.table:
        hfx = Path(sys.executable).with_name("hfx")
        for seed, dtype in plan:
            folder = run_dir(output_dir, dtype, seed)
            if read_run(folder) is not None and (folder / "wall.json").is_file():
                continue
            command = [
                str(hfx), "cartridge", "run", "--corpus", args.corpus, "--questions", args.questions,
                "--budget_minutes", str(args.budget_minutes), "--seed", str(seed), "--model_dtype", dtype,
                "--output_dir", str(folder), *extra,
            ]  # fmt: skip
            print(" ".join(command), flush=True)
            resumed, start = folder.exists(), time.time()
            subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            # the wall time of this call; a resumed run's counts only its last part, and says so
            write_text_atomic(
                folder / "wall.json", json.dumps({"minutes": (time.time() - start) / 60, "resumed": resumed})
            )
    rows = [row for seed, dtype in plan if (row := read_run(run_dir(output_dir, dtype, seed))) is not None]
    print(table(rows))
    if rows:
        write_text_atomic(output_dir / "seeds.json", json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
