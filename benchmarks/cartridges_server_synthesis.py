"""Synthesis throughput through an OpenAI-compatible server (`transformers serve`) vs the local backend.

Starts `transformers serve` with the embedded model on 127.0.0.1, then synthesizes the same batches (same seeds,
same chunks, same seed prompts) both ways, alternating, in this process. The server backend's answers come back
without log-probs (`transformers serve` ignores them), so each is re-scored by the local teacher: its cost per
conversation is printed too.

.venv/bin/python benchmarks/cartridges_server_synthesis.py --batches 2 --conversations-per-chunk 8 --concurrency 2
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from hfx import embedded
from hfx.cartridges.corpus import load_corpus
from hfx.cartridges.server import ChatClient
from hfx.cartridges.synthesis import ServerBatches, SynthesisConfig, synthesize_batch
from hfx.models import load_causal_lm

SAMPLE = {"generation_config": '{"do_sample": true}'}


def start_server(model_dir: Path, log: Path) -> tuple[str, subprocess.Popen]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        str(Path(sys.executable).with_name("transformers")), "serve", str(model_dir), "--host", "127.0.0.1",
        "--port", str(port), "--device", "cpu", "--dtype", "float32",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(360):
        if process.poll() is not None:
            raise SystemExit(f"transformers serve exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url, process
        except httpx.TransportError:
            time.sleep(0.5)
    raise SystemExit("transformers serve did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default="rcv1")
    parser.add_argument("--batches", type=int, default=2, help="batches (one chunk each) per backend")
    parser.add_argument("--conversations-per-chunk", type=int, default=8)
    parser.add_argument("--question-tokens", type=int, default=24)
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=2,
        help="server requests in flight (transformers serve runs each in a thread)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    args = parser.parse_args()

    model, tokenizer = load_causal_lm("embedded")
    path = str(embedded.embedded_model_path())
    corpus = load_corpus(args.corpus, tokenizer)
    config = SynthesisConfig(
        num_conversations=args.batches * args.conversations_per_chunk,
        conversations_per_chunk=args.conversations_per_chunk,
        max_question_tokens=args.question_tokens,
        max_answer_tokens=args.answer_tokens,
        continuation_fraction=0.0,  # every conversation generated: what the server backend does
        chunk_min_tokens=256,
        chunk_max_tokens=512,
        seed=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        url, server = start_server(embedded.embedded_model_path(), Path(tmp) / "serve.log")
        try:
            client = ChatClient(
                url, path, max_concurrency=args.concurrency, timeout=args.timeout, extra_body=SAMPLE
            )
            remote = ServerBatches(client, model, tokenizer, use_server_logprobs=False)
            remote(corpus, config, 0)  # warm-up: the server loads the model on its first request
            remote.rescore_seconds, remote.counts = 0.0, {"server_logprobs": 0, "rescored": 0}
            seconds = {"local": 0.0, "server": 0.0}
            rows = {"local": 0, "server": 0}
            for batch_idx in range(config.num_batches):  # alternate, so machine noise hits both alike
                for name, fn in (
                    ("local", lambda b=batch_idx: synthesize_batch(model, tokenizer, corpus, config, b)),
                    ("server", lambda b=batch_idx: remote(corpus, config, b)),
                ):
                    start = time.perf_counter()
                    rows[name] += len(fn())
                    seconds[name] += time.perf_counter() - start
            client.close()
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()

    local = rows["local"] / seconds["local"]
    remote_rate = rows["server"] / seconds["server"]
    per_conv = remote.rescore_seconds / max(1, remote.counts["rescored"])
    print(
        f"corpus {corpus.name}: {config.num_batches} batches x {args.conversations_per_chunk} conversations, "
        f"<= {args.question_tokens}+{args.answer_tokens} new tokens; server concurrency {args.concurrency}"
    )
    print(
        f"local backend (batched generate, shared chunk KV): {local:.3f} conv/s ({rows['local']} conversations)"
    )
    print(
        f"server backend (transformers serve + local re-scoring): {remote_rate:.3f} conv/s ({rows['server']})"
    )
    print(
        f"re-scoring: {per_conv * 1000:.0f} ms per conversation "
        f"({100 * remote.rescore_seconds / seconds['server']:.1f}% of the server backend's time)"
    )
    print(f"ratio local / server: {local / remote_rate:.2f}x")


if __name__ == "__main__":
    main()
