"""The natural-language autoencoder's phases under `accelerate launch` (one process per GPU, or N gloo processes on
a CPU with `--cpu`): `sft`, `grpo` and `eval`, each with the options of `hfx lens sft|grpo|eval --help`; several
phases run one after the other in one launch when separated by `+`.

    accelerate launch --cpu --num_processes 1 examples/lens/nla.py \\
        sft --config examples/lens/configs/nla-sft.yaml + eval --lens outputs/lens-sft \\
        + grpo --config examples/lens/configs/nla-grpo.yaml + eval --lens outputs/lens-grpo

(On a CPU, `--cpu` lets accelerate give the process every core; `--num_processes N` trains data-parallel. An
evaluation runs in the main process alone.)
"""

import sys

from hfx.launch import relaunch_cpu_processes

PHASES = ("sft", "grpo", "eval")


def phases(argv: list[str]) -> list[list[str]]:
    """`sft A + grpo B` -> [["sft", A...], ["grpo", B...]], each a known phase."""
    segments, current = [], []
    for word in argv:
        if word == "+":
            segments.append(current)
            current = []
        else:
            current.append(word)
    segments.append(current)
    for segment in segments:
        if not segment or segment[0] not in PHASES:
            raise SystemExit(f"each phase is one of {', '.join(PHASES)} and its options\n\n{__doc__}")
    return segments


def main():
    relaunch_cpu_processes()
    from accelerate import PartialState

    from hfx.cli import main as hfx

    for phase in phases(sys.argv[1:]):
        if phase[0] == "eval":
            if PartialState().is_main_process:
                hfx(["lens", *phase])
            PartialState().wait_for_everyone()
        else:
            hfx(["lens", *phase])


if __name__ == "__main__":
    main()
