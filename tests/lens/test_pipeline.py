"""The lens jobs end to end on the embedded model: dump, train (context warm-up then KL), eval, reload."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hfx.cli import main
from hfx.lens.data import load_activations
from hfx.lens.modeling_lens import ConsistencyLens


@pytest.mark.integration
def test_dump_train_eval_on_the_embedded_model(tmp_path, capsys):
    acts, lens_dir = tmp_path / "acts", tmp_path / "lens"
    main(
        ["lens", "dump", "--output_dir", str(acts), "--dataset", "sklearn_descr", "--layer", "2"]
        + ["--context_length", "16", "--max_examples", "24", "--batch_size", "8"]
    )
    common = ["--activations_dir", str(acts), "--eval_examples", "8"]
    main(
        ["lens", "train", *common, "--output_dir", str(lens_dir), "--explanation_length", "3"]
        + ["--decoder_num_layers", "1", "--write_backwards", "true", "--context_warmup_steps", "2"]
        + ["--context_weight", "0.5", "--max_steps", "4", "--per_device_train_batch_size", "4"]
        + ["--logging_steps", "1", "--save_steps", "2", "--verbose_samples", "1"]
    )
    state = json.loads((lens_dir / "trainer_state.json").read_text())
    assert not list(lens_dir.glob("checkpoint-*"))  # a finished lens keeps no checkpoints
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert "kl" not in logged[0] and {"kl", "context_ce", "temperature"} <= set(logged[-1])
    samples = [json.loads(line) for line in (lens_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and len(samples[-1]["original_top"]) == 3

    main(["lens", "eval", *common, "--lens", str(lens_dir)])
    assert "| lens (its explanation read back) |" in capsys.readouterr().out
    results = json.loads((lens_dir / "eval_results.json").read_text())
    assert results["examples"] == 8 and results["layer"] == 2
    assert set(results["kl"]) == {
        "lens", "mean_ablation", "zero_ablation", "empty_explanation", "random_explanation", "encoder_reading_context"
    }  # fmt: skip
    assert 0.0 <= results["copy_rate"] <= 1.0 and set(results["faithfulness"]) == {
        "swap_kl", "swap_kl_increase", "edit_kl_increase", "edit_move"
    }  # fmt: skip
    kl = results["kl"]
    assert all(math.isfinite(value) for value in kl.values())
    # The baselines bracket what a lens must beat: the mean activation keeps the residual stream's large constant
    # directions and changes the next token a little; zeros remove them and change it a lot.
    assert 0 < kl["mean_ablation"] < kl["zero_ablation"] and kl["zero_ablation"] > 1.0
    assert results["fve"] < 1.0  # a 4-step lens does not reconstruct the activations exactly
    card = (lens_dir / "README.md").read_text()
    assert "first 1 / 3 layers of the base model" in card and "written last token first" in card

    lens = ConsistencyLens.from_pretrained(lens_dir).eval()
    assert lens.config.layer == 2 and lens.config.encoder_num_layers == 3 and lens.config.write_backwards
    activation = torch.tensor(load_activations(acts)[0]["activation"])[None]
    with torch.no_grad():
        out = lens(activation, sample=False)
    assert out.explanation_ids.shape == (1, 3) and out.reconstruction.shape == (1, 576)


def test_each_command_runs_on_the_resolved_device_and_dtype(tmp_path, tiny_model_dir, monkeypatch):
    from tests.quanta.test_pipeline import loaded_models

    loaded = loaded_models(monkeypatch)
    acts, lens_dir = tmp_path / "acts", tmp_path / "lens"
    model = ["--model_name_or_path", str(tiny_model_dir)]
    main(
        [
            "lens",
            "dump",
            "--output_dir",
            str(acts),
            *model,
            "--dtype",
            "bfloat16",
            "--dataset",
            "sklearn_descr",
        ]
        + ["--layer", "1", "--context_length", "16", "--max_examples", "20", "--batch_size", "8"]
    )
    assert json.loads((acts / "hfx_stage_lens-dump.json").read_text())["settings"]["dtype"] == "bfloat16"
    common = ["--activations_dir", str(acts), *model, "--eval_examples", "4"]
    main(
        ["lens", "train", *common, "--dtype", "bfloat16", "--output_dir", str(lens_dir), "--device", "cpu"]
        + ["--explanation_length", "2", "--decoder_num_layers", "1", "--max_steps", "2"]
        + ["--per_device_train_batch_size", "4", "--save_strategy", "no", "--verbose_samples", "0"]
    )
    assert ConsistencyLens.from_pretrained(lens_dir).dtype == torch.bfloat16  # the lens trains in --dtype
    main(["lens", "eval", *common, "--lens", str(lens_dir)])
    assert json.loads((lens_dir / "eval_results.json").read_text())["examples"] == 4
    placed = [{(p.device.type, p.dtype) for p in m.parameters()} for m in loaded]
    assert placed == [{("cpu", torch.bfloat16)}] * 2 + [{("cpu", torch.float32)}]  # default: fp32 on the CPU

    # The lens's folder answers to its settings: the same command reuses it, another explanation length is
    # refused by name (--overwrite trains it again), and a lens is never trained from an unfinished dump.
    weights = (lens_dir / "model.safetensors").read_bytes()
    train = [
        "lens",
        "train",
        *common,
        "--dtype",
        "bfloat16",
        "--output_dir",
        str(lens_dir),
        "--device",
        "cpu",
    ]
    rest = ["--decoder_num_layers", "1", "--max_steps", "2", "--per_device_train_batch_size", "4"]
    rest += ["--save_strategy", "no", "--verbose_samples", "0"]
    main([*train, "--explanation_length", "2", *rest])
    assert (lens_dir / "model.safetensors").read_bytes() == weights and len(loaded) == 3  # nothing loaded
    with pytest.raises(SystemExit, match=r"settings.lens.explanation_length: 2 -> 3"):
        main([*train, "--explanation_length", "3", *rest])
    main([*train, "--explanation_length", "3", *rest, "--overwrite", "true"])
    assert ConsistencyLens.from_pretrained(lens_dir).config.explanation_length == 3
    (acts / "hfx_stage_lens-dump.done").unlink()
    with pytest.raises(SystemExit, match="no finished activation dump"):
        main([*train, "--explanation_length", "3", *rest, "--output_dir", str(tmp_path / "other")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_missing_device_stops_every_command_before_anything_is_written(tmp_path, tiny_model_dir):
    missing = ["--model_name_or_path", str(tiny_model_dir), "--device", "cuda"]
    with pytest.raises(SystemExit, match=r"hfx lens dump: error: --device 'cuda'.*no CUDA device"):
        main(["lens", "dump", "--output_dir", str(tmp_path / "acts"), *missing])
    with pytest.raises(SystemExit, match=r"hfx lens train: error: --device 'cuda'.*no CUDA device"):
        main(["lens", "train", "--output_dir", str(tmp_path / "lens"), *missing])
    with pytest.raises(SystemExit, match=r"hfx lens eval: error: --device 'cuda'.*no CUDA device"):
        main(["lens", "eval", "--lens", str(tmp_path / "lens"), *missing])
    assert list(tmp_path.iterdir()) == []
