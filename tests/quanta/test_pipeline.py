"""Corpus inputs, per-token losses (values, resume), and the whole `hfx quanta` job on the embedded model."""

from __future__ import annotations

import json
import math
import shutil

import datasets
import pytest
import torch

from hfx.cli import main
from hfx.documents import load_documents
from hfx.quanta.losses import LossesConfig, compute_losses, window_losses


def test_documents_from_collections_files_and_datasets(tmp_path):
    mixed = load_documents("pydoc_topics,sklearn_descr")
    assert mixed[0][0].startswith("pydoc_topics/") and mixed[1][0].startswith("sklearn_descr/")
    (tmp_path / "a.txt").write_text("alpha beta")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("gamma")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert load_documents(str(tmp_path)) == [("a.txt", "alpha beta"), ("sub/b.md", "gamma")]
    datasets.Dataset.from_list([{"body": "one"}, {"body": "two"}]).to_parquet(str(tmp_path / "d.parquet"))
    assert [t for _, t in load_documents(str(tmp_path / "d.parquet"), text_column="body")] == ["one", "two"]
    with pytest.raises(ValueError, match=r"d\.parquet: no column 'text' \(columns: \['body'\]\)"):
        load_documents(str(tmp_path / "d.parquet"))
    with pytest.raises(ValueError, match="neither an existing path nor bundled collection"):
        load_documents("no_such_corpus")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match=r"bad\.txt: not valid UTF-8"):
        load_documents(str(tmp_path / "bad.txt"))


class ToyTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w) for w in text.split()]}


def test_window_losses_match_a_direct_forward_and_resume(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    ).eval()
    windows = [[3, 4, 5, 6, 7], [8, 9]]
    losses = window_losses(model, windows)
    for window, values in zip(windows, losses, strict=True):
        logits = model(torch.tensor([window])).logits[0]
        direct = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(window[1:]), reduction="none")
        assert math.isnan(values[0])
        torch.testing.assert_close(torch.tensor(values[1:]), direct, rtol=1e-4, atol=1e-5)

    documents = [("d0", " ".join(str(i % 40 + 1) for i in range(23))), ("d1", "5 6 7 8 9 10 11")]
    config = LossesConfig(context_length=8, max_tokens=1000, batch_size=2, windows_per_shard=2)
    result = compute_losses(model, ToyTokenizer(), documents, tmp_path, config, {"model": "toy"})
    assert [(r["doc_id"], r["start"], len(r["input_ids"])) for r in result] == [
        (0, 0, 8),
        (0, 8, 8),
        (0, 16, 7),
        (1, 0, 7),
    ]
    shards = sorted((tmp_path / "losses" / "data").glob("losses-*.parquet"))
    assert len(shards) == 2
    kept = shards[0].read_bytes()
    shards[1].unlink()  # killed before the last shard
    again = compute_losses(model, ToyTokenizer(), documents, tmp_path, config, {"model": "toy"})
    assert shards[0].read_bytes() == kept and len(again) == 4
    with pytest.raises(ValueError, match=r"other settings:\n  settings.context_length: 8 -> 16"):
        compute_losses(
            model, ToyTokenizer(), documents, tmp_path, LossesConfig(16, 1000, 2, 2), {"model": "toy"}
        )


@pytest.mark.integration
def test_quanta_job_end_to_end_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--output_dir", str(out), "--dtype", "bfloat16"]
    main(
        [
            "quanta",
            "run",
            *common,
            "--dataset",
            "pydoc_topics",
            "--context_length",
            "48",
            "--max_tokens",
            "2500",
            "--num_tokens",
            "40",
            "--loss_threshold_bits",
            "0.2",
            "--n_clusters",
            "4",
            "--projection_dim",
            "64",
        ]
    )
    printed = capsys.readouterr().out
    assert "40 tokens in 4 clusters" in printed and "page:" in printed
    summary = json.loads((out / "clusters" / "clusters.json").read_text())
    assert sum(summary["sizes"]) == 40 and summary["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert summary["context_length"] == 48 and summary["projection_dim"] == 64
    clusters = datasets.Dataset.from_parquet(str(out / "clusters" / "data" / "clusters.parquet"))
    assert len(clusters) == 40 and max(clusters["loss_bits"]) < 0.2
    assert (out / "viewer" / "index.html").stat().st_size > 1000
    card = (out / "clusters" / "README.md").read_text()
    assert "SmolLM2-135M-Instruct" in card and "pydoc_topics" in card

    # stages re-run alone: the same settings reuse each finished stage; clustering made again (--overwrite) with
    # the same seed gives the same labels
    made = {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()}
    main(["quanta", "filter", *common, "--num_tokens", "40", "--loss_threshold_bits", "0.2"])
    main(["quanta", "similarity", *common])
    main(["quanta", "cluster", *common, "--n_clusters", "4"])
    main(["quanta", "view", *common])
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()} == made
    with pytest.raises(SystemExit, match=r"settings.num_tokens: 40 -> 30\n"):
        main(["quanta", "filter", *common, "--num_tokens", "30", "--loss_threshold_bits", "0.2"])
    labels = clusters["cluster"]
    main(["quanta", "cluster", *common, "--n_clusters", "5", "--overwrite"])
    main(["quanta", "cluster", *common, "--n_clusters", "4", "--overwrite"])
    again = datasets.Dataset.from_parquet(str(out / "clusters" / "data" / "clusters.parquet"))
    assert again["cluster"] == labels

    # bad input: a parameter pattern the model does not have, more clusters than tokens
    other = tmp_path / "other"
    shutil.copytree(out / "tokens", other / "tokens")
    with pytest.raises(
        SystemExit, match=r"LlamaForCausalLM has no parameters matching pattern 'peer_experts'"
    ):
        main(["quanta", "gradients", "--output_dir", str(other), "--parameters", "peer_experts"])
    assert not (other / "gradients").exists()
    with pytest.raises(
        SystemExit, match=r"n_clusters=40 must be smaller than the number of tokens kept \(40\)"
    ):
        main(["quanta", "cluster", *common, "--n_clusters", "40", "--overwrite"])


def loaded_models(monkeypatch) -> list:
    """Every model the commands load, as the loader returns it."""
    from hfx import models

    loaded, load = [], models.load_causal_lm

    def spy(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        loaded.append(model)
        return model, tokenizer

    monkeypatch.setattr(models, "load_causal_lm", spy)
    return loaded


def test_each_stage_runs_on_the_resolved_device_and_dtype(tmp_path, tiny_model_dir, monkeypatch):
    loaded = loaded_models(monkeypatch)
    model = ["--model_name_or_path", str(tiny_model_dir)]
    losses = ["--dataset", "sklearn_descr", "--context_length", "16", "--max_tokens", "300"]
    kept = ["--loss_threshold_bits", "100", "--num_tokens", "24"]  # a random model: keep every token
    gradients = ["--projection_dim", "8"]
    out = tmp_path / "default"
    main(["quanta", "run", "--output_dir", str(out), *model, *losses, *kept, *gradients, "--n_clusters", "3"])
    (default,) = loaded
    assert {(p.device.type, p.dtype) for p in default.parameters()} == {("cpu", torch.float32)}
    for manifest in ("losses/hfx_stage_quanta-losses.json", "gradients/hfx_stage_quanta-gradients.json"):
        assert json.loads((out / manifest).read_text())["settings"]["dtype"] == "float32"  # never "auto"
    summary = json.loads((out / "run.json").read_text())
    assert summary["device"] == "cpu" and summary["dtype"] == "float32"

    # stages alone, in bfloat16: each loads the model in it, and the manifests record it
    out = tmp_path / "bf16"
    run = ["--output_dir", str(out), *model, "--dtype", "bfloat16"]
    main(["quanta", "losses", *run, *losses])
    main(["quanta", "filter", *run, *kept])
    main(["quanta", "gradients", *run, *gradients])
    assert [(m.device.type, m.dtype) for m in loaded[1:]] == [("cpu", torch.bfloat16)] * 2
    for manifest in ("losses/hfx_stage_quanta-losses.json", "gradients/hfx_stage_quanta-gradients.json"):
        assert json.loads((out / manifest).read_text())["settings"]["dtype"] == "bfloat16"
    from hfx.quanta.pipeline import RunArguments, run_similarity
    from hfx.quanta.similarity import load_similarity

    run_similarity(RunArguments(output_dir=str(out), device="cpu"))
    _, similarity = load_similarity(out)
    assert similarity.shape == (24, 24)
    torch.testing.assert_close(similarity.diagonal(), torch.ones(24))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_missing_device_stops_every_stage_before_anything_is_written(tmp_path, tiny_model_dir):
    from hfx.quanta.pipeline import RunArguments, run_similarity

    model = ["--model_name_or_path", str(tiny_model_dir), "--device", "cuda"]
    for stage in ("run", "losses", "gradients"):
        out = tmp_path / stage
        with pytest.raises(SystemExit, match=rf"hfx quanta {stage}: error: --device 'cuda'.*no CUDA device"):
            main(["quanta", stage, "--output_dir", str(out), *model])
        assert not out.exists()
    with pytest.raises(ValueError, match=r"--device 'cuda'.*no CUDA device"):
        run_similarity(RunArguments(output_dir=str(tmp_path / "similarity"), device="cuda"))
    assert not (tmp_path / "similarity").exists()


def test_non_finite_losses_are_refused_before_a_shard_is_written(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    ).eval()
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")  # what a broken kernel or an overflow leaves
    documents = [("d0", " ".join(str(i % 40 + 1) for i in range(23)))]
    config = LossesConfig(context_length=8, max_tokens=1000, batch_size=2, windows_per_shard=2)
    with pytest.raises(ValueError, match="per-token losses: .* not finite .* nothing was written"):
        compute_losses(model, ToyTokenizer(), documents, tmp_path, config, {"model": "toy"})
    assert not list((tmp_path / "losses").glob("data/*.parquet"))
