"""Pretrain a PEER-MLA language model (or its dense-FFN baseline) with Trainer under accelerate.

    accelerate launch examples/peer_mla/pretrain.py --config examples/peer_mla/configs/pretrain_cpu.yaml

On a CPU-only machine add `--cpu`: `--cpu --num_processes 1` for one process with every core, `--cpu
--num_processes 2` for two gloo processes (data parallel: the same global batch as one process). On GPUs each
process trains on its own GPU in bfloat16 autocast (`--dtype auto`; `--dtype float32` turns it off) with the PEER
experts kernelized by the Triton kernel of `hub_kernels/peer` (`--peer_kernel auto`; `--peer_kernel pytorch` keeps
the PyTorch forward), and `--fp8 true` (with torchao) trains the Linear layers in float8. `--device cpu` trains on
the CPU of a GPU machine; `--device cuda` stops at once on a machine without CUDA.

Every field of `ModelArguments`, `DataArguments` and `PeerMlaTrainingArguments` (all of
`transformers.TrainingArguments`) can be set in the YAML file or overridden on the command line, e.g.
`--mlp dense`, `--max_tokens 200000`, `--report_to tensorboard`, `--mixture python_stdlib:0.5 pydoc_topics:0.5`,
`--device cuda --dtype bfloat16 --peer_kernel triton`.
Start the same command again after a kill to resume from the last complete checkpoint.
"""

import logging

from trl import TrlParser

from hfx.launch import relaunch_cpu_processes
from hfx.peer_mla.data import DataArguments
from hfx.peer_mla.training import ModelArguments, PeerMlaTrainingArguments, pretrain


def main() -> None:
    relaunch_cpu_processes()
    parser = TrlParser((ModelArguments, DataArguments, PeerMlaTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_and_config()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hfx").setLevel(logging.INFO if training_args.process_index == 0 else logging.WARNING)
    results = pretrain(model_args, data_args, training_args)
    if training_args.process_index == 0:
        print(
            f"{results['mlp']}: held-out perplexity {results['eval_perplexity']:.2f} after {results['tokens']:,} "
            f"tokens; saved in {training_args.output_dir}"
        )


if __name__ == "__main__":
    main()
