"""The natural-language autoencoder's curves: SFT with each kind of target at each explanation length, each run
evaluated with `hfx lens eval` and with its reconstructor reading the held-out examples' own targets (what a
verbaliser that wrote its targets perfectly would reach); a table and a figure (held-out FVE against the length,
and against the SFT steps).

    hfx lens dump --output_dir outputs/lens-activations --layer 15 --context_length 32 --max_examples 8192 \\
        --dataset pydoc_topics,sklearn_descr
    python examples/lens/nla_curves.py --targets continuation window top_predictions context --lengths 4 8 16 32
    python examples/lens/nla_curves.py --table --plot docs/figures/lens_nla_curves.png

Each run is `hfx lens sft --config examples/lens/configs/nla-sft.yaml --target T --explanation_length K` into
`<output_root>/<T>-k<K>` (a stage: a finished run of the same settings is reused, one of other settings refused, a
killed one resumes), then `hfx lens eval` (again whenever the run, or its reconstructor's config, is newer than
its evaluation). Runs made before SFT capped the reconstructor's output norm or wrote `target_fit.json` (every
finished run under the root, and the `--grpo` folders) get them and are evaluated again. Runs go one after another;
`--table` only reads the finished ones.
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

TARGETS = ("continuation", "window", "top_predictions", "context")
LENGTHS = (4, 8, 16, 32)
#: The figure's FVE axis starts here (below the mean's 0); runs below it are marked at the floor with their value.
FLOOR = -0.25


def run_name(target: str, length: int) -> str:
    return f"{target}-k{length}"


def _recipe(settings: dict) -> str:
    target = settings["target"]
    if target == "window":
        target += f" ({settings.get('context_tokens', 2)} context)"
    epochs = settings.get("reconstructor_epochs", 1.0)
    empty = settings.get("reconstructor_empty_fraction", 0.0)
    return f"{target}; reconstructor {epochs:g} ep{', +empty' if empty else ''}"


def read_run(folder: Path, sft_folders: dict[str, Path] | None = None) -> dict | None:
    """The run's figures (an `hfx lens sft` folder, or an `hfx lens grpo` one whose SFT folder is among
    `sft_folders`, by fingerprint), once it has its evaluation."""
    results = folder / "eval_results.json"
    if not results.is_file():
        return None
    values = json.loads(results.read_text())
    grpo = (folder / "hfx_stage_lens-grpo.json").is_file()
    sft_folder = folder
    if grpo:
        sft = json.loads((folder / "hfx_stage_lens-grpo.json").read_text())["inputs"]["sft"]
        if sft not in (sft_folders or {}):
            return None
        sft_folder = sft_folders[sft]
    manifest = json.loads((sft_folder / "hfx_stage_lens-sft.json").read_text())["settings"]["autoencoder"]
    wall = folder / "wall.json"
    wall = json.loads(wall.read_text()) if wall.is_file() else {}
    state = folder / "verbalizer" / "trainer_state.json"
    curve = []
    if state.is_file():
        history = json.loads(state.read_text())["log_history"]
        curve = [(entry["step"], entry["heldout_fve"]) for entry in history if "heldout_fve" in entry]
    fit = sft_folder / "target_fit.json"
    fit = json.loads(fit.read_text()) if fit.is_file() and not grpo else {}
    return {
        "run": folder.name,
        "phase": "GRPO" if grpo else "SFT",
        "recipe": _recipe(manifest),
        "target": manifest["target"],
        "length": manifest["explanation_length"],
        "fve": values["fve"],
        # a reconstructor never shown an empty explanation reads one as noise: no baseline to compare with
        "fve_vs_empty": values["fve_vs_empty"] if manifest.get("reconstructor_empty_fraction") else None,
        "cosine": values["conditions"]["lens"]["cosine"],
        "kl": values["kl"]["lens"],
        "kl_mean_ablation": values["kl"]["mean_ablation"],
        "copy_rate": values["copy_rate"],
        "target_fve": fit.get("fve"),
        "target_copy_rate": fit.get("copy_rate"),
        "minutes": wall.get("minutes"),
        "resumed": wall.get("resumed", False),
        "curve": curve,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| phase | targets | k | FVE | FVE vs empty | cosine | KL (mean ablation) | copy rate | targets read back: "
        "FVE (copy rate) | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        minutes = "–" if row["minutes"] is None else f"{row['minutes']:.1f}"
        if row["minutes"] is not None and row["resumed"]:
            minutes += " (resumed)"
        fit = "–"
        vs_empty = "–" if row["fve_vs_empty"] is None else f"{row['fve_vs_empty']:.3f}"
        if row.get("target_fve") is not None:
            fit = f"{row['target_fve']:.3f} ({row['target_copy_rate']:.1%})"
        lines.append(
            f"| {row['phase']} | {row['recipe']} | {row['length']} | {row['fve']:.3f} | {vs_empty} | "
            f"{row['cosine']:.3f} | {row['kl']:.3f} ({row['kl_mean_ablation']:.3f}) | {row['copy_rate']:.1%} | "
            f"{fit} | {minutes} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hfx.artifacts import save_figure_atomic

    fig, (by_length, by_step) = plt.subplots(1, 2, figsize=(10, 5.6))
    sft = [r for r in rows if r["phase"] == "SFT"]
    for recipe in dict.fromkeys(r["recipe"] for r in sft):
        mine = sorted((r for r in sft if r["recipe"] == recipe), key=lambda r: r["length"])
        line = by_length.plot([r["length"] for r in mine], [r["fve"] for r in mine], marker="o", label=recipe)
        fits = [r for r in mine if r["target_fve"] is not None]
        if fits:  # what the reconstructor reads back from the targets themselves
            by_length.plot(
                [r["length"] for r in fits],
                [r["target_fve"] for r in fits],
                marker="o",
                markerfacecolor="none",
                linestyle=":",
                color=line[0].get_color(),
                label=f"{recipe}: its targets read back",
            )
    offset = {r["run"]: r["curve"][-1][0] for r in sft if r["curve"]}
    for r in rows:
        if r["curve"] and r["length"] == 8:
            steps, values = zip(*r["curve"], strict=True)
            if r["phase"] == "GRPO":  # after its SFT run's steps
                start = max((v for k, v in offset.items() if k.endswith("-k8")), default=0)
                steps = [start + s for s in steps]
            by_step.plot(steps, values, marker=".", label=f"{r['phase']}, {r['recipe']}")
    # a run far below the mean's level is drawn at the floor with its value (a curve: its range in the legend)
    for axis in (by_length, by_step):
        low = min((y for line in axis.lines for y in line.get_ydata()), default=0.0)
        if low < FLOOR:
            axis.set_ylim(bottom=FLOOR - 0.05)
            for line in list(axis.lines):
                below = [(x, y) for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True) if y < FLOOR]
                if below and line.get_marker() == "o":
                    for x, y in below:
                        axis.plot([x], [FLOOR], marker="v", color=line.get_color())
                        axis.annotate(f"{y:.2f}", (x, FLOOR), textcoords="offset points", xytext=(6, -3))
                elif below:
                    values = [y for _, y in below]
                    line.set_label(f"{line.get_label()} (below: {min(values):.2f} to {max(values):.2f})")
    by_length.set_xscale("log", base=2)
    lengths = sorted({r["length"] for r in sft})
    by_length.set_xticks(lengths, [str(k) for k in lengths])
    by_length.set_xlabel("explanation length k (tokens)")
    by_length.set_ylabel("FVE, 256 held out")
    by_length.axhline(0.6, color="grey", linestyle="--", linewidth=0.8)
    by_length.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    by_length.set_title("after SFT, by explanation length")
    by_step.set_xlabel("step (SFT, then GRPO)")
    by_step.set_ylabel("FVE, 64 held-out activations")
    by_step.axhline(0.6, color="grey", linestyle="--", linewidth=0.8)
    if by_step.lines[1:]:  # a curve beside the 0.6 line
        by_step.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    by_step.set_title("k = 8, during training")
    fig.tight_layout()
    save_figure_atomic(fig, path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    parser.add_argument("--config", default="examples/lens/configs/nla-sft.yaml")
    parser.add_argument("--activations_dir", default="outputs/lens-activations")
    parser.add_argument("--model_name_or_path", default="embedded", help="the frozen model (as dumped)")
    parser.add_argument("--eval_examples", type=int, default=256, help="held-out examples (the last ones)")
    parser.add_argument("--output_root", default="outputs/lens-nla")
    parser.add_argument(
        "--grpo",
        nargs="*",
        default=["outputs/lens-grpo"],
        help="evaluated `hfx lens grpo` folders, as rows too",
    )
    parser.add_argument("--table", action="store_true", help="only print the table of the finished runs")
    parser.add_argument("--plot", help="also draw the curves into this PNG")
    parser.add_argument("extra", nargs="*", help="more `hfx lens sft` options, after --")
    args = parser.parse_args(argv)
    root = Path(args.output_root)
    hfx = str(Path(sys.executable).with_name("hfx"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    from hfx.lens.nla_pipeline import SFT_STAGE

    if not args.table:
        from hfx.lens.nla_pipeline import GRPO_STAGE, cap_output_norm, target_fit_of

        common = ["--activations_dir", args.activations_dir, "--model_name_or_path", args.model_name_or_path]
        common += ["--eval_examples", str(args.eval_examples)]

        def evaluate(folder: Path, marker: Path) -> None:
            """`hfx lens eval`, unless its results are newer than the run and its reconstructor's config."""
            results = folder / "eval_results.json"
            made = max(marker.stat().st_mtime, (folder / "reconstructor" / "config.json").stat().st_mtime)
            if not results.is_file() or results.stat().st_mtime < made:
                subprocess.run([hfx, "lens", "eval", *common, "--lens", str(folder)], check=True, env=env)

        for target in args.targets:
            for length in args.lengths:
                out = root / run_name(target, length)
                marker = out / f"hfx_stage_{SFT_STAGE}.done"
                finished_before = marker.is_file()
                start, resumed = time.time(), out.exists()
                # always asked: a finished run of these settings is reused, one of other settings refused
                subprocess.run(
                    [hfx, "lens", "sft", "--config", args.config, *common, "--target", target]
                    + ["--explanation_length", str(length), "--output_dir", str(out), *args.extra],
                    check=True,
                    env=env,
                )
                evaluate(out, marker)
                if not finished_before:  # this call's wall time: all of it, or what a resumed run had left
                    write_text_atomic(
                        out / "wall.json",
                        json.dumps({"minutes": (time.time() - start) / 60, "resumed": resumed}) + "\n",
                    )
        # every finished run under the root (and the GRPO folders): runs made before SFT capped the reconstructor's
        # output norm, or wrote target_fit.json, get them, and are evaluated again
        for out in sorted(root.glob("*")):
            if (out / f"hfx_stage_{SFT_STAGE}.done").is_file():
                cap_output_norm(out, args.activations_dir)
                evaluate(out, out / f"hfx_stage_{SFT_STAGE}.done")
                target_fit_of(out, args.activations_dir)
        for folder in map(Path, args.grpo):
            if (folder / f"hfx_stage_{GRPO_STAGE}.done").is_file():
                cap_output_norm(folder, args.activations_dir)
                evaluate(folder, folder / f"hfx_stage_{GRPO_STAGE}.done")
    # every evaluated SFT run under the root whose target and length were asked for, whatever its folder's name
    # (a run of an earlier recipe, moved aside, stays a row)
    rows = [
        row
        for run in sorted(root.glob("*"))
        if (run / f"hfx_stage_{SFT_STAGE}.json").is_file()
        and (row := read_run(run)) is not None
        and row["target"] in args.targets
        and row["length"] in args.lengths
    ]
    rows.sort(key=lambda row: (args.targets.index(row["target"]), row["recipe"], row["length"]))
    finished = {
        (run / f"hfx_stage_{SFT_STAGE}.done").read_text().strip(): run
        for run in sorted(root.glob("*"))
        if (run / f"hfx_stage_{SFT_STAGE}.done").is_file()
    }
    rows += [row for folder in args.grpo if (row := read_run(Path(folder), finished)) is not None]
    print(table(rows))
    if rows:
        write_text_atomic(root / "curves.json", json.dumps(rows, indent=2) + "\n")
    if args.plot and rows:
        plot(rows, Path(args.plot))
    return rows


if __name__ == "__main__":
    main()
