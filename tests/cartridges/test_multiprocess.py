"""Cartridge synthesis and training under real multi-process `accelerate launch --cpu` (gloo).

Two processes with half the per-device batch take the same optimizer steps as one process with the whole batch,
and a 2-process run killed with SIGKILL resumes from its last checkpoint onto the same loss curve.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hfx.artifacts import write_parquet_atomic
from hfx.cartridges.corpus import user_turn_ids
from hfx.cartridges.synthesis import FEATURES, load_synthesis
from hfx.cli import main
from tests.launching import accelerate_cpu, finish, kill_job, logged_losses, start, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TEXT = (
    "The Zorblat protocol was designed in 1987 by Mara Quell at the Ostrava Institute. It uses 17 rounds of "
    "mixing, each with a 40-bit key schedule. Version 2, released in 1994, added checksums. "
) * 6
QA = [
    ("Who designed the Zorblat protocol?", "Mara Quell designed it in 1987."),
    ("How many rounds of mixing does it use?", "It uses 17 rounds of mixing."),
    ("What did version 2 add?", "Version 2 added checksums in 1994."),
    ("Where was it designed?", "At the Ostrava Institute."),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer):
    """A corpus file and a 16-conversation synthesis folder whose teacher prefers the reference answer."""
    root = tmp_path_factory.mktemp("multiprocess")
    (root / "zorblat.txt").write_text(TEXT)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(16):
        question, answer = QA[i % len(QA)]
        prompt = user_turn_ids(tokenizer, question, after_system=False)
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [
            tokenizer.convert_tokens_to_ids("<|im_end|>")
        ]
        ids = torch.randint(100, 5000, (len(answer_ids), 4), generator=generator)
        ids[:, 0] = torch.tensor(answer_ids)
        logprobs = torch.log_softmax(torch.tensor([3.0, 1.0, 0.5, 0.0]), -1).expand(len(answer_ids), 4)
        rows.append(
            {
                "conversation_id": i,
                "seed_kind": "question",
                "chunk_start": 0,
                "chunk_end": 10,
                "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "input_ids": prompt + answer_ids,
                "answer_start": len(prompt),
                "topk_token_ids": ids.tolist(),
                "topk_logprobs": logprobs.tolist(),
            }
        )
    write_parquet_atomic(rows, FEATURES, root / "synthesis" / "data" / "train-00000.parquet")
    return root


def _arguments(workdir: Path, output: str, per_device: int) -> list[str]:
    return [
        "--corpus",
        str(workdir / "zorblat.txt"),
        "--model_name_or_path",
        "embedded",
        "--synthesis_dir",
        str(workdir / "synthesis"),
        "--output_dir",
        str(workdir / output),
        "--num_virtual_tokens",
        "16",
        "--per_device_train_batch_size",
        str(per_device),
        "--max_steps",
        "6",
        "--logging_steps",
        "1",
        "--save_steps",
        "2",
        "--save_total_limit",
        "10",
        "--model_dtype",
        "float32",
        "--learning_rate",
        "0.02",
        "--seed",
        "0",
    ]


def _launch(workdir: Path, output: str, processes: int, per_device: int) -> subprocess.Popen:
    arguments = _arguments(workdir, output, per_device)
    command = accelerate_cpu(ROOT / "examples" / "cartridges" / "train.py", processes, arguments)
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
    main(["cartridge", "train", *_arguments(workdir, "one", per_device=4)])  # one process: this one
    one = logged_losses(workdir / "one")
    two = two_processes
    assert len(one) == len(two) == 6
    assert one[-1] < one[0]  # it learns
    assert two == pytest.approx(one, rel=2e-3, abs=2e-3)
    a = load_file(str(workdir / "one" / "adapter_model.safetensors"))
    b = load_file(str(workdir / "two" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-3)
    meta = json.loads((workdir / "two" / "hfx_cartridge.json").read_text())
    assert meta["num_processes"] == 2 and meta["global_batch_size"] == 4 and meta["global_steps"] == 6
    assert not list((workdir / "two").glob("checkpoint-*"))


def test_a_killed_two_process_run_resumes_on_the_same_loss_curve(workdir, two_processes):
    process = _launch(workdir, "killed", processes=2, per_device=2)
    wait_for(workdir / "killed" / "checkpoint-2" / "trainer_state.json", process)
    kill_job(process)  # as a scheduler would: the launcher and every worker
    assert not (workdir / "killed" / "adapter_model.safetensors").exists()

    resumed = _run(workdir, "killed", processes=2, per_device=2)
    second_run = (workdir / "killed.log").read_text().split("starting 2 gloo processes")[-1]
    assert "| 3/6 [" in second_run and "| 1/6 [" not in second_run  # went on from step 2
    assert len(resumed) == 6
    assert resumed == pytest.approx(two_processes, rel=2e-3, abs=2e-3)


def test_synthesis_splits_its_shards_over_processes_and_matches_one_process(tmp_path, tiny_model_dir):
    """`accelerate launch --num_processes 2 examples/cartridges/synthesize.py`: each process writes every other
    shard, and the dataset is the one a single process writes."""
    (tmp_path / "zorblat.txt").write_text(TEXT)
    datasets = {}
    for processes in (1, 2):
        output = tmp_path / f"synthesis-{processes}"
        arguments = [
            "--corpus", str(tmp_path / "zorblat.txt"), "--model_name_or_path", str(tiny_model_dir),
            "--synthesis_dir", str(output), "--num_conversations", "8", "--conversations_per_chunk", "2",
            "--batches_per_shard", "1", "--chunk_min_tokens", "16", "--chunk_max_tokens", "32",
            "--max_question_tokens", "4", "--max_answer_tokens", "4",
        ]  # fmt: skip
        log = tmp_path / f"synthesis-{processes}.log"
        if processes == 1:  # one process: this one
            main(["cartridge", "synthesize", *arguments])
        else:
            command = accelerate_cpu(ROOT / "examples" / "cartridges" / "synthesize.py", processes, arguments)
            finish(start(command, log), log)
        datasets[processes] = load_synthesis(output)
        assert len(list((output / "data").glob("train-*.parquet"))) == 4
    assert "synthesize (process 1)" in (tmp_path / "synthesis-2.log").read_text()
    assert datasets[2]["conversation_id"] == datasets[1]["conversation_id"] == list(range(8))
    assert datasets[2]["input_ids"] == datasets[1]["input_ids"]
    flat = {n: [v for row in d["topk_logprobs"] for step in row for v in step] for n, d in datasets.items()}
    assert flat[2] == pytest.approx(flat[1], abs=1e-5)
