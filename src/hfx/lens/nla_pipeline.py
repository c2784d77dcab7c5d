"""`hfx lens sft` and `hfx lens grpo`: the natural-language autoencoder's two training phases (see `hfx.lens.nla`),
each a stage (hfx.stages) in its output folder, resumable from its checkpoints.

An autoencoder folder holds ``verbalizer/`` (an `ActivationVerbalizer` with its tokenizer, loadable with
`AutoModelForCausalLM` once hfx is imported) and ``reconstructor/`` (a `ConsistencyLens` read through
`ConsistencyLens.read`); `hfx lens eval --lens FOLDER` evaluates it like a lens.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from trl import GRPOConfig, SFTConfig

from hfx import models

from .data import DUMP_STAGE, load_activations

logger = logging.getLogger(__name__)

#: The stages (hfx.stages) of the two phases in their folders.
SFT_STAGE = "lens-sft"
GRPO_STAGE = "lens-grpo"
#: SFT's record of the reconstructor reading the held-out examples' own targets (`held_out_target_fit`).
TARGET_FIT = "target_fit.json"
#: Arguments that do not change what a phase makes.
NOT_SETTINGS = ("activations_dir", "sft_dir", "device", "overwrite", "fve_every", "fve_examples")
#: GRPO's own arguments that change the verbaliser (beside hfx.stages.TRAINER_SETTINGS).
GRPO_SETTINGS = (
    "beta",
    "num_generations",
    "max_completion_length",
    "temperature",
    "loss_type",
    "scale_rewards",
    "epsilon",
    "num_iterations",
)


_MIXED_PRECISION = {
    "help": "bf16 mixed precision (off by default: the weights train in --dtype, as every hfx trainer's do)"
}


@dataclass
class VerbalizerSFTConfig(SFTConfig):
    """TRL's SFTConfig with hfx's default of no mixed precision (the weights' dtype is `--dtype`)."""

    bf16: bool | None = field(default=False, metadata=_MIXED_PRECISION)


@dataclass
class VerbalizerGRPOConfig(GRPOConfig):
    """TRL's GRPOConfig with hfx's default of no mixed precision (the weights' dtype is `--dtype`)."""

    bf16: bool | None = field(default=False, metadata=_MIXED_PRECISION)


@dataclass
class NLAArguments(models.DeviceArguments):
    """The autoencoder and its frozen model; `--dtype` is that of both."""

    activations_dir: str = field(
        default="outputs/lens-activations", metadata={"help": "`hfx lens dump` output"}
    )
    model_name_or_path: str = field(default="embedded", metadata={"help": "the frozen model (as dumped)"})
    explanation_length: int = field(
        default=8, metadata={"help": "tokens of an SFT target, and the most a GRPO explanation may have"}
    )
    target: str = field(
        default="continuation",
        metadata={
            "help": "SFT targets: continuation (the base model's greedy next tokens), window (the last "
            "--context_tokens of the context, then the continuation), top_predictions (its most likely next tokens "
            "at the position) or context (the last tokens of the context: the copying baseline)"
        },
    )
    context_tokens: int = field(
        default=2, metadata={"help": "SFT, window targets: how many of their tokens end the context"}
    )
    instruction: str = field(
        default="", metadata={"help": "text after the activation in the verbaliser's prompt"}
    )
    reconstructor_learning_rate: float = field(
        default=1e-4, metadata={"help": "SFT: learning rate of the reconstructor's regression"}
    )
    reconstructor_epochs: float = field(
        default=1.0, metadata={"help": "SFT: epochs of the reconstructor's regression"}
    )
    reconstructor_mse_weight: float = field(
        default=1.0,
        metadata={
            "help": "SFT: weight of the squared error over the activations' variance (1 - FVE) beside the cosine "
            "loss 2 (1 - cos), which leaves the reconstruction's norm free; 0: the cosine alone, as the anchor"
        },
    )
    reconstructor_empty_fraction: float = field(
        default=0.05,
        metadata={
            "help": "SFT: extra share of the reconstructor's examples with an empty explanation (each with a "
            "random activation), so that what it answers when told nothing is a fair empty-explanation baseline"
        },
    )
    sft_dir: str = field(
        default="outputs/lens-sft", metadata={"help": "GRPO: the `hfx lens sft` folder it starts from"}
    )
    kl_reward_weight: float = field(
        default=0.0,
        metadata={
            "help": "GRPO: reward = cosine - this x KL of the base model's next-token distribution with the "
            "reconstruction patched in"
        },
    )
    length_penalty: float = field(
        default=0.1,
        metadata={"help": "GRPO: weight of the length penalty (minus the explanation's length / the most)"},
    )
    grpo_reconstructor_learning_rate: float = field(
        default=0.0,
        metadata={
            "help": "GRPO: learning rate of the reconstructor trained beside the verbaliser, as the anchor trains "
            "both: one AdamW step of the SFT regression on each batch of sampled explanations, after scoring it; "
            "0: the reconstructor stays as SFT fitted it"
        },
    )
    copy_penalty: float = field(
        default=0.0,
        metadata={
            "help": "GRPO: weight of the copy penalty (minus the share of the explanation's tokens found among "
            "the last 16 tokens of the context)"
        },
    )
    eval_examples: int = field(
        default=256, metadata={"help": "held-out examples (the last ones), never trained on"}
    )
    fve_every: int = field(
        default=50,
        metadata={
            "help": "log the held-out FVE every n steps (and at the end) into trainer_state.json; 0: at the end"
        },
    )
    fve_examples: int = field(
        default=64, metadata={"help": "held-out activations the logged FVE is measured on"}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "start over when the output folder holds other settings"}
    )


def _settings(args: NLAArguments, training_args, own: tuple[str, ...] = ()) -> dict:
    from hfx.stages import trainer_settings

    return {
        "autoencoder": {f.name: getattr(args, f.name) for f in fields(args) if f.name not in NOT_SETTINGS},
        "training": trainer_settings(training_args, own),
    }


def _begin(stage, overwrite: bool) -> str:
    from accelerate import PartialState

    state = PartialState()
    with state.main_process_first():
        return stage.begin(overwrite=overwrite) if state.is_main_process else stage.status()


def _train_split(args: NLAArguments):
    from .pipeline import _split

    return _split(load_activations(args.activations_dir), args.eval_examples)[0]


def _train_to_the_end(trainer, model, model_class, folder: Path) -> None:
    """Train (resuming from the last complete checkpoint, or restoring a run that had finished) and save the model
    and trainer_state.json (the loss and held-out FVE curves) into `folder`, its arguments as JSON."""
    from hfx.artifacts import replace_pickled_training_args
    from hfx.checkpoints import train_or_restore, use_checkpoint_protocol

    use_checkpoint_protocol(trainer)
    train_or_restore(
        trainer,
        lambda checkpoint: model.load_state_dict(
            model_class.from_pretrained(checkpoint, dtype=model.dtype).state_dict()
        ),
    )
    trainer.save_model(str(folder))
    trainer.save_state()
    if trainer.is_world_process_zero():
        replace_pickled_training_args(folder, trainer.args)


def _phase_args(training_args, output_dir: Path):
    """The caller's training arguments for one part of a phase, writing into its own folder."""
    phase = copy.copy(training_args)
    phase.output_dir = str(output_dir)
    return phase


def write_autoencoder_card(folder: str | Path, phase: str, target: str | None = None, results=None) -> None:
    """Render model_cards/autoencoder_card.md into an autoencoder folder (with its evaluation when there is one)."""
    from hfx.hub import render_card
    from hfx.stages import stage_manifest

    from .modeling_lens import ConsistencyLens

    config = ConsistencyLens.config_class.from_pretrained(Path(folder) / "reconstructor")
    if target is None and (manifest := stage_manifest(folder, SFT_STAGE)) is not None:
        target = manifest["settings"]["autoencoder"]["target"]
    render_card(
        "autoencoder_card.md",
        Path(folder) / "README.md",
        card_data={"library_name": "transformers", "tags": ["hfx", "natural-language-autoencoder", "trl"]},
        config=config,
        phase=phase,
        target=target,
        results=results,
    )


def run_sft(args: NLAArguments, sft_config) -> Path:
    """SFT warm start: write the targets, fit the reconstructor to read them (ReconstructorTrainer), train the
    verbaliser to write them (TRL's SFTTrainer), logging the held-out FVE on the way; a finished folder of the
    same settings is reused."""
    import datasets
    from accelerate import PartialState
    from trl import SFTTrainer

    from hfx.artifacts import write_parquet_atomic
    from hfx.atomic import write_text_atomic
    from hfx.checkpoints import remove_checkpoints
    from hfx.stages import Stage, stage_fingerprint

    from . import nla
    from .modeling_lens import ConsistencyLens
    from .modeling_verbalizer import ActivationVerbalizer

    if args.target not in nla.TARGET_KINDS:
        raise ValueError(f"--target must be one of {nla.TARGET_KINDS}, got {args.target!r}.")
    out = Path(sft_config.output_dir)
    dump = stage_fingerprint(args.activations_dir, DUMP_STAGE)
    if dump is None:
        raise FileNotFoundError(
            f"{args.activations_dir}: no finished activation dump; run `hfx lens dump` to the end first."
        )
    stage = Stage(out, SFT_STAGE, _settings(args, sft_config), {"activations": dump})
    if _begin(stage, args.overwrite) == "done":
        return out
    device = models.training_device(args.device, sft_config)
    base, tokenizer = models.load_causal_lm(args.model_name_or_path, device=device, dtype=args.dtype)
    train = _train_split(args)
    layer = train[0]["layer"]
    activations = torch.tensor(train["activation"])

    verbalizer, processor = nla.build_verbalizer(
        base,
        tokenizer,
        layer,
        activation_norm=float(activations.norm(dim=-1).mean()),
        base_model_name_or_path=models.model_id(args.model_name_or_path),
    )
    stop_ids = nla.stop_ids_of(verbalizer, processor)
    targets_path = out / "targets.parquet"
    with PartialState().main_process_first():  # the main process writes them, the others read them
        if targets_path.is_file():
            targets = datasets.Dataset.from_parquet(str(targets_path))["target_ids"]
        else:
            logger.info(
                "Writing %d %s targets of %d tokens", len(train), args.target, args.explanation_length
            )
            targets = _targets(args, train, base, stop_ids)
            features = datasets.Features({"target_ids": datasets.Sequence(datasets.Value("int32"))})
            write_parquet_atomic([{"target_ids": t} for t in targets], features, targets_path)

    # the reconstructor, fitted first to read the targets (it needs nothing from the verbaliser)
    reconstructor = nla.build_reconstructor(
        base, layer, args.explanation_length, models.model_id(args.model_name_or_path)
    )
    reconstructor.config.max_output_norm = output_norm_cap(activations)
    reconstructor_trainer = _reconstructor_trainer(
        reconstructor,
        sft_config,
        out / "reconstructor",
        args,
        nla.reconstructor_examples(
            targets, activations.tolist(), args.reconstructor_empty_fraction, sft_config.seed
        ),
        nla.ReconstructorCollator(stop_ids, processor.tokenizer.pad_token_id),
        activations.mean(0),
    )
    _train_to_the_end(reconstructor_trainer, reconstructor, ConsistencyLens, out / "reconstructor")
    reconstructor.eval()
    fit_path = out / TARGET_FIT
    if PartialState().is_main_process and not fit_path.is_file():
        fit = held_out_target_fit(args, base, reconstructor, stop_ids, processor.tokenizer.pad_token_id)
        write_text_atomic(fit_path, json.dumps(fit, indent=2) + "\n")
        logger.info("The reconstructor reading the held-out %s targets: %s", args.target, fit)

    # the verbaliser, with the held-out FVE on the way
    verbalizer_dir = out / "verbalizer"
    examples = nla.sft_examples(processor, activations.tolist(), targets, args.instruction)
    phase = _phase_args(sft_config, verbalizer_dir)
    phase.remove_unused_columns = False
    phase.dataset_kwargs = {**(phase.dataset_kwargs or {}), "skip_prepare_dataset": True}
    trainer = SFTTrainer(
        model=verbalizer,
        args=phase,
        train_dataset=examples,
        processing_class=processor.tokenizer,
        data_collator=nla.ActivationCollator(processor.tokenizer.pad_token_id),
        callbacks=[_fve_callback(args, processor, reconstructor, activations)],
    )
    _train_to_the_end(trainer, verbalizer, ActivationVerbalizer, verbalizer_dir)
    if trainer.is_world_process_zero():
        write_autoencoder_card(out, "sft", args.target)
        stage.finish()
        remove_checkpoints(verbalizer_dir)
        remove_checkpoints(out / "reconstructor")
    trainer.accelerator.wait_for_everyone()
    return out


@torch.no_grad()
def held_out_target_fit(args: NLAArguments, base, reconstructor, stop_ids, pad_id: int, batch_size: int = 32):
    """The reconstructor reading the held-out examples' own targets (written as SFT wrote the training ones): the
    FVE (against the training mean) and cosine a verbaliser that wrote its targets perfectly would reach, and the
    targets' own copy rate. What SFT can reach with this kind of target, beside what the verbaliser reaches."""
    from . import nla
    from .pipeline import _split

    train, held_out = _split(load_activations(args.activations_dir), args.eval_examples)
    targets = _targets(args, held_out, base, stop_ids)
    fit = nla.read_back(
        reconstructor,
        targets,
        torch.tensor(held_out["activation"]),
        torch.tensor(train["activation"]).mean(0),
        stop_ids,
        pad_id,
        [list(ids) for ids in held_out["input_ids"]],
        batch_size,
    )
    return {"examples": len(targets), **fit}


def _targets(args: NLAArguments, examples, base, stop_ids) -> list[list[int]]:
    """The SFT targets of `examples` (rows of the activation dump), as `args` asks for them."""
    from . import nla

    return nla.explanation_targets(
        args.target,
        examples.select_columns(["input_ids", "reference_topk_ids"])[:],
        args.explanation_length,
        base,
        exclude=stop_ids,
        context_tokens=args.context_tokens,
    )


def output_norm_cap(activations: torch.Tensor) -> float:
    """The reconstructor's ``max_output_norm``: the largest norm among the training activations."""
    return float(activations.float().norm(dim=-1).max())


def cap_output_norm(folder: str | Path, activations_dir: str | None = None) -> bool:
    """Give the reconstructor of an `hfx lens sft` or `hfx lens grpo` folder made before SFT set it its
    ``max_output_norm`` (from the training split of ``activations_dir``, the dump it was trained on), and drop its
    ``target_fit.json``, read without the cap (:func:`target_fit_of` makes it again). Returns whether it changed
    anything; its evaluation is then older than its reconstructor's config."""
    from hfx.atomic import write_text_atomic

    from .modeling_lens import ConsistencyLens

    folder = Path(folder)
    config = ConsistencyLens.config_class.from_pretrained(folder / "reconstructor")
    if config.max_output_norm is not None:
        return False
    args = NLAArguments(activations_dir=activations_dir or NLAArguments.activations_dir)
    for name in (f"hfx_stage_{SFT_STAGE}.json", f"hfx_stage_{GRPO_STAGE}.json"):
        if (folder / name).is_file():
            args.eval_examples = json.loads((folder / name).read_text())["settings"]["autoencoder"][
                "eval_examples"
            ]
    config.max_output_norm = output_norm_cap(torch.tensor(_train_split(args)["activation"]))
    write_text_atomic(folder / "reconstructor" / "config.json", config.to_json_string())
    (folder / TARGET_FIT).unlink(missing_ok=True)
    return True


def target_fit_of(folder: str | Path, activations_dir: str | None = None, device: str | None = None) -> dict:
    """`held_out_target_fit` of a finished SFT folder, read from its settings and its reconstructor (for folders
    made before SFT wrote it), on `device` (resolved as every hfx command's); written to its ``target_fit.json``
    and returned."""
    from transformers import AutoTokenizer, GenerationConfig

    from hfx.atomic import write_text_atomic
    from hfx.stages import stage_fingerprint, stage_manifest

    from .modeling_lens import ConsistencyLens

    folder = Path(folder)
    if (folder / TARGET_FIT).is_file():
        return json.loads((folder / TARGET_FIT).read_text())
    manifest = stage_manifest(folder, SFT_STAGE)
    if manifest is None or stage_fingerprint(folder, SFT_STAGE) is None:
        raise FileNotFoundError(f"{folder}: no finished `hfx lens sft` folder.")
    known = {f.name for f in fields(NLAArguments)}
    settings = {k: v for k, v in manifest["settings"]["autoencoder"].items() if k in known}
    args = NLAArguments(**settings, activations_dir=activations_dir or NLAArguments.activations_dir)
    base, _ = models.load_causal_lm(args.model_name_or_path, device=device, dtype=args.dtype)
    reconstructor = ConsistencyLens.from_pretrained(folder / "reconstructor", dtype=base.dtype)
    reconstructor = reconstructor.to(base.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "verbalizer")
    eos = GenerationConfig.from_pretrained(folder / "verbalizer").eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    stop_ids = sorted({*eos, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None})
    fit = held_out_target_fit(args, base, reconstructor, stop_ids, tokenizer.pad_token_id)
    write_text_atomic(folder / TARGET_FIT, json.dumps(fit, indent=2) + "\n")
    return fit


def _fve_callback(args: NLAArguments, processor, reconstructor, train_activations: torch.Tensor):
    """The held-out FVE curve: the first `fve_examples` held-out activations, every `fve_every` steps."""
    from .nla import FVECallback
    from .pipeline import _split

    _, held_out = _split(load_activations(args.activations_dir), args.eval_examples)
    held_out = held_out.select(range(min(args.fve_examples, len(held_out))))
    return FVECallback(
        processor,
        reconstructor,
        torch.tensor(held_out["activation"]),
        train_activations.mean(0),
        [list(ids) for ids in held_out["input_ids"]],
        args.fve_every,
        args.instruction,
    )


def _reconstructor_trainer(
    reconstructor, training_args, output_dir: Path, args: NLAArguments, dataset, collator, mean
):
    from transformers import TrainingArguments

    from .nla import ReconstructorTrainer

    reconstructor_args = TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=args.reconstructor_learning_rate,
        num_train_epochs=args.reconstructor_epochs,
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        save_steps=training_args.save_steps,
        save_total_limit=training_args.save_total_limit,
        logging_steps=training_args.logging_steps,
        seed=training_args.seed,
        bf16=training_args.bf16,
        use_cpu=training_args.use_cpu,
        report_to=training_args.report_to,
        disable_tqdm=training_args.disable_tqdm,
        remove_unused_columns=False,
        save_only_model=False,
    )
    return ReconstructorTrainer(
        model=reconstructor,
        args=reconstructor_args,
        train_dataset=dataset,
        data_collator=collator,
        mean=mean,
        mse_weight=args.reconstructor_mse_weight,
    )


def run_grpo(args: NLAArguments, grpo_config) -> Path:
    """GRPO from an SFT folder: the verbaliser samples `num_generations` explanations per activation, rewarded by
    the reconstruction's cosine (minus `kl_reward_weight` x its KL), the length penalty and the copy penalty, with
    GRPO's KL penalty (`beta`) to the SFT verbaliser. The reconstructor stays as SFT fitted it, or with
    `grpo_reconstructor_learning_rate` learns beside the verbaliser to read its explanations (kept in each
    checkpoint); it is saved beside the result."""
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from hfx.checkpoints import last_complete_checkpoint, remove_checkpoints
    from hfx.stages import Stage, stage_fingerprint, stage_manifest

    from . import nla
    from .modeling_lens import ConsistencyLens
    from .modeling_verbalizer import ActivationVerbalizer

    sft = stage_fingerprint(args.sft_dir, SFT_STAGE)
    if sft is None:
        raise FileNotFoundError(
            f"{args.sft_dir}: no finished `hfx lens sft` folder; run it to the end first."
        )
    dump = stage_fingerprint(args.activations_dir, DUMP_STAGE)
    if dump != stage_manifest(args.sft_dir, SFT_STAGE)["inputs"]["activations"]:
        raise ValueError(
            f"{args.activations_dir} is not the activation dump {args.sft_dir} was trained on: pass that one as "
            "--activations_dir (its held-out split must stay held out)."
        )
    out = Path(grpo_config.output_dir)
    inputs = {"sft": sft, "activations": dump}
    stage = Stage(out, GRPO_STAGE, _settings(args, grpo_config, GRPO_SETTINGS), inputs)
    if _begin(stage, args.overwrite) == "done":
        return out
    device = models.training_device(args.device, grpo_config)
    dtype = models.resolve_dtype(args.dtype, device)  # as SFT trained it: the weights' dtype is --dtype
    sft_dir = Path(args.sft_dir)
    verbalizer = ActivationVerbalizer.from_pretrained(sft_dir / "verbalizer", dtype=dtype)
    processor = nla.ActivationProcessor(AutoTokenizer.from_pretrained(sft_dir / "verbalizer"))
    reconstructor = ConsistencyLens.from_pretrained(sft_dir / "reconstructor", dtype=dtype).to(device).eval()
    reconstructor.requires_grad_(bool(args.grpo_reconstructor_learning_rate))
    base = None
    if args.kl_reward_weight:
        base = models.load_model(args.model_name_or_path, device=device, dtype=args.dtype)
    train = _train_split(args)
    dataset = nla.grpo_examples(train["activation"], train["input_ids"], args.instruction)
    stop_ids = nla.stop_ids_of(verbalizer, processor)
    verbalizer_dir = out / "verbalizer"
    fit, callbacks = None, []
    if args.grpo_reconstructor_learning_rate:
        fit = nla.ReconstructorFit(
            reconstructor,
            stop_ids,
            processor.tokenizer.pad_token_id,
            args.grpo_reconstructor_learning_rate,
            torch.tensor(train["activation"]).mean(0),
            args.reconstructor_mse_weight,
        )
        last = last_complete_checkpoint(verbalizer_dir)
        if last is not None and fit.load(last):
            logger.info("The reconstructor and its optimizer resume from %s", last)
        callbacks.append(nla.ReconstructorCheckpoints(fit))
    rewards, weights = nla.grpo_rewards(
        reconstructor,
        stop_ids,
        processor.tokenizer.pad_token_id,
        args.explanation_length,
        args.length_penalty,
        args.copy_penalty,
        base,
        args.kl_reward_weight,
        fit,
    )
    phase = _phase_args(grpo_config, verbalizer_dir)
    phase.reward_weights = weights
    phase.max_completion_length = args.explanation_length
    phase.log_multimodal = False
    trainer = GRPOTrainer(
        model=verbalizer,
        reward_funcs=rewards,
        args=phase,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[
            *callbacks,
            _fve_callback(args, processor, reconstructor, torch.tensor(train["activation"])),
        ],
    )
    _train_to_the_end(trainer, verbalizer, ActivationVerbalizer, verbalizer_dir)
    if trainer.is_world_process_zero():
        processor.tokenizer.save_pretrained(verbalizer_dir)
        reconstructor.save_pretrained(out / "reconstructor")
        write_autoencoder_card(out, "grpo")
        stage.finish()
        remove_checkpoints(verbalizer_dir)
    trainer.accelerator.wait_for_everyone()
    return out
