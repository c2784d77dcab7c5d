"""Natural-language autoencoder, GRPO phase: completion tokens per second of GRPO steps (sampling, the policy's and
the reference's log-probabilities, the reward, the update) beside sampling alone (the verbaliser's `generate` on the
same prompts), in one process. Random activations, a verbaliser and a reconstructor copied from the base model,
the rewards and settings of `examples/lens/configs/nla-grpo.yaml` (reconstruction + length and copy penalties, the
reconstructor learning beside the verbaliser, beta 0.04).

    .venv/bin/python benchmarks/lens_grpo.py                          # the embedded model, CPU
    python benchmarks/lens_grpo.py --random-model smollm2-135m --device cuda   # the GPU check (no weights travel)

Prints `RESULT lens-grpo-tokens-per-s`, `RESULT lens-grpo-generate-tokens-per-s` and their ratio (the share of a
GRPO step that is sampling).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from hfx import models


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--random-model", help="a random-weight model of this shape (benchmarks/_random_models.py)"
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8, help="activations per step")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--explanation-length", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--length-penalty", type=float, default=0.1)
    parser.add_argument("--copy-penalty", type=float, default=0.25)
    parser.add_argument(
        "--reconstructor-learning-rate",
        type=float,
        default=2e-5,
        help="the reconstructor learning beside GRPO (0: kept frozen)",
    )
    args = parser.parse_args()

    from trl import GRPOTrainer

    from hfx.lens import nla
    from hfx.lens.nla_pipeline import VerbalizerGRPOConfig

    device, dtype = models.resolve(args.device, args.dtype)
    if args.random_model:
        from _random_models import random_causal_lm, tokenizer_for

        tokenizer = tokenizer_for(args.random_model)
        base = random_causal_lm(args.random_model, tokenizer, device, dtype)
    else:
        base, tokenizer = models.load_causal_lm(device=device, dtype=dtype)
    hidden = base.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    rows = args.steps * args.prompts
    activations = torch.randn(rows, hidden, generator=generator) * 10
    contexts = torch.randint(0, len(tokenizer) - 1, (rows, 16), generator=generator).tolist()

    with tempfile.TemporaryDirectory() as tmp:
        verbalizer, processor = nla.build_verbalizer(base, tokenizer, args.layer, activation_norm=10.0)
        # GRPO's reference model is loaded from the verbaliser's folder, as after `hfx lens sft`
        verbalizer.save_pretrained(f"{tmp}/verbalizer")
        verbalizer = type(verbalizer).from_pretrained(f"{tmp}/verbalizer", dtype=dtype).to(device)
        reconstructor = nla.build_reconstructor(base, args.layer, args.explanation_length).to(device).eval()
        stop, pad = nla.stop_ids_of(verbalizer, processor), processor.tokenizer.pad_token_id
        fit = None
        if args.reconstructor_learning_rate:
            fit = nla.ReconstructorFit(reconstructor, stop, pad, args.reconstructor_learning_rate)
        else:
            reconstructor.requires_grad_(False)
        rewards, weights = nla.grpo_rewards(
            reconstructor,
            stop,
            pad,
            args.explanation_length,
            args.length_penalty,
            args.copy_penalty,
            fit=fit,
        )
        config = VerbalizerGRPOConfig(
            output_dir=f"{tmp}/grpo",
            per_device_train_batch_size=args.prompts * args.num_generations,
            num_generations=args.num_generations,
            max_completion_length=args.explanation_length,
            max_steps=args.steps,
            beta=args.beta,
            save_strategy="no",
            logging_steps=1,
            report_to="none",
            disable_tqdm=True,
            log_multimodal=False,
            use_cpu=device.type == "cpu",
            bf16=False,
            reward_weights=weights,
            generation_kwargs={"min_new_tokens": args.explanation_length},
        )
        trainer = GRPOTrainer(
            model=verbalizer,
            reward_funcs=rewards,
            args=config,
            train_dataset=nla.grpo_examples(activations.tolist(), contexts),
            processing_class=processor,
        )
        models.synchronize(device)
        start = time.perf_counter()
        trainer.train()
        models.synchronize(device)
        grpo_seconds = time.perf_counter() - start
        tokens = args.steps * args.prompts * args.num_generations * args.explanation_length

        # sampling alone: the same number of completions, the same prompts
        batch = activations[: args.prompts].repeat_interleave(args.num_generations, 0)
        verbalizer.eval()
        nla.explain(verbalizer, processor, batch[:2], 2, do_sample=True)  # warm-up
        models.synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            with torch.no_grad():
                prompt = processor.apply_chat_template(
                    [nla.prompt_of()], add_generation_prompt=True, tokenize=True
                )[0]
                ids = torch.tensor([prompt] * len(batch), device=device)
                verbalizer.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    pixel_values=batch.to(device),
                    max_new_tokens=args.explanation_length,
                    min_new_tokens=args.explanation_length,
                    do_sample=True,
                    pad_token_id=pad,
                )
        models.synchronize(device)
        generate_seconds = time.perf_counter() - start

    grpo_rate, generate_rate = tokens / grpo_seconds, tokens / generate_seconds
    print(
        f"GRPO on {device} in {models.dtype_name(dtype)}: {args.steps} steps x {args.prompts} activations x "
        f"{args.num_generations} explanations x {args.explanation_length} tokens (layer {args.layer}, "
        f"{'random ' + args.random_model if args.random_model else 'embedded model'}; beta {args.beta}, copy "
        f"penalty {args.copy_penalty}, reconstructor lr {args.reconstructor_learning_rate})"
    )
    print(f"RESULT lens-grpo-tokens-per-s {grpo_rate:.1f}")
    print(f"RESULT lens-grpo-generate-tokens-per-s {generate_rate:.1f}")
    print(f"RESULT lens-grpo-sampling-share {grpo_rate / generate_rate:.3f}")


if __name__ == "__main__":
    main()
