"""LensTrainer: trains a Consistency Lens so that the frozen model behaves the same with the reconstruction.

Loss per batch (`compute_loss`, pieces from `hfx.losses`):
  kl_weight * KL(frozen model's next-token distribution with its own activation || with the reconstruction
  patched in at the same layer and position)
  + cosine_weight * 2 (1 - cos(activation, reconstruction)) (optional: the reconstructor's regression loss)
  + alpha(step) * LM loss of the explanation under the frozen model (fluency; alpha ramps from 0)
  + entropy_weight * entropy of the decoder's token distributions
  + context_weight * the context cross-entropy below (optional: keeps explanations anchored to real text),
with the Gumbel-softmax temperature on its own schedule (both schedules count the KL objective's steps). The
first `context_warmup_steps` steps instead teach the decoder to write the tokens that precede the position
(teacher-forced cross-entropy, no frozen-model pass): a readable starting point that an encoder copied from the
base model's first layers can already read back. The activation and the reference distribution come from the
dumped dataset (precomputed mode) or are captured from the frozen model on the fly (runtime mode, same
trainer, examples only). Everything else (resume, accumulation, LR schedules, logging) is Trainer's.

The frozen model moves with the lens: LensTrainer puts it on the device Trainer trains on (`args.device`, where
Trainer places the lens), so the patched passes and the runtime captures run there too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from hfx.artifacts import replace_pickled_training_args
from hfx.checkpoints import use_checkpoint_protocol
from hfx.losses import cosine_regression_loss, entropy, topk_kl_divergence

from .activations import patched_next_token_logits
from .data import capture_batch
from .schedules import Schedule

logger = logging.getLogger(__name__)


@dataclass
class LensTrainingArguments(TrainingArguments):
    lr_scheduler_type: str = field(
        default="linear",
        metadata={
            "help": "transformers' schedulers (linear, cosine, cosine_with_restarts, polynomial, constant, "
            "constant_with_warmup, ...) or exponential (decays to lr_scheduler_kwargs['final_lr_ratio'], "
            "default 0.1, after the warmup)"
        },
    )
    kl_weight: float = field(default=1.0, metadata={"help": "weight of the behavioural KL"})
    cosine_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of the reconstruction's regression loss 2 (1 - cos(activation, reconstruction)) on unit-"
            "normalised vectors (the Natural Language Autoencoders' reconstructor loss)"
        },
    )
    context_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "first steps train the decoder to write the preceding tokens (then the KL objective)"
        },
    )
    context_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of that context cross-entropy during the KL objective (anchors explanations to text)"
        },
    )
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
        # "exponential" is ours (a LambdaLR in LensTrainer.create_scheduler); transformers' enum must not see it.
        self.exponential_lr = str(self.lr_scheduler_type) == "exponential"
        if self.exponential_lr:
            self.lr_scheduler_type = "constant"
        super().__post_init__()
        if self.exponential_lr:
            ratio = self.lr_scheduler_kwargs.get("final_lr_ratio", 0.1)
            if not 0 < ratio <= 1:
                raise ValueError(f"lr_scheduler_kwargs final_lr_ratio must be in (0, 1], got {ratio}.")
        if self.context_warmup_steps < 0:
            raise ValueError(f"context_warmup_steps must be >= 0, got {self.context_warmup_steps}.")
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

    def to_dict(self):
        values = super().to_dict()
        if self.exponential_lr:
            values["lr_scheduler_type"] = "exponential"
        return values


def exponential_lr_lambda(warmup_steps: int, total_steps: int, final_ratio: float):
    """Multiplier of the learning rate: linear warmup from 0, then geometric decay to `final_ratio` at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio**progress

    return factor


def context_targets(input_ids: list[list[int]], length: int, device=None) -> torch.Tensor:
    """The last `length` tokens of each row (the position's token last), -100 where a row is shorter."""
    targets = torch.full((len(input_ids), length), -100, dtype=torch.long)
    for row, ids in enumerate(input_ids):
        tail = ids[-length:]
        targets[row, length - len(tail) :] = torch.tensor(tail)
    return targets.to(device)


def decode_each(tokenizer, ids: list[int]) -> list[str]:
    """Each token as the text it stands for (" are", not the byte-level "Ġare")."""
    return [tokenizer.decode([i]) for i in ids]


def collate(rows: list[dict]) -> dict:
    """Keep the token lists (padding happens where the frozen model runs) and stack the dumped tensors."""
    batch = {"input_ids": [row["input_ids"] for row in rows]}
    if "activation" in rows[0]:
        batch["activation"] = torch.tensor([row["activation"] for row in rows])
        batch["reference_topk_ids"] = torch.tensor([row["reference_topk_ids"] for row in rows])
        batch["reference_topk_logprobs"] = torch.tensor([row["reference_topk_logprobs"] for row in rows])
    return batch


class LensTrainer(Trainer):
    """`Trainer` over a `ConsistencyLens`; `base_model` is the frozen model it explains, moved to the device the
    lens trains on."""

    def __init__(self, *args, base_model=None, topk: int = 64, **kwargs):
        kwargs.setdefault("data_collator", collate)
        super().__init__(*args, **kwargs)
        if base_model is None:
            raise ValueError("LensTrainer needs the frozen base_model the lens explains.")
        # Trainer has placed the lens on args.device (each process its own under `accelerate launch`); the
        # frozen model must sit there too, or every patched pass would mix devices.
        self.base_model = base_model.eval().requires_grad_(False).to(self.args.device)
        self.topk = topk
        use_checkpoint_protocol(self)  # after the callbacks passed in
        self._exponential = None  # the exponential-decay scheduler this trainer made, if any
        self._metrics: dict[str, tuple[float, int]] = {}
        self._samples: list[dict] = []

    def lens_batch(self, model, inputs: dict, with_context: bool = False) -> dict:
        """Reconstruct the batch's activations and measure the frozen model with them patched in (and, with
        `with_context`, the decoder's context loss on the same activations, in the same forward)."""
        args: LensTrainingArguments = self.args
        lens = self.accelerator.unwrap_model(model)  # `model` may be DDP-wrapped: its forward syncs gradients
        layer = lens.config.layer
        inputs = self.with_activations(lens, inputs)
        device = lens.device
        activation = inputs["activation"].to(device)
        step = self.kl_step
        targets = self.context_targets_of(lens, inputs) if with_context else None
        out = model(activation, temperature=args.temperature(step), context_targets=targets)
        logits = patched_next_token_logits(self.base_model, layer, inputs["input_ids"], out.reconstruction)
        kl = topk_kl_divergence(
            inputs["reference_topk_ids"].to(device), inputs["reference_topk_logprobs"].to(device), logits
        )
        # Fluency: expected negative log-likelihood, under the frozen model reading the explanation so far, of the
        # decoder's distribution over each next explanation token. The gradient goes into that distribution; the
        # frozen model's pass over the explanation runs without autograd (a third of the cost of backpropagating
        # through it).
        with torch.no_grad():
            lm_logits = self.base_model(input_ids=out.explanation_ids).logits
        decoder_probs = torch.softmax(out.logits[:, 1:], dim=-1)
        lm = -(decoder_probs * torch.log_softmax(lm_logits[:, :-1].float(), dim=-1)).sum(-1).mean()
        return {
            "kl": kl,
            "lm": lm,
            "cosine": cosine_regression_loss(out.reconstruction, activation),
            "entropy": entropy(out.logits),
            "out": out,
            "logits": logits,
            "inputs": inputs,
        }

    @property
    def kl_step(self) -> int:
        """Steps of the KL objective so far: the alpha and temperature schedules start with it."""
        return max(0, self.state.global_step - self.args.context_warmup_steps)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # A scheduler passed in `optimizers=` is kept; the exponential one is made anew for every `train()` call,
        # since the number of steps may differ.
        if self.args.exponential_lr and (self.lr_scheduler is None or self.lr_scheduler is self._exponential):
            factor = exponential_lr_lambda(
                self.args.get_warmup_steps(num_training_steps),
                num_training_steps,
                self.args.lr_scheduler_kwargs.get("final_lr_ratio", 0.1),
            )
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
            self._exponential = self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def with_activations(self, lens, inputs: dict) -> dict:
        """The batch with its activations and reference top-k: as dumped, or captured now (runtime mode)."""
        if "activation" in inputs:
            return inputs
        return {**inputs, **capture_batch(self.base_model, lens.config.layer, inputs["input_ids"], self.topk)}

    @staticmethod
    def context_targets_of(lens, inputs: dict) -> torch.Tensor:
        return context_targets(inputs["input_ids"], lens.config.explanation_length, lens.device)

    def context_batch(self, model, inputs: dict) -> dict:
        """The decoder's context loss alone (the warm-up steps)."""
        lens = self.accelerator.unwrap_model(model)
        inputs = self.with_activations(lens, inputs)
        out = model(
            inputs["activation"].to(lens.device),
            context_targets=self.context_targets_of(lens, inputs),
            explain=False,
        )
        return {"context_ce": out.context_loss, "context_accuracy": out.context_accuracy}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: LensTrainingArguments = self.args
        if self.state.global_step < args.context_warmup_steps:
            parts = self.context_batch(model, inputs)
            self._accumulate(parts)
            return (parts["context_ce"], None) if return_outputs else parts["context_ce"]
        parts = self.lens_batch(model, inputs, with_context=bool(args.context_weight))
        alpha = args.lm_weight(self.kl_step)
        loss = args.kl_weight * parts["kl"] + alpha * parts["lm"] + args.entropy_weight * parts["entropy"]
        if args.cosine_weight:
            loss = loss + args.cosine_weight * parts["cosine"]
        if args.context_weight:
            out = parts["out"]
            loss = loss + args.context_weight * out.context_loss
            self._accumulate({"context_ce": out.context_loss, "context_accuracy": out.context_accuracy})
        self._accumulate({key: parts[key] for key in ("kl", "lm", "cosine", "entropy")})
        if args.verbose_samples and self.state.global_step % max(1, args.logging_steps) == 0:
            self._samples = self.describe(parts, args.verbose_samples)
        return (loss, parts["out"]) if return_outputs else loss

    def _accumulate(self, values: dict) -> None:
        # Running (sum, count) per metric until the next log.
        for key, value in values.items():
            total, count = self._metrics.get(key, (0.0, 0))
            self._metrics[key] = (total + float(value.detach()), count + 1)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
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
                    "original_top": decode_each(
                        tokenizer, parts["inputs"]["reference_topk_ids"][i][:3].tolist()
                    ),
                    "reconstructed_top": decode_each(tokenizer, reconstructed.indices.tolist()),
                }
            )
        return rows

    def log(self, logs: dict, *args, **kwargs) -> None:
        for key, (total, count) in self._metrics.items():
            logs[key] = total / count
        if "kl" in self._metrics:  # a KL-objective step was logged
            logs["alpha"] = self.args.lm_weight(self.kl_step)
            logs["temperature"] = self.args.temperature(self.kl_step)
        self._metrics = {}
        if self._samples and self.args.output_dir and self.is_world_process_zero():
            path = Path(self.args.output_dir) / "samples.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as handle:
                for sample in self._samples:
                    handle.write(json.dumps({"step": self.state.global_step, **sample}) + "\n")
            self.report_samples(self._samples)
            self._samples = []
        super().log(logs, *args, **kwargs)

    def report_samples(self, samples: list[dict]) -> None:
        """The verbose samples as a table to the `report_to` integrations that take one (TensorBoard text,
        Weights & Biases tables)."""
        from transformers.integrations import TensorBoardCallback, WandbCallback

        columns = list(samples[0])
        rows = [[_cell(sample[column]) for column in columns] for sample in samples]
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
                body = "".join("| " + " | ".join(row) + " |\n" for row in rows)
                callback.tb_writer.add_text("lens/samples", header + body, self.state.global_step)
            elif isinstance(callback, WandbCallback):
                import wandb

                if wandb.run is not None:  # the run the callback started
                    wandb.log({"lens/samples": wandb.Table(columns=columns, data=rows)})


def _cell(value) -> str:
    text = " ".join(map(repr, value)) if isinstance(value, list) else repr(value)
    return text.replace("|", "\\|").replace("\n", "\\n")
