"""How well a lens's explanations carry the activation, against baselines that carry none, on held-out activations.

For each example the frozen model's next-token distribution with its own activation is the reference; the KL
from it is measured with the activation replaced by

* the lens's reconstruction (the explanation read back);
* the mean activation of the training split (mean ablation) and zeros (zero ablation);
* the encoder's reading of an *empty* explanation (one end-of-text token, or the read token alone): what the
  reconstructor knows without any explanation; a lens must beat it to show that its explanations say something;
* the encoder's reading of a *random* explanation of the same length;
* the encoder's reading of the text that actually ends at the position, its last ``explanation_length`` tokens
  (a diagnostic: a lens could score well by learning to copy the context).

Each condition also gets its fraction of variance explained against the mean, FVE = 1 - sum |a - a_hat|^2 /
sum |a - mean|^2, and its mean cosine with the activation; the lens's FVE is also given against the empty
explanation (1 - its squared error over the empty explanation's). The **copy rate** is the share of explanation
tokens that occur among the last 16 tokens of the context. **Faithfulness**: swapping the explanations of two
examples (each gets its neighbour's) must raise the KL, and editing one explanation token must move the
reconstruction (its move relative to the reconstruction's distance from the mean).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hfx.losses import kl_divergence

from .activations import next_token_logits
from .training import context_targets, decode_each

#: The context window the copy rate looks in (tokens ending at the position).
COPY_WINDOW = 16
#: The conditions of :func:`evaluate_lens`, in table order.
CONDITIONS = (
    "lens",
    "mean_ablation",
    "zero_ablation",
    "empty_explanation",
    "random_explanation",
    "encoder_reading_context",
)


def copy_rate(
    explanation_ids: list[list[int]], input_ids: list[list[int]], window: int = COPY_WINDOW
) -> float:
    """The share of explanation tokens that occur among the last ``window`` tokens of their example's context
    (the position's own token included): 1.0 for an explanation that only copies, ~0 for one in other words."""
    copied = total = 0
    for explanation, context in zip(explanation_ids, input_ids, strict=True):
        recent = set(context[-window:])
        copied += sum(token in recent for token in explanation)
        total += len(explanation)
    return copied / total if total else 0.0


def empty_explanation(lens, batch: int, token_id: int, device) -> torch.Tensor:
    """One-hot rows (B, n, V) of an explanation that says nothing: the read token alone when the lens has one
    (n = 0), else one ``token_id`` (end of text)."""
    vocab = lens.encoder.get_input_embeddings().weight.shape[0]
    length = 0 if lens.read_embedding is not None else 1
    return F.one_hot(torch.full((batch, length), token_id, device=device), vocab).float()


def _fve(squared_error: float, squared_deviation: float) -> float:
    return 1.0 - squared_error / squared_deviation if squared_deviation > 0 else float("nan")


@torch.no_grad()
def evaluate_lens(
    lens,
    base,
    dataset,
    mean_activation: torch.Tensor,
    tokenizer=None,
    batch_size: int = 32,
    samples: int = 10,
    seed: int = 0,
) -> dict:
    """Every condition of the module's docstring on ``dataset`` (rows with ``activation`` and ``input_ids``);
    returns ``conditions`` (per condition: kl, fve, cosine), the lens's ``copy_rate``, ``fve_vs_empty`` and
    ``faithfulness``, and ``samples`` explanations of examples drawn at random (with ``tokenizer``), in dataset
    order. ``seed`` draws them, the random explanations and the edited tokens."""
    lens.eval()
    device = lens.device
    layer = lens.config.layer
    length = lens.config.explanation_length
    mean_activation = mean_activation.to(device)
    vocab = lens.encoder.get_input_embeddings().weight.shape[0]
    end_token = getattr(tokenizer, "eos_token_id", None)
    end_token = 0 if end_token is None else int(end_token)
    generator = torch.Generator().manual_seed(seed)
    drawn = set(random.Random(seed).sample(range(len(dataset)), min(samples, len(dataset))))
    kl = {name: 0.0 for name in CONDITIONS}
    squared_error = {name: 0.0 for name in CONDITIONS}
    cosine = {name: 0.0 for name in CONDITIONS}
    squared_deviation = 0.0
    swap_kl = edit_kl = edit_move = 0.0
    explanations: list[list[int]] = []
    contexts: list[list[int]] = []
    shown = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="lens eval", unit="batch"):
        rows = dataset[start : start + batch_size]
        activation = torch.tensor(rows["activation"], device=device)
        batch = len(activation)
        out = lens(activation, sample=False)
        # explanations that stop on their own (a verbaliser's) are their first `lengths` tokens
        lengths = out.explanation_lengths
        if lengths is None:
            lengths = torch.full((batch,), out.explanation_ids.shape[1], device=device)
        # rows shorter than the explanation are padded with token 0
        context = context_targets(rows["input_ids"], length, device).clamp(min=0)
        random_ids = torch.randint(0, vocab, (batch, length), generator=generator).to(device)
        edited_ids = out.explanation_ids.clone()
        edit_at = (torch.rand(batch, generator=generator).to(device) * lengths).long()
        edited_ids[torch.arange(batch, device=device), edit_at] = random_ids[:, 0]

        def read(ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
            return lens.read(ids, lengths)

        replacements = {
            "reference": None,
            "lens": out.reconstruction,
            "mean_ablation": mean_activation.expand_as(activation),
            "zero_ablation": torch.zeros_like(activation),
            "empty_explanation": lens.reconstruct(empty_explanation(lens, batch, end_token, device)),
            "random_explanation": read(random_ids),
            "encoder_reading_context": read(context),
            # each example gets its neighbour's explanation (a batch of one keeps its own)
            "swapped": out.reconstruction.roll(1, dims=0),
            "edited": read(edited_ids, lengths),
        }
        patched_logits = next_token_logits(base, layer, rows["input_ids"], replacements)
        reference = patched_logits.pop("reference")
        for name, logits in patched_logits.items():
            value = float(kl_divergence(reference, logits)) * batch
            if name == "swapped":
                swap_kl += value
            elif name == "edited":
                edit_kl += value
            else:
                kl[name] += value
        target = activation.float()
        for name in CONDITIONS:
            approximation = replacements[name].float()
            squared_error[name] += float(((target - approximation) ** 2).sum())
            cosine[name] += float(F.cosine_similarity(target, approximation, dim=-1).sum())
        squared_deviation += float(((target - mean_activation) ** 2).sum())
        reconstruction = out.reconstruction.float()
        distance = (reconstruction - mean_activation).norm(dim=-1).clamp(min=1e-12)
        edit_move += float(((replacements["edited"].float() - reconstruction).norm(dim=-1) / distance).sum())
        explanations += [
            ids[:n] for ids, n in zip(out.explanation_ids.tolist(), lengths.tolist(), strict=True)
        ]
        contexts += [list(ids) for ids in rows["input_ids"]]
        for i in range(batch) if tokenizer is not None else ():
            if start + i in drawn:
                shown.append(
                    {
                        "context": tokenizer.decode(rows["input_ids"][i][-24:]),
                        "explanation": tokenizer.decode(explanations[-batch + i]),
                        "original_top": decode_each(tokenizer, reference[i].topk(3).indices.tolist()),
                        "reconstructed_top": decode_each(
                            tokenizer, patched_logits["lens"][i].topk(3).indices.tolist()
                        ),
                    }
                )
    n = len(dataset)
    conditions = {
        name: {
            "kl": kl[name] / n,
            "fve": _fve(squared_error[name], squared_deviation),
            "cosine": cosine[name] / n,
        }
        for name in CONDITIONS
    }
    return {
        "examples": n,
        "layer": layer,
        "explanation_length": length,
        "conditions": conditions,
        "kl": {name: c["kl"] for name, c in conditions.items()},
        "fve": conditions["lens"]["fve"],
        "fve_encoder_reading_context": conditions["encoder_reading_context"]["fve"],
        "fve_vs_empty": _fve(squared_error["lens"], squared_error["empty_explanation"]),
        "copy_rate": copy_rate(explanations, contexts),
        "faithfulness": {
            "swap_kl": swap_kl / n,
            "swap_kl_increase": (swap_kl - kl["lens"]) / n,
            "edit_kl_increase": (edit_kl - kl["lens"]) / n,
            "edit_move": edit_move / n,
        },
        "samples": shown,
    }


LABELS = {
    "lens": "lens (its explanation read back)",
    "mean_ablation": "mean ablation",
    "zero_ablation": "zero ablation",
    "empty_explanation": "empty explanation",
    "random_explanation": "random explanation, same length",
    "encoder_reading_context": "true last-k context tokens (diagnostic)",
}


def format_lens_table(results: dict) -> str:
    """Markdown: KL, FVE and cosine per condition, then the copy rate, FVE against the empty explanation and the
    faithfulness checks."""
    lines = ["| condition | KL | FVE | cosine |", "|---|---|---|---|"]
    for name, values in results["conditions"].items():
        lines.append(
            f"| {LABELS.get(name, name)} | {values['kl']:.4f} | {values['fve']:.3f} | {values['cosine']:.3f} |"
        )
    faith = results["faithfulness"]
    lines.append(
        f"\n{results['examples']} held-out activations of layer {results['layer']}, explanations of "
        f"{results['explanation_length']} tokens. Copy rate {results['copy_rate']:.1%} (explanation tokens among the "
        f"last {COPY_WINDOW} context tokens); FVE against the empty explanation {results['fve_vs_empty']:.3f}. "
        f"Faithfulness: swapping two examples' explanations raises the KL by {faith['swap_kl_increase']:.4f} "
        f"(to {faith['swap_kl']:.4f}); editing one token raises it by {faith['edit_kl_increase']:.4f} and moves the "
        f"reconstruction by {faith['edit_move']:.3f} of its distance from the mean."
    )
    return "\n".join(lines)
