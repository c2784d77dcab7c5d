"""Synthesis on the embedded model survives a real SIGKILL: the same command run again finishes the job with no
conversation lost, none duplicated, and the shards written before the kill kept as they were."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import datasets
import pytest

COMMAND = [
    sys.executable,
    "-c",
    "import sys; from hfx.cli import main; main(sys.argv[1:])",
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
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not first_shard.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL, job.stderr.read().decode()[
        -2000:
    ]  # killed mid-job, not finished

    written = sorted(p.name for p in (out / "data").iterdir() if p.name.endswith(".parquet"))
    assert written and len(written) < 4 and not (out / "README.md").exists()
    kept = {name: (out / "data" / name).read_bytes() for name in written}

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name, content in kept.items():  # not redone
        assert (out / "data" / name).read_bytes() == content
    rows = datasets.load_dataset("parquet", data_files=str(out / "data" / "train-*.parquet"), split="train")
    assert sorted(rows["conversation_id"]) == list(range(8))
    assert (out / "README.md").exists()
