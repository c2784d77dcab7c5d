"""The natural-language autoencoder's phases under `accelerate launch` (one process per GPU, or N gloo processes on
a CPU with `--cpu`): `sft`, `grpo` or `eval`, with the options of `hfx lens sft|grpo|eval --help`.

    accelerate launch --cpu --num_processes 1 examples/lens/nla.py sft --config examples/lens/configs/nla-sft.yaml
    accelerate launch --cpu --num_processes 1 examples/lens/nla.py grpo --config examples/lens/configs/nla-grpo.yaml
    python examples/lens/nla.py eval --lens outputs/lens-grpo

(On a CPU, `--cpu` lets accelerate give the process every core; `--num_processes N` trains data-parallel.)
"""

import sys

from hfx.launch import relaunch_cpu_processes


def main():
    relaunch_cpu_processes()
    from hfx.cli import main as hfx

    if len(sys.argv) < 2 or sys.argv[1] not in ("sft", "grpo", "eval"):
        raise SystemExit(__doc__)
    hfx(["lens", *sys.argv[1:]])


if __name__ == "__main__":
    main()
