"""Stage 2: which tokens to cluster.

Keep a token when (1) it has context (not the first of its window), (2) it is not predictable by induction: the
trigram ending at it (previous two tokens + itself) does not occur earlier in the same document, and (3) the
model predicts it well: loss below `loss_threshold_bits` (bits = nats / ln 2). Of the candidates, in canonical
order, every `skip`-th is kept, up to `num_tokens`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import datasets

from hfx.artifacts import write_parquet_atomic
from hfx.atomic import write_text_atomic
from hfx.stages import Stage, stage_fingerprint

logger = logging.getLogger(__name__)

TOKENS_DIR = "tokens"
#: The stage (hfx.stages) of the kept tokens, in ``<run>/tokens``: the filter's settings make it, from the losses.
TOKENS_STAGE = "quanta-tokens"
FEATURES = datasets.Features(
    {
        "token_index": datasets.Value("int64"),
        "window_id": datasets.Value("int64"),
        "doc_id": datasets.Value("int64"),
        "position": datasets.Value("int32"),
        "token_id": datasets.Value("int32"),
        "token": datasets.Value("string"),
        "context": datasets.Value("string"),
        "context_ids": datasets.Sequence(datasets.Value("int32")),
        "loss_bits": datasets.Value("float32"),
    }
)


@dataclass
class FilterConfig:
    loss_threshold_bits: float = 0.1
    skip: int = 1
    num_tokens: int = 2000
    drop_induction: bool = True

    def __post_init__(self):
        if self.skip < 1:
            raise ValueError(f"skip must be >= 1, got {self.skip}.")
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}.")
        if not self.loss_threshold_bits > 0:
            raise ValueError(f"loss_threshold_bits must be > 0, got {self.loss_threshold_bits}.")


def induction_mask(token_ids: list[int]) -> list[bool]:
    """mask[i] is True when the trigram (ids[i-2], ids[i-1], ids[i]) already occurred ending before i."""
    seen: set[tuple[int, int, int]] = set()
    mask = [False] * len(token_ids)
    for i in range(2, len(token_ids)):
        trigram = (token_ids[i - 2], token_ids[i - 1], token_ids[i])
        mask[i] = trigram in seen
        seen.add(trigram)
    return mask


def select_tokens(losses: datasets.Dataset, tokenizer, config: FilterConfig) -> list[dict]:
    """The kept tokens, in canonical order, with their context (ids and decoded text)."""
    context_length = max(len(ids) for ids in losses["input_ids"])
    by_doc: dict[int, list[dict]] = {}
    for row in losses:
        by_doc.setdefault(row["doc_id"], []).append(row)
    threshold_nats = config.loss_threshold_bits * math.log(2)
    candidates, counts = [], {"tokens": 0, "low_loss": 0, "induction": 0}
    for doc_id in sorted(by_doc):
        windows = sorted(by_doc[doc_id], key=lambda r: r["start"])
        document = [t for w in windows for t in w["input_ids"]]
        induced = induction_mask(document)
        for window in windows:
            for position in range(1, len(window["input_ids"])):
                counts["tokens"] += 1
                loss = window["losses_nats"][position]
                if not loss < threshold_nats:
                    continue
                counts["low_loss"] += 1
                if config.drop_induction and induced[window["start"] + position]:
                    counts["induction"] += 1
                    continue
                candidates.append((window, position, loss))
    kept = candidates[:: config.skip][: config.num_tokens]
    logger.info(
        "%d tokens, %d below %.3g bits, %d of those predictable by induction, %d candidates, %d kept",
        counts["tokens"],
        counts["low_loss"],
        config.loss_threshold_bits,
        counts["induction"],
        len(candidates),
        len(kept),
    )
    if not kept:
        raise ValueError(
            f"no token kept: of {counts['tokens']} tokens, {counts['low_loss']} have loss < "
            f"{config.loss_threshold_bits} bits and {counts['induction']} of those are predictable by induction. "
            "Raise --loss_threshold_bits or use a larger corpus (--max_tokens)."
        )
    rows = []
    for window, position, loss in kept:
        context_ids = window["input_ids"][:position]
        rows.append(
            {
                "token_index": window["window_id"] * context_length + position,
                "window_id": window["window_id"],
                "doc_id": window["doc_id"],
                "position": position,
                "token_id": window["input_ids"][position],
                "token": tokenizer.decode([window["input_ids"][position]]),
                "context": tokenizer.decode(context_ids),
                "context_ids": context_ids,
                "loss_bits": loss / math.log(2),
            }
        )
    return rows


def tokens_stage(output_dir: str | Path, config: FilterConfig) -> Stage:
    """The kept-tokens stage of a run: made by ``config`` from the run's finished losses (refused without them)."""
    from dataclasses import asdict

    from .losses import LOSSES_DIR, LOSSES_STAGE

    losses = stage_fingerprint(Path(output_dir) / LOSSES_DIR, LOSSES_STAGE)
    if losses is None:
        raise FileNotFoundError(
            f"{Path(output_dir) / LOSSES_DIR}: the losses are not finished; run `hfx quanta losses` first."
        )
    return Stage(Path(output_dir) / TOKENS_DIR, TOKENS_STAGE, asdict(config), {"losses": losses})


def write_tokens(
    rows: list[dict], output_dir: str | Path, config: FilterConfig, extra: dict | None = None
) -> Path:
    import json
    from dataclasses import asdict

    out = Path(output_dir) / TOKENS_DIR
    write_parquet_atomic(rows, FEATURES, out / "data" / "tokens.parquet")
    write_text_atomic(
        out / "filter_config.json",
        json.dumps({**asdict(config), **(extra or {}), "kept": len(rows)}, indent=2),
    )
    return out


def load_tokens(output_dir: str | Path) -> datasets.Dataset:
    """The kept tokens of a run (refused while the filter is not finished)."""
    path = Path(output_dir) / TOKENS_DIR / "data" / "tokens.parquet"
    if stage_fingerprint(path.parent.parent, TOKENS_STAGE) is None or not path.exists():
        raise FileNotFoundError(
            f"{path.parent.parent}: no finished kept tokens; run `hfx quanta filter` first."
        )
    return datasets.Dataset.from_parquet(str(path), features=FEATURES)
