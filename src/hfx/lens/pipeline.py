"""Consistency Lens jobs: `hfx lens dump` (activation dataset), `hfx lens train`, `hfx lens eval`.

Each takes `--device`/`--dtype` (`hfx.models.DeviceArguments`), checked before anything is read or written. The
dump puts each `accelerate launch` process on its own device; training runs where Trainer runs (the frozen model
is loaded there, and the lens is trained in the same dtype); evaluation runs both models on the device given.
Manifests and cards record the resolved dtype ("float32", "bfloat16"), never "auto".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from hfx import models
from hfx.documents import DEFAULT_DATASET, load_documents

from .data import DUMP_STAGE, DumpConfig, dump_activations, dump_stage, finish_dump, load_activations

logger = logging.getLogger(__name__)


@dataclass
class DumpArguments(models.DeviceArguments):
    output_dir: str = field(default="outputs/lens-activations", metadata={"help": "dataset directory"})
    model_name_or_path: str = field(default="embedded", metadata={"help": "the frozen model to explain"})
    dataset: str = field(
        default=DEFAULT_DATASET,
        metadata={
            "help": "bundled collections (comma-separated), a text file or directory, or a dataset file"
        },
    )
    text_column: str = field(default="text", metadata={"help": "text column of a dataset input"})
    layer: int = field(default=15, metadata={"help": "decoder layer whose output is explained"})
    context_length: int = field(default=64, metadata={"help": "tokens per window (one example per window)"})
    min_position: int = field(default=8, metadata={"help": "earliest position an example may use"})
    max_examples: int = field(default=4096, metadata={"help": "number of examples"})
    topk: int = field(default=64, metadata={"help": "next-token log-probabilities kept per example"})
    batch_size: int = field(default=32, metadata={"help": "examples per forward"})
    examples_per_shard: int = field(
        default=512, metadata={"help": "examples per Parquet shard (unit of resume)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the position drawn in each window"})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Dump again when OUTPUT_DIR holds a dump made with other settings (without it: refused, "
            "naming them). The same settings reuse a finished dump and resume an unfinished one."
        },
    )


def run_dump(args: DumpArguments):
    """Write the activation dataset (each `accelerate launch` process its share of the shards); return it."""
    state = models.process_state()
    model, tokenizer = models.load_causal_lm(args.model_name_or_path, device=args.device, dtype=args.dtype)
    config = DumpConfig(**{f.name: getattr(args, f.name) for f in fields(DumpConfig)})
    manifest = {
        "model": models.model_id(args.model_name_or_path),
        "dtype": models.dtype_name(model.dtype),
        "dataset": args.dataset,
    }
    documents = load_documents(args.dataset, args.text_column)
    dump_activations(
        model,
        tokenizer,
        documents,
        args.output_dir,
        config,
        manifest,
        state.process_index,
        state.num_processes,
        overwrite=args.overwrite,
    )
    state.wait_for_everyone()
    if (
        state.num_processes > 1 and state.is_main_process
    ):  # every process's shards are written: the dump is done
        stage = dump_stage(Path(args.output_dir), manifest, config, documents)
        if not stage.done:
            finish_dump(Path(args.output_dir), stage)
    state.wait_for_everyone()
    return load_activations(Path(args.output_dir))


@dataclass
class LensArguments(models.DeviceArguments):
    """The lens and its frozen model; `--dtype` is that of both (training: the lens's weights too)."""

    activations_dir: str = field(
        default="outputs/lens-activations", metadata={"help": "`hfx lens dump` output"}
    )
    model_name_or_path: str = field(default="embedded", metadata={"help": "the frozen model (as dumped)"})
    lens_name_or_path: str | None = field(
        default=None, metadata={"help": "start from this lens instead of the base"}
    )
    explanation_length: int = field(default=4, metadata={"help": "tokens per explanation"})
    decoder_num_layers: int | None = field(default=4, metadata={"help": "decoder = first n base layers"})
    encoder_num_layers: int | None = field(
        default=None,
        metadata={
            "help": "encoder = first n base layers (default: layer + 1, so that the encoder reading the text "
            "before a position computes the activation the base model computes from it)"
        },
    )
    encoder_output_layer: int = field(
        default=-1, metadata={"help": "encoder layer whose output is read (-1: its last)"}
    )
    read_token: bool = field(
        default=False, metadata={"help": "read a learned token appended to the explanation"}
    )
    write_backwards: bool = field(
        default=False, metadata={"help": "the decoder writes the explanation last token first"}
    )
    output_init: str = field(
        default="identity",
        metadata={
            "help": "identity (the encoder's hidden state is the reconstruction) or mean (start at the mean "
            "activation)"
        },
    )
    eval_examples: int = field(
        default=256, metadata={"help": "held-out examples (the last ones) for evaluation"}
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "train: start over when the output folder holds a lens made with other settings (without it: "
            "refused, naming them). The same settings reuse a finished lens and resume an unfinished one."
        },
    )


def _split(dataset, eval_examples: int):
    if eval_examples >= len(dataset):
        raise ValueError(f"eval_examples={eval_examples} leaves no training data ({len(dataset)} examples).")
    cut = len(dataset) - eval_examples
    return dataset.select(range(cut)), dataset.select(range(cut, len(dataset)))


#: The stage (hfx.stages) of a trained lens in its folder.
LENS_STAGE = "lens"
#: Arguments of the lens that do not change it: where its inputs are (the dump's marker is its input) and the
#: device; whether to overwrite.
LENS_NOT_SETTINGS = ("activations_dir", "device", "overwrite")
#: The lens trainer's own arguments that change a lens (beside hfx.stages.TRAINER_SETTINGS).
LENS_TRAINING_SETTINGS = (
    "kl_weight",
    "context_warmup_steps",
    "context_weight",
    "lm_weight_schedule",
    "lm_weight_start",
    "lm_weight_end",
    "lm_weight_steps",
    "lm_weight_warmup_steps",
    "entropy_weight",
    "temperature_schedule",
    "temperature_start",
    "temperature_end",
    "temperature_steps",
    "activations_mode",
)


def run_train(args: LensArguments, training_args) -> Path:
    """Train (resuming from the last complete checkpoint in output_dir if any) and save the lens with a card; a
    finished lens of the same settings and dump is reused, other settings refused (``--overwrite`` starts over)."""
    from accelerate import PartialState

    from hfx.checkpoints import remove_checkpoints, train_or_restore
    from hfx.stages import Stage, stage_fingerprint, trainer_settings

    from .modeling_lens import ConsistencyLens
    from .training import LensTrainer

    device = models.training_device(args.device, training_args)
    # The lens's folder is a stage (hfx.stages): its settings and the finished dump it reads make it.
    dump = stage_fingerprint(args.activations_dir, DUMP_STAGE)
    if dump is None:
        raise FileNotFoundError(
            f"{args.activations_dir}: no finished activation dump (hfx_stage_{DUMP_STAGE}.done); run `hfx lens dump` "
            "to the end first."
        )
    settings = {
        "lens": {f.name: getattr(args, f.name) for f in fields(args) if f.name not in LENS_NOT_SETTINGS},
        "training": trainer_settings(training_args, LENS_TRAINING_SETTINGS),
    }
    stage = Stage(training_args.output_dir, LENS_STAGE, settings, {"activations": dump})
    state = PartialState()
    with state.main_process_first():
        status = stage.begin(overwrite=args.overwrite) if state.is_main_process else stage.status()
    if status == "done":
        if state.is_main_process:
            remove_checkpoints(training_args.output_dir)  # left by a run killed after it finished
        return Path(training_args.output_dir)
    base, tokenizer = models.load_causal_lm(args.model_name_or_path, device=device, dtype=args.dtype)
    data = load_activations(args.activations_dir)
    layer = data[0]["layer"]
    train, _ = _split(data, args.eval_examples)
    if args.lens_name_or_path:
        lens = ConsistencyLens.from_pretrained(args.lens_name_or_path, dtype=base.dtype)
    else:
        if args.output_init not in ("identity", "mean"):
            raise ValueError(f"output_init must be identity or mean, got {args.output_init!r}.")
        activations = torch.tensor(train["activation"])
        lens = ConsistencyLens.from_base(
            base,
            layer=layer,
            explanation_length=args.explanation_length,
            decoder_num_layers=args.decoder_num_layers,
            encoder_num_layers=args.encoder_num_layers or layer + 1,
            encoder_output_layer=args.encoder_output_layer,
            read_token=args.read_token,
            write_backwards=args.write_backwards,
            identity_output=args.output_init == "identity",
            base_model_name_or_path=models.model_id(args.model_name_or_path),
            mean_activation=activations.mean(0),
            activation_norm=float(activations.norm(dim=-1).mean()),
        )
    if training_args.activations_mode == "runtime":
        train = train.select_columns(["example_id", "doc_id", "input_ids"])
    topk = len(data[0]["reference_topk_ids"])  # runtime mode keeps as many as the dump did
    trainer = LensTrainer(
        model=lens,
        args=training_args,
        train_dataset=train,
        base_model=base,
        processing_class=tokenizer,
        topk=topk,
    )
    train_or_restore(
        trainer,
        lambda checkpoint: lens.load_state_dict(
            ConsistencyLens.from_pretrained(checkpoint, dtype=lens.dtype).state_dict()
        ),
    )
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the loss curve beside the lens
    # Under `accelerate launch`, one process writes the rest of the folder, marks the lens done, and only then
    # removes the checkpoints.
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        write_lens_card(training_args.output_dir, lens.config)
        stage.finish()
        remove_checkpoints(training_args.output_dir)
    trainer.accelerator.wait_for_everyone()
    return Path(training_args.output_dir)


def write_lens_card(lens_dir: str | Path, config, results: dict | None = None) -> None:
    """Render model_cards/lens_card.md into the lens directory, with the evaluation when there is one."""
    from hfx.hub import render_card

    render_card(
        "lens_card.md",
        Path(lens_dir) / "README.md",
        card_data={
            "library_name": "transformers",
            "tags": ["hfx", "consistency-lens", "interpretability", "custom_code"],
        },
        config=config,
        results=results,
    )


def run_eval(args: LensArguments, lens_dir: str, output: str | None = None, batch_size: int = 32) -> dict:
    """Evaluate a trained lens on the held-out split of its activation dataset; write the results as JSON."""
    import json

    from hfx.atomic import write_text_atomic

    from .evaluation import evaluate_lens
    from .modeling_lens import ConsistencyLens

    base, tokenizer = models.load_causal_lm(args.model_name_or_path, device=args.device, dtype=args.dtype)
    if (Path(lens_dir) / "verbalizer" / "config.json").is_file():  # an `hfx lens sft` / `grpo` autoencoder
        from .nla import AutoencoderLens

        lens = AutoencoderLens.from_pretrained(lens_dir, dtype=base.dtype).to(base.device)
    else:
        lens = ConsistencyLens.from_pretrained(lens_dir, dtype=base.dtype).to(base.device)
    train, held_out = _split(load_activations(args.activations_dir), args.eval_examples)
    mean = torch.tensor(train["activation"]).mean(0)
    results = evaluate_lens(lens, base, held_out, mean, tokenizer, batch_size)
    write_text_atomic(output or Path(lens_dir) / "eval_results.json", json.dumps(results, indent=2) + "\n")
    if isinstance(lens, ConsistencyLens):
        write_lens_card(lens_dir, lens.config, results)
    else:
        from .nla_pipeline import GRPO_STAGE, write_autoencoder_card

        phase = "grpo" if (Path(lens_dir) / f"hfx_stage_{GRPO_STAGE}.json").is_file() else "sft"
        write_autoencoder_card(lens_dir, phase, results=results)
    return results
