"""A natural-language autoencoder trained through TRL: a verbaliser writes an activation as text, a reconstructor
reads the text back into the activation.

    activation --ActivationVerbalizer (a copy of the base model reading it at a placeholder token)--> explanation
    explanation --reconstructor (a ConsistencyLens encoder: the base's first layer + 1 layers, Linear(d, d) head,
                 trained by regression on unit-normalised vectors, 2 (1 - cos))--> reconstructed activation

Training, each phase a TRL or transformers trainer on its public interface:

1. **targets** (:func:`explanation_targets`): explanations the project can write offline for each activation:
   ``continuation`` (the base model's greedy next tokens from the position), ``top_predictions`` (its most likely
   next tokens at the position, from the dump) or ``context`` (the last tokens of the context: the copying
   baseline);
2. **SFT** (TRL's ``SFTTrainer``): the verbaliser learns to write the targets from the activation;
   :class:`ReconstructorTrainer` fits the reconstructor to read them;
3. **GRPO** (TRL's ``GRPOTrainer``): the verbaliser samples explanations, rewarded by the reconstruction's cosine
   with the activation (:class:`ReconstructionReward`, optionally minus the KL of the base model's next-token
   distribution with the reconstruction patched in) and a length penalty, with a KL penalty to the SFT model.

The activation travels as TRL's trainers carry an image: the dataset's ``images`` column holds it, and
:class:`ActivationProcessor` (a ``ProcessorMixin``, as a vision-language model's processor is) renders the
placeholder token into the prompt and returns the activation as ``pixel_values``, which reach every forward of the
verbaliser (prompt, sampled completions, reference model).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BatchFeature,
    ProcessorMixin,
    Trainer,
    TrainerCallback,
)

from hfx.batching import left_padded
from hfx.losses import cosine_regression_loss

from .activations import next_token_logits
from .configuration_verbalizer import ActivationVerbalizerConfig
from .modeling_verbalizer import ActivationVerbalizer

logger = logging.getLogger(__name__)

#: The placeholder token the verbaliser reads the activation at.
ACTIVATION_TOKEN = "<|activation|>"
#: The kinds of explanation targets :func:`explanation_targets` writes.
TARGET_KINDS = ("continuation", "window", "top_predictions", "context")

AutoConfig.register(ActivationVerbalizerConfig.model_type, ActivationVerbalizerConfig, exist_ok=True)
AutoModelForCausalLM.register(ActivationVerbalizerConfig, ActivationVerbalizer, exist_ok=True)


def with_activation_token(tokenizer):
    """A copy of `tokenizer` whose vocabulary holds :data:`ACTIVATION_TOKEN` (the caller's is left as it was)."""
    if ACTIVATION_TOKEN in tokenizer.get_vocab():
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([ACTIVATION_TOKEN], special_tokens=True)  # the tokenizer's own special tokens stay
    return tokenizer


def _activation_list(images) -> list:
    """The activations in `images`, however nested (TRL gives one list of images per example)."""
    if images is None:
        return []
    if isinstance(images, torch.Tensor):
        return list(images) if images.ndim == 2 else [images]
    if images and isinstance(images[0], (int, float)):
        return [images]
    return [activation for item in images for activation in _activation_list(item)]


class ActivationProcessor(ProcessorMixin):
    """Tokenizer and activations, in the shape TRL's trainers expect a vision-language model's processor to have:
    a message part ``{"type": "image", "image": activation}`` renders as the placeholder token, and the
    activations come back as ``pixel_values`` (N, d), float32."""

    def __init__(self, tokenizer, chat_template=None):
        super().__init__(tokenizer, chat_template=chat_template)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ActivationProcessor:
        """A processor over a copy of `tokenizer` that knows the placeholder token."""
        return cls(with_activation_token(tokenizer))

    @property
    def activation_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(ACTIVATION_TOKEN)

    def _flatten(self, conversation: list[dict]) -> tuple[list[dict], list]:
        messages, activations = [], []
        for message in conversation:
            content = message.get("content")
            if isinstance(content, list):
                text = ""
                for part in content:
                    if part["type"] == "image":
                        text += ACTIVATION_TOKEN
                        if part.get("image") is not None:
                            activations.append(part["image"])
                    elif part["type"] == "text":
                        text += part["text"]
                message = {**message, "content": text}
            messages.append(message)
        return messages, activations

    def apply_chat_template(
        self,
        conversation,
        chat_template=None,
        tools=None,
        tokenize: bool = False,
        return_dict: bool = False,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        **kwargs,
    ):
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        texts, activations = [], []
        for one in conversations:
            messages, found = self._flatten(one)
            texts.append(
                self.tokenizer.apply_chat_template(
                    messages,
                    tools=tools,
                    chat_template=chat_template or self.chat_template,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                )
            )
            activations += found
        if not tokenize:
            return texts if batched else texts[0]
        encoded = self(text=texts, images=activations or None)
        return encoded if return_dict else encoded["input_ids"]

    def __call__(self, images=None, text=None, padding=False, return_tensors=None, **kwargs) -> BatchFeature:
        encoded = self.tokenizer(
            text, padding=padding, return_tensors=return_tensors, add_special_tokens=False
        )
        data = dict(encoded)
        activations = _activation_list(images)
        if activations:
            data["pixel_values"] = torch.stack([torch.as_tensor(a, dtype=torch.float32) for a in activations])
        return BatchFeature(data)


def build_verbalizer(
    base, tokenizer, layer: int, activation_norm: float | None = None, base_model_name_or_path=None
) -> tuple[ActivationVerbalizer, ActivationProcessor]:
    """A verbaliser copied from `base` and its processor (over a copy of `tokenizer` with the placeholder)."""
    processor = ActivationProcessor.from_tokenizer(tokenizer)
    verbalizer = ActivationVerbalizer.from_base(
        base,
        layer=layer,
        activation_norm=activation_norm,
        base_model_name_or_path=base_model_name_or_path,
    )
    if len(processor.tokenizer) > verbalizer.config.vocab_size:
        verbalizer.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    verbalizer.config.image_token_id = processor.activation_token_id
    verbalizer.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return verbalizer, processor


def build_reconstructor(base, layer: int, explanation_length: int, base_model_name_or_path=None):
    """The reconstructor in the anchor's shape: `base` truncated after `layer` reads an explanation, and a linear
    head (starting as the identity) maps its last position to the activation; a `ConsistencyLens` read through
    `ConsistencyLens.read`, trained with :func:`reconstructor_loss`."""
    from .modeling_lens import ConsistencyLens

    return ConsistencyLens.from_base(
        base,
        layer=layer,
        explanation_length=explanation_length,
        decoder_num_layers=1,
        encoder_num_layers=layer + 1,
        identity_output=True,
        base_model_name_or_path=base_model_name_or_path,
    )


def prompt_of(instruction: str = "") -> list[dict]:
    """The verbaliser's conversational prompt: an empty system turn (so that no default system prompt is
    rendered: every token of the prompt is paid for in every forward of training), then one user turn, the
    activation then `instruction`."""
    return [
        {"role": "system", "content": [{"type": "text", "text": ""}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]},
    ]


# ---------------------------------------------------------------------------------------------- explanation targets


@torch.no_grad()
def explanation_targets(
    kind: str,
    rows: dict,
    length: int,
    base=None,
    batch_size: int = 32,
    exclude=(),
    context_tokens: int = 2,
) -> list[list[int]]:
    """Explanations of `length` tokens for the examples in `rows` (columns of an activation dump):
    ``continuation`` (the base model's greedy next tokens after the position; needs `base`), ``window`` (the last
    `context_tokens` tokens of the context, the position's own last, then the continuation: the text around the
    position), ``top_predictions`` (the model's most likely next tokens at the position, in order) or ``context``
    (the last tokens up to and including the position). Tokens in `exclude` (those that end an explanation) are
    never part of one."""
    exclude = set(exclude)
    if kind == "context":
        return [[t for t in ids if t not in exclude][-length:] for ids in rows["input_ids"]]
    if kind == "top_predictions":
        return [[t for t in ids if t not in exclude][:length] for ids in rows["reference_topk_ids"]]
    if kind == "window":
        if not 0 <= context_tokens <= length:
            raise ValueError(
                f"context_tokens must be between 0 and the length {length}, got {context_tokens}."
            )
        before = (
            explanation_targets("context", rows, context_tokens, exclude=exclude) if context_tokens else None
        )
        after = explanation_targets("continuation", rows, length - context_tokens, base, batch_size, exclude)
        return [b + a for b, a in zip(before, after, strict=True)] if before else after
    if kind != "continuation":
        raise ValueError(f"explanation target kind must be one of {TARGET_KINDS}, got {kind!r}.")
    if base is None:
        raise ValueError("continuation targets need the base model.")
    if length == 0:
        return [[] for _ in rows["input_ids"]]
    targets = []
    contexts = [list(ids) for ids in rows["input_ids"]]
    starts = range(0, len(contexts), batch_size)
    for start in tqdm(starts, desc="continuation targets", unit="batch"):
        ids, mask, _ = left_padded(contexts[start : start + batch_size], base.device)
        out = base.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=length,
            min_new_tokens=length,
            do_sample=False,
            suppress_tokens=sorted(exclude) or None,
            pad_token_id=base.generation_config.pad_token_id or 0,
        )
        targets += out[:, ids.shape[1] :].tolist()
    return targets


def sft_examples(
    processor: ActivationProcessor, activations, targets: list[list[int]], instruction: str = ""
) -> datasets.Dataset:
    """A tokenized SFT dataset: the prompt (labels -100) then each target and the end-of-text token."""
    prompt_ids = processor.apply_chat_template(
        [prompt_of(instruction)], add_generation_prompt=True, tokenize=True
    )[0]
    end = processor.tokenizer.eos_token_id
    rows = {"input_ids": [], "labels": [], "activation": []}
    for activation, target in zip(activations, targets, strict=True):
        completion = list(target) + [end]
        rows["input_ids"].append(list(prompt_ids) + completion)
        rows["labels"].append([-100] * len(prompt_ids) + completion)
        rows["activation"].append(list(activation))
    return datasets.Dataset.from_dict(rows)


@dataclass
class ActivationCollator:
    """Pads SFT rows on the right; the activations become ``pixel_values``."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(row["input_ids"]) for row in rows)
        ids = torch.full((len(rows), width), self.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            mask[i, :n] = 1
        pixel_values = torch.tensor([row["activation"] for row in rows], dtype=torch.float32)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixel_values}


def grpo_examples(activations, input_ids, instruction: str = "") -> datasets.Dataset:
    """The GRPO dataset: a conversational prompt per activation, the activation as its one image, and the context
    (for a KL reward)."""
    return datasets.Dataset.from_dict(
        {
            "prompt": [prompt_of(instruction) for _ in activations],
            "images": [[list(a)] for a in activations],
            "context_ids": [list(ids) for ids in input_ids],
        }
    )


# ------------------------------------------------------------------------------------------------------ reconstructor


def until_stop(ids, stop_ids) -> list[int]:
    """The tokens of `ids` before the first one in `stop_ids`."""
    kept = []
    for token in ids:
        if token in stop_ids:
            break
        kept.append(int(token))
    return kept


def explanation_batch(
    explanations: list[list[int]], stop_ids, pad_id: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, k) right-padded, lengths (B,)) of explanations cut at their first stop token; an explanation
    with no token left is read as one stop token (the empty explanation)."""
    stop_ids = set(stop_ids)
    cut = [until_stop(ids, stop_ids) or [min(stop_ids)] for ids in explanations]
    width = max(len(ids) for ids in cut)
    batch = torch.full((len(cut), width), pad_id, dtype=torch.long)
    for i, ids in enumerate(cut):
        batch[i, : len(ids)] = torch.as_tensor(ids)
    lengths = torch.tensor([len(ids) for ids in cut])
    return batch.to(device), lengths.to(device)


class ReconstructionReward:
    """GRPO reward: the cosine between each activation and the reconstructor's reading of its explanation, minus
    ``kl_weight`` times the KL of the base model's next-token distribution with the reconstruction patched in
    (needs `base` and the dataset's ``context_ids``). `stop_ids` end an explanation (the verbaliser's end-of-text
    tokens)."""

    __name__ = "reconstruction"

    def __init__(
        self,
        reconstructor,
        stop_ids,
        pad_id: int,
        base=None,
        kl_weight: float = 0.0,
        fit: ReconstructorFit | None = None,
    ):
        if kl_weight and base is None:
            raise ValueError("a KL reward needs the base model.")
        self.reconstructor = reconstructor
        self.stop_ids = list(stop_ids)
        self.pad_id = pad_id
        self.base = base
        self.kl_weight = kl_weight
        self.fit = fit

    @torch.no_grad()
    def scores(self, explanations: list[list[int]], activations, context_ids=None) -> dict[str, torch.Tensor]:
        """Per example: ``cosine``, ``kl`` (with `context_ids` and a base model) and the ``reward``."""
        device = self.reconstructor.device
        ids, lengths = explanation_batch(explanations, self.stop_ids, self.pad_id, device)
        target = torch.stack([torch.as_tensor(a, dtype=torch.float32) for a in activations]).to(device)
        reconstruction = self.reconstructor.read(ids, lengths).float()
        cosine = F.cosine_similarity(reconstruction, target, dim=-1)
        result = {"cosine": cosine, "reward": cosine.clone()}
        if self.kl_weight:
            logits = next_token_logits(
                self.base,
                self.reconstructor.config.layer,
                context_ids,
                {"reference": None, "reconstruction": reconstruction},
            )
            reference = torch.log_softmax(logits["reference"].float(), dim=-1)
            patched = torch.log_softmax(logits["reconstruction"].float(), dim=-1)
            result["kl"] = (reference.exp() * (reference - patched)).sum(-1).to(device)
            result["reward"] = cosine - self.kl_weight * result["kl"]
        return result

    def __call__(
        self, prompts, completions, completion_ids, images, context_ids=None, **kwargs
    ) -> list[float]:
        activations = [image_list[0] for image_list in images]
        scores = self.scores(completion_ids, activations, context_ids)
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            log_metric("reconstruction_cosine", float(scores["cosine"].mean()))
            if "kl" in scores:
                log_metric("reconstruction_kl", float(scores["kl"].mean()))
        if self.fit is not None:  # scored first, then the reconstructor learns to read these explanations
            loss = self.fit.step(completion_ids, activations)
            if log_metric is not None:
                log_metric("reconstructor_loss", loss)
        return scores["reward"].tolist()


class ReconstructorFit:
    """The reconstructor trained beside GRPO, as the anchor trains its reconstructor with its verbaliser: after each
    batch of sampled explanations is scored, one AdamW step of :func:`reconstructor_loss` on those explanations and
    their activations (gradients averaged over processes, so every process keeps the same reconstructor).
    :meth:`save` / :meth:`load` keep it and its optimizer's state in a checkpoint folder (safetensors + JSON)."""

    FOLDER = "reconstructor"
    OPTIMIZER = "reconstructor_optimizer.safetensors"

    def __init__(
        self,
        reconstructor,
        stop_ids,
        pad_id: int,
        learning_rate: float,
        mean: torch.Tensor | None = None,
        mse_weight: float = 0.0,
        max_grad_norm: float = 1.0,
    ):
        self.reconstructor = reconstructor
        self.stop_ids = list(stop_ids)
        self.pad_id = pad_id
        self.mean = mean
        self.mse_weight = mse_weight
        self.max_grad_norm = max_grad_norm
        self.parameters = [p for p in reconstructor.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError("the reconstructor has no trainable parameters.")
        self.optimizer = torch.optim.AdamW(self.parameters, lr=learning_rate, weight_decay=0.0)

    def step(self, explanations: list[list[int]], activations) -> float:
        """One optimizer step on these explanations; returns the loss before it."""
        import torch.distributed as dist

        device = self.reconstructor.device
        ids, lengths = explanation_batch(explanations, self.stop_ids, self.pad_id, device)
        target = torch.stack([torch.as_tensor(a, dtype=torch.float32) for a in activations]).to(device)
        self.reconstructor.train()
        try:
            with torch.enable_grad():
                loss = reconstructor_loss(
                    self.reconstructor.read(ids, lengths), target, self.mean, self.mse_weight
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                for parameter in self.parameters:
                    grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
                    dist.all_reduce(grad)
                    parameter.grad = grad / dist.get_world_size()
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
            self.optimizer.step()
        finally:
            self.reconstructor.eval()
        return float(loss.detach())

    def save(self, folder: str | Path) -> None:
        """The reconstructor (``save_pretrained``) and its optimizer's state into `folder`."""
        import json

        from safetensors.torch import save_file

        from hfx.atomic import atomic_file

        folder = Path(folder)
        self.reconstructor.save_pretrained(folder / self.FOLDER)
        state = self.optimizer.state_dict()
        tensors = {
            f"{index}.{name}": value.detach().cpu().contiguous()
            for index, values in state["state"].items()
            for name, value in values.items()
        }
        groups = json.dumps(state["param_groups"])
        with atomic_file(folder / self.OPTIMIZER) as temp:
            save_file(tensors, str(temp), metadata={"param_groups": groups})

    def load(self, folder: str | Path) -> bool:
        """The reconstructor and optimizer state :meth:`save` wrote into `folder`; False when it holds none."""
        import json

        from safetensors import safe_open
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / self.OPTIMIZER).is_file():
            return False
        saved = type(self.reconstructor).from_pretrained(folder / self.FOLDER, dtype=self.reconstructor.dtype)
        self.reconstructor.load_state_dict(saved.state_dict())
        tensors = load_file(str(folder / self.OPTIMIZER))
        with safe_open(str(folder / self.OPTIMIZER), "pt") as f:
            groups = json.loads(f.metadata()["param_groups"])
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        return True


class ReconstructorCheckpoints(TrainerCallback):
    """Writes a :class:`ReconstructorFit` into each checkpoint Trainer saves (before hfx marks it complete), so a
    resumed GRPO run goes on with the reconstructor and optimizer state of the checkpoint it resumes from."""

    def __init__(self, fit: ReconstructorFit):
        self.fit = fit

    def on_save(self, args, state, control, **kwargs):
        from hfx.checkpoints import checkpoint_dir

        folder = checkpoint_dir(args.output_dir, state.global_step)
        if state.is_world_process_zero and folder.is_dir():
            self.fit.save(folder)


class LengthPenalty:
    """GRPO reward: minus the explanation's length over `max_length` (weighted by GRPO's ``reward_weights``)."""

    __name__ = "length_penalty"

    def __init__(self, stop_ids, max_length: int):
        self.stop_ids = set(stop_ids)
        self.max_length = max_length

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [-len(until_stop(ids, self.stop_ids)) / self.max_length for ids in completion_ids]


class CopyPenalty:
    """GRPO reward: minus the explanation's copy rate, the share of its tokens found among the last ``window`` tokens
    of its context (`hfx.lens.evaluation.copy_rate`; needs the dataset's ``context_ids``). An explanation cut
    empty by a stop token copies nothing."""

    __name__ = "copy_penalty"

    def __init__(self, stop_ids, window: int | None = None):
        from .evaluation import COPY_WINDOW

        self.stop_ids = set(stop_ids)
        self.window = COPY_WINDOW if window is None else window

    def __call__(self, prompts, completions, completion_ids, context_ids=None, **kwargs) -> list[float]:
        from .evaluation import copy_rate

        if context_ids is None:
            raise ValueError("the copy penalty needs the dataset's context_ids column.")
        return [
            -copy_rate([until_stop(ids, self.stop_ids)], [list(context)], self.window)
            for ids, context in zip(completion_ids, context_ids, strict=True)
        ]


def grpo_rewards(
    reconstructor,
    stop_ids,
    pad_id: int,
    explanation_length: int,
    length_penalty: float = 0.1,
    copy_penalty: float = 0.0,
    base=None,
    kl_weight: float = 0.0,
    fit: ReconstructorFit | None = None,
) -> tuple[list, list[float]]:
    """GRPO's reward functions and their ``reward_weights``: the reconstruction (weight 1), the length penalty and,
    when `copy_penalty` is not zero, the copy penalty."""
    rewards = [
        ReconstructionReward(reconstructor, stop_ids, pad_id, base, kl_weight, fit),
        LengthPenalty(stop_ids, explanation_length),
    ]
    weights = [1.0, length_penalty]
    if copy_penalty:
        rewards.append(CopyPenalty(stop_ids))
        weights.append(copy_penalty)
    return rewards, weights


def reconstructor_examples(
    explanations: list[list[int]], activations, empty_fraction: float = 0.0, seed: int = 0
) -> datasets.Dataset:
    """The reconstructor's regression examples, plus ``round(empty_fraction x n)`` with an empty explanation, each
    paired with an activation drawn (seeded) from `activations`: what the reconstructor learns to answer when it is
    told nothing (the best it can do without information, near the mean) is then the empty-explanation baseline."""
    if not 0.0 <= empty_fraction < 1.0:
        raise ValueError(f"empty_fraction must be in [0, 1), got {empty_fraction}.")
    explanations = [list(e) for e in explanations]
    activations = [list(a) for a in activations]
    extra = round(empty_fraction * len(explanations))
    if extra:
        generator = torch.Generator().manual_seed(seed)
        drawn = torch.randint(0, len(activations), (extra,), generator=generator).tolist()
        explanations += [[] for _ in drawn]
        activations += [activations[i] for i in drawn]
    return datasets.Dataset.from_dict({"explanation_ids": explanations, "activation": activations})


@dataclass
class ReconstructorCollator:
    stop_ids: list[int]
    pad_id: int

    def __call__(self, rows: list[dict]) -> dict:
        ids, lengths = explanation_batch([row["explanation_ids"] for row in rows], self.stop_ids, self.pad_id)
        activations = torch.tensor([row["activation"] for row in rows], dtype=torch.float32)
        return {"explanation_ids": ids, "lengths": lengths, "activations": activations}


def reconstructor_loss(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    mean: torch.Tensor | None = None,
    mse_weight: float = 0.0,
) -> torch.Tensor:
    """The reconstructor's regression loss: 2 (1 - cos(activation, reconstruction)) (the anchor's, on
    unit-normalised vectors) + `mse_weight` x the squared error over the activations' mean squared deviation from
    `mean` (1 - FVE, which the cosine alone leaves free: it does not see the reconstruction's norm)."""
    loss = cosine_regression_loss(reconstruction, target)
    if mse_weight:
        if mean is None:
            raise ValueError("the squared-error term needs the mean activation.")
        target = target.float()
        error = ((reconstruction.float() - target) ** 2).sum(-1).mean()
        deviation = ((target - mean.to(target.device)) ** 2).sum(-1).mean().clamp(min=1e-12)
        loss = loss + mse_weight * error / deviation
    return loss


class ReconstructorTrainer(Trainer):
    """Fits a reconstructor (a ConsistencyLens read through :meth:`~ConsistencyLens.read`) to explanations given
    as text. Loss: 2 (1 - cos(activation, reconstruction)) (the anchor's regression on unit-normalised vectors)
    + `mse_weight` x the squared error over the activations' mean squared deviation from `mean` (1 - FVE, which
    the cosine alone leaves free: it does not see the reconstruction's norm)."""

    def __init__(self, *args, mean: torch.Tensor | None = None, mse_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if mse_weight and mean is None:
            raise ValueError("the squared-error term needs the mean activation.")
        self.mean = mean
        self.mse_weight = mse_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # through the model's forward, which DistributedDataParallel wraps
        reconstruction = model(
            explanation_ids=inputs["explanation_ids"], explanation_lengths=inputs["lengths"]
        )
        reconstruction = reconstruction.reconstruction
        loss = reconstructor_loss(reconstruction, inputs["activations"], self.mean, self.mse_weight)
        return (loss, {"reconstruction": reconstruction}) if return_outputs else loss


def explain(
    verbalizer,
    processor: ActivationProcessor,
    activations: torch.Tensor,
    max_new_tokens: int,
    instruction: str = "",
    do_sample: bool = False,
) -> list[list[int]]:
    """The verbaliser's explanations (token ids, end-of-text tokens removed) of `activations` (B, d)."""
    prompt = processor.apply_chat_template(
        [prompt_of(instruction)], add_generation_prompt=True, tokenize=True
    )[0]
    ids = torch.tensor([prompt] * len(activations), device=verbalizer.device)
    out = verbalizer.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=activations.to(verbalizer.device),
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        suppress_tokens=[processor.activation_token_id],
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    stop = set(stop_ids_of(verbalizer, processor))
    return [until_stop(row, stop) for row in out[:, ids.shape[1] :].tolist()]


def stop_ids_of(verbalizer, processor) -> list[int]:
    """The tokens that end an explanation: the verbaliser's end-of-text tokens and the pad token."""
    stop = verbalizer.generation_config.eos_token_id
    stop = [stop] if isinstance(stop, int) else list(stop or [])
    return sorted({*stop, processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id} - {None})


@torch.no_grad()
def autoencoder_fve(
    verbalizer,
    processor: ActivationProcessor,
    reconstructor,
    activations: torch.Tensor,
    mean: torch.Tensor,
    contexts: list[list[int]] | None = None,
    instruction: str = "",
    batch_size: int = 32,
) -> dict[str, float]:
    """FVE (against `mean`) and mean cosine of the reconstructions of the verbaliser's greedy explanations of
    `activations`, their mean length and (with `contexts`) copy rate: the quick form of `hfx lens eval`'s
    figures that :class:`FVECallback` logs during training."""
    stop = stop_ids_of(verbalizer, processor)
    length = reconstructor.config.explanation_length
    explanations = []
    for start in range(0, len(activations), batch_size):
        batch = activations[start : start + batch_size].to(reconstructor.device)
        explanations += explain(verbalizer, processor, batch, length, instruction)
    result = read_back(
        reconstructor,
        explanations,
        activations,
        mean,
        stop,
        processor.tokenizer.pad_token_id,
        contexts,
        batch_size,
    )
    return result | {"explanation_tokens": sum(map(len, explanations)) / len(explanations)}


@torch.no_grad()
def read_back(
    reconstructor,
    explanations: list[list[int]],
    activations: torch.Tensor,
    mean: torch.Tensor,
    stop_ids,
    pad_id: int,
    contexts: list[list[int]] | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """The reconstructor reading `explanations` (cut at their first stop token) back: the FVE against `mean` and the
    mean cosine with `activations`, and (with `contexts`) the explanations' copy rate."""
    from .evaluation import copy_rate

    squared_error = squared_deviation = cosine = 0.0
    for start in range(0, len(explanations), batch_size):
        ids, lengths = explanation_batch(
            explanations[start : start + batch_size], stop_ids, pad_id, reconstructor.device
        )
        reconstruction = reconstructor.read(ids, lengths).float()
        target = activations[start : start + batch_size].to(reconstruction.device).float()
        squared_error += float(((target - reconstruction) ** 2).sum())
        squared_deviation += float(((target - mean.to(target.device)) ** 2).sum())
        cosine += float(F.cosine_similarity(target, reconstruction, dim=-1).sum())
    result = {"fve": 1.0 - squared_error / squared_deviation, "cosine": cosine / len(explanations)}
    if contexts is not None:
        result["copy_rate"] = copy_rate(explanations, contexts)
    return result


class FVECallback(TrainerCallback):
    """Every `every` optimizer steps (and at the end), logs the autoencoder's FVE, cosine, explanation length and
    copy rate on a few held-out activations (:func:`autoencoder_fve`) into the trainer's log history: the curve of
    FVE against training steps."""

    def __init__(
        self, processor, reconstructor, activations, mean, contexts, every: int, instruction: str = ""
    ):
        self.processor = processor
        self.reconstructor = reconstructor
        self.activations = activations
        self.mean = mean
        self.contexts = contexts
        self.every = every
        self.instruction = instruction

    def _measure(self, state, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            values = autoencoder_fve(
                model, self.processor, self.reconstructor, self.activations, self.mean, self.contexts,
                self.instruction,
            )  # fmt: skip
        finally:
            model.train(was_training)
        entry = {f"heldout_{key}": value for key, value in values.items()} | {"step": state.global_step}
        state.log_history.append(entry)
        logger.info("step %d: held-out %s", state.global_step, values)
        return values

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0 and state.is_world_process_zero:
            self._measure(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        logged = [e["step"] for e in state.log_history if "heldout_fve" in e]
        if state.is_world_process_zero and (not logged or logged[-1] != state.global_step):
            self._measure(state, model)


class AutoencoderLens(torch.nn.Module):
    """A verbaliser and its reconstructor behind the interface of a `ConsistencyLens` that
    `hfx.lens.evaluation.evaluate_lens` reads: ``lens(activations, sample=False)`` explains (greedily, at most
    ``config.explanation_length`` tokens) and reads back; ``read``/``reconstruct`` are the reconstructor's."""

    def __init__(self, verbalizer, processor: ActivationProcessor, reconstructor, instruction: str = ""):
        super().__init__()
        self.verbalizer = verbalizer
        self.processor = processor
        self.reconstructor = reconstructor
        self.instruction = instruction

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype=None, instruction: str = "") -> AutoencoderLens:
        """The autoencoder saved in `folder` (``verbalizer/`` and ``reconstructor/``)."""
        from transformers import AutoTokenizer

        from .modeling_lens import ConsistencyLens

        folder = Path(folder)
        verbalizer = ActivationVerbalizer.from_pretrained(folder / "verbalizer", dtype=dtype)
        processor = ActivationProcessor(AutoTokenizer.from_pretrained(folder / "verbalizer"))
        reconstructor = ConsistencyLens.from_pretrained(folder / "reconstructor", dtype=dtype)
        return cls(verbalizer, processor, reconstructor, instruction)

    @property
    def config(self):
        return self.reconstructor.config

    @property
    def encoder(self):
        return self.reconstructor.encoder

    @property
    def read_embedding(self):
        return self.reconstructor.read_embedding

    @property
    def device(self):
        return self.reconstructor.device

    def reconstruct(self, explanation: torch.Tensor) -> torch.Tensor:
        return self.reconstructor.reconstruct(explanation)

    def read(self, explanation_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.reconstructor.read(explanation_ids, lengths)

    @torch.no_grad()
    def forward(self, activations: torch.Tensor, sample: bool = False, **kwargs):
        from .modeling_lens import LensOutput

        explanations = explain(
            self.verbalizer,
            self.processor,
            activations,
            self.config.explanation_length,
            self.instruction,
            do_sample=sample,
        )
        stop = stop_ids_of(self.verbalizer, self.processor)
        ids, lengths = explanation_batch(
            explanations, stop, self.processor.tokenizer.pad_token_id, self.device
        )
        width = self.config.explanation_length
        if ids.shape[1] < width:  # every explanation stopped early: pad to the full width
            ids = F.pad(ids, (0, width - ids.shape[1]), value=self.processor.tokenizer.pad_token_id)
        return LensOutput(
            explanation_ids=ids,
            explanation_lengths=lengths,
            reconstruction=self.reconstructor.read(ids, lengths),
        )
