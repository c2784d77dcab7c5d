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

import dataclasses
import functools
import hashlib
import json
import logging
import math
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch

from hfx.artifacts import (
    check_parquet_columns,
    load_parquet_shards,
    require_finite,
    shard_files,
    shard_path,
    write_parquet_atomic,
)
from hfx.atomic import write_text_atomic
from hfx.batching import padded
from hfx.cartridges.corpus import Corpus, document_prefix_ids, document_system_prompt, user_turn_ids
from hfx.cartridges.prefix import PrefixKV, forward_with_prefix
from hfx.models import process_state, seeded
from hfx.stages import Stage, fingerprint, run_shards

logger = logging.getLogger(__name__)

#: The stage (hfx.stages) of a synthesis in its folder.
SYNTHESIS_STAGE = "synthesis"
#: The synthesis's settings as the dataset card and a Hub upload carry them.
SETTINGS_FILE = "synthesis_config.json"

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
#: Requests of the ``continuation`` kind; ``{cue}`` is the passage's opening words, quoted from the document.
CONTINUATION_PROMPTS = [
    'Continue this passage of the document, word for word: "{cue}"',
    'Quote the document from "{cue}" onwards.',
    'What does the document say after "{cue}"? Quote it.',
]
#: Requests of the ``quote`` kind; ``{cue}`` is a few words quoted from the middle of the passage asked for.
QUOTE_PROMPTS = [
    'Quote the passage of the document that contains "{cue}".',
    'Which part of the document mentions "{cue}"? Quote it word for word.',
    'Find "{cue}" in the document and quote the whole passage around it.',
]
#: Kinds whose answer is the document's own text, re-read by the teacher: no generation.
QUOTED_KINDS = ("continuation", "quote")
SEED_KINDS = (*SEED_PROMPTS, *QUOTED_KINDS)

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
#: How errors name a synthesis folder's shards, and the dataset they make up.
SHARDS_WHAT = "synthesized shards"
DATASET_WHAT = "a self-study dataset (hfx.cartridges.synthesis.FEATURES)"


@dataclass
class SynthesisConfig:
    """How many conversations to synthesize, and how."""

    num_conversations: int = 384
    #: Conversations per batch; a batch shares one chunk and its KV, and its conversations decode together.
    #: None: 32 on a CPU (small batches keep each step fast), and on a GPU as many as a quarter of its free
    #: memory holds, up to 256 (:func:`resolve_conversations_per_chunk`); the manifest records the number chosen.
    conversations_per_chunk: int | None = None
    #: Chunk length, drawn in [min, max]: a document up to this long is its own chunk (the teacher then reads
    #: it as ICL does); a longer one is studied in windows of this size.
    chunk_min_tokens: int = 2048
    chunk_max_tokens: int = 2048
    max_question_tokens: int = 40
    max_answer_tokens: int = 80
    question_temperature: float = 0.8
    answer_temperature: float = 0.3
    #: Teacher log-probabilities kept per answer token (the distillation target). 64 rather than the paper's 20:
    #: the study's topk64 row lowered the answer log-perplexity (3.00 against 3.10) at the same steps.
    top_k: int = 64
    #: Share of each batch's conversations that ask to continue a passage of the chunk from its opening words
    #: (the ``continuation`` kind): the answer is the document's own next tokens, re-read by the teacher with
    #: the chunk in context. No generation, so they cost a fraction of a generated conversation.
    continuation_fraction: float = 1.0
    #: Opening words (tokens) of a continuation's passage, quoted in its request.
    continuation_cue_tokens: int = 16
    #: Share of those no-generation conversations that quote a few words from the *middle* of a passage and ask
    #: for the whole passage (the ``quote`` kind), so the cartridge also learns what comes before a phrase; the
    #: rest are continuations (what follows a phrase). Half of each by default: all quotes (the study's quote100
    #: row) scored best at 96 steps but, in the longer main job, fitted the quotes and drifted from the questions.
    quote_fraction: float = 0.5
    #: Words (tokens) a ``quote`` request cites from inside its passage.
    quote_cue_tokens: int = 8
    seed: int = 0
    #: Batches per Parquet shard: a killed run loses at most one shard's work.
    batches_per_shard: int = 1

    def __post_init__(self):
        if self.conversations_per_chunk is not None and self.conversations_per_chunk < 1:
            raise ValueError(
                f"SynthesisConfig.conversations_per_chunk must be >= 1, got {self.conversations_per_chunk}."
            )
        for name in (
            "num_conversations",
            "chunk_min_tokens",
            "top_k",
            "batches_per_shard",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"SynthesisConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if not 0.0 <= self.continuation_fraction <= 1.0:
            raise ValueError(
                f"SynthesisConfig.continuation_fraction must be in [0, 1], got {self.continuation_fraction}."
            )
        if not 0.0 <= self.quote_fraction <= 1.0:
            raise ValueError(f"SynthesisConfig.quote_fraction must be in [0, 1], got {self.quote_fraction}.")
        if self.continuation_cue_tokens < 1 or self.quote_cue_tokens < 1:
            raise ValueError("SynthesisConfig.continuation_cue_tokens and quote_cue_tokens must be >= 1.")
        if self.chunk_max_tokens < self.chunk_min_tokens:
            raise ValueError("SynthesisConfig.chunk_max_tokens must be >= chunk_min_tokens.")

    def check_chosen(self) -> None:
        if self.conversations_per_chunk is None:
            raise ValueError(
                "SynthesisConfig.conversations_per_chunk is not chosen yet: resolve_conversations_per_chunk() "
                "sizes it for the model's device."
            )

    @property
    def num_batches(self) -> int:
        self.check_chosen()
        return math.ceil(self.num_conversations / self.conversations_per_chunk)


#: Conversations per chunk when none is given, on a CPU (and with an inference server).
CPU_CONVERSATIONS_PER_CHUNK = 32
#: The most conversations per chunk sized for a GPU.
MAX_CONVERSATIONS_PER_CHUNK = 256


def resolve_conversations_per_chunk(
    config: SynthesisConfig, model=None, output_dir: str | Path | None = None, server=None
) -> SynthesisConfig:
    """``config`` with ``conversations_per_chunk`` chosen when it is None: the number an earlier run of
    ``output_dir`` recorded (a resumed run makes the same batches), else :data:`CPU_CONVERSATIONS_PER_CHUNK` on a
    CPU or with an inference server, else as many as the accelerator's free memory holds
    (:func:`hfx.generation.sequences_in_flight`, at most :data:`MAX_CONVERSATIONS_PER_CHUNK`)."""
    if config.conversations_per_chunk is not None:
        return config
    size = None
    manifest = Path(output_dir) / SETTINGS_FILE if output_dir is not None else None
    if manifest is not None and manifest.is_file():
        try:
            size = json.loads(manifest.read_text()).get("conversations_per_chunk")
        except json.JSONDecodeError:
            size = None  # the stage's check names a broken folder
    if size is None and model is not None and (server is None or not server.server_url):
        from hfx.generation import sequences_in_flight

        prompt_room = 64  # a seed prompt or a question in the chat template
        size = sequences_in_flight(
            model,
            cache_tokens=config.chunk_max_tokens
            + prompt_room
            + max(config.max_question_tokens, config.max_answer_tokens),
            top_k=config.top_k,
            limit=MAX_CONVERSATIONS_PER_CHUNK,
        )
        if size is not None:
            logger.info("%d conversations per chunk: what %s holds", size, model.device)
    return dataclasses.replace(config, conversations_per_chunk=size or CPU_CONVERSATIONS_PER_CHUNK)


def expected_coverage(config: SynthesisConfig, num_tokens: int) -> float:
    """The share of a document of ``num_tokens`` tokens that ``config``'s batches are expected to read: each batch
    reads one random window (:func:`sample_chunk`) of about the mean chunk length."""
    return 1.0 - (1.0 - _mean_chunk_tokens(config, num_tokens) / num_tokens) ** config.num_batches


def _mean_chunk_tokens(config: SynthesisConfig, num_tokens: int) -> float:
    return min(num_tokens, (config.chunk_min_tokens + config.chunk_max_tokens) / 2)


def sparse_coverage_warning(config: SynthesisConfig, num_tokens: int, below: float = 0.5) -> str | None:
    """What to tell a user whose synthesis is expected to read less than ``below`` of the document (large batches
    of one chunk each, on a long document); None when it reads enough."""
    coverage = expected_coverage(config, num_tokens)
    if coverage >= below:
        return None
    return (
        f"{config.num_conversations} conversations at {config.conversations_per_chunk} per chunk read "
        f"{config.num_batches} chunks of about {_mean_chunk_tokens(config, num_tokens):.0f} tokens: about {100 * coverage:.0f}% of the document's "
        f"{num_tokens} tokens, and the cartridge learns little of the rest. Fewer conversations per chunk "
        "(conversations_per_chunk) read more of it, in smaller batches; more conversations, too."
    )


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


@dataclass
class BatchPlan:
    """What one batch is about, drawn from (seed, batch index) alone: the same on every run and every backend."""

    batch_idx: int
    first_id: int
    chunk_start: int
    chunk_end: int
    chunk_text: str
    kinds: list[str]
    seeds: list[str]
    torch_seed: int


def plan_batch(tokenizer, corpus: Corpus, config: SynthesisConfig, batch_idx: int) -> BatchPlan:
    config.check_chosen()
    rng = random.Random(f"{config.seed}-{batch_idx}")
    torch_seed = rng.getrandbits(63)
    first_id = batch_idx * config.conversations_per_chunk
    size = min(config.conversations_per_chunk, config.num_conversations - first_id)
    chunk_start, chunk_end = sample_chunk(corpus.num_tokens, config, rng)
    kinds = [rng.choice(list(SEED_PROMPTS)) for _ in range(size)]
    seeds = [rng.choice(SEED_PROMPTS[kind]) for kind in kinds]
    if config.continuation_fraction > 0:  # drawn only then, so other settings keep their conversations
        for i in range(size):
            if rng.random() < config.continuation_fraction:
                kinds[i], seeds[i] = "continuation", rng.choice(CONTINUATION_PROMPTS)
                if config.quote_fraction > 0 and rng.random() < config.quote_fraction:
                    kinds[i], seeds[i] = "quote", rng.choice(QUOTE_PROMPTS)
    return BatchPlan(
        batch_idx=batch_idx,
        first_id=first_id,
        chunk_start=chunk_start,
        chunk_end=chunk_end,
        chunk_text=tokenizer.decode(corpus.token_ids[chunk_start:chunk_end]),
        kinds=kinds,
        seeds=seeds,
        torch_seed=torch_seed,
    )


def _end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn in the chat template (``<|im_end|>``), else EOS."""
    token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return tokenizer.eos_token_id if token_id is None or token_id == tokenizer.unk_token_id else token_id


def _eos_ids(tokenizer) -> set[int]:
    return {tokenizer.eos_token_id, _end_of_turn_id(tokenizer)} - {None}


def _row(tokenizer, plan: BatchPlan, i: int, question: str, answer_ids, topk_ids, topk_logprobs) -> dict:
    """One dataset row: the student's prompt (no document) + the answer, with the teacher's top-k per answer token."""
    student_prompt = user_turn_ids(tokenizer, question, after_system=False)
    return {
        "conversation_id": plan.first_id + i,
        "seed_kind": plan.kinds[i],
        "chunk_start": plan.chunk_start,
        "chunk_end": plan.chunk_end,
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": tokenizer.decode(answer_ids, skip_special_tokens=True).strip()},
        ],
        "input_ids": student_prompt + list(answer_ids),
        "answer_start": len(student_prompt),
        "topk_token_ids": topk_ids,
        "topk_logprobs": topk_logprobs,
    }


@torch.no_grad()
def synthesize_batch(model, tokenizer, corpus: Corpus, config: SynthesisConfig, batch_idx: int) -> list[dict]:
    """One batch of conversations about one chunk, generated locally. Deterministic in (config.seed, batch_idx)."""
    return LocalBatches(model, tokenizer)(corpus, config, batch_idx)


class LocalBatches:
    """Batches generated by the local model through :func:`hfx.generation.decoder_for` (bucketed shapes, one
    captured decode step per bucket on a GPU, reused across batches and calls)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.answer_stop_ids = sorted(_eos_ids(tokenizer))
        # The user message is cut after its first question mark (clean_user_message): a row stops at a token that
        # holds one, and the batch as soon as every row has, instead of running to max_question_tokens.
        self.question_stop_ids = sorted(set(self.answer_stop_ids) | set(question_mark_ids(tokenizer)))

    @property
    def decoder(self):
        from hfx.generation import decoder_for

        return decoder_for(self.model)

    @torch.no_grad()
    def warm_up(self, corpus: Corpus, config: SynthesisConfig, batches: int = 64) -> int:
        """Build the decode steps (a CUDA graph each on a GPU) of every cache length that the first ``batches``
        batches of ``config`` can need, for each batch bucket their generated conversations fall in (a mix of kinds
        varies from batch to batch); returns how many were new. A later batch of another bucket builds its own when
        it first comes."""
        from hfx.generation import BATCH_FLOOR, WIDTH_FLOOR, bucket

        config = resolve_conversations_per_chunk(config, self.model)
        tokenizer = self.tokenizer

        def width(tokens: int) -> int:  # prompts are padded to a bucket of widths
            return bucket(tokens, WIDTH_FLOOR)

        template = len(document_prefix_ids(tokenizer, ""))
        smallest_chunk = min(corpus.num_tokens, config.chunk_min_tokens)
        largest_chunk = min(corpus.num_tokens, config.chunk_max_tokens)
        # a chunk's text re-tokenizes to about as many tokens; a margin covers the difference
        prefix = (max(1, template + smallest_chunk - 16), template + largest_chunk + 16)
        seeds = [
            len(user_turn_ids(tokenizer, s, after_system=True))
            for kind in SEED_PROMPTS.values()
            for s in kind
        ]
        question = len(user_turn_ids(tokenizer, "", after_system=True))
        asked, answered = config.max_question_tokens, config.max_answer_tokens
        row_buckets = set()
        for batch_idx in range(min(batches, config.num_batches)):
            kinds = plan_batch(tokenizer, corpus, config, batch_idx).kinds
            generated = sum(kind not in QUOTED_KINDS for kind in kinds)
            if generated:
                row_buckets.add(bucket(generated, BATCH_FLOOR))
        new = 0
        for rows in sorted(row_buckets):
            new += self.decoder.warm_up(
                rows,
                (prefix[0] + width(min(seeds)) + asked, prefix[1] + width(max(seeds)) + asked),
                asked,
                sample=config.question_temperature > 0,
                num_stop_ids=len(self.question_stop_ids),
            )
            # a question re-tokenizes to about as many tokens as were generated; 8 more cover the difference
            new += self.decoder.warm_up(
                rows,
                (
                    prefix[0] + width(question + 1) + answered,
                    prefix[1] + width(question + asked + 8) + answered,
                ),
                answered,
                top_k=config.top_k,
                sample=config.answer_temperature > 0,
                num_stop_ids=len(self.answer_stop_ids),
            )
        return new

    @torch.no_grad()
    def __call__(self, corpus: Corpus, config: SynthesisConfig, batch_idx: int) -> list[dict]:
        config = resolve_conversations_per_chunk(config, self.model)
        plan = plan_batch(self.tokenizer, corpus, config, batch_idx)
        chunk_kv = PrefixKV.prefill(self.model, document_prefix_ids(self.tokenizer, plan.chunk_text))
        generated = [i for i, kind in enumerate(plan.kinds) if kind not in QUOTED_KINDS]
        rows = continuation_rows(self.model, self.tokenizer, corpus, config, plan, chunk_kv)
        if generated:
            with seeded(plan.torch_seed, self.model.device):  # sampling draws from torch's global generator
                rows.extend(self._generated_rows(config, plan, chunk_kv, generated))
        return sorted(rows, key=lambda row: row["conversation_id"])

    def _generated_rows(self, config, plan, chunk_kv, indices) -> list[dict]:
        """Agent A writes the user messages of conversations ``indices`` from their seed prompts; agent B answers."""
        tokenizer = self.tokenizer
        prompts_a = [user_turn_ids(tokenizer, plan.seeds[i], after_system=True) for i in indices]
        out_a = self.decoder.generate(
            chunk_kv,
            prompts_a,
            max_new_tokens=config.max_question_tokens,
            pad_token_id=self.pad_id,
            temperature=config.question_temperature,
            stop_token_ids=self.question_stop_ids,
        )
        questions = dict.fromkeys(range(len(plan.kinds)), "")
        for i, ids in zip(indices, out_a.token_ids, strict=True):
            questions[i] = clean_user_message(tokenizer.decode(ids, skip_special_tokens=True))
        keep = [i for i in indices if questions[i]]
        if not keep:
            return []

        # Agent B answers with the chunk in context; its logits are the teacher's, its top-k taken at every step.
        prompts_b = [user_turn_ids(tokenizer, questions[i], after_system=True) for i in keep]
        out_b = self.decoder.generate(
            chunk_kv,
            prompts_b,
            max_new_tokens=config.max_answer_tokens,
            pad_token_id=self.pad_id,
            temperature=config.answer_temperature,
            stop_token_ids=self.answer_stop_ids,
            top_k=config.top_k,
            min_batch=len(indices),  # agent A's batch: the same bucket whatever questions came out empty
        )
        require_finite(
            out_b.topk_logprobs, f"the teacher's top-k log-probabilities of batch {plan.batch_idx}"
        )
        rows = []
        for row, i in enumerate(keep):
            answer_ids = out_b.token_ids[row]
            if not answer_ids:
                continue
            n = len(answer_ids)
            rows.append(
                _row(
                    tokenizer,
                    plan,
                    i,
                    questions[i],
                    answer_ids,
                    out_b.topk_ids[row, :n].tolist(),
                    out_b.topk_logprobs[row, :n].tolist(),
                )
            )
        return rows


@functools.lru_cache(maxsize=8)
def question_mark_ids(tokenizer) -> tuple[int, ...]:
    """Ids of the vocabulary's tokens that hold a question mark (agent A's questions stop at the first)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return tuple(i for i, token in enumerate(tokens) if token and "?" in token)


def continuation_rows(
    model,
    tokenizer,
    corpus: Corpus,
    config: SynthesisConfig,
    plan: BatchPlan,
    chunk_kv: PrefixKV | None = None,
) -> list[dict]:
    """The batch's conversations whose answer is a passage of the document itself (:data:`QUOTED_KINDS`).

    The passage is a random window of the chunk. A ``continuation`` request quotes the words just before it
    ("continue from ..."); a ``quote`` request quotes a few words from its middle ("quote the passage that
    contains ..."). The teacher's top-k at every answer token comes from one forward pass with the chunk in
    context (:func:`rescore`), so the student learns what the model with the document says there.
    """
    wanted = [i for i, kind in enumerate(plan.kinds) if kind in QUOTED_KINDS]
    if not wanted:
        return []
    rng = random.Random(f"{config.seed}-{plan.batch_idx}-continuation")
    chunk = corpus.token_ids[plan.chunk_start : plan.chunk_end]
    conversations = []
    for i in wanted:
        if plan.kinds[i] == "continuation":
            cue_len = config.continuation_cue_tokens
            answer_len = min(config.max_answer_tokens, len(chunk) - cue_len)
            if answer_len < 1:
                continue
            start = rng.randint(0, len(chunk) - cue_len - answer_len)
            cue_ids = chunk[start : start + cue_len]
            answer = chunk[start + cue_len : start + cue_len + answer_len]
        else:
            answer_len = min(config.max_answer_tokens, len(chunk))
            cue_len = min(config.quote_cue_tokens, answer_len)
            start = rng.randint(0, len(chunk) - answer_len)
            answer = chunk[start : start + answer_len]
            cue_at = rng.randint(0, answer_len - cue_len)
            cue_ids = answer[cue_at : cue_at + cue_len]
        cue = tokenizer.decode(cue_ids).strip()
        conversations.append((i, plan.seeds[i].format(cue=cue), answer))
    scored = rescore(
        model,
        tokenizer,
        plan.chunk_text,
        [(q, a) for _, q, a in conversations],
        config.top_k,
        # small batches on a CPU; on an accelerator the batch's whole share in one forward
        batch_size=8 if model.device.type == "cpu" else max(1, len(conversations)),
        chunk_kv=chunk_kv,
    )
    return [
        _row(tokenizer, plan, i, request, answer, top_ids, top_logprobs)
        for (i, request, answer), (top_ids, top_logprobs) in zip(conversations, scored, strict=True)
    ]


@torch.no_grad()
def rescore(
    model,
    tokenizer,
    chunk_text: str,
    conversations: list[tuple[str, list[int]]],
    top_k: int,
    batch_size: int = 8,
    chunk_kv: PrefixKV | None = None,
) -> list[tuple[list[list[int]], list[list[float]]]]:
    """The teacher's exact top-k at every answer token: (question, answer ids) pairs re-read with the chunk in context.

    The chunk's KV is computed once (or given as ``chunk_kv``) and shared; the conversations go through in
    right-padded batches.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if chunk_kv is None:
        chunk_kv = PrefixKV.prefill(model, document_prefix_ids(tokenizer, chunk_text))
    results = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        prompts = [user_turn_ids(tokenizer, question, after_system=True) for question, _ in batch]
        sequences = [p + list(a) for p, (_, a) in zip(prompts, batch, strict=True)]
        ids, mask = padded(sequences, pad_id, device=model.device)
        logits = forward_with_prefix(model, chunk_kv, ids, mask).logits
        for row, (prompt, (_, answer)) in enumerate(zip(prompts, batch, strict=True)):
            step_logits = logits[row, len(prompt) - 1 : len(prompt) - 1 + len(answer)].float()
            values, top = torch.log_softmax(step_logits, dim=-1).topk(top_k, dim=-1)
            require_finite(values, "the teacher's re-scored top-k log-probabilities")
            results.append((top.tolist(), values.tolist()))
    return results


class ServerBatches:
    """Batches generated by an OpenAI-compatible server; the teacher's top-k from the server or re-scored locally."""

    def __init__(
        self, client, model, tokenizer, rescore_batch_size: int = 8, use_server_logprobs: bool = True
    ):
        self.client = client
        self.model = model
        self.tokenizer = tokenizer
        self.rescore_batch_size = rescore_batch_size
        self.use_server_logprobs = use_server_logprobs
        self.counts = {"server_logprobs": 0, "rescored": 0}
        self.rescore_seconds = 0.0

    def __call__(self, corpus: Corpus, config: SynthesisConfig, batch_idx: int) -> list[dict]:
        config = resolve_conversations_per_chunk(config)
        plan = plan_batch(self.tokenizer, corpus, config, batch_idx)
        system = {"role": "system", "content": document_system_prompt(plan.chunk_text)}
        # Per-request seeds: servers that honour them (vLLM, SGLang) give the same conversations on a rerun.
        seed = plan.torch_seed % (2**31)
        # Continuations need no generation: the local teacher re-reads the document's own next tokens.
        rows: dict[int, dict] = {
            row["conversation_id"] - plan.first_id: row
            for row in continuation_rows(self.model, self.tokenizer, corpus, config, plan)
        }
        asked = [i for i, kind in enumerate(plan.kinds) if kind not in QUOTED_KINDS]
        questions = dict.fromkeys(range(len(plan.kinds)), "")
        completions = self.client.complete_many(
            [
                {
                    "messages": [system, {"role": "user", "content": plan.seeds[i]}],
                    "max_tokens": config.max_question_tokens,
                    "temperature": config.question_temperature,
                    "seed": seed + i,
                }
                for i in asked
            ]
        )
        for i, completion in zip(asked, completions, strict=True):
            questions[i] = clean_user_message(completion.text)
        keep = [i for i in asked if questions[i]]
        answers = self.client.complete_many(
            [
                {
                    "messages": [system, {"role": "user", "content": questions[i]}],
                    "max_tokens": config.max_answer_tokens,
                    "temperature": config.answer_temperature,
                    "seed": seed + len(plan.seeds) + i,
                    "top_logprobs": config.top_k if self.use_server_logprobs else None,
                }
                for i in keep
            ]
        )
        eos = _end_of_turn_id(self.tokenizer)
        to_rescore: list[tuple[int, list[int]]] = []
        for i, answer in zip(keep, answers, strict=True):
            if answer.tokens:
                self.counts["server_logprobs"] += 1
                ids = [t[0] for t in answer.tokens]
                rows[i] = _row(
                    self.tokenizer,
                    plan,
                    i,
                    questions[i],
                    ids,
                    [t[1] for t in answer.tokens],
                    [t[2] for t in answer.tokens],
                )
                continue
            ids = self.tokenizer(answer.text.strip(), add_special_tokens=False)["input_ids"]
            if answer.finish_reason == "stop":
                ids = ids + [eos]  # the student learns to end its turn where the teacher did
            if ids:
                to_rescore.append((i, ids))
        if to_rescore:
            start = time.perf_counter()
            scored = rescore(
                self.model,
                self.tokenizer,
                plan.chunk_text,
                [(questions[i], ids) for i, ids in to_rescore],
                config.top_k,
                self.rescore_batch_size,
            )
            self.rescore_seconds += time.perf_counter() - start
            self.counts["rescored"] += len(to_rescore)
            for (i, ids), (top_ids, top_logprobs) in zip(to_rescore, scored, strict=True):
                rows[i] = _row(self.tokenizer, plan, i, questions[i], ids, top_ids, top_logprobs)
        return [rows[i] for i in sorted(rows)]


@contextmanager
def batch_generator(model, tokenizer, server=None, model_name: str = ""):
    """The callable ``(corpus, config, batch_idx) -> rows`` that makes one batch: local, or through a server.

    ``server`` (:class:`~hfx.cartridges.server.ServerArguments` with a ``server_url``) generates with an
    OpenAI-compatible server (a :class:`ServerBatches`, whose client is closed on exit); ``model`` is then the
    local teacher that re-scores answers the server gave no usable log-probs for.
    """
    if server is None or not server.server_url:
        yield LocalBatches(model, tokenizer)
        return
    from hfx.cartridges.server import ChatClient

    client = ChatClient.from_arguments(
        server, default_model=str(getattr(model, "name_or_path", "") or model_name), tokenizer=tokenizer
    )
    try:
        yield ServerBatches(
            client,
            model,
            tokenizer,
            rescore_batch_size=server.rescore_batch_size,
            use_server_logprobs=server.server_logprobs == "auto",
        )
    finally:
        client.close()


def synthesize(
    model,
    tokenizer,
    corpus: Corpus,
    output_dir: str | Path,
    config: SynthesisConfig | None = None,
    model_name: str = "",
    progress: bool = True,
    server=None,
    ready: dict[int, list[dict]] | None = None,
    overwrite: bool = False,
) -> datasets.Dataset:
    """Synthesize ``config.num_conversations`` conversations into ``output_dir`` (resumable); return the dataset.

    The folder is a stage (:mod:`hfx.stages`): a finished synthesis of the same settings and corpus is returned as
    it is, an unfinished one resumed shard by shard; other settings are refused, naming them (``overwrite``
    starts over), another corpus synthesizes again.

    ``server`` (:class:`~hfx.cartridges.server.ServerArguments` with a ``server_url``) generates with an
    OpenAI-compatible server; ``model`` is then the local teacher that re-scores answers the server gave no
    usable log-probs for. ``ready`` maps batch indices to rows already made with this ``config`` (the budget
    planner's probe batches): they are written instead of being generated again.
    """
    config = resolve_conversations_per_chunk(config or SynthesisConfig(), model, output_dir, server)
    for batch_idx in ready or {}:
        if not 0 <= batch_idx < config.num_batches or config.num_conversations < (batch_idx + 1) * (
            config.conversations_per_chunk
        ):
            raise ValueError(f"Batch {batch_idx} given as ready is not a whole batch of this synthesis.")
    with batch_generator(model, tokenizer, server, model_name) as generator:
        return _synthesize(
            tokenizer,
            corpus,
            Path(output_dir),
            config,
            model_name,
            progress,
            generator,
            dict(ready or {}),
            overwrite,
        )


def _synthesize(tokenizer, corpus, output_dir, config, model_name, progress, generator, ready, overwrite):
    manifest = {
        "corpus": corpus.name,
        "corpus_tokens": corpus.num_tokens,
        "model": model_name,
        # Other prompts make other conversations: a resumed run must not mix them.
        "seed_prompts_sha256": hashlib.sha256(json.dumps(SEED_PROMPTS, sort_keys=True).encode()).hexdigest(),
        **asdict(config),
    }
    if isinstance(generator, ServerBatches):
        # Another generator makes other conversations: a resumed run must use the same one.
        manifest["generator"] = {
            "backend": "openai-compatible server",
            "server_model": generator.client.model,
            "server_logprobs": generator.use_server_logprobs,
        }
    # Under `accelerate launch --num_processes N` each process synthesizes every N-th shard on its own device.
    state = process_state()
    # The folder is a stage (hfx.stages): these settings and the corpus's tokens make it. The main process checks
    # and prepares it first (so a mismatch stops it before the others wait for it); `synthesis_config.json` is the
    # record of the settings that the dataset card and a Hub upload carry.
    stage = Stage(output_dir, SYNTHESIS_STAGE, manifest, {"corpus": fingerprint(corpus.token_ids)})
    with state.main_process_first():
        if state.is_main_process:
            status = stage.begin(overwrite=overwrite)
            if status == "new":
                write_text_atomic(output_dir / SETTINGS_FILE, json.dumps(manifest, indent=2))
        else:
            status = stage.status()
    batch_sizes = [
        min(config.conversations_per_chunk, config.num_conversations - b * config.conversations_per_chunk)
        for b in range(config.num_batches)
    ]
    num_shards = math.ceil(config.num_batches / config.batches_per_shard)
    shard_batches = [
        range(s * config.batches_per_shard, min((s + 1) * config.batches_per_shard, config.num_batches))
        for s in range(num_shards)
    ]
    mine = range(state.process_index, num_shards, state.num_processes)
    left = [s for s in mine if not shard_path(output_dir, "train", s).exists()]
    if status == "done":
        missing = [s for s in range(num_shards) if not shard_path(output_dir, "train", s).exists()]
        if not missing:
            return load_synthesis(output_dir)
        # a shard of the finished synthesis was deleted since: it is made again before the dataset counts as done
        logger.warning(
            "%s: shards %s of the finished synthesis are missing; making them again", output_dir, missing
        )
        state.wait_for_everyone()  # every process has seen the marker before it goes
        if state.is_main_process:
            stage.reopen()
    warning = sparse_coverage_warning(config, corpus.num_tokens)
    if warning and status != "done" and state.is_main_process:  # once, as a synthesis starts or resumes
        logger.warning("%s: %s", output_dir, warning)
    if isinstance(generator, LocalBatches) and config.continuation_fraction < 1 and left:
        if generator.decoder.cuda_graphs:  # a graph per bucket now, not one at a time during the run
            logger.info("Decode steps built for %d buckets", generator.warm_up(corpus, config))

    def write_shard(shard: int, bar) -> None:
        rows = []
        for batch_idx in shard_batches[shard]:
            made = ready.pop(batch_idx, None)
            rows.extend(made if made is not None else generator(corpus, config, batch_idx))
            bar.update(batch_sizes[batch_idx])
        write_parquet_atomic(rows, FEATURES, shard_path(output_dir, "train", shard))

    run_shards(
        num_shards,
        lambda shard: shard_path(output_dir, "train", shard),
        write_shard,
        lambda shard: sum(batch_sizes[b] for b in shard_batches[shard]),
        state.process_index,
        state.num_processes,
        desc="synthesize" if state.num_processes == 1 else f"synthesize (process {state.process_index})",
        unit="conv",
        progress=progress,
    )
    state.wait_for_everyone()
    dataset = load_synthesis(output_dir)
    if state.is_main_process:
        write_dataset_card(output_dir, manifest, dataset)
        stage.finish()
    state.wait_for_everyone()
    return dataset


def load_synthesis(output_dir: str | Path) -> datasets.Dataset:
    """Load a synthesis directory's shards as one dataset."""
    return load_parquet_shards(
        output_dir, "train", FEATURES, "run synthesis first", SHARDS_WHAT, DATASET_WHAT
    )


def check_shard_columns(path: str | Path) -> list[str]:
    """The shard's column names; a file that is not Parquet or lacks a column of ``FEATURES`` raises ``ValueError``."""
    return check_parquet_columns(path, FEATURES, DATASET_WHAT)


def shard_statistics(output_dir: str | Path) -> tuple[dict[str, int], int, int]:
    """Conversations per seed kind, answer tokens and rows, read shard by shard (memory does not grow with the
    rows); each shard is checked first."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    kinds = dict.fromkeys(SEED_KINDS, 0)
    answer_tokens = rows = 0
    for path in shard_files(output_dir, "train", "run synthesis first", SHARDS_WHAT):
        check_shard_columns(path)
        table = pq.read_table(path, columns=["seed_kind", "topk_token_ids"])
        for kind, count in zip(*table["seed_kind"].value_counts().flatten(), strict=True):
            kinds[kind.as_py()] = kinds.get(kind.as_py(), 0) + count.as_py()
        answer_tokens += pc.sum(pc.list_value_length(table["topk_token_ids"])).as_py() or 0
        rows += table.num_rows
    return kinds, answer_tokens, rows


def write_dataset_card(output_dir: Path, manifest: dict, dataset: datasets.Dataset) -> None:
    from hfx.hub import render_card

    kinds, answer_tokens, _ = shard_statistics(output_dir)
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
