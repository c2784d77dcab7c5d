"""Stage 4: how good and how cheap a cartridge is, against no context and the document in context (ICL).

Three conditions on the same base model, one table:

* ``no context``: the question alone;
* ``ICL``: the document in the system turn (prefilled once, shared by every question);
* ``cartridge``: the trained KV prefix instead of the document.

Measured per condition: multiple-choice accuracy by answer log-likelihood, log-perplexity of the reference answers,
the KV-cache bytes of what stands in for the document, and batched greedy decode throughput.

Questions file format (JSONL, one object per line)::

    {"question": "How many classes does the wine dataset have?", "choices": ["2", "3", "4", "5"], "answer": 1,
     "kind": "recall"}

``answer`` is the 0-based index of the correct choice (the choice's text is accepted too). ``kind`` (optional,
default ``recall``) is ``recall`` for a question one sentence of the document answers and ``combine`` for one that
needs two or more places of it; the table gives each kind's accuracy when a set has both. Other fields (``where``:
the passage the answer comes from) are kept for readers and ignored.

Every accuracy comes with its 95% Wilson interval, and each condition between no context and ICL with the share of
that gap it closes and a bootstrap interval over questions (:mod:`hfx.statistics`): with a few dozen questions one
question moves an accuracy by several points, and the intervals say how far a figure could move by chance.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hfx.artifacts import require_finite
from hfx.batching import padded
from hfx.cartridges.corpus import document_prefix_ids, document_prefix_ids_within, user_turn_ids
from hfx.cartridges.prefix import PrefixKV, forward_with_prefix
from hfx.models import synchronize

logger = logging.getLogger(__name__)


#: What a question asks of the document: one place of it (``recall``) or several combined (``combine``).
QUESTION_KINDS = ("recall", "combine")


@dataclass
class MCQuestion:
    question: str
    choices: list[str]
    answer: int
    kind: str = "recall"


def load_questions(path: str | Path) -> list[MCQuestion]:
    """Read a questions JSONL file; a malformed row raises ``ValueError`` naming the file and line."""
    path = Path(path)
    questions = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg}).") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected an object with question, choices, answer.")
            missing = [key for key in ("question", "choices", "answer") if key not in row]
            if missing:
                raise ValueError(f"{where}: missing field(s) {', '.join(missing)}.")
            question, choices, answer = row["question"], row["choices"], row["answer"]
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{where}: field 'question' must be a non-empty string.")
            if (
                not isinstance(choices, list)
                or len(choices) < 2
                or not all(isinstance(c, str) and c for c in choices)
            ):
                raise ValueError(
                    f"{where}: field 'choices' must be a list of at least two non-empty strings."
                )
            if isinstance(answer, str):
                if answer not in choices:
                    raise ValueError(f"{where}: field 'answer' {answer!r} is not one of the choices.")
                answer = choices.index(answer)
            if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
                raise ValueError(
                    f"{where}: field 'answer' must be a choice index in [0, {len(choices) - 1}]."
                )
            kind = row.get("kind", "recall")
            if kind not in QUESTION_KINDS:
                raise ValueError(
                    f"{where}: field 'kind' must be one of {', '.join(QUESTION_KINDS)}, got {kind!r}."
                )
            questions.append(MCQuestion(question.strip(), choices, answer, kind))
    if not questions:
        raise ValueError(f"{path}: no questions.")
    return questions


@dataclass
class Condition:
    """One way of giving the model the document: nothing, the document's KV (ICL), or a cartridge."""

    name: str
    prefix: PrefixKV | None
    #: Whether the prefix already contains a system turn (ICL), so prompts continue after it.
    prompt_after_system: bool


@dataclass
class ConditionResult:
    condition: str
    accuracy: float
    answer_log_ppl: float
    kv_tokens: int
    kv_bytes: int
    decode_tokens_per_s: float | None = None
    extra: dict = field(default_factory=dict)
    #: 1/0 per question, in the set's order (what the intervals are computed from).
    correct: list[int] = field(default_factory=list)
    #: The 95% Wilson interval of the accuracy, [low, high].
    accuracy_interval: list[float] | None = None
    #: Accuracy per question kind, with its question count and interval, when the set has several kinds.
    by_kind: dict = field(default_factory=dict)


@dataclass
class QuestionScores:
    """Per question: whether the best-scored choice is the answer, and the answer's log-likelihood and tokens."""

    correct: list[bool]
    answer_logprob: list[float]
    answer_tokens: list[int]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def answer_log_ppl(self) -> float:
        return -sum(self.answer_logprob) / sum(self.answer_tokens)


def score_multiple_choice(
    model,
    tokenizer,
    condition: Condition,
    questions: list[MCQuestion],
    batch_size: int | None = None,
    progress: bool = True,
) -> tuple[float, float]:
    """Accuracy (choice with the highest mean token log-likelihood) and the reference answers' log-perplexity."""
    scores = score_questions(model, tokenizer, condition, questions, batch_size, progress)
    return scores.accuracy, scores.answer_log_ppl


@torch.no_grad()
def score_questions(
    model,
    tokenizer,
    condition: Condition,
    questions: list[MCQuestion],
    batch_size: int | None = None,
    progress: bool = True,
) -> QuestionScores:
    """Each question scored under the condition: the choice with the highest mean token log-likelihood is the
    model's answer; the reference answer's summed log-likelihood and length give the log-perplexity.

    A question's prompt is read once, after the condition's prefix, and each of its choices continues it from
    that cache (``batch_size`` is the number of choices read per forward): the prompt is not recomputed per choice
    and the vocabulary projection runs only over the choices' tokens."""
    if batch_size is None:  # the prefix is copied per choice: fewer per batch for long documents
        prefix_tokens = condition.prefix.num_tokens if condition.prefix is not None else 0
        batch_size = max(2, min(16, 16384 // max(1, prefix_tokens)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts, answers = [], []
    for q in questions:
        prompts.append(user_turn_ids(tokenizer, q.question, after_system=condition.prompt_after_system))
        answers.append([tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in q.choices])
    sum_logprob = torch.zeros(len(questions), max(len(q.choices) for q in questions))
    num_tokens = torch.ones_like(sum_logprob)
    # what every prompt starts with (the chat template's system and user headers) is read once, after the prefix
    prefix, common = _with_common_start(model, condition.prefix, prompts)
    prompts = [prompt[common:] for prompt in prompts]
    # whole questions per batch, at most batch_size choices (one question at least)
    batches, batch, rows = [], [], 0
    for q_idx, q in enumerate(questions):
        if batch and rows + len(q.choices) > batch_size:
            batches.append(batch)
            batch, rows = [], 0
        batch.append(q_idx)
        rows += len(q.choices)
    batches.append(batch)
    for batch in tqdm(batches, desc=f"score [{condition.name}]", disable=not progress):
        picked_prompts, picked_answers = [prompts[i] for i in batch], [answers[i] for i in batch]
        logprobs = _choice_logprobs(model, prefix, picked_prompts, picked_answers, pad_id)
        for q_idx, per_choice in zip(batch, logprobs, strict=True):
            for c_idx, (total, count) in enumerate(per_choice):
                sum_logprob[q_idx, c_idx] = total
                num_tokens[q_idx, c_idx] = count
    mean_logprob = sum_logprob / num_tokens
    return QuestionScores(
        [
            bool(mean_logprob[i, : len(q.choices)].argmax().item() == q.answer)
            for i, q in enumerate(questions)
        ],
        [sum_logprob[i, q.answer].item() for i, q in enumerate(questions)],
        [int(num_tokens[i, q.answer].item()) for i, q in enumerate(questions)],
    )


def _with_common_start(
    model, prefix: PrefixKV | None, prompts: list[list[int]]
) -> tuple[PrefixKV | None, int]:
    """The prefix followed by the tokens all prompts start with (each prompt keeps its last token), and how many
    tokens that is."""
    first = prompts[0]
    common = min(len(prompt) - 1 for prompt in prompts)
    for prompt in prompts[1:]:
        common = next((i for i in range(common) if prompt[i] != first[i]), common)
    if common == 0:
        return prefix, 0
    ids = torch.tensor([first[:common]], device=model.device)
    cache = forward_with_prefix(
        model, prefix, ids, torch.ones_like(ids), use_cache=True, **_no_logits(model)
    ).past_key_values
    return PrefixKV.from_cache(cache), common


def _choice_logprobs(
    model, prefix: PrefixKV | None, prompts: list[list[int]], answers: list[list[list[int]]], pad_id: int
) -> list[list[tuple[float, int]]]:
    """Per question, per choice: the choice's summed token log-likelihood after the prefix and the prompt, and its
    token count.

    The prompts but their last token are read once (right-padded, no logits kept); the cache is then copied to
    one row per choice, and each row reads its prompt's last token and the choice, at the positions that follow
    its own prompt (the padding between is masked)."""
    device = model.device
    shared = [prompt[:-1] for prompt in prompts]
    owner = [q for q, choices in enumerate(answers) for _ in choices]
    tails = [[prompts[q][-1], *choice] for q, choices in enumerate(answers) for choice in choices]
    prefix_tokens = prefix.num_tokens if prefix is not None else 0
    width = max(len(s) for s in shared)
    if width:
        ids, mask = padded(shared, pad_id)
        cache = forward_with_prefix(
            model, prefix, ids.to(device), mask.to(device), use_cache=True, **_no_logits(model)
        ).past_key_values
        cache.batch_select_indices(torch.tensor(owner, device=device))
        shared_mask = mask[owner]
    else:  # one-token prompts: the choices follow the prefix directly
        cache = prefix.cache(len(owner), model.config) if prefix is not None else None
        shared_mask = torch.zeros(len(owner), 0, dtype=torch.long)
    tail_ids, tail_mask = padded(tails, pad_id)
    attention_mask = torch.cat(
        [torch.ones(len(owner), prefix_tokens, dtype=torch.long), shared_mask, tail_mask], dim=1
    )
    starts = torch.tensor([prefix_tokens + len(shared[q]) for q in owner])
    position_ids = starts[:, None] + torch.arange(tail_ids.shape[1])[None, :]
    logits = model(
        input_ids=tail_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        past_key_values=cache,
    ).logits
    targets = tail_ids[:, 1:].to(logits.device)
    scored = tail_mask[:, 1:].bool().to(logits.device)
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets[..., None])[..., 0]
    sums = torch.where(scored, logprobs, 0.0).sum(-1).tolist()  # one copy to the host per batch
    found = [[] for _ in answers]
    for row, q in enumerate(owner):
        found[q].append((sums[row], len(tails[row]) - 1))
    return found


def _no_logits(model) -> dict:
    """``logits_to_keep=1`` where the model takes it (a prompt read only for its cache)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def decode_throughput(
    model,
    tokenizer,
    condition: Condition,
    prompts: list[str],
    new_tokens: int = 32,
    repeats: int = 1,
    max_seconds: float | None = None,
) -> float:
    """Greedy decode tokens/s of ``prompts`` as one batch after the condition's prefix: exactly ``new_tokens`` per
    prompt, through the decode loop synthesis uses (:func:`hfx.generation.decoder_for`: bucketed shapes, a CUDA
    graph per bucket on a GPU, built once per process). Where the loop builds its step on first use (a GPU, or
    compiled), one untimed call comes first; the result is the mean over ``repeats`` timed calls, or over those
    that fit ``max_seconds`` of timed calls (one at least)."""
    from hfx.generation import decoder_for

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs = [user_turn_ids(tokenizer, p, after_system=condition.prompt_after_system) for p in prompts]
    decoder = decoder_for(model)

    def decode():
        return decoder.generate(condition.prefix, seqs, max_new_tokens=new_tokens, pad_token_id=pad_id)

    if decoder.cuda_graphs or decoder.compile:
        decode()
    seconds = []
    for _ in range(repeats):
        if seconds and max_seconds is not None and sum(seconds) + seconds[-1] > max_seconds:
            break  # one more call would go past the time given
        synchronize(model.device)  # time the decode itself, not work queued before it
        start = time.perf_counter()
        decode()
        synchronize(model.device)
        seconds.append(time.perf_counter() - start)
    return new_tokens * len(seqs) / (sum(seconds) / len(seconds))


def estimate_evaluation_seconds(
    model,
    tokenizer,
    document: str,
    questions: list[MCQuestion],
    max_context_tokens: int | None = None,
    sample: int = 4,
    throughput_batch: int = 8,
    throughput_tokens: int = 32,
) -> float:
    """Seconds :func:`evaluate_conditions` will take on this model and device for the three conditions (no
    context, ICL, a cartridge), timed on ``sample`` questions: the document's prefill, the scoring of every question
    with and without the document (a cartridge's p tokens score about as fast as no context) and the decode timing
    of the two conditions with a prefix (the ICL one timed; on a GPU after its untimed first call)."""
    sample_questions = questions[:sample]
    if not sample_questions:
        return 0.0
    synchronize(model.device)
    start = time.perf_counter()
    icl = icl_condition(model, tokenizer, document, max_context_tokens=max_context_tokens)
    synchronize(model.device)
    prefill = time.perf_counter() - start
    per_question = {}
    for condition in (Condition("no context", None, prompt_after_system=False), icl):
        synchronize(model.device)
        start = time.perf_counter()
        score_multiple_choice(model, tokenizer, condition, sample_questions, progress=False)
        synchronize(model.device)
        per_question[condition.name] = (time.perf_counter() - start) / len(sample_questions)
    decode = 0.0
    if throughput_batch > 0:
        prompts = [q.question for q in questions[:throughput_batch]]
        tokens_per_s = decode_throughput(model, tokenizer, icl, prompts, new_tokens=throughput_tokens)
        decode = 2 * len(prompts) * throughput_tokens / tokens_per_s
    scoring = len(questions) * (2 * per_question["no context"] + per_question[icl.name])
    return prefill + scoring + decode


#: Tokens of the model's window kept free of the document for the question and its answer.
ANSWER_ROOM = 256


def default_context_tokens(model) -> int | None:
    """The most document tokens ICL gets by default: the model's window less :data:`ANSWER_ROOM` (None: no
    window known)."""
    window = getattr(model.config, "max_position_embeddings", None)
    return window - ANSWER_ROOM if window is not None else None


def icl_condition(model, tokenizer, document: str, max_context_tokens: int | None = None) -> Condition:
    """The document in the system turn, prefilled once; truncated to ``max_context_tokens`` if given."""
    if max_context_tokens is None:
        prefix_ids, cut = document_prefix_ids(tokenizer, document), False
    else:
        prefix_ids, cut = document_prefix_ids_within(tokenizer, document, max_context_tokens)
    name = f"ICL (first {len(prefix_ids)} tokens)" if cut else "ICL"
    return Condition(name, PrefixKV.prefill(model, prefix_ids), prompt_after_system=True)


def cartridge_condition(peft_model, name: str = "cartridge") -> Condition:
    return Condition(name, PrefixKV.from_peft_model(peft_model), prompt_after_system=False)


def evaluate_conditions(
    model,
    tokenizer,
    conditions: list[Condition],
    questions: list[MCQuestion],
    throughput_batch: int = 8,
    throughput_tokens: int = 32,
    progress: bool = True,
) -> list[ConditionResult]:
    """Score every condition on the questions; decode throughput for the conditions that have a prefix."""
    results = []
    prompts = [q.question for q in questions[:throughput_batch]]
    for condition in conditions:
        scores = score_questions(model, tokenizer, condition, questions, progress=progress)
        accuracy, log_ppl = scores.accuracy, scores.answer_log_ppl
        throughput = None
        if condition.prefix is not None and throughput_batch > 0:
            throughput = decode_throughput(model, tokenizer, condition, prompts, new_tokens=throughput_tokens)
        require_finite(
            [log_ppl] + ([throughput] if throughput is not None else []),
            f"the evaluation of {condition.name} (answer log-perplexity, decode tokens/s)",
        )
        prefix = condition.prefix
        results.append(
            ConditionResult(
                condition=condition.name,
                accuracy=accuracy,
                answer_log_ppl=log_ppl,
                kv_tokens=prefix.num_tokens if prefix is not None else 0,
                kv_bytes=prefix.nbytes if prefix is not None else 0,
                decode_tokens_per_s=throughput,
                correct=[int(c) for c in scores.correct],
                accuracy_interval=_interval(scores.correct),
                by_kind=_by_kind(scores.correct, questions),
            )
        )
        logger.info("%s: accuracy %.3f, answer log-ppl %.3f", condition.name, accuracy, log_ppl)
    return results


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units, e.g. ``4.4 MiB`` (``0`` for nothing)."""
    if n == 0:
        return "0"
    units = ["B", "KiB", "MiB", "GiB"]
    power = min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024**power:.1f} {units[power]}"


def _interval(correct) -> list[float] | None:
    from hfx.statistics import wilson_interval

    if not correct:
        return None
    interval = wilson_interval(sum(bool(c) for c in correct), len(correct))
    return [interval.low, interval.high]


def _by_kind(correct, questions: list[MCQuestion]) -> dict:
    kinds = sorted({q.kind for q in questions}, key=QUESTION_KINDS.index)
    if len(kinds) < 2:
        return {}
    found = {}
    for kind in kinds:
        picked = [int(c) for c, q in zip(correct, questions, strict=True) if q.kind == kind]
        found[kind] = {
            "accuracy": sum(picked) / len(picked),
            "questions": len(picked),
            "interval": _interval(picked),
        }
    return found


def _accuracy(accuracy: float, interval) -> str:
    return f"{accuracy:.3f} ({interval[0]:.2f}–{interval[1]:.2f})" if interval else f"{accuracy:.3f}"


def gap_shares(results: list[ConditionResult], seed: int = 0) -> dict:
    """For each condition besides no context and ICL (a cartridge): the share of the no context -> ICL accuracy
    gap it closes, with its 95% paired bootstrap interval over questions (``{}`` without both ends or per-question
    results). Keyed by condition name; each value is :meth:`hfx.statistics.GapShare.to_dict`."""
    from hfx.statistics import gap_share

    lower = next((r for r in results if r.condition == "no context"), None)
    upper = next((r for r in results if r.condition.startswith("ICL")), None)
    if lower is None or upper is None or len(lower.correct) < 2 or len(upper.correct) != len(lower.correct):
        return {}  # no interval from one question
    return {
        r.condition: gap_share(lower.correct, upper.correct, r.correct, seed=seed).to_dict()
        for r in results
        if r is not lower and r is not upper and len(r.correct) == len(lower.correct)
    }


def format_table(results: list[ConditionResult], num_questions: int | None = None) -> str:
    """A markdown table of the results (the same table the CLI prints and the model card embeds): each accuracy
    with its 95% Wilson interval, accuracies per question kind when the set has several, and the share of the no
    context -> ICL gap that each other condition closes, with its bootstrap interval."""
    lines = [
        "| condition | MC accuracy (95% CI) | answer log-ppl | KV tokens | KV bytes | decode tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        tput = f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s is not None else "—"
        lines.append(
            f"| {r.condition} | {_accuracy(r.accuracy, r.accuracy_interval)} | {r.answer_log_ppl:.3f} | "
            f"{r.kv_tokens} | {format_bytes(r.kv_bytes)} | {tput} |"
        )
    kinds = [kind for kind in QUESTION_KINDS if any(kind in r.by_kind for r in results)]
    if kinds:
        counts = {
            kind: next(r.by_kind[kind]["questions"] for r in results if kind in r.by_kind) for kind in kinds
        }
        lines += [
            "",
            "| condition | " + " | ".join(f"{kind} ({counts[kind]} questions)" for kind in kinds) + " |",
            "|---" * (len(kinds) + 1) + "|",
        ]
        for r in results:
            cells = [
                _accuracy(r.by_kind[kind]["accuracy"], r.by_kind[kind]["interval"])
                if kind in r.by_kind
                else "—"
                for kind in kinds
            ]
            lines.append(f"| {r.condition} | " + " | ".join(cells) + " |")
    for name, gap in gap_shares(results).items():
        if gap["share"] is None:
            lines.append(f"\n{name}: no share of the gap (ICL is not above no context on these questions).")
            continue
        interval = gap["interval"]
        bounds = (
            f" (95% bootstrap interval {interval['low']:.0%} to {interval['high']:.0%})" if interval else ""
        )
        lines.append(f"\n{name} closes {gap['share']:.0%} of the no context → ICL gap{bounds}.")
    if num_questions is not None:
        lines.append(f"\n{num_questions} multiple-choice questions.")
    return "\n".join(lines)


def results_to_json(results: list[ConditionResult]) -> list[dict]:
    return [asdict(r) for r in results]
