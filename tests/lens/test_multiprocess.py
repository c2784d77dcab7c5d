"""Lens training data-parallel under a real `accelerate launch --cpu --num_processes 2` (gloo, DDP-wrapped lens).

Every loss of a step goes through the lens's one forward, so DDP synchronises all their gradients: the context
warm-up steps of 2 processes with half the batch match 1 process with the whole batch, and the KL steps run."""

import json
import math
from pathlib import Path

import pytest

from hfx.cli import main
from tests.launching import accelerate_cpu, finish, logged_losses, start

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_two_processes_train_the_lens_like_one(tmp_path, tiny_model_dir):
    acts = tmp_path / "acts"
    main(
        ["lens", "dump", "--output_dir", str(acts), "--model_name_or_path", str(tiny_model_dir)]
        + ["--dataset", "sklearn_descr", "--layer", "1", "--context_length", "16", "--max_examples", "24"]
    )
    losses = {}
    for processes, per_device in ((1, 4), (2, 2)):
        output = tmp_path / f"lens-{processes}"
        arguments = [
            "--activations_dir", str(acts), "--model_name_or_path", str(tiny_model_dir), "--eval_examples", "4",
            "--output_dir", str(output), "--explanation_length", "2", "--decoder_num_layers", "1",
            "--encoder_num_layers", "2", "--max_steps", "4", "--context_warmup_steps", "2",
            "--context_weight", "0.5", "--per_device_train_batch_size", str(per_device), "--logging_steps", "1",
            "--save_strategy", "no", "--verbose_samples", "0", "--seed", "0",
        ]  # fmt: skip
        log = tmp_path / f"lens-{processes}.log"
        if processes == 1:  # one process: this one, then evaluated as the script does after training
            main(["lens", "train", *arguments])
            main(["lens", "eval", *arguments[:6], "--lens", str(output)])
        else:
            command = accelerate_cpu(ROOT / "examples" / "lens" / "train.py", processes, arguments)
            finish(start(command, log), log)
        losses[processes] = logged_losses(output)
        assert json.loads((output / "eval_results.json").read_text())["examples"] == 4
    assert "starting 2 gloo processes" in (tmp_path / "lens-2.log").read_text()
    assert len(losses[1]) == len(losses[2]) == 4
    assert losses[2][:2] == pytest.approx(losses[1][:2], rel=1e-3)  # context warm-up: no sampling, same steps
    assert all(math.isfinite(loss) for loss in losses[2][2:])  # KL steps: Gumbel noise differs per process


def test_two_processes_run_the_autoencoder_phases(tmp_path, tiny_model_dir):
    """`hfx lens sft` and `grpo` through examples/lens/nla.py under `accelerate launch --cpu --num_processes 2`:
    SFTTrainer and GRPOTrainer data-parallel over gloo, one process writing the targets and the folders."""
    acts, sft, grpo = tmp_path / "acts", tmp_path / "sft", tmp_path / "grpo"
    main(
        ["lens", "dump", "--output_dir", str(acts), "--model_name_or_path", str(tiny_model_dir)]
        + ["--dataset", "sklearn_descr", "--layer", "1", "--context_length", "16", "--max_examples", "24"]
    )
    common = [
        "--activations_dir", str(acts), "--model_name_or_path", str(tiny_model_dir), "--eval_examples", "8",
        "--explanation_length", "3", "--report_to", "none", "--disable_tqdm", "true",
        "--per_device_train_batch_size", "4", "--save_steps", "2", "--fve_every", "1", "--fve_examples", "4",
    ]  # fmt: skip
    script = ROOT / "examples" / "lens" / "nla.py"
    arguments = ["sft", *common, "--output_dir", str(sft), "--max_steps", "3", "+", "grpo", *common]
    arguments += [
        "--sft_dir",
        str(sft),
        "--output_dir",
        str(grpo),
        "--max_steps",
        "3",
        "--num_generations",
        "4",
        "--grpo_reconstructor_learning_rate",
        "1e-3",
    ]
    arguments += ["+", "eval", *common[:6], "--lens", str(grpo)]
    log = tmp_path / "nla.log"
    finish(start(accelerate_cpu(script, 2, arguments), log), log)  # one launch, three phases
    assert "starting 2 gloo processes" in log.read_text()
    assert json.loads((grpo / "eval_results.json").read_text())["examples"] == 8
    for folder, stage in ((sft, "lens-sft"), (grpo, "lens-grpo")):
        assert (folder / f"hfx_stage_{stage}.done").is_file() and not list(folder.rglob("checkpoint-*"))
        state = json.loads((folder / "verbalizer" / "trainer_state.json").read_text())
        assert state["global_step"] == 3
        assert [e["step"] for e in state["log_history"] if "heldout_fve" in e] == [1, 2, 3]
