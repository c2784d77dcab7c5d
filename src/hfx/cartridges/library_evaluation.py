"""A cartridge library against ICL and RAG on one mixed question set (each question tagged with its document).

Every condition gives each question a prefix (or none) and scores the question's choices after it
(:func:`hfx.cartridges.evaluation.score_questions`); questions that get the same prefix are scored together. The
conditions: no context; oracle ICL (the question's document in context); ICL of as many whole documents as fit the
model's window; RAG (BM25 chunks in context) at the KV tokens of the routed cartridges and at a multiple of them;
the composition of all cartridges; the routed top-k cartridges per router; the oracle cartridge. Each for the
cartridges trained alone and trained with distractors, when both libraries are given.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from hfx.cartridges.evaluation import (
    Condition,
    MCQuestion,
    decode_throughput,
    default_context_tokens,
    format_bytes,
    load_questions,
    score_questions,
)
from hfx.cartridges.library import LIBRARY_FILE, ROUTERS, CartridgeLibrary
from hfx.cartridges.prefix import PrefixKV
from hfx.stages import file_fingerprint, fingerprint
from hfx.statistics import wilson_interval

logger = logging.getLogger(__name__)


@dataclass
class TaggedQuestion:
    """A multiple-choice question and the id of the document it is about."""

    question: MCQuestion
    document: str


def mixed_questions(
    library: CartridgeLibrary, questions_dir: str | Path, seed: int = 0
) -> list[TaggedQuestion]:
    """The question sets of the library's documents (``questions_dir/<id>.jsonl``, where one exists), shuffled
    together with ``seed``, each tagged with its document. At least two documents must have a set."""
    questions_dir = Path(questions_dir)
    tagged = []
    for doc_id in library.ids:
        path = questions_dir / f"{doc_id}.jsonl"
        if path.is_file():
            tagged += [TaggedQuestion(q, doc_id) for q in load_questions(path)]
    documents = {t.document for t in tagged}
    if len(documents) < 2:
        raise ValueError(
            f"{questions_dir}: question sets for {sorted(documents) or 'none'} of the library's documents "
            f"({', '.join(library.ids)}); a mixed set needs at least two (files named <document id>.jsonl)."
        )
    random.Random(seed).shuffle(tagged)
    return tagged


@dataclass
class PerQuestionCondition:
    """A condition whose prefix depends on the question: ``keys[i]`` names question ``i``'s prefix, which
    ``make(key)`` builds (``None``: no prefix). ``routed[i]`` are the documents a router gave question ``i``."""

    name: str
    keys: list[tuple]
    make: Callable[[tuple], PrefixKV | None]
    prompt_after_system: bool
    context_tokens: list[int] = field(default_factory=list)
    routed: list[tuple[str, ...]] | None = None
    #: A fingerprint of what ``make`` reads beyond the keys (a library's manifest, a prefilled text): with the keys,
    #: what makes the row (:func:`evaluate_library` keeps rows under it).
    reads: str | None = None


def score_per_question(
    model, tokenizer, condition: PerQuestionCondition, tagged: list[TaggedQuestion], throughput_batch: int = 8,
    throughput_tokens: int = 32, progress: bool = True,
) -> dict:  # fmt: skip
    """Score a per-question condition: one row of the table (accuracy with its interval, routing accuracy, context
    and KV tokens per question, KV bytes, decode tokens/s after the most used prefix)."""
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(condition.keys):
        groups.setdefault(key, []).append(i)
    correct = [False] * len(tagged)
    kv_tokens = [0] * len(tagged)
    kv_bytes = [0] * len(tagged)
    common_key = max(groups, key=lambda k: len(groups[k]))
    throughput = None
    for key, indices in tqdm(groups.items(), desc=f"score [{condition.name}]", disable=not progress):
        prefix = condition.make(key)
        scores = score_questions(
            model,
            tokenizer,
            Condition(condition.name, prefix, condition.prompt_after_system),
            [tagged[i].question for i in indices],
            progress=False,
        )
        for i, ok in zip(indices, scores.correct, strict=True):
            correct[i] = ok
            kv_tokens[i] = prefix.num_tokens if prefix is not None else 0
            kv_bytes[i] = prefix.nbytes if prefix is not None else 0
        if key == common_key and prefix is not None and throughput_batch > 0:
            prompts = [tagged[i].question.question for i in indices[:throughput_batch]]
            throughput = decode_throughput(
                model,
                tokenizer,
                Condition(condition.name, prefix, condition.prompt_after_system),
                prompts,
                new_tokens=throughput_tokens,
            )
    n = len(tagged)
    interval = wilson_interval(sum(correct), n)
    row = {
        "condition": condition.name,
        "accuracy": sum(correct) / n,
        "accuracy_interval": [interval.low, interval.high],
        "correct": [int(c) for c in correct],
        "context_tokens": sum(condition.context_tokens) / n if condition.context_tokens else 0.0,
        "kv_tokens": sum(kv_tokens) / n,
        "kv_bytes": sum(kv_bytes) / n,
        "decode_tokens_per_s": throughput,
        "routing_accuracy": None,
    }
    if condition.routed is not None:
        hits = [t.document in routed for t, routed in zip(tagged, condition.routed, strict=True)]
        row["routing_accuracy"] = sum(hits) / n
    by_document = {}
    for doc in sorted({t.document for t in tagged}):
        subset = [c for c, t in zip(correct, tagged, strict=True) if t.document == doc]
        by_document[doc] = sum(subset) / len(subset)
    row["by_document"] = by_document
    logger.info("%s: accuracy %.3f", condition.name, row["accuracy"])
    return row


def documents_that_fit(library: CartridgeLibrary, tokenizer, max_tokens: int) -> list[str]:
    """The library's documents, in order, as many whole ones as fit one system turn of ``max_tokens`` tokens."""
    from hfx.cartridges.corpus import document_prefix_ids

    kept: list[str] = []
    for doc_id in library.ids:
        text = "\n\n".join(library.text(d) for d in [*kept, doc_id])
        if len(document_prefix_ids(tokenizer, text)) > max_tokens:
            break
        kept.append(doc_id)
    return kept


def question_likelihoods(
    library: CartridgeLibrary, questions: list[str], model, tokenizer, folder: str | Path | None = None
) -> list[list[float]]:
    """:meth:`CartridgeLibrary.likelihoods` of the questions; with ``folder``, kept there under a fingerprint of
    what makes them (the library's manifest, the model, the questions): read back when an earlier run wrote them,
    else computed and written."""
    from hfx.atomic import write_text_atomic

    path = None
    if folder is not None:
        made_by = [
            file_fingerprint(library.folder / LIBRARY_FILE),
            [str(model.config.name_or_path), str(model.dtype), str(model.device.type)],
            list(questions),
        ]
        path = Path(folder) / f"likelihoods-{fingerprint(made_by)}.json"
        if path.is_file():
            logger.info("%s: likelihoods read from %s", library.folder, path)
            return json.loads(path.read_text())["likelihoods"]
    scores = library.likelihoods(questions, model, tokenizer)
    if path is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        write_text_atomic(
            path,
            json.dumps({"library": str(library.folder), "ids": library.ids, "likelihoods": scores}) + "\n",
        )
    return scores


def routed_by_each(
    library: CartridgeLibrary,
    questions: list[str],
    routers: tuple[str, ...],
    k: int,
    model,
    tokenizer,
    likelihoods_dir: str | Path | None = None,
) -> dict[str, list[list[tuple[str, float]]]]:
    """Per router, :meth:`CartridgeLibrary.route`'s top-``k`` of each question; the questions' likelihoods are
    computed once for both likelihood routers (:func:`question_likelihoods`)."""
    likelihoods = None
    if any(router != "bm25" for router in routers):
        likelihoods = question_likelihoods(library, questions, model, tokenizer, likelihoods_dir)
    return {
        router: library.route(
            questions, k=k, router=router, model=model, tokenizer=tokenizer, likelihoods=likelihoods
        )
        for router in routers
    }


def routing_accuracy(
    model,
    tokenizer,
    tagged: list[TaggedQuestion],
    libraries: dict[str, CartridgeLibrary],
    routers: tuple[str, ...] = ROUTERS,
    ks: tuple[int, ...] = (1, 2),
    likelihoods_dir: str | Path | None = None,
) -> dict[str, dict[str, float]]:
    """Per library label, per ``"<router> top-<k>"``: the share of questions whose document is among the routed
    ones (no answers scored: the routing alone)."""
    questions = [t.question.question for t in tagged]
    result = {}
    for label, library in libraries.items():
        result[label] = {}
        routed = routed_by_each(library, questions, routers, max(ks), model, tokenizer, likelihoods_dir)
        for router, ranked in routed.items():
            for k in ks:
                hits = [t.document in {d for d, _ in r[:k]} for t, r in zip(tagged, ranked, strict=True)]
                result[label][f"{router} top-{k}"] = sum(hits) / len(hits)
    return result


def library_conditions(
    model,
    tokenizer,
    tagged: list[TaggedQuestion],
    libraries: dict[str, CartridgeLibrary],
    routers: tuple[str, ...] = ROUTERS,
    ks: tuple[int, ...] = (1, 2),
    rag_multiples: tuple[int, ...] = (1, 3),
    rag_chunk_tokens: int = 128,
    max_context_tokens: int | None = None,
    likelihoods_dir: str | Path | None = None,
) -> list[PerQuestionCondition]:
    """The conditions of the table. ``libraries`` maps a label ("trained alone", "with distractors") to a library
    of the same documents; RAG's budget follows the routed cartridges of the last library at the largest k. The
    questions' likelihoods under each library's cartridges are computed once for both likelihood routers (and,
    with ``likelihoods_dir``, kept there: :func:`routed_by_each`)."""
    from hfx.cartridges.corpus import document_prefix_ids, document_prefix_ids_within
    from hfx.cartridges.routing import ChunkRetriever

    first = next(iter(libraries.values()))
    texts = {doc_id: first.text(doc_id) for doc_id in first.ids}
    for label, library in libraries.items():
        if library.ids != first.ids:
            raise ValueError(f"The {label!r} library has other documents ({library.ids}) than {first.ids}.")
    questions = [t.question.question for t in tagged]
    n = len(tagged)
    icl_cache: dict[tuple, PrefixKV] = {}

    def icl(key: tuple) -> PrefixKV:
        if key not in icl_cache:
            icl_cache.clear()  # one at a time: long documents' KV is large
            ids = document_prefix_ids(tokenizer, "\n\n".join(key[1:]) if key[0] == "text" else "")
            icl_cache[key] = PrefixKV.prefill(model, ids)
        return icl_cache[key]

    def icl_tokens(text: str) -> int:
        return len(document_prefix_ids(tokenizer, text))

    conditions = [PerQuestionCondition("no context", [()] * n, lambda key: None, False, [0] * n)]
    conditions.append(
        PerQuestionCondition(
            "oracle ICL (the question's document)",
            [("text", texts[t.document]) for t in tagged],
            icl,
            True,
            [icl_tokens(texts[t.document]) for t in tagged],
        )
    )
    window = max_context_tokens or default_context_tokens(model)
    fitting = documents_that_fit(first, tokenizer, window) if window else list(first.ids)
    if fitting:
        all_text = "\n\n".join(texts[d] for d in fitting)
        ids, _ = (
            document_prefix_ids_within(tokenizer, all_text, window)
            if window
            else (document_prefix_ids(tokenizer, all_text), False)
        )
        prefilled: list[PrefixKV] = []  # on first use: a row read back needs no prefill

        def everything(key: tuple, ids=ids) -> PrefixKV:
            if not prefilled:
                prefilled.append(PrefixKV.prefill(model, ids))
            return prefilled[0]

        conditions.append(
            PerQuestionCondition(
                f"ICL, {len(fitting)} of {len(first.ids)} documents that fit",
                [("all",)] * n,
                everything,
                True,
                [len(ids)] * n,
                reads=fingerprint(ids),
            )
        )

    routed_by = {}  # (label, router, k) -> per question routed ids
    for label, library in libraries.items():
        routed = routed_by_each(library, questions, routers, max(ks), model, tokenizer, likelihoods_dir)
        for router, ranked in routed.items():
            for k in ks:
                routed_by[(label, router, k)] = [tuple(doc for doc, _ in r[:k]) for r in ranked]

    # RAG: BM25 chunks in context, at the routed cartridges' KV tokens (and multiples of them)
    last_label = list(libraries)[-1]
    budget_library = libraries[last_label]
    budget_route = routed_by[(last_label, routers[0], max(ks))]
    budgets = [sum(budget_library.document(d).num_virtual_tokens for d in routed) for routed in budget_route]
    retriever = ChunkRetriever.from_documents(
        list(texts.items()),
        lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
        chunk_tokens=rag_chunk_tokens,
    )
    for multiple in rag_multiples:
        keys, context = [], []
        for question, budget in zip(questions, budgets, strict=True):
            chunks = retriever.retrieve(question, budget * multiple)
            text = "\n\n".join(c.text for c in chunks)
            keys.append(("text", text))
            context.append(icl_tokens(text))
        label = "" if multiple == 1 else f" x{multiple}"
        conditions.append(
            PerQuestionCondition(
                f"RAG, BM25 chunks at the routed top-{max(ks)} KV tokens{label}", keys, icl, True, context
            )
        )

    for label, library in libraries.items():

        def composed(key: tuple, library=library) -> PrefixKV:
            return library.prefix(list(key), model)

        everything = tuple(library.ids)
        manifest = file_fingerprint(library.folder / LIBRARY_FILE)
        conditions.append(
            PerQuestionCondition(f"all {len(everything)} cartridges composed ({label})", [everything] * n,
                                 composed, False, [0] * n, reads=manifest)
        )  # fmt: skip
        for router in routers:
            for k in ks:
                routed = routed_by[(label, router, k)]
                conditions.append(
                    PerQuestionCondition(
                        f"routed top-{k}, {router} ({label})", list(routed), composed, False, [0] * n, routed,
                        reads=manifest,
                    )
                )  # fmt: skip
        conditions.append(
            PerQuestionCondition(
                f"oracle cartridge ({label})", [(t.document,) for t in tagged], composed, False, [0] * n,
                reads=manifest,
            )
        )  # fmt: skip
    return conditions


def evaluate_library(
    model,
    tokenizer,
    tagged: list[TaggedQuestion],
    libraries: dict[str, CartridgeLibrary],
    throughput_batch: int = 8,
    throughput_tokens: int = 32,
    progress: bool = True,
    aliases: dict[str, list[str]] | None = None,
    rows_dir: str | Path | None = None,
    **condition_kwargs,
) -> dict:
    """Every condition of :func:`library_conditions` scored on the mixed questions, plus BM25's routing accuracy
    on the questions with their document's names masked (the ids, and the names in ``aliases``: id -> the names the
    questions call it by), which says how much routing owes to questions that name their document.

    With ``rows_dir``, each condition's row is written there as it is scored, under a fingerprint of what makes it
    (its prefixes' keys and what they read: the library it uses, the text it prefills; the questions, the model,
    the settings), and a rerun reads the rows it has instead of scoring them again: a killed evaluation loses at
    most the condition in progress, and a library added to the evaluation scores only its own rows. Rows kept by
    earlier versions (one folder per set of libraries) are adopted once."""
    from hfx.atomic import write_text_atomic
    from hfx.cartridges.routing import mask_document_names

    conditions = library_conditions(
        model, tokenizer, tagged, libraries, likelihoods_dir=rows_dir, **condition_kwargs
    )
    store = None
    if rows_dir is not None:
        base = {
            "questions": [[t.document, t.question.question, t.question.answer] for t in tagged],
            "model": [str(model.config._name_or_path), str(model.dtype), str(model.device.type)],
            # what the condition settings (routers, k, RAG's chunks and multiples, the window) change is in each
            # condition's name, keys and reads, so a row is shared by evaluations of other subsets of conditions;
            # the empty entry stood for them once and keeps the rows stored then under their keys
            "settings": [throughput_batch, throughput_tokens, {}],
        }
        store = Path(rows_dir) / ROWS_FOLDER
        if not all((store / f"{row_key(c, base)}.json").is_file() for c in conditions):
            _adopt_earlier_rows(model, tokenizer, tagged, libraries, rows_dir, base, condition_kwargs)
    rows, scored_now = [], []
    for condition in conditions:
        path = store / f"{row_key(condition, base)}.json" if store is not None else None
        if path is not None and path.is_file():
            logger.info("%s: read from %s", condition.name, path)
            rows.append(json.loads(path.read_text()))
            continue
        row = score_per_question(
            model, tokenizer, condition, tagged, throughput_batch, throughput_tokens, progress
        )
        scored_now.append(condition.name)
        if path is not None:
            write_text_atomic(path, json.dumps(row) + "\n")
        rows.append(row)
    first = next(iter(libraries.values()))
    names = list(first.ids) + [name for doc in first.ids for name in (aliases or {}).get(doc, [])]
    masked = [mask_document_names(t.question.question, names) for t in tagged]
    named = sum(m != t.question.question for m, t in zip(masked, tagged, strict=True))
    routing_masked = {}
    for k in (1, 2):
        routed = first.route(masked, k=k)
        hits = [t.document in {d for d, _ in r} for t, r in zip(tagged, routed, strict=True)]
        routing_masked[f"bm25 top-{k}, names masked"] = sum(hits) / len(hits)
    counts: dict[str, int] = {}
    for t in tagged:
        counts[t.document] = counts.get(t.document, 0) + 1
    return {
        "rows": rows,
        "num_questions": len(tagged),
        "questions_per_document": counts,
        "routing_with_names_masked": routing_masked,
        "questions_naming_their_document": named,
        "libraries": {label: str(library.folder) for label, library in libraries.items()},
        "scored_this_run": scored_now,
    }


#: The folder of ``rows_dir`` that keeps each scored row under :func:`row_key`.
ROWS_FOLDER = "conditions"
#: Written into a folder of rows kept by earlier versions once its rows are adopted: it is not read again.
ADOPTED_MARKER = "adopted"


def row_key(condition: PerQuestionCondition, base: dict) -> str:
    """What makes a condition's row: its name, its prefixes' keys and what they read, and ``base`` (the questions,
    the model, the settings)."""
    return fingerprint(
        {**base, "condition": condition.name, "keys": condition.keys, "reads": condition.reads}
    )


def _adopt_earlier_rows(model, tokenizer, tagged, libraries, rows_dir, base, condition_kwargs) -> None:
    """Rows that earlier versions kept in one folder per set of libraries (named by a fingerprint of the libraries'
    manifests and ``base``): for each set of these ``libraries`` (in their order) that has such a folder, its
    conditions are made again and each kept row is stored under its condition's :func:`row_key`."""
    from itertools import combinations

    from hfx.atomic import write_text_atomic

    labels = list(libraries)
    store = Path(rows_dir) / ROWS_FOLDER
    for size in range(len(labels), 0, -1):
        for chosen in combinations(labels, size):
            subset = {label: libraries[label] for label in chosen}
            made_by = {
                "libraries": {
                    label: file_fingerprint(library.folder / LIBRARY_FILE)
                    for label, library in subset.items()
                },
                **base,
                "settings": [*base["settings"][:2], condition_kwargs],  # as these folders were named
            }
            folder = Path(rows_dir) / fingerprint(made_by)
            if (folder / ADOPTED_MARKER).is_file():  # its rows are in the store already
                continue
            kept = {}
            for path in sorted([*folder.glob("[0-9]*.json"), *folder.glob("row-*.json")]):
                row = json.loads(path.read_text())
                kept[row["condition"]] = row
            if not kept:
                continue
            for condition in library_conditions(
                model, tokenizer, tagged, subset, likelihoods_dir=rows_dir, **condition_kwargs
            ):
                path = store / f"{row_key(condition, base)}.json"
                if condition.name in kept and not path.is_file():
                    write_text_atomic(path, json.dumps(kept[condition.name]) + "\n")
                    logger.info("%s: adopted from %s", condition.name, folder)
            write_text_atomic(folder / ADOPTED_MARKER, "")


def format_library_table(report: dict) -> str:
    """Markdown: one row per condition (accuracy with its 95% interval, routing accuracy, context and KV tokens per
    question, KV bytes, decode tokens/s)."""
    lines = [
        "| condition | accuracy (95% CI) | routing accuracy | context tokens | KV tokens | KV bytes | decode tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        low, high = row["accuracy_interval"] or (float("nan"), float("nan"))
        routing = "—" if row["routing_accuracy"] is None else f"{row['routing_accuracy']:.3f}"
        decode = "—" if row["decode_tokens_per_s"] is None else f"{row['decode_tokens_per_s']:.0f}"
        lines.append(
            f"| {row['condition']} | {row['accuracy']:.3f} ({low:.2f}–{high:.2f}) | {routing} | "
            f"{row['context_tokens']:.0f} | {row['kv_tokens']:.0f} | {format_bytes(int(row['kv_bytes']))} | "
            f"{decode} |"
        )
    counts = ", ".join(f"{doc}: {n}" for doc, n in sorted(report["questions_per_document"].items()))
    masked = ", ".join(f"{name} {value:.3f}" for name, value in report["routing_with_names_masked"].items())
    lines.append(
        f"\n{report['num_questions']} multiple-choice questions ({counts}); "
        f"{report['questions_naming_their_document']} name their document. Routing accuracy: {masked}."
    )
    return "\n".join(lines)
