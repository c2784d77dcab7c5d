import json
import logging

import torch

from hfx.cartridges.pipeline import train_cartridge
from hfx.cartridges.synthesis import SynthesisConfig, synthesize
from hfx.cartridges.training import CartridgeTrainingArguments, read_metadata

DOCUMENT = "The Zorblat protocol was designed in 1987 by Mara Quell at the Ostrava Institute. " * 10
#: 4 conversations about the document, in one batch.
TINY_SYNTHESIS = SynthesisConfig(
    num_conversations=4,
    conversations_per_chunk=4,
    chunk_min_tokens=20,
    chunk_max_tokens=40,
    max_question_tokens=4,
    max_answer_tokens=4,
)


def _tiny_synthesis(tmp_path, tiny_model_dir):
    """A short document, the tiny model and its tokenizer, and 4 conversations synthesized about the document."""
    from hfx.cartridges.corpus import load_corpus
    from hfx.models import load_causal_lm

    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    model, tokenizer = load_causal_lm(str(tiny_model_dir))
    dataset = synthesize(
        model, tokenizer, load_corpus(doc, tokenizer), tmp_path / "synth", TINY_SYNTHESIS, progress=False
    )
    return doc, model, tokenizer, dataset


def test_training_resumes_from_the_last_checkpoint_after_a_kill(tmp_path, tiny_model_dir, caplog):
    from hfx.cartridges.corpus import load_corpus

    doc, model, tokenizer, dataset = _tiny_synthesis(tmp_path, tiny_model_dir)

    def args(max_steps):
        return CartridgeTrainingArguments(
            output_dir=str(tmp_path / "cart"),
            max_steps=max_steps,
            save_steps=2,
            per_device_train_batch_size=2,
            num_virtual_tokens=8,
            use_cpu=True,
            disable_tqdm=True,
        )

    # A run of 4 steps that got as far as its step-2 checkpoint: its adapter was never saved.
    from hfx.cartridges.pipeline import CartridgeCollator, CartridgeTrainer, create_cartridge
    from hfx.cartridges.training import cartridge_stage
    from hfx.models import model_id

    corpus = load_corpus(doc, tokenizer)
    assert cartridge_stage(args(4), model_id(str(tiny_model_dir)), corpus, dataset).begin() == "new"
    model.requires_grad_(False)
    peft_model = create_cartridge(model, tokenizer, corpus, 8)
    CartridgeTrainer(
        model=peft_model,
        args=args(2),
        train_dataset=dataset,
        data_collator=CartridgeCollator(tokenizer.pad_token_id),
    ).train()
    assert (tmp_path / "cart" / "checkpoint-2").is_dir()

    with caplog.at_level(logging.INFO, logger="hfx.checkpoints"):
        train_cartridge(str(doc), dataset, args(4), model_name_or_path=str(tiny_model_dir))
    assert "Resuming training from" in caplog.text and "checkpoint-2" in caplog.text
    meta = read_metadata(tmp_path / "cart")
    assert meta["global_steps"] == 4 and meta["num_virtual_tokens"] == 8 and meta["corpus"] == "doc"


def test_callbacks_reach_trainer_and_the_curve_example_keeps_each_checkpoints_adapter(
    tmp_path, tiny_model_dir, monkeypatch
):
    import importlib.util
    import sys
    import time
    from pathlib import Path

    from hfx.cartridges.training import load_cartridge
    from hfx.models import load_causal_lm

    spec = importlib.util.spec_from_file_location(
        "cartridge_curve", Path(__file__).parents[2] / "examples" / "cartridges" / "curve.py"
    )
    curve = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, curve)  # its dataclasses look their module up there
    spec.loader.exec_module(curve)

    doc, model, _, dataset = _tiny_synthesis(tmp_path, tiny_model_dir)
    args = CartridgeTrainingArguments(
        output_dir=str(tmp_path / "cart"),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=2,
        num_virtual_tokens=8,
        use_cpu=True,
        disable_tqdm=True,
    )
    keep = curve.KeepCheckpointAdapters(tmp_path / "curve", start=time.time())
    train_cartridge(str(doc), dataset, args, model_name_or_path=str(tiny_model_dir), callbacks=[keep])

    # The run removed its checkpoints; the callback's copies of steps 2 and 4 remain, each a loadable cartridge.
    assert not list((tmp_path / "cart").glob("checkpoint-*"))
    assert sorted(p.name for p in (tmp_path / "curve").iterdir()) == ["step-2", "step-4"]
    prefixes = []
    for step in (2, 4):
        snapshot = tmp_path / "curve" / f"step-{step}"
        elapsed = json.loads((snapshot / "elapsed.json").read_text())
        assert elapsed["step"] == step and elapsed["minutes"] >= 0
        base, _ = load_causal_lm(str(tiny_model_dir))
        prefixes.append(
            load_cartridge(base, snapshot).prompt_encoder["default"].embedding.weight.detach().clone()
        )
    assert not torch.equal(prefixes[0], prefixes[1])  # two points of training, not one adapter copied twice


def test_the_default_initialization_on_a_model_without_rotary_embeddings_stops_before_synthesis(
    tmp_path, tokenizer
):
    import pytest
    from transformers import GPT2Config, GPT2LMHeadModel

    from hfx.cartridges.pipeline import run_self_study

    gpt2 = tmp_path / "gpt2"
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=512)
    GPT2LMHeadModel(config).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    doc = tmp_path / "doc.txt"
    doc.write_text("The Zorblat protocol was designed in 1987 by Mara Quell at the Ostrava Institute. " * 4)
    with pytest.raises(ValueError, match="attended_tokens.*rotary.*GPT2LMHeadModel has none.*first_tokens"):
        run_self_study(tmp_path / "run", str(doc), model_name_or_path=str(gpt2), device="cpu")
    assert not (tmp_path / "run" / "synthesis").exists()


def test_run_and_train_share_one_set_of_training_defaults():
    import inspect

    from hfx.cartridges.pipeline import RunArguments, create_cartridge
    from hfx.cartridges.training import DEFAULT_INITIALIZATION

    run, train = RunArguments(), CartridgeTrainingArguments(output_dir="unused")
    for name in ("initialization", "learning_rate", "num_train_epochs", "per_device_train_batch_size"):
        assert getattr(run, name) == getattr(train, name), name
    assert train.lr_scheduler_type.value == run.lr_scheduler_type == "cosine"
    assert run.initialization == DEFAULT_INITIALIZATION == "attended_tokens"
    assert inspect.signature(create_cartridge).parameters["initialization"].default == DEFAULT_INITIALIZATION
    assert SynthesisConfig().top_k == 64


def _args(tmp_path, p=8, max_steps=2, **extra):
    return CartridgeTrainingArguments(
        output_dir=str(tmp_path / "cart"),
        max_steps=max_steps,
        save_steps=2,
        per_device_train_batch_size=2,
        num_virtual_tokens=p,
        use_cpu=True,
        disable_tqdm=True,
        **extra,
    )


def test_a_changed_setting_is_refused_or_retrained_never_reused(tmp_path, tiny_model_dir, caplog):
    import pytest

    from hfx.stages import StageMismatch

    doc, _, _, dataset = _tiny_synthesis(tmp_path, tiny_model_dir)
    train_cartridge(str(doc), dataset, _args(tmp_path, p=8), model_name_or_path=str(tiny_model_dir))
    weights = (tmp_path / "cart" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(StageMismatch, match=r"settings\.num_virtual_tokens: 8 -> 4"):
        train_cartridge(str(doc), dataset, _args(tmp_path, p=4), model_name_or_path=str(tiny_model_dir))
    assert read_metadata(tmp_path / "cart")["num_virtual_tokens"] == 8  # refused: the old cartridge untouched
    assert (tmp_path / "cart" / "adapter_model.safetensors").read_bytes() == weights

    train_cartridge(
        str(doc), dataset, _args(tmp_path, p=4), model_name_or_path=str(tiny_model_dir), overwrite=True
    )
    assert read_metadata(tmp_path / "cart")["num_virtual_tokens"] == 4
    retrained = (tmp_path / "cart" / "adapter_model.safetensors").read_bytes()
    # the same settings again: reused as it is
    with caplog.at_level(logging.INFO, logger="hfx.stages"):
        train_cartridge(str(doc), dataset, _args(tmp_path, p=4), model_name_or_path=str(tiny_model_dir))
    assert "already done with these settings" in caplog.text
    assert (tmp_path / "cart" / "adapter_model.safetensors").read_bytes() == retrained
    # another synthesis (the input changed upstream) retrains it, without --overwrite
    fewer = dataset.select(range(3))
    train_cartridge(str(doc), fewer, _args(tmp_path, p=4), model_name_or_path=str(tiny_model_dir))
    assert read_metadata(tmp_path / "cart")["train_conversations"] == 3


def test_a_retrain_killed_while_saving_is_never_taken_as_finished(tmp_path, tiny_model_dir, monkeypatch):
    """A finished cartridge retrained in place with other settings (--overwrite), the process stopped after the new
    adapter is written and before its metadata: the folder must not pass for a finished cartridge."""
    import pytest

    import hfx.cartridges.pipeline as pipeline
    from hfx.cartridges.training import is_trained_cartridge

    doc, _, _, dataset = _tiny_synthesis(tmp_path, tiny_model_dir)
    train_cartridge(str(doc), dataset, _args(tmp_path, p=8), model_name_or_path=str(tiny_model_dir))
    assert is_trained_cartridge(tmp_path / "cart")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "write_metadata", killed)
        with pytest.raises(KeyboardInterrupt):
            train_cartridge(
                str(doc),
                dataset,
                _args(tmp_path, p=4),
                model_name_or_path=str(tiny_model_dir),
                overwrite=True,
            )
    assert (tmp_path / "cart" / "adapter_model.safetensors").is_file()
    assert not is_trained_cartridge(tmp_path / "cart")
    # the same command again finishes it (resumed from its last checkpoint, not restarted)
    train_cartridge(str(doc), dataset, _args(tmp_path, p=4), model_name_or_path=str(tiny_model_dir))
    assert is_trained_cartridge(tmp_path / "cart")
    assert read_metadata(tmp_path / "cart")["num_virtual_tokens"] == 4


def test_the_main_job_rerun_with_another_p_is_refused_not_answered_with_the_old_cartridge(
    tmp_path, tiny_model_dir
):
    import pytest

    from hfx.cartridges.pipeline import run_self_study
    from hfx.stages import StageMismatch

    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    synthesis = TINY_SYNTHESIS

    def run(p, **kwargs):
        training = dict(max_steps=2, per_device_train_batch_size=2, num_virtual_tokens=p, disable_tqdm=True)
        return run_self_study(
            tmp_path / "run", doc, synthesis=synthesis, training=training, model_name_or_path=str(tiny_model_dir),
            device="cpu", **kwargs,
        )  # fmt: skip

    run(8)
    with pytest.raises(StageMismatch, match="num_virtual_tokens: 8 -> 4"):
        run(4)
    assert read_metadata(tmp_path / "run" / "cartridge")["num_virtual_tokens"] == 8
    run(4, overwrite=True)
    assert read_metadata(tmp_path / "run" / "cartridge")["num_virtual_tokens"] == 4
