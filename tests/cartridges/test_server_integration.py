"""Synthesis through a real ``transformers serve`` process on 127.0.0.1 running the embedded model."""

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from hfx.cartridges.corpus import document_prefix_ids, load_corpus, user_turn_ids
from hfx.cartridges.server import ServerArguments, ServerError
from hfx.cartridges.synthesis import SynthesisConfig, synthesize
from tests.servers import free_port, serving

pytestmark = pytest.mark.integration

#: transformers serve keeps the model's generation config (greedy for SmolLM2) unless asked to sample.
SAMPLE = '{"generation_config": "{\\"do_sample\\": true}"}'


@pytest.fixture(scope="module")
def serve(embedded_dir, tmp_path_factory):
    """``transformers serve`` with the embedded model preloaded; yields (base URL, process)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    binary = Path(sys.executable).with_name("transformers")
    command = [
        str(binary), "serve", str(embedded_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
        "--dtype", "float32",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with serving(command, f"{url}/health", log, {**os.environ, "HF_HUB_OFFLINE": "1"}, 180) as process:
        yield url, process


def test_synthesis_through_transformers_serve_rescores_exactly_and_survives_the_server_dying(
    serve, embedded_model, tokenizer, embedded_dir, tmp_path
):
    url, process = serve
    corpus = load_corpus("iris", tokenizer)
    config = SynthesisConfig(
        num_conversations=4,
        conversations_per_chunk=2,
        chunk_min_tokens=64,
        chunk_max_tokens=96,
        max_question_tokens=24,
        max_answer_tokens=24,
        top_k=8,
        batches_per_shard=1,
        continuation_fraction=0.0,
    )
    args = ServerArguments(server_url=url, server_model=str(embedded_dir), server_extra_body=SAMPLE)
    dataset = synthesize(
        embedded_model, tokenizer, corpus, tmp_path / "syn", config, model_name="smollm2", server=args
    )
    assert sorted(dataset["conversation_id"]) == [0, 1, 2, 3]
    # transformers serve ignores `logprobs`: every answer was re-scored by the local teacher, exactly.
    row = dataset[0]
    answer = row["input_ids"][row["answer_start"] :]
    assert len(answer) == len(row["topk_token_ids"]) >= 1 and row["messages"][1]["content"]
    chunk_text = tokenizer.decode(corpus.token_ids[row["chunk_start"] : row["chunk_end"]])
    prompt = document_prefix_ids(tokenizer, chunk_text) + user_turn_ids(
        tokenizer, row["messages"][0]["content"], True
    )
    with torch.no_grad():
        logits = embedded_model(input_ids=torch.tensor([prompt + answer])).logits[0]
    expected = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(answer)], -1).topk(8, -1)
    torch.testing.assert_close(torch.tensor(row["topk_logprobs"]), expected.values, rtol=1e-3, atol=1e-3)
    # The server sampled the answer from the same model: the teacher ranks its tokens highly.
    ranks = [
        ids.index(tok) if tok in ids else 8 for tok, ids in zip(answer, row["topk_token_ids"], strict=True)
    ]
    assert sum(r < 8 for r in ranks) >= 0.8 * len(ranks)

    # The server goes away while the run asks for more: a clear error after the retries, and the shards it had
    # finished stay as they were (a later run with a server continues from them: test_server's fake-server test).
    data = tmp_path / "syn" / "data"
    assert sorted(p.name for p in data.glob("train-*.parquet")) == [
        "train-00000.parquet",
        "train-00001.parquet",
    ]
    (data / "train-00001.parquet").unlink()  # as if the run had been stopped before its second shard
    first = (data / "train-00000.parquet").read_bytes()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    dead = ServerArguments(
        server_url=url,
        server_model=str(embedded_dir),
        server_extra_body=SAMPLE,
        server_max_retries=1,
    )
    with pytest.raises(
        ServerError,
        match=rf"127.0.0.1:{url.rsplit(':', 1)[1]}/v1/chat/completions: failed after 2 attempts.*ConnectError",
    ):
        synthesize(
            embedded_model, tokenizer, corpus, tmp_path / "syn", config, model_name="smollm2", server=dead
        )
    assert [p.name for p in data.glob("train-*.parquet")] == ["train-00000.parquet"]
    assert (data / "train-00000.parquet").read_bytes() == first
