"""Sharing a cartridge and its dataset: the staged folders load like the originals, cards link each other, bad
inputs are refused before anything is written, and the real path uploads exactly the staged folders."""

import json
import logging
import shutil
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow.parquet as pq
import pytest
import torch
from huggingface_hub import DatasetCard, ModelCard
from peft import PeftModel

from hfx.cartridges.hub import push_cartridge_to_hub
from hfx.cartridges.pipeline import (
    TrainArguments,
    train_and_report,
)
from hfx.cartridges.synthesis import FEATURES, load_synthesis
from hfx.cartridges.training import CartridgeTrainingArguments, read_metadata
from hfx.cli import main
from tests.conftest import make_tiny_llama

REPO = "hfx-test/zorblat-cartridge"
DATASET_REPO = "hfx-test/zorblat-cartridge-data"
BASE = "hfx-test/tiny-llama"
MODEL_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "eval_results.json",
    "hfx_cartridge.json",
    "trainer_state.json",  # the loss curve (log_history)
    "training_args.json",
}
DATASET_FILES = {
    "README.md",
    "synthesis_config.json",
    "data/train-00000.parquet",
    "data/train-00001.parquet",
}


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_study):
    """A copy of the session's tiny study (a real synthesis folder and a trained, evaluated cartridge), plus the
    leftovers training can leave."""
    root = Path(shutil.copytree(tiny_study["root"], tmp_path_factory.mktemp("push-run") / "study"))
    doc, synthesis, cartridge = root / "zorblat.txt", root / "run" / "synthesis", root / "run" / "cartridge"
    report = json.loads((cartridge / "eval_results.json").read_text())
    # What must never be shared: a resume checkpoint, pickles, a temp file, logs, a hidden file.
    (cartridge / "checkpoint-1").mkdir()
    (cartridge / "checkpoint-1" / "optimizer.pt").write_bytes(b"pickle")
    (cartridge / "optimizer.pt").write_bytes(b"pickle")
    (cartridge / "training_args.bin").write_bytes(b"pickle")
    (cartridge / ".adapter_model.safetensors.123-0a1b2c3d.tmp").write_bytes(b"half")
    (cartridge / "runs").mkdir()
    (cartridge / "runs" / "events.out").write_bytes(b"log")
    (cartridge / ".DS_Store").write_bytes(b"")
    (synthesis / "data" / ".train-00002.parquet.99-0a1b2c3d.tmp").write_bytes(b"half")
    return {"root": root, "doc": doc, "synthesis": synthesis, "cartridge": cartridge, "report": report}


def _logits(tokenizer, adapter_dir) -> torch.Tensor:
    model = PeftModel.from_pretrained(make_tiny_llama(tokenizer), str(adapter_dir)).eval()
    ids = torch.tensor([tokenizer("Who designed the Zorblat protocol?")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_dry_run_writes_folders_that_load_like_the_originals(run, tmp_path, tokenizer):
    out = tmp_path / "staged"
    result = push_cartridge_to_hub(
        run["cartridge"],
        REPO,
        synthesis_dir=run["synthesis"],
        dataset_repo_id=DATASET_REPO,
        base_model=BASE,
        dry_run_dir=out,
    )
    assert result["dry_run"] and result["model"]["folder"] == str(out / "model")
    assert [p.name for p in tmp_path.iterdir()] == ["staged"]  # no temp folder left beside it
    assert _tree(out / "model") == MODEL_FILES and set(result["model"]["files"]) == MODEL_FILES
    assert _tree(out / "dataset") == DATASET_FILES and set(result["dataset"]["files"]) == DATASET_FILES

    # The adapter: same logits as the original, and it names the base model's Hub id.
    assert torch.equal(_logits(tokenizer, run["cartridge"]), _logits(tokenizer, out / "model"))
    adapter_config = json.loads((out / "model" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == BASE and adapter_config["peft_type"] == "CARTRIDGE"

    # The dataset: same rows, same features as the synthesis folder.
    loaded = datasets.load_dataset(str(out / "dataset"), split="train", cache_dir=str(tmp_path / "cache"))
    original = load_synthesis(run["synthesis"])
    assert loaded.features == FEATURES
    assert loaded.to_list() == original.to_list()

    # The cards: base model, the dataset link both ways, the run's real numbers.
    model_card = ModelCard.load(out / "model" / "README.md")
    assert model_card.data.base_model == BASE and model_card.data.datasets == [DATASET_REPO]
    assert model_card.data.library_name == "peft" and "cartridges" in model_card.data.tags
    meta = read_metadata(run["cartridge"])
    assert f"https://huggingface.co/datasets/{DATASET_REPO}" in model_card.text
    assert f'PeftModel.from_pretrained(base, "{REPO}")' in model_card.text
    assert f"| optimizer steps | {meta['global_steps']} |" in model_card.text
    assert f"| final train loss | {meta['train_loss']:.4f} |" in model_card.text
    assert run["report"]["table"] in model_card.text
    assert f"{len(original)}\nconversations about `zorblat` synthesized by {BASE}" in model_card.text

    dataset_card = DatasetCard.load(out / "dataset" / "README.md")
    assert dataset_card.data.configs == [{"config_name": "default", "data_files": "data/train-*.parquet"}]
    assert dataset_card.data.size_categories == "n<1K"
    assert f"[{REPO}](https://huggingface.co/{REPO})" in dataset_card.text
    assert f"tokens) on **{BASE}**" in dataset_card.text  # the Hub id, not the local path it was made from
    assert f'load_dataset("{DATASET_REPO}", split="train")' in dataset_card.text
    answer_tokens = sum(len(r["input_ids"]) - r["answer_start"] for r in original)
    assert f"**{len(original)}** conversations, **{answer_tokens}** answer tokens" in dataset_card.text

    # The originals are untouched: their local cards name no repo.
    assert REPO not in (run["cartridge"] / "README.md").read_text()
    assert REPO not in (run["synthesis"] / "README.md").read_text()


def test_dry_run_without_a_hub_base_model_leaves_it_out_of_the_card(run, tmp_path, caplog):
    out = tmp_path / "staged"
    with caplog.at_level(logging.WARNING, logger="hfx.cartridges.hub"):
        result = push_cartridge_to_hub(run["cartridge"], REPO, dry_run_dir=out)
    assert "not a Hub model id" in caplog.text and "--base_model" in caplog.text
    assert "dataset" not in result and not (out / "dataset").exists()
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.base_model is None and card.data.datasets is None
    assert "not\npublished with this cartridge" in card.text


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_inputs_are_refused_by_name_and_leave_no_folder(run, tmp_path):
    out = tmp_path / "staged"

    def refused(error, match, cartridge=run["cartridge"], **kwargs):
        kwargs.setdefault("synthesis_dir", run["synthesis"])
        kwargs.setdefault("base_model", BASE)
        with pytest.raises(error, match=match):
            push_cartridge_to_hub(cartridge, kwargs.pop("repo_id", REPO), dry_run_dir=out, **kwargs)
        assert not out.exists() and list(tmp_path.glob(".staged*")) == []

    empty = tmp_path / "empty"
    empty.mkdir()
    refused(FileNotFoundError, r"empty: no adapter_config\.json; not a saved cartridge", cartridge=empty)
    refused(FileNotFoundError, r"missing: no such folder", cartridge=tmp_path / "missing")

    lora = _copy(run["cartridge"], tmp_path / "lora")
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    refused(ValueError, r"lora/adapter_config\.json: adapter type is 'LORA', not 'CARTRIDGE'", cartridge=lora)

    unfinished = _copy(run["cartridge"], tmp_path / "unfinished")
    (unfinished / "adapter_model.safetensors").unlink()
    refused(FileNotFoundError, r"unfinished: no adapter_model\.safetensors", cartridge=unfinished)

    truncated = _copy(run["cartridge"], tmp_path / "truncated")
    (truncated / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    refused(
        ValueError,
        r"truncated/adapter_model\.safetensors: the cartridge's weights cannot be read",
        cartridge=truncated,
    )

    no_meta = _copy(run["cartridge"], tmp_path / "no_meta")
    (no_meta / "hfx_cartridge.json").unlink()
    refused(FileNotFoundError, r"no_meta: no hfx_cartridge\.json", cartridge=no_meta)

    no_shards = tmp_path / "no_shards"
    (no_shards / "data").mkdir(parents=True)
    refused(FileNotFoundError, r"no_shards: no synthesized shards", synthesis_dir=no_shards)

    no_column = _copy(run["synthesis"], tmp_path / "no_column")
    shard = no_column / "data" / "train-00001.parquet"
    pq.write_table(pq.read_table(shard).drop_columns(["topk_logprobs"]), shard)
    refused(ValueError, r"train-00001\.parquet: missing column\(s\) topk_logprobs", synthesis_dir=no_column)

    other_model = _copy(run["synthesis"], tmp_path / "other_model")
    manifest = json.loads((other_model / "synthesis_config.json").read_text())
    (other_model / "synthesis_config.json").write_text(json.dumps({**manifest, "model": "someone/else"}))
    refused(ValueError, r"names the base model .* 'someone/else'", synthesis_dir=other_model)

    refused(ValueError, r"repo_id 'not a repo!' is not a valid Hub repo id", repo_id="not a repo!")
    refused(ValueError, r"has no namespace", repo_id="name-only")
    refused(ValueError, r"given without synthesis_dir", synthesis_dir=None, dataset_repo_id=DATASET_REPO)

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        push_cartridge_to_hub(run["cartridge"], REPO, dry_run_dir=out)
    assert _tree(out) == {"keep.txt"}


def test_a_failure_while_staging_leaves_no_folder(run, tmp_path, monkeypatch):
    import hfx.cartridges.hub as hub

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hub, "render_cartridge_card", broken)
    with pytest.raises(OSError, match="disk full"):
        push_cartridge_to_hub(
            run["cartridge"], REPO, synthesis_dir=run["synthesis"], dry_run_dir=tmp_path / "o"
        )
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """HfApi.create_repo / upload_folder recorded instead of sent; each uploaded folder is copied aside."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        copy = tmp_path / "uploaded" / f"{len(calls)}"
        shutil.copytree(folder_path, copy)
        calls.append(("upload_folder", repo_id, {**kwargs, "folder": copy}))
        return f"https://huggingface.co/{repo_id}/commit/{len(calls)}"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def _uploaded(folder: Path) -> set[str]:
    from hfx.hub import is_ignored

    return {path for path in _tree(folder) if not is_ignored(path)}


def test_push_uploads_the_staged_folders_dataset_first(run, fake_hub, tmp_path):
    result = push_cartridge_to_hub(
        run["cartridge"], REPO, synthesis_dir=run["synthesis"], base_model=BASE, private=True
    )
    assert [(name, repo, kw.get("repo_type")) for name, repo, kw in fake_hub] == [
        ("create_repo", REPO + "-data", "dataset"),
        ("upload_folder", REPO + "-data", "dataset"),
        ("create_repo", REPO, "model"),
        ("upload_folder", REPO, "model"),
    ]
    assert all(kw["private"] is True and kw["exist_ok"] for name, _, kw in fake_hub if name == "create_repo")
    dataset_upload, model_upload = (kw for name, _, kw in fake_hub if name == "upload_folder")
    assert _uploaded(dataset_upload["folder"]) == DATASET_FILES
    assert _uploaded(model_upload["folder"]) == MODEL_FILES
    assert model_upload["delete_patterns"] == ["*"] and "checkpoint-*" in model_upload["ignore_patterns"]
    assert ModelCard.load(model_upload["folder"] / "README.md").data.datasets == [REPO + "-data"]
    assert result["model"]["commit_url"] == f"https://huggingface.co/{REPO}/commit/4"
    assert result["dataset"]["url"] == f"https://huggingface.co/datasets/{REPO}-data"
    assert not result["dry_run"]


def test_train_with_hub_repo_id_pushes_the_cartridge(run, fake_hub, tmp_path, tiny_model_dir):
    args = TrainArguments(
        corpus=str(run["doc"]),
        model_name_or_path=str(tiny_model_dir),
        synthesis_dir=str(run["synthesis"]),
        hub_repo_id=REPO,
    )
    training_args = CartridgeTrainingArguments(
        output_dir=str(tmp_path / "cartridge"),
        max_steps=1,
        per_device_train_batch_size=2,
        num_virtual_tokens=8,
        use_cpu=True,
        disable_tqdm=True,
    )
    train_and_report(args, training_args)
    (_, repo, upload), *_ = (call for call in fake_hub if call[0] == "upload_folder")
    assert repo == REPO and upload["repo_type"] == "model"
    assert {"adapter_model.safetensors", "hfx_cartridge.json", "README.md"} <= _uploaded(upload["folder"])


def test_cli_push_dry_run_help_and_errors(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["cartridge", "push", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--dry_run" in help_text and "--synthesis_dir" in help_text and "--repo_id" in help_text

    out = tmp_path / "staged"
    main(
        [
            "cartridge",
            "push",
            "--cartridge",
            str(run["cartridge"]),
            "--repo_id",
            REPO,
            "--synthesis_dir",
            str(run["synthesis"]),
            "--base_model",
            BASE,
            "--dry-run",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "dry run: nothing uploaded" in printed and str(out / "model") in printed
    assert _tree(out / "model") == MODEL_FILES and _tree(out / "dataset") == DATASET_FILES
    assert DatasetCard.load(out / "dataset" / "README.md").data.pretty_name

    with pytest.raises(SystemExit, match=r"hfx cartridge push: error: .*no adapter_config\.json"):
        main(
            [
                "cartridge",
                "push",
                "--cartridge",
                str(tmp_path),
                "--repo_id",
                REPO,
                "--dry-run",
                str(tmp_path / "x"),
            ]
        )
    assert not (tmp_path / "x").exists()


def test_a_composed_cartridge_gets_a_card_listing_its_parts(run, tmp_path, tokenizer):
    from hfx.cartridges.composition import compose_cartridges

    composed = compose_cartridges([run["cartridge"], run["cartridge"]], tmp_path / "composed")
    out = tmp_path / "staged"
    push_cartridge_to_hub(composed, REPO, base_model=BASE, dry_run_dir=out)
    card = ModelCard.load(out / "model" / "README.md")
    assert "## Composition" in card.text and "| 2 | zorblat | 8 |" in card.text
    assert card.data.base_model == BASE
    _logits(tokenizer, out / "model")  # loads
