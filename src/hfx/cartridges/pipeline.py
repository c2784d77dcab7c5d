"""The whole self-study job, stage after stage: corpus -> synthesis -> training -> evaluation -> saved cartridge.

Every stage writes into one output directory and picks up where a killed run stopped: synthesis skips finished
shards, training resumes from the last Trainer checkpoint, and a finished cartridge is not trained again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from hfx import embedded
from hfx.atomic import write_text_atomic
from hfx.cartridges.budget import read_plan
from hfx.cartridges.composition import check_same_base, load_prefix
from hfx.cartridges.corpus import Corpus, load_corpus
from hfx.cartridges.evaluation import (
    Condition,
    cartridge_condition,
    default_context_tokens,
    evaluate_conditions,
    format_table,
    gap_shares,
    icl_condition,
    load_questions,
    results_to_json,
)
from hfx.cartridges.synthesis import SynthesisConfig, resolve_conversations_per_chunk, synthesize
from hfx.cartridges.training import (
    DEFAULT_INITIALIZATION,
    CartridgeCollator,
    CartridgeTrainer,
    CartridgeTrainingArguments,
    cartridge_stage,
    check_initialization,
    create_cartridge,
    expected_distractor_tokens,
    load_cartridge,
    read_metadata,
    write_metadata,
)
from hfx.checkpoints import remove_checkpoints, train_or_restore
from hfx.models import (
    DeviceArguments,
    dtype_name,
    load_causal_lm,
    load_model,
    load_tokenizer,
    model_id,
    resolve_dtype,
    resolve_training_dtype,
    training_device,
)

logger = logging.getLogger(__name__)


def train_cartridge(
    corpus_source: str,
    dataset,
    args: CartridgeTrainingArguments,
    model_name_or_path: str | None = None,
    callbacks: list | None = None,
    overwrite: bool = False,
) -> Path:
    """Train a cartridge on a synthesized dataset and save it (adapter + metadata) in ``args.output_dir``.

    The folder is a stage (:mod:`hfx.stages`): a finished cartridge of the same settings and inputs is reused, an
    unfinished one resumed from its last complete checkpoint; other settings are refused (``overwrite`` starts
    over), other inputs (a new synthesis, another corpus or base model) retrain it.
    ``callbacks`` are ``transformers.TrainerCallback`` objects added to the Trainer (e.g. to keep a copy of each
    checkpoint's adapter: the checkpoints themselves are removed once the cartridge is saved).
    """
    from accelerate import PartialState
    from peft import set_peft_model_state_dict
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import load_file

    tokenizer = load_tokenizer(model_name_or_path)
    corpus = load_corpus(corpus_source, tokenizer)
    stage = cartridge_stage(args, model_id(model_name_or_path), corpus, dataset)
    state = PartialState()
    with (
        state.main_process_first()
    ):  # the main process checks and prepares the folder; the others then read it
        status = stage.begin(overwrite=overwrite) if state.is_main_process else stage.status()
    if status == "done":
        if state.is_main_process:
            remove_checkpoints(args.output_dir)  # left by a run killed after it finished
        return Path(args.output_dir)

    # The frozen base goes where Trainer trains (its device), in the training dtype; the cartridge stays float32.
    model = load_model(
        model_name_or_path, device=args.device, dtype=resolve_training_dtype(args.model_dtype, args.device)
    )
    for param in model.parameters():
        param.requires_grad_(False)
    peft_model = create_cartridge(
        model,
        tokenizer,
        corpus,
        args.num_virtual_tokens,
        num_frozen_tokens=args.num_frozen_tokens,
        initialization=args.initialization,
        seed=args.seed,
    )
    distractors = None
    if args.distractors:
        check_same_base(args.distractors, model.config, model_id(model_name_or_path))
        distractors = [load_prefix(d, dtype=model.dtype, device=model.device) for d in args.distractors]
    trainer = CartridgeTrainer(
        model=peft_model,
        args=args,
        train_dataset=dataset,
        data_collator=CartridgeCollator(tokenizer.pad_token_id),
        callbacks=callbacks,
        distractors=distractors,
    )
    train_loss, train_runtime = train_or_restore(
        trainer,
        lambda checkpoint: set_peft_model_state_dict(
            peft_model, load_file(checkpoint / SAFETENSORS_WEIGHTS_NAME)
        ),
    )
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json: the loss curve (log_history), written by the main process
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return Path(args.output_dir)
    # The metadata, then the stage's marker: the cartridge is finished (is_trained_cartridge) only once the adapter
    # and its metadata are on disk. Only then do the checkpoints go; the finished artifact is the adapter alone.
    write_metadata(
        args.output_dir,
        {
            "base_model": model_id(model_name_or_path),
            "corpus": corpus.name,
            "corpus_tokens": corpus.num_tokens,
            "num_virtual_tokens": args.num_virtual_tokens,
            "num_frozen_tokens": args.num_frozen_tokens,
            "initialization": args.initialization,
            "learning_rate": args.learning_rate,
            "global_steps": trainer.state.global_step,
            "num_processes": trainer.accelerator.num_processes,
            "global_batch_size": args.per_device_train_batch_size
            * args.gradient_accumulation_steps
            * trainer.accelerator.num_processes,
            "train_conversations": len(dataset),
            "train_loss": train_loss,
            "train_runtime_s": train_runtime,
        },
    )
    stage.finish()
    remove_checkpoints(args.output_dir)
    return Path(args.output_dir)


def evaluate_cartridge(
    cartridge_dir: str | Path,
    corpus_source: str,
    questions_path: str | Path,
    model_name_or_path: str | None = None,
    max_context_tokens: int | None = None,
    throughput_batch: int = 8,
    throughput_tokens: int = 32,
    device: str | None = None,
    dtype: str = "auto",
) -> dict:
    """The three-condition table for a saved cartridge; also written to ``<cartridge>/eval_results.json``."""
    model, tokenizer = load_causal_lm(model_name_or_path, device=device, dtype=dtype)
    questions = load_questions(questions_path)
    corpus = load_corpus(corpus_source, tokenizer)
    if max_context_tokens is None:
        max_context_tokens = default_context_tokens(model)
    peft_model = load_cartridge(model, cartridge_dir)
    conditions = [
        Condition("no context", None, prompt_after_system=False),
        icl_condition(model, tokenizer, corpus.text, max_context_tokens=max_context_tokens),
        cartridge_condition(
            peft_model, name=f"cartridge (p={peft_model.active_peft_config.num_virtual_tokens})"
        ),
    ]
    base = peft_model.get_base_model()
    with peft_model.disable_adapter():
        results = evaluate_conditions(
            base,
            tokenizer,
            conditions,
            questions,
            throughput_batch=throughput_batch,
            throughput_tokens=throughput_tokens,
        )
    report = {
        "corpus": corpus.name,
        "corpus_tokens": corpus.num_tokens,
        "questions": str(questions_path),
        "num_questions": len(questions),
        "device": str(model.device),
        "dtype": dtype_name(model.dtype),
        "results": results_to_json(results),
        "gap": gap_shares(results),
        "table": format_table(results, num_questions=len(questions)),
    }
    write_text_atomic(Path(cartridge_dir) / "eval_results.json", json.dumps(report, indent=2))
    return report


def write_cartridge_card(cartridge_dir: str | Path, report: dict | None = None) -> None:
    """Render the cartridge's README.md from its metadata and, when evaluated, its ``report`` table.

    The same renderer writes the card of a pushed cartridge (:mod:`hfx.cartridges.hub`), with the repo ids added.
    """
    from hfx.cartridges.hub import render_cartridge_card

    render_cartridge_card(read_metadata(cartridge_dir), Path(cartridge_dir) / "README.md", report=report)


def _budgeted_synthesis(
    output_dir,
    budget_minutes,
    model,
    model_name_or_path,
    tokenizer,
    corpus,
    synthesis,
    training,
    server,
    start,
    questions=None,
    load_seconds=0.0,
):
    """The synthesis config a budget allows, and the probe's batches; a resumed run keeps the plan it wrote."""
    from hfx.cartridges.budget import measure_and_plan, write_plan

    defaults = CartridgeTrainingArguments.__dataclass_fields__
    batch_size = (
        training.get("per_device_train_batch_size") or defaults["per_device_train_batch_size"].default
    )
    epochs = training.get("num_train_epochs") or defaults["num_train_epochs"].default
    plan = read_plan(output_dir)
    ready = None
    if plan is not None:
        if plan.budget_minutes != budget_minutes:
            raise ValueError(
                f"{output_dir} holds a run planned for --budget_minutes {plan.budget_minutes:g}, not "
                f"{budget_minutes:g}; use another output directory or delete it to start over."
            )
        logger.info("Resuming with the plan in %s: %s", output_dir, plan.describe())
    else:
        distractor_tokens = 0
        if training.get("distractors"):
            from peft import PeftConfig

            distractor_tokens = expected_distractor_tokens(
                [PeftConfig.from_pretrained(str(d)).num_virtual_tokens for d in training["distractors"]],
                training.get("max_distractors", defaults["max_distractors"].default),
            )
        plan, ready = measure_and_plan(
            model,
            tokenizer,
            corpus,
            synthesis,
            budget_minutes,
            num_virtual_tokens=training["num_virtual_tokens"],
            per_device_train_batch_size=batch_size,
            num_train_epochs=epochs,
            started=start,
            training_dtype=resolve_training_dtype(
                training.get("model_dtype") or defaults["model_dtype"].default, model.device
            ),
            model_name_or_path=model_name_or_path,
            server=server,
            questions=questions,
            load_seconds=load_seconds,
            distractor_tokens=distractor_tokens,
        )
        write_plan(output_dir, plan)
        logger.info(plan.describe())
    training["num_train_epochs"] = plan.num_train_epochs
    training["per_device_train_batch_size"] = plan.per_device_train_batch_size
    return dataclasses.replace(synthesis, num_conversations=plan.num_conversations), ready


@dataclass
class RunResult:
    output_dir: Path
    cartridge_dir: Path
    report: dict
    seconds: float


def run_self_study(
    output_dir: str | Path,
    corpus_source: str = embedded.DEFAULT_CORPUS,
    questions_path: str | Path | None = None,
    synthesis: SynthesisConfig | None = None,
    training: dict | None = None,
    model_name_or_path: str | None = None,
    server=None,
    device: str | None = None,
    dtype: str = "auto",
    budget_minutes: float | None = None,
    callbacks: list | None = None,
    overwrite: bool = False,
) -> RunResult:
    """The main job: synthesize, train, evaluate, save the cartridge with its card. Resumable.

    ``server`` (:class:`~hfx.cartridges.server.ServerArguments`) synthesizes through an OpenAI-compatible server.
    Every stage runs on ``device`` (default: accelerate's device of this process); ``dtype`` is the dtype of the
    synthesizing and evaluating model (training's frozen base takes ``training["model_dtype"]``).
    ``budget_minutes`` replaces ``synthesis.num_conversations`` by the number that fits the budget on this machine
    (:mod:`hfx.cartridges.budget`); the plan is written to ``output_dir/plan.json`` and kept by a resumed run.
    ``callbacks`` go to the training stage's Trainer (:func:`train_cartridge`). A rerun into ``output_dir``
    reuses or resumes each stage made with the same settings and refuses other settings, naming them;
    ``overwrite`` retrains the cartridge instead.
    """
    start = time.perf_counter()
    output_dir = Path(output_dir)
    synthesis = synthesis or SynthesisConfig()
    model, tokenizer = load_causal_lm(model_name_or_path, device=device, dtype=dtype)
    load_seconds = time.perf_counter() - start
    corpus: Corpus = load_corpus(corpus_source, tokenizer)
    training = dict(training or {})
    # An initialization the model cannot take stops here, not after the synthesis.
    check_initialization(model, training.get("initialization", DEFAULT_INITIALIZATION))
    if training.get("num_virtual_tokens") is None:
        training["num_virtual_tokens"] = max(1, corpus.num_tokens // 8)
    plan = read_plan(output_dir)
    if synthesis.conversations_per_chunk is None and plan is not None:
        synthesis = dataclasses.replace(synthesis, conversations_per_chunk=plan.conversations_per_chunk)
    synthesis = resolve_conversations_per_chunk(synthesis, model, output_dir / "synthesis", server)
    ready = None
    if budget_minutes is not None:
        synthesis, ready = _budgeted_synthesis(
            output_dir,
            budget_minutes,
            model,
            model_name_or_path,
            tokenizer,
            corpus,
            synthesis,
            training,
            server,
            start,
            load_questions(questions_path) if questions_path is not None else None,
            load_seconds,
        )
    dataset = synthesize(
        model,
        tokenizer,
        corpus,
        output_dir / "synthesis",
        synthesis,
        model_name=model_id(model_name_or_path),
        server=server,
        ready=ready,
    )
    run_device = model.device
    del model

    cartridge_dir = output_dir / "cartridge"
    args = CartridgeTrainingArguments(
        output_dir=str(cartridge_dir),
        seed=synthesis.seed,
        use_cpu=run_device.type == "cpu",
        **training,
    )
    train_cartridge(
        corpus_source,
        dataset,
        args,
        model_name_or_path=model_name_or_path,
        callbacks=callbacks,
        overwrite=overwrite,
    )
    report = None
    if questions_path is not None:
        report = evaluate_cartridge(
            cartridge_dir,
            corpus_source,
            questions_path,
            model_name_or_path=model_name_or_path,
            device=str(run_device),
            dtype=dtype,
        )
    write_cartridge_card(cartridge_dir, report)
    return RunResult(output_dir, cartridge_dir, report or {}, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------------------------
# Arguments of the command-line entry points (`hfx cartridge ...`, examples/cartridges/*.py), parsed the TRL way.


@dataclass
class CorpusArguments(DeviceArguments):
    corpus: str = field(
        default=embedded.DEFAULT_CORPUS,
        metadata={
            "help": "The document: a bundled corpus name (see `hfx corpora`), a text, PDF or HTML file, a folder "
            "of them (joined), or a URL (hfx.documents)."
        },
    )
    model_name_or_path: str = field(
        default="embedded",
        metadata={"help": "Base model: 'embedded' (SmolLM2-135M-Instruct) or a local path."},
    )


@dataclass
class SynthesizeArguments(CorpusArguments):
    synthesis_dir: str = field(
        default="outputs/synthesis", metadata={"help": "Where the dataset's shards and card go."}
    )
    hub_repo_id: str | None = field(
        default=None, metadata={"help": "Dataset repo id to upload the result (card included) to."}
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Start over when SYNTHESIS_DIR holds a synthesis made with other settings (without it: "
            "refused, naming them). The same settings return a finished synthesis and resume an unfinished one."
        },
    )


@dataclass
class TrainArguments(CorpusArguments):
    dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the model that evaluates the cartridge (--questions): auto = bfloat16 on a GPU "
            "that supports it, else float32. The frozen base during training takes --model_dtype."
        },
    )
    synthesis_dir: str = field(
        default="outputs/synthesis", metadata={"help": "A directory made by synthesize."}
    )
    questions: str | None = field(
        default=None, metadata={"help": "Questions JSONL to evaluate on after training."}
    )
    hub_repo_id: str | None = field(
        default=None, metadata={"help": "Model repo id to upload the finished cartridge (card included) to."}
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Retrain when OUTPUT_DIR holds a cartridge made with other settings (without it: refused, "
            "naming them). The same settings reuse a finished cartridge and resume an unfinished one."
        },
    )


@dataclass
class EvalArguments(CorpusArguments):
    cartridge: str = field(default="outputs/cartridge", metadata={"help": "A saved cartridge directory."})
    questions: str = field(
        default="", metadata={"help": "Questions JSONL ({question, choices, answer} per line)."}
    )
    max_context_tokens: int | None = field(
        default=None,
        metadata={"help": "Truncate the ICL document to this many tokens (default: the model window)."},
    )
    throughput_batch: int = field(
        default=8, metadata={"help": "Batch size of the decode-throughput measurement."}
    )
    throughput_tokens: int = field(
        default=32, metadata={"help": "Tokens decoded per sequence for throughput."}
    )


def _training_field(name: str, help: str | None = None):
    """A field with :class:`CartridgeTrainingArguments`' default for ``name``: one place sets each default."""
    source = CartridgeTrainingArguments.__dataclass_fields__[name]
    return field(default=source.default, metadata={"help": help or source.metadata.get("help", "")})


@dataclass
class RunArguments(CorpusArguments):
    output_dir: str = field(
        default="outputs/self-study", metadata={"help": "Directory of the whole run (resumable)."}
    )
    questions: str | None = field(default=None, metadata={"help": "Questions JSONL for the final table."})
    budget_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Finish within this many minutes on this machine: the first batches are timed and the number "
            "of conversations (and so of training steps) is planned to fit, replacing --num_conversations. "
            "The plan is logged and written to OUTPUT_DIR/plan.json; a resumed run keeps it."
        },
    )
    num_virtual_tokens: int | None = field(
        default=None,
        metadata={"help": "Cartridge size p (KV tokens per layer); default 1/8 of the corpus's tokens."},
    )
    num_train_epochs: float = _training_field("num_train_epochs")
    learning_rate: float = _training_field("learning_rate")
    lr_scheduler_type: str = _training_field(
        "lr_scheduler_type",
        help="Trainer's schedule of the learning rate (cosine decays to 0 at the last step; constant, linear...).",
    )
    per_device_train_batch_size: int = _training_field("per_device_train_batch_size")
    initialization: str = _training_field("initialization")
    model_dtype: str = _training_field("model_dtype")
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Retrain the cartridge when OUTPUT_DIR/cartridge was made with other training settings "
            "(without it: refused, naming them). A synthesis with other settings is always refused."
        },
    )


def train_and_report(args: TrainArguments, training_args: CartridgeTrainingArguments) -> dict | None:
    """`hfx cartridge train` / examples/cartridges/train.py: train, optionally evaluate, write the card, push."""
    from hfx.cartridges.synthesis import load_synthesis

    # A device or dtype this machine lacks stops here, before any work.
    device = training_device(args.device, training_args)
    resolve_training_dtype(training_args.model_dtype, device)  # training's frozen base
    resolve_dtype(args.dtype, device)  # the evaluating model
    dataset = load_synthesis(args.synthesis_dir)
    train_cartridge(
        args.corpus,
        dataset,
        training_args,
        model_name_or_path=args.model_name_or_path,
        overwrite=args.overwrite,
    )
    if (
        training_args.process_index != 0
    ):  # under `accelerate launch`, one process evaluates and writes the card
        return None
    report = None
    if args.questions:
        report = evaluate_cartridge(
            training_args.output_dir,
            args.corpus,
            args.questions,
            args.model_name_or_path,
            device=str(training_args.device),
            dtype=args.dtype,
        )
    write_cartridge_card(training_args.output_dir, report)
    if args.hub_repo_id:
        from hfx.cartridges.hub import push_cartridge_to_hub

        push_cartridge_to_hub(training_args.output_dir, args.hub_repo_id)
    return report


def run_training_settings(args: RunArguments) -> dict:
    """The ``training`` settings of :func:`run_self_study` that ``hfx cartridge run``'s arguments carry."""
    return {
        "num_virtual_tokens": args.num_virtual_tokens,
        "num_train_epochs": args.num_train_epochs,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": args.lr_scheduler_type,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "initialization": args.initialization,
        "model_dtype": args.model_dtype,
    }


def run_from_arguments(args: RunArguments, synthesis: SynthesisConfig, server=None) -> RunResult:
    return run_self_study(
        args.output_dir,
        args.corpus,
        args.questions,
        synthesis,
        run_training_settings(args),
        args.model_name_or_path,
        server,
        device=args.device,
        dtype=args.dtype,
        budget_minutes=args.budget_minutes,
        overwrite=args.overwrite,
    )


@dataclass
class ComposeArguments(DeviceArguments):
    cartridges: list[str] = field(
        default_factory=list, metadata={"help": "Two or more saved cartridge folders, in prefix order."}
    )
    output_dir: str = field(
        default="outputs/composed", metadata={"help": "Where the composed adapter (and its card) goes."}
    )
    model_name_or_path: str = field(
        default="embedded",
        metadata={"help": "Base model: 'embedded' (SmolLM2-135M-Instruct) or a local path."},
    )
    questions: str | None = field(
        default=None,
        metadata={
            "help": "Questions JSONL to compare composed vs single cartridges vs ICL with every document; a "
            'question may list the documents it needs ("documents": ["rcv1", "iris"]).'
        },
    )
    corpora: list[str] | None = field(
        default=None,
        metadata={
            "help": "The documents of the cartridges, same order (default: each cartridge's recorded corpus)."
        },
    )
    max_context_tokens: int | None = field(
        default=None,
        metadata={"help": "Truncate the ICL documents to this many tokens (default: the model window)."},
    )


def compose_and_evaluate(args: ComposeArguments) -> dict | None:
    """`hfx cartridge compose`: write the composed adapter with its card; evaluate it when questions are given."""
    from hfx.cartridges.composition import (
        check_question_documents,
        compose_cartridges,
        evaluate_composition,
        format_composition_table,
    )
    from hfx.documents import read_document

    if len(args.cartridges) < 2:
        raise ValueError(
            f"Give at least 2 cartridges to compose (--cartridges A B C), got {len(args.cartridges)}."
        )
    model, tokenizer = load_causal_lm(args.model_name_or_path, device=args.device, dtype=args.dtype)
    base_model = model_id(args.model_name_or_path)
    output_dir = Path(args.output_dir)
    documents = None
    if args.questions:  # checked before anything is written
        corpora = args.corpora or [read_metadata(d).get("corpus") for d in args.cartridges]
        if len(corpora) != len(args.cartridges) or not all(corpora):
            raise ValueError(
                "Give --corpora, one per cartridge (some cartridges do not record their corpus)."
            )
        documents = [read_document(c) for c in corpora]
        load_questions(args.questions)
        check_question_documents(args.questions, [name for name, _ in documents])
    compose_cartridges(args.cartridges, output_dir, model_config=model.config, base_model=base_model)
    report = None
    if documents is not None:
        max_context = args.max_context_tokens or default_context_tokens(model)
        composition = evaluate_composition(
            model, tokenizer, args.cartridges, documents, args.questions, base_model, max_context
        )
        table = format_composition_table(composition)
        report = {
            **composition,
            "questions": str(args.questions),
            "corpora": [name for name, _ in documents],
            "table": table,
        }
        write_text_atomic(output_dir / "eval_results.json", json.dumps(report, indent=2))
    write_cartridge_card(output_dir, report)
    return report
