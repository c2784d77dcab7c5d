"""Retrieval pieces of a cartridge library: many documents, one cartridge each, a question routed to a few of them.

* :class:`BM25Router` ranks whole documents for a question (which cartridges to load); :func:`mask_document_names`
  hides the documents' names in questions, to measure routing when a question does not name its document.
* :func:`chunk_documents` and :class:`ChunkRetriever` are the RAG baseline: BM25 over chunks of the documents,
  as many of the best chunks as fit a token budget.
* :class:`LRUCache` keeps the most recently used values within a capacity (entries or bytes), thread-safe;
  :class:`CartridgeCache` is one of loaded cartridges within a byte budget (a library's, the chat's prefixes).

BM25 comes from the ``bm25s`` library (numpy only). Its index is rebuilt from the texts rather than saved: building it
takes milliseconds for a library's documents, and nothing has to be kept in sync on disk.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import bm25s
import numpy as np

logger = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

#: Stopwords argument of ``bm25s.tokenize``: a language code ("en"), a list of words, or None for none.
Stopwords = str | list[str] | None


class _BM25Index:
    """bm25s over a list of texts, ranking every text for each query with ties in text order (deterministic)."""

    def __init__(self, texts: Sequence[str], stopwords: Stopwords, stemmer: Any, what: str) -> None:
        self._stopwords = stopwords
        self._stemmer = stemmer
        corpus_tokens = self._tokenize(list(texts))
        if not any(corpus_tokens):
            raise ValueError(
                f"None of the {len(texts)} {what} has a word BM25 can index (all are empty or stopwords); "
                "give texts with words in them, or fewer stopwords."
            )
        self._retriever = bm25s.BM25()
        self._retriever.index(corpus_tokens, show_progress=False)
        self.size = len(texts)
        logger.debug("BM25 index over %d %s, %d terms", self.size, what, len(self._retriever.vocab_dict))

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return bm25s.tokenize(
            texts, stopwords=self._stopwords, stemmer=self._stemmer, return_ids=False, show_progress=False
        )

    def rank(self, queries: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each query: (text positions best first, their scores); equal scores keep text order."""
        if not queries:
            return []
        # Strings, not ids: bm25s maps them through the index's vocabulary and drops unknown words, so a query
        # with no indexed word (or none at all) scores 0 everywhere instead of failing.
        results = self._retriever.retrieve(
            self._tokenize(list(queries)),
            k=self.size,  # every text: ties at the top-k border are broken below, by position
            sorted=False,
            show_progress=False,
            n_threads=0,
            backend_selection="numpy",
        )
        ranked = []
        for positions, scores in zip(results.documents, results.scores, strict=True):
            order = np.lexsort((positions, -scores))
            ranked.append((positions[order], scores[order]))
        return ranked


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k={k}: the number of documents to route to must be at least 1.")


class BM25Router:
    """Route a question to the documents (cartridges) whose text matches it best under BM25.

    ``documents`` are (document id, text) pairs. A question that is empty or has no indexed word gets every
    document in library order with score 0.0, so a caller always gets ``k`` candidates.
    ``stemmer`` is passed to ``bm25s.tokenize`` (e.g. a PyStemmer ``Stemmer("english")``); none by default.
    """

    def __init__(
        self,
        documents: Sequence[tuple[str, str]],
        stopwords: Stopwords = "en",
        stemmer: Any = None,
    ) -> None:
        if not documents:
            raise ValueError("BM25Router needs at least one (document id, text) pair; got an empty list.")
        ids = [document_id for document_id, _ in documents]
        _check_unique(ids, "BM25Router")
        self._ids = ids
        self._index = _BM25Index([text for _, text in documents], stopwords, stemmer, "documents")

    @property
    def ids(self) -> list[str]:
        """Document ids in library order."""
        return list(self._ids)

    def route(self, question: str, k: int = 1) -> list[tuple[str, float]]:
        """The top-``k`` (document id, BM25 score) pairs, best first; ``k`` is clipped to the number of documents."""
        return self.route_many([question], k)[0]

    def route_many(self, questions: Sequence[str], k: int = 1) -> list[list[tuple[str, float]]]:
        """:meth:`route` for each question, scored in one bm25s call."""
        _check_k(k)
        k = min(k, len(self._ids))
        return [
            [
                (self._ids[position], float(score))
                for position, score in zip(positions[:k], scores[:k], strict=True)
            ]
            for positions, scores in self._index.rank(questions)
        ]


def _check_unique(ids: Sequence[str], owner: str) -> None:
    duplicates = sorted(document_id for document_id, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise ValueError(f"{owner}: duplicate document ids {duplicates}; give each document a unique id.")


def mask_document_names(question: str, names: Sequence[str], mask: str = "this dataset") -> str:
    """Replace each document name in ``question`` by ``mask``: whole words, any case, ``_``/``-``/space alike.

    ``wine_data`` matches "wine data", "Wine-Data" and "wine_data", not "winedata"; ``iris`` matches "Iris" and
    "iris's" but not "irises". Longer names are tried first, so ``breast_cancer`` wins over a name ``breast``.
    """
    alternatives = []
    for name in sorted(set(names), key=len, reverse=True):
        words = [w for w in re.split(r"[\s_-]+", name) if w]
        if words:
            alternatives.append(r"[\s_-]+".join(re.escape(w) for w in words))
    if not alternatives:
        return question
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)
    return pattern.sub(lambda _: mask, question)


@dataclass
class Chunk:
    """A piece of a document: its ``index``-th chunk, ``text`` an exact substring of the document."""

    document_id: str
    index: int
    text: str
    num_tokens: int


# Where a too-long span may be cut, coarsest first: blank lines (paragraphs), line ends, then any whitespace.
_BOUNDARIES = (re.compile(r"\n[ \t]*\n\s*"), re.compile(r"\n\s*"), re.compile(r"\s+"))


def chunk_documents(
    documents: Sequence[tuple[str, str]], count_tokens: Callable[[str], int], chunk_tokens: int = 128
) -> list[Chunk]:
    """Split each document into consecutive chunks of at most ``chunk_tokens`` tokens, in document order.

    Whole paragraphs (separated by blank lines) are packed together while they fit; a paragraph that does not fit
    is cut at line ends, a line at whitespace, and a single over-long word between characters. Each chunk's text is
    an exact substring of its document with outer whitespace stripped, and only whitespace lies between
    consecutive chunks, so no word is lost or reordered. ``count_tokens`` is the caller's tokenizer, e.g.
    ``lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)`` (without special tokens: they are
    not part of the text). A document with no visible text has no chunks.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: a chunk must hold at least 1 token.")
    _check_unique([document_id for document_id, _ in documents], "chunk_documents")
    chunks = []
    for document_id, text in documents:
        spans = []
        for start, end in _parts(text, 0, len(text), None):
            spans.extend(_split(text, start, end, 0, count_tokens, chunk_tokens))
        chunks.extend(
            Chunk(document_id, index, text[start:end], num_tokens)
            for index, (start, end, num_tokens) in enumerate(spans)
        )
    logger.debug(
        "%d chunks of at most %d tokens from %d documents", len(chunks), chunk_tokens, len(documents)
    )
    return chunks


def _parts(text: str, start: int, end: int, boundary: re.Pattern | None) -> list[tuple[int, int]]:
    """Spans of ``text[start:end]`` between matches of ``boundary``, each stripped of outer whitespace."""
    cuts = [] if boundary is None else [(m.start(), m.end()) for m in boundary.finditer(text, start, end)]
    spans = []
    position = start
    for cut_start, cut_end in [*cuts, (end, end)]:
        piece = text[position:cut_start]
        if piece.strip():
            left = position + len(piece) - len(piece.lstrip())
            spans.append((left, position + len(piece.rstrip())))
        position = cut_end
    return spans


def _split(
    text: str, start: int, end: int, level: int, count_tokens: Callable[[str], int], limit: int
) -> list[tuple[int, int, int]]:
    """(start, end, tokens) spans covering the words of ``text[start:end]``, each within ``limit`` tokens."""
    num_tokens = count_tokens(text[start:end])
    if num_tokens <= limit:
        return [(start, end, num_tokens)]
    if level == len(_BOUNDARIES):
        return _split_characters(text, start, end, count_tokens, limit)
    spans: list[tuple[int, int, int]] = []
    current: tuple[int, int, int] | None = None
    for part_start, part_end in _parts(text, start, end, _BOUNDARIES[level]):
        if current is not None:
            # Counted together, not summed: a subword tokenizer may merge across the joint.
            merged = count_tokens(text[current[0] : part_end])
            if merged <= limit:
                current = (current[0], part_end, merged)
                continue
            spans.append(current)
            current = None
        part_tokens = count_tokens(text[part_start:part_end])
        if part_tokens <= limit:
            current = (part_start, part_end, part_tokens)
        else:
            spans.extend(_split(text, part_start, part_end, level + 1, count_tokens, limit))
    if current is not None:
        spans.append(current)
    return spans


def _split_characters(
    text: str, start: int, end: int, count_tokens: Callable[[str], int], limit: int
) -> list[tuple[int, int, int]]:
    """Cut one over-long word into the longest prefixes that fit (found by bisection)."""
    spans = []
    while start < end:
        if count_tokens(text[start : start + 1]) > limit:
            raise ValueError(
                f"count_tokens gives more than chunk_tokens={limit} tokens for the single character "
                f"{text[start]!r}; raise chunk_tokens, or count without special tokens."
            )
        low, high = start + 1, end  # text[start:low] fits; find the longest fitting prefix up to high
        while low < high:
            middle = (low + high + 1) // 2
            if count_tokens(text[start:middle]) <= limit:
                low = middle
            else:
                high = middle - 1
        spans.append((start, low, count_tokens(text[start:low])))
        start = low
    return spans


class ChunkRetriever:
    """BM25 over chunks: the best chunks for a question that fit a token budget (the RAG baseline's context).

    Every chunk is ranked, so a question with no indexed word gets chunks in document order; the context then
    holds as many tokens as for any other question, which keeps RAG baselines comparable across questions.
    """

    def __init__(self, chunks: Sequence[Chunk], stopwords: Stopwords = "en", stemmer: Any = None) -> None:
        if not chunks:
            raise ValueError("ChunkRetriever needs at least one chunk; got none (were the documents empty?).")
        self.chunks = list(chunks)
        self._index = _BM25Index([chunk.text for chunk in self.chunks], stopwords, stemmer, "chunks")

    @classmethod
    def from_documents(
        cls,
        documents: Sequence[tuple[str, str]],
        count_tokens: Callable[[str], int],
        chunk_tokens: int = 128,
        **kwargs: Any,
    ) -> ChunkRetriever:
        """Chunk ``documents`` with :func:`chunk_documents` and index the chunks."""
        return cls(chunk_documents(documents, count_tokens, chunk_tokens), **kwargs)

    def retrieve(self, question: str, token_budget: int) -> list[Chunk]:
        """Chunks best first whose ``num_tokens`` add up to at most ``token_budget``.

        A chunk that does not fit the budget left is skipped and the next ones are tried, so smaller chunks further
        down can still fill it; a budget smaller than every chunk gives an empty list.
        """
        return self.retrieve_many([question], token_budget)[0]

    def retrieve_many(self, questions: Sequence[str], token_budget: int) -> list[list[Chunk]]:
        """:meth:`retrieve` for each question, scored in one bm25s call."""
        if token_budget < 0:
            raise ValueError(f"token_budget={token_budget}: give a number of tokens >= 0.")
        selections = []
        for positions, _ in self._index.rank(questions):
            selected, used = [], 0
            for position in positions:
                chunk = self.chunks[position]
                if used + chunk.num_tokens <= token_budget:
                    selected.append(chunk)
                    used += chunk.num_tokens
            selections.append(selected)
        return selections


class LRUCache(Generic[K, V]):
    """A least-recently-used map within a capacity: a number of entries, or of bytes with ``size_of``.

    :meth:`get_or_make` returns the value of ``key``, built by ``make()`` on a miss (once: concurrent callers asking
    for the same new key wait for the first one's value) and then the most recently used; the least recently used
    entries go until the new one fits. A value larger than the whole capacity is returned but not kept (and evicts
    nothing). Thread-safe; counts hits, misses and evictions.
    """

    def __init__(self, capacity: int, size_of: Callable[[V], int] | None = None) -> None:
        if capacity < 0:
            raise ValueError(f"capacity={capacity}: give a size >= 0.")
        self.capacity = capacity
        self._size_of = size_of or (lambda value: 1)
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[K, threading.Lock] = {}
        self.size_in_use = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        with self._lock:
            if key in self._entries:
                self.hits += 1
                self._entries.move_to_end(key)
                return self._entries[key][0]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:  # made by another caller while this one waited
                if key in self._entries:
                    self.hits += 1
                    self._entries.move_to_end(key)
                    return self._entries[key][0]
                self.misses += 1
            value = make()
            size = self._size_of(value)
            if size < 0:
                raise ValueError(f"size_of gave {size} for {key!r}; sizes must be >= 0.")
            with self._lock:
                self._key_locks.pop(key, None)
                if size > self.capacity:
                    logger.warning("%r (size %d) is larger than the cache (%d): returned, not kept.", key, size,
                                   self.capacity)  # fmt: skip
                    return value
                while self.size_in_use + size > self.capacity:
                    evicted, (_, evicted_size) = self._entries.popitem(last=False)
                    self.size_in_use -= evicted_size
                    self.evictions += 1
                    logger.debug("Evicted %r (size %d)", evicted, evicted_size)
                self._entries[key] = (value, size)
                self.size_in_use += size
            return value

    @property
    def hit_rate(self) -> float:
        """Hits over gets; 0.0 before the first get."""
        gets = self.hits + self.misses
        return self.hits / gets if gets else 0.0

    def stats(self) -> dict[str, float | int]:
        """Counters and occupancy, for logs and benchmark tables."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "hit_rate": self.hit_rate,
            "entries": len(self),
            "in_use": self.size_in_use,
            "capacity": self.capacity,
        }

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


class CartridgeCache(LRUCache[str, T]):
    """Loaded cartridges by id within ``capacity_bytes`` (an :class:`LRUCache` sized by ``size_of``, in bytes):
    ``get(id)`` loads a missing one with ``load(id)``."""

    def __init__(self, capacity_bytes: int, load: Callable[[str], T], size_of: Callable[[T], int]) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes={capacity_bytes}: give a size in bytes >= 0.")
        super().__init__(capacity_bytes, size_of)
        self._load = load

    def get(self, cartridge_id: str) -> T:
        """The cartridge ``cartridge_id``, loaded on a miss and then the most recently used."""
        return self.get_or_make(cartridge_id, lambda: self._load(cartridge_id))

    @property
    def capacity_bytes(self) -> int:
        return self.capacity

    @property
    def bytes_in_use(self) -> int:
        return self.size_in_use

    def stats(self) -> dict[str, float | int]:
        stats = super().stats()
        stats["bytes_in_use"] = stats.pop("in_use")
        stats["capacity_bytes"] = stats.pop("capacity")
        return stats
