"""Consistency Lens jobs: `hfx lens dump` (activation dataset). Training and evaluation build on it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from hfx import embedded
from hfx.documents import DEFAULT_DATASET, load_documents

from .data import DumpConfig, dump_activations, load_activations


@dataclass
class DumpArguments:
    output_dir: str = field(default="outputs/lens-activations", metadata={"help": "dataset directory"})
    model_name_or_path: str = field(default="embedded", metadata={"help": "the frozen model to explain"})
    dtype: str = field(default="float32", metadata={"help": "model dtype: float32, bfloat16 or float16"})
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


def run_dump(args: DumpArguments):
    """Write the activation dataset (each `accelerate launch` process its share of the shards); return it."""
    from accelerate import PartialState

    state = PartialState()
    model, tokenizer = embedded.load_causal_lm(args.model_name_or_path, args.dtype)
    config = DumpConfig(**{f.name: getattr(args, f.name) for f in fields(DumpConfig)})
    manifest = {
        "model": embedded.model_id(args.model_name_or_path),
        "dtype": args.dtype,
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
    )
    state.wait_for_everyone()
    return load_activations(Path(args.output_dir))
