"""Consistency Lens training throughput: precomputed activations (read from the dumped dataset) vs runtime mode
(the frozen model captures them on the fly), same lens, same batches, one process.

    hfx lens dump --output_dir outputs/lens-activations --layer 15 --context_length 32 --max_examples 8192 \
        --dataset pydoc_topics,sklearn_descr
    .venv/bin/python benchmarks/lens_training.py --activations_dir outputs/lens-activations

The lens has the shape of examples/lens/configs/smollm2.yaml (8 tokens written backwards, decoder = 4 base
layers, encoder = layer + 1 base layers, identity output); the steps are KL steps.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from hfx import models
from hfx.lens.data import load_activations
from hfx.lens.modeling_lens import ConsistencyLens
from hfx.lens.training import LensTrainer, LensTrainingArguments


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--activations_dir", default="outputs/lens-activations")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    base, _ = models.load_causal_lm()  # where Trainer trains: this process's accelerator, else the CPU
    data = load_activations(args.activations_dir).select(range(args.steps * args.batch_size))
    topk = len(data[0]["reference_topk_ids"])
    rates = {}
    for mode in ("precomputed", "runtime", "precomputed", "runtime"):  # twice each, interleaved
        layer = data[0]["layer"]
        lens = ConsistencyLens.from_base(
            base,
            layer=layer,
            explanation_length=8,
            decoder_num_layers=4,
            encoder_num_layers=layer + 1,
            write_backwards=True,
            identity_output=True,
        )
        train = data if mode == "precomputed" else data.select_columns(["example_id", "doc_id", "input_ids"])
        with tempfile.TemporaryDirectory() as out:
            training_args = LensTrainingArguments(
                output_dir=out,
                per_device_train_batch_size=args.batch_size,
                max_steps=args.steps,
                activations_mode=mode,
                save_strategy="no",
                logging_steps=1000,
                verbose_samples=0,
                lm_weight_start=0.05,  # the fluency pass runs, as in the KL phase of the README run
                disable_tqdm=True,
                seed=0,
            )
            trainer = LensTrainer(
                model=lens, args=training_args, train_dataset=train, base_model=base, topk=topk
            )
            start = time.perf_counter()
            trainer.train()
            rates.setdefault(mode, []).append(args.steps * args.batch_size / (time.perf_counter() - start))
    best = {mode: max(values) for mode, values in rates.items()}
    print(
        f"lens training, layer {data[0]['layer']}, batch {args.batch_size}, {args.steps} steps, "
        f"{torch.get_num_threads()} threads (best of two interleaved runs)"
    )
    for mode, rate in best.items():
        print(f"  {mode:12s} {rate:6.2f} samples/s")
    print(f"precomputed / runtime: {best['precomputed'] / best['runtime']:.2f}x")


if __name__ == "__main__":
    main()
