"""PEER-MLA pretraining: Trainer run end to end, expert monitoring, dense baseline, checked resume, fp8 off on CPU,
device/dtype options and the choice of the PEER kernel."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hfx.checkpoints import COMPLETE_MARKER, last_complete_checkpoint
from hfx.peer_mla.analysis import analyze_parameters
from hfx.peer_mla.data import DataArguments
from hfx.peer_mla.training import (
    PEER_KERNEL_REPO_ENV,
    ModelArguments,
    PeerMlaTrainingArguments,
    build_config,
    choose_peer_kernel,
    dense_baseline_config,
    expert_usage_metrics,
    fit_to_device,
    mixed_precision_flags,
    peer_kernel_repository,
    pretrain,
)

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = {
    "hidden_size": 64,
    "num_attention_heads": 2,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "intermediate_size": 128,
    "product_key_dim": [16, 16],
    "peer_query_dim": 32,
    "num_experts_per_tok": 4,
    "peer_num_heads": 2,
}
# Small real text: scikit-learn's dataset descriptions and the pydoc topics, with a 1024-token BPE trained on them.
TINY_DATA = {
    "mixture": ["sklearn_descr:0.5", "pydoc_topics:0.5"],
    "tokenizer_name_or_path": "train",
    "tokenizer_vocab_size": 1024,
    "block_size": 64,
    "eval_fraction": 0.1,
    "max_eval_blocks": 8,
}


def tiny_config(tmp_path: Path, **changes) -> Path:
    """A complete pretraining YAML for a tiny model, written into tmp_path."""
    values = {
        "model_config": str(ROOT / "examples/peer_mla/configs/model_cpu.yaml"),
        "model_overrides": dict(TINY_MODEL),
        **TINY_DATA,
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "eval_steps": 3,
        "save_steps": 3,
        "expert_log_freq": 2,
        "seed": 0,
    }
    values.update(changes)
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def parse(config: Path, *argv: str):
    from trl import TrlParser

    parser = TrlParser((ModelArguments, DataArguments, PeerMlaTrainingArguments))
    return parser.parse_args_and_config(["--config", str(config), *argv])


def test_dense_baseline_has_the_same_active_parameters():
    peer = build_config(ModelArguments(model_config=str(ROOT / "examples/peer_mla/configs/model_cpu.yaml")))
    dense = dense_baseline_config(peer)
    assert dense.peer_layers is None and dense.num_experts == 0
    peer_report, dense_report = analyze_parameters(peer), analyze_parameters(dense)
    per_unit = 3 * peer.hidden_size * peer.num_hidden_layers  # one unit of SwiGLU width in every layer
    assert abs(peer_report.active - dense_report.active) <= per_unit / 2
    assert (
        peer_report.total > 4 * dense_report.total
    )  # PEER's extra parameters are experts a token does not use


def test_expert_usage_metrics():
    uniform = torch.full((64,), 10)
    skewed = torch.zeros(64, dtype=torch.long)
    skewed[:4] = 10
    skewed[7] = 600  # 600 of 640 retrievals: 60x the mean of 10
    metrics, hot = expert_usage_metrics({0: uniform, 2: skewed}, hot_factor=10.0)
    assert metrics["experts/layer_0/used_fraction"] == 1.0
    assert metrics["experts/layer_0/entropy"] == pytest.approx(1.0)
    assert metrics["experts/layer_0/max_load"] == pytest.approx(1.0)
    assert metrics["experts/layer_0/hot_experts"] == 0 and hot[0] == []
    assert metrics["experts/layer_2/used_fraction"] == pytest.approx(5 / 64)
    assert metrics["experts/layer_2/max_load"] == pytest.approx(60.0)
    assert metrics["experts/layer_2/hot_experts"] == 1 and hot[2] == [(7, 60.0)]
    assert 0 < metrics["experts/layer_2/entropy"] < 0.3


def test_pretrain_end_to_end_with_monitoring_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path / "run"
    model_args, data_args, training_args = parse(
        tiny_config(tmp_path),
        "--output_dir",
        str(output),
        "--report_to",
        "tensorboard",
        "--keep_checkpoints",
        "true",
    )
    results = pretrain(model_args, data_args, training_args)

    assert results["steps"] == 6 and results["tokens"] == 6 * 4 * 64
    assert (results["device"], results["precision"], results["peer_kernel"]) == ("cpu", "float32", "pytorch")
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    assert results["eval_perplexity"] < 1024  # better than uniform over the vocabulary after 6 steps
    assert json.loads((output / "results.json").read_text()) == results

    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    losses = [e for e in history if "loss" in e]
    assert len(losses) == 6 and all(e["perplexity"] == pytest.approx(math.exp(e["loss"])) for e in losses)
    evals = [e for e in history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [3, 6]  # every eval_steps; the last one is the final result
    usage = [e for e in history if "experts/layer_1/used_fraction" in e]
    assert [e["step"] for e in usage] == [2, 4, 6]
    for entry in usage:
        for layer in (1, 3):
            for metric in ("used_fraction", "ever_used_fraction", "max_load", "entropy", "hot_experts"):
                assert f"experts/layer_{layer}/{metric}" in entry
            assert (
                0
                < entry[f"experts/layer_{layer}/used_fraction"]
                <= entry[f"experts/layer_{layer}/ever_used_fraction"]
            )
    assert usage[-1]["experts/layer_1/ever_used_fraction"] >= usage[0]["experts/layer_1/ever_used_fraction"]

    images = sorted((output / "expert_usage").glob("step-*.png"))
    assert [p.name for p in images] == ["step-0000002.png", "step-0000004.png", "step-0000006.png"]
    hot_lines = [
        json.loads(line) for line in (output / "expert_usage" / "hot_experts.jsonl").read_text().splitlines()
    ]
    assert [line["step"] for line in hot_lines] == [2, 4, 6] and set(hot_lines[0]["hot"]) == {"1", "3"}

    events = EventAccumulator(str(next(output.glob("runs/*"))), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "experts/usage_histogram" in events.Tags()["images"]
    assert len(events.Images("experts/usage_histogram")) == 3
    assert {"eval/perplexity", "train/perplexity", "train/experts/layer_3/entropy"} <= set(
        events.Tags()["scalars"]
    )

    # A self-contained Hub folder: remote code, weights, the trained tokenizer, a card; no pickle.
    assert not list(output.rglob("training_args.bin"))
    assert (output / "training_args.json").is_file() and (output / "README.md").is_file()
    checkpoints = sorted(output.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-3", "checkpoint-6"]
    assert all(
        (c / COMPLETE_MARKER).is_file() and (c / "expert_usage.safetensors").is_file() for c in checkpoints
    )
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert len(tokenizer) == 1024 and model.config.vocab_size == 1024
    assert type(model).__module__.startswith("transformers_modules")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # no bf16/fp8 on CPU unless asked
    ids = tokenizer("The iris dataset", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)

    # Resuming this run with another configuration is refused, naming the difference.
    changed = dict(TINY_MODEL, peer_num_heads=4)
    model_args, data_args, training_args = parse(
        tiny_config(tmp_path, model_overrides=changed, max_steps=9), "--output_dir", str(output)
    )
    with pytest.raises(ValueError, match=r"other settings:(.|\n)*settings.model.peer_num_heads: 2 -> 4"):
        pretrain(model_args, data_args, training_args)
    model_args, data_args, training_args = parse(
        tiny_config(tmp_path, max_steps=9, block_size=32), "--output_dir", str(output)
    )
    with pytest.raises(ValueError, match=r"settings.data.block_size: 64 -> 32"):
        pretrain(model_args, data_args, training_args)
    # The same command again returns the finished run's results as they are, without training.
    results = (output / "results.json").read_text()
    assert pretrain(*parse(tiny_config(tmp_path), "--output_dir", str(output))) == json.loads(results)
    assert (output / "results.json").read_text() == results


def test_incomplete_checkpoints_are_skipped(tmp_path):
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "hfx_pretrain.json").write_text("{}")
        (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-2" / COMPLETE_MARKER).write_text("")
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"  # checkpoint-4 was cut by a kill
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="sum to 0.7"):
        parse(tiny_config(tmp_path, mixture=["sklearn_descr:0.5", "pydoc_topics:0.2"]))
    with pytest.raises(ValueError, match="Got 2 probabilities for 3 datasets"):
        from hfx.peer_mla.data import mix

        mix([[], [], []], [0.5, 0.5], seed=0, stopping_strategy="all_exhausted")
    missing = json.dumps({"name": "notes", "path_or_files": str(tmp_path / "nope.txt"), "probability": 1.0})
    model_args, data_args, training_args = parse(
        tiny_config(tmp_path, mixture=[missing]), "--output_dir", str(tmp_path / "out")
    )
    with pytest.raises(ValueError, match=r"Source 'notes': data file .*nope.txt' does not exist"):
        pretrain(model_args, data_args, training_args)
    assert not (tmp_path / "out" / "results.json").exists()
    with pytest.raises(ValueError, match="unknown PeerMlaConfig field"):
        build_config(
            ModelArguments(
                model_config=str(ROOT / "examples/peer_mla/configs/model_cpu.yaml"),
                model_overrides='{"num_expert": 4}',
            )
        )
    with pytest.raises(ValueError, match="mlp must be one of"):
        ModelArguments(mlp="moe")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp8_is_refused_without_a_gpu(tmp_path):
    with pytest.raises(ValueError, match="fp8 training needs a CUDA GPU"):
        PeerMlaTrainingArguments(output_dir=str(tmp_path), fp8=True)
    assert PeerMlaTrainingArguments(output_dir=str(tmp_path)).fp8 is False


def test_cli_help_lists_every_section(capsys):
    from hfx.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["peer-mla", "pretrain", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--model_config",
        "--mlp",
        "--device",
        "--dtype",
        "--peer_kernel",
        "--mixture",
        "--block_size",
        "--max_tokens",
        "--expert_log_freq",
        "--fp8",
    ):
        assert option in text


def test_report_to_trackio_offline(tmp_path):
    """Trackio keeps runs in a local SQLite database: scalars, perplexity and the expert histograms as images."""
    import os
    import sqlite3
    import subprocess
    import sys

    config = tiny_config(tmp_path, max_steps=4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRACKIO_DIR": str(tmp_path / "trackio")}
    hfx = str(Path(sys.executable).with_name("hfx"))
    command = [hfx, "peer-mla", "pretrain", "--config", str(config), "--output_dir", str(tmp_path / "run")]
    command += ["--report_to", "trackio", "--project", "peer-test", "--run_name", "tiny"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [
        json.loads(blob)
        for (blob,) in sqlite3.connect(tmp_path / "trackio" / "peer-test.db").execute(
            "select metrics from metrics"
        )
    ]
    assert any("train/perplexity" in r for r in rows) and any("eval/perplexity" in r for r in rows)
    assert any("train/experts/layer_1/ever_used_fraction" in r for r in rows)
    images = [r["experts/usage_histogram"] for r in rows if "experts/usage_histogram" in r]
    assert [r["train/global_step"] for r in rows if "experts/usage_histogram" in r] == [2, 4]
    for image in images:
        assert image["_type"] == "trackio.image"
        assert (tmp_path / "trackio" / "media" / image["file_path"]).stat().st_size > 10_000


# --- device, precision, PEER kernel --------------------------------------------------------------------------

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def test_device_dtype_and_kernel_options(tmp_path):
    model_args, _, training_args = parse(
        tiny_config(tmp_path),
        *("--device", "cpu", "--dtype", "bfloat16", "--peer_kernel", "pytorch"),
        *("--output_dir", str(tmp_path / "out")),
    )
    assert (model_args.device, model_args.dtype, model_args.peer_kernel) == ("cpu", "bfloat16", "pytorch")
    fitted = fit_to_device(model_args, training_args)
    assert fitted.use_cpu and fitted.bf16 and fitted.device == CPU and fitted.mixed_precision == "bf16"
    # Defaults on the CPU: float32, the PyTorch experts, TrainingArguments left as they were.
    model_args, _, training_args = parse(tiny_config(tmp_path), "--output_dir", str(tmp_path / "out"))
    assert (model_args.device, model_args.dtype, model_args.peer_kernel) == (None, "auto", "auto")
    if not torch.cuda.is_available():
        assert fit_to_device(model_args, training_args) is training_args
    for argv, message in (
        (("--peer_kernel", "cuda"), "peer_kernel must be one of"),
        (("--dtype", "fp8"), "--dtype 'fp8' is not one of auto"),
        (("--device", "tpu"), "is not a device; use one of cuda"),
    ):
        with pytest.raises(ValueError, match=message):
            model_args, _, training_args = parse(tiny_config(tmp_path), *argv)
            fit_to_device(model_args, training_args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")
def test_cuda_or_the_triton_kernel_without_a_gpu_stop_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    output = tmp_path / "out"
    with pytest.raises(ValueError, match="--device 'cuda' was asked for, but this machine has no CUDA"):
        parse(tiny_config(tmp_path), "--device", "cuda", "--output_dir", str(output))
    model_args, data_args, training_args = parse(
        tiny_config(tmp_path), "--peer_kernel", "triton", "--output_dir", str(output)
    )
    with pytest.raises(ValueError, match="--peer_kernel triton runs on a CUDA GPU.*TRITON_INTERPRET=1"):
        pretrain(model_args, data_args, training_args)
    assert not output.exists()


def test_precision_follows_the_device(monkeypatch):
    import hfx.models

    monkeypatch.setattr(hfx.models, "supports_bfloat16", lambda device: device.type in ("cpu", "cuda"))
    assert mixed_precision_flags("auto", CUDA, bf16=False, fp16=False) == {"bf16": True}
    assert mixed_precision_flags("auto", CUDA, bf16=False, fp16=True) == {}  # --fp16 was chosen: kept
    assert mixed_precision_flags("auto", CUDA, bf16=True, fp16=False) == {}
    assert mixed_precision_flags("auto", CPU, bf16=False, fp16=False) == {}  # float32 on the CPU
    assert mixed_precision_flags("auto", CPU, bf16=True, fp16=False) == {}  # unless asked
    assert mixed_precision_flags("float16", CUDA, bf16=False, fp16=False) == {"fp16": True}
    assert mixed_precision_flags("float32", CUDA, bf16=False, fp16=False) == {}
    with pytest.raises(ValueError, match="--dtype float16 contradicts --bf16 true"):
        mixed_precision_flags("float16", CUDA, bf16=True, fp16=False)
    with pytest.raises(ValueError, match="--dtype float32 contradicts --fp16 true"):
        mixed_precision_flags("float32", CUDA, bf16=False, fp16=True)
    monkeypatch.setattr(hfx.models, "supports_bfloat16", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    assert mixed_precision_flags("auto", CUDA, bf16=False, fp16=False) == {}  # e.g. a V100: float32
    with pytest.raises(ValueError, match="does not support bfloat16"):
        mixed_precision_flags("bfloat16", CUDA, bf16=False, fp16=False)


def test_peer_kernel_is_triton_on_cuda_and_pytorch_elsewhere(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert choose_peer_kernel("auto", CUDA) == "triton"
    assert choose_peer_kernel("auto", CPU) == "pytorch"
    assert choose_peer_kernel("pytorch", CUDA) == "pytorch"
    assert choose_peer_kernel("triton", CUDA) == "triton"
    with pytest.raises(ValueError, match="runs on a CUDA GPU, and this run is on cpu"):
        choose_peer_kernel("triton", CPU)
    with pytest.raises(ValueError, match="runs on a CUDA GPU, and this run is on mps"):
        choose_peer_kernel("triton", torch.device("mps"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_peer_kernel("triton", CPU) == "triton"
    assert choose_peer_kernel("auto", CPU) == "pytorch"  # the interpreter is for tests: never chosen for you


def test_peer_kernel_repository_is_found_from_the_checkout_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(PEER_KERNEL_REPO_ENV, raising=False)
    assert peer_kernel_repository() == ROOT / "hub_kernels" / "peer"
    monkeypatch.setenv(PEER_KERNEL_REPO_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"not at \\${PEER_KERNEL_REPO_ENV} = {tmp_path}"):
        peer_kernel_repository()
    monkeypatch.setenv(PEER_KERNEL_REPO_ENV, str(ROOT / "hub_kernels" / "peer"))
    assert peer_kernel_repository() == ROOT / "hub_kernels" / "peer"


def test_pretrain_kernelizes_the_experts_with_the_triton_kernel_under_the_interpreter(tmp_path):
    """The pretraining command with --peer_kernel triton, run on the CPU under Triton's interpreter (a separate
    process: the interpreter is chosen when the kernel is loaded): the experts are kernelized, the choice is
    logged once, and the run records it."""
    config = tiny_config(tmp_path, max_steps=2, eval_strategy="no", expert_log_freq=0, save_steps=100)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    hfx = str(Path(sys.executable).with_name("hfx"))
    command = [hfx, "peer-mla", "pretrain", "--config", str(config), "--output_dir", str(tmp_path / "run")]
    command += ["--device", "cpu", "--peer_kernel", "triton", "--log_level", "info"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (results["device"], results["peer_kernel"], results["steps"]) == ("cpu", "triton", 2)
    assert math.isfinite(results["train_loss"])
    choice = [line for line in done.stderr.splitlines() if "PEER experts:" in line]
    assert len(choice) == 1 and "Triton kernel of" in choice[0] and "(2 layers)" in choice[0], done.stderr[
        -3000:
    ]
