"""Train a cartridge on a synthesized self-study dataset, with Trainer under accelerate.

    hfx cartridge synthesize --corpus rcv1 --synthesis_dir outputs/synthesis-rcv1
    accelerate launch examples/cartridges/train.py --config examples/cartridges/configs/rcv1.yaml

On a CPU-only machine add `--cpu`: `--cpu --num_processes 1` for one process with every core (without `--cpu`
accelerate gives the process one thread), `--cpu --num_processes 2` for two gloo processes (data parallel, same
result as one process with the same global batch).

Every option of `hfx.cartridges.pipeline.TrainArguments` and `CartridgeTrainingArguments` (all of
`transformers.TrainingArguments`) can be set in the YAML file or overridden on the command line.
"""

from trl import TrlParser

from hfx.cartridges.pipeline import TrainArguments, train_and_report
from hfx.cartridges.training import CartridgeTrainingArguments
from hfx.launch import relaunch_cpu_processes


def main() -> None:
    relaunch_cpu_processes()
    parser = TrlParser((TrainArguments, CartridgeTrainingArguments))
    args, training_args = parser.parse_args_and_config()
    report = train_and_report(args, training_args)
    if report and training_args.process_index == 0:
        print(report["table"])


if __name__ == "__main__":
    main()
