import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from hfx.cartridges.corpus import Corpus, document_prefix_ids
from hfx.cartridges.prefix import PrefixKV
from hfx.cartridges.training import (
    CartridgeCollator,
    CartridgeTrainer,
    CartridgeTrainingArguments,
    attended_tokens_prefix,
    check_cartridge_fits,
    create_cartridge,
    load_cartridge,
)
from tests.conftest import make_tiny_llama


def _corpus(tokenizer, text="The Zorblat protocol was designed in 1987 by Mara Quell. " * 20):
    return Corpus("zorblat", text, tokenizer(text, add_special_tokens=False)["input_ids"])


def _rows(n=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(100, 1000, (5 + i,), generator=g).tolist()
        answer = torch.randint(100, 1000, (3 + i,), generator=g).tolist()
        logprobs = torch.log_softmax(torch.randn(len(answer), 50, generator=g), -1).topk(k, -1)
        ids = logprobs.indices.clone()
        ids[:, 0] = torch.tensor(answer)  # the teacher's favourite is the answer token itself
        rows.append(
            {
                "conversation_id": i,
                "input_ids": prompt + answer,
                "answer_start": len(prompt),
                "topk_token_ids": ids.tolist(),
                "topk_logprobs": logprobs.values.tolist(),
            }
        )
    return rows


def test_collator_aligns_teacher_distributions_with_the_tokens_they_predict():
    rows = _rows()
    batch = CartridgeCollator(pad_token_id=2)(rows)
    assert batch["input_ids"].shape == batch["loss_mask"].shape == (4, max(len(r["input_ids"]) for r in rows))
    for i, row in enumerate(rows):
        positions = batch["loss_mask"][i].nonzero().squeeze(-1)
        # position t predicts token t + 1: exactly the answer tokens
        assert batch["input_ids"][i, positions + 1].tolist() == row["input_ids"][row["answer_start"] :]
        assert batch["teacher_topk_ids"][i, positions, 0].tolist() == row["input_ids"][row["answer_start"] :]
    with pytest.raises(ValueError, match="teacher distributions"):
        CartridgeCollator(2)([{**rows[0], "topk_token_ids": rows[0]["topk_token_ids"][:-1]}])


def test_first_tokens_initialization_is_the_truncated_icl_prefix(tiny_model, tokenizer):
    corpus = _corpus(tokenizer)
    peft_model = create_cartridge(
        tiny_model, tokenizer, corpus, num_virtual_tokens=10, initialization="first_tokens"
    )
    prefix = PrefixKV.from_peft_model(peft_model)
    with peft_model.disable_adapter():
        icl = PrefixKV.prefill(peft_model.get_base_model(), document_prefix_ids(tokenizer, corpus.text)[:10])
    assert len(prefix.keys) == len(icl.keys) == tiny_model.config.num_hidden_layers
    for got, want in zip(prefix.keys + prefix.values, icl.keys + icl.values, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attended_tokens_initialization_keeps_the_most_attended_kv_moved_to_the_cartridge_positions(
    tiny_model, tokenizer
):
    from transformers.models.llama.modeling_llama import rotate_half

    corpus = _corpus(
        tokenizer, text=" ".join(f"Fact {i}: the value of item {i} is {i * 7}." for i in range(20))
    )
    ids = document_prefix_ids(tokenizer, corpus.text)
    implementation = tiny_model.config._attn_implementation
    full = PrefixKV.prefill(tiny_model, ids)
    # Every token kept: the prefill itself, each key rotated by 0.
    whole = attended_tokens_prefix(tiny_model, tokenizer, corpus.text, len(ids))
    for got, want in zip(whole.keys + whole.values, full.keys + full.values, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    p = 12
    peft_model = create_cartridge(tiny_model, tokenizer, corpus, p, initialization="attended_tokens")
    assert tiny_model.config._attn_implementation == implementation  # the caller's model is left as it was
    prefix = PrefixKV.from_peft_model(peft_model)
    eager = make_tiny_llama(tokenizer)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    rotary = tiny_model.model.rotary_emb
    groups = tiny_model.config.num_attention_heads // tiny_model.config.num_key_value_heads
    for layer, weights in enumerate(attentions):
        received = weights[0].view(-1, groups, len(ids), len(ids)).sum(dim=(1, 2))  # kv heads, keys
        for head in range(received.shape[0]):
            values = prefix.values[layer][0, head]
            original = full.values[layer][0, head]
            # Each kept value is one of the document's, in document order, starting with the first token.
            kept = [int((original - v).abs().sum(-1).argmin()) for v in values]
            torch.testing.assert_close(values, original[kept])
            assert kept[0] == 0 and kept == sorted(set(kept))
            # ... the first token and the p - 1 others that later tokens attend to most.
            others = received[head, 1:].topk(p - 1).indices + 1
            assert set(kept[1:]) == set(others.tolist())
            # Rotating a kept key back from slot i to its position in the document gives the document's key.
            keys = prefix.keys[layer][0, head][None]
            cos, sin = rotary(keys, position_ids=torch.tensor([kept]) - torch.arange(p)[None])
            torch.testing.assert_close(
                keys * cos + rotate_half(keys) * sin, full.keys[layer][0, head][kept][None]
            )


def test_cartridge_larger_than_the_corpus_is_refused(tiny_model, tokenizer):
    corpus = _corpus(tokenizer, text="tiny corpus")
    with pytest.raises(ValueError, match=r"p=64 is larger than the corpus 'zorblat' \(\d+ tokens\)"):
        create_cartridge(tiny_model, tokenizer, corpus, num_virtual_tokens=64)


def test_random_text_initialization_is_the_kv_of_token_ids_and_random_vectors_are_peft_s(
    tiny_model, tokenizer
):
    corpus = _corpus(tokenizer)
    first = PrefixKV.from_peft_model(
        create_cartridge(make_tiny_llama(tokenizer), tokenizer, corpus, 8, initialization="first_tokens")
    )

    text = PrefixKV.from_peft_model(
        create_cartridge(tiny_model, tokenizer, corpus, 8, initialization="random_text", seed=3)
    )
    # The base model's own KV of 8 token ids (ids from 100 on, drawn with the seed): text, just not the document's.
    ids = torch.randint(100, len(tokenizer), (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = PrefixKV.prefill(tiny_model, ids[0].tolist())
    for got, want in zip(text.keys + text.values, expected.keys + expected.values, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(text.keys[0], first.keys[0])

    vectors = create_cartridge(tiny_model, tokenizer, corpus, 8, initialization="random_vectors")
    weights = vectors.prompt_encoder[vectors.active_adapter].embedding.weight.detach()
    # PEFT's embedding initialization, N(0, 1): nothing like this tiny model's KV of any text (std well below 1).
    assert abs(weights.mean()) < 0.05 and 0.9 < weights.std() < 1.1
    assert first.keys[0].std() < 0.5 and text.keys[0].std() < 0.5


def _distillation_rows(model, context_ids, n=8, k=8, seed=0):
    """Rows whose teacher is ``model`` with ``context_ids`` in front: what a cartridge should learn to replace."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(100, 1000, (4,), generator=g).tolist()
        answer = torch.randint(100, 1000, (6,), generator=g).tolist()
        with torch.no_grad():
            logits = model(torch.tensor([context_ids + prompt + answer])).logits[0]
        top = torch.log_softmax(logits[len(context_ids) + len(prompt) - 1 : -1], -1).topk(k, -1)
        rows.append(
            {
                "conversation_id": i,
                "input_ids": prompt + answer,
                "answer_start": len(prompt),
                "topk_token_ids": top.indices.tolist(),
                "topk_logprobs": top.values.tolist(),
            }
        )
    return rows


def test_training_learns_the_teacher_and_saves_a_loadable_peft_adapter(tmp_path, tokenizer):
    import datasets

    model = make_tiny_llama(tokenizer, init_std=0.2)  # peaked next-token distributions, like a trained model
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    context = torch.randint(100, 1000, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    rows = _distillation_rows(model, context)
    corpus = _corpus(tokenizer)
    peft_model = create_cartridge(
        model, tokenizer, corpus, num_virtual_tokens=12, initialization="random_text"
    )
    frozen_before = peft_model.prompt_encoder["default"].frozen_embedding.detach().clone()
    args = CartridgeTrainingArguments(
        output_dir=str(tmp_path / "cart"),
        max_steps=40,
        per_device_train_batch_size=8,
        learning_rate=5e-2,
        logging_steps=1,
        save_steps=20,
        use_cpu=True,
        model_dtype="float32",
        disable_tqdm=True,
    )
    trainer = CartridgeTrainer(
        model=peft_model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=CartridgeCollator(2),
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    batch = CartridgeCollator(2)(rows)
    teacher_entropy = (
        -(batch["teacher_topk_logprobs"].exp() * batch["teacher_topk_logprobs"])
        .sum(-1)[batch["loss_mask"]]
        .mean()
    )
    # The gap to the teacher (cross-entropy minus the teacher's own entropy over its top-k) shrinks substantially.
    assert losses[-1] - teacher_entropy < 0.5 * (losses[0] - teacher_entropy)
    # Only the cartridge moved: the base model and the frozen attention-sink token did not.
    assert all(torch.equal(base_state[k], v) for k, v in peft_model.get_base_model().state_dict().items())
    assert torch.equal(peft_model.prompt_encoder["default"].frozen_embedding, frozen_before)

    trainer.save_model(args.output_dir)
    out = tmp_path / "cart"
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_args.json").is_file()
    assert not list(out.rglob("training_args.bin"))  # no pickled arguments next to the weights
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "CARTRIDGE"
    with torch.no_grad():
        expected = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reloaded = PeftModel.from_pretrained(make_tiny_llama(tokenizer, init_std=0.2), str(out))
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_loading_errors_name_the_problem(tmp_path, tokenizer, tiny_model):
    corpus = _corpus(tokenizer)
    create_cartridge(tiny_model, tokenizer, corpus, num_virtual_tokens=6).save_pretrained(tmp_path / "cart")
    wider = make_tiny_llama(tokenizer, layers=3)
    with pytest.raises(ValueError, match="another shape.*num_layers: cartridge 2 vs model 3"):
        load_cartridge(wider, tmp_path / "cart")
    assert check_cartridge_fits(tmp_path / "cart", make_tiny_llama(tokenizer).config).num_virtual_tokens == 6

    weights = tmp_path / "cart" / "adapter_model.safetensors"
    load_file(weights)  # intact before we damage it
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="adapter_model.safetensors: the cartridge's weights cannot be read"):
        load_cartridge(make_tiny_llama(tokenizer), tmp_path / "cart")

    (tmp_path / "cart" / "adapter_config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="adapter_config.json: cannot be read"):
        load_cartridge(make_tiny_llama(tokenizer), tmp_path / "cart")
    with pytest.raises(FileNotFoundError, match="not a saved cartridge"):
        load_cartridge(make_tiny_llama(tokenizer), tmp_path)
