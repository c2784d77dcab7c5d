import json

import pytest
import torch
from peft import PeftModel

from hfx.cartridges.composition import compose_cartridges, composed_prefix, load_prefix
from hfx.cartridges.corpus import Corpus
from hfx.cartridges.prefix import PrefixKV, forward_with_prefix
from hfx.cartridges.training import create_cartridge, write_metadata
from tests.conftest import make_tiny_llama

TEXTS = (
    "The Zorblat protocol was designed in 1987 by Mara Quell. ",
    "Velkin harbour handles 40 ships a day and was founded by Ito Brann. ",
    "The Quorra festival lasts nine days and ends with a lantern race. ",
)


def _save_cartridges(tmp_path, tokenizer, model, sizes=(4, 6, 5), base="tiny-base"):
    dirs = []
    for i, (text, p) in enumerate(zip(TEXTS[: len(sizes)], sizes, strict=True)):
        corpus = Corpus(f"doc{i}", text * 10, tokenizer(text * 10, add_special_tokens=False)["input_ids"])
        peft_model = create_cartridge(
            model, tokenizer, corpus, num_virtual_tokens=p, initialization="random_text", seed=i
        )
        path = tmp_path / f"cart{i}"
        peft_model.save_pretrained(path)
        write_metadata(path, {"base_model": base, "corpus": corpus.name, "num_virtual_tokens": p})
        model = peft_model.unload() if hasattr(peft_model, "unload") else peft_model.get_base_model()
        dirs.append(path)
    return dirs


def test_prefix_read_from_the_weights_is_the_one_peft_feeds_the_model(tmp_path, tokenizer):
    model = make_tiny_llama(tokenizer)
    (path,) = _save_cartridges(tmp_path, tokenizer, model, sizes=(5,))
    peft_model = PeftModel.from_pretrained(make_tiny_llama(tokenizer), str(path))
    expected = PrefixKV.from_peft_model(peft_model)
    got = load_prefix(path)
    assert got.num_tokens == 5
    for a, b in zip(got.keys + got.values, expected.keys + expected.values, strict=True):
        torch.testing.assert_close(a, b)


def test_three_cartridges_compose_on_disk_and_in_memory_to_the_same_model_outputs(tmp_path, tokenizer):
    model = make_tiny_llama(tokenizer)
    dirs = _save_cartridges(tmp_path, tokenizer, model)
    out = compose_cartridges(dirs, tmp_path / "composed", model_config=model.config)
    meta = json.loads((out / "hfx_cartridge.json").read_text())
    assert meta["num_virtual_tokens"] == 15 and meta["base_model"] == "tiny-base"
    assert [part["corpus"] for part in meta["composed_from"]] == ["doc0", "doc1", "doc2"]

    # The composed adapter loads with PEFT's own code path, and its prefix is the three prefixes in order.
    base = make_tiny_llama(tokenizer)
    composed = PeftModel.from_pretrained(base, str(out))
    assert composed.active_peft_config.num_virtual_tokens == 15
    in_memory = composed_prefix(dirs, model_config=model.config)
    from_peft = PrefixKV.from_peft_model(composed)
    for a, b in zip(in_memory.keys, from_peft.keys, strict=True):
        torch.testing.assert_close(a, b)
    parts = [load_prefix(d) for d in dirs]
    torch.testing.assert_close(in_memory.values[1][:, :, 4:10], parts[1].values[1])

    ids = torch.tensor([tokenizer("Who founded Velkin harbour?")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = composed(input_ids=ids, attention_mask=mask).logits
        got = forward_with_prefix(base, in_memory, ids, mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # Each part matters: dropping one changes the output.
    with torch.no_grad():
        two = forward_with_prefix(base, PrefixKV.concat(parts[:2]), ids, mask).logits
    assert (two - got).abs().max() > 1e-3


def test_composition_refuses_other_base_models_and_shapes(tmp_path, tokenizer):
    model = make_tiny_llama(tokenizer)
    dirs = _save_cartridges(tmp_path, tokenizer, model)
    write_metadata(dirs[2], {"base_model": "someone/else", "corpus": "doc2"})
    with pytest.raises(
        ValueError, match=r"cart2: this cartridge was trained on 'someone/else'.*cart0.*'tiny-base'"
    ):
        compose_cartridges(dirs, tmp_path / "composed")
    assert not (tmp_path / "composed").exists()
    with pytest.raises(ValueError, match="trained on 'tiny-base'.*base model in use is 'mine'"):
        composed_prefix(dirs[:2], base_model="mine")

    wider = make_tiny_llama(tokenizer, layers=3)
    with pytest.raises(
        ValueError, match="cart0: this cartridge was trained for a base model of another shape"
    ):
        composed_prefix(dirs[:2], model_config=wider.config)
    with pytest.raises(ValueError, match="at least 2 cartridges"):
        compose_cartridges(dirs[:1], tmp_path / "one")

    weights = dirs[1] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(
        ValueError, match="cart1/adapter_model.safetensors: the cartridge's weights cannot be read"
    ):
        composed_prefix(dirs[:2], model_config=model.config)


def test_compose_command_writes_the_adapter_card_and_the_multi_document_table(
    tmp_path, tokenizer, tiny_model_dir
):
    from transformers import AutoModelForCausalLM

    from hfx.cli import main

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    documents = []
    for i, text in enumerate(TEXTS):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(text * 10)
        documents.append(path)
    dirs = _save_cartridges(tmp_path, tokenizer, model, base=str(tiny_model_dir))
    questions = tmp_path / "questions.jsonl"
    rows = [
        {
            "question": "Who founded Velkin harbour and who designed Zorblat?",
            "choices": ["Ito Brann and Mara Quell", "Mara Quell and Ito Brann"],
            "answer": 0,
            "documents": ["doc0", "doc1"],
        },
        {
            "question": "How long is the Quorra festival and when was Zorblat designed?",
            "choices": ["nine days and 1987", "five days and 1987"],
            "answer": 0,
            "documents": ["doc0", "doc2"],
        },
        {"question": "How many ships does Velkin handle?", "choices": ["40", "12"], "answer": 0},
    ]
    questions.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "composed"
    argv = ["cartridge", "compose", "--cartridges", *map(str, dirs), "--output_dir", str(out)]
    main(
        [
            *argv,
            "--model_name_or_path",
            str(tiny_model_dir),
            "--questions",
            str(questions),
            "--corpora",
            *map(str, documents),
        ]
    )

    report = json.loads((out / "eval_results.json").read_text())
    names = [r["condition"] for r in report["results"]]
    assert names[0] == "no context" and names[1].startswith("ICL, all 3 documents")
    assert names[2:] == [
        "cartridge doc0 (p=4)",
        "cartridge doc1 (p=6)",
        "cartridge doc2 (p=5)",
        "composed 3 cartridges (p=15)",
    ]
    assert report["results"][-1]["kv_tokens"] == 15
    assert set(report["by_group"]) == {"doc0 + doc1", "doc0 + doc2"}
    pair = report["by_group"]["doc0 + doc1"]
    assert pair["num_questions"] == 1 and "composed doc0 + doc1 (p=10)" in pair["accuracy"]
    assert set(pair["accuracy"].values()) <= {0.0, 1.0}  # one question: each condition has it right or wrong
    assert "| composed 3 cartridges (p=15) |" in report["table"]
    card = (out / "README.md").read_text()
    assert "## Composition" in card and "doc2" in card and "| composed 3 cartridges (p=15) |" in card
    PeftModel.from_pretrained(model, str(out))  # loads as one adapter

    # Bad input: a composition that exists, a question about a document no cartridge knows, too few cartridges.
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main([*argv, "--model_name_or_path", str(tiny_model_dir)])
    rows[0]["documents"] = ["doc0", "atlantis"]
    questions.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(SystemExit, match=r"name documents \['atlantis'\] that none of the cartridges"):
        main(
            [
                *argv[:-1],
                str(tmp_path / "again"),
                "--model_name_or_path",
                str(tiny_model_dir),
                "--questions",
                str(questions),
                "--corpora",
                *map(str, documents),
            ]
        )
    assert not (tmp_path / "again").exists()
    with pytest.raises(SystemExit, match="at least 2 cartridges"):
        main(
            [
                "cartridge",
                "compose",
                "--cartridges",
                str(dirs[0]),
                "--model_name_or_path",
                str(tiny_model_dir),
            ]
        )
