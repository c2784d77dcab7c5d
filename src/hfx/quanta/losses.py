"""Stage 1: per-token losses of a causal LM over a corpus.

Each document is tokenized and cut into windows of `context_length` tokens; the model reads each window once and
every position p >= 1 gets loss[p] = -ln P(token[p] | window[:p]) in nats (position 0 has no context: NaN). A
token's canonical index is `window_id * context_length + p`, stable for a given corpus, tokenizer and
context length. Windows are written as Parquet shards (atomic), so a killed run resumes at the next shard.
"""

from __future__ import annotations

import logging
import math
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
from hfx.batching import padded
from hfx.stages import Stage, begin_stage, fingerprint, run_shards

logger = logging.getLogger(__name__)

#: The stage (hfx.stages) of the per-token losses, in ``<run>/losses``.
LOSSES_STAGE = "quanta-losses"

FEATURES = datasets.Features(
    {
        "window_id": datasets.Value("int64"),
        "doc_id": datasets.Value("int64"),
        "doc_name": datasets.Value("string"),
        "start": datasets.Value("int64"),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "losses_nats": datasets.Sequence(datasets.Value("float32")),
    }
)
LOSSES_DIR = "losses"


@dataclass
class LossesConfig:
    context_length: int = 128
    max_tokens: int = 100_000
    batch_size: int = 16
    windows_per_shard: int = 128

    def __post_init__(self):
        if self.context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {self.context_length}.")
        if self.max_tokens < self.context_length:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) must be at least context_length ({self.context_length})."
            )


def make_windows(tokenizer, documents: list[tuple[str, str]], config: LossesConfig) -> list[dict]:
    """Cut the tokenized documents into windows (the last, shorter window of a document is kept if >= 2 tokens)
    until `max_tokens` tokens are covered."""
    windows, total = [], 0
    for doc_id, (name, text) in enumerate(documents):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), config.context_length):
            piece = ids[start : start + config.context_length]
            if len(piece) < 2:
                continue
            piece = piece[: config.max_tokens - total]
            windows.append(
                {
                    "window_id": len(windows),
                    "doc_id": doc_id,
                    "doc_name": name,
                    "start": start,
                    "input_ids": piece,
                }
            )
            total += len(piece)
            if total >= config.max_tokens:
                return windows
    return windows


@torch.no_grad()
def window_losses(model, windows: list[list[int]]) -> list[list[float]]:
    """Per-position losses (nats) of right-padded windows in one forward; position 0 is NaN."""
    device = next(model.parameters()).device
    input_ids, mask = padded(windows)
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    losses = -logprobs.gather(-1, input_ids[:, 1:, None].to(device))[..., 0]
    require_finite(losses[mask[:, 1:].to(device).bool()], "per-token losses")
    return [[math.nan] + losses[row, : len(w) - 1].tolist() for row, w in enumerate(windows)]


def compute_losses(
    model,
    tokenizer,
    documents: list[tuple[str, str]],
    output_dir: str | Path,
    config: LossesConfig,
    manifest: dict,
    process_index: int = 0,
    num_processes: int = 1,
    overwrite: bool = False,
) -> datasets.Dataset | None:
    """Write `output_dir/losses/data/losses-*.parquet`, skipping shards already written; return them.

    With several processes (`accelerate launch`), process i writes shards i, i + n, ... and returns None: read
    the dataset with `load_losses` once all processes are done."""
    out = Path(output_dir) / LOSSES_DIR
    # The folder is a stage (hfx.stages): the model, dataset and these settings make it, the documents are its input.
    stage = Stage(out, LOSSES_STAGE, {**manifest, **asdict(config)}, {"documents": fingerprint(documents)})
    begin_stage(stage, overwrite, process_index, num_processes)
    windows = make_windows(tokenizer, documents, config)

    def tokens(shard: int) -> int:
        return sum(len(w["input_ids"]) for w in _shard_windows(windows, shard, config))

    def write_shard(shard: int, bar) -> None:
        rows = _shard_windows(windows, shard, config)
        for start in range(0, len(rows), config.batch_size):
            batch = rows[start : start + config.batch_size]
            for row, losses in zip(batch, window_losses(model, [r["input_ids"] for r in batch]), strict=True):
                row["losses_nats"] = losses
            bar.update(sum(len(r["input_ids"]) for r in batch))
        write_parquet_atomic(rows, FEATURES, _shard(out, shard))

    run_shards(
        math.ceil(len(windows) / config.windows_per_shard),
        lambda shard: _shard(out, shard),
        write_shard,
        tokens,
        process_index,
        num_processes,
        desc="per-token losses",
        unit="tok",
    )
    if num_processes > 1:
        return None  # the main process marks the stage done once every process's shards are written
    stage.finish()
    return load_losses(output_dir)


def _shard_windows(windows: list[dict], shard: int, config: LossesConfig) -> list[dict]:
    return shard_rows(windows, shard, config.windows_per_shard)


def _shard(out: Path, index: int) -> Path:
    return shard_path(out, "losses", index)


def load_losses(output_dir: str | Path) -> datasets.Dataset:
    return load_parquet_shards(
        Path(output_dir) / LOSSES_DIR, "losses", FEATURES, "run `hfx quanta losses` first"
    )
