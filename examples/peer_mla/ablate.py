"""Run a grid of PEER-MLA pretraining ablations and tabulate held-out perplexity.

    python examples/peer_mla/ablate.py --config examples/peer_mla/configs/ablate_cpu.yaml
    python examples/peer_mla/ablate.py --config examples/peer_mla/configs/ablate_cpu.yaml --axes num_experts peer_num_heads
    python examples/peer_mla/ablate.py --config examples/peer_mla/configs/peer_vs_dense.yaml --resume

Each run is `accelerate launch examples/peer_mla/pretrain.py` on `--num_processes` processes (`--cpu` without a
GPU) with the run's overrides, in `<output_dir>/runs/<run>`; its log is `train.log` there. `--resume` skips
finished runs and continues interrupted ones from their last checkpoint. The table is written to
`<output_dir>/results.csv` and `results.md`, the plot to `results.png`. Options after `--` go to every run
(e.g. `-- --report_to tensorboard`).
"""

import argparse
import logging
import sys
from pathlib import Path

from hfx.peer_mla.ablation import AblationConfig, format_markdown, run_ablation


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0], epilog=__doc__.split("\n\n", 2)[2]
    )
    parser.add_argument(
        "--config", required=True, help="ablation YAML: base_config, output_dir, max_tokens, axes"
    )
    parser.add_argument("--axes", nargs="+", default=None, help="vary only these axes (default: all of them)")
    parser.add_argument("--resume", action="store_true", help="skip finished runs, continue interrupted ones")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="run again a run whose folder was made with other arguments (without it: refused, naming them)",
    )
    parser.add_argument("--num_processes", type=int, default=1, help="processes per run")
    parser.add_argument("--cpu", action="store_true", default=None, help="train on the CPU even with a GPU")
    parser.add_argument("--output_dir", default=None, help="override the ablation file's output_dir")
    parser.add_argument(
        "--max_tokens", type=int, default=None, help="override the ablation file's token budget"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        config = AblationConfig.from_yaml(args.config)
        if args.output_dir:
            config.output_dir = args.output_dir
        if args.max_tokens:
            config.max_tokens = args.max_tokens
        rows = run_ablation(
            config,
            Path(__file__).with_name("pretrain.py"),
            axes=args.axes,
            resume=args.resume,
            num_processes=args.num_processes,
            cpu=args.cpu,
            extra_arguments=extra,
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        raise SystemExit(f"ablate.py: error: {error}") from None
    print(format_markdown(rows, list(args.axes or config.axes)))
    print(f"table: {config.output_dir}/results.md, results.csv; plot: {config.output_dir}/results.png")


if __name__ == "__main__":
    main()
