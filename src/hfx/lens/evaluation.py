"""How well a lens keeps the frozen model's behaviour, against two baselines, on held-out activations.

For each example the frozen model's next-token distribution with its own activation is the reference; the KL
from it is measured with the activation replaced by (a) the lens's reconstruction, (b) the mean activation of the
training split (mean ablation), (c) zeros (zero ablation), and, as a diagnostic of the decoder, (d) the encoder's
reading of the text that actually ends at the position (its last `explanation_length` tokens) in place of the
decoder's explanation. Also the fraction of variance explained, FVE = 1 - sum |a - a_hat|^2 / sum |a - mean|^2,
of (a) and of (d).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from hfx.losses import kl_divergence

from .activations import next_token_logits
from .training import context_targets, decode_each


@torch.no_grad()
def evaluate_lens(
    lens, base, dataset, mean_activation: torch.Tensor, tokenizer=None, batch_size: int = 32, samples: int = 8
) -> dict:
    lens.eval()
    device = lens.device
    layer = lens.config.layer
    mean_activation = mean_activation.to(device)
    totals = {"lens": 0.0, "mean_ablation": 0.0, "zero_ablation": 0.0, "encoder_reading_context": 0.0}
    squared_error = squared_error_context = squared_deviation = 0.0
    shown = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="lens eval", unit="batch"):
        rows = dataset[start : start + batch_size]
        activation = torch.tensor(rows["activation"], device=device)
        out = lens(activation, sample=False)
        # rows shorter than the explanation are padded with token 0
        context = context_targets(rows["input_ids"], lens.config.explanation_length, device).clamp(min=0)
        embeddings = lens.encoder.get_input_embeddings().weight
        read_context = lens.reconstruct(torch.nn.functional.one_hot(context, embeddings.shape[0]).float())
        replacements = {
            "reference": None,
            "lens": out.reconstruction,
            "mean_ablation": mean_activation.expand_as(activation),
            "zero_ablation": torch.zeros_like(activation),
            "encoder_reading_context": read_context,
        }
        patched_logits = next_token_logits(base, layer, rows["input_ids"], replacements)
        reference = patched_logits.pop("reference")
        for name, logits in patched_logits.items():
            totals[name] += float(kl_divergence(reference, logits)) * len(activation)
        squared_error += float(((activation - out.reconstruction.float()) ** 2).sum())
        squared_error_context += float(((activation - read_context.float()) ** 2).sum())
        squared_deviation += float(((activation - mean_activation) ** 2).sum())
        if tokenizer is not None and len(shown) < samples:
            for i in range(min(samples - len(shown), len(activation))):
                shown.append(
                    {
                        "context": tokenizer.decode(rows["input_ids"][i][-24:]),
                        "explanation": tokenizer.decode(out.explanation_ids[i]),
                        "original_top": decode_each(tokenizer, reference[i].topk(3).indices.tolist()),
                        "reconstructed_top": decode_each(
                            tokenizer, patched_logits["lens"][i].topk(3).indices.tolist()
                        ),
                    }
                )
    n = len(dataset)
    return {
        "examples": n,
        "layer": layer,
        "kl": {name: total / n for name, total in totals.items()},
        "fve": 1.0 - squared_error / squared_deviation,
        "fve_encoder_reading_context": 1.0 - squared_error_context / squared_deviation,
        "samples": shown,
    }
