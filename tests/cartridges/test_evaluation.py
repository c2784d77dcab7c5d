import json

import pytest
import torch

from hfx.cartridges.evaluation import (
    Condition,
    evaluate_conditions,
    format_table,
    icl_condition,
    load_questions,
    score_multiple_choice,
)
from tests.conftest import DATA

GOOD = {"question": "How many?", "choices": ["one", "two", "three"], "answer": 1}


def _write(tmp_path, rows):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        ({"question": "q", "choices": ["a", "b"]}, "missing field"),
        ({"question": "", "choices": ["a", "b"], "answer": 0}, "'question'"),
        ({"question": "q", "choices": ["a"], "answer": 0}, "'choices'"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "'answer'"),
        ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "not one of the choices"),
        ([1, 2], "expected an object"),
    ],
)
def test_malformed_question_rows_are_named_by_line(tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, GOOD, bad])
    with pytest.raises(ValueError, match=message) as err:
        load_questions(path)
    assert f"{path}:3:" in str(err.value)


def test_answer_given_as_text_and_shipped_sets_parse(tmp_path):
    questions = load_questions(_write(tmp_path, [{**GOOD, "answer": "three"}]))
    assert questions[0].answer == 2
    for path in sorted((DATA / "questions").glob("*.jsonl")):
        assert len(load_questions(path)) >= 30, path


def test_scoring_prefers_the_choice_the_model_finds_likely(tiny_model, tokenizer):
    """Train-free check: rig the model's head so one answer text is far more likely, and it must win."""
    from hfx.cartridges.evaluation import MCQuestion

    favourite = tokenizer(" zebra", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        tiny_model.lm_head.weight = torch.nn.Parameter(tiny_model.lm_head.weight.clone())
        tiny_model.lm_head.weight[favourite] += 5.0 * tiny_model.model.norm.weight.sign()
    questions = [
        MCQuestion("Which animal?", [" lion", " zebra", " cat"], 1),
        MCQuestion("Which?", [" zebra", " dog"], 0),
    ]
    accuracy, log_ppl = score_multiple_choice(
        tiny_model, tokenizer, Condition("none", None, False), questions, progress=False
    )
    assert accuracy == 1.0 and 0 <= log_ppl < 0.5  # the reference answers are the rigged, likely ones


def test_three_conditions_table(tiny_model, tokenizer):
    from peft import CartridgeConfig, get_peft_model

    from hfx.cartridges.evaluation import cartridge_condition

    questions = load_questions(DATA / "questions" / "wine_data.jsonl")[:3]
    icl = icl_condition(tiny_model, tokenizer, "Some document. " * 40)
    truncated = icl_condition(tiny_model, tokenizer, "Some document. " * 40, max_context_tokens=50)
    assert truncated.prefix.num_tokens <= 50 < icl.prefix.num_tokens and truncated.name.startswith(
        "ICL (first"
    )
    peft_model = get_peft_model(tiny_model, CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    cart = cartridge_condition(peft_model)
    with peft_model.disable_adapter():
        results = evaluate_conditions(
            peft_model.get_base_model(),
            tokenizer,
            [Condition("no context", None, False), icl, cart],
            questions,
            throughput_batch=2,
            throughput_tokens=3,
            progress=False,
        )
    assert [r.kv_tokens for r in results] == [0, icl.prefix.num_tokens, 8]
    assert results[1].kv_bytes == icl.prefix.nbytes > results[2].kv_bytes > 0
    assert results[0].decode_tokens_per_s is None and results[2].decode_tokens_per_s > 0
    table = format_table(results, num_questions=3)
    assert table.count("\n| ") == 3 and "cartridge" in table  # one row per condition after the header


def test_an_evaluation_with_non_finite_scores_is_refused(tiny_model, tokenizer):
    with torch.no_grad():
        tiny_model.model.norm.weight[0] = float("nan")
    questions = load_questions(DATA / "questions" / "wine_data.jsonl")[:2]
    with pytest.raises(ValueError, match="the evaluation of no context .* not finite"):
        evaluate_conditions(
            tiny_model,
            tokenizer,
            [Condition("no context", None, False)],
            questions,
            throughput_batch=0,
            progress=False,
        )
