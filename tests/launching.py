"""Helpers for tests that run training scripts under a real `accelerate launch --cpu`, and kill them as a scheduler
would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]


def accelerate_cpu(script: str | Path, processes: int, arguments: list[str]) -> list[str]:
    """`accelerate launch --cpu --num_processes N script arguments...` on a free port."""
    return [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--cpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(script),
        *arguments,
    ]


def start(command: list[str], log_path: Path) -> subprocess.Popen:
    """Start a job in its own session, one thread per process, its output appended to ``log_path``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = log_path.open("a")
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(process: subprocess.Popen, log_path: Path, timeout: float = 600) -> None:
    if process.wait(timeout=timeout) != 0:
        pytest.fail(f"{' '.join(map(str, process.args[:4]))} failed:\n{log_path.read_text()[-4000:]}")


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 600) -> None:
    """Wait until ``path`` exists; fail if the job ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} did not appear"
    assert process.poll() is None, "the job ended before it could be killed"


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it (torch starts its workers in new sessions)."""
    job = psutil.Process(process.pid)
    members = [job, *job.children(recursive=True)]
    for member in members:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=60)
    psutil.wait_procs(members[1:], timeout=60)


def logged_losses(output: Path) -> list[float]:
    """The training-loss curve a Trainer run left in ``output/trainer_state.json``."""
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]
