"""Tuning a library's cartridges together, on a tiny random Llama: the steps' prefixes, the composed forward, the
tuned library's folder, reuse, resume and a rebuilt source."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from hfx.cartridges.composition import load_prefix
from hfx.cartridges.library import CartridgeLibrary, build_library
from hfx.cartridges.library_tuning import (
    TUNING_DIR,
    DocumentGroupCollator,
    DocumentGroups,
    LibraryTuner,
    LibraryTuningArguments,
    MixedCartridges,
    document_groups,
    tune_library,
    tuning_layout,
)
from hfx.cartridges.prefix import PrefixKV, forward_with_prefix
from hfx.checkpoints import checkpoints
from tests.cartridges.test_library import DOCUMENTS, tiny_settings, write_documents


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_model_dir):
    """A library of three documents whose cartridges were trained alone."""
    root = tmp_path_factory.mktemp("tuning")
    docs = write_documents(root / "docs", DOCUMENTS)
    build_library([str(docs)], root / "lib", tiny_settings(tiny_model_dir, distractors="none"), tune_epochs=0)
    return root / "lib"


def tuning_args(tmp_path, **kwargs) -> LibraryTuningArguments:
    defaults = {"conversations_per_step": 2, "save_steps": 1, "logging_steps": 1, "learning_rate": 5e-2}
    return LibraryTuningArguments(str(tmp_path / "unused"), **{**defaults, **kwargs})


def heads_of(adapter_dir) -> int:
    from peft import PeftConfig

    return PeftConfig.from_pretrained(str(adapter_dir)).num_attention_heads


def embeddings_of(folder) -> dict[str, torch.Tensor]:
    library = CartridgeLibrary(folder)
    return {
        d: load_file(library.cartridge_dir(d) / "adapter_model.safetensors")["prompt_embeddings"]
        for d in library.ids
    }


def test_groups_take_every_conversation_once_and_layouts_hold_the_document_once():
    sizes = [5, 3, 8]
    groups = document_groups(sizes, 2, seed=0)
    assert groups == document_groups(sizes, 2, seed=0)
    for document, size in enumerate(sizes):
        rows = [r for d, group in groups if d == document for r in group]
        assert sorted(rows) == list(range(size))
    assert all(len(group) <= 2 for _, group in groups)
    counts, places = Counter(), Counter()
    for step in range(400):
        order = tuning_layout(4, 2, max_others=3, seed=0, step=step)
        assert order == tuning_layout(4, 2, max_others=3, seed=0, step=step)
        assert order.count(2) == 1 and len(set(order)) == len(order) and set(order) <= {0, 1, 2, 3}
        counts[len(order) - 1] += 1
        places[order.index(2)] += 1
    assert set(counts) == {0, 1, 2, 3}  # every count of others is drawn
    assert len(places) == 4  # and the document's place changes
    assert max(len(tuning_layout(8, 0, max_others=2, seed=1, step=s)) for s in range(100)) == 3


def test_the_composed_forward_is_the_composition_of_the_saved_cartridges(source, tiny_model_dir):
    from hfx.models import load_model

    model = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    library = CartridgeLibrary(source)
    dirs = [library.cartridge_dir(d) for d in library.ids]
    embeddings = [load_file(d / "adapter_model.safetensors")["prompt_embeddings"] for d in dirs]
    student = MixedCartridges(model, embeddings, heads_of(dirs[0]))
    assert set(student.state_dict()) == {f"{part}.{i}" for part in ("frozen", "trainable") for i in range(3)}
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    order = [2, 0]
    out = student(input_ids=ids, attention_mask=mask, order=order, use_cache=False)
    composed = PrefixKV.concat([load_prefix(dirs[i], dtype=model.dtype) for i in order])
    with torch.no_grad():
        expected = forward_with_prefix(model, composed, ids, mask, use_cache=False)
    torch.testing.assert_close(out.logits[mask.bool()], expected.logits[mask.bool()], atol=1e-5, rtol=1e-5)
    out.logits[mask.bool()].square().mean().backward()
    grads = [p.grad for p in student.trainable]
    assert grads[1] is None  # not in the prefix
    assert grads[0].abs().sum() > 0 and grads[2].abs().sum() > 0
    assert all(p.grad is None for p in student.frozen)


def test_each_training_batch_sits_behind_its_steps_layout(source, tiny_model_dir, tmp_path, tokenizer):
    from hfx.cartridges.library_tuning import synthesis_dir
    from hfx.cartridges.synthesis import load_synthesis
    from hfx.models import load_model

    model = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    library = CartridgeLibrary(source)
    datasets = [load_synthesis(synthesis_dir(library, d)) for d in library.documents]
    embeddings = [
        load_file(library.cartridge_dir(d) / "adapter_model.safetensors")["prompt_embeddings"]
        for d in library.ids
    ]
    student = MixedCartridges(model, embeddings, heads_of(library.cartridge_dir(library.ids[0])))
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["past_key_values"].get_seq_length()), with_kwargs=True
    )
    args = LibraryTuningArguments(str(tmp_path / "t"), conversations_per_step=2, max_steps=4, max_others=2)
    groups = document_groups([len(d) for d in datasets], 2, seed=args.seed)
    trainer = LibraryTuner(
        model=student,
        args=args,
        train_dataset=DocumentGroups(datasets, groups),
        data_collator=DocumentGroupCollator(tokenizer.pad_token_id),
        num_documents=3,
    )
    orders = []
    forward = trainer.student_forward

    def record(model, inputs):
        out = forward(model, inputs)
        orders.append((int(inputs["document"]), trainer.state.global_step, trainer.last_order))
        return out

    trainer.student_forward = record
    trainer.train()
    assert len(orders) == 4
    sizes = [d.num_virtual_tokens for d in library.documents]
    for (document, step, order), tokens in zip(orders, seen, strict=True):
        assert order == tuning_layout(3, document, 2, args.seed, step)
        assert tokens == sum(sizes[i] for i in order)


def test_tuning_writes_a_library_that_loads_and_differs_and_a_rerun_reuses_it(
    source, tiny_model_dir, tmp_path
):
    out = tmp_path / "tuned"
    caller = tuning_args(tmp_path, max_steps=3)
    report = tune_library(source, out, caller)
    assert caller.output_dir == str(tmp_path / "unused")  # the caller's arguments are left alone
    assert report.status == "new" and report.steps == 3
    tuned = CartridgeLibrary(out)
    manifest = json.loads((out / "library.json").read_text())
    assert manifest["tuning"]["steps"] == 3 and manifest["tuning"]["source"] == str(source)
    assert tuned.ids == CartridgeLibrary(source).ids
    before, after = embeddings_of(source), embeddings_of(out)
    for doc in tuned.ids:
        assert after[doc].shape == before[doc].shape
        assert torch.equal(after[doc][:1], before[doc][:1])  # the attention sink stays
        assert not torch.allclose(after[doc], before[doc])
        assert tuned.text(doc) == CartridgeLibrary(source).text(doc)
    assert checkpoints(out / TUNING_DIR) == []  # a finished tuning keeps the cartridges, not the checkpoints
    assert tuned.route(["When was the Zorblat protocol designed?"], k=1)[0][0][0] == "zorblat.txt"

    from hfx.cartridges.library import push_library_to_hub

    shared = push_library_to_hub(out, "someone/tuned", dry_run_dir=tmp_path / "upload")["folder"]
    assert (
        CartridgeLibrary(shared).manifest["tuning"]["steps"] == 3
    )  # a shared tuned library loads and routes
    assert (
        CartridgeLibrary(shared).route(["When was the Zorblat protocol designed?"], k=1)[0][0][0]
        == "zorblat.txt"
    )
    torch.testing.assert_close(embeddings_of(shared)["zorblat.txt"], after["zorblat.txt"])

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = tune_library(source, out, tuning_args(tmp_path, max_steps=3))
    assert again.status == "done" and again.steps == 3
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == mtimes

    with pytest.raises(ValueError, match="tuned library"):
        build_library(
            [str(source.parent / "docs")],
            out,
            tiny_settings(tiny_model_dir, distractors="none"),
            tune_epochs=0,
        )
    with pytest.raises(ValueError, match="learning_rate"):  # other settings into the same folder: refused
        tune_library(source, out, tuning_args(tmp_path, max_steps=3, learning_rate=1e-3))


def test_a_killed_tuning_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_one_does(
    source, tmp_path, monkeypatch
):
    whole = tune_library(source, tmp_path / "whole", tuning_args(tmp_path, max_steps=4))
    assert whole.steps == 4

    from hfx.cartridges import library_tuning

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the library was written")

    monkeypatch.setattr(library_tuning, "_write_tuned_library", killed)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        tune_library(source, out, tuning_args(tmp_path, max_steps=4))
    with pytest.raises((FileNotFoundError, ValueError)):
        CartridgeLibrary(out)  # nothing that looks finished
    kept = checkpoints(out / TUNING_DIR)
    assert [step for step, _ in kept] == [3, 4]
    shutil.rmtree(kept[-1][1])  # as if killed after step 3's checkpoint
    monkeypatch.undo()
    resumed = tune_library(source, out, tuning_args(tmp_path, max_steps=4))
    assert resumed.status == "resume" and resumed.steps == 4
    state = json.loads((out / TUNING_DIR / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e][:1] == [
        1
    ]  # the curve from before the kill
    a, b = embeddings_of(tmp_path / "whole"), embeddings_of(out)
    for doc in a:
        torch.testing.assert_close(a[doc], b[doc], atol=1e-5, rtol=1e-4)
    # killed after library.json was written but before the stage's marker: not taken for a finished library
    (out / "hfx_stage_library-tuning.done").unlink()
    with pytest.raises(ValueError, match="has not finished"):
        CartridgeLibrary(out)


def test_a_rebuilt_source_cartridge_tunes_again(source, tmp_path):
    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    out = tmp_path / "tuned"
    tune_library(copy, out, tuning_args(tmp_path, max_steps=1))
    library = CartridgeLibrary(copy)
    weights = library.cartridge_dir(library.ids[0]) / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["prompt_embeddings"] = tensors["prompt_embeddings"] * 1.01
    from safetensors.torch import save_file

    save_file(tensors, str(weights))
    report = tune_library(copy, out, tuning_args(tmp_path, max_steps=1))
    assert report.status == "new"


def test_a_downloaded_library_without_synthesis_is_refused_clearly(source, tmp_path):
    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    library = CartridgeLibrary(copy)
    shutil.rmtree(copy / library.documents[1].cartridge.rsplit("/", 1)[0] / "synthesis")
    with pytest.raises(FileNotFoundError, match=f"no synthesized conversations for {library.ids[1]}"):
        tune_library(copy, tmp_path / "tuned", tuning_args(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match="folder of its own"):
        tune_library(copy, copy, tuning_args(tmp_path, max_steps=1))


def test_a_launch_of_several_processes_is_refused_before_any_work(source, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one process"):
        tune_library(source, tmp_path / "tuned", tuning_args(tmp_path, max_steps=1))
    assert not (tmp_path / "tuned").exists()


def test_the_tune_command_runs_and_reruns(source, tmp_path, capsys):
    from hfx.cli import main

    out = tmp_path / "cli"
    argv = [
        "cartridge",
        "library",
        "tune",
        "--library",
        str(source),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
    ]
    argv += ["--conversations_per_step", "2"]
    main(argv)
    assert "tuned library in" in capsys.readouterr().out
    main(argv)
    assert "up to date (2 steps" in capsys.readouterr().out


def test_build_tunes_by_default_and_the_library_serves_the_tuned_cartridges(
    source, tmp_path, tiny_model_dir, monkeypatch
):
    """`build` tunes the cartridges together into LIB/tuned once they are all trained, and LIB serves them; a rerun
    reuses the tuning; a changed document is retrained and retuned, and until it is retuned the library names no
    tuning (it serves the current cartridges trained alone)."""
    from hfx.cartridges import library_tuning
    from hfx.cartridges.library import push_library_to_hub

    lib = tmp_path / "lib"
    shutil.copytree(source, lib)
    docs = write_documents(tmp_path / "docs", DOCUMENTS)
    settings = tiny_settings(tiny_model_dir, distractors="none")

    first = build_library([str(docs)], lib, settings)  # the defaults: tuned together, 2 epochs
    assert first.trained == {} and first.tuning.status == "new"
    assert first.tuning.steps == 2 * 3  # one group of 4 conversations per document and epoch
    assert json.loads((lib / "library.json").read_text())["tuned"] == "tuned"
    served, alone = CartridgeLibrary(lib), CartridgeLibrary(lib, tuned=False)
    assert served.folder == lib / "tuned" and alone.folder == lib and served.ids == alone.ids
    assert served.manifest["tuning"]["steps"] == 6 and served.manifest["tuning"]["source"] == str(lib)
    tuned_embeddings, alone_embeddings = embeddings_of(lib), embeddings_of(source)
    for doc in served.ids:
        assert not torch.allclose(tuned_embeddings[doc], alone_embeddings[doc])
    torch.testing.assert_close(embeddings_of(lib / "tuned"), tuned_embeddings)
    shared = push_library_to_hub(lib, "someone/lib", dry_run_dir=tmp_path / "upload")["folder"]
    torch.testing.assert_close(
        embeddings_of(shared), tuned_embeddings
    )  # what a library pushes is what it serves

    mtimes = {p: p.stat().st_mtime_ns for p in (lib / "tuned").rglob("*.safetensors")}
    again = build_library([str(docs)], lib, settings)
    assert again.trained == {} and again.tuning.status == "done"
    assert {p: p.stat().st_mtime_ns for p in (lib / "tuned").rglob("*.safetensors")} == mtimes

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the tuning killed as it starts, after the changed document was retrained

    (docs / "kelvara.md").write_text(DOCUMENTS["kelvara.md"] + "It was first described in 1911.")
    monkeypatch.setattr(library_tuning, "tune_library", killed)
    with pytest.raises(KeyboardInterrupt):
        build_library([str(docs)], lib, settings)
    assert "tuned" not in json.loads((lib / "library.json").read_text())
    assert CartridgeLibrary(lib).folder == lib and "1911" in CartridgeLibrary(lib).text("kelvara.md")
    monkeypatch.undo()
    retuned = build_library([str(docs)], lib, settings)
    assert (
        retuned.trained == {} and retuned.tuning.status == "new"
    )  # the kelvara cartridge changed: tuned again
    assert (
        "1911" in CartridgeLibrary(lib).text("kelvara.md") and CartridgeLibrary(lib).folder == lib / "tuned"
    )

    untuned = build_library([str(docs)], lib, settings, tune_epochs=0)
    assert untuned.tuning is None and CartridgeLibrary(lib).folder == lib
    assert build_library([str(docs)], lib, settings).tuning.status == "done"  # the tuning was kept
    assert CartridgeLibrary(lib).folder == lib / "tuned"


def test_a_library_naming_a_tuning_of_other_documents_is_refused(source, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(source, lib)
    tune_library(lib, lib / "tuned", tuning_args(tmp_path, max_steps=1))
    manifest = json.loads((lib / "library.json").read_text())
    (lib / "library.json").write_text(json.dumps({**manifest, "tuned": "tuned"}))
    assert CartridgeLibrary(lib).folder == lib / "tuned"
    tuned_manifest = json.loads((lib / "tuned" / "library.json").read_text())
    tuned_manifest["documents"][0]["text_sha256"] = "0" * 64
    (lib / "tuned" / "library.json").write_text(json.dumps(tuned_manifest))
    with pytest.raises(ValueError, match="not the tuning of .* current documents"):
        CartridgeLibrary(lib)
    assert CartridgeLibrary(lib, tuned=False).folder == lib
