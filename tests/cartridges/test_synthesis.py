import pytest
import torch

from hfx.cartridges.corpus import document_prefix_ids, load_corpus, user_turn_ids
from hfx.cartridges.synthesis import (
    FEATURES,
    QUOTED_KINDS,
    SEED_KINDS,
    SynthesisConfig,
    expected_coverage,
    load_synthesis,
    sample_chunk,
    sparse_coverage_warning,
    synthesize,
)

TEXT = (
    "The Zorblat protocol was designed in 1987 by Mara Quell at the Ostrava Institute. It uses 17 rounds of "
    "mixing, each with a 40-bit key schedule. Version 2, released in 1994, added checksums. "
) * 12

CONFIG = dict(
    num_conversations=6,
    conversations_per_chunk=2,
    chunk_min_tokens=40,
    chunk_max_tokens=80,
    max_question_tokens=6,
    max_answer_tokens=5,
    top_k=4,
    batches_per_shard=2,
    continuation_fraction=0.0,  # generated conversations; continuations have their own test
)


@pytest.fixture
def corpus(tmp_path, tokenizer):
    path = tmp_path / "zorblat.txt"
    path.write_text(TEXT)
    return load_corpus(path, tokenizer)


def test_chunks_are_windows_of_the_corpus():
    import random

    config = SynthesisConfig(chunk_min_tokens=10, chunk_max_tokens=20)
    rng = random.Random(0)
    for _ in range(50):
        start, end = sample_chunk(100, config, rng)
        assert 0 <= start and end <= 100 and 10 <= end - start <= 20
    assert sample_chunk(5, config, rng) == (0, 5)  # shorter corpus: the whole of it


def test_synthesis_rows_carry_the_teachers_topk_with_the_chunk_in_context(
    tmp_path, tiny_model, tokenizer, corpus
):
    out = tmp_path / "synth"
    ds = synthesize(tiny_model, tokenizer, corpus, out, SynthesisConfig(**CONFIG), progress=False)
    assert ds.features == FEATURES and 1 <= len(ds) <= 6
    assert (out / "README.md").read_text().count("zorblat") >= 1
    assert sorted(p.name for p in (out / "data").glob("*.parquet")) == [
        "train-00000.parquet",
        "train-00001.parquet",
    ]
    for row in ds:
        assert row["seed_kind"] in SEED_KINDS
        n_answer = len(row["input_ids"]) - row["answer_start"]
        assert n_answer == len(row["topk_token_ids"]) == len(row["topk_logprobs"]) >= 1
        # The student sequence is the no-context prompt for the user message, then the answer tokens.
        prompt = user_turn_ids(tokenizer, row["messages"][0]["content"], after_system=False)
        assert row["input_ids"][: row["answer_start"]] == prompt
        # Recompute the teacher: chunk in the system turn, A's message, B's answer; logits at each answer token.
        chunk_text = tokenizer.decode(corpus.token_ids[row["chunk_start"] : row["chunk_end"]])
        teacher_prompt = document_prefix_ids(tokenizer, chunk_text) + user_turn_ids(
            tokenizer, row["messages"][0]["content"], after_system=True
        )
        answer = row["input_ids"][row["answer_start"] :]
        with torch.no_grad():
            logits = tiny_model(torch.tensor([teacher_prompt + answer])).logits[0]
        expected = torch.log_softmax(logits[len(teacher_prompt) - 1 : -1], -1).topk(4, -1)
        assert torch.tensor(row["topk_logprobs"]).allclose(expected.values, atol=2e-3)
        assert (torch.tensor(row["topk_token_ids"])[:, 0] == expected.indices[:, 0]).all()


def test_continuations_answer_with_the_documents_next_tokens_and_the_teachers_topk(
    tmp_path, tiny_model, tokenizer, corpus
):
    config = SynthesisConfig(
        **{**CONFIG, "continuation_fraction": 0.5, "continuation_cue_tokens": 6, "quote_fraction": 0.0}
    )
    ds = synthesize(tiny_model, tokenizer, corpus, tmp_path / "synth", config, progress=False)
    kinds = [row["seed_kind"] for row in ds]
    assert "continuation" in kinds and set(kinds) - {"continuation"}, kinds
    for row in ds:
        if row["seed_kind"] != "continuation":
            continue
        chunk = corpus.token_ids[row["chunk_start"] : row["chunk_end"]]
        answer = row["input_ids"][row["answer_start"] :]
        assert len(answer) == min(config.max_answer_tokens, len(chunk) - 6)
        # The answer is the passage that follows the quoted opening words, inside the chunk.
        starts = [s for s in range(len(chunk) - len(answer) + 1) if chunk[s : s + len(answer)] == answer]
        request = row["messages"][0]["content"]
        assert any(tokenizer.decode(chunk[s - 6 : s]).strip() in request for s in starts if s >= 6), request
        chunk_text = tokenizer.decode(chunk)
        teacher_prompt = document_prefix_ids(tokenizer, chunk_text) + user_turn_ids(
            tokenizer, request, after_system=True
        )
        with torch.no_grad():
            logits = tiny_model(torch.tensor([teacher_prompt + answer])).logits[0]
        expected = torch.log_softmax(logits[len(teacher_prompt) - 1 : -1], -1).topk(4, -1)
        assert torch.tensor(row["topk_logprobs"]).allclose(expected.values, atol=2e-3)
    # With a fraction of 0 there are none.
    plain = synthesize(
        tiny_model, tokenizer, corpus, tmp_path / "plain", SynthesisConfig(**CONFIG), progress=False
    )
    assert "continuation" not in plain["seed_kind"]
    with pytest.raises(ValueError, match="continuation_fraction"):
        SynthesisConfig(continuation_fraction=1.5)


def test_quotes_answer_with_the_passage_around_the_quoted_words(tmp_path, tiny_model, tokenizer, corpus):
    config = SynthesisConfig(
        **CONFIG
        | {
            "num_conversations": 8,
            "max_answer_tokens": 12,
            "continuation_fraction": 1.0,
            "quote_fraction": 0.5,
            "quote_cue_tokens": 4,
        }
    )
    ds = synthesize(tiny_model, tokenizer, corpus, tmp_path / "synth", config, progress=False)
    kinds = [row["seed_kind"] for row in ds]
    assert {"quote", "continuation"} <= set(kinds) <= set(QUOTED_KINDS), kinds
    inside = 0
    for row in ds:
        if row["seed_kind"] != "quote":
            continue
        chunk = corpus.token_ids[row["chunk_start"] : row["chunk_end"]]
        answer = row["input_ids"][row["answer_start"] :]
        assert len(answer) == min(config.max_answer_tokens, len(chunk))
        assert any(chunk[s : s + len(answer)] == answer for s in range(len(chunk) - len(answer) + 1))
        request = row["messages"][0]["content"]
        cues = {tokenizer.decode(answer[c : c + 4]).strip() for c in range(len(answer) - 3)}
        assert any(cue and cue in request for cue in cues), request
        # Quoted from inside the passage, not only from its opening words.
        inside += tokenizer.decode(answer[:4]).strip() not in request
        assert len(row["topk_token_ids"]) == len(answer)
    assert inside > 0
    # Without quotes, the same seed gives the same continuations as before quotes existed.
    plain = synthesize(
        tiny_model,
        tokenizer,
        corpus,
        tmp_path / "plain",
        SynthesisConfig(**{**CONFIG, "continuation_fraction": 1.0, "quote_fraction": 0.0}),
        progress=False,
    )
    assert set(plain["seed_kind"]) == {"continuation"}
    with pytest.raises(ValueError, match="quote_fraction"):
        SynthesisConfig(quote_fraction=-0.1)


def test_a_synthesis_that_reads_little_of_a_long_document_says_so(
    tmp_path, tiny_model, tokenizer, corpus, caplog
):
    short = SynthesisConfig(num_conversations=512, conversations_per_chunk=256)  # chunks of 2048 tokens
    assert (
        expected_coverage(short, 1500) == 1.0
    )  # a document shorter than a chunk is read whole by every batch
    assert sparse_coverage_warning(short, 1500) is None
    # 100k tokens: two batches of 256 read two windows of 2048 tokens (~4%); 32 per chunk read 16 (~28%)
    assert expected_coverage(short, 100_000) == pytest.approx(1 - (1 - 2048 / 100_000) ** 2)
    smaller = SynthesisConfig(num_conversations=512, conversations_per_chunk=32)
    assert expected_coverage(short, 100_000) < 0.05 < 0.25 < expected_coverage(smaller, 100_000) < 0.3
    message = sparse_coverage_warning(short, 100_000)
    assert "512 conversations at 256 per chunk read 2 chunks of about 2048 tokens: about 4%" in message
    assert "conversations_per_chunk" in message
    # logged once by the synthesis that starts (this corpus: 3 batches of 40-80 tokens of ~600)
    config = SynthesisConfig(**CONFIG)
    assert expected_coverage(config, corpus.num_tokens) < 0.5
    with caplog.at_level("WARNING", logger="hfx.cartridges.synthesis"):
        synthesize(tiny_model, tokenizer, corpus, tmp_path / "synth", config, progress=False)
        synthesize(tiny_model, tokenizer, corpus, tmp_path / "synth", config, progress=False)  # done: quiet
    assert sum("per chunk read 3 chunks" in r.getMessage() for r in caplog.records) == 1


def test_synthesis_resumes_without_losing_or_duplicating_rows(tmp_path, tiny_model, tokenizer, corpus):
    out = tmp_path / "synth"
    config = SynthesisConfig(**CONFIG)
    first = synthesize(tiny_model, tokenizer, corpus, out, config, progress=False).to_list()
    # Simulate a kill after the first shard: the second shard, the card and the stage's marker never got written.
    (out / "data" / "train-00001.parquet").unlink()
    (out / "README.md").unlink()
    (out / "hfx_stage_synthesis.done").unlink()
    resumed = synthesize(tiny_model, tokenizer, corpus, out, config, progress=False).to_list()
    assert resumed == first
    ids = [r["conversation_id"] for r in resumed]
    assert len(ids) == len(set(ids))
    # a shard of a finished synthesis deleted since: made again, never a partial dataset returned as finished
    (out / "data" / "train-00001.parquet").unlink()
    assert synthesize(tiny_model, tokenizer, corpus, out, config, progress=False).to_list() == first
    assert (out / "hfx_stage_synthesis.done").is_file()


def test_synthesis_refuses_a_directory_made_with_other_settings(tmp_path, tiny_model, tokenizer, corpus):
    out = tmp_path / "synth"
    synthesize(tiny_model, tokenizer, corpus, out, SynthesisConfig(**CONFIG), progress=False)
    with pytest.raises(ValueError, match=r"other settings:\n  settings.top_k: 4 -> 3"):
        synthesize(
            tiny_model, tokenizer, corpus, out, SynthesisConfig(**{**CONFIG, "top_k": 3}), progress=False
        )
    # --overwrite starts over with the new settings; the same settings again return the finished dataset
    redone = synthesize(
        tiny_model,
        tokenizer,
        corpus,
        out,
        SynthesisConfig(**{**CONFIG, "top_k": 3}),
        progress=False,
        overwrite=True,
    )
    assert len(redone[0]["topk_token_ids"][0]) == 3
    shard = (out / "data" / "train-00000.parquet").read_bytes()
    again = synthesize(
        tiny_model, tokenizer, corpus, out, SynthesisConfig(**{**CONFIG, "top_k": 3}), progress=False
    )
    assert (
        again.to_list() == redone.to_list() and (out / "data" / "train-00000.parquet").read_bytes() == shard
    )
    with pytest.raises(FileNotFoundError, match="no synthesized shards"):
        load_synthesis(tmp_path / "elsewhere")


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="num_conversations"):
        SynthesisConfig(num_conversations=0)
    with pytest.raises(ValueError, match="chunk_max_tokens"):
        SynthesisConfig(chunk_min_tokens=50, chunk_max_tokens=10)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ('Question: "How many topics does RCV1 have?" Answer: 103', "How many topics does RCV1 have?"),
        ("Summarize the first section.", "Summarize the first section."),
        ("  Q: Who wrote it? And when?  ", "Who wrote it?"),
        ("", ""),
    ],
)
def test_user_messages_are_cut_to_the_request(raw, expected):
    from hfx.cartridges.synthesis import clean_user_message

    assert clean_user_message(raw) == expected


def test_memory_does_not_grow_with_the_number_of_conversations(tmp_path, tokenizer, corpus, monkeypatch):
    """Tens of thousands of conversations: one shard's rows at a time, and card statistics read per shard."""
    import tracemalloc

    from hfx.cartridges import synthesis as module

    def fake_batch(self, corpus, config, batch_idx):  # cheap rows of a realistic size
        plan = module.plan_batch(tokenizer, corpus, config, batch_idx)
        answer = list(range(100, 120))
        return [
            module._row(
                tokenizer,
                plan,
                i,
                "Q?",
                answer,
                [[t] * config.top_k for t in answer],
                [[-1.0] * config.top_k] * 20,
            )
            for i in range(len(plan.seeds))
        ]

    monkeypatch.setattr(module.LocalBatches, "__call__", fake_batch)

    def peak(n: int) -> int:
        config = SynthesisConfig(
            num_conversations=n,
            conversations_per_chunk=500,
            top_k=4,
            chunk_min_tokens=40,
            chunk_max_tokens=80,
        )
        tracemalloc.start()
        dataset = synthesize(None, tokenizer, corpus, tmp_path / str(n), config, progress=False)
        result = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(dataset) == n and len(list((tmp_path / str(n) / "data").iterdir())) == n // 500
        return result

    small, large = peak(1_000), peak(10_000)
    assert large < 1.5 * small, (small, large)


def test_after_warm_up_synthesis_builds_no_new_decode_bucket(tmp_path, tokenizer, corpus):
    """The decode buckets a config can need are built once up front (a CUDA graph each on a GPU); the batches that
    follow, on chunks of every length in the config's range, run in them: nothing is captured or compiled later."""
    from hfx.attention import use_grouped_sdpa
    from hfx.cartridges.synthesis import LocalBatches
    from hfx.generation import decoder_for
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tokenizer)
    use_grouped_sdpa(model)
    config = SynthesisConfig(**{**CONFIG, "num_conversations": 16, "conversations_per_chunk": 4})
    built = LocalBatches(model, tokenizer).warm_up(corpus, config)
    stats = decoder_for(model).stats
    assert built == stats.buckets >= 2
    synthesize(model, tokenizer, corpus, tmp_path / "s", config, progress=False)
    assert stats.calls == 8 and stats.buckets == built
    assert len(stats.shapes) <= 2 * built  # a prefill and a decode shape per bucket


def test_warm_up_builds_the_batch_buckets_of_a_mix_of_kinds(tmp_path, tokenizer, corpus):
    """Half generated: batches hold different numbers of generated conversations, so agent A and B run in several
    batch buckets; the warm-up builds each one the run's batches fall in, and synthesis then builds none."""
    from hfx.attention import use_grouped_sdpa
    from hfx.cartridges.synthesis import LocalBatches, plan_batch
    from hfx.generation import bucket, decoder_for
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tokenizer)
    use_grouped_sdpa(model)
    config = SynthesisConfig(
        **{**CONFIG, "num_conversations": 24, "conversations_per_chunk": 6, "continuation_fraction": 0.5}
    )
    generated = {
        sum(k not in ("continuation", "quote") for k in plan_batch(tokenizer, corpus, config, b).kinds)
        for b in range(config.num_batches)
    }
    buckets = {bucket(n) for n in generated - {0}}
    assert len(buckets) >= 2  # the case exists: batches of this seed fall in several buckets
    built = LocalBatches(model, tokenizer).warm_up(corpus, config)
    stats = decoder_for(model).stats
    batch_sizes = {key[0] for key in decoder_for(model)._steps}
    assert batch_sizes == buckets
    synthesize(model, tokenizer, corpus, tmp_path / "s", config, progress=False)
    assert stats.buckets == built


def test_two_synthesis_calls_on_other_chunk_lengths_share_the_attention_shapes(tmp_path, tokenizer, corpus):
    """Attention over the cache (agents A and B: their prompts' prefill and every decode step) runs in no more
    shapes than the decode loop has buckets, across two syntheses on chunks of other lengths."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hfx.attention import sdpa_mask_without_empty_rows
    from hfx.generation import decoder_for
    from tests.conftest import make_tiny_llama

    shapes = set()

    def recording(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] != key.shape[2]:  # over a cache: not the chunk's own prefill
            shapes.add((query.shape[0], query.shape[2], key.shape[2]))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("hfx_test_synthesis_shapes", recording)
    AttentionMaskInterface.register("hfx_test_synthesis_shapes", sdpa_mask_without_empty_rows)
    model = make_tiny_llama(tokenizer)
    model.set_attn_implementation("hfx_test_synthesis_shapes")
    for name, (low, high) in (("short", (40, 60)), ("long", (70, 90))):
        config = SynthesisConfig(
            **{**CONFIG, "num_conversations": 8, "conversations_per_chunk": 4}
            | {"chunk_min_tokens": low, "chunk_max_tokens": high}
        )
        synthesize(model, tokenizer, corpus, tmp_path / name, config, progress=False)
    stats = decoder_for(model).stats
    assert stats.calls == 8  # two agents, two batches, two syntheses
    assert 2 <= len(shapes) <= 2 * stats.buckets < 2 * stats.calls, (shapes, stats)
