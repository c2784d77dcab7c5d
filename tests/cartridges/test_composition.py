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
    for i, (text, p) in enumerate(zip(TEXTS, sizes, strict=False)):
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
    with pytest.raises(ValueError, match="cart1: the cartridge's weights cannot be read"):
        composed_prefix(dirs[:2], model_config=model.config)
