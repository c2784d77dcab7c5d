"""Checkpoint rotation (hfx.checkpoints): the old checkpoints go only after the new one is marked complete, each
one's marker before its files, so a kill in the middle of a rotation always leaves an intact checkpoint to resume."""

from __future__ import annotations

import shutil

import pytest

from hfx import checkpoints
from hfx.checkpoints import COMPLETE_MARKER, last_complete_checkpoint, rotate_checkpoints


def make(out, step, complete=True):
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * 8)
    (folder / "optimizer.pt").write_bytes(b"o" * 8)
    if complete:
        (folder / COMPLETE_MARKER).write_text("")
    return folder


def test_rotation_keeps_the_newest_complete_and_the_best(tmp_path):
    for step in (2, 4, 6, 8):
        make(tmp_path, step)
    make(tmp_path, 10, complete=False)  # being written by another kill's run: not ours to judge
    rotate_checkpoints(tmp_path, limit=2, keep=tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-10", "checkpoint-2", "checkpoint-6", "checkpoint-8"
    ]  # fmt: skip


def test_a_kill_in_the_middle_of_a_rotation_leaves_an_intact_checkpoint(tmp_path, monkeypatch):
    make(tmp_path, 2)
    make(tmp_path, 4)

    def killed_half_way(path, *args, **kwargs):
        (path / "model.safetensors").unlink()  # part of the folder is gone when the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "shutil", type("Shutil", (), {"rmtree": staticmethod(killed_half_way)}))
    with pytest.raises(KeyboardInterrupt):
        rotate_checkpoints(tmp_path, limit=1)
    resumed = last_complete_checkpoint(tmp_path)
    assert resumed == tmp_path / "checkpoint-4" and (resumed / "model.safetensors").is_file()
    assert not (tmp_path / "checkpoint-2" / COMPLETE_MARKER).exists()


def test_trainers_rotate_after_marking_and_leave_the_callers_arguments_alone(
    tmp_path, tiny_model_dir, monkeypatch
):
    """A real Trainer with save_total_limit=1: Trainer's own rotation (which runs before the new checkpoint is
    marked) is off, hfx's runs after; a kill while the old checkpoint is deleted leaves the new one, complete."""
    from transformers import TrainerCallback

    from hfx.cartridges.corpus import load_corpus
    from hfx.cartridges.training import CartridgeCollator, CartridgeTrainer, create_cartridge
    from tests.cartridges.test_pipeline import _args, _tiny_synthesis

    doc, model, tokenizer, dataset = _tiny_synthesis(tmp_path, tiny_model_dir)
    args = _args(tmp_path, p=4, max_steps=4, save_total_limit=1)
    model.requires_grad_(False)
    trainer = CartridgeTrainer(
        model=create_cartridge(model, tokenizer, load_corpus(doc, tokenizer), 4),
        args=args,
        train_dataset=dataset,
        data_collator=CartridgeCollator(tokenizer.pad_token_id),
    )
    assert args.save_total_limit == 1 and trainer.args.save_total_limit is None

    seen = []

    class Watch(TrainerCallback):  # what is on disk when each checkpoint is saved, before hfx's callback runs
        def on_save(self, args, state, control, **kwargs):
            seen.append(sorted(p.name for p in (tmp_path / "cart").glob("checkpoint-*")))

    trainer.callback_handler.callbacks.insert(0, Watch())

    def killed(path, *args, **kwargs):
        shutil.rmtree(path / "optimizer.pt", ignore_errors=True)
        (path / "adapter_model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "shutil", type("Shutil", (), {"rmtree": staticmethod(killed)}))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert seen == [["checkpoint-2"], ["checkpoint-2", "checkpoint-4"]]  # Trainer deleted nothing itself
    resumed = last_complete_checkpoint(tmp_path / "cart")
    assert resumed.name == "checkpoint-4" and (resumed / "adapter_model.safetensors").is_file()
