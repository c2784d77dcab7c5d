"""The trainer's patched pass: the frozen model's next-token logits with a reconstruction patched in at one layer of
the last token, forward + backward into the reconstruction. `patched_next_token_logits` (the prefix once without
autograd as a KV cache, then one token with it) vs the whole sequence under `replace_activations`, same batches,
one process, interleaved.

    .venv/bin/python benchmarks/lens_patched_pass.py --activations_dir outputs/lens-activations
"""

from __future__ import annotations

import argparse

import torch
from _measure import interleaved_times

from hfx import models
from hfx.batching import left_padded
from hfx.lens.activations import patched_next_token_logits, replace_activations
from hfx.lens.data import load_activations


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--activations_dir", default="outputs/lens-activations")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None, help="default: this process's accelerator, else the CPU")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    base, _ = models.load_causal_lm(device=args.device, dtype=args.dtype)
    base.requires_grad_(False)
    device = base.device
    rows = load_activations(args.activations_dir).select(range(args.batch_size))
    layer = rows[0]["layer"]
    input_ids = rows["input_ids"]
    values = torch.tensor(rows["activation"], device=device) * 0.9  # a reconstruction near the activation

    def cached():
        patch = values.clone().requires_grad_(True)
        patched_next_token_logits(base, layer, input_ids, patch).logsumexp(-1).sum().backward()
        models.synchronize(device)
        return patch.grad

    def whole():
        patch = values.clone().requires_grad_(True)
        ids, mask, position_ids = left_padded(input_ids, device)
        last = torch.full((ids.shape[0],), ids.shape[1] - 1, device=device)
        with replace_activations(base, layer, last, patch):
            logits = base(
                input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1
            ).logits
        logits[:, -1].logsumexp(-1).sum().backward()
        models.synchronize(device)
        return patch.grad

    difference = float((cached() - whole()).abs().max())
    times = interleaved_times({"cached prefix": cached, "whole sequence": whole}, repeats=args.repeats)
    tokens = sum(len(ids) for ids in input_ids)
    print(
        f"patched pass, layer {layer}, batch {args.batch_size} ({tokens} tokens), forward + backward, "
        f"{device} {models.dtype_name(base.dtype)}, {torch.get_num_threads()} threads, median of {args.repeats}; max |grad difference| {difference:.2e}"
    )
    for name, seconds in times.items():
        print(f"  {name:15s} {seconds * 1000:8.1f} ms")
    print(f"whole / cached: {times['whole sequence'] / times['cached prefix']:.2f}x")


if __name__ == "__main__":
    main()
