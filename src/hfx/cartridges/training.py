"""Stage 3: train a cartridge (a PEFT ``CARTRIDGE`` adapter) by distilling the model-with-chunk into the model-with-cartridge.

The base model is frozen; the only parameters are the cartridge's per-layer keys and values (PEFT's
``CartridgeEncoder``), initialized from the KV of the corpus's most attended tokens (default), of its first tokens,
of random text, or as random vectors, with the first token frozen as an attention sink. The loss is cross-entropy
against the teacher's stored top-k distribution at every answer token (:func:`hfx.losses.topk_distillation_loss`).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import (
    CartridgeConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
    initialize_kv_prefix_from_past_key_values,
    initialize_kv_prefix_from_text,
)
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from transformers import DynamicCache, Trainer, TrainingArguments
from transformers.models.llama.modeling_llama import rotate_half

from hfx.artifacts import replace_pickled_training_args
from hfx.atomic import write_text_atomic
from hfx.batching import padded
from hfx.cartridges.corpus import Corpus, document_prefix_ids_within, document_system_prompt
from hfx.cartridges.prefix import PrefixKV
from hfx.checkpoints import use_checkpoint_protocol
from hfx.losses import topk_distillation_loss
from hfx.models import seeded
from hfx.stages import (
    MANIFEST_PREFIX,
    Stage,
    dataset_fingerprint,
    file_fingerprint,
    fingerprint,
    trainer_settings,
)

logger = logging.getLogger(__name__)

INITIALIZATIONS = ("attended_tokens", "first_tokens", "random_text", "random_vectors")
#: The default: the study's main job on rcv1 reached 86% of the no-context -> ICL gap with it (76% with first_tokens).
DEFAULT_INITIALIZATION = "attended_tokens"
METADATA_FILE = "hfx_cartridge.json"
#: The most tokens `attended_tokens_prefix` scores: its eager attention weights grow with the square of the length
#: (one layer at a time: heads x 8192^2 floats).
ATTENDED_TOKENS_WINDOW = 8192


@dataclass
class CartridgeTrainerDefaults(TrainingArguments):
    """``TrainingArguments`` defaults shared by everything that trains cartridges on a frozen base (one cartridge,
    a library's tuned together): the base's dtype, no weight decay, cosine decay to 0, checkpoints every 25 steps."""

    model_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the frozen base model during training (the cartridges stay float32): auto = "
            "bfloat16 where the device multiplies it natively (a GPU, a CPU with AVX512-BF16 or AMX), else float32."
        },
    )
    weight_decay: float = field(default=0.0)
    #: Decays to 0 at the run's last step: a constant lr leaves the last cartridge wherever the noise of the last
    #: steps put it (the study's curves: answer log-ppl 3.08 at the end with cosine, 3.48 constant).
    lr_scheduler_type: str = field(default="cosine")
    logging_steps: float = field(default=5)
    save_strategy: str = field(default="steps")
    save_steps: float = field(default=25)
    save_total_limit: int | None = field(default=2)
    report_to: None | str | list[str] = field(default="none")
    remove_unused_columns: bool = field(default=False)
    dataloader_drop_last: bool = field(default=False)


@dataclass
class CartridgeTrainingArguments(CartridgeTrainerDefaults):
    """``TrainingArguments`` with the cartridge's own settings and defaults (Adam, lr 6e-2, cosine decay to 0)."""

    num_virtual_tokens: int = field(default=128, metadata={"help": "Cartridge size p: KV tokens per layer."})
    num_frozen_tokens: int = field(
        default=1, metadata={"help": "Leading cartridge tokens kept frozen (attention sink)."}
    )
    initialization: str = field(
        default=DEFAULT_INITIALIZATION,
        metadata={"help": f"How to initialize the cartridge: {', '.join(INITIALIZATIONS)}."},
    )
    learning_rate: float = field(
        default=6e-2,
        metadata={"help": "Adam learning rate (self-study uses 2e-2; 6e-2 learns more in a short run)."},
    )
    per_device_train_batch_size: int = field(default=8)
    num_train_epochs: float = field(default=2.0)
    distractors: list[str] | None = field(
        default=None,
        metadata={
            "help": "Cartridge folders whose prefixes are mixed beside the one being trained, a changing set each "
            "step, so that the trained cartridge keeps its answers when composed with others (a library's "
            "distractor mixing)."
        },
    )
    max_distractors: int = field(
        default=7,
        metadata={"help": "The most distractor prefixes in one step (each step draws 0 to this many)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.initialization not in INITIALIZATIONS:
            raise ValueError(f"initialization must be one of {INITIALIZATIONS}, got {self.initialization!r}.")
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}.")
        if not 0 <= self.num_frozen_tokens <= self.num_virtual_tokens:
            raise ValueError("num_frozen_tokens must be between 0 and num_virtual_tokens.")
        if self.max_distractors < 0:
            raise ValueError(f"max_distractors must be >= 0, got {self.max_distractors}.")


class CartridgeCollator:
    """Pads synthesized rows into student inputs and the teacher's top-k aligned to the student's logits.

    Position ``t`` of ``teacher_topk_*`` holds the teacher's distribution over token ``t + 1``; ``loss_mask`` is
    True exactly where that token is part of the assistant's answer.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        k = len(rows[0]["topk_token_ids"][0])
        batch = len(rows)
        input_ids, attention_mask = padded([r["input_ids"] for r in rows], self.pad_token_id)
        loss_mask = torch.zeros((batch, width), dtype=torch.bool)
        topk_ids = torch.zeros((batch, width, k), dtype=torch.long)
        topk_logprobs = torch.zeros((batch, width, k), dtype=torch.float32)
        for i, row in enumerate(rows):
            ids = row["input_ids"]
            start = row["answer_start"]
            n_answer = len(ids) - start
            if start < 1 or n_answer != len(row["topk_token_ids"]):
                raise ValueError(
                    f"Row {row.get('conversation_id')}: {n_answer} answer tokens but "
                    f"{len(row['topk_token_ids'])} teacher distributions (answer_start={start})."
                )
            loss_mask[i, start - 1 : len(ids) - 1] = True
            topk_ids[i, start - 1 : len(ids) - 1] = torch.as_tensor(row["topk_token_ids"])
            topk_logprobs[i, start - 1 : len(ids) - 1] = torch.as_tensor(row["topk_logprobs"])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "loss_mask": loss_mask,
            "teacher_topk_ids": topk_ids,
            "teacher_topk_logprobs": topk_logprobs,
        }


class CartridgeTrainer(Trainer):
    """``Trainer`` whose loss is top-k distillation from the stored teacher; everything else is Trainer's.

    The loss is normalized by the number of answer tokens in the whole optimizer step (all accumulation
    micro-batches, all processes), so 2 processes with half the per-device batch take the same step as one.
    """

    def __init__(self, *args, distractors: list[PrefixKV] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = True  # compute_loss divides by the step's token count itself
        use_checkpoint_protocol(self)  # after the callbacks passed in
        self.distractors = DistractorMixer(self.model, distractors) if distractors else None

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The optimizer step's micro-batches, and its number of answer tokens (the loss's normalizer): across
        processes when ``average_tokens_across_devices`` (the default), else this process's."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples and "loss_mask" in batch_samples[0]:
            num_items = sum(batch["loss_mask"].sum() for batch in batch_samples).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                num_items = self.accelerator.gather(num_items).sum()
        return batch_samples, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.distractors is not None:  # the same mix for every micro-batch of a step, and again on resume
            self.distractors.layout = distractor_layout(
                len(self.distractors.prefixes),
                self.args.max_distractors,
                self.args.seed,
                self.state.global_step,
            )
        try:
            outputs = self.student_forward(model, inputs)
        finally:
            if self.distractors is not None:
                self.distractors.layout = None
        loss = topk_distillation_loss(
            outputs.hidden_states[-1],
            self.accelerator.unwrap_model(model).get_output_embeddings(),
            inputs["loss_mask"],
            inputs["teacher_topk_ids"],
            inputs["teacher_topk_logprobs"],
            reduction="sum",
        )
        if num_items_in_batch is None:
            accumulation = getattr(self, "current_gradient_accumulation_steps", 1)
            loss = loss / inputs["loss_mask"].sum().clamp(min=1) / accumulation
        else:
            loss = loss / num_items_in_batch.clamp(min=1)
            if self.args.average_tokens_across_devices:
                # DDP averages gradients over processes: scale back up so the step is sum / (all tokens).
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def student_forward(self, model, inputs, **extra):
        """The student's forward over a batch, with the final hidden states (the loss projects only the labelled
        positions itself); ``extra`` goes to the model (a subclass's own inputs)."""
        return model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            output_hidden_states=True,
            logits_to_keep=1,
            use_cache=False,
            **extra,
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            replace_pickled_training_args(output_dir or self.args.output_dir, self.args)


def distractor_layout(
    num_distractors: int, max_distractors: int, seed: int, step: int
) -> tuple[list[int], int]:
    """The distractors of one training step and the trained cartridge's place among them: ``(indices, place)``,
    the prefix being ``indices[:place] + [trained] + indices[place:]``. Between 0 and ``max_distractors`` of them,
    drawn from ``(seed, step)`` alone, so a resumed run mixes as the uninterrupted one did."""
    rng = random.Random(f"hfx-distractors-{seed}-{step}")
    count = rng.randint(0, min(max_distractors, num_distractors))
    return rng.sample(range(num_distractors), count), rng.randint(0, count)


def expected_distractor_tokens(lengths: list[int], max_distractors: int) -> int:
    """Distractor tokens beside the trained cartridge in the average step of :func:`distractor_layout` over
    distractors of ``lengths`` tokens: a uniform count in [0, min(max, n)], drawn uniformly from them."""
    if not lengths:
        return 0
    return round(min(max_distractors, len(lengths)) / 2 * sum(lengths) / len(lengths))


class DistractorMixer:
    """Puts other cartridges' prefixes beside a PEFT cartridge's own, in the base model's cache.

    PEFT's forward hands the base model the trained cartridge as ``past_key_values`` (and ones for it in the
    attention mask); a forward pre-hook on the base model concatenates the step's distractors before and after it
    along the token axis, as a composition of cartridges does, and widens the mask. The question then sits after
    all of them, at the positions it has in a composition. The forward still goes through the Trainer's (DDP)
    wrapper, so gradients reach the trained cartridge as without distractors. ``layout`` is set per step
    (:func:`distractor_layout`); ``None`` leaves the forward as PEFT made it.
    """

    def __init__(self, peft_model, prefixes: list[PrefixKV]):
        self.prefixes = prefixes
        self.layout: tuple[list[int], int] | None = None
        unwrapped = peft_model.module if hasattr(peft_model, "module") else peft_model
        self.handle = unwrapped.get_base_model().register_forward_pre_hook(self._mix, with_kwargs=True)

    def order(self) -> list[int | None]:
        """This step's prefix order: distractor indices, ``None`` for the trained cartridge."""
        indices, place = self.layout
        return [*indices[:place], None, *indices[place:]]

    def _mix(self, module, args, kwargs):
        if not self.layout or not self.layout[0]:
            return None
        own = PrefixKV.from_cache(kwargs["past_key_values"], detach=False)
        batch = kwargs["attention_mask"].shape[0]
        parts = [own if i is None else self.prefixes[i] for i in self.order()]
        mixed = PrefixKV.concat(parts)
        cache = DynamicCache(config=module.config)
        for layer_idx, (k, v) in enumerate(zip(mixed.keys, mixed.values, strict=True)):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), layer_idx)
        mask = kwargs["attention_mask"]
        extra = mixed.num_tokens - own.num_tokens
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, extra), mask], dim=1)
        kwargs["past_key_values"] = cache
        return args, kwargs

    def remove(self) -> None:
        self.handle.remove()


def create_cartridge(
    model,
    tokenizer,
    corpus: Corpus,
    num_virtual_tokens: int,
    num_frozen_tokens: int = 1,
    initialization: str = DEFAULT_INITIALIZATION,
    seed: int = 0,
) -> PeftModel:
    """Wrap ``model`` (frozen) with a freshly initialized CARTRIDGE adapter of ``num_virtual_tokens`` tokens."""
    check_initialization(model, initialization)
    if num_virtual_tokens > corpus.num_tokens:
        raise ValueError(
            f"Cartridge size p={num_virtual_tokens} is larger than the corpus {corpus.name!r} "
            f"({corpus.num_tokens} tokens); choose p <= {corpus.num_tokens} (self-study uses p well below it)."
        )
    config = CartridgeConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, num_frozen_tokens=num_frozen_tokens
    )
    with seeded(seed, model.device):  # PEFT draws "random_vectors" from the global generator
        peft_model = get_peft_model(model, config)
    if initialization == "attended_tokens":
        prefix = attended_tokens_prefix(model, tokenizer, corpus.text, num_virtual_tokens)
        initialize_kv_prefix_from_past_key_values(
            peft_model, past_key_values=list(zip(prefix.keys, prefix.values, strict=True))
        )
    elif initialization == "first_tokens":
        # The cartridge starts as the ICL prompt truncated to p tokens: the same system turn, cut short.
        initialize_kv_prefix_from_text(peft_model, tokenizer, text=document_system_prompt(corpus.text))
    elif initialization == "random_text":
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(100, len(tokenizer), (1, num_virtual_tokens), generator=generator).to(
            model.device
        )
        with torch.no_grad(), peft_model.disable_adapter():
            past = peft_model(input_ids=ids, use_cache=True).past_key_values
        initialize_kv_prefix_from_past_key_values(peft_model, past_key_values=past)
    # "random_vectors": PEFT's own initialization of the encoder.
    encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    encoder.float()  # trainable state in float32 even when the frozen base runs in bfloat16
    return peft_model


def check_initialization(model, initialization: str) -> None:
    """Refuse an initialization that is unknown or that ``model`` cannot take, before any work is done."""
    if initialization not in INITIALIZATIONS:
        raise ValueError(f"initialization must be one of {INITIALIZATIONS}, got {initialization!r}.")
    if initialization == "attended_tokens":
        _rotary_embedding(model)


def _rotary_embedding(model):
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq"):
            return module
    raise ValueError(
        f"initialization='attended_tokens' moves keys to new positions and needs a model with rotary position "
        f"embeddings; {type(model).__name__} has none. Use initialization='first_tokens'."
    )


@torch.no_grad()
def attended_tokens_prefix(model, tokenizer, text: str, num_tokens: int) -> PrefixKV:
    """The KV of the ``num_tokens`` positions of the document's system turn that its own tokens attend to most.

    The turn (cut to the model's window, at most :data:`ATTENDED_TOKENS_WINDOW` tokens) is prefilled once with eager
    attention; each layer and KV head keeps its own top positions by the attention they receive (summed over the
    heads of the group and over every later token), always including the first token (the attention sink). The kept keys are rotated from their positions
    in the document to positions ``0 .. num_tokens - 1`` in document order, where a cartridge's keys sit. Unlike the
    first tokens, the start covers the whole document: each kept value already mixes what came before it.
    """
    window = min(getattr(model.config, "max_position_embeddings", None) or 4096, ATTENDED_TOKENS_WINDOW)
    ids, cut = document_prefix_ids_within(tokenizer, text, window)
    if cut:
        logger.warning(
            "attended_tokens: the cartridge starts from the first %d tokens of the document's system turn (eager "
            "attention weights grow with the square of the length); training then covers the whole document.",
            len(ids),
        )
    if len(ids) < num_tokens:
        raise ValueError(f"The document's system turn has {len(ids)} tokens, fewer than p={num_tokens}.")
    rotary = _rotary_embedding(model)
    layers = model.get_decoder().layers
    received: dict[int, torch.Tensor] = {}

    def keep_received(layer_idx):
        def hook(module, args, output):
            weights = output[1][0].float()  # heads, queries, keys
            heads, queries, keys = weights.shape
            groups = heads // module.config.num_key_value_heads
            received[layer_idx] = weights.view(heads // groups, groups, queries, keys).sum(dim=(1, 2))

        return hook

    implementation = model.config._attn_implementation
    handles = [layer.self_attn.register_forward_hook(keep_received(i)) for i, layer in enumerate(layers)]
    try:
        model.set_attn_implementation("eager")  # the only implementation that returns attention weights
        out = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(implementation)
    if len(received) != len(layers):
        raise ValueError(f"{type(model).__name__}'s attention layers did not return attention weights.")
    full = PrefixKV.from_cache(out.past_key_values)
    target = torch.arange(num_tokens, device=model.device)
    keys, values = [], []
    for layer_idx, (k, v) in enumerate(zip(full.keys, full.values, strict=True)):
        score = received[layer_idx]
        score[:, 0] = float("inf")
        kept = score.topk(num_tokens, dim=1).indices.sort(dim=1).values  # kv_heads, p, in document order
        index = kept[..., None].expand(-1, -1, k.shape[-1])
        kept_keys = torch.gather(k[0], 1, index)
        # RoPE rotates by position, so rotating by (new - old) moves a key: R(new) = R(new - old) R(old).
        cos, sin = rotary(kept_keys, position_ids=target[None, :] - kept)
        scale = getattr(rotary, "attention_scaling", 1.0)
        cos, sin = cos / scale, sin / scale
        keys.append((kept_keys * cos + rotate_half(kept_keys) * sin)[None])
        values.append(torch.gather(v[0], 1, index)[None])
    return PrefixKV(keys, values)


def check_cartridge_fits(adapter_dir: str | Path, base_config) -> PeftConfig:
    """Load the adapter config and check it was made for a model of ``base_config``'s shape."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json; not a saved cartridge.")
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except (OSError, ValueError, TypeError, KeyError) as err:  # bad JSON, or a foreign config's fields
        raise ValueError(
            f"{adapter_dir / 'adapter_config.json'}: cannot be read as a PEFT config ({err})."
        ) from err
    if str(config.peft_type) not in ("CARTRIDGE", "PeftType.CARTRIDGE"):
        raise ValueError(f"{adapter_dir}: adapter type is {config.peft_type}, not CARTRIDGE.")
    text_config = base_config.get_text_config() if hasattr(base_config, "get_text_config") else base_config
    kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = (
        getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    )
    expected = {
        "num_layers": text_config.num_hidden_layers,
        "token_dim": kv_heads * head_dim,
        "num_attention_heads": kv_heads,
    }
    mismatched = {k: (getattr(config, k), v) for k, v in expected.items() if getattr(config, k) != v}
    if mismatched:
        details = ", ".join(f"{k}: cartridge {a} vs model {b}" for k, (a, b) in mismatched.items())
        raise ValueError(
            f"{adapter_dir}: this cartridge was trained for a base model of another shape ({details}). "
            f"It was made for {config.base_model_name_or_path!r}."
        )
    return config


def load_cartridge(model, adapter_dir: str | Path) -> PeftModel:
    """Attach a saved cartridge to ``model`` after checking that it fits and that its weights are readable."""
    config = check_cartridge_fits(adapter_dir, model.config)
    check_cartridge_weights(adapter_dir, config.num_virtual_tokens, prompt_width(config))
    return PeftModel.from_pretrained(model, str(adapter_dir))


def prompt_width(config) -> int:
    """Width of a cartridge's ``prompt_embeddings`` rows: keys and values of every layer (PEFT's layout)."""
    return config.num_layers * 2 * config.token_dim


def check_cartridge_weights(
    adapter_dir: str | Path, num_virtual_tokens: int | None = None, width: int | None = None
) -> tuple[int, ...]:
    """The shape of a saved cartridge's ``prompt_embeddings``, read from the safetensors header without loading.

    Raises ``FileNotFoundError`` when the weights are missing and ``ValueError`` naming the file when they are
    truncated or foreign, or when their shape is not ``(num_virtual_tokens, width)`` (each checked when given).
    """
    from safetensors import SafetensorError, safe_open

    weights = Path(adapter_dir) / SAFETENSORS_WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(
            f"{adapter_dir}: no {SAFETENSORS_WEIGHTS_NAME} (the cartridge's weights); training has not finished, "
            "run it again to resume."
        )
    try:
        with safe_open(str(weights), framework="numpy") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError) as err:  # a truncated or foreign file
        raise ValueError(
            f"{weights}: the cartridge's weights cannot be read ({type(err).__name__}: {err})."
        ) from err
    shape = shapes.get("prompt_embeddings")
    if shape is None:
        raise ValueError(f"{weights}: no 'prompt_embeddings' tensor; not a cartridge's weights.")
    if len(shape) != 2 or (width is not None and shape[1] != width):
        raise ValueError(
            f"{weights}: prompt_embeddings has shape {shape}, expected (p, {width}) from adapter_config.json; "
            "the folder mixes two cartridges."
        )
    if num_virtual_tokens is not None and shape[0] != num_virtual_tokens:
        raise ValueError(
            f"{weights}: prompt_embeddings holds {shape[0]} tokens but adapter_config.json says "
            f"num_virtual_tokens={num_virtual_tokens}; the folder mixes two cartridges."
        )
    return shape


def write_metadata(output_dir: str | Path, metadata: dict) -> None:
    write_text_atomic(Path(output_dir) / METADATA_FILE, json.dumps(metadata, indent=2))


#: The stage (:mod:`hfx.stages`) that trains a cartridge into its folder.
CARTRIDGE_STAGE = "cartridge"
#: The cartridge's own training arguments that change it (beside hfx.stages.TRAINER_SETTINGS).
CARTRIDGE_SETTINGS = ("num_virtual_tokens", "num_frozen_tokens", "initialization", "model_dtype")


def cartridge_stage(args: CartridgeTrainingArguments, base_model: str, corpus, dataset) -> Stage:
    """The training stage of a cartridge in ``args.output_dir``: its settings (:data:`CARTRIDGE_SETTINGS`, the
    trainer's and the number of processes) and inputs (the base model, the corpus's tokens, the synthesized rows)."""
    settings = trainer_settings(args, CARTRIDGE_SETTINGS)
    inputs = {
        "base_model": base_model,
        "corpus": f"{corpus.name} ({corpus.num_tokens} tokens, {fingerprint(corpus.token_ids)})",
        "dataset": dataset_fingerprint(dataset),
    }
    if args.distractors:  # (recorded only when there are some: a cartridge trained alone keeps its manifest)
        settings["max_distractors"] = args.max_distractors
        inputs["distractors"] = [
            file_fingerprint(Path(d) / SAFETENSORS_WEIGHTS_NAME) for d in args.distractors
        ]
    return Stage(args.output_dir, CARTRIDGE_STAGE, settings, inputs)


def is_trained_cartridge(output_dir: str | Path) -> bool:
    """Whether ``output_dir`` holds a finished cartridge: its training stage is marked done (the marker is written
    after the adapter and the metadata). A cartridge saved outside that stage (composed, or by an older hfx) is
    finished when its metadata is there."""
    output_dir = Path(output_dir)
    stage = output_dir / f"{MANIFEST_PREFIX}{CARTRIDGE_STAGE}"
    if stage.with_suffix(".json").is_file():
        return stage.with_suffix(".done").is_file() and (output_dir / METADATA_FILE).is_file()
    return (output_dir / METADATA_FILE).is_file()


def read_metadata(output_dir: str | Path) -> dict:
    path = Path(output_dir) / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
