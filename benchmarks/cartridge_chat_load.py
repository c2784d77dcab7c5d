"""Latency of the cartridge-chat Space under load: N concurrent users vs 1 user, through its `/ask` API.

Starts spaces/cartridge-chat/app.py on a free loopback port with cartridges of the embedded model (made on the
spot without training, initialization "first_tokens", unless --cartridge is given), then alternates, --repeats
times: 1 user asking twice in a row, and N users asking at once (gradio_client, one thread per user), so that
noise from other work on the machine falls on both alike. Every request asks the same question, so every answer
is the same greedy continuation: each request does the same work. Prints the answer latency (and the time to the
first streamed word) min/median/p90/max of each, the ratio of the medians and the answers/s of each.

HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cartridge_chat_load.py --users 8 --repeats 3 --concurrency 4
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "spaces" / "cartridge-chat" / "app.py"
QUESTION = "What does the dataset describe, and what are its variables?"


def make_cartridges(corpora: list[str], p: int, directory: Path) -> list[Path]:
    """Cartridges of the embedded model initialized from each corpus's first tokens (no training needed)."""
    from hfx.cartridges.corpus import load_corpus
    from hfx.cartridges.training import create_cartridge, write_metadata
    from hfx.models import load_causal_lm, model_id

    model, tokenizer = load_causal_lm("embedded")
    paths = []
    for name in corpora:
        peft_model = create_cartridge(
            model,
            tokenizer,
            load_corpus(name, tokenizer),
            num_virtual_tokens=p,
            initialization="first_tokens",
        )
        path = directory / name
        peft_model.save_pretrained(path)
        write_metadata(path, {"base_model": model_id("embedded"), "corpus": name, "num_virtual_tokens": p})
        model = peft_model.get_base_model()
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(command: list[str], log_path: Path, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_SERVER_NAME": "127.0.0.1",
    }
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            sys.exit(f"The app exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.terminate()
            sys.exit(f"The app did not answer on {url} within {timeout:.0f} s:\n{log_path.read_text()}")
        time.sleep(0.5)


def ask(client, max_new_tokens: int) -> tuple[float, float, str]:
    """(seconds to the whole answer, seconds to its first streamed word, the answer)."""
    start = time.perf_counter()
    first = None
    job = client.submit(QUESTION, None, False, max_new_tokens, api_name="/ask")
    for cartridge_answer, _ in job:
        if first is None and cartridge_answer:
            first = time.perf_counter() - start
    answer = job.result()[0]
    total = time.perf_counter() - start
    if not answer.strip():
        raise RuntimeError("empty answer")
    return total, first if first is not None else total, answer


def spread(values: list[float]) -> str:
    values = sorted(values)
    p90 = statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]
    return f"min {values[0]:5.2f}  median {statistics.median(values):5.2f}  p90 {p90:5.2f}  max {values[-1]:5.2f} s"


def run_users(
    url: str, users: int, rounds: int, max_new_tokens: int
) -> tuple[list[float], list[float], float]:
    """Each user sends ``rounds`` requests back to back, all users starting together; (latencies, firsts, wall)."""
    from gradio_client import Client

    clients = [Client(url, verbose=False) for _ in range(users)]
    barrier = threading.Barrier(users + 1)
    results: list[list[tuple[float, float, str]]] = [[] for _ in range(users)]
    failures: list[str] = []

    def user(index: int) -> None:
        barrier.wait()
        for _ in range(rounds):
            try:
                results[index].append(ask(clients[index], max_new_tokens))
            except Exception as err:  # noqa: BLE001 - counted and reported
                failures.append(f"user {index}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=user, args=(index,)) for index in range(users)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if failures:
        sys.exit("Requests failed:\n" + "\n".join(failures))
    answers = {answer for per_user in results for _, _, answer in per_user}
    if len(answers) != 1:
        print(f"note: {len(answers)} different answers (expected one greedy continuation)")
    flat = [result for per_user in results for result in per_user]
    return [total for total, _, _ in flat], [first for _, first, _ in flat], wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cartridge",
        action="append",
        default=None,
        metavar="DIR",
        help="cartridges to serve (default: made now)",
    )
    parser.add_argument("--corpora", default="linnerud,covtype", help="corpora of the cartridges made now")
    parser.add_argument("--p", type=int, default=32, help="tokens per cartridge made now")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="alternations of the 1-user and N-user phases")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--concurrency", type=int, default=None, help="the app's --concurrency (default: its own)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cartridge-chat-load-") as tmp:
        tmp = Path(tmp)
        cartridges = args.cartridge or make_cartridges(args.corpora.split(","), args.p, tmp)
        command = [sys.executable, str(APP), "--max-new-tokens", str(args.max_new_tokens)]
        if args.concurrency is not None:
            command += ["--concurrency", str(args.concurrency)]
        for path in cartridges:
            command += ["--cartridge", str(path)]
        process, url = start_server(command, tmp / "server.log")
        one, one_first, many, many_first = [], [], [], []
        one_wall = many_wall = 0.0
        try:
            run_users(url, 1, 1, args.max_new_tokens)  # warm-up: first request, caches
            for _ in range(args.repeats):
                latencies, firsts, wall = run_users(url, 1, 2, args.max_new_tokens)
                one += latencies
                one_first += firsts
                one_wall += wall
                latencies, firsts, wall = run_users(url, args.users, 1, args.max_new_tokens)
                many += latencies
                many_first += firsts
                many_wall += wall
        finally:
            process.terminate()
            process.wait(timeout=30)

    concurrency = args.concurrency if args.concurrency is not None else "default (8)"
    print(
        f"{len(cartridges)} cartridges composed, {args.max_new_tokens} new tokens per answer, "
        f"app --concurrency {concurrency}, {os.cpu_count()} CPU cores"
    )
    print(f"1 user  ({len(one):2d} requests)  answer {spread(one)}   first word {spread(one_first)}")
    print(
        f"{args.users} users ({len(many):2d} requests)  answer {spread(many)}   first word {spread(many_first)}"
    )
    one_rate, many_rate = len(one) / one_wall, len(many) / many_wall
    print(
        f"ratio {args.users}-user median / 1-user median: {statistics.median(many) / statistics.median(one):.2f}x "
        f"(answer), {statistics.median(many_first) / statistics.median(one_first):.2f}x (first word); "
        f"throughput {many_rate:.2f} vs {one_rate:.2f} answers/s ({many_rate / one_rate:.2f}x)"
    )


if __name__ == "__main__":
    main()
