"""Quanta discovery: per-token losses -> low-loss, non-induction tokens -> per-token gradients -> similarity ->
spectral clusters -> a page to browse them.

    python examples/quanta/discover.py --config examples/quanta/configs/smollm2.yaml
    accelerate launch --cpu --num_processes 2 examples/quanta/discover.py --config examples/quanta/configs/smoke.yaml

Any option of `hfx quanta run --help` can be given on the command line or in the YAML file. Under
`accelerate launch` the losses and gradients shards are split over the processes; the main process clusters.
"""

from trl import TrlParser

from hfx.quanta.pipeline import (
    ClusterArguments,
    FilterArguments,
    GradientArguments,
    LossesArguments,
    RunArguments,
    ViewArguments,
    run_discovery,
)


def main():
    parser = TrlParser(
        (RunArguments, LossesArguments, FilterArguments, GradientArguments, ClusterArguments, ViewArguments)
    )
    run, losses, filtering, gradients, clustering, view = parser.parse_args_and_config()
    summary = run_discovery(run, losses, filtering, gradients, clustering, view)
    if summary:
        times = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in summary["timings_seconds"].items())
        print(f"clusters: {summary['clusters']}\npage: {summary['page']}\n{times}")


if __name__ == "__main__":
    main()
