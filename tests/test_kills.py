"""One resume protocol (hfx.checkpoints) survives a SIGKILL at each point of a run's end: a real run of each trainer,
killed right there in its own process, then run again with the same command, finishes with nothing skipped.

The kill points: while a checkpoint is being saved (written, not yet marked complete), after the cartridge's weights
but before its metadata, while the finished run's checkpoints are being deleted (its metrics must stand as written),
and (PEER-MLA) after the model but before ``results.json``, and half way through deleting a checkpoint beyond
``save_total_limit``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.prewarmed import run_prewarmed

#: Installs the kill point named by $KILL_AT, then runs the code that follows it.
KILL_POINTS = textwrap.dedent(
    """
    import logging, os, signal, types
    import hfx.checkpoints as checkpoints

    logging.basicConfig(level=logging.INFO)

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    point = os.environ.get("KILL_AT", "")
    if point.startswith("checkpoint-"):  # Trainer has written checkpoint-N; its completion marker not yet
        step = int(point.split("-")[1])
        on_save = checkpoints.MarkCompleteCheckpoints.on_save

        def killed_on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                die()
            return on_save(self, args, state, control, **kwargs)

        checkpoints.MarkCompleteCheckpoints.on_save = killed_on_save
    elif point == "removal":  # the run is finished; the first checkpoint's marker is gone, its folder not yet
        import shutil
        from pathlib import Path

        def rmtree_at_the_end(path, *args, **kwargs):
            run = Path(path).parent
            if (run / "results.json").exists() or (run / "hfx_cartridge.json").exists():
                die()
            return shutil.rmtree(path, *args, **kwargs)

        checkpoints.shutil = types.SimpleNamespace(rmtree=rmtree_at_the_end)
    elif point == "rotation":  # a checkpoint beyond save_total_limit: its marker is gone, its folder half deleted
        from pathlib import Path

        def half_and_die(path, *args, **kwargs):
            for file in sorted(Path(path).iterdir())[::2]:
                file.unlink()
            die()

        checkpoints.shutil = types.SimpleNamespace(rmtree=half_and_die)
    """
)

CARTRIDGE_RUN = KILL_POINTS + textwrap.dedent(
    """
    import sys
    import hfx.cartridges.pipeline as pipeline
    from hfx.cartridges.synthesis import SynthesisConfig

    if point == "metadata":  # PEFT has written adapter_model.safetensors (in place); hfx_cartridge.json not yet
        pipeline.write_metadata = die
    out, doc, model = sys.argv[1:4]
    synthesis = SynthesisConfig(
        num_conversations=8, conversations_per_chunk=4, chunk_min_tokens=20, chunk_max_tokens=40,
        max_question_tokens=4, max_answer_tokens=4,
    )
    training = dict(
        max_steps=6, save_steps=2, save_total_limit=None, per_device_train_batch_size=2, num_virtual_tokens=8,
        disable_tqdm=True,
    )
    pipeline.run_self_study(out, doc, synthesis=synthesis, training=training, model_name_or_path=model, device="cpu")
    print("finished")
    """
)


def run(code: str, args: list, kill_at: str = "") -> subprocess.CompletedProcess:
    """Run ``code`` as ``python -c`` would, in a process of its own forked from one that has imported torch,
    transformers and hfx already (tests/prewarmed.py)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KILL_AT": kill_at}
    return run_prewarmed(code, args, env=env, timeout=600)


def killed(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


def finished(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0 and "finished" in result.stdout, result.stderr[-3000:]
    return result.stderr


@pytest.fixture
def document(tmp_path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text("The Zorblat protocol was designed in 1987 by Mara Quell at the Ostrava Institute. " * 10)
    return path


def check_finished_cartridge(cartridge: Path) -> None:
    metadata = json.loads((cartridge / "hfx_cartridge.json").read_text())
    assert metadata["global_steps"] == 6  # trained to the end, not skipped
    assert (cartridge / "adapter_model.safetensors").is_file() and (cartridge / "README.md").is_file()
    assert not list(cartridge.glob("checkpoint-*"))


@pytest.mark.parametrize("kill_at", ["checkpoint-4", "metadata", "removal"])
def test_a_cartridge_run_killed_at_its_end_finishes_when_run_again(
    tmp_path, document, tiny_model_dir, kill_at
):
    out = tmp_path / "run"
    cartridge = out / "cartridge"
    killed(run(CARTRIDGE_RUN, [out, document, tiny_model_dir], kill_at))
    if kill_at == "checkpoint-4":
        assert (cartridge / "checkpoint-4").is_dir() and not (
            cartridge / "checkpoint-4" / "hfx_checkpoint_complete"
        ).exists()
    elif kill_at == "metadata":
        assert (cartridge / "adapter_model.safetensors").is_file() and not (
            cartridge / "hfx_cartridge.json"
        ).exists()
    else:
        assert (cartridge / "hfx_cartridge.json").is_file()
        first = cartridge / "checkpoint-2"
        assert first.is_dir() and not (first / "hfx_checkpoint_complete").exists()
        metadata = (cartridge / "hfx_cartridge.json").read_text()

    log = finished(run(CARTRIDGE_RUN, [out, document, tiny_model_dir]))
    check_finished_cartridge(cartridge)
    if kill_at == "removal":  # the finished cartridge's metrics stand as they were written
        assert (cartridge / "hfx_cartridge.json").read_text() == metadata
        assert json.loads(metadata)["train_loss"] is not None
    if kill_at == "checkpoint-4":  # the half-saved checkpoint is skipped, the one before it resumed
        assert "checkpoint-4: incomplete" in log and "Resuming training from" in log and "checkpoint-2" in log
    elif kill_at == "removal":  # finished before the kill: not trained again
        assert "Resuming training" not in log


LENS_RUN = KILL_POINTS + textwrap.dedent(
    """
    import sys
    from hfx.cli import main
    from hfx.lens.training import LensTrainer

    if point == "final":  # the last checkpoint is complete; the lens itself not yet saved
        save_model = LensTrainer.save_model

        def killed_save_model(self, output_dir=None, _internal_call=False):
            if not _internal_call:
                die()
            return save_model(self, output_dir, _internal_call)

        LensTrainer.save_model = killed_save_model

    main(sys.argv[1:])
    print("finished")
    """
)


@pytest.mark.parametrize("kill_at", ["checkpoint-4", "final"])
def test_a_lens_run_killed_at_its_end_finishes_when_run_again(tmp_path, tiny_model_dir, kill_at):
    activations = tmp_path / "acts"
    dump = [
        "lens", "dump", "--model_name_or_path", tiny_model_dir, "--dataset", "sklearn_descr", "--layer", "1",
        "--max_examples", "24", "--context_length", "16", "--output_dir", activations,
    ]  # fmt: skip
    finished(run(LENS_RUN, dump))
    lens = tmp_path / "lens"
    train = [
        "lens", "train", "--model_name_or_path", tiny_model_dir, "--activations_dir", activations,
        "--output_dir", lens, "--explanation_length", "2", "--decoder_num_layers", "1", "--max_steps", "6",
        "--save_steps", "2", "--per_device_train_batch_size", "4", "--eval_examples", "4", "--device", "cpu",
        "--verbose_samples", "0", "--disable_tqdm", "true",
    ]  # fmt: skip
    killed(run(LENS_RUN, train, kill_at))
    assert (lens / "checkpoint-4").is_dir() and not (lens / "config.json").exists()
    log = finished(run(LENS_RUN, train))
    if kill_at == "checkpoint-4":
        assert "checkpoint-4: incomplete" in log
    else:  # restored from its last checkpoint, not trained a step further
        assert "Training had finished" in log
    state = json.loads((lens / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and (lens / "model.safetensors").is_file()


def test_a_grpo_run_killed_at_a_checkpoint_resumes_from_the_one_before(tmp_path, tiny_model_dir):
    activations, sft, grpo = tmp_path / "acts", tmp_path / "sft", tmp_path / "grpo"
    common = [
        "--model_name_or_path", tiny_model_dir, "--activations_dir", activations, "--eval_examples", "4",
        "--explanation_length", "2", "--per_device_train_batch_size", "4", "--disable_tqdm", "true",
        "--report_to", "none",
    ]  # fmt: skip
    dump = [
        "lens", "dump", "--model_name_or_path", tiny_model_dir, "--dataset", "sklearn_descr", "--layer", "1",
        "--max_examples", "20", "--context_length", "16", "--output_dir", activations,
    ]  # fmt: skip
    finished(run(LENS_RUN, dump))
    finished(run(LENS_RUN, ["lens", "sft", *common, "--output_dir", sft, "--max_steps", "2"]))
    train = [
        "lens", "grpo", *common, "--sft_dir", sft, "--output_dir", grpo, "--max_steps", "6", "--save_steps", "2",
        "--num_generations", "4", "--beta", "0.1", "--grpo_reconstructor_learning_rate", "1e-3",
    ]  # fmt: skip
    killed(run(LENS_RUN, train, "checkpoint-4"))
    verbalizer = grpo / "verbalizer"
    assert (verbalizer / "checkpoint-4").is_dir() and not (verbalizer / "config.json").exists()
    assert (verbalizer / "checkpoint-2" / "reconstructor_optimizer.safetensors").is_file()
    log = finished(run(LENS_RUN, train))
    assert "checkpoint-4: incomplete" in log and "Resuming training from" in log and "checkpoint-2" in log
    assert "The reconstructor and its optimizer resume from" in log
    state = json.loads((verbalizer / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and (grpo / "hfx_stage_lens-grpo.done").is_file()
    assert not list(verbalizer.glob("checkpoint-*"))


PEER_RUN = KILL_POINTS + textwrap.dedent(
    """
    import sys
    import hfx.peer_mla.training as training
    from hfx.cli import main

    if point == "results":  # the model and card are written; results.json not yet
        training.write_model_card = die
    main(sys.argv[1:])
    print("finished")
    """
)


@pytest.mark.parametrize("kill_at", ["checkpoint-4", "results", "removal", "rotation"])
def test_a_peer_mla_run_killed_at_its_end_finishes_when_run_again(tmp_path, kill_at):
    out = tmp_path / "peer"
    from tests.peer_mla.test_training import tiny_config

    config = tiny_config(tmp_path, save_steps=2, eval_steps=2, disable_tqdm=True)
    command = ["peer-mla", "pretrain", "--config", config, "--output_dir", out]
    killed(run(PEER_RUN, command, kill_at))
    written = (out / "results.json").read_text() if kill_at == "removal" else None
    log = finished(run(PEER_RUN, command))
    results = json.loads((out / "results.json").read_text())
    if kill_at == "removal":  # killed while its checkpoints went: the results stand as they were written
        assert (out / "results.json").read_text() == written
        assert results["train_loss"] is not None and results["train_tokens_per_second"] is not None
    assert results["steps"] == 6 and (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert not list(out.glob("checkpoint-*"))
    if kill_at == "checkpoint-4":
        assert "checkpoint-4: incomplete" in log and "checkpoint-2" in log
    if (
        kill_at == "rotation"
    ):  # checkpoint-2 went after checkpoint-6 was marked: the run resumed from 6, intact
        assert "Resuming from" in log and "checkpoint-6" in log
