"""PEER-MLA pretraining under real multi-process `accelerate launch --cpu` (gloo), killed and resumed; ablations.

Two processes with half the per-device batch take the same optimizer steps as one process with the whole batch
(the queries' BatchNorm is off here: with it on, each process normalises over its own half of the batch, as
DDP does without SyncBatchNorm), and a 2-process run killed with SIGKILL resumes from its last complete
checkpoint onto the same loss curve. The ablation runner, killed in its second run, skips the finished first run
and finishes the second with --resume.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hfx.cli import main
from tests.launching import accelerate_cpu, finish, kill_job, logged_losses, start, wait_for
from tests.peer_mla.test_training import TINY_MODEL, tiny_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("peer-multiprocess")
    tiny_config(
        root,
        model_overrides=dict(TINY_MODEL, peer_batch_norm=False),
        max_steps=STEPS,
        save_steps=2,
        save_total_limit=10,
        eval_steps=4,
        learning_rate=0.003,
        warmup_steps=0,
    )
    return root


def _launch(workdir: Path, output: str, processes: int, per_device: int) -> subprocess.Popen:
    arguments = ["--config", str(workdir / "pretrain.yaml"), "--output_dir", str(workdir / output)]
    arguments += ["--per_device_train_batch_size", str(per_device)]
    command = accelerate_cpu(ROOT / "examples" / "peer_mla" / "pretrain.py", processes, arguments)
    return start(command, workdir / f"{output}.log")


def _run(workdir, output, processes, per_device):
    process = _launch(workdir, output, processes, per_device)
    finish(process, workdir / f"{output}.log")
    return logged_losses(workdir / output)


@pytest.fixture(scope="module")
def two_processes(workdir):
    """The loss curve of an uninterrupted 2-process run (global batch 4)."""
    return _run(workdir, "two", processes=2, per_device=2)


def test_two_processes_match_one_process_with_the_same_global_batch(workdir, two_processes):
    arguments = ["--config", str(workdir / "pretrain.yaml"), "--output_dir", str(workdir / "one")]
    main(["peer-mla", "pretrain", *arguments, "--per_device_train_batch_size", "4"])  # one process: this one
    one = logged_losses(workdir / "one")
    assert len(one) == len(two_processes) == STEPS
    assert one[-1] < one[0]  # it learns
    assert two_processes == pytest.approx(one, rel=2e-3, abs=2e-3)
    results = json.loads((workdir / "two" / "results.json").read_text())
    assert results["num_processes"] == 2 and results["tokens"] == STEPS * 4 * 64 and results["steps"] == STEPS
    one_results = json.loads((workdir / "one" / "results.json").read_text())
    assert results["eval_loss"] == pytest.approx(one_results["eval_loss"], rel=2e-3)
    history = json.loads((workdir / "two" / "trainer_state.json").read_text())["log_history"]
    assert any("experts/layer_1/used_fraction" in entry for entry in history)  # counts summed over processes
    assert not list((workdir / "two").glob("checkpoint-*"))


def test_a_killed_two_process_run_resumes_on_the_same_loss_curve(workdir, two_processes):
    process = _launch(workdir, "killed", processes=2, per_device=2)
    wait_for(workdir / "killed" / "checkpoint-4" / "hfx_checkpoint_complete", process)
    kill_job(process)
    assert not (workdir / "killed" / "results.json").exists()

    resumed = _run(workdir, "killed", processes=2, per_device=2)
    second_run = (workdir / "killed.log").read_text().split("starting 2 gloo processes")[-1]
    assert "Resuming from" in second_run
    assert f"| {5}/{STEPS} [" in second_run and f"| 1/{STEPS} [" not in second_run  # went on after step 4
    assert len(resumed) == STEPS
    assert resumed == pytest.approx(two_processes, rel=2e-3, abs=2e-3)


def test_ablation_runner_resumes_after_a_kill(workdir, tmp_path):
    ablation = tmp_path / "ablation.yaml"
    output = tmp_path / "ablations"
    ablation.write_text(
        yaml.safe_dump(
            {
                "base_config": str(workdir / "pretrain.yaml"),
                "output_dir": str(output),
                "max_tokens": 4 * 4 * 64,
                "overrides": {"save_steps": 1, "eval_steps": 2},
                "axes": {"mlp": ["peer", "dense"], "peer_num_heads": [1, 2]},
            }
        )
    )
    command = [
        sys.executable,
        str(ROOT / "examples/peer_mla/ablate.py"),
        "--config",
        str(ablation),
        "--axes",
        "mlp",
    ]
    process = start(command, tmp_path / "ablate.log")
    second = output / "runs" / "mlp-dense"
    wait_for(second / "checkpoint-2" / "hfx_checkpoint_complete", process)
    kill_job(process)
    assert (output / "runs" / "mlp-peer" / "results.json").is_file()
    assert not (second / "results.json").exists() and not (output / "results.md").exists()

    # the refusals come before any training: asked of the script's main() here, not of a process of its own
    spec = importlib.util.spec_from_file_location("ablate", ROOT / "examples/peer_mla/ablate.py")
    ablate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablate)
    with pytest.raises(SystemExit, match="pass --resume"):  # no silent restart over existing runs
        ablate.main(command[2:])

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    resumed = subprocess.run(
        [*command, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (output / "runs" / "mlp-peer" / "train.log").read_text().count("\n$ ") == 1  # not run again
    dense_log = (second / "train.log").read_text()
    assert dense_log.count("\n$ ") == 2 and "Resuming from" in dense_log.split("\n$ ")[-1]
    table = (output / "results.md").read_text()
    assert "| mlp-peer | peer |" in table and "| mlp-dense | dense |" in table
    rows = (output / "results.csv").read_text().splitlines()
    assert (
        rows[0].startswith("run,mlp,total_params,active_params,tokens,eval_loss,eval_perplexity")
        and len(rows) == 3
    )
    peer, dense = (
        json.loads((output / "runs" / r / "results.json").read_text()) for r in ("mlp-peer", "mlp-dense")
    )
    assert peer["active_params"] == pytest.approx(dense["active_params"], rel=0.01)
    assert peer["tokens"] == dense["tokens"] == 4 * 4 * 64
    assert (output / "results.png").stat().st_size > 10_000

    # A finished run's folder answers only to the arguments that made it: another token budget is refused,
    # naming the argument, and nothing is rerun or rewritten.
    finished = (output / "runs" / "mlp-peer" / "results.json").read_text()
    with pytest.raises(SystemExit, match="other settings") as other:
        ablate.main([*command[2:], "--resume", "--max_tokens", str(2 * 4 * 64)])
    assert "--max_tokens" in str(other.value)
    assert (output / "runs" / "mlp-peer" / "results.json").read_text() == finished
