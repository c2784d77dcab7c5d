import json

import pytest
import torch

from hfx.cartridges.evaluation import (
    Condition,
    ConditionResult,
    evaluate_conditions,
    format_table,
    gap_shares,
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
        (
            {"question": "q", "choices": ["a", "b"], "answer": 0, "kind": "trivia"},
            "'kind' must be one of recall",
        ),
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


@pytest.mark.parametrize("with_prefix", [False, True])
def test_each_choice_scores_as_if_read_whole_after_the_prefix(tiny_model, tokenizer, with_prefix):
    """Prompts read once for all their choices, and the prompts' common start once for all of them: each choice
    still gets the log-likelihood one forward of prefix + prompt + choice gives it."""
    from hfx.cartridges.corpus import user_turn_ids
    from hfx.cartridges.evaluation import MCQuestion, score_questions
    from hfx.cartridges.prefix import PrefixKV, forward_with_prefix

    questions = [  # prompts of different lengths, 2 to 4 choices of different lengths
        MCQuestion("How many classes does the wine dataset have?", [" 3", " two", " four or more", " 5"], 0),
        MCQuestion("Which?", [" zebra", " a dog in the park"], 1),
        MCQuestion("Who collected the measurements, and in which year?", [" Forina, 1988", " nobody"], 0),
        MCQuestion("Is it?", [" yes", " no", " maybe"], 2),
    ]
    prefix = PrefixKV.prefill(tiny_model, tokenizer("The wine dataset has 3 classes.")["input_ids"])
    condition = Condition("c", prefix if with_prefix else None, prompt_after_system=with_prefix)
    scores = score_questions(tiny_model, tokenizer, condition, questions, batch_size=6, progress=False)
    for q_idx, question in enumerate(questions):
        prompt = user_turn_ids(tokenizer, question.question, after_system=with_prefix)
        means = []
        for c_idx, choice in enumerate(question.choices):
            answer = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                logits = forward_with_prefix(tiny_model, condition.prefix, ids, torch.ones_like(ids)).logits
            logprobs = torch.log_softmax(logits[0, len(prompt) - 1 : -1], -1)
            total = logprobs.gather(-1, torch.tensor(answer)[:, None]).sum().item()
            means.append(total / len(answer))
            if c_idx == question.answer:
                assert scores.answer_logprob[q_idx] == pytest.approx(total, abs=1e-4)
                assert scores.answer_tokens[q_idx] == len(answer)
        assert scores.correct[q_idx] == (max(range(len(means)), key=means.__getitem__) == question.answer)
        # alone, a question's whole prompt but its last token is the common start: read once as part of the prefix
        alone = score_questions(tiny_model, tokenizer, condition, [question], progress=False)
        assert alone.answer_logprob[0] == pytest.approx(scores.answer_logprob[q_idx], abs=1e-4)
        assert alone.correct[0] == scores.correct[q_idx]


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
    for result in results:  # per-question results, and the accuracy's Wilson interval from them
        assert len(result.correct) == 3 and sum(result.correct) / 3 == result.accuracy
        low, high = result.accuracy_interval
        assert low <= result.accuracy <= high and f"{result.accuracy:.3f} ({low:.2f}–{high:.2f})" in table


def test_decode_throughput_times_its_repeats_unless_they_would_pass_the_time_given(tiny_model, tokenizer):
    from hfx.cartridges.evaluation import decode_throughput
    from hfx.generation import decoder_for

    icl = icl_condition(tiny_model, tokenizer, "Some document. " * 20)
    decoder = decoder_for(tiny_model)  # on the CPU, eager: no untimed first call

    def timed_calls(**limits):
        before = decoder.stats.calls
        tokens_per_s = decode_throughput(tiny_model, tokenizer, icl, ["Why?", "How?"], new_tokens=2, **limits)
        assert tokens_per_s > 0
        return decoder.stats.calls - before

    assert timed_calls(repeats=3) == 3
    assert timed_calls(repeats=3, max_seconds=60.0) == 3
    assert timed_calls(repeats=3, max_seconds=0.0) == 1  # one timed call at least


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


SETS = sorted((DATA / "questions").glob("*.jsonl"))
#: The documents' own sets (the main job's and the others'): how many questions each needs at least.
DOCUMENT_SETS = {"rcv1": 100, "breast_cancer": 60, "covtype": 60, "digits": 60, "iris": 60, "kddcup99": 60,
                 "lfw": 60, "wine_data": 60, "sklearn_descr": 60}  # fmt: skip


@pytest.mark.parametrize("path", SETS, ids=[p.stem for p in SETS])
def test_every_question_set_is_well_formed(path):
    """Four distinct choices, an answer among them, no question asked twice, a known kind, positions balanced."""
    questions = load_questions(path)
    assert len({q.question.lower() for q in questions}) == len(questions), "a question is asked twice"
    for number, q in enumerate(questions, start=1):
        assert len(q.choices) == 4 and len(set(q.choices)) == 4, f"{path.name} question {number}: {q.choices}"
        assert 0 <= q.answer < 4
    positions = [sum(q.answer == i for q in questions) for i in range(4)]
    assert max(positions) <= 2 * min(positions) + 2, f"{path.name}: answers by position {positions}"
    if path.stem in DOCUMENT_SETS:
        assert len(questions) >= DOCUMENT_SETS[path.stem]
    if path.stem == "rcv1":  # the main job's set also asks what no single sentence answers
        assert sum(q.kind == "combine" for q in questions) >= 30


def test_the_table_gives_intervals_kinds_and_the_share_of_the_gap():
    from hfx.statistics import gap_share, wilson_interval

    kinds = ["recall"] * 6 + ["combine"] * 4
    rows = {"no context": [0, 1, 0, 0, 0, 1, 0, 0, 0, 0], "ICL": [1, 1, 1, 1, 1, 1, 1, 0, 1, 0],
            "cartridge (p=4)": [1, 1, 1, 0, 1, 1, 0, 0, 1, 0]}  # fmt: skip
    from hfx.cartridges.evaluation import MCQuestion, _by_kind, _interval

    questions = [MCQuestion("q", ["a", "b", "c", "d"], 0, kind) for kind in kinds]
    results = [
        ConditionResult(name, sum(c) / 10, 1.0, 0, 0, correct=c, accuracy_interval=_interval(c),
                        by_kind=_by_kind(c, questions))
        for name, c in rows.items()
    ]  # fmt: skip
    table = format_table(results, num_questions=10)
    cartridge = wilson_interval(6, 10)
    assert f"| cartridge (p=4) | 0.600 ({cartridge.low:.2f}–{cartridge.high:.2f}) |" in table
    assert "| condition | recall (6 questions) | combine (4 questions) |" in table
    combine = wilson_interval(1, 4)
    assert (
        "| cartridge (p=4) | 0.833 " in table and f"0.250 ({combine.low:.2f}–{combine.high:.2f}) |" in table
    )
    share = gap_share(rows["no context"], rows["ICL"], rows["cartridge (p=4)"])
    assert share.share == pytest.approx((0.6 - 0.2) / (0.8 - 0.2))
    assert gap_shares(results) == {"cartridge (p=4)": share.to_dict()}
    assert (
        f"cartridge (p=4) closes 67% of the no context → ICL gap (95% bootstrap interval "
        f"{share.interval.low:.0%} to {share.interval.high:.0%})" in table
    )
    # one kind only: no table of kinds; no ICL: no share
    single = [ConditionResult(r.condition, r.accuracy, 1.0, 0, 0, correct=r.correct) for r in results]
    assert "recall (" not in format_table(single) and "closes" in format_table(single)
    assert "closes" not in format_table(single[::2])
    one = [ConditionResult(r.condition, r.accuracy, 1.0, 0, 0, correct=r.correct[:1]) for r in results]
    assert gap_shares(one) == {} and "closes" not in format_table(one)  # one question: no share, no error
