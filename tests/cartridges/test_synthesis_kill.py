"""Synthesis on the embedded model survives a real SIGKILL: the same command run again finishes the job with no
conversation lost, none duplicated, and the shards written before the kill kept as they were."""

from __future__ import annotations

import os
import signal
import time

import datasets
import pytest

from tests.prewarmed import run_prewarmed, start_prewarmed

CODE = "import sys; from hfx.cli import main; main(sys.argv[1:])"
COMMAND = [
    "cartridge",
    "synthesize",
    "--corpus",
    "rcv1",
    "--continuation_fraction",
    "0",
    "--num_conversations",
    "8",
    "--conversations_per_chunk",
    "2",
    "--batches_per_shard",
    "1",
    "--chunk_min_tokens",
    "64",
    "--chunk_max_tokens",
    "128",
    "--max_question_tokens",
    "12",
    "--max_answer_tokens",
    "16",
]


@pytest.mark.integration
def test_synthesis_killed_then_rerun_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "synth"
    command = [*COMMAND, "--synthesis_dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first_shard = out / "data" / "train-00000.parquet"
    # the job runs in a process of its own, forked from one that has imported torch, transformers and hfx
    job = start_prewarmed(CODE, command, env=env)
    deadline = time.monotonic() + 600
    while not first_shard.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.kill()
    assert job.wait(60) == -signal.SIGKILL, job.output()[1][-2000:]  # killed mid-job, not finished
    job.close()

    written = sorted(p.name for p in (out / "data").iterdir() if p.name.endswith(".parquet"))
    assert written and len(written) < 4 and not (out / "README.md").exists()
    kept = {name: (out / "data" / name).read_bytes() for name in written}

    rerun = run_prewarmed(CODE, command, env=env, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name, content in kept.items():  # not redone
        assert (out / "data" / name).read_bytes() == content
    rows = datasets.load_dataset("parquet", data_files=str(out / "data" / "train-*.parquet"), split="train")
    assert sorted(rows["conversation_id"]) == list(range(8))
    assert (out / "README.md").exists()
