"""Integration tests on the real embedded model (SmolLM2-135M-Instruct). Part of CI."""

import json
import os

import pytest
from peft import PeftModel

from hfx import embedded
from hfx.cartridges.evaluation import Condition, evaluate_conditions, icl_condition, load_questions
from hfx.cartridges.pipeline import run_self_study
from hfx.cartridges.synthesis import SynthesisConfig
from tests.conftest import DATA

pytestmark = pytest.mark.integration


def test_the_document_in_context_beats_no_context_on_the_default_corpus(embedded_model, tokenizer):
    """Why cartridges are worth making: the model uses the document when it has it."""
    from hfx.attention import use_grouped_sdpa

    use_grouped_sdpa(embedded_model)
    # the recall questions (68 of 103): ICL on the combine ones is near chance for this 135M model
    questions = [
        q
        for q in load_questions(DATA / "questions" / f"{embedded.DEFAULT_CORPUS}.jsonl")
        if q.kind == "recall"
    ]
    assert len(questions) >= 60
    icl = icl_condition(embedded_model, tokenizer, embedded.corpus_text(embedded.DEFAULT_CORPUS))
    none, with_doc = evaluate_conditions(
        embedded_model,
        tokenizer,
        [Condition("no context", None, False), icl],
        questions,
        throughput_batch=0,
        progress=False,
    )
    assert with_doc.accuracy >= none.accuracy + 0.2, (none, with_doc)
    # the two 95% intervals do not even overlap
    assert with_doc.accuracy_interval[0] > none.accuracy_interval[1], (none, with_doc)
    assert with_doc.answer_log_ppl < none.answer_log_ppl


def test_main_job_wiring_on_the_embedded_model(tmp_path):
    questions = tmp_path / "q.jsonl"
    rows = (DATA / "questions" / "rcv1.jsonl").read_text().splitlines()[:6]
    questions.write_text("\n".join(rows) + "\n")
    synthesis = SynthesisConfig(
        num_conversations=8,
        conversations_per_chunk=8,
        chunk_min_tokens=128,
        chunk_max_tokens=192,
        max_question_tokens=16,
        max_answer_tokens=16,
    )
    training = {"num_virtual_tokens": 32, "max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 1}
    result = run_self_study(tmp_path / "run", "rcv1", questions, synthesis, training)
    by_name = {r["condition"]: r for r in result.report["results"]}
    cartridge, icl = by_name["cartridge (p=32)"], by_name["ICL"]
    assert icl["kv_bytes"] >= 8 * cartridge["kv_bytes"]
    assert cartridge["decode_tokens_per_s"] > 0 and icl["decode_tokens_per_s"] > 0
    card = (result.cartridge_dir / "README.md").read_text()
    assert embedded.EMBEDDED_MODEL_ID in card and result.report["table"] in card
    meta = json.loads((result.cartridge_dir / "hfx_cartridge.json").read_text())
    assert meta["global_steps"] == 2 and meta["corpus"] == "rcv1"
    assert not list(
        result.cartridge_dir.glob("checkpoint-*")
    )  # resume state is dropped once the adapter is saved
    # The artifact is a plain PEFT adapter: loaded by PEFT alone, the model answers as hfx's own prefix path does.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfx.cartridges.composition import load_prefix
    from hfx.cartridges.corpus import user_turn_ids
    from hfx.cartridges.prefix import forward_with_prefix

    base = AutoModelForCausalLM.from_pretrained(embedded.embedded_model_path())
    peft_model = PeftModel.from_pretrained(base, str(result.cartridge_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(embedded.embedded_model_path())
    ids = torch.tensor([user_turn_ids(tokenizer, "How many categories does RCV1 have?", after_system=False)])
    with torch.no_grad():
        plain = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        with peft_model.disable_adapter():
            prefix = load_prefix(result.cartridge_dir)
            ours = forward_with_prefix(peft_model.get_base_model(), prefix, ids, torch.ones_like(ids)).logits
            without = peft_model.get_base_model()(input_ids=ids).logits
    torch.testing.assert_close(plain, ours, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, without, atol=1e-3)  # the cartridge is in effect
    # Started again, the run reuses its shards and its trained cartridge.
    mtime = os.path.getmtime(result.cartridge_dir / "adapter_model.safetensors")
    run_self_study(tmp_path / "run", "rcv1", None, synthesis, training)
    assert os.path.getmtime(result.cartridge_dir / "adapter_model.safetensors") == mtime
