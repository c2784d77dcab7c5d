"""The main job under a time budget on this device: what it plans (conversations, training steps) and whether it
ends inside the budget.

    .venv/bin/python benchmarks/cartridges_main_job.py --budget-minutes 3 --device cpu
    python benchmarks/cartridges_main_job.py --budget-minutes 3 --continuation-fraction 0.5 --device cuda \\
        --cpu-reference-conversations 64

A random-weight model of the embedded model's shape (``--random-model``, no weights needed: a GPU machine with no
network) and a small tokenizer trained on bundled text are saved to a temporary folder and given to
``hfx.cartridges.pipeline.run_self_study`` as its model, with ``budget_minutes``: the run synthesizes, plans from
the speeds it measures on this device (synthesis of the kinds the mix holds, a training step), trains, evaluates on
the corpus's questions and saves the cartridge, end to end. ``--continuation-fraction`` is the share of quoted
(not generated) conversations: 1.0 is the default mix, 0.5 half generated. ``--cpu-reference-conversations`` is the
number of conversations the same command plans on the 2-core CPU: the ratio is printed against it.

``--plan-only`` stops after the plan: the run's own planning (the probe's batches, a timed training step, the
timed evaluation sample) for each ``--continuation-fraction`` given, one model load for all. It shows what a budget
buys on this device in well under the budget; the later mixes reuse decode steps the first one built, so their
setup is a little shorter than a run's of their own.

    python benchmarks/cartridges_main_job.py --plan-only --continuation-fraction 1.0 0.5 --device cuda \
        --cpu-reference-conversations 64 64
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from _random_models import SHAPES, random_causal_lm, tokenizer_for

from hfx.cartridges.pipeline import run_self_study
from hfx.cartridges.synthesis import SynthesisConfig
from hfx.models import resolve

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--random-model", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--corpus", default="rcv1")
    parser.add_argument("--questions", default=str(ROOT / "tests" / "data" / "questions" / "rcv1.jsonl"))
    parser.add_argument("--budget-minutes", type=float, default=3.0)
    parser.add_argument(
        "--continuation-fraction",
        type=float,
        nargs="+",
        default=[1.0],
        help="1.0: the default mix (several with --plan-only: one plan each)",
    )
    parser.add_argument("--device", default=None, help="default: accelerate's device of this process")
    parser.add_argument(
        "--dtype", default="auto", help="auto: bfloat16 on a GPU that supports it, else float32"
    )
    parser.add_argument(
        "--cpu-reference-conversations",
        type=int,
        nargs="+",
        default=None,
        help="the CPU's planned conversations, one per --continuation-fraction",
    )
    parser.add_argument("--plan-only", action="store_true", help="stop after the plan (see above)")
    args = parser.parse_args()
    if len(args.continuation_fraction) > 1 and not args.plan_only:
        parser.error("several --continuation-fraction values need --plan-only (a run has one mix)")
    references = args.cpu_reference_conversations or []
    if references and len(references) != len(args.continuation_fraction):
        parser.error("give one --cpu-reference-conversations per --continuation-fraction")
    # the plan (and the budget's probe) as soon as they are known: a run stopped early still shows its plan
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("hfx.cartridges.budget").setLevel(logging.INFO)
    logging.getLogger("hfx.cartridges.pipeline").setLevel(logging.INFO)

    device, dtype = resolve(args.device, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        tokenizer = tokenizer_for(args.random_model)
        random_causal_lm(args.random_model, tokenizer, device, dtype).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        if args.plan_only:
            plans = plan_only(args, model_dir, Path(tmp), device)
            for fraction, plan, wall in plans:
                report(args, fraction, plan, wall, references, planned_only=True)
            if len(plans) < len(args.continuation_fraction):
                raise SystemExit(1)  # a mix with no plan that fits
            return
        fraction = args.continuation_fraction[0]
        start = time.perf_counter()
        try:
            result = run_self_study(
                Path(tmp) / "run",
                args.corpus,
                args.questions,
                SynthesisConfig(continuation_fraction=fraction),
                model_name_or_path=str(model_dir),
                device=str(device),
                dtype=args.dtype,
                budget_minutes=args.budget_minutes,
            )
        except ValueError as error:
            if "is too small" not in str(error):
                raise
            print(f"no plan fits: {error}")
            print(f"RESULT main_job_conversations_{mix_name(fraction)} 0")
            raise SystemExit(1) from None
        wall = time.perf_counter() - start
        plan = json.loads((result.output_dir / "plan.json").read_text())
    report(args, fraction, plan, wall, references)


def mix_name(continuation_fraction: float) -> str:
    return f"{round(100 * (1 - continuation_fraction))}gen"


def plan_only(args, model_dir: Path, tmp: Path, device) -> list[tuple[float, dict, float]]:
    """(mix, plan, seconds) of each mix that a plan fits, the plan made as ``run_self_study`` makes it (its own
    planning function); the seconds count a model load, as the mix's own run would."""
    from hfx.cartridges.corpus import load_corpus
    from hfx.cartridges.evaluation import load_questions
    from hfx.cartridges.pipeline import _budgeted_synthesis
    from hfx.models import load_causal_lm

    start = time.perf_counter()
    model, tokenizer = load_causal_lm(str(model_dir), device=str(device), dtype=args.dtype)
    load_seconds = time.perf_counter() - start
    corpus = load_corpus(args.corpus, tokenizer)
    questions = load_questions(args.questions)
    plans = []
    for index, fraction in enumerate(args.continuation_fraction):
        if index:  # each later plan counts a model load in its setup, as its own run would
            start = time.perf_counter() - load_seconds
        output_dir = tmp / f"plan-{index}"
        output_dir.mkdir()
        training = {"num_virtual_tokens": max(1, corpus.num_tokens // 8)}  # run_self_study's default
        try:
            _budgeted_synthesis(
                output_dir,
                args.budget_minutes,
                model,
                str(model_dir),
                tokenizer,
                corpus,
                SynthesisConfig(continuation_fraction=fraction),
                training,
                None,
                start,
                questions,
                load_seconds,
            )
        except ValueError as error:
            if "is too small" not in str(error):
                raise
            print(f"{mix_name(fraction)}: no plan fits: {error}")
            print(f"RESULT main_job_conversations_{mix_name(fraction)} 0")
            continue
        plan = json.loads((output_dir / "plan.json").read_text())
        plans.append((fraction, plan, time.perf_counter() - start))
    return plans


def report(args, fraction: float, plan: dict, wall: float, references: list[int], planned_only=False) -> None:
    mix = mix_name(fraction)
    print(
        f"{args.random_model} (random weights) on {plan['device']}, synthesis in {plan['dtype']}, training in "
        f"{plan['training_dtype']}; corpus {args.corpus}; {100 * (1 - fraction):.0f}% generated"
    )
    print(
        f"plan: {plan['num_conversations']} conversations ({plan['conversations_per_chunk']} per chunk, "
        f"{plan['seconds_per_conversation'] * 1000:.1f} ms each), {plan['steps']} training steps "
        f"({plan['seconds_per_step']:.3f} s each), setup {plan['setup_seconds']:.1f} s, "
        f"planned {plan['planned_seconds']:.0f} s"
    )
    print(f"RESULT main_job_conversations_{mix} {plan['num_conversations']}")
    print(f"RESULT main_job_steps_{mix} {plan['steps']}")
    if planned_only:
        print(f"planning took {wall:.0f} s (the run stops there)")
    else:
        print(
            f"wall time {wall:.0f} s of the {args.budget_minutes * 60:.0f} s budget "
            f"({wall / 60 / args.budget_minutes:.2f})"
        )
        print(f"RESULT main_job_wall_over_budget_{mix} {wall / 60 / args.budget_minutes:.3f}")
    if references:
        reference = references[args.continuation_fraction.index(fraction)]
        ratio = plan["num_conversations"] / reference
        print(f"vs the CPU's plan of {reference} conversations: {ratio:.1f}x")
        print(f"RESULT main_job_vs_cpu_{mix} {ratio:.2f}")


if __name__ == "__main__":
    main()
