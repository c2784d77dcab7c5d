"""The main job with a time budget, and its accuracy against minutes: every checkpoint's cartridge is scored.

    .venv/bin/python examples/cartridges/curve.py --corpus sklearn_descr \
        --questions tests/data/questions/sklearn_descr.jsonl --budget_minutes 55 \
        --output_dir outputs/long-corpus

It runs ``hfx cartridge run`` (:func:`hfx.cartridges.pipeline.run_self_study`) with the same defaults, and keeps
a copy of the adapter of each checkpoint (``--save_steps``) with the minutes elapsed since the run started when it
was saved. After the run, each copy is scored on the questions (the cartridge condition only; the no-context and
ICL rows come from the run's own table). The curve is written to ``OUTPUT_DIR/curve.json`` and printed as a
Markdown table. Synthesis comes first, so the earliest checkpoint is saved after all of it: a point of the curve
is what the run had at that minute, not what a shorter budget would have planned.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from hfx.atomic import atomic_folder


@dataclass
class CurveArguments:
    save_steps: int = field(
        default=50, metadata={"help": "Keep (and later score) a cartridge every N steps."}
    )


class KeepCheckpointAdapters(TrainerCallback):
    """Copies each checkpoint's adapter to ``target/step-N`` with the minutes since ``start`` (a wall clock)."""

    def __init__(self, target: Path, start: float):
        self.target = target
        self.start = start

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        destination = self.target / f"step-{state.global_step}"
        if destination.is_dir() or not checkpoint.is_dir():
            return
        with atomic_folder(destination) as partial:
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                shutil.copy2(checkpoint / name, partial / name)
            (partial / "elapsed.json").write_text(
                json.dumps({"step": state.global_step, "minutes": (time.time() - self.start) / 60})
            )


def score_snapshots(
    snapshots: Path, questions: str, model_name_or_path: str, device: str, dtype: str
) -> list[dict]:
    """Each kept cartridge scored on ``questions`` by the run's base model, on its device and in its dtype."""
    import torch

    from hfx.cartridges.evaluation import cartridge_condition, evaluate_conditions, load_questions
    from hfx.cartridges.training import load_cartridge
    from hfx.models import load_causal_lm

    model, tokenizer = load_causal_lm(model_name_or_path, device=device, dtype=dtype)
    rows = []
    steps = sorted(snapshots.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if not steps:
        return rows
    peft_model = load_cartridge(model, steps[0])
    for path in steps:
        name = path.name.replace("-", "_")
        if path != steps[0]:
            peft_model.load_adapter(str(path), adapter_name=name)
            peft_model.set_adapter(name)
        condition = cartridge_condition(peft_model, name=path.name)
        with torch.no_grad(), peft_model.disable_adapter():
            (result,) = evaluate_conditions(
                peft_model.get_base_model(), tokenizer, [condition], load_questions(questions), 0
            )
        elapsed = json.loads((path / "elapsed.json").read_text())
        rows.append(
            {
                "step": elapsed["step"],
                "minutes": elapsed["minutes"],
                "accuracy": result.accuracy,
                "answer_log_ppl": result.answer_log_ppl,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    from hfx.atomic import write_text_atomic
    from hfx.cartridges.pipeline import RunArguments, run_self_study, run_training_settings
    from hfx.cartridges.synthesis import SynthesisConfig

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    curve_args, args, synthesis = HfArgumentParser(
        (CurveArguments, RunArguments, SynthesisConfig)
    ).parse_args_into_dataclasses(argv)
    if not args.questions:
        raise SystemExit("curve.py: --questions is required (each checkpoint is scored on them).")
    output_dir = Path(args.output_dir)
    snapshots = output_dir / "curve"
    start_path = output_dir / "curve-start.json"
    if start_path.is_file():  # a resumed run keeps counting from its first start
        start = json.loads(start_path.read_text())["start"]
    else:
        start = time.time()
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(start_path, json.dumps({"start": start}))
    training = {**run_training_settings(args), "save_steps": curve_args.save_steps}
    result = run_self_study(
        output_dir,
        args.corpus,
        args.questions,
        synthesis,
        training,
        args.model_name_or_path,
        device=args.device,
        dtype=args.dtype,
        budget_minutes=args.budget_minutes,
        callbacks=[KeepCheckpointAdapters(snapshots, start)],
    )
    run_minutes = (time.time() - start) / 60
    rows = score_snapshots(
        snapshots, args.questions, args.model_name_or_path, result.report["device"], result.report["dtype"]
    )
    (final,) = [r for r in result.report["results"] if r["condition"].startswith("cartridge")]
    rows.append(
        {
            "step": "final",
            "minutes": run_minutes,
            "accuracy": final["accuracy"],
            "answer_log_ppl": final["answer_log_ppl"],
        }
    )
    curve = {"corpus": args.corpus, "run_minutes": run_minutes, "report": result.report, "curve": rows}
    write_text_atomic(output_dir / "curve.json", json.dumps(curve, indent=2))
    lines = ["| step | minutes | accuracy | answer log-ppl |", "|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['step']} | {row['minutes']:.1f} | {row['accuracy']:.3f} | {row['answer_log_ppl']:.3f} |"
        )
    print(result.report.get("table", ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
