"""Lens activation datasets: pre-tokenization, captured values vs a direct forward, shards, resume, card, CLI."""

from __future__ import annotations

import datasets
import pytest
import torch

from hfx.cli import main
from hfx.lens.data import DumpConfig, capture_batch, dump_activations, load_activations, tokenize_examples

from .test_modeling import VOCAB, tiny_base


class ToyTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w) for w in text.split()]}

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [str(int(i)) for i in ids]


DOCUMENTS = [
    ("a", " ".join(str(i % VOCAB) for i in range(3, 40))),
    ("b", " ".join(str(i) for i in range(5, 20))),
]


def test_examples_cut_each_window_at_a_seeded_position():
    config = DumpConfig(layer=1, context_length=10, min_position=3, max_examples=100, seed=4)
    examples = tokenize_examples(ToyTokenizer(), DOCUMENTS, config)
    assert examples == tokenize_examples(ToyTokenizer(), DOCUMENTS, config)
    # windows: doc a has 37 tokens -> 10, 10, 10, 7; doc b 15 -> 10, 5
    assert [e["doc_id"] for e in examples] == [0, 0, 0, 0, 1, 1]
    for example in examples:
        assert 4 <= len(example["input_ids"]) <= 10  # position >= min_position, kept through the position
    assert examples[0]["input_ids"] == list(range(3, 3 + len(examples[0]["input_ids"])))
    other = tokenize_examples(ToyTokenizer(), DOCUMENTS, DumpConfig(1, 10, 3, 100, seed=5))
    assert [len(e["input_ids"]) for e in other] != [len(e["input_ids"]) for e in examples]
    with pytest.raises(ValueError, match="min_position"):
        DumpConfig(context_length=8, min_position=8)


def test_captured_activation_and_reference_match_a_direct_forward():
    base = tiny_base()
    rows = [[3, 4, 5, 6, 7], [9, 8], [10, 11, 12]]
    captured = capture_batch(base, 1, rows, topk=5)
    for i, row in enumerate(rows):
        with torch.no_grad():
            out = base(torch.tensor([row]), output_hidden_states=True)
        torch.testing.assert_close(
            captured["activation"][i], out.hidden_states[2][0, -1], rtol=1e-4, atol=1e-5
        )
        top = torch.log_softmax(out.logits[0, -1], -1).topk(5)
        assert captured["reference_topk_ids"][i].tolist() == top.indices.tolist()
        torch.testing.assert_close(captured["reference_topk_logprobs"][i], top.values, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"layer 7 is out of range"):
        capture_batch(base, 7, rows, topk=5)


def test_dump_writes_shards_resumes_and_refuses_other_settings(tmp_path):
    base = tiny_base()
    config = DumpConfig(
        layer=2,
        context_length=10,
        min_position=3,
        max_examples=100,
        topk=4,
        batch_size=2,
        examples_per_shard=4,
    )
    dump_activations(
        base,
        ToyTokenizer(),
        DOCUMENTS,
        tmp_path,
        config,
        {"model": "tiny", "dataset": "toy", "dtype": "float32"},
    )
    dataset = load_activations(tmp_path)
    assert len(dataset) == 6 and set(dataset["layer"]) == {2}
    assert all(len(a) == 24 for a in dataset["activation"]) and all(
        len(t) == 4 for t in dataset["reference_topk_ids"]
    )
    assert dataset["position"] == [len(ids) - 1 for ids in dataset["input_ids"]]
    shards = sorted((tmp_path / "data").glob("activations-*.parquet"))
    assert len(shards) == 2 and (tmp_path / "README.md").exists() and (tmp_path / "examples.parquet").exists()
    kept = shards[1].read_bytes()
    shards[1].unlink()
    dump_activations(
        base,
        ToyTokenizer(),
        DOCUMENTS,
        tmp_path,
        config,
        {"model": "tiny", "dataset": "toy", "dtype": "float32"},
    )
    assert shards[1].read_bytes() == kept
    assert (tmp_path / "hfx_stage_lens-dump.done").is_file()  # made whole again, then marked done
    with pytest.raises(ValueError, match=r"other settings:\n  settings.layer: 2 -> 1"):
        dump_activations(
            base,
            ToyTokenizer(),
            DOCUMENTS,
            tmp_path,
            DumpConfig(1, 10, 3, 100, 4, 2, 4),
            {"model": "tiny", "dataset": "toy", "dtype": "float32"},
        )


@pytest.mark.integration
def test_lens_dump_cli_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "acts"
    main(
        [
            "lens",
            "dump",
            "--output_dir",
            str(out),
            "--dataset",
            "sklearn_descr",
            "--layer",
            "5",
            "--max_examples",
            "24",
            "--batch_size",
            "8",
            "--dtype",
            "bfloat16",
        ]
    )
    assert "24 activations of layer 5" in capsys.readouterr().out
    dataset = datasets.Dataset.from_parquet(str(out / "data" / "activations-00000.parquet"))
    assert len(dataset) == 24 and len(dataset[0]["activation"]) == 576
    card = (out / "README.md").read_text()
    assert "SmolLM2-135M-Instruct" in card and "layer 5" in card
    with pytest.raises(
        SystemExit, match=r"layer 30 is out of range: LlamaForCausalLM has decoder layers 0\.\.29"
    ):
        main(["lens", "dump", "--output_dir", str(tmp_path / "bad"), "--layer", "30", "--max_examples", "4"])
    assert not (tmp_path / "bad").exists()


def test_a_dump_refuses_non_finite_values_before_writing_a_shard(tmp_path):
    base = tiny_base()
    with torch.no_grad():
        base.model.norm.weight[0] = float("nan")  # the activations are finite, the log-probabilities are not
    config = DumpConfig(
        layer=2, context_length=10, min_position=3, max_examples=100, topk=4, examples_per_shard=4
    )
    with pytest.raises(ValueError, match="next-token log-probabilities: .* not finite"):
        dump_activations(base, ToyTokenizer(), DOCUMENTS, tmp_path, config, {"model": "tiny"})
    assert not list(tmp_path.glob("data/*.parquet"))
