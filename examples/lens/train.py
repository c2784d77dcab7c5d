"""Train a Consistency Lens on a dumped activation dataset, then evaluate it against mean/zero ablation.

    hfx lens dump --output_dir outputs/lens-activations --layer 15 --context_length 32 --max_examples 8192 \
        --dataset pydoc_topics,sklearn_descr
    accelerate launch --cpu --num_processes 1 examples/lens/train.py --config examples/lens/configs/smollm2.yaml

(On a CPU, `--cpu` lets accelerate give the process every core; without it the process gets one thread.
`--num_processes N` trains data-parallel: one process per GPU, or N gloo processes with `--cpu`.)

Any option of `hfx lens train --help` can be given on the command line or in the YAML file.
"""

from trl import TrlParser

from hfx.launch import relaunch_cpu_processes
from hfx.lens.pipeline import LensArguments, run_eval, run_train
from hfx.lens.training import LensTrainingArguments


def main():
    relaunch_cpu_processes()
    args, training_args = TrlParser((LensArguments, LensTrainingArguments)).parse_args_and_config()
    lens_dir = run_train(args, training_args)
    if training_args.process_index == 0:
        results = run_eval(args, str(lens_dir))
        kl = results["kl"]
        print(
            f"KL lens {kl['lens']:.4f} | mean ablation {kl['mean_ablation']:.4f} | zero ablation "
            f"{kl['zero_ablation']:.4f} | FVE {results['fve']:.3f}"
        )
        for sample in results["samples"]:
            print(f"  ...{sample['context'][-60:]!r} -> {sample['explanation']!r}")


if __name__ == "__main__":
    main()
