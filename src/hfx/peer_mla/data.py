"""Training data for PEER-MLA: a streamed, seeded mixture of text sources, tokenized and packed into blocks.

Pipeline, one source at a time, then mixed::

    load_source   text/json builder on local files (or a Hub dataset), streaming -> one ``text`` column
    split         a hash of each document's text sends a fixed fraction to eval, the rest to train
    pack          tokenize, append EOS after every document, cut into full ``block_size`` blocks
    mix           ``datasets.interleave_datasets`` over the per-source block streams (probabilities, seed,
                  stopping strategy)

Everything is a ``datasets.IterableDataset``: nothing is read until iterated, and memory does not grow with the
corpus (bounded by ``shuffle_buffer_size`` documents plus one packing batch of ``pack_batch_size`` documents).
Mixing happens after packing, so a source's probability is its share of training blocks, that is of tokens,
independent of how long its documents are.

Offline default corpus (real text shipped with Python and a dependency; see :data:`BUILTIN_SOURCES`):

* ``python_stdlib``: the ``.py`` files of CPython's standard library (``sysconfig.get_paths()["stdlib"]``,
  without test suites and site-packages), passed directly as ``data_files`` to the ``text`` builder with
  ``sample_by="document"`` (one document per file).
* ``sklearn_descr``: scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``), same way.
* ``pydoc_topics``: the values of ``pydoc_data.topics.topics`` (the Python language reference), which live in a
  Python dict rather than in files, so they are written once to a JSONL file under ``$HFX_CACHE/corpora``
  (atomically: temp file, then rename) and read back through the ``json`` builder.

Tokenizer: ``tokenizer_name_or_path`` is a tokenizer folder / Hub id, ``None``/``"embedded"`` for the embedded
SmolLM2 tokenizer (49152 tokens, interchangeable with the real model used elsewhere in the project), or
``"train"`` for a byte-level BPE of ``tokenizer_vocab_size`` tokens trained with ``tokenizers`` on the mixture's
training documents (:func:`train_tokenizer`; cached under ``$HFX_CACHE/tokenizers`` by a fingerprint of the
sources). The shipped pretraining configs use ``"train"`` with 8192 tokens: for a model of width 256 the 49152-way
softmax of the embedded vocabulary would be most of the compute of a training step on a CPU, so a corpus-trained
8k vocabulary puts the step's time into the layers being compared and sees 2-3 times more tokens per minute.

Config: :class:`DataArguments` is a plain dataclass of YAML/CLI-friendly fields (parse it with
``trl.TrlParser``/``HfArgumentParser``). Each ``mixture`` entry is either ``"name:probability"`` for a built-in
source, or a JSON object with the fields of :class:`MixtureSource`, e.g.
``'{"name": "notes", "path_or_files": ["data/*.jsonl"], "builder": "json", "text_field": "body",
"probability": 0.2}'``. With ``builder: "hub"``, ``path_or_files`` is a Hub dataset id.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hfx.atomic import atomic_file, atomic_folder

logger = logging.getLogger(__name__)

BUILDERS = ("text", "json", "hub", "documents")
STOPPING_STRATEGIES = ("first_exhausted", "all_exhausted", "all_exhausted_without_replacement")
#: Built-in offline sources; their default probabilities make up :data:`DEFAULT_MIXTURE`.
BUILTIN_SOURCES = ("python_stdlib", "pydoc_topics", "sklearn_descr")
DEFAULT_MIXTURE = ("python_stdlib:0.6", "pydoc_topics:0.2", "sklearn_descr:0.2")
PROBABILITY_TOLERANCE = 1e-6


@dataclass
class MixtureSource:
    """One source of documents in the mixture.

    ``path_or_files``: local files or glob patterns (``text``/``json`` builders), a Hub dataset id (``hub``), or
    what ``--corpus`` takes (``documents``: files of any kind hfx reads — text, PDF, HTML —, folders of them, URLs,
    bundled names; read by :func:`hfx.documents.load_documents`, one document each). ``text_field``: the column holding a document (the ``text`` builder always calls it ``text``).
    ``sample_by``: what one document is for the ``text`` builder (``"document"``: a whole file; ``"paragraph"``;
    ``"line"``). ``split``/``config_name``: which split and configuration of a Hub dataset.
    """

    name: str
    path_or_files: str | list[str]
    builder: str = "text"
    text_field: str = "text"
    probability: float = 1.0
    sample_by: str = "document"
    split: str = "train"
    config_name: str | None = None

    def __post_init__(self) -> None:
        if self.builder not in BUILDERS:
            raise ValueError(
                f"Source {self.name!r}: unknown builder {self.builder!r}; use one of {', '.join(BUILDERS)}."
            )
        if not isinstance(self.probability, (int, float)) or math.isnan(self.probability):
            raise ValueError(f"Source {self.name!r}: probability must be a number, got {self.probability!r}.")
        if self.probability < 0:
            raise ValueError(f"Source {self.name!r}: probability {self.probability} is negative.")
        if self.builder == "text" and self.sample_by not in ("line", "paragraph", "document"):
            raise ValueError(
                f"Source {self.name!r}: sample_by must be 'line', 'paragraph' or 'document', "
                f"got {self.sample_by!r}."
            )


@dataclass
class DataArguments:
    """Data section of a PEER-MLA training config (YAML keys / ``--flags`` of the same names)."""

    mixture: list[str] = field(
        default_factory=lambda: list(DEFAULT_MIXTURE),
        metadata={
            "help": "Sources with probabilities: 'name:probability' for a built-in source "
            f"({', '.join(BUILTIN_SOURCES)}) or a JSON object with MixtureSource fields. "
            "Probabilities must sum to 1."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer folder or Hub id; None or 'embedded': the embedded SmolLM2 tokenizer; 'train': a "
            "byte-level BPE of tokenizer_vocab_size tokens trained on the mixture's training documents."
        },
    )
    tokenizer_vocab_size: int = field(
        default=8192,
        metadata={"help": "Vocabulary size of a trained tokenizer (tokenizer_name_or_path='train')."},
    )
    tokenizer_train_chars: int = field(
        default=20_000_000,
        metadata={
            "help": "Characters of training documents a trained tokenizer sees, at most (split by source "
            "probability)."
        },
    )
    block_size: int = field(default=1024, metadata={"help": "Tokens per packed training/eval row."})
    stopping_strategy: str = field(
        default="all_exhausted", metadata={"help": f"Mixing stop rule: {', '.join(STOPPING_STRATEGIES)}."}
    )
    mixture_seed: int = field(default=0, metadata={"help": "Seed of the mixture sampling and the shuffles."})
    shuffle_buffer_size: int = field(
        default=256,
        metadata={
            "help": "Documents in each source's shuffle buffer (also shuffles file order); 0: no shuffle."
        },
    )
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Fraction of documents (by a hash of their text) held out for eval."}
    )
    max_eval_blocks: int = field(default=64, metadata={"help": "Number of packed eval rows, at most."})
    eval_mixture: list[str] | None = field(
        default=None,
        metadata={
            "help": "Sources of the held-out set (same syntax as mixture); None: the training mixture. Fix it to "
            "compare runs trained on different mixtures on the same held-out text."
        },
    )
    tokenizer_mixture: list[str] | None = field(
        default=None,
        metadata={
            "help": "Sources a trained tokenizer learns from; None: the training mixture. Fix it so that runs on "
            "different mixtures share one vocabulary."
        },
    )
    pack_batch_size: int = field(
        default=64, metadata={"help": "Documents packed together; the remainder of each batch is dropped."}
    )

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ValueError(
                f"block_size must be at least 2 (an input and its next token), got {self.block_size}."
            )
        if self.stopping_strategy not in STOPPING_STRATEGIES:
            raise ValueError(
                f"stopping_strategy {self.stopping_strategy!r} is unknown; use one of {', '.join(STOPPING_STRATEGIES)}."
            )
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.max_eval_blocks < 0 or self.shuffle_buffer_size < 0 or self.pack_batch_size < 1:
            raise ValueError(
                "max_eval_blocks and shuffle_buffer_size must be >= 0 and pack_batch_size >= 1, got "
                f"{self.max_eval_blocks}, {self.shuffle_buffer_size}, {self.pack_batch_size}."
            )
        if self.tokenizer_name_or_path == "train" and self.tokenizer_vocab_size < 256 + 1:
            raise ValueError(
                f"tokenizer_vocab_size must be above 256 (the byte alphabet), got {self.tokenizer_vocab_size}."
            )
        self.sources()  # parse the mixtures now, so a bad entry fails when the config is read
        for which, entries in (("eval", self.eval_mixture), ("tokenizer", self.tokenizer_mixture)):
            if entries is not None:
                self.sources(which)

    def sources(self, which: str = "train") -> list[MixtureSource]:
        """The parsed entries of ``mixture`` (``"train"``), ``eval_mixture`` (``"eval"``) or ``tokenizer_mixture``
        (``"tokenizer"``), the last two falling back to ``mixture``; probabilities checked."""
        entries = {"train": self.mixture, "eval": self.eval_mixture, "tokenizer": self.tokenizer_mixture}[
            which
        ]
        if entries is None:
            entries = self.mixture
        sources = [parse_mixture_entry(entry) for entry in entries]
        check_probabilities([s.probability for s in sources], len(sources), [s.name for s in sources])
        return sources


# ----------------------------------------------------------------------------------------------------------------
# Config parsing and checks


def parse_mixture_entry(entry: str | dict | MixtureSource) -> MixtureSource:
    """A :class:`MixtureSource` from ``"name:probability"`` (built-in source) or a JSON object / dict."""
    if isinstance(entry, MixtureSource):
        return entry
    if isinstance(entry, str) and entry.lstrip().startswith("{"):
        try:
            entry = json.loads(entry)
        except json.JSONDecodeError as error:
            raise ValueError(f"Mixture entry {entry!r} is not valid JSON: {error}.") from error
    if isinstance(entry, dict):
        known = {f.name for f in fields(MixtureSource)}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"Mixture entry {entry!r} has unknown keys {unknown}; known: {sorted(known)}.")
        if "name" not in entry or "path_or_files" not in entry:
            raise ValueError(f"Mixture entry {entry!r} needs at least 'name' and 'path_or_files'.")
        return MixtureSource(**entry)
    if not isinstance(entry, str):
        raise ValueError(f"Mixture entry {entry!r} must be a string or a mapping.")
    name, sep, probability = entry.rpartition(":")
    if not sep:
        name, probability = entry, "1.0"
    try:
        value = float(probability)
    except ValueError:
        raise ValueError(
            f"Mixture entry {entry!r}: {probability!r} is not a probability; write 'name:0.5'."
        ) from None
    return builtin_source(name.strip(), value)


def check_probabilities(probabilities: Sequence[float], num_datasets: int, names: Sequence[str] = ()) -> None:
    """Raise ValueError unless there is one non-negative probability per dataset and they sum to 1."""
    names = list(names) or [f"dataset {i}" for i in range(num_datasets)]
    if len(probabilities) != num_datasets:
        raise ValueError(
            f"Got {len(probabilities)} probabilities for {num_datasets} datasets; give exactly one per dataset."
        )
    for name, probability in zip(names, probabilities, strict=False):
        if probability < 0:
            raise ValueError(f"Source {name!r}: probability {probability} is negative.")
    total = float(sum(probabilities))
    if abs(total - 1.0) > PROBABILITY_TOLERANCE:
        listed = ", ".join(f"{n}={p}" for n, p in zip(names, probabilities, strict=False))
        raise ValueError(f"Mixture probabilities sum to {total}, not 1 ({listed}); rescale them.")


# ----------------------------------------------------------------------------------------------------------------
# Built-in offline sources


def _sklearn_descr_files() -> list[str]:
    from hfx.embedded import ALL_DESCRIPTIONS, corpus_files

    return [str(path) for path in corpus_files(ALL_DESCRIPTIONS)]


def _pydoc_topics_file() -> str:
    """JSONL of the pydoc reference topics, written once per Python version (atomic: temp file, then rename)."""
    import sys

    from hfx.embedded import cache_dir, collection_documents

    target = (
        cache_dir() / "corpora" / f"pydoc_topics-py{sys.version_info.major}.{sys.version_info.minor}.jsonl"
    )
    if target.is_file():
        return str(target)
    with atomic_file(target) as staging, staging.open("w", encoding="utf-8") as out:
        for topic, text in collection_documents("pydoc_topics"):
            out.write(json.dumps({"topic": topic, "text": text}) + "\n")
    return str(target)


def builtin_source(name: str, probability: float = 1.0) -> MixtureSource:
    """One of :data:`BUILTIN_SOURCES` as a :class:`MixtureSource` (files resolved now, read later)."""
    if name == "python_stdlib":
        from hfx.embedded import stdlib_files

        return MixtureSource(name, [str(p) for p in stdlib_files()], "text", probability=probability)
    if name == "sklearn_descr":
        return MixtureSource(name, _sklearn_descr_files(), "text", probability=probability)
    if name == "pydoc_topics":
        return MixtureSource(name, [_pydoc_topics_file()], "json", text_field="text", probability=probability)
    raise ValueError(
        f"Unknown built-in source {name!r}; built-ins: {', '.join(BUILTIN_SOURCES)}. "
        "For your own files, write a JSON mixture entry with 'path_or_files' and 'builder'."
    )


# ----------------------------------------------------------------------------------------------------------------
# Stages


def resolve_files(source: MixtureSource) -> list[str]:
    """Local files of a text/json source, globs expanded; ValueError naming any path that matches nothing."""
    patterns = [source.path_or_files] if isinstance(source.path_or_files, str) else list(source.path_or_files)
    if not patterns:
        raise ValueError(f"Source {source.name!r} lists no data files.")
    files: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ValueError(f"Source {source.name!r}: no data file matches {pattern!r}.")
            files.extend(matches)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise ValueError(f"Source {source.name!r}: data file {pattern!r} does not exist.")
    return files


def load_source(source: MixtureSource):
    """A streaming ``IterableDataset`` of the source's documents, with the single column ``text``."""
    from datasets import load_dataset

    if source.builder == "documents":
        from datasets import IterableDataset

        specs = (
            [source.path_or_files] if isinstance(source.path_or_files, str) else list(source.path_or_files)
        )
        if not specs:
            raise ValueError(f"Source {source.name!r} lists no documents.")
        return IterableDataset.from_generator(_documents, gen_kwargs={"specs": specs})
    if source.builder == "hub":
        dataset = load_dataset(
            str(source.path_or_files), source.config_name, split=source.split, streaming=True
        )
        where = str(source.path_or_files)
    else:
        files = resolve_files(source)
        kwargs: dict[str, Any] = {}
        if source.builder == "text":
            kwargs = {"sample_by": source.sample_by, "encoding_errors": "replace", "keep_linebreaks": True}
        dataset = load_dataset(source.builder, data_files=files, split="train", streaming=True, **kwargs)
        where = files[0]
    if source.builder == "text":
        return dataset  # the text builder's only column is "text"
    # json/Hub columns are only known once a row is read: read the first one to check the field early.
    first = next(iter(dataset.take(1)), None)
    if first is None:
        raise ValueError(f"Source {source.name!r}: {where} holds no rows.")
    if source.text_field not in first:
        raise ValueError(
            f"Source {source.name!r}: text field {source.text_field!r} is missing from {where} "
            f"(its first row has {sorted(first)}); set text_field to one of them."
        )
    dataset = dataset.select_columns([source.text_field])
    if source.text_field != "text":
        dataset = dataset.rename_column(source.text_field, "text")
    return dataset


def _documents(specs: list[str]):
    """Rows ``{"text": ...}`` of the documents hfx's one reader finds in each spec, read one spec at a time."""
    from hfx.documents import load_documents

    for spec in specs:
        for _, text in load_documents(spec):
            yield {"text": text}


def document_hash_fraction(text: str) -> float:
    """A stable number in [0, 1) derived from a document's text (the same across runs, machines, seeds)."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_eval_document(text: str, eval_fraction: float) -> bool:
    """Whether a document belongs to the held-out split: identical texts always land on the same side."""
    return document_hash_fraction(text) < eval_fraction


def split_documents(dataset, eval_fraction: float, split: str):
    """Keep the ``"train"`` or ``"eval"`` documents of a ``text`` stream (applied before packing)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
    want_eval = split == "eval"
    return dataset.filter(lambda row: is_eval_document(row["text"] or "", eval_fraction) == want_eval)


def block_features():
    """Features of packed rows: ``input_ids`` and ``labels``, int32 sequences."""
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "labels": List(Value("int32"))})


def pack(dataset, tokenizer, block_size: int, batch_size: int = 64, source_name: str = "documents"):
    """Tokenize a ``text`` stream and pack it into rows of exactly ``block_size`` tokens.

    Documents are concatenated with the tokenizer's EOS after each one and cut into full blocks; within each map
    batch of ``batch_size`` documents the trailing partial block is dropped. ``labels`` equals ``input_ids``
    (the model shifts them).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 (an input and its next token), got {block_size}.")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"Tokenizer {tokenizer.name_or_path!r} has no EOS token to separate documents.")

    def pack_batch(batch: dict[str, list]) -> dict[str, list]:
        texts = batch["text"]
        for text in texts:
            if not isinstance(text, str):
                raise ValueError(
                    f"Source {source_name!r}: a row has {text!r} instead of text in its text field."
                )
        token_ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        stream: list[int] = []
        for ids in token_ids:
            stream.extend(ids)
            stream.append(eos)
        blocks = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    return dataset.map(
        pack_batch,
        batched=True,
        batch_size=batch_size,
        remove_columns=["text"],
        features=block_features(),
    )


def mix(datasets: Sequence, probabilities: Sequence[float], seed: int, stopping_strategy: str, names=()):
    """``interleave_datasets`` with the probabilities and stopping strategy checked first."""
    from datasets import interleave_datasets

    check_probabilities(probabilities, len(datasets), names)
    if stopping_strategy not in STOPPING_STRATEGIES:
        raise ValueError(
            f"stopping_strategy {stopping_strategy!r} is unknown; use one of {', '.join(STOPPING_STRATEGIES)}."
        )
    # A never-sampled dataset is never exhausted, which would make "all_exhausted" run forever: leave it out.
    kept = [(d, p) for d, p in zip(datasets, probabilities, strict=True) if p > 0]
    if len(kept) == 1:
        return kept[0][0]
    return interleave_datasets(
        [d for d, _ in kept],
        probabilities=[p for _, p in kept],
        seed=seed,
        stopping_strategy=stopping_strategy,
    )


TRAINED_TOKENIZER_EOS = "<|endoftext|>"


def tokenizer_fingerprint(args: DataArguments) -> str:
    """What a trained tokenizer depends on: the sources (files and probabilities), the split, the sizes."""
    sources = []
    for source in args.sources("tokenizer"):
        entry = {k: getattr(source, k) for k in ("name", "builder", "text_field", "sample_by", "probability")}
        if source.builder == "hub":
            entry["dataset"] = [str(source.path_or_files), source.config_name, source.split]
        elif source.builder == "documents":  # names, folders and URLs: what is read is what counts
            from hfx.stages import fingerprint

            entry["documents"] = fingerprint([row["text"] for row in load_source(source)])
        else:
            entry["files"] = [
                [f, os.path.getsize(f), int(os.path.getmtime(f))] for f in resolve_files(source)
            ]
        sources.append(entry)
    key = {
        "sources": sources,
        "eval_fraction": args.eval_fraction,
        "vocab_size": args.tokenizer_vocab_size,
        "train_chars": args.tokenizer_train_chars,
        "version": 1,
    }
    return hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=10).hexdigest()


def _training_texts(args: DataArguments):
    """Training-split documents of each source, up to its probability's share of ``tokenizer_train_chars``."""
    for source in args.sources("tokenizer"):
        if source.probability <= 0:
            continue
        budget = int(args.tokenizer_train_chars * source.probability)
        for row in split_documents(load_source(source), args.eval_fraction, "train"):
            text = row["text"] or ""
            if budget <= 0:
                break
            yield text[:budget]
            budget -= len(text)


def train_tokenizer(args: DataArguments, output_dir: str | os.PathLike | None = None):
    """A byte-level BPE tokenizer of ``args.tokenizer_vocab_size`` tokens trained on the mixture's training split.

    Saved as a ``PreTrainedTokenizerFast`` folder (``<|endoftext|>`` is its EOS, BOS and padding token) in
    ``output_dir``, by default ``$HFX_CACHE/tokenizers/bpe-<vocab>-<fingerprint>``; an existing folder is reused.
    The folder appears only when complete (temp folder, then rename).
    """
    from transformers import AutoTokenizer

    from hfx.embedded import cache_dir
    from hfx.tokenization import train_bpe

    if output_dir is None:
        output_dir = (
            cache_dir() / "tokenizers" / f"bpe-{args.tokenizer_vocab_size}-{tokenizer_fingerprint(args)}"
        )
    output_dir = Path(output_dir)
    if (output_dir / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(output_dir)
    logger.info(
        "Training a %d-token BPE tokenizer on the mixture -> %s", args.tokenizer_vocab_size, output_dir
    )
    tokenizer = train_bpe(
        _training_texts(args),
        args.tokenizer_vocab_size,
        [TRAINED_TOKENIZER_EOS],
        eos_token=TRAINED_TOKENIZER_EOS,
        bos_token=TRAINED_TOKENIZER_EOS,
        pad_token=TRAINED_TOKENIZER_EOS,
    )
    try:
        with atomic_folder(output_dir) as staging:
            tokenizer.save_pretrained(staging)
    except FileExistsError:  # another process finished the same tokenizer first
        if not (output_dir / "tokenizer.json").is_file():
            raise
    return AutoTokenizer.from_pretrained(output_dir)


def mixture_tokenizer(name_or_path: str | None = None, args: DataArguments | None = None):
    """The tokenizer to pack with: a BPE trained on the mixture for ``"train"`` (needs ``args``), else hfx's one
    tokenizer loader (:func:`hfx.models.load_tokenizer`: the embedded SmolLM2 tokenizer for ``None``/``"embedded"``,
    or a tokenizer folder or Hub id)."""
    from hfx.models import load_tokenizer

    if name_or_path == "train":
        if args is None:
            raise ValueError("tokenizer 'train' needs the DataArguments whose mixture it is trained on.")
        return train_tokenizer(args)
    return load_tokenizer(name_or_path)


def build_datasets(args: DataArguments, tokenizer=None):
    """(train, eval) streams of packed blocks for ``args``.

    train: an endless-or-long shuffled mixture (ends per ``stopping_strategy``). eval: unshuffled, every held-out
    block of every source visited once in a seeded order, cut to ``max_eval_blocks`` rows: the same rows on
    every call. Both are ``IterableDataset`` with :func:`block_features`; ``datasets.Dataset.from_generator``
    turns eval into a map-style dataset when a length is needed.
    """
    tokenizer = tokenizer if tokenizer is not None else mixture_tokenizer(args.tokenizer_name_or_path, args)
    sources = args.sources()
    train_parts = []
    for index, source in enumerate(sources):
        train_docs = split_documents(load_source(source), args.eval_fraction, "train")
        if args.shuffle_buffer_size > 0:
            train_docs = train_docs.shuffle(
                seed=args.mixture_seed + index, buffer_size=args.shuffle_buffer_size
            )
        train_parts.append(pack(train_docs, tokenizer, args.block_size, args.pack_batch_size, source.name))
    # Held-out documents are chosen by a hash of their text, so a source's held-out documents are never trained
    # on, whichever mixture (training or eval_mixture) it appears in.
    eval_sources = args.sources("eval")
    eval_parts = [
        pack(
            split_documents(load_source(source), args.eval_fraction, "eval"),
            tokenizer,
            args.block_size,
            args.pack_batch_size,
            source.name,
        )
        for source in eval_sources
    ]

    def describe(items):
        return ", ".join(f"{s.name}={s.probability}" for s in items)

    train = mix(
        train_parts,
        [s.probability for s in sources],
        args.mixture_seed,
        args.stopping_strategy,
        [s.name for s in sources],
    )
    evaluation = mix(
        eval_parts,
        [s.probability for s in eval_sources],
        args.mixture_seed,
        "all_exhausted_without_replacement",
        [s.name for s in eval_sources],
    )
    logger.info("Data mixture: %s; held out: %s", describe(sources), describe(eval_sources))
    return train, evaluation.take(args.max_eval_blocks)
