"""Stage 2: self-study synthesis — conversations about random chunks of the corpus, with the teacher's top-k.

For each batch: draw one chunk (a random token window of the corpus) and a seed-prompt kind per conversation.
Agent A (the model with the chunk in its system turn) turns the seed prompt into a user message; agent B (the same
model, same chunk in context) answers it. The chunk's KV is computed once per batch and shared by both agents and
every conversation of the batch. B's answer is kept with the teacher's top-k log-probabilities at every answer
token, read from the logits ``generate`` already produced *with the chunk in context* — no extra forward pass.

The output is a ``datasets`` dataset written as Parquet shards (one shard per ``batches_per_shard`` batches,
each written to a temp name then renamed). Every batch is seeded from (seed, batch index), so a killed run that is
started again skips the finished shards and produces exactly the rows an uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm

from hfx.artifacts import check_or_write_manifest, write_parquet_atomic
from hfx.cartridges.corpus import Corpus, document_prefix_ids, user_turn_ids
from hfx.cartridges.prefix import PrefixKV, generate_after_prefix

logger = logging.getLogger(__name__)

#: Seed prompts, given to agent A to make it write the user's message. Five kinds, as in self-study.
SEED_PROMPTS: dict[str, list[str]] = {
    "structuring": [
        "Ask the assistant to list the facts (numbers, names, dates) stated in one part of the document above. "
        "Name the part. Write only the request.",
        "Ask the assistant to put the key details of the document above into a short table. Write only the request.",
    ],
    "summarization": [
        "Ask the assistant to summarize the document above in three sentences. Write only the request.",
        "Ask the assistant what the document above is about and what its main facts are. Write only the request.",
    ],
    "question": [
        "Write one question about a specific fact in the document above: a number, a name or a date. "
        "Start with What, Which, Who, When or How many. Write only the question.",
        "Write one question that can only be answered by reading the document above. Mention what the document "
        "is about in the question. Write only the question.",
    ],
    "use_cases": [
        "Someone needs one exact detail from the document above for their work. Write the question they ask the "
        "assistant. Write only the question.",
        "Ask the assistant which facts in the document above matter most for someone using this dataset. "
        "Write only the request.",
    ],
    "creative": [
        "Ask the assistant to write a short quiz, with answers, about the facts in the document above. "
        "Write only the request.",
        "Ask the assistant to explain one fact of the document above to a student. Write only the request.",
    ],
}
SEED_KINDS = tuple(SEED_PROMPTS)

FEATURES = datasets.Features(
    {
        "conversation_id": datasets.Value("int64"),
        "seed_kind": datasets.Value("string"),
        "chunk_start": datasets.Value("int32"),
        "chunk_end": datasets.Value("int32"),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "input_ids": datasets.List(datasets.Value("int32")),
        "answer_start": datasets.Value("int32"),
        "topk_token_ids": datasets.List(datasets.List(datasets.Value("int32"))),
        "topk_logprobs": datasets.List(datasets.List(datasets.Value("float32"))),
    }
)


@dataclass
class SynthesisConfig:
    """How many conversations to synthesize, and how."""

    num_conversations: int = 384
    #: Conversations per batch; a batch shares one chunk and its KV.
    conversations_per_chunk: int = 32
    chunk_min_tokens: int = 256
    chunk_max_tokens: int = 512
    max_question_tokens: int = 40
    max_answer_tokens: int = 80
    question_temperature: float = 0.8
    answer_temperature: float = 0.3
    top_k: int = 20
    seed: int = 0
    #: Batches per Parquet shard: a killed run loses at most one shard's work.
    batches_per_shard: int = 1

    def __post_init__(self):
        for name in (
            "num_conversations",
            "conversations_per_chunk",
            "chunk_min_tokens",
            "top_k",
            "batches_per_shard",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"SynthesisConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.chunk_max_tokens < self.chunk_min_tokens:
            raise ValueError("SynthesisConfig.chunk_max_tokens must be >= chunk_min_tokens.")

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_conversations / self.conversations_per_chunk)


def sample_chunk(num_tokens: int, config: SynthesisConfig, rng: random.Random) -> tuple[int, int]:
    """A random token window ``[start, end)`` of a corpus of ``num_tokens`` tokens."""
    length = min(num_tokens, rng.randint(config.chunk_min_tokens, config.chunk_max_tokens))
    start = rng.randint(0, num_tokens - length)
    return start, start + length


_LEADS = ("question:", "q:", "request:", "user:", "here is the question:", "here's the question:")


def clean_user_message(text: str) -> str:
    """Agent A's output as a user message: drop a leading label and keep the first question if it asked one.

    Small models often wrap the message ("Question: ... Answer: ...") or run on after it; the conversation should
    start from the request itself.
    """
    text = text.strip().strip('"').strip()
    lowered = text.lower()
    for lead in _LEADS:
        if lowered.startswith(lead):
            text = text[len(lead) :].strip().strip('"').strip()
            break
    if "?" in text:
        text = text[: text.index("?") + 1]
    return text.strip()


def _new_tokens(sequences: torch.Tensor, width: int, eos_ids: set[int]) -> list[list[int]]:
    """Generated ids per row, cut after the first end-of-turn token (kept: the student learns to stop)."""
    rows = []
    for seq in sequences[:, width:].tolist():
        for i, tok in enumerate(seq):
            if tok in eos_ids:
                seq = seq[: i + 1]
                break
        rows.append(seq)
    return rows


@torch.no_grad()
def synthesize_batch(model, tokenizer, corpus: Corpus, config: SynthesisConfig, batch_idx: int) -> list[dict]:
    """One batch of conversations about one chunk. Deterministic in (config.seed, batch_idx)."""
    rng = random.Random(f"{config.seed}-{batch_idx}")
    torch.manual_seed(rng.getrandbits(63))
    first_id = batch_idx * config.conversations_per_chunk
    size = min(config.conversations_per_chunk, config.num_conversations - first_id)
    chunk_start, chunk_end = sample_chunk(corpus.num_tokens, config, rng)
    chunk_text = tokenizer.decode(corpus.token_ids[chunk_start:chunk_end])
    kinds = [rng.choice(SEED_KINDS) for _ in range(size)]
    seeds = [rng.choice(SEED_PROMPTS[kind]) for kind in kinds]

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None}
    chunk_kv = PrefixKV.prefill(model, document_prefix_ids(tokenizer, chunk_text))

    # Agent A: the seed prompt becomes a user message.
    prompts_a = [user_turn_ids(tokenizer, seed, after_system=True) for seed in seeds]
    out_a, width_a = generate_after_prefix(
        model,
        chunk_kv,
        prompts_a,
        pad_id,
        max_new_tokens=config.max_question_tokens,
        do_sample=True,
        temperature=config.question_temperature,
    )
    questions = [
        clean_user_message(tokenizer.decode(ids, skip_special_tokens=True))
        for ids in _new_tokens(out_a, width_a, eos_ids)
    ]
    keep = [i for i, q in enumerate(questions) if q]
    if not keep:
        return []

    # Agent B answers with the chunk in context; its logits are the teacher's.
    prompts_b = [user_turn_ids(tokenizer, questions[i], after_system=True) for i in keep]
    out_b, width_b = generate_after_prefix(
        model,
        chunk_kv,
        prompts_b,
        pad_id,
        max_new_tokens=config.max_answer_tokens,
        do_sample=True,
        temperature=config.answer_temperature,
        return_dict_in_generate=True,
        output_logits=True,
    )
    answers_ids = _new_tokens(out_b.sequences, width_b, eos_ids)
    topk_ids, topk_logprobs = [], []
    for step_logits in out_b.logits:  # per step [batch, vocab], raw (before temperature)
        values, ids = torch.log_softmax(step_logits.float(), dim=-1).topk(config.top_k, dim=-1)
        topk_ids.append(ids)
        topk_logprobs.append(values)
    topk_ids = torch.stack(topk_ids, dim=1)
    topk_logprobs = torch.stack(topk_logprobs, dim=1)

    rows = []
    for row, i in enumerate(keep):
        answer_ids = answers_ids[row]
        if not answer_ids:
            continue
        student_prompt = user_turn_ids(tokenizer, questions[i], after_system=False)
        n = len(answer_ids)
        rows.append(
            {
                "conversation_id": first_id + i,
                "seed_kind": kinds[i],
                "chunk_start": chunk_start,
                "chunk_end": chunk_end,
                "messages": [
                    {"role": "user", "content": questions[i]},
                    {
                        "role": "assistant",
                        "content": tokenizer.decode(answer_ids, skip_special_tokens=True).strip(),
                    },
                ],
                "input_ids": student_prompt + answer_ids,
                "answer_start": len(student_prompt),
                "topk_token_ids": topk_ids[row, :n].tolist(),
                "topk_logprobs": topk_logprobs[row, :n].tolist(),
            }
        )
    return rows


def _shard_path(output_dir: Path, shard_idx: int) -> Path:
    return output_dir / "data" / f"train-{shard_idx:05d}.parquet"


def synthesize(
    model,
    tokenizer,
    corpus: Corpus,
    output_dir: str | Path,
    config: SynthesisConfig | None = None,
    model_name: str = "",
    progress: bool = True,
) -> datasets.Dataset:
    """Synthesize ``config.num_conversations`` conversations into ``output_dir`` (resumable); return the dataset."""
    config = config or SynthesisConfig()
    output_dir = Path(output_dir)
    manifest = {
        "corpus": corpus.name,
        "corpus_tokens": corpus.num_tokens,
        "model": model_name,
        # Other prompts make other conversations: a resumed run must not mix them.
        "seed_prompts_sha256": hashlib.sha256(json.dumps(SEED_PROMPTS, sort_keys=True).encode()).hexdigest(),
        **asdict(config),
    }
    check_or_write_manifest(output_dir, manifest, "synthesis_config.json", "synthesis")

    batch_sizes = [
        min(config.conversations_per_chunk, config.num_conversations - b * config.conversations_per_chunk)
        for b in range(config.num_batches)
    ]
    num_shards = math.ceil(config.num_batches / config.batches_per_shard)
    shard_batches = [
        range(s * config.batches_per_shard, min((s + 1) * config.batches_per_shard, config.num_batches))
        for s in range(num_shards)
    ]
    done = {s for s in range(num_shards) if _shard_path(output_dir, s).exists()}
    if done:
        logger.info(
            "Resuming synthesis in %s: %d of %d shards already written", output_dir, len(done), num_shards
        )
    bar = tqdm(
        total=config.num_conversations,
        initial=sum(batch_sizes[b] for s in done for b in shard_batches[s]),
        desc="synthesize",
        unit="conv",
        disable=not progress,
    )
    for shard_idx, batches in enumerate(shard_batches):
        if shard_idx in done:
            continue
        rows = []
        for batch_idx in batches:
            rows.extend(synthesize_batch(model, tokenizer, corpus, config, batch_idx))
            bar.update(batch_sizes[batch_idx])
        write_parquet_atomic(rows, FEATURES, _shard_path(output_dir, shard_idx))
    bar.close()
    dataset = load_synthesis(output_dir)
    write_dataset_card(output_dir, manifest, dataset)
    return dataset


def load_synthesis(output_dir: str | Path) -> datasets.Dataset:
    """Load a synthesis directory's shards as one dataset."""
    files = sorted(str(p) for p in (Path(output_dir) / "data").glob("train-*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"{output_dir}: no synthesized shards (data/train-*.parquet); run synthesis first."
        )
    return datasets.Dataset.from_parquet(files, features=FEATURES)


def write_dataset_card(output_dir: Path, manifest: dict, dataset: datasets.Dataset) -> None:
    from hfx.hub import render_card

    kinds = {kind: 0 for kind in SEED_KINDS}
    for kind in dataset["seed_kind"]:
        kinds[kind] = kinds.get(kind, 0) + 1
    answer_tokens = sum(
        len(ids) - start for ids, start in zip(dataset["input_ids"], dataset["answer_start"], strict=False)
    )
    render_card(
        "dataset_card.md",
        output_dir / "README.md",
        card_kind="dataset",
        card_data={
            "tags": ["hfx", "cartridges", "self-study", "synthetic"],
            "configs": [{"config_name": "default", "data_files": "data/train-*.parquet"}],
        },
        manifest=manifest,
        num_rows=len(dataset),
        answer_tokens=answer_tokens,
        seed_kind_counts=kinds,
        features=FEATURES,
    )
