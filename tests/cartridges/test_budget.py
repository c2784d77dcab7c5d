"""A time budget instead of a count: the plan fits the budget, is written before the work and kept on resume."""

import json
import logging

import pytest
import torch

from hfx.cartridges.budget import PLAN_FILE, BudgetPlan, plan_budget, read_plan, time_training_step
from hfx.cartridges.synthesis import SynthesisConfig


def _plan(budget_minutes, **overrides):
    kwargs = dict(
        setup_seconds=30.0,
        seconds_per_conversation=1.2,
        seconds_per_step=2.5,
        conversations_per_chunk=32,
        per_device_train_batch_size=8,
        num_train_epochs=2.0,
        min_conversations=64,
    )
    return plan_budget(budget_minutes, **{**kwargs, **overrides})


def test_the_plan_fills_the_budget_in_whole_batches_and_stays_inside_it():
    plan = _plan(20)
    assert plan.num_conversations % 32 == 0
    assert plan.steps == plan.num_conversations * 2 // 8
    assert plan.planned_seconds <= 20 * 60
    # One more batch would not fit.
    more = plan.num_conversations + 32
    assert 30 + more * 1.2 + (more * 2 // 8) * 2.5 + plan.reserve_seconds > 20 * 60
    # A larger budget, a faster machine: more conversations.
    assert _plan(40).num_conversations > plan.num_conversations
    assert _plan(20, seconds_per_conversation=0.3).num_conversations > plan.num_conversations
    # A slower training step leaves fewer conversations.
    assert _plan(20, seconds_per_step=10.0).num_conversations < plan.num_conversations


def test_a_budget_too_small_for_the_probe_names_what_it_would_take():
    with pytest.raises(ValueError, match=r"--budget_minutes 1 is too small .* about [0-9.]+ min"):
        _plan(1, setup_seconds=50.0)
    with pytest.raises(ValueError, match="must be > 0"):
        _plan(0)


def test_the_plan_round_trips_through_json():
    plan = _plan(20)
    data = json.loads(json.dumps(plan.to_json()))
    assert data["planned_seconds"] == pytest.approx(plan.planned_seconds)
    assert BudgetPlan.from_json(data) == plan


def test_timing_a_training_step_leaves_the_model_untouched(tiny_model, tokenizer):
    row = {
        "input_ids": list(range(10, 30)),
        "answer_start": 12,
        "topk_token_ids": [[1, 2, 3]] * 8,
        "topk_logprobs": [[-0.5, -1.5, -2.5]] * 8,
    }
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    flags = [p.requires_grad for p in tiny_model.parameters()]
    seconds = time_training_step(tiny_model, tokenizer, [row], num_virtual_tokens=4, batch_size=3)
    assert seconds > 0
    # Frozen tokens before the prefix (a library's distractors) are attended to and take no gradient.
    assert (
        time_training_step(tiny_model, tokenizer, [row], num_virtual_tokens=4, batch_size=3, frozen_tokens=6)
        > 0
    )
    assert all(p.grad is None for p in tiny_model.parameters())
    assert [p.requires_grad for p in tiny_model.parameters()] == flags
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_a_budgeted_run_plans_writes_the_plan_and_keeps_it_on_resume(tmp_path, tiny_model_dir, caplog):
    from hfx.cartridges.pipeline import run_self_study

    doc = tmp_path / "doc.txt"
    doc.write_text("The Zorblat protocol was designed in 1987 by Mara Quell at the Ostrava Institute. " * 10)
    synthesis = SynthesisConfig(
        num_conversations=10_000,  # replaced by the plan
        conversations_per_chunk=2,
        chunk_min_tokens=20,
        chunk_max_tokens=40,
        max_question_tokens=4,
        max_answer_tokens=4,
    )
    training = {"num_virtual_tokens": 8, "per_device_train_batch_size": 2, "num_train_epochs": 1.0}
    out = tmp_path / "run"

    def run(budget_minutes):
        return run_self_study(
            out,
            str(doc),
            synthesis=synthesis,
            training=dict(training),
            model_name_or_path=str(tiny_model_dir),
            device="cpu",
            budget_minutes=budget_minutes,
        )

    with caplog.at_level(logging.INFO, logger="hfx.cartridges.pipeline"):
        result = run(0.25)
    plan = read_plan(out)
    assert plan is not None and plan.budget_minutes == 0.25
    assert "Plan for 0.25 min" in caplog.text
    assert plan.num_conversations >= 4 and plan.num_conversations % 2 == 0
    manifest = json.loads((out / "synthesis" / "synthesis_config.json").read_text())
    assert manifest["num_conversations"] == plan.num_conversations
    meta = json.loads((result.cartridge_dir / "hfx_cartridge.json").read_text())
    assert meta["train_conversations"] <= plan.num_conversations
    assert meta["global_steps"] == pytest.approx(plan.steps, abs=1)

    # A resumed run reads the plan back instead of measuring again.
    written = (out / PLAN_FILE).read_text()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hfx.cartridges.pipeline"):
        run(0.25)
    assert "Resuming with the plan" in caplog.text
    assert (out / PLAN_FILE).read_text() == written
    with pytest.raises(ValueError, match="planned for --budget_minutes 0.25, not 2"):
        run(2)


def test_timed_evaluation_and_reloads_replace_the_reserve_when_larger():
    base = _plan(10)
    assert base.reserve_seconds == pytest.approx(0.12 * 600)
    timed = _plan(10, after_training_seconds=100.0, evaluation_seconds=80.0)
    assert timed.reserve_seconds == pytest.approx(125.0) and timed.evaluation_seconds == 80.0
    assert timed.num_conversations < base.num_conversations and timed.planned_seconds <= 600
    assert "evaluation timed at 1.3" in timed.describe()
    assert _plan(10, after_training_seconds=10.0).reserve_seconds == base.reserve_seconds
    with pytest.raises(ValueError, match=r"--budget_minutes 2 is too small"):
        _plan(2, after_training_seconds=100.0)


def test_the_evaluation_estimate_grows_with_the_questions(tiny_model, tokenizer):
    from hfx.attention import use_grouped_sdpa
    from hfx.cartridges.evaluation import estimate_evaluation_seconds, load_questions
    from tests.conftest import DATA

    use_grouped_sdpa(tiny_model)
    questions = load_questions(DATA / "questions" / "wine_data.jsonl")
    document = "Some document about wines and their classes. " * 20
    few = estimate_evaluation_seconds(tiny_model, tokenizer, document, questions[:4], throughput_batch=0)
    many = estimate_evaluation_seconds(
        tiny_model, tokenizer, document, questions[:4] * 25, throughput_batch=0
    )
    assert 0 < few < many
    assert estimate_evaluation_seconds(tiny_model, tokenizer, document, []) == 0.0
