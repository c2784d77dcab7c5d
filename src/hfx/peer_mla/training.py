"""Pretraining PEER-MLA language models with transformers' Trainer, under accelerate.

    accelerate launch examples/peer_mla/pretrain.py --config examples/peer_mla/configs/pretrain_small.yaml
    hfx peer-mla pretrain --config examples/peer_mla/configs/pretrain_small.yaml --max_tokens 200000

One YAML holds three sections, all overridable on the command line (``trl.TrlParser``):

* :class:`ModelArguments`: a PeerMlaConfig YAML (``model_config``), field overrides, ``mlp: dense`` for the
  dense-FFN baseline with the same active parameters per token (:func:`dense_baseline_config`), and where and how
  it trains: ``device``, ``dtype`` (the mixed precision) and ``peer_kernel`` (on CUDA the PEER experts run the
  Triton kernel of ``hub_kernels/peer``, swapped in by ``kernels.kernelize``: :func:`kernelize_peer_experts`).
* :class:`hfx.peer_mla.data.DataArguments`: the streamed, interleaved, packed data mixture.
* :class:`PeerMlaTrainingArguments`: every ``TrainingArguments`` field, plus a token budget (``max_tokens``),
  expert monitoring (``expert_log_freq``, ``hot_expert_factor``) and FP8 (``fp8``, CUDA + torchao only).

The run folder (``output_dir``) ends up as a self-contained Hub model folder (code, config, safetensors,
tokenizer, card) with ``results.json`` (held-out perplexity, tokens, throughput), ``trainer_state.json`` (the loss
curve) and ``expert_usage/`` (histograms and hot experts). A run killed at any point resumes from its last
complete checkpoint when started again with the same command, continuing the same loss curve: the data stream is
seeded and the Trainer replays it up to the checkpoint's step. Resuming with a different model, data or batch
configuration is refused with the differences listed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hfx.artifacts import replace_pickled_training_args
from hfx.atomic import write_text_atomic
from hfx.checkpoints import (
    MarkCompleteCheckpoints,
    finished_state,
    last_complete_checkpoint,
    remove_checkpoints,
    use_checkpoint_protocol,
)
from hfx.models import DeviceArguments
from hfx.stages import Stage, StageMismatch

from .analysis import _GENERIC_CONFIG_KEYS, analyze_parameters, load_config, write_model_card
from .configuration_peer_mla import PeerMlaConfig
from .data import DataArguments
from .hub import PEER_KERNEL_REPO_ENV, peer_kernel_repository  # noqa: F401 - also importable from here

logger = logging.getLogger(__name__)

MLP_KINDS = ("peer", "dense")
PEER_KERNELS = ("auto", "triton", "pytorch")
RUN_CONFIG_NAME = "hfx_pretrain.json"
RESULTS_NAME = "results.json"
#: The stage (hfx.stages) of one pretraining run in its output folder.
PRETRAIN_STAGE = "peer-mla-pretrain"
EXPERT_USAGE_DIR = "expert_usage"
EXPERT_STATE_NAME = "expert_usage.safetensors"
# Config fields that do not change what is trained (bookkeeping, or filled in from the tokenizer identically).
_IGNORED_CONFIG_KEYS = _GENERIC_CONFIG_KEYS | {
    "_name_or_path",
    "use_cache",
    "attention_kernel",
    "mla_absorb",
    "peer_kernel_repo",
    "peer_kernel_revision",
}


# ----------------------------------------------------------------------------------------------------------------
# Arguments


@dataclass
class ModelArguments(DeviceArguments):
    """Model section of a pretraining config."""

    model_config: str = field(
        default="examples/peer_mla/configs/model_small.yaml",
        metadata={
            "help": "YAML/JSON of PeerMlaConfig fields, or a model directory whose config.json to use."
        },
    )
    model_overrides: dict | str | None = field(
        default=None,
        metadata={
            "help": "PeerMlaConfig fields to change, as a mapping (YAML) or JSON, e.g. "
            '\'{"product_key_dim": [128, 128], "peer_num_heads": 4}\'.'
        },
    )
    mlp: str = field(
        default="peer",
        metadata={
            "help": "'peer': the configured model; 'dense': the dense-FFN baseline, every PEER layer replaced by "
            "a SwiGLU MLP whose width gives the same active parameters per token."
        },
    )
    dtype: str = field(  # --device comes from DeviceArguments; here the dtype is the training's precision
        default="auto",
        metadata={
            "help": "Mixed precision of training (weights stay float32): float32, bfloat16 or float16; auto = "
            "bfloat16 on a GPU that supports it unless --bf16/--fp16 is set, float32 on the CPU."
        },
    )
    peer_kernel: str = field(
        default="auto",
        metadata={
            "help": "PEER expert sum: 'triton' = the Triton kernel hfx ships (hub_kernels/peer) swapped in by "
            "kernels.kernelize (CUDA; on the CPU only under TRITON_INTERPRET=1), 'pytorch' = the model's own "
            "PyTorch forward, 'auto' = triton on CUDA, pytorch elsewhere."
        },
    )

    def __post_init__(self) -> None:
        from hfx.models import DTYPES, resolve_device

        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp must be one of {MLP_KINDS}, got {self.mlp!r}.")
        if self.peer_kernel not in PEER_KERNELS:
            raise ValueError(f"peer_kernel must be one of {PEER_KERNELS}, got {self.peer_kernel!r}.")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of auto, {', '.join(DTYPES)}.")
        if self.device not in (None, "", "auto"):
            resolve_device(self.device)  # a device this machine lacks stops the command here, before any work
        if isinstance(self.model_overrides, str):
            try:
                self.model_overrides = (
                    json.loads(self.model_overrides) if self.model_overrides.strip() else None
                )
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"model_overrides is not valid JSON ({error}): {self.model_overrides!r}."
                ) from None
        if self.model_overrides is not None and not isinstance(self.model_overrides, dict):
            raise ValueError(
                f"model_overrides must be a mapping of PeerMlaConfig fields, got {self.model_overrides!r}."
            )


@dataclass
class PeerMlaTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with a token budget, expert monitoring, FP8, and small-LM pretraining defaults."""

    max_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Token budget: sets max_steps to ceil(max_tokens / tokens per optimizer step), where tokens "
            "per step = block_size x per-device batch x gradient accumulation x processes."
        },
    )
    expert_log_freq: int = field(
        default=50, metadata={"help": "Log expert-usage metrics and histograms every N steps (0: off)."}
    )
    hot_expert_factor: float = field(
        default=10.0,
        metadata={
            "help": "An expert is hot when it is retrieved more than this many times the uniform share."
        },
    )
    fp8: bool = field(
        default=False,
        metadata={
            "help": "Train the Linear layers in float8 with torchao (CUDA, compute capability >= 8.9); use with bf16."
        },
    )
    keep_checkpoints: bool = field(
        default=False,
        metadata={
            "help": "Keep checkpoint-* folders after a finished run (they exist to resume a killed one)."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Start over when OUTPUT_DIR holds a run made with other settings (without it: refused, naming "
            "them). The same settings return a finished run's results and resume an unfinished one."
        },
    )
    output_dir: str | None = field(default="outputs/peer-mla")
    learning_rate: float = field(default=1e-3)
    weight_decay: float = field(default=0.1)
    adam_beta2: float = field(default=0.95)
    lr_scheduler_type: str = field(default="cosine")
    warmup_steps: float = field(default=0.05)
    max_steps: int = field(default=1000)
    per_device_train_batch_size: int = field(default=8)
    per_device_eval_batch_size: int = field(default=8)
    logging_steps: float = field(default=10)
    eval_strategy: str = field(default="steps")
    eval_steps: float | None = field(default=100)
    save_strategy: str = field(default="steps")
    save_steps: float = field(default=100)
    save_total_limit: int | None = field(default=2)
    report_to: None | str | list[str] = field(default="none")
    include_num_input_tokens_seen: str | bool = field(default=True)
    remove_unused_columns: bool = field(default=False)

    def __post_init__(self):
        super().__post_init__()
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}.")
        if self.expert_log_freq < 0:
            raise ValueError(f"expert_log_freq must be >= 0, got {self.expert_log_freq}.")
        if self.hot_expert_factor <= 1:
            raise ValueError(f"hot_expert_factor must be above 1, got {self.hot_expert_factor}.")
        if self.fp8:
            check_fp8_available()


def check_fp8_available() -> None:
    """Raise ValueError unless float8 training can run here: a CUDA GPU of compute capability 8.9+ and torchao."""
    import importlib.util

    if not torch.cuda.is_available():
        raise ValueError(
            "fp8 training needs a CUDA GPU (compute capability >= 8.9); this machine has none. Drop --fp8."
        )
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        raise ValueError(
            f"fp8 training needs compute capability >= 8.9; this GPU has {capability[0]}.{capability[1]}."
        )
    if importlib.util.find_spec("torchao") is None:
        raise ValueError(
            "fp8 training uses torchao's float8 training; install torchao (pip install torchao)."
        )


# ----------------------------------------------------------------------------------------------------------------
# Model configuration


def _config_fields() -> set[str]:
    return set(inspect.signature(PeerMlaConfig.__init__).parameters) - {"self", "kwargs"}


def config_with(config: PeerMlaConfig, overrides: dict | None) -> PeerMlaConfig:
    """A copy of ``config`` with ``overrides`` applied (checked like a config file)."""
    known = _config_fields()
    values = {k: v for k, v in config.to_dict().items() if k in known}
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"model_overrides: unknown PeerMlaConfig field(s) {unknown}; known fields: {sorted(known)}."
        )
    if "num_experts" not in overrides:
        values.pop("num_experts", None)  # derived from product_key_dim, which an override may change
    values.update(overrides)
    try:
        return PeerMlaConfig(**values)
    except ValueError as error:
        raise ValueError(f"model_overrides {overrides}: {error}") from None


def dense_baseline_config(config: PeerMlaConfig) -> PeerMlaConfig:
    """The dense-FFN baseline of ``config``: no PEER layer, every MLP a SwiGLU of one width, chosen so that the
    active parameters per token equal ``config``'s (to within one unit of width)."""
    target = analyze_parameters(config).active
    if config.peer_layers is None or config.peer_layers == []:
        return config
    dense = config_with(config, {"peer_layers": None, "intermediate_size": 1})
    base = analyze_parameters(dense).active
    per_unit = analyze_parameters(config_with(dense, {"intermediate_size": 2})).active - base
    width = max(1, round(1 + (target - base) / per_unit))
    return config_with(dense, {"intermediate_size": width})


def build_config(model_args: ModelArguments, tokenizer=None) -> PeerMlaConfig:
    """The PeerMlaConfig to train: ``model_config`` + ``model_overrides``, its vocabulary and special tokens taken
    from the tokenizer (unless ``vocab_size`` is overridden, which must then hold the tokenizer), dense if asked."""
    config = load_config(model_args.model_config)
    overrides = dict(model_args.model_overrides or {})
    if tokenizer is not None:
        if "vocab_size" in overrides and overrides["vocab_size"] < len(tokenizer):
            raise ValueError(
                f"model_overrides vocab_size={overrides['vocab_size']} is smaller than the tokenizer "
                f"({len(tokenizer)} tokens)."
            )
        overrides.setdefault("vocab_size", len(tokenizer))
        overrides.update(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    config = config_with(config, overrides)
    return dense_baseline_config(config) if model_args.mlp == "dense" else config


def comparable_config(config: PeerMlaConfig | dict) -> dict:
    values = config.to_dict() if isinstance(config, PeerMlaConfig) else dict(config)
    return {k: v for k, v in values.items() if k not in _IGNORED_CONFIG_KEYS}


# ----------------------------------------------------------------------------------------------------------------
# Device, precision and the PEER kernel


def mixed_precision_flags(dtype: str, device: torch.device, bf16: bool, fp16: bool) -> dict[str, bool]:
    """The ``bf16``/``fp16`` TrainingArguments flags that ``--dtype`` asks for on ``device`` (only those to change).

    "auto": bfloat16 autocast on a GPU that supports it, unless --bf16 or --fp16 already chose; float32 on the
    CPU. An explicit dtype sets its flag and refuses a contradicting one."""
    from hfx.models import resolve_dtype

    resolved = resolve_dtype(dtype, device)  # refuses bf16 on a device without it
    if dtype == "auto":
        return {"bf16": True} if resolved == torch.bfloat16 and not (bf16 or fp16) else {}
    wanted = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(resolved)
    for flag, value in (("bf16", bf16), ("fp16", fp16)):
        if value and flag != wanted:
            raise ValueError(f"--dtype {dtype} contradicts --{flag} true: set only one of them.")
    return {wanted: True} if wanted and not {"bf16": bf16, "fp16": fp16}[wanted] else {}


def fit_to_device(
    model_args: ModelArguments, training_args: PeerMlaTrainingArguments
) -> PeerMlaTrainingArguments:
    """``training_args`` set for ``--device`` and ``--dtype`` (rebuilt, so that Trainer's device setup and mixed
    precision follow them): cpu -> ``use_cpu``; a device this machine or process cannot train on -> ValueError.
    Runs before any work."""
    from hfx.models import resolve_device, training_device

    changes: dict[str, bool] = {}
    if model_args.device in (None, "", "auto"):
        device = training_args.device  # accelerate's device of this process, as Trainer will use it
    else:
        device = resolve_device(model_args.device)
        if device.type == "cpu" and not training_args.use_cpu:
            changes["use_cpu"] = True
        elif device.type != "cpu" and training_args.use_cpu:
            raise ValueError(
                f"--device {model_args.device} contradicts --use_cpu true: set only one of them."
            )
    changes.update(mixed_precision_flags(model_args.dtype, device, training_args.bf16, training_args.fp16))
    if changes:
        training_args = dataclasses.replace(training_args, **changes)
    training_device(model_args.device, training_args)  # the device Trainer will use must be the one asked for
    return training_args


def choose_peer_kernel(choice: str, device: torch.device) -> str:
    """What computes the PEER expert sum for ``--peer_kernel choice`` on ``device``: "triton" (the kernel of
    hub_kernels/peer, swapped in by :func:`kernelize_peer_experts`) or "pytorch" (the model's own forward, the
    memory-light CPU path). An explicit "triton" that cannot run raises."""
    if choice not in PEER_KERNELS:
        raise ValueError(f"peer_kernel must be one of {PEER_KERNELS}, got {choice!r}.")
    if choice == "pytorch":
        return "pytorch"
    has_triton = importlib.util.find_spec("triton") is not None
    on_cuda = device.type == "cuda" and torch.version.hip is None  # hub_kernels/peer has CUDA and CPU builds
    if choice == "auto":
        if on_cuda and not has_triton:
            logger.warning("--peer_kernel auto: triton is not installed, so the PEER experts run on PyTorch.")
        return "triton" if on_cuda and has_triton else "pytorch"
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if not (on_cuda or interpreted):
        raise ValueError(
            f"--peer_kernel triton runs on a CUDA GPU, and this run is on {device}. Use --peer_kernel auto or "
            "pytorch (the experts' own PyTorch forward), or set TRITON_INTERPRET=1 to run the kernel on the CPU "
            "under Triton's interpreter (slow: for tests)."
        )
    if not has_triton:
        raise ValueError("--peer_kernel triton needs the triton package (pip install triton).")
    return "triton"


def kernelize_peer_experts(model: torch.nn.Module, device: torch.device | str, repo_path=None) -> int:
    """Swap the forward of every ``PeerExperts`` of ``model`` for the Triton kernel of the local PEER kernel
    repository (:func:`hfx.peer_mla.hub.peer_kernel_repository`: ``repo_path``, else ``$HFX_PEER_KERNEL_REPO``, else
    the copy shipped with hfx), with ``kernels.kernelize`` in training mode, which keeps its backward; returns how
    many were swapped.

    On the CPU the kernel runs only under ``TRITON_INTERPRET=1`` (set before the kernel is first loaded)."""
    from kernels import LocalLayerRepository, Mode

    from .modeling_peer_mla import PEER_KERNEL_LAYER, kernelize_experts

    repo = LocalLayerRepository(repo_path=peer_kernel_repository(repo_path), layer_name=PEER_KERNEL_LAYER)
    return kernelize_experts(model, repo, device, mode=Mode.TRAINING)


# ----------------------------------------------------------------------------------------------------------------
# Run configuration, resuming


def run_config(
    config: PeerMlaConfig, data_args: DataArguments, training_args: TrainingArguments, tokens_per_step: int
) -> dict:
    """What a checkpoint must share with the current command to be resumed by it (JSON-normalised)."""
    values = {
        "model": comparable_config(config),
        "data": {
            "mixture": list(data_args.mixture),
            "tokenizer_name_or_path": data_args.tokenizer_name_or_path,
            "tokenizer_vocab_size": data_args.tokenizer_vocab_size,
            "block_size": data_args.block_size,
            "stopping_strategy": data_args.stopping_strategy,
            "mixture_seed": data_args.mixture_seed,
            "shuffle_buffer_size": data_args.shuffle_buffer_size,
            "eval_fraction": data_args.eval_fraction,
            "eval_mixture": data_args.eval_mixture,
            "tokenizer_mixture": data_args.tokenizer_mixture,
        },
        "training": {"tokens_per_step": tokens_per_step, "seed": training_args.seed},
    }
    return json.loads(json.dumps(values))


def _differences(saved, current, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        lines = []
        for key in sorted(set(saved) | set(current)):
            lines += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return lines
    if saved != current and not (isinstance(saved, list | tuple) and list(saved) == list(current or [])):
        return [f"{prefix.rstrip('.')}: {saved!r} in the checkpoint, {current!r} now"]
    return []


def check_resume_compatible(checkpoint: str | os.PathLike, expected: dict) -> None:
    """Raise ValueError, listing the differences, when ``checkpoint`` was written by another configuration."""
    checkpoint = Path(checkpoint)
    saved_path = checkpoint / RUN_CONFIG_NAME
    if saved_path.is_file():
        saved = json.loads(saved_path.read_text())
    elif (
        checkpoint / "config.json"
    ).is_file():  # a checkpoint of a plain Trainer run: compare the model only
        saved = {"model": comparable_config(json.loads((checkpoint / "config.json").read_text()))}
        expected = {"model": expected["model"]}
    else:
        raise ValueError(f"{checkpoint}: not a checkpoint (no {RUN_CONFIG_NAME} and no config.json).")
    differences = _differences(saved, expected)
    if differences:
        raise ValueError(
            f"Cannot resume from {checkpoint}: it was trained with another configuration.\n  "
            + "\n  ".join(differences)
            + "\nResume with the configuration it was started with, or choose a new --output_dir."
        )


# ----------------------------------------------------------------------------------------------------------------
# Expert monitoring


def expert_usage_metrics(counts: dict[int, torch.Tensor], hot_factor: float) -> tuple[dict, dict[int, list]]:
    """Per-layer load statistics of one window of retrieval counts.

    ``experts/layer_{i}/used_fraction``: share of experts retrieved at least once; ``max_load``: the busiest
    expert's count over the mean count; ``entropy``: entropy of the retrieval distribution over log(num_experts)
    (1 = uniform); ``hot_experts``: experts above ``hot_factor`` times the mean. Returns (metrics, hot) with
    ``hot[layer]`` the hot experts as (expert id, load over mean), busiest first, at most 32.
    """
    metrics, hot = {}, {}
    for layer, count in sorted(counts.items()):
        count = count.double()
        total = float(count.sum())
        if total == 0:
            continue
        mean = total / count.numel()
        probabilities = count[count > 0] / total
        entropy = float(-(probabilities * probabilities.log()).sum()) / math.log(count.numel())
        load = count / mean
        hot_ids = torch.nonzero(load > hot_factor).flatten()
        order = load[hot_ids].argsort(descending=True)[:32]
        hot[layer] = [(int(hot_ids[i]), round(float(load[hot_ids[i]]), 2)) for i in order]
        prefix = f"experts/layer_{layer}"
        metrics[f"{prefix}/used_fraction"] = float((count > 0).double().mean())
        metrics[f"{prefix}/max_load"] = float(load.max())
        metrics[f"{prefix}/entropy"] = entropy
        metrics[f"{prefix}/hot_experts"] = len(hot_ids)
    return metrics, hot


def plot_expert_usage(
    counts: dict[int, torch.Tensor], hot_factor: float, step: int, path: Path, window: int | None = None
) -> Path:
    """One histogram per PEER layer: how many experts were retrieved how often, hot threshold marked."""
    from matplotlib.figure import Figure

    from hfx.artifacts import save_figure_atomic

    layers = sorted(counts)
    fig = Figure(figsize=(4 * len(layers), 3.2))
    axes = fig.subplots(1, len(layers), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        count = counts[layer].double()
        mean = float(count.mean())
        load = (count / mean).numpy() if mean > 0 else count.numpy()
        ax.hist(load, bins=60, color="#4C72B0", log=True)
        ax.axvline(hot_factor, color="#C44E52", linestyle="--", label=f"hot (> {hot_factor:g}x mean)")
        ax.set_title(f"layer {layer}: {int((count > 0).sum())}/{count.numel()} used")
        ax.set_xlabel("retrievals / mean retrievals")
        ax.set_ylabel("experts")
        ax.legend(fontsize=7)
    span = f"the {window} steps up to step {step}" if window else f"steps up to {step}"
    fig.suptitle(f"expert usage over {span}")
    fig.tight_layout()
    saved = save_figure_atomic(fig, path)
    return saved


class ExpertUsageCallback(TrainerCallback):
    """Every ``log_freq`` steps: per-layer expert-usage metrics (logged through the Trainer to every reporter),
    a histogram PNG in ``output_dir/expert_usage/`` (also sent as an image to TensorBoard / W&B / Trackio when
    they report), and the hot experts appended to ``expert_usage/hot_experts.jsonl``.

    Counts are summed over processes. ``experts/layer_{i}/ever_used_fraction`` covers the whole run and is
    carried across resumes in each checkpoint's ``expert_usage.safetensors``. Evaluation forwards are not counted.
    """

    def __init__(self, trainer: Trainer, log_freq: int, hot_factor: float):
        self.trainer = trainer
        self.log_freq = log_freq
        self.hot_factor = hot_factor
        self.ever_used: dict[int, torch.Tensor] = {}

    @property
    def folder(self) -> Path:
        return Path(self.trainer.args.output_dir) / EXPERT_USAGE_DIR

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = self.trainer.accelerator.unwrap_model(model if model is not None else self.trainer.model)
        model.track_expert_usage(True)
        model.reset_expert_usage()
        self.ever_used = {
            i: torch.zeros(c.numel(), dtype=torch.bool) for i, c in model.expert_usage().counts.items()
        }
        if state.global_step > 0:
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / EXPERT_STATE_NAME
            if saved.is_file():
                from safetensors.torch import load_file

                for name, mask in load_file(saved).items():
                    layer = int(name.rsplit("_", 1)[1])
                    if layer in self.ever_used and mask.numel() == self.ever_used[layer].numel():
                        self.ever_used[layer] = mask.bool()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.log_freq:
            return
        model = self.trainer.accelerator.unwrap_model(model if model is not None else self.trainer.model)
        counts = model.expert_usage().counts
        model.reset_expert_usage()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            layers = sorted(counts)
            stacked = torch.stack([counts[i] for i in layers])
            torch.distributed.all_reduce(stacked)
            counts = dict(zip(layers, stacked, strict=True))
        counts = {i: c.cpu() for i, c in counts.items()}
        metrics, hot = expert_usage_metrics(counts, self.hot_factor)
        for layer, count in counts.items():
            self.ever_used[layer] |= count > 0
            metrics[f"experts/layer_{layer}/ever_used_fraction"] = float(
                self.ever_used[layer].double().mean()
            )
        should_log = control.should_log  # Trainer.log clears it; the step's own loss log must still happen
        self.trainer.log(metrics)
        control.should_log = self.trainer.control.should_log = should_log
        if state.is_world_process_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            image = plot_expert_usage(
                counts,
                self.hot_factor,
                state.global_step,
                self.folder / f"step-{state.global_step:07d}.png",
                window=self.log_freq,
            )
            with open(self.folder / "hot_experts.jsonl", "a", encoding="utf-8") as out:
                out.write(
                    json.dumps({"step": state.global_step, "hot": {str(k): v for k, v in hot.items()}}) + "\n"
                )
            self._send_image(image, state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.ever_used:
            return
        from hfx.artifacts import save_safetensors_atomic

        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            save_safetensors_atomic(
                {f"ever_used_{i}": m.to(torch.uint8) for i, m in self.ever_used.items()},
                checkpoint / EXPERT_STATE_NAME,
            )

    def _send_image(self, image: Path, step: int) -> None:
        from transformers.integrations import TensorBoardCallback, TrackioCallback, WandbCallback

        for callback in self.trainer.callback_handler.callbacks:
            try:
                if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                    import numpy as np
                    from PIL import Image

                    pixels = np.asarray(Image.open(image).convert("RGB"))
                    callback.tb_writer.add_image("experts/usage_histogram", pixels, step, dataformats="HWC")
                    callback.tb_writer.flush()
                elif isinstance(callback, WandbCallback):
                    import wandb

                    if wandb.run is not None:  # the run the callback started
                        wandb.log(
                            {"experts/usage_histogram": wandb.Image(str(image)), "train/global_step": step}
                        )
                elif isinstance(callback, TrackioCallback):
                    import trackio  # logs to the run the callback started

                    trackio.log(
                        {"experts/usage_histogram": trackio.Image(str(image)), "train/global_step": step}
                    )
            except Exception as error:  # a reporter's failure must not stop training
                logger.warning(
                    "Could not send the expert-usage image to %s: %s", type(callback).__name__, error
                )


# ----------------------------------------------------------------------------------------------------------------
# Trainer


class PeerMlaTrainer(Trainer):
    """Trainer that logs perplexity next to every loss, keeps evaluation out of the expert-usage counts, and
    writes the run configuration into every checkpoint (so that resuming checks it)."""

    def __init__(self, *args, run_config: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_config = run_config
        use_checkpoint_protocol(self)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for key in ("loss", "eval_loss"):
            if key in logs:
                name = "perplexity" if key == "loss" else "eval_perplexity"
                logs[name] = math.exp(min(float(logs[key]), 50.0))
        super().log(logs, start_time)

    def evaluate(self, *args, **kwargs):
        layers = list(self.accelerator.unwrap_model(self.model).model.peer_layers().values())
        saved = [layer.expert_counts for layer in layers]
        for layer in layers:
            layer.expert_counts = None
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            for layer, counts in zip(layers, saved, strict=True):
                layer.expert_counts = counts

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            replace_pickled_training_args(output_dir, self.args)
            if self.run_config is not None:
                write_text_atomic(
                    Path(output_dir) / RUN_CONFIG_NAME, json.dumps(self.run_config, indent=2) + "\n"
                )


def convert_to_fp8(model: torch.nn.Module) -> int:
    """Swap the model's float8-friendly Linear layers (sizes divisible by 16; not the output head) for torchao's
    Float8Linear; returns how many were converted."""
    from torchao.float8 import convert_to_float8_training

    def keep(module: torch.nn.Module, fqn: str) -> bool:
        return (
            isinstance(module, torch.nn.Linear)
            and "lm_head" not in fqn
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
        )

    convert_to_float8_training(model, module_filter_fn=keep)
    return sum(type(m).__name__ == "Float8Linear" for m in model.modules())


# ----------------------------------------------------------------------------------------------------------------
# The run


def tokens_per_step(data_args: DataArguments, training_args: TrainingArguments) -> int:
    return (
        data_args.block_size
        * training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )


def pretrain(
    model_args: ModelArguments, data_args: DataArguments, training_args: PeerMlaTrainingArguments
) -> dict:
    """Train (or resume) one run; returns its results (also in ``output_dir/results.json``)."""
    from datasets import Dataset
    from transformers import default_data_collator, set_seed

    from .data import build_datasets, mixture_tokenizer
    from .modeling_peer_mla import PeerMlaForCausalLM

    # Device, precision and kernel are settled (or refused) before anything is read or written.
    training_args = fit_to_device(model_args, training_args)
    device = training_args.device
    peer_kernel = choose_peer_kernel(model_args.peer_kernel, device)
    kernel_repo = peer_kernel_repository() if peer_kernel == "triton" else None
    precision = {"bf16": "bfloat16", "fp16": "float16"}.get(training_args.mixed_precision, "float32")
    where = f"{device}, " + ("float32" if precision == "float32" else f"{precision} mixed precision")

    output_dir = Path(training_args.output_dir)
    with training_args.main_process_first(desc="tokenizer"):
        tokenizer = mixture_tokenizer(data_args.tokenizer_name_or_path, data_args)
    config = build_config(model_args, tokenizer)
    step_tokens = tokens_per_step(data_args, training_args)
    if training_args.max_tokens is not None:
        training_args.max_steps = math.ceil(training_args.max_tokens / step_tokens)
    expected = run_config(config, data_args, training_args, step_tokens)

    # The run's folder is a stage (hfx.stages): the run configuration and the step count make its result.
    stage = Stage(output_dir, PRETRAIN_STAGE, {**expected, "max_steps": training_args.max_steps})
    with training_args.main_process_first(
        desc="output folder"
    ):  # the main process prepares it, then the others
        if training_args.process_index == 0:
            status = _begin_pretrain_stage(stage, output_dir, training_args)
        else:
            status = stage.status()
    if status == "done":  # finished with these settings: its results stand (a kill may have left checkpoints)
        results = read_results(output_dir)
        if training_args.process_index == 0 and not training_args.keep_checkpoints:
            remove_checkpoints(output_dir)
        return results
    checkpoint = training_args.resume_from_checkpoint or last_complete_checkpoint(output_dir)
    if checkpoint:
        check_resume_compatible(checkpoint, expected)
        logger.info("Resuming from %s", checkpoint)

    report = analyze_parameters(config)
    logger.info(
        "%s model: %s parameters, %s active per token; %d steps of %d tokens",
        model_args.mlp,
        f"{report.total:,}",
        f"{report.active:,}",
        training_args.max_steps,
        step_tokens,
    )
    set_seed(training_args.seed)
    # Killed after its last step: the model is that checkpoint's.
    done = finished_state(checkpoint, training_args.max_steps)
    model = (
        PeerMlaForCausalLM.from_pretrained(checkpoint, config=config) if done else PeerMlaForCausalLM(config)
    )
    if training_args.fp8:
        converted = convert_to_fp8(model)
        logger.info("fp8: %d Linear layers train in float8", converted)
    if not model.model.peer_layers():
        peer_kernel = None
        logger.info("Training on %s; no PEER layers", where)
    elif peer_kernel == "triton":
        swapped = kernelize_peer_experts(model, device, kernel_repo)
        logger.info(
            "Training on %s; PEER experts: Triton kernel of %s (%d layers)", where, kernel_repo, swapped
        )
    else:
        logger.info(
            "Training on %s; PEER experts: PyTorch forward (--peer_kernel %s)", where, model_args.peer_kernel
        )

    train_dataset, eval_stream = build_datasets(data_args, tokenizer)
    eval_rows = list(eval_stream)
    if not eval_rows and training_args.eval_strategy != "no":
        raise ValueError(
            f"The held-out split is empty (eval_fraction={data_args.eval_fraction}, block_size={data_args.block_size}): "
            "raise eval_fraction, lower block_size, or set eval_strategy: 'no'."
        )
    eval_dataset = Dataset.from_list(eval_rows) if eval_rows else None

    trainer = PeerMlaTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        run_config=expected,
    )
    if training_args.expert_log_freq and config.num_experts:
        # The expert state goes into each checkpoint before the checkpoint is marked complete.
        marker = trainer.pop_callback(MarkCompleteCheckpoints)
        trainer.add_callback(
            ExpertUsageCallback(trainer, training_args.expert_log_freq, training_args.hot_expert_factor)
        )
        trainer.add_callback(marker)

    if done is not None:
        logger.info("Training had finished in %s; restoring it", checkpoint)
        trainer.state = done
        train_loss, train_metrics = None, {}
    else:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_loss, train_metrics = result.training_loss, result.metrics
    eval_metrics = {}
    if eval_dataset is not None:  # the last step's evaluation when there was one, else a final evaluation
        final = [
            e
            for e in trainer.state.log_history
            if "eval_loss" in e and e["step"] == trainer.state.global_step
        ]
        eval_metrics = final[-1] if final else trainer.evaluate()
    trainer.save_model(str(output_dir))
    trainer.save_state()
    trainer.accelerator.wait_for_everyone()

    tokens_seen = trainer.state.num_input_tokens_seen or trainer.state.global_step * step_tokens
    results = {
        "mlp": model_args.mlp,
        "total_params": report.total,
        "active_params": report.active,
        "num_experts": config.num_experts,
        "steps": trainer.state.global_step,
        "tokens": int(tokens_seen),
        "tokens_per_step": step_tokens,
        "num_processes": training_args.world_size,
        "device": device.type,
        "precision": precision,
        "peer_kernel": peer_kernel,
        "train_loss": train_loss,
        "eval_loss": eval_metrics.get("eval_loss"),
        "eval_perplexity": eval_metrics.get("eval_perplexity"),
        "eval_tokens": len(eval_rows) * data_args.block_size,
        "train_runtime_s": train_metrics.get("train_runtime"),
        "train_tokens_per_second": (
            (tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0))
            / train_metrics["train_runtime"]
            if train_metrics.get("train_runtime")
            else None
        ),
    }
    if trainer.is_world_process_zero():
        training = (
            f"Pretrained with `hfx peer-mla pretrain` on {results['tokens']:,} tokens of "
            f"{', '.join(data_args.mixture)} (block size {data_args.block_size}, {step_tokens:,} tokens per step, "
            f"{results['steps']} steps, {where}"
            + (f", PEER experts on {peer_kernel}" if peer_kernel else "")
            + f"); held-out perplexity {results['eval_perplexity']}."
        )
        write_model_card(
            output_dir,
            config,
            report,
            training=training,
            results={k: format_value(v) for k, v in results.items() if v is not None},
        )
        # The results, then the stage's marker, then the checkpoints go: a kill while they go leaves a finished
        # run whose results a rerun returns as they are.
        write_text_atomic(output_dir / RESULTS_NAME, json.dumps(results, indent=2) + "\n")
        stage.finish()
        if not training_args.keep_checkpoints:
            remove_checkpoints(output_dir)
    trainer.accelerator.wait_for_everyone()
    return results


def _begin_pretrain_stage(stage: Stage, output_dir: Path, training_args) -> str:
    """Check and prepare the run's folder. More steps than a finished run took continue it from a kept checkpoint
    (--keep_checkpoints true); any other change of settings is refused, naming it (--overwrite starts over)."""
    try:
        return stage.begin(overwrite=training_args.overwrite)
    except StageMismatch:
        changed = stage.differences()
        longer = changed and all(line.startswith("settings.max_steps:") for line in changed)
        if longer and last_complete_checkpoint(output_dir) is not None:
            logger.info("Training %s further: %s", output_dir, changed[0])
            stage.restate()
            return "resume"
        if longer:
            raise StageMismatch(
                f"{output_dir} holds a finished run ({changed[0]}) and no checkpoint to continue from; choose "
                "another --output_dir, pass --overwrite to start over (or train longer from a kept checkpoint: "
                "--keep_checkpoints true)."
            ) from None
        raise


def format_value(value) -> str:
    """A result for a table or card: 4 significant digits, thousands separators, "" for None."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def read_results(output_dir: str | os.PathLike) -> dict | None:
    """A finished run's results.json, or None when the run has not finished."""
    path = Path(output_dir) / RESULTS_NAME
    return json.loads(path.read_text()) if path.is_file() else None
