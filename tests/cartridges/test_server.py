"""The OpenAI-compatible backend against a scripted HTTP server: retries, limits, errors, log-probs, re-scoring."""

import socket
import time

import pytest
import torch

from hfx.cartridges.corpus import Corpus, document_prefix_ids, user_turn_ids
from hfx.cartridges.server import ChatClient, ServerArguments, ServerError, TokenIds, normalize_base_url
from hfx.cartridges.synthesis import SynthesisConfig, load_synthesis, rescore, synthesize, synthesize_batch
from tests.cartridges.fake_server import FakeChatServer, chat_response

MESSAGES = [{"role": "user", "content": "hi"}]
TEXT = "The Zorblat protocol was designed in 1987 by Mara Quell. It has 4 layers and 12 message types. " * 8


def _corpus(tokenizer):
    return Corpus("zorblat", TEXT, tokenizer(TEXT, add_special_tokens=False)["input_ids"])


def _config(**overrides):
    values = dict(
        num_conversations=4,
        conversations_per_chunk=2,
        chunk_min_tokens=24,
        chunk_max_tokens=40,
        max_question_tokens=8,
        max_answer_tokens=8,
        top_k=3,
        continuation_fraction=0.0,  # every conversation through the server
    )
    values.update(overrides)
    return SynthesisConfig(**values)


def test_transient_failures_are_retried_with_the_request_unchanged():
    calls = []

    def handler(body):
        calls.append(time.perf_counter())
        if len(calls) <= 2:
            return 503, {"error": "overloaded"}, {"Retry-After-Ms": "10"}
        return 200, chat_response("hello"), None

    with (
        FakeChatServer(handler) as server,
        ChatClient(server.url, "m", max_retries=3) as client,
    ):
        out = client.complete(MESSAGES, max_tokens=5, temperature=0.5, seed=7)
    assert out.text == "hello" and out.finish_reason == "stop" and out.tokens is None
    assert client.stats == {"requests": 3, "retries": 2}
    assert all(body == server.bodies[0] for body in server.bodies)
    assert server.bodies[0] == {
        "model": "m",
        "messages": MESSAGES,
        "max_tokens": 5,
        "temperature": 0.5,
        "seed": 7,
    }


def test_retry_after_is_honoured_and_the_last_error_is_named():
    calls = []

    def handler(body):
        calls.append(time.perf_counter())
        return 502, "bad gateway", {"Retry-After-Ms": "150"}

    with (
        FakeChatServer(handler) as server,
        ChatClient(server.url, "m", max_retries=3) as client,
    ):
        with pytest.raises(
            ServerError, match=r"/v1/chat/completions: failed after 4 attempts; last error: HTTP 502"
        ):
            client.complete(MESSAGES, max_tokens=5, temperature=0.5)
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert len(gaps) == 3 and all(0.15 <= gap < 1.0 for gap in gaps), gaps


def test_client_errors_fail_at_once_with_the_servers_message():
    with FakeChatServer(lambda body: (400, {"error": "model 'm' not found"}, None)) as server:
        with ChatClient(server.url, "m", max_retries=3) as client:
            with pytest.raises(ServerError, match=r"refused the request \(HTTP 400\).*model 'm' not found"):
                client.complete(MESSAGES, max_tokens=5, temperature=0.5)
    assert len(server.bodies) == 1


def test_unreachable_server_and_timeouts_are_clear_errors():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with ChatClient(f"127.0.0.1:{port}", "m", max_retries=2) as client:
        with pytest.raises(
            ServerError, match=rf"127.0.0.1:{port}/v1/chat/completions: failed after 3 attempts.*ConnectError"
        ):
            client.complete(MESSAGES, max_tokens=5, temperature=0.5)

    def slow(body):
        time.sleep(0.6)
        return 200, chat_response("late"), None

    with (
        FakeChatServer(slow) as server,
        ChatClient(server.url, "m", max_retries=1, timeout=0.2) as client,
    ):
        with pytest.raises(ServerError, match="failed after 2 attempts; last error: ReadTimeout"):
            client.complete(MESSAGES, max_tokens=5, temperature=0.5)


def test_requests_in_flight_never_exceed_the_limit_and_results_keep_their_order():
    def handler(body):
        time.sleep(0.05)
        return 200, chat_response(str(body["seed"])), None

    with FakeChatServer(handler) as server, ChatClient(server.url, "m", max_concurrency=3) as client:
        out = client.complete_many(
            [{"messages": MESSAGES, "max_tokens": 1, "temperature": 0.0, "seed": i} for i in range(12)]
        )
    assert [c.text for c in out] == [str(i) for i in range(12)]
    assert server.max_in_flight == 3


def test_urls_and_arguments_are_checked():
    assert normalize_base_url("127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalize_base_url("https://api.example.com/openai/v1/") == "https://api.example.com/openai/v1"
    with pytest.raises(ValueError, match="not an http"):
        normalize_base_url("ftp://host")
    with pytest.raises(ValueError, match="server_extra_body is not valid JSON"):
        ServerArguments(server_url="x", server_extra_body="{nope")
    with pytest.raises(ValueError, match="server_logprobs must be one of"):
        ServerArguments(server_url="x", server_logprobs="sometimes")


def _answering_server(tokenizer, answer: str, with_logprobs: bool, finish_reason: str = "stop", k: int = 3):
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]

    def handler(body):
        if "top_logprobs" not in body:  # agent A: the question
            return 200, chat_response("Question: Who designed the Zorblat protocol? Answer: Mara"), None
        logprobs = None
        if with_logprobs:
            logprobs = [
                {
                    "token": f"token_id:{tok}",
                    "logprob": -0.1,
                    "top_logprobs": [
                        {"token": f"token_id:{tok + j}", "logprob": -0.1 - j}
                        for j in range(body["top_logprobs"])
                    ],
                }
                for tok in answer_ids
            ]
        return 200, chat_response(answer, finish_reason, logprobs), None

    return handler, answer_ids


def test_server_log_probs_with_token_ids_are_the_teacher(tiny_model, tokenizer, tmp_path):
    handler, answer_ids = _answering_server(tokenizer, "Mara Quell designed it.", with_logprobs=True)
    corpus = _corpus(tokenizer)
    with FakeChatServer(handler) as server:
        dataset = synthesize(
            tiny_model,
            tokenizer,
            corpus,
            tmp_path / "syn",
            _config(),
            progress=False,
            server=ServerArguments(server_url=server.url, server_model="served"),
        )
    assert len(dataset) == 4
    for row in dataset:
        assert row["messages"][0]["content"] == "Who designed the Zorblat protocol?"
        assert row["input_ids"][row["answer_start"] :] == answer_ids
        assert [ids[0] for ids in row["topk_token_ids"]] == answer_ids
        assert [ids[1] for ids in row["topk_token_ids"]] == [t + 1 for t in answer_ids]
        assert row["topk_logprobs"][0] == pytest.approx([-0.1, -1.1, -2.1])
    questions = [b for b in server.bodies if "top_logprobs" not in b]
    answers = [b for b in server.bodies if "top_logprobs" in b]
    assert len(questions) == len(answers) == 4 and all(b["model"] == "served" for b in server.bodies)
    chunk = corpus.token_ids[dataset[0]["chunk_start"] : dataset[0]["chunk_end"]]
    assert tokenizer.decode(chunk) in answers[0]["messages"][0]["content"]
    assert answers[0]["messages"][1]["content"] == "Who designed the Zorblat protocol?"


@pytest.mark.parametrize("finish_reason", ["stop", "length"])
def test_answers_without_log_probs_are_rescored_exactly_by_the_local_teacher(
    tiny_model, tokenizer, tmp_path, finish_reason
):
    handler, answer_ids = _answering_server(tokenizer, "Mara Quell designed it.", False, finish_reason)
    corpus = _corpus(tokenizer)
    with FakeChatServer(handler) as server:
        dataset = synthesize(
            tiny_model,
            tokenizer,
            corpus,
            tmp_path / "syn",
            _config(num_conversations=2),
            progress=False,
            server=ServerArguments(server_url=server.url),
        )
    row = dataset[0]
    end = [tokenizer.convert_tokens_to_ids("<|im_end|>")] if finish_reason == "stop" else []
    answer = answer_ids + end
    assert row["input_ids"][row["answer_start"] :] == answer
    # The teacher: the whole prompt (chunk in the system turn, question, answer) in one plain forward pass.
    chunk_text = tokenizer.decode(corpus.token_ids[row["chunk_start"] : row["chunk_end"]])
    prompt = document_prefix_ids(tokenizer, chunk_text) + user_turn_ids(
        tokenizer, row["messages"][0]["content"], True
    )
    with torch.no_grad():
        logits = tiny_model(input_ids=torch.tensor([prompt + answer])).logits[0]
    expected = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(answer)], -1).topk(3, -1)
    assert row["topk_token_ids"] == expected.indices.tolist()
    torch.testing.assert_close(torch.tensor(row["topk_logprobs"]), expected.values, rtol=1e-4, atol=1e-4)


def test_rescoring_reproduces_the_local_generators_teacher(tiny_model, tokenizer):
    corpus = _corpus(tokenizer)
    config = _config(max_answer_tokens=6, top_k=4)
    rows = synthesize_batch(tiny_model, tokenizer, corpus, config, batch_idx=0)
    chunk_text = tokenizer.decode(corpus.token_ids[rows[0]["chunk_start"] : rows[0]["chunk_end"]])
    scored = rescore(
        tiny_model,
        tokenizer,
        chunk_text,
        [(r["messages"][0]["content"], r["input_ids"][r["answer_start"] :]) for r in rows],
        top_k=4,
        batch_size=2,
    )
    for row, (ids, logprobs) in zip(rows, scored, strict=True):
        assert ids == row["topk_token_ids"]
        torch.testing.assert_close(
            torch.tensor(logprobs), torch.tensor(row["topk_logprobs"]), rtol=1e-4, atol=1e-4
        )


def test_a_failing_server_keeps_finished_shards_and_the_rerun_completes(tiny_model, tokenizer, tmp_path):
    state = {"healthy_requests": 4}  # the first batch: two questions and two answers
    good, _ = _answering_server(tokenizer, "Mara Quell designed it.", with_logprobs=False)

    def handler(body):
        if state["healthy_requests"] <= 0:
            return 503, {"error": "down"}, None
        state["healthy_requests"] -= 1
        return good(body)

    corpus = _corpus(tokenizer)
    out = tmp_path / "syn"
    config = _config(num_conversations=6)
    with FakeChatServer(handler) as server:
        args = ServerArguments(server_url=server.url, server_max_retries=2)
        with pytest.raises(ServerError, match="failed after 3 attempts; last error: HTTP 503"):
            synthesize(tiny_model, tokenizer, corpus, out, config, progress=False, server=args)
        shards = sorted(p.name for p in (out / "data").iterdir())
        assert shards == ["train-00000.parquet"]
        first = (out / "data" / "train-00000.parquet").read_bytes()

        with pytest.raises(ValueError, match=r"other settings:\n  settings.generator:"):
            synthesize(tiny_model, tokenizer, corpus, out, config, progress=False)

        state["healthy_requests"] = 10**6
        dataset = synthesize(tiny_model, tokenizer, corpus, out, config, progress=False, server=args)
    assert sorted(dataset["conversation_id"]) == list(range(6))
    assert (out / "data" / "train-00000.parquet").read_bytes() == first
    assert len(load_synthesis(out)) == 6 and (out / "README.md").is_file()


def test_token_strings_map_back_to_ids_only_when_unambiguous(tokenizer):
    ids = TokenIds(tokenizer)
    the = tokenizer(" the", add_special_tokens=False)["input_ids"]
    assert len(the) == 1
    assert ids(" the") == the[0] == ids(tokenizer.convert_ids_to_tokens(the[0])) == ids(f"token_id:{the[0]}")
    assert ids("token_id:abc") is None and ids("no such token in the vocabulary!") is None
