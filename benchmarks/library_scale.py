"""A cartridge library at scale: BM25 routing latency and a cartridge cache under a Zipf question stream, on a
synthetic library of 1,000 random cartridges (by default).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/library_scale.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/library_scale.py --num_documents 5000 --p 16 --questions 20000
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/library_scale.py --num_documents 40 --questions 200 \\
        --output_dir /tmp/library-scale-smoke

The library (``--output_dir``/library) is laid out as ``hfx cartridge library build`` writes one (``library.json``,
each document's text, one cartridge folder each) and read through the real ``CartridgeLibrary``. It is a stage: a
rerun with the same settings reuses it, one with other settings is refused (``--overwrite`` replaces it). Each
cartridge holds random KV values of the model shape ``--shape`` (SmolLM2-135M's by default: 30 layers, 3 KV heads,
head_dim 64, float32 on disk: 45 KiB a token, so p = 32 is 1.41 MiB a cartridge and 1,000 of them 1.37 GiB; the free
disk is checked first). Only shapes and bytes matter here, so nothing is trained and no model is loaded.

Each document is 200-400 words of Python's own documentation (``pydoc_data.topics``), drawn with a Zipf law over
the words' frequency; 15% of them come from 20 "topic" words of its own, drawn among the vocabulary's 50th to
1000th most frequent (so that many documents of a large library share each one), and three made-up rare words
occur twice each. The ``num_tokens`` it records is its number of words.
A question targets a document drawn with a Zipf law over the documents (rank r with probability proportional to
1/r^s, ``--zipf_s``; a seeded permutation maps ranks to documents) and is ``--question_words`` words of it, one of
them a rare word with probability ``--rare_word_probability``: routing is good but not perfect.

Measured, each beside its baseline in the same process:

* routing (``library.route``, BM25 by bm25s): the index's build (once, on the first route: it reads every text),
  the latency of one question (median, p95) and the time per question of ``route`` in batches of
  ``--route_batch``, alternated with routing one question at a time; the accuracy (target first, target in top-k);
* the cache: the stream's routed top-k cartridges fetched through a ``CartridgeCache`` whose ``load`` is
  ``load_prefix`` (as ``CartridgeLibrary.prefix`` does; here in float32 on the CPU), for each of ``--capacities``
  (shares of the library's cartridge bytes, rounded down to whole cartridges, at least one): hit rate and seconds
  per question spent fetching, against the same stream with no cache (each cartridge read from its files every
  time). The replays are long, so each runs ``--repeats`` times (default once), alternating with the others. Every
  cartridge is read once beforehand, so both sides read from the OS page cache, not from the disk;
* grouping a server's batches: per ``--serve_batch`` consecutive questions, the distinct composed prefixes (routed
  top-k in order, and as sets) and cartridges: the prefills a server grouping questions by cartridges makes.

It prints markdown tables for the docs and ``RESULT`` lines (routing batched over one at a time; fetching with no
cache over with each cache), and writes every number to ``--output_dir``/results.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from _measure import interleaved_times
from _random_models import SHAPES
from tqdm.auto import tqdm

from hfx.atomic import write_text_atomic
from hfx.cartridges.composition import load_prefix, save_prefix
from hfx.cartridges.library import (
    LIBRARY_FILE,
    LIBRARY_FORMAT,
    CartridgeLibrary,
    LibraryDocument,
    LibrarySettings,
    document_slug,
    text_sha256,
)
from hfx.cartridges.prefix import PrefixKV
from hfx.cartridges.routing import CartridgeCache
from hfx.cartridges.training import is_trained_cartridge
from hfx.models import model_id
from hfx.stages import Stage, StageMismatch, fingerprint

#: Version of the synthetic documents and cartridges (a change rebuilds the library).
GENERATOR_VERSION = 1
#: The base model each shape's cartridges are recorded for.
BASE_MODELS = {"smollm2-135m": "embedded", "llama-3.2-1b": "meta-llama/Llama-3.2-1B"}
WORDS_PER_DOCUMENT = (200, 400)
TOPIC_WORDS = 20
TOPIC_SHARE = 0.15
#: The ranks (by frequency) of the vocabulary that topic words come from: common enough to be shared.
TOPIC_RANKS = (50, 1000)
RARE_WORDS = 3
RARE_REPEATS = 2
WORDS_PER_LINE = 16
SYLLABLES = [consonant + vowel for consonant in "bdfgklmnprstvz" for vowel in "aeiou"]


@dataclass
class SyntheticDocument:
    id: str
    text: str
    common_words: list[str]
    rare_words: list[str]


def kv_shape(shape: str) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) of a model shape."""
    config = SHAPES[shape]
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    return config["num_hidden_layers"], config["num_key_value_heads"], head_dim


def vocabulary() -> tuple[list[str], np.ndarray]:
    """Words of Python's bundled documentation, most frequent first, with Zipf probabilities (1/rank)."""
    import pydoc_data.topics

    counts = Counter(
        word
        for text in pydoc_data.topics.topics.values()
        for word in re.findall(r"[a-z]+", text.lower())
        if len(word) >= 2
    )
    words = sorted(counts, key=lambda word: (-counts[word], word))
    weights = 1.0 / np.arange(1, len(words) + 1)
    return words, weights / weights.sum()


def new_rare_words(rng: np.random.Generator, count: int, taken: set[str]) -> list[str]:
    rare = []
    while len(rare) < count:
        word = "".join(rng.choice(SYLLABLES, size=4))
        if word not in taken:
            taken.add(word)
            rare.append(word)
    return rare


def synthetic_documents(num_documents: int, seed: int) -> tuple[list[SyntheticDocument], str]:
    """The library's documents, and the fingerprint of the vocabulary they were drawn from."""
    words, probabilities = vocabulary()
    rng = np.random.default_rng([seed, 0])
    taken = set(words)
    topic_pool = np.arange(TOPIC_RANKS[0], min(TOPIC_RANKS[1], len(words)))
    width = len(str(num_documents - 1))
    documents = []
    for i in range(num_documents):
        length = int(rng.integers(WORDS_PER_DOCUMENT[0], WORDS_PER_DOCUMENT[1] + 1))
        topic = rng.choice(topic_pool, size=TOPIC_WORDS, replace=False)
        rare = new_rare_words(rng, RARE_WORDS, taken)
        num_topic = int(length * TOPIC_SHARE)
        num_background = length - num_topic - RARE_WORDS * RARE_REPEATS
        drawn = np.concatenate(
            [rng.choice(len(words), size=num_background, p=probabilities), rng.choice(topic, size=num_topic)]
        )
        common = [words[j] for j in drawn]
        tokens = common + rare * RARE_REPEATS
        tokens = [tokens[j] for j in rng.permutation(len(tokens))]
        text = "\n".join(
            " ".join(tokens[start : start + WORDS_PER_LINE])
            for start in range(0, len(tokens), WORDS_PER_LINE)
        )
        documents.append(SyntheticDocument(f"doc-{i:0{width}d}", text, common, rare))
    return documents, fingerprint(words)


def random_prefix(shape: str, p: int, seed: int, index: int) -> PrefixKV:
    layers, heads, head_dim = kv_shape(shape)
    rng = np.random.default_rng([seed, 2, index])
    kv = torch.from_numpy(rng.standard_normal((layers, 2, heads, p, head_dim), dtype=np.float32))
    return PrefixKV(
        [kv[i, 0].unsqueeze(0) for i in range(layers)], [kv[i, 1].unsqueeze(0) for i in range(layers)]
    )


def check_free_disk(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise SystemExit(
            f"{folder}: the library needs {needed / 2**30:.2f} GiB more and the disk has {free / 2**30:.2f} GiB "
            "free. Give --output_dir on a larger disk, or a smaller --p or --num_documents."
        )


def build_synthetic_library(
    folder: Path, documents: list[SyntheticDocument], vocabulary_fingerprint: str, args
) -> str:
    """Write (or reuse) the library in ``folder``; returns the stage's status before the build."""
    settings = {
        "num_documents": args.num_documents,
        "p": args.p,
        "shape": args.shape,
        "seed": args.seed,
        "generator": GENERATOR_VERSION,
    }
    stage = Stage(folder, "synthetic-library", settings, {"vocabulary": vocabulary_fingerprint})
    try:
        status = stage.begin(overwrite=args.overwrite)
    except StageMismatch as error:
        raise SystemExit(str(error)) from error
    if status == "done":
        return status
    layers, heads, head_dim = kv_shape(args.shape)
    cartridge_bytes = layers * 2 * heads * args.p * head_dim * 4
    library_settings = LibrarySettings(model_name_or_path=BASE_MODELS[args.shape], distractors="none")
    base_model = model_id(library_settings.model_name_or_path)
    taken: set[str] = set()
    entries = []
    for document in documents:
        slug = document_slug(document.id, taken)
        taken.add(slug)
        entries.append(
            LibraryDocument(
                id=document.id,
                title=f"Synthetic document {document.id}",
                source="synthetic",
                num_tokens=len(document.text.split()),
                num_virtual_tokens=args.p,
                text_sha256=text_sha256(document.text),
                settings_fingerprint=fingerprint(settings),
                document=f"documents/{slug}.txt",
                cartridge=f"cartridges/{slug}/cartridge",
            )
        )
    missing = sum(not is_trained_cartridge(folder / entry.cartridge) for entry in entries)
    check_free_disk(folder, missing * (cartridge_bytes + (16 << 10)) + len(documents) * (4 << 10))
    for index, (entry, document) in enumerate(
        tqdm(list(zip(entries, documents, strict=True)), desc="building the library", unit="document")
    ):
        path = folder / entry.document
        if not path.is_file() or path.read_text(encoding="utf-8") != document.text:
            write_text_atomic(path, document.text)
        if not is_trained_cartridge(folder / entry.cartridge):
            save_prefix(
                random_prefix(args.shape, args.p, args.seed, index),
                folder / entry.cartridge,
                base_model=base_model,
                metadata={"corpus": document.id, "trained": False, "synthetic": True},
            )
    manifest = {
        "format": LIBRARY_FORMAT,
        "base_model": base_model,
        "settings": asdict(library_settings),
        "num_documents": len(entries),
        "documents": [asdict(entry) for entry in entries],
        "pending": [],
    }
    write_text_atomic(folder / LIBRARY_FILE, json.dumps(manifest, indent=2) + "\n")
    stage.finish()
    return status


def question_stream(documents: list[SyntheticDocument], args) -> tuple[list[str], list[str]]:
    """``--questions`` questions and the id of the document each targets, targets drawn with a Zipf law."""
    rng = np.random.default_rng([args.seed, 1])
    num_documents = len(documents)
    probabilities = 1.0 / np.arange(1, num_documents + 1) ** args.zipf_s
    probabilities /= probabilities.sum()
    document_of_rank = rng.permutation(num_documents)
    targets = document_of_rank[rng.choice(num_documents, size=args.questions, p=probabilities)]
    questions = []
    for target in targets:
        document = documents[target]
        words = [str(word) for word in rng.choice(document.common_words, size=args.question_words)]
        if rng.random() < args.rare_word_probability:
            words[int(rng.integers(len(words)))] = str(rng.choice(document.rare_words))
        questions.append(" ".join(words) + "?")
    return questions, [documents[target].id for target in targets]


def measure_routing(
    library: CartridgeLibrary, questions: list[str], targets: list[str], args
) -> tuple[dict, list]:
    start = time.perf_counter()
    library.bm25()
    index_seconds = time.perf_counter() - start
    sample = questions[: args.latency_questions]
    library.route(sample[:8], k=args.k)  # the first retrieval's one-off costs stay out of the timers
    latencies: list[float] = []

    def one_at_a_time() -> None:
        for question in sample:
            start = time.perf_counter()
            library.route([question], k=args.k)
            latencies.append(time.perf_counter() - start)

    def batched() -> None:
        for start in range(0, len(sample), args.route_batch):
            library.route(sample[start : start + args.route_batch], k=args.k)

    times = interleaved_times({"one": one_at_a_time, "batched": batched}, repeats=3, warmup=0)
    routed = []
    for start in range(0, len(questions), args.route_batch):
        routed += library.route(questions[start : start + args.route_batch], k=args.k)
    routed_ids = [[doc_id for doc_id, _ in ranked] for ranked in routed]
    results = {
        "index_seconds": index_seconds,
        "sample_questions": len(sample),
        "latency_median_seconds": statistics.median(latencies),
        "latency_p95_seconds": float(np.percentile(latencies, 95)),
        "one_at_a_time_seconds_per_question": times["one"] / len(sample),
        "batched_seconds_per_question": times["batched"] / len(sample),
        "batched_speedup": times["one"] / times["batched"],
        "accuracy_top1": float(
            np.mean([ids[0] == target for ids, target in zip(routed_ids, targets, strict=True)])
        ),
        "accuracy_topk": float(
            np.mean([target in ids for ids, target in zip(routed_ids, targets, strict=True)])
        ),
    }
    return results, routed_ids


def measure_cache(library: CartridgeLibrary, routed_ids: list[list[str]], args) -> dict:
    def load(doc_id: str) -> PrefixKV:
        return load_prefix(library.cartridge_dir(doc_id), dtype=torch.float32, device="cpu")

    sizes = {
        doc_id: load(doc_id).nbytes
        for doc_id in tqdm(library.ids, desc="reading every cartridge once", unit="cartridge")
    }
    library_bytes = sum(sizes.values())
    cartridge_bytes = max(sizes.values())
    caches: dict[str, CartridgeCache] = {}

    def no_cache() -> None:
        for doc_ids in routed_ids:
            for doc_id in doc_ids:
                load(doc_id)

    def with_cache(fraction: float):
        capacity = max(1, int(fraction * library_bytes) // cartridge_bytes) * cartridge_bytes

        def replay() -> None:
            cache = caches[f"{fraction:g}"] = CartridgeCache(
                capacity, load=load, size_of=lambda prefix: prefix.nbytes
            )
            for doc_ids in routed_ids:
                for doc_id in doc_ids:
                    cache.get(doc_id)

        return replay

    print(
        f"replaying {len(routed_ids)} questions' top-{args.k} cartridges with no cache and "
        f"{len(args.capacities)} caches, {args.repeats} time(s) each"
    )
    fns = {"none": no_cache, **{f"{fraction:g}": with_cache(fraction) for fraction in args.capacities}}
    times = interleaved_times(fns, repeats=args.repeats, warmup=0)
    no_cache_seconds = times["none"] / len(routed_ids)
    rows = []
    for fraction in args.capacities:
        stats = caches[f"{fraction:g}"].stats()
        seconds = times[f"{fraction:g}"] / len(routed_ids)
        rows.append(
            {
                "fraction": fraction,
                "capacity_cartridges": stats["capacity_bytes"] // cartridge_bytes,
                **stats,
                "seconds_per_question": seconds,
                "no_cache_seconds_per_question": no_cache_seconds,
                "speedup": no_cache_seconds / seconds,
            }
        )
    return {"library_bytes": library_bytes, "cartridge_bytes": cartridge_bytes, "capacities": rows}


def measure_grouping(routed_ids: list[list[str]], serve_batch: int) -> dict:
    batches = [routed_ids[start : start + serve_batch] for start in range(0, len(routed_ids), serve_batch)]
    batches = [batch for batch in batches if len(batch) == serve_batch] or batches[:1]
    return {
        "batch": len(batches[0]),
        "batches": len(batches),
        "prefixes_per_batch": statistics.mean(len({tuple(ids) for ids in batch}) for batch in batches),
        "prefix_sets_per_batch": statistics.mean(len({frozenset(ids) for ids in batch}) for batch in batches),
        "cartridges_per_batch": statistics.mean(len({i for ids in batch for i in ids}) for batch in batches),
    }


def size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def print_tables(results: dict, args) -> None:
    routing, cache, grouping = results["routing"], results["cache"], results["grouping"]
    print(
        f"\n{args.num_documents:,} documents, cartridges of p = {args.p} ({size(cache['cartridge_bytes'])} each, "
        f"{size(cache['library_bytes'])} in all); {args.questions:,} questions, Zipf s = {args.zipf_s} over the "
        f"documents; top-{args.k} routed\n"
    )
    print("| measure | value |\n|---|---|")
    print(f"| BM25 index build (first route; reads every text) | {routing['index_seconds']:.3f} s |")
    print(
        f"| route one question: median / p95 | {milliseconds(routing['latency_median_seconds'])} / "
        f"{milliseconds(routing['latency_p95_seconds'])} |"
    )
    print(
        f"| route in batches of {args.route_batch}, per question | "
        f"{milliseconds(routing['batched_seconds_per_question'])} "
        f"({routing['batched_speedup']:.1f}x one at a time, {milliseconds(routing['one_at_a_time_seconds_per_question'])}) |"
    )
    print(
        f"| accuracy: target first / in top-{args.k} | {routing['accuracy_top1']:.1%} / "
        f"{routing['accuracy_topk']:.1%} |"
    )
    print(
        f"| per {grouping['batch']} questions: composed prefixes (as sets) | {grouping['prefixes_per_batch']:.1f} "
        f"({grouping['prefix_sets_per_batch']:.1f}) |"
    )
    print(
        f"| per {grouping['batch']} questions: distinct cartridges | {grouping['cartridges_per_batch']:.1f} |"
    )
    print(
        "\n| cache (share of the library) | cartridges held | hit rate | fetch per question | no cache | ratio |"
        "\n|---|---|---|---|---|---|"
    )
    for row in cache["capacities"]:
        print(
            f"| {row['fraction']:.0%} ({size(row['capacity_bytes'])}) | {row['capacity_cartridges']} | "
            f"{row['hit_rate']:.1%} | {milliseconds(row['seconds_per_question'])} | "
            f"{milliseconds(row['no_cache_seconds_per_question'])} | {row['speedup']:.2f}x |"
        )
    times = "once" if args.repeats == 1 else f"the median of {args.repeats}"
    print(
        f"\n(each replay timed {times}; fetches read the OS page cache, every cartridge having been read once)"
    )
    print(f"RESULT library_route_batch{args.route_batch} {routing['batched_speedup']:.3f}")
    for row in cache["capacities"]:
        print(f"RESULT library_cache_{row['fraction'] * 100:g}pct {row['speedup']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_documents", "--num-documents", type=int, default=1000)
    parser.add_argument("--p", type=int, default=32, help="tokens of each cartridge")
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default="smollm2-135m", help="the cartridges' KV shape"
    )
    parser.add_argument("--questions", type=int, default=5000, help="length of the question stream")
    parser.add_argument(
        "--zipf_s", "--zipf-s", type=float, default=1.1, help="exponent of the documents' Zipf law"
    )
    parser.add_argument("--question_words", "--question-words", type=int, default=6)
    parser.add_argument("--rare_word_probability", "--rare-word-probability", type=float, default=0.7)
    parser.add_argument("--k", type=int, default=2, help="cartridges routed to each question")
    parser.add_argument("--route_batch", "--route-batch", type=int, default=64)
    parser.add_argument(
        "--latency_questions",
        "--latency-questions",
        type=int,
        default=500,
        help="questions routed one at a time and in batches, three times each",
    )
    parser.add_argument(
        "--capacities",
        type=float,
        nargs="+",
        default=[0.01, 0.05, 0.10, 0.25],
        help="cache capacities, as shares of the library's cartridge bytes",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed replays of the stream per cache")
    parser.add_argument("--serve_batch", "--serve-batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", "--output-dir", default="outputs/library-scale")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a library built with other settings"
    )
    args = parser.parse_args()
    if args.num_documents < 2 or args.p < 1 or args.questions < 1 or args.question_words < 1:
        parser.error("--num_documents must be >= 2, and --p, --questions and --question_words >= 1.")
    if not 1 <= args.k <= args.num_documents:
        parser.error(f"--k must be between 1 and --num_documents ({args.num_documents}).")
    if args.zipf_s <= 0 or not 0 <= args.rare_word_probability <= 1:
        parser.error("--zipf_s must be > 0 and --rare_word_probability in [0, 1].")
    if not all(0 < fraction <= 1 for fraction in args.capacities):
        parser.error("--capacities are shares of the library: each in (0, 1].")
    if min(args.route_batch, args.latency_questions, args.repeats, args.serve_batch) < 1:
        parser.error("--route_batch, --latency_questions, --repeats and --serve_batch must be >= 1.")

    output_dir = Path(args.output_dir)
    folder = output_dir / "library"
    documents, vocabulary_fingerprint = synthetic_documents(args.num_documents, args.seed)
    status = build_synthetic_library(folder, documents, vocabulary_fingerprint, args)
    print(f"library {folder}: {'reused' if status == 'done' else 'built'}")
    questions, targets = question_stream(documents, args)
    library = CartridgeLibrary(folder)
    routing, routed_ids = measure_routing(library, questions, targets, args)
    results = {
        "arguments": vars(args),
        "routing": routing,
        "cache": measure_cache(library, routed_ids, args),
        "grouping": measure_grouping(routed_ids, args.serve_batch),
    }
    print_tables(results, args)
    write_text_atomic(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    print(f"numbers in {output_dir / 'results.json'}")


if __name__ == "__main__":
    main()
