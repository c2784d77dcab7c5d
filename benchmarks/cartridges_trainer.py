"""Trainer step: top-k distillation at labelled positions only vs a full-vocabulary loss everywhere.

Both variants train the same cartridge on the same batches of the embedded model. Memory is what autograd keeps
for the backward pass (bytes of distinct tensor storages saved by the graph, counted with
``torch.autograd.graph.saved_tensors_hooks``) plus the logits: the part of the peak that the loss changes.

    .venv/bin/python benchmarks/cartridges_trainer.py --steps 3
"""

import argparse
import tempfile
import time

import torch

from hfx.cartridges.corpus import load_corpus
from hfx.cartridges.training import (
    CartridgeCollator,
    CartridgeTrainer,
    CartridgeTrainingArguments,
    create_cartridge,
)
from hfx.losses import full_vocab_distillation_loss
from hfx.models import load_causal_lm


def synthetic_rows(tokenizer, n, prompt_len, answer_len, k, seed=0):
    """Rows shaped like synthesized ones (the loss cost does not depend on the teacher's values)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(100, len(tokenizer), (prompt_len + answer_len,), generator=g).tolist()
        top = torch.log_softmax(torch.randn(answer_len, 1000, generator=g), -1).topk(k, -1)
        rows.append(
            {
                "conversation_id": i,
                "input_ids": ids,
                "answer_start": prompt_len,
                "topk_token_ids": top.indices.tolist(),
                "topk_logprobs": top.values.tolist(),
            }
        )
    return rows


def step(trainer, batch, variant):
    """One forward + loss: the trainer's own ``compute_loss``, or the full-vocabulary baseline."""
    if variant == "topk":
        return trainer.compute_loss(trainer.model, batch)
    out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return full_vocab_distillation_loss(
        out.logits, batch["loss_mask"], batch["teacher_topk_ids"], batch["teacher_topk_logprobs"]
    )


def measure(trainer, batch, variant, steps):
    seen, saved = set(), [0]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            saved[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step(trainer, batch, variant)
    loss.backward()
    trainer.model.zero_grad()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(trainer, batch, variant).backward()
        times.append(time.perf_counter() - start)
        trainer.model.zero_grad()
    return min(times), saved[0], loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--answer-tokens", type=int, default=80)
    parser.add_argument("--p", type=int, default=96)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    model, tokenizer = load_causal_lm("embedded", dtype=args.dtype)
    model.requires_grad_(False)
    peft_model = create_cartridge(model, tokenizer, load_corpus("rcv1", tokenizer), args.p)
    peft_model.train()
    rows = synthetic_rows(tokenizer, args.batch, args.prompt_tokens, args.answer_tokens, k=20)
    batch = CartridgeCollator(tokenizer.pad_token_id)(rows)
    with tempfile.TemporaryDirectory() as out:
        trainer = CartridgeTrainer(
            model=peft_model, args=CartridgeTrainingArguments(output_dir=out, use_cpu=True)
        )
        res = {v: measure(trainer, batch, v, args.steps) for v in ("topk", "full")}
    print(
        f"batch {args.batch} x ({args.prompt_tokens} prompt + {args.answer_tokens} answer) tokens, p={args.p}, {args.dtype}"
    )
    for v, (t, mem, loss) in res.items():
        name = "top-k at labelled positions" if v == "topk" else "full-vocabulary baseline  "
        print(f"{name}: step {t:.2f} s, saved-for-backward {mem / 2**20:.0f} MiB, loss {loss:.4f}")
    print(
        f"ratio step time (baseline / top-k): {res['full'][0] / res['topk'][0]:.2f}x; "
        f"memory (baseline / top-k): {res['full'][1] / res['topk'][1]:.2f}x"
    )


if __name__ == "__main__":
    main()
