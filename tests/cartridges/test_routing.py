"""Retrieval pieces of a cartridge library, on scikit-learn's dataset descriptions (real prose, no model)."""

import re

import pytest

from hfx import embedded
from hfx.cartridges.routing import (
    BM25Router,
    CartridgeCache,
    Chunk,
    ChunkRetriever,
    chunk_documents,
    mask_document_names,
)


def count_words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def descriptions():
    return embedded.collection_documents("sklearn_descr")


@pytest.fixture(scope="module")
def router(descriptions):
    return BM25Router(descriptions)


def middle_sentence(text: str) -> str:
    """A prose sentence from the middle of ``text`` (at least 8 words, mostly alphabetic)."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    prose = [s for s in sentences if len(s.split()) >= 8 and sum(w.isalpha() for w in s.split()) >= 6]
    assert prose, "no prose sentence to quote"
    return prose[len(prose) // 2]


def test_a_quoted_sentence_routes_to_its_description(descriptions, router):
    names = [name for name, _ in descriptions]
    assert {"rcv1", "iris", "wine_data"} <= set(names)
    misrouted = {}
    for name, text in descriptions:
        top = router.route(f'Which dataset says: "{middle_sentence(text)}"?', k=1)
        if top[0][0] != name:
            misrouted[name] = top
    assert not misrouted


def test_route_gives_k_results_best_first_and_clips_k(descriptions, router):
    question = "How many classes of iris plants are there, and which attributes describe each flower?"
    results = router.route(question, k=5)
    assert len(results) == 5
    scores = [score for _, score in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0][0] == "iris" and scores[0] > scores[1]
    assert len({name for name, _ in results}) == 5

    everything = router.route(question, k=100)
    assert len(everything) == len(descriptions)
    assert sorted(name for name, _ in everything) == sorted(router.ids)
    assert everything[:5] == results
    assert router.ids == [name for name, _ in descriptions]


def test_route_many_equals_route_per_question(router):
    questions = ["wine cultivars chemical analysis", "newsgroups posts", "", "faces of people", "zzzz qqqq"]
    assert router.route_many(questions, k=3) == [router.route(q, k=3) for q in questions]
    assert router.route_many([], k=3) == []


def test_a_question_without_indexed_words_gets_the_documents_in_order_with_zero_scores(router):
    expected = [(name, 0.0) for name in router.ids[:3]]
    assert router.route("", k=3) == expected
    assert router.route("the of and is", k=3) == expected  # stopwords only
    assert router.route("qwxzv plorkt", k=3) == expected  # words no document has


def test_equal_scores_keep_document_order():
    documents = [("b", "apple pie recipe"), ("a", "apple pie recipe"), ("c", "banana bread")]
    assert [name for name, _ in BM25Router(documents).route("apple", k=2)] == ["b", "a"]
    assert [name for name, _ in BM25Router(documents[::-1]).route("apple", k=2)] == ["a", "b"]
    first, second = BM25Router(documents).route("apple", k=2)
    assert first[1] == second[1] > 0
    # Many ties, more than a sort's small-array path: still library order, at the top and at the k border.
    many = [(f"doc{i:03d}", "apple pie" if i % 3 else "banana bread") for i in range(300)]
    routed = BM25Router(many).route("apple", k=150)
    assert [name for name, _ in routed] == [name for name, text in many if "apple" in text][:150]


def test_router_errors_name_the_problem():
    with pytest.raises(ValueError, match="empty list"):
        BM25Router([])
    with pytest.raises(ValueError, match=r"duplicate document ids \['x'\]"):
        BM25Router([("x", "one text"), ("y", "two text"), ("x", "three text")])
    with pytest.raises(ValueError, match="k=0"):
        BM25Router([("x", "some words")]).route("words", k=0)
    with pytest.raises(ValueError, match="stopwords"):
        BM25Router([("x", "the and of"), ("y", "")])


def test_masking_replaces_whole_names_in_any_case_and_separator():
    names = ["wine_data", "iris"]
    assert (
        mask_document_names("How many samples does the Wine Data set have?", names)
        == "How many samples does the this dataset set have?"
    )
    assert mask_document_names("wine-data, WINE_DATA and wine  data", names) == "X, X and X".replace(
        "X", "this dataset"
    )
    assert mask_document_names("Is IRIS in the Iris set?", names, mask="[D]") == "Is [D] in the [D] set?"
    # Whole words only: a name inside a longer word stays, at either end.
    assert mask_document_names("Irises, Osiris, winedata, red_wine data, wine_database", names) == (
        "Irises, Osiris, winedata, red_wine data, wine_database"
    )
    assert mask_document_names("nothing to hide", []) == "nothing to hide"


def test_masking_prefers_the_longest_name():
    assert (
        mask_document_names("the breast cancer data", ["breast", "breast_cancer"], mask="M") == "the M data"
    )
    assert mask_document_names("the breast data", ["breast", "breast_cancer"], mask="M") == "the M data"


def test_masked_questions_no_longer_route_by_name(router):
    question = "What is the iris dataset about?"
    assert router.route(question)[0][0] == "iris"
    masked = mask_document_names(question, router.ids)
    assert "iris" not in masked.lower()
    assert router.route(masked)[0][1] < router.route(question)[0][1]


def _assert_chunks_cover(text: str, chunks: list[Chunk]) -> None:
    """Chunks are exact substrings of ``text``, in order, with only whitespace between and around them."""
    position = 0
    for expected_index, chunk in enumerate(chunks):
        assert chunk.index == expected_index
        found = text.find(chunk.text, position)
        assert found >= 0 and text[position:found].strip() == "", (
            f"chunk {chunk.index} is not next in the text"
        )
        position = found + len(chunk.text)
    assert text[position:].strip() == ""
    assert " ".join(chunk.text for chunk in chunks).split() == text.split()


def test_chunks_fit_the_limit_and_keep_every_word_in_order(descriptions):
    chunks = chunk_documents(descriptions, count_words, chunk_tokens=40)
    assert list(dict.fromkeys(c.document_id for c in chunks)) == [name for name, _ in descriptions]
    assert all(1 <= c.num_tokens <= 40 and c.num_tokens == count_words(c.text) for c in chunks)
    for name, text in descriptions:
        _assert_chunks_cover(text, [c for c in chunks if c.document_id == name])
    # Packed, not one paragraph each (short paragraphs share a chunk): fewer chunks than paragraphs.
    paragraphs = sum(len(re.split(r"\n\s*\n", text.strip())) for _, text in descriptions)
    assert len(chunks) < paragraphs


def test_paragraphs_that_fit_are_kept_whole_and_packed_greedily():
    paragraphs = [" ".join(f"p{i}w{j}" for j in range(n)) for i, n in enumerate([3, 4, 6, 2, 5, 7, 1])]
    text = "\n\n".join(paragraphs)
    chunks = chunk_documents([("doc", text)], count_words, chunk_tokens=10)
    assert [re.split(r"\n\n", c.text) for c in chunks] == [
        paragraphs[0:2],
        paragraphs[2:4],
        paragraphs[4:5],
        paragraphs[5:7],
    ]
    _assert_chunks_cover(text, chunks)


def test_long_paragraphs_are_cut_at_lines_then_words_then_characters():
    lines = ["one two three", "four five six seven", "eight nine"]
    long_line = " ".join(f"w{i}" for i in range(9))
    text = "short para\n\n" + "\n".join(lines) + "\n\n" + long_line
    chunks = chunk_documents([("doc", text)], count_words, chunk_tokens=4)
    assert [c.text for c in chunks] == [
        "short para",
        "one two three",  # the paragraph does not fit: cut at line ends, lines packed while they fit
        "four five six seven",
        "eight nine",
        "w0 w1 w2 w3",  # the line does not fit: cut between words
        "w4 w5 w6 w7",
        "w8",
    ]
    _assert_chunks_cover(text, chunks)

    def count_characters(piece: str) -> int:
        return len(piece)

    word = "abcdefghij"
    pieces = chunk_documents([("doc", f"{word} xy")], count_characters, chunk_tokens=4)
    assert [c.text for c in pieces] == ["abcd", "efgh", "ij", "xy"]
    assert "".join(c.text for c in pieces[:3]) == word


def test_chunking_errors_name_the_problem():
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        chunk_documents([("doc", "text")], count_words, chunk_tokens=0)
    with pytest.raises(ValueError, match="single character"):
        chunk_documents([("doc", "text")], lambda piece: len(piece) + 5, chunk_tokens=4)
    with pytest.raises(ValueError, match="duplicate"):
        chunk_documents([("doc", "a"), ("doc", "b")], count_words)
    assert chunk_documents([("empty", " \n\n "), ("doc", "a b")], count_words) == [Chunk("doc", 0, "a b", 2)]


def test_retrieved_chunks_stay_within_the_budget_and_the_quoted_chunk_comes_first(descriptions):
    chunks = chunk_documents(descriptions, count_words, chunk_tokens=48)
    retriever = ChunkRetriever(chunks)
    wine = [c for c in chunks if c.document_id == "wine_data"]
    target = max(wine, key=lambda c: len(c.text))
    quote = middle_sentence(target.text)
    question = f'Where does it say "{quote}"?'
    for budget in (48, 100, 300, 1000):
        selected = retriever.retrieve(question, token_budget=budget)
        assert selected[0] is target
        assert sum(c.num_tokens for c in selected) <= budget
        assert len(selected) == len({id(c) for c in selected})
        # Filled: no chunk left out would still fit.
        room = budget - sum(c.num_tokens for c in selected)
        assert all(c.num_tokens > room for c in chunks if all(c is not s for s in selected))
    assert retriever.retrieve(question, token_budget=min(c.num_tokens for c in chunks) - 1) == []
    questions = [question, "", "handwritten digits 8x8"]
    assert retriever.retrieve_many(questions, 200) == [retriever.retrieve(q, 200) for q in questions]


def test_a_chunk_that_does_not_fit_is_skipped_and_smaller_ones_after_it_are_tried():
    chunks = [
        Chunk("a", 0, "zebra zebra zebra stripes", 10),
        Chunk("a", 1, "zebra stripes savanna", 50),
        Chunk("b", 0, "zebra in the zoo today with many visitors", 5),
        Chunk("b", 1, "unrelated text", 3),
    ]
    retriever = ChunkRetriever(chunks)
    assert retriever.retrieve("zebra", token_budget=1000)[:3] == chunks[:3]
    assert retriever.retrieve("zebra", token_budget=20) == [chunks[0], chunks[2], chunks[3]]
    assert retriever.retrieve("zebra", token_budget=2) == []
    with pytest.raises(ValueError, match="token_budget=-1"):
        retriever.retrieve("zebra", token_budget=-1)


def test_the_cache_evicts_the_least_recently_used_cartridge():
    loads = []

    def load(cartridge_id):
        loads.append(cartridge_id)
        return f"cartridge {cartridge_id}"

    cache = CartridgeCache(capacity_bytes=3, load=load, size_of=lambda cartridge: 1)
    assert cache.hit_rate == 0.0
    for cartridge_id in "abcad":
        assert cache.get(cartridge_id) == f"cartridge {cartridge_id}"
    assert [i for i in "abcd" if i in cache] == ["a", "c", "d"]
    assert (cache.hits, cache.misses, cache.evictions, len(cache), cache.bytes_in_use) == (1, 4, 1, 3, 3)
    cache.get("b")  # a miss: b was evicted; c is now the least recently used
    assert loads == ["a", "b", "c", "d", "b"]
    assert "c" not in cache and "b" in cache
    assert cache.stats() == {
        "hits": 1,
        "misses": 5,
        "evictions": 2,
        "hit_rate": pytest.approx(1 / 6),
        "entries": 3,
        "bytes_in_use": 3,
        "capacity_bytes": 3,
    }


def test_a_cartridge_larger_than_the_cache_is_returned_but_not_kept():
    sizes = {"small": 2, "huge": 10}
    cache = CartridgeCache(capacity_bytes=5, load=lambda i: i.upper(), size_of=lambda c: sizes[c.lower()])
    cache.get("small")
    assert cache.get("huge") == "HUGE"
    assert "huge" not in cache and "small" in cache  # nothing evicted for it
    cache.get("huge")
    cache.get("small")
    assert (cache.hits, cache.misses, cache.evictions, cache.bytes_in_use) == (1, 3, 0, 2)
    assert cache.hit_rate == pytest.approx(0.25)
    with pytest.raises(ValueError, match="capacity_bytes=-1"):
        CartridgeCache(capacity_bytes=-1, load=str, size_of=len)


def test_lru_cache_builds_a_missing_value_once_for_concurrent_callers_and_counts_entries():
    import threading
    import time

    from hfx.cartridges.routing import LRUCache

    cache = LRUCache(2)  # entries
    builds = []

    def make():
        builds.append(1)
        time.sleep(0.05)  # the other callers arrive while it is being built
        return "value"

    threads = [threading.Thread(target=cache.get_or_make, args=("k", make)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == [1] and (cache.hits, cache.misses) == (5, 1)
    cache.get_or_make("a", lambda: 1)
    cache.get_or_make("b", lambda: 2)
    assert "k" not in cache and len(cache) == 2 and cache.evictions == 1
