"""LensTrainer on a tiny base: runtime == precomputed activations, the loss pieces, training lowers the KL,
resume after a kill, evaluation against the ablation baselines."""

from __future__ import annotations

import json

import torch
from transformers import TrainerCallback

from hfx.lens.data import DumpConfig, dump_activations, load_activations
from hfx.lens.evaluation import evaluate_lens
from hfx.lens.modeling_lens import ConsistencyLens
from hfx.lens.training import LensTrainer, LensTrainingArguments, collate

from .test_data import DOCUMENTS, ToyTokenizer
from .test_modeling import tiny_base


def dumped(tmp_path, base):
    config = DumpConfig(layer=1, context_length=10, min_position=3, max_examples=100, topk=61, batch_size=4)
    dump_activations(
        base,
        ToyTokenizer(),
        DOCUMENTS * 4,
        tmp_path / "acts",
        config,
        {"model": "tiny", "dataset": "toy", "dtype": "float32"},
    )
    return load_activations(tmp_path / "acts")


def make_trainer(tmp_path, base, data, **overrides):
    values = dict(
        output_dir=str(tmp_path / "lens"),
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        max_steps=6,
        logging_steps=2,
        save_steps=3,
        lm_weight_end=0.1,
        lm_weight_steps=6,
        temperature_steps=6,
        verbose_samples=0,
        seed=0,
    )
    values.update(overrides)
    args = LensTrainingArguments(**values)
    mean = torch.tensor(data["activation"]).mean(0)
    lens = ConsistencyLens.from_base(
        base, layer=1, explanation_length=3, decoder_num_layers=1, encoder_num_layers=1, mean_activation=mean
    )
    return LensTrainer(model=lens, args=args, train_dataset=data, base_model=base, topk=61)


def test_runtime_mode_sees_the_same_batch_as_precomputed(tmp_path):
    base = tiny_base()
    data = dumped(tmp_path, base)
    trainer = make_trainer(tmp_path, base, data)
    # the frozen model sits where Trainer put the lens (here the CPU), without gradients
    assert trainer.base_model.device == trainer.model.device == trainer.args.device
    assert not any(p.requires_grad for p in trainer.base_model.parameters())
    rows = [data[i] for i in range(4)]
    torch.manual_seed(0)
    precomputed = trainer.lens_batch(trainer.model, collate(rows))
    torch.manual_seed(0)
    runtime = trainer.lens_batch(trainer.model, collate([{"input_ids": r["input_ids"]} for r in rows]))
    for key in ("kl", "lm", "entropy"):
        torch.testing.assert_close(runtime[key], precomputed[key], rtol=1e-4, atol=1e-5)
    # the lens starts at the mean activation: its KL is the mean-ablation KL, well above zero
    assert precomputed["kl"] > 0.01


def test_training_lowers_the_kl_and_logs_the_pieces(tmp_path):
    base = tiny_base()
    data = dumped(tmp_path, base)
    trainer = make_trainer(
        tmp_path,
        base,
        data,
        max_steps=30,
        save_steps=100,
        logging_steps=10,
        lm_weight_steps=30,
        temperature_steps=30,
    )
    rows = collate([data[i] for i in range(len(data))])
    trainer.model.eval()
    with torch.no_grad():
        before = float(trainer.lens_batch(trainer.model, rows)["kl"])
    trainer.train()
    trainer.model.eval()
    with torch.no_grad():
        after = float(trainer.lens_batch(trainer.model, rows)["kl"])
    assert after < 0.7 * before, (before, after)
    logs = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert logs and {"kl", "lm", "entropy", "alpha", "temperature"} <= set(logs[0])
    assert logs[-1]["alpha"] > logs[0]["alpha"] and logs[-1]["temperature"] < logs[0]["temperature"]


def test_context_warmup_then_the_kl_objective(tmp_path):
    base = tiny_base()
    data = dumped(tmp_path, base)
    trainer = make_trainer(
        tmp_path, base, data, max_steps=24, context_warmup_steps=20, logging_steps=4, save_steps=100
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    warmup, after = logs[:5], logs[5:]
    assert all("context_ce" in entry and "kl" not in entry for entry in warmup)
    assert warmup[-1]["context_ce"] < warmup[0]["context_ce"]
    assert warmup[-1]["context_accuracy"] > warmup[0]["context_accuracy"]
    assert after and all("kl" in entry and "context_ce" not in entry for entry in after)
    # the alpha and temperature schedules start with the KL objective (step 20 of 24 is its step 0)
    assert after[0]["alpha"] == trainer.args.lm_weight(24 - 20)


def test_context_weight_keeps_the_context_loss_in_the_kl_objective(tmp_path):
    base = tiny_base()
    data = dumped(tmp_path, base)
    trainer = make_trainer(
        tmp_path,
        base,
        data,
        max_steps=4,
        context_weight=0.5,
        save_steps=100,
        logging_steps=1,
        lm_weight_schedule="constant",
        lm_weight_start=0.1,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all({"kl", "context_ce", "context_accuracy"} <= set(entry) for entry in logs)
    # the logged loss is the sum of its weighted pieces (entropy weight 0)
    entry = logs[-1]
    expected = entry["kl"] + entry["alpha"] * entry["lm"] + 0.5 * entry["context_ce"]
    assert abs(entry["loss"] - expected) < 1e-3 * max(1.0, expected)


def test_verbose_samples_reach_tensorboard_as_a_table(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    base = tiny_base()
    data = dumped(tmp_path, base)
    trainer = make_trainer(
        tmp_path,
        base,
        data,
        max_steps=4,
        report_to=["tensorboard"],
        verbose_samples=2,
        save_strategy="no",
    )
    trainer.processing_class = ToyTokenizer()
    trainer.train()
    samples = [json.loads(line) for line in (tmp_path / "lens" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"context", "explanation", "original_top", "reconstructed_top"} <= set(
        samples[0]
    )
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    tables = events.Tensors("lens/samples/text_summary")
    assert [t.step for t in tables] == [2, 4]
    text = tables[-1].tensor_proto.string_val[0].decode()
    assert text.startswith("| context | explanation | original_top | reconstructed_top |\n")
    assert repr(samples[-1]["explanation"]) in text


def test_resume_after_a_kill_continues_from_the_checkpoint(tmp_path):
    base = tiny_base()
    data = dumped(tmp_path, base)
    first = make_trainer(tmp_path, base, data, max_steps=3, save_steps=3)
    first.train()  # "killed" right after the checkpoint at step 3
    checkpoint = tmp_path / "lens" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").exists()
    assert (checkpoint / "training_args.json").exists() and not (checkpoint / "training_args.bin").exists()
    second = make_trainer(tmp_path, base, data, max_steps=6, save_steps=3)
    steps_run = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_run.append(state.global_step)

    second.add_callback(Count())
    second.train(resume_from_checkpoint=str(checkpoint))
    assert second.state.global_step == 6
    assert steps_run == [4, 5, 6]  # nothing before the checkpoint was redone
    state = json.loads((tmp_path / "lens" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_evaluation_reports_kl_against_ablations_and_fve(tmp_path, tokenizer):
    import random

    base = tiny_base()
    data = dumped(tmp_path, base)
    mean = torch.tensor(data["activation"]).mean(0)
    lens = ConsistencyLens.from_base(
        base, layer=1, explanation_length=2, decoder_num_layers=1, encoder_num_layers=1, mean_activation=mean
    )
    results = evaluate_lens(lens, base, data, mean, tokenizer, batch_size=5, samples=3, seed=4)
    # the samples are examples drawn at random over the whole set (across batches), in dataset order
    drawn = sorted(random.Random(4).sample(range(len(data)), 3))
    expected = [tokenizer.decode(data[i]["input_ids"][-24:]) for i in drawn]
    assert [sample["context"] for sample in results["samples"]] == expected and drawn != [0, 1, 2]
    # a lens that outputs the mean activation is exactly the mean-ablation baseline, with FVE 0
    assert abs(results["kl"]["lens"] - results["kl"]["mean_ablation"]) < 1e-5
    assert abs(results["fve"]) < 1e-5
    assert results["kl"]["zero_ablation"] > 0 and results["examples"] == len(data)
    assert results["kl"]["encoder_reading_context"] > 0
    # and nothing read through it explains anything: no explanation, however made, moves it
    for name in ("lens", "empty_explanation", "random_explanation", "encoder_reading_context"):
        assert abs(results["conditions"][name]["fve"]) < 1e-5
    assert abs(results["faithfulness"]["edit_move"]) < 1e-5
    assert abs(results["faithfulness"]["swap_kl_increase"]) < 1e-5


def test_an_identity_encoder_reading_the_whole_context_reproduces_the_activation(tmp_path):
    # Encoder = the base's first layer + 1 layers with an identity output: on examples no longer than the
    # explanation, reading their text is exactly the base's computation (KL 0, FVE 1).
    base = tiny_base()
    data = dumped(tmp_path, base)
    whole = data.filter(lambda row: len(row["input_ids"]) == 10)
    assert len(whole) > 0
    lens = ConsistencyLens.from_base(
        base, layer=1, explanation_length=10, decoder_num_layers=1, encoder_num_layers=2, identity_output=True
    )
    results = evaluate_lens(lens, base, whole, torch.tensor(data["activation"]).mean(0), batch_size=4)
    assert results["kl"]["encoder_reading_context"] < 1e-5
    assert abs(results["fve_encoder_reading_context"] - 1.0) < 1e-5
    assert results["kl"]["mean_ablation"] > 0.01


def test_lens_card_carries_the_evaluation(tmp_path):
    from hfx.lens.pipeline import write_lens_card

    base = tiny_base()
    lens = ConsistencyLens.from_base(
        base, layer=1, explanation_length=2, decoder_num_layers=1, encoder_num_layers=1
    )
    write_lens_card(tmp_path, lens.config)
    assert "Not evaluated yet" in (tmp_path / "README.md").read_text()
    results = {
        "examples": 5,
        "kl": {"lens": 0.125, "mean_ablation": 1.5, "zero_ablation": 3.0},
        "fve": 0.5,
        "samples": [
            {
                "context": "a | b\nc",
                "explanation": " x y",
                "original_top": [" x", "\n"],
                "reconstructed_top": ["|"],
            }
        ],
    }
    write_lens_card(tmp_path, lens.config, results)
    card = (tmp_path / "README.md").read_text()
    assert "| lens reconstruction | 0.1250 |" in card and "| mean ablation | 1.5000 |" in card
    assert "variance explained: 0.500" in card and "custom_code" in card
    assert "| «a \\| b⏎c» | « x y» | « x» «⏎» | «\\|» |" in card


def test_copy_rate_counts_explanation_tokens_found_in_the_recent_context():
    from hfx.lens.evaluation import copy_rate

    context = list(range(100, 140))  # the last 16 are 124..139
    assert copy_rate([[130, 139, 5, 6]], [context]) == 0.5
    assert copy_rate([[100, 101]], [context]) == 0.0  # too far back
    assert copy_rate([[124, 125], [1, 2]], [context, context]) == 0.5
    assert copy_rate([[7, 7]], [[7]], window=16) == 1.0


def test_evaluation_has_every_condition_and_its_faithfulness_checks(tmp_path):
    from hfx.lens.evaluation import CONDITIONS, format_lens_table

    base = tiny_base()
    data = dumped(tmp_path, base)
    mean = torch.tensor(data["activation"]).mean(0)
    # a lens that reads its explanation with an identity encoder (the base's first layers): explanations matter
    lens = ConsistencyLens.from_base(
        base, layer=1, explanation_length=4, decoder_num_layers=1, encoder_num_layers=2, identity_output=True
    )
    results = evaluate_lens(lens, base, data, mean, batch_size=5)
    assert set(results["conditions"]) == set(CONDITIONS)
    for values in results["conditions"].values():
        assert -1.0 <= values["cosine"] <= 1.0 and values["kl"] >= 0
    assert results["conditions"]["mean_ablation"]["fve"] == 0.0
    assert 0.0 <= results["copy_rate"] <= 1.0
    faith = results["faithfulness"]
    assert faith["edit_move"] > 0 and abs(faith["swap_kl_increase"]) > 0
    lens_fve, empty_fve = results["fve"], results["conditions"]["empty_explanation"]["fve"]
    assert (
        abs(results["fve_vs_empty"] - (1 - (1 - lens_fve) / (1 - empty_fve))) < 1e-6
    )  # errors are (1 - FVE) x SSD
    table = format_lens_table(results)
    assert "| empty explanation |" in table and "Copy rate" in table and "swapping" in table


def test_the_cosine_regression_loss_is_logged_and_trained(tmp_path):
    base = tiny_base()
    data = dumped(tmp_path, base)
    trainer = make_trainer(
        tmp_path,
        base,
        data,
        cosine_weight=1.0,
        kl_weight=0.0,
        max_steps=10,
        logging_steps=1,
        learning_rate=3e-2,
    )
    trainer.train()
    cosines = [entry["cosine"] for entry in trainer.state.log_history if "cosine" in entry]
    assert len(cosines) == 10
    assert sum(cosines[-3:]) < sum(cosines[:3])  # the reconstruction turns toward the activation
