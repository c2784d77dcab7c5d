"""LensTrainer: trains a Consistency Lens so that the frozen model behaves the same with the reconstruction.

Loss per batch (`compute_loss`, pieces from `hfx.losses`):
  kl_weight * KL(frozen model's next-token distribution with its own activation || with the reconstruction
  patched in at the same layer and position)
  + alpha(step) * LM loss of the explanation under the frozen model (fluency; alpha ramps from 0)
  + entropy_weight * entropy of the decoder's token distributions,
with the Gumbel-softmax temperature on its own schedule. The activation and the reference distribution come
from the dumped dataset (precomputed mode) or are captured from the frozen model on the fly (runtime mode, same
trainer, examples only). Everything else (resume, accumulation, LR schedules, logging) is Trainer's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from hfx.artifacts import replace_pickled_training_args
from hfx.batching import left_padded
from hfx.losses import entropy, topk_kl_divergence

from .activations import replace_activations
from .data import capture_batch
from .schedules import Schedule

logger = logging.getLogger(__name__)


@dataclass
class LensTrainingArguments(TrainingArguments):
    kl_weight: float = field(default=1.0, metadata={"help": "weight of the behavioural KL"})
    lm_weight_schedule: str = field(
        default="linear", metadata={"help": "alpha schedule: constant, linear, cosine, exponential"}
    )
    lm_weight_start: float = field(default=0.0, metadata={"help": "alpha at the start"})
    lm_weight_end: float = field(default=0.1, metadata={"help": "alpha at the end of its ramp"})
    lm_weight_steps: int = field(default=500, metadata={"help": "steps of the alpha ramp"})
    lm_weight_warmup_steps: int = field(default=0, metadata={"help": "steps alpha stays at its start"})
    entropy_weight: float = field(default=0.0, metadata={"help": "weight of the decoder-entropy regulariser"})
    temperature_schedule: str = field(default="exponential", metadata={"help": "Gumbel temperature schedule"})
    temperature_start: float = field(default=1.0, metadata={"help": "Gumbel temperature at the start"})
    temperature_end: float = field(default=0.5, metadata={"help": "Gumbel temperature at the end"})
    temperature_steps: int = field(default=500, metadata={"help": "steps of the temperature schedule"})
    activations_mode: str = field(
        default="precomputed",
        metadata={"help": "precomputed: read dumped activations; runtime: capture them on the fly"},
    )
    verbose_samples: int = field(
        default=3, metadata={"help": "explanations written to samples.jsonl at each log step"}
    )
    report_to: None | str | list[str] = field(default="none")
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "keep the dataset columns for the collator"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.activations_mode not in ("precomputed", "runtime"):
            raise ValueError(
                f"activations_mode must be precomputed or runtime, got {self.activations_mode!r}."
            )
        self.lm_weight = Schedule(
            self.lm_weight_schedule,
            self.lm_weight_start,
            self.lm_weight_end,
            self.lm_weight_steps,
            self.lm_weight_warmup_steps,
        )
        self.temperature = Schedule(
            self.temperature_schedule, self.temperature_start, self.temperature_end, self.temperature_steps
        )


def collate(rows: list[dict]) -> dict:
    """Keep the token lists (padding happens where the frozen model runs) and stack the dumped tensors."""
    batch = {"input_ids": [row["input_ids"] for row in rows]}
    if "activation" in rows[0]:
        batch["activation"] = torch.tensor([row["activation"] for row in rows])
        batch["reference_topk_ids"] = torch.tensor([row["reference_topk_ids"] for row in rows])
        batch["reference_topk_logprobs"] = torch.tensor([row["reference_topk_logprobs"] for row in rows])
    return batch


class LensTrainer(Trainer):
    """`Trainer` over a `ConsistencyLens`; `base_model` is the frozen model it explains."""

    def __init__(self, *args, base_model=None, topk: int = 64, **kwargs):
        kwargs.setdefault("data_collator", collate)
        super().__init__(*args, **kwargs)
        if base_model is None:
            raise ValueError("LensTrainer needs the frozen base_model the lens explains.")
        self.base_model = base_model.eval().requires_grad_(False)
        self.topk = topk
        self._metrics: dict[str, float] = {}
        self._samples: list[dict] = []

    def lens_batch(self, lens, inputs: dict) -> dict:
        """Reconstruct the batch's activations and measure the frozen model with them patched in."""
        args: LensTrainingArguments = self.args
        layer = lens.config.layer
        if "activation" not in inputs:  # runtime mode
            inputs = {**inputs, **capture_batch(self.base_model, layer, inputs["input_ids"], self.topk)}
        device = lens.device
        activation = inputs["activation"].to(device)
        step = self.state.global_step
        out = lens(activation, temperature=args.temperature(step))
        ids, mask, position_ids = left_padded(inputs["input_ids"], device)
        last = torch.full((ids.shape[0],), ids.shape[1] - 1, device=device)
        with replace_activations(self.base_model, layer, last, out.reconstruction):
            logits = self.base_model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1
            ).logits[:, -1]
        kl = topk_kl_divergence(
            inputs["reference_topk_ids"].to(device), inputs["reference_topk_logprobs"].to(device), logits
        )
        # Fluency: expected negative log-likelihood, under the frozen model reading the explanation so far, of the
        # decoder's distribution over each next explanation token.
        embeddings = self.base_model.get_input_embeddings().weight
        lm_logits = self.base_model(inputs_embeds=out.explanation.to(embeddings.dtype) @ embeddings).logits
        decoder_probs = torch.softmax(out.logits[:, 1:], dim=-1)
        lm = -(decoder_probs * torch.log_softmax(lm_logits[:, :-1].float(), dim=-1)).sum(-1).mean()
        return {
            "kl": kl,
            "lm": lm,
            "entropy": entropy(out.logits),
            "out": out,
            "logits": logits,
            "inputs": inputs,
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: LensTrainingArguments = self.args
        parts = self.lens_batch(model, inputs)
        alpha = args.lm_weight(self.state.global_step)
        loss = args.kl_weight * parts["kl"] + alpha * parts["lm"] + args.entropy_weight * parts["entropy"]
        for key in ("kl", "lm", "entropy"):
            self._metrics[key] = self._metrics.get(key, 0.0) + float(parts[key].detach())
        self._metrics["count"] = self._metrics.get("count", 0) + 1
        if args.verbose_samples and self.state.global_step % max(1, args.logging_steps) == 0:
            self._samples = self.describe(parts, args.verbose_samples)
        return (loss, parts["out"]) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        replace_pickled_training_args(output_dir or self.args.output_dir, self.args)

    def floating_point_ops(self, inputs: dict) -> int:
        # input_ids stay token lists here; count the frozen model's forward over them and the lens's own work.
        tokens = sum(len(ids) for ids in inputs["input_ids"])
        return (
            2 * tokens * self.base_model.num_parameters()
            + 6 * len(inputs["input_ids"]) * self.model.num_parameters()
        )

    def describe(self, parts: dict, count: int) -> list[dict]:
        """Verbose samples: context, token position, explanation, top predictions original vs reconstructed."""
        tokenizer = self.processing_class
        if tokenizer is None:
            return []
        rows = []
        for i in range(min(count, len(parts["inputs"]["input_ids"]))):
            reconstructed = parts["logits"][i].float().log_softmax(-1).topk(3)
            rows.append(
                {
                    "context": tokenizer.decode(parts["inputs"]["input_ids"][i][-24:]),
                    "explanation": tokenizer.decode(parts["out"].explanation_ids[i]),
                    "original_top": tokenizer.convert_ids_to_tokens(
                        parts["inputs"]["reference_topk_ids"][i][:3].tolist()
                    ),
                    "reconstructed_top": tokenizer.convert_ids_to_tokens(reconstructed.indices.tolist()),
                }
            )
        return rows

    def log(self, logs: dict, *args, **kwargs) -> None:
        count = self._metrics.pop("count", 0)
        if count:
            logs.update({f"{key}": value / count for key, value in self._metrics.items()})
            logs["alpha"] = self.args.lm_weight(self.state.global_step)
            logs["temperature"] = self.args.temperature(self.state.global_step)
        self._metrics = {}
        if self._samples and self.args.output_dir and self.is_world_process_zero():
            path = Path(self.args.output_dir) / "samples.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as handle:
                for sample in self._samples:
                    handle.write(json.dumps({"step": self.state.global_step, **sample}) + "\n")
            self._samples = []
        super().log(logs, *args, **kwargs)
