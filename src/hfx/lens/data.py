"""Activation datasets for the Consistency Lens.

Two steps into one output directory:
  1. pre-tokenization: documents -> windows of `context_length` tokens, one seeded position per window; each
     example keeps the tokens up to and including its position (`examples.parquet`);
  2. dump: the frozen model reads each example once; its layer-`layer` output at the position (the activation to
     explain) and the top-k of its next-token log-probabilities there (what the KL loss compares against) are
     written as Parquet shards (`data/activations-*.parquet`, atomic, resumable) with a dataset card.

`capture_batch` is the same computation on the fly: the trainer's runtime mode calls it instead of reading the
shards.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch

from hfx.artifacts import (
    load_parquet_shards,
    require_finite,
    shard_path,
    shard_rows,
    write_parquet_atomic,
)
from hfx.batching import left_padded
from hfx.hub import render_card
from hfx.stages import Stage, fingerprint, run_shards

from .activations import decoder_layer, hidden_states_of

logger = logging.getLogger(__name__)

#: The stage (hfx.stages) of an activation dump in its folder.
DUMP_STAGE = "lens-dump"

EXAMPLE_FEATURES = datasets.Features(
    {
        "example_id": datasets.Value("int64"),
        "doc_id": datasets.Value("int64"),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
    }
)
FEATURES = datasets.Features(
    {
        "example_id": datasets.Value("int64"),
        "doc_id": datasets.Value("int64"),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "position": datasets.Value("int32"),
        "layer": datasets.Value("int32"),
        "activation": datasets.Sequence(datasets.Value("float32")),
        "reference_topk_ids": datasets.Sequence(datasets.Value("int32")),
        "reference_topk_logprobs": datasets.Sequence(datasets.Value("float32")),
    }
)


@dataclass
class DumpConfig:
    layer: int = 15
    context_length: int = 64
    min_position: int = 8
    max_examples: int = 4096
    topk: int = 64
    batch_size: int = 32
    examples_per_shard: int = 512
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.min_position < self.context_length:
            raise ValueError(
                f"min_position ({self.min_position}) must be in 0..context_length-1 ({self.context_length - 1})."
            )
        if self.max_examples < 1 or self.topk < 1:
            raise ValueError("max_examples and topk must be >= 1.")


def tokenize_examples(tokenizer, documents: list[tuple[str, str]], config: DumpConfig) -> list[dict]:
    """One example per window of `context_length` tokens: the window cut after a seeded position."""
    rng = random.Random(config.seed)
    examples = []
    for doc_id, (_, text) in enumerate(documents):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), config.context_length):
            window = ids[start : start + config.context_length]
            if len(window) <= config.min_position:
                continue
            position = rng.randrange(config.min_position, len(window))
            examples.append(
                {"example_id": len(examples), "doc_id": doc_id, "input_ids": window[: position + 1]}
            )
            if len(examples) == config.max_examples:
                return examples
    return examples


@torch.no_grad()
def capture_batch(model, layer: int, input_ids: list[list[int]], topk: int) -> dict[str, torch.Tensor]:
    """For each example (its last token is the position): the layer-`layer` activation there and the top-k of the
    model's next-token log-probabilities. Rows are left-padded so the position is the last column."""
    device = next(model.parameters()).device
    ids, mask, position_ids = left_padded(input_ids, device)
    captured = {}
    module = decoder_layer(model, layer)

    def hook(module, args, output):
        captured["activation"] = hidden_states_of(output)[:, -1].float()

    handle = module.register_forward_hook(hook)
    try:
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1
        ).logits[:, -1]
    finally:
        handle.remove()
    top = torch.log_softmax(logits.float(), dim=-1).topk(min(topk, logits.shape[-1]), dim=-1)
    require_finite(captured["activation"], f"layer-{layer} activations")
    require_finite(top.values, "next-token log-probabilities")
    return {
        "activation": captured["activation"],
        "reference_topk_ids": top.indices,
        "reference_topk_logprobs": top.values,
    }


def dump_activations(
    model,
    tokenizer,
    documents: list[tuple[str, str]],
    output_dir: str | Path,
    config: DumpConfig,
    manifest: dict,
    process_index: int = 0,
    num_processes: int = 1,
    overwrite: bool = False,
) -> Path:
    """Pre-tokenize (once) and dump activations in shards, skipping shards already written. The folder is a stage
    (hfx.stages): a finished dump of the same settings and documents is reused, other settings refused (naming
    them; ``overwrite`` starts over), other documents dumped again."""
    decoder_layer(model, config.layer)  # a wrong layer fails before anything is written
    out = Path(output_dir)
    stage = dump_stage(out, manifest, config, documents)
    status = stage.begin(overwrite=overwrite) if process_index == 0 else stage.status()
    if status == "done":
        missing = _missing_shards(out, stage)
        if not missing:
            return out
        if process_index == 0:  # a shard of the finished dump was deleted since: the dump is made whole again
            logger.warning("%s: shards %s are missing; writing them again", out, missing)
            stage.reopen()
    examples_path = out / "examples.parquet"
    if examples_path.exists():
        examples = datasets.Dataset.from_parquet(str(examples_path), features=EXAMPLE_FEATURES).to_list()
    else:
        examples = tokenize_examples(tokenizer, documents, config)
        if not examples:
            raise ValueError(f"no window has more than min_position={config.min_position} tokens.")
        if process_index == 0:
            write_parquet_atomic(examples, EXAMPLE_FEATURES, examples_path)

    def write_shard(shard: int, bar) -> None:
        rows = _slice(examples, shard, config)
        for start in range(0, len(rows), config.batch_size):
            batch = rows[start : start + config.batch_size]
            captured = capture_batch(model, config.layer, [r["input_ids"] for r in batch], config.topk)
            for i, row in enumerate(batch):
                row.update(
                    position=len(row["input_ids"]) - 1,
                    layer=config.layer,
                    activation=captured["activation"][i].tolist(),
                    reference_topk_ids=captured["reference_topk_ids"][i].tolist(),
                    reference_topk_logprobs=captured["reference_topk_logprobs"][i].tolist(),
                )
            bar.update(len(batch))
        write_parquet_atomic(rows, FEATURES, _shard(out, shard))

    run_shards(
        math.ceil(len(examples) / config.examples_per_shard),
        lambda shard: _shard(out, shard),
        write_shard,
        lambda shard: len(_slice(examples, shard, config)),
        process_index,
        num_processes,
        desc=f"activations (layer {config.layer})",
        unit="ex",
    )
    if process_index == 0:
        render_card(
            "lens_activations_card.md",
            out / "README.md",
            card_kind="dataset",
            card_data={
                "tags": ["hfx", "consistency-lens", "activations"],
                "configs": [{"config_name": "default", "data_files": "data/activations-*.parquet"}],
            },
            manifest={**manifest, **asdict(config)},
            num_examples=len(examples),
            hidden_size=model.config.hidden_size,
        )
    if num_processes == 1:
        finish_dump(out, stage)
    return out


def dump_stage(out: Path, manifest: dict, config: DumpConfig, documents) -> Stage:
    """The lens dump's stage (hfx.stages) in ``out``: the model, dtype, dataset and dump settings make it; the
    documents' text is its input."""
    return Stage(out, DUMP_STAGE, {**manifest, **asdict(config)}, {"documents": fingerprint(documents)})


def finish_dump(out: Path, stage: Stage) -> None:
    """Mark the dump done once every shard of every process is written (the main process, after all of them)."""
    missing = _missing_shards(out, stage)
    if missing:
        raise RuntimeError(
            f"{out}: shards {missing} of the dump are missing; run the dump again to finish it."
        )
    stage.finish()


def _missing_shards(out: Path, stage: Stage) -> list[int]:
    if not (out / "examples.parquet").is_file():
        return [0]
    examples = datasets.Dataset.from_parquet(str(out / "examples.parquet"), features=EXAMPLE_FEATURES)
    num_shards = math.ceil(len(examples) / stage.manifest["settings"]["examples_per_shard"])
    return [i for i in range(num_shards) if not _shard(out, i).exists()]


def _slice(examples: list[dict], shard: int, config: DumpConfig) -> list[dict]:
    return shard_rows(examples, shard, config.examples_per_shard)


def _shard(out: Path, index: int) -> Path:
    return shard_path(out, "activations", index)


def load_activations(output_dir: str | Path) -> datasets.Dataset:
    return load_parquet_shards(output_dir, "activations", FEATURES, "run `hfx lens dump` first")
