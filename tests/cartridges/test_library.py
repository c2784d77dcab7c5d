"""A cartridge library on a tiny random Llama: the manifest, rebuilds, a killed build, distractor mixing, routing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from hfx.cartridges import library as library_module
from hfx.cartridges.composition import load_prefix, save_prefix
from hfx.cartridges.library import (
    CALIBRATION_QUESTIONS,
    LIBRARY_FILE,
    ROUTERS,
    CartridgeLibrary,
    LibrarySettings,
    build_library,
    document_slug,
    document_title,
    leave_launch,
    process_device,
)
from hfx.cartridges.prefix import PrefixKV
from hfx.cartridges.synthesis import SynthesisConfig
from hfx.cartridges.training import DistractorMixer, distractor_layout, expected_distractor_tokens

DOCUMENTS = {
    "zorblat.txt": "The Zorblat protocol was designed in 1987 by Mara Quell at the Ostrava Institute. " * 6,
    "kelvara.md": "# Kelvara moss\n\nKelvara moss grows only on basalt cliffs above the northern fjords of Tarsk. "
    * 6,
    "quintessa.txt": "Quintessa is a harbour town whose lighthouse burns whale oil every winter solstice. "
    * 6,
}
TINY = {
    "synthesis": {
        "num_conversations": 4,
        "conversations_per_chunk": 2,
        "chunk_min_tokens": 20,
        "chunk_max_tokens": 40,
        "max_question_tokens": 4,
        "max_answer_tokens": 4,
    },
    "training": {"num_virtual_tokens": 8, "num_train_epochs": 1, "per_device_train_batch_size": 2},
}


def tiny_settings(model_dir: Path, distractors: str = "initial") -> LibrarySettings:
    return LibrarySettings(
        model_name_or_path=str(model_dir),
        synthesis=dict(TINY["synthesis"]),
        training=dict(TINY["training"]),
        distractors=distractors,
    )


def write_documents(folder: Path, documents: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in documents.items():
        (folder / name).write_text(text)
    return folder


def mtimes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")  # the build's lock file
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    """A library of the three documents, built once for the module's reading tests."""
    root = tmp_path_factory.mktemp("library")
    docs = write_documents(root / "docs", DOCUMENTS)
    report = build_library([str(docs)], root / "lib", tiny_settings(tiny_model_dir), tune_epochs=0)
    return {"root": root, "docs": docs, "lib": root / "lib", "report": report}


def test_build_writes_a_manifest_of_every_document(built):
    report, lib = built["report"], built["lib"]
    assert report.trained == {"kelvara.md": "new", "quintessa.txt": "new", "zorblat.txt": "new"}
    manifest = json.loads((lib / LIBRARY_FILE).read_text())
    assert manifest["pending"] == [] and manifest["num_documents"] == 3
    by_id = {d["id"]: d for d in manifest["documents"]}
    assert set(by_id) == set(DOCUMENTS)
    kelvara = by_id["kelvara.md"]
    assert kelvara["title"] == "Kelvara moss"
    assert kelvara["num_virtual_tokens"] == 8 and kelvara["num_tokens"] > 60
    assert (lib / kelvara["document"]).read_text() == DOCUMENTS["kelvara.md"].strip()
    assert (lib / kelvara["cartridge"] / "adapter_model.safetensors").is_file()
    assert (lib / kelvara["initial"] / "adapter_model.safetensors").is_file()
    assert len({d["settings_fingerprint"] for d in by_id.values()}) == 1  # one p for all: the same settings
    assert len({d["text_sha256"] for d in by_id.values()}) == 3
    # each cartridge was trained beside the other two documents' initial cartridges
    stage = json.loads((lib / kelvara["cartridge"] / "hfx_stage_cartridge.json").read_text())
    assert len(stage["inputs"]["distractors"]) == 2 and stage["settings"]["max_distractors"] == 7


def test_rebuild_trains_only_changed_documents_and_removes_the_missing(built, tmp_path, tiny_model_dir):
    lib = tmp_path / "lib"
    shutil.copytree(built["lib"], lib)
    docs = write_documents(tmp_path / "docs", DOCUMENTS)
    before = mtimes(lib)

    unchanged = build_library([str(docs)], lib, tiny_settings(tiny_model_dir), tune_epochs=0)
    assert unchanged.trained == {} and sorted(unchanged.kept) == sorted(DOCUMENTS) and unchanged.removed == []
    assert {k: v for k, v in mtimes(lib).items() if k != LIBRARY_FILE} == {
        k: v for k, v in before.items() if k != LIBRARY_FILE
    }

    (docs / "kelvara.md").write_text(DOCUMENTS["kelvara.md"] + "It was first described in 1911.")
    (docs / "quintessa.txt").unlink()
    zorblat_before = {k: v for k, v in mtimes(lib).items() if k.startswith("cartridges/zorblat.txt/")}
    changed = build_library([str(docs)], lib, tiny_settings(tiny_model_dir), tune_epochs=0)
    assert changed.trained == {"kelvara.md": "its text changed"}
    assert changed.kept == ["zorblat.txt"] and changed.removed == ["quintessa.txt"]
    assert not (lib / "cartridges" / "quintessa.txt").exists()
    assert not (lib / "initial" / "quintessa.txt").exists()
    assert not (lib / "documents" / "quintessa.txt.txt").exists()
    assert {k: v for k, v in mtimes(lib).items() if k.startswith("cartridges/zorblat.txt/")} == zorblat_before
    manifest = json.loads((lib / LIBRARY_FILE).read_text())
    assert sorted(d["id"] for d in manifest["documents"]) == ["kelvara.md", "zorblat.txt"]
    kelvara = next(d for d in manifest["documents"] if d["id"] == "kelvara.md")
    assert "1911" in (lib / kelvara["document"]).read_text()

    other = tiny_settings(tiny_model_dir)
    other.training["learning_rate"] = 1e-2
    retrained = build_library([str(docs)], lib, other, tune_epochs=0)
    assert retrained.trained == {"kelvara.md": "its settings changed", "zorblat.txt": "its settings changed"}


def test_a_killed_build_keeps_what_finished_and_resumes(tmp_path, tiny_model_dir, monkeypatch):
    docs = write_documents(tmp_path / "docs", DOCUMENTS)
    lib = tmp_path / "lib"
    from hfx.cartridges import pipeline

    real_run = pipeline.run_self_study
    calls = []

    def killed_on_the_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill in the middle of the second document
        return real_run(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_self_study", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        build_library([str(docs)], lib, tiny_settings(tiny_model_dir, distractors="none"), tune_epochs=0)
    manifest = json.loads((lib / LIBRARY_FILE).read_text())
    assert [d["id"] for d in manifest["documents"]] == ["kelvara.md"]
    assert manifest["pending"] == ["quintessa.txt", "zorblat.txt"]
    assert CartridgeLibrary(lib).ids == ["kelvara.md"]  # usable with what finished

    monkeypatch.setattr(pipeline, "run_self_study", real_run)
    resumed = build_library(
        [str(docs)], lib, tiny_settings(tiny_model_dir, distractors="none"), tune_epochs=0
    )
    assert resumed.trained == {"quintessa.txt": "unfinished", "zorblat.txt": "new"}
    assert resumed.kept == ["kelvara.md"]
    assert json.loads((lib / LIBRARY_FILE).read_text())["pending"] == []


def test_processes_share_the_documents(tmp_path, tiny_model_dir):
    docs = write_documents(tmp_path / "docs", DOCUMENTS)
    lib = tmp_path / "lib"
    settings = tiny_settings(tiny_model_dir, distractors="none")
    second = build_library([str(docs)], lib, settings, process_index=1, num_processes=2, tune_epochs=1)
    assert list(second.trained) == ["quintessa.txt"]  # documents 1, 3, ... of the sorted folder
    assert second.tuning is None  # the first process tunes
    assert json.loads((lib / LIBRARY_FILE).read_text())["pending"] == ["kelvara.md", "zorblat.txt"]
    first = build_library([str(docs)], lib, settings, process_index=0, num_processes=2, tune_epochs=1)
    assert sorted(first.trained) == ["kelvara.md", "zorblat.txt"]
    assert first.tuning.status == "new" and first.tuning.steps == 3  # all three, once every one was trained
    manifest = json.loads((lib / LIBRARY_FILE).read_text())
    assert manifest["pending"] == [] and manifest["tuned"] == "tuned"


def test_leave_launch_takes_the_launchers_variables():
    environ = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "PATH": "/bin"}
    assert leave_launch(environ) == (3, 4, 1)
    assert environ == {"PATH": "/bin"}
    assert leave_launch({}) == (0, 1, 0)


def test_each_process_of_a_launch_is_narrowed_to_its_own_gpu():
    # a launch's processes, after leave_launch: each one sees only its GPU, round robin over the visible ones
    for local_index, expected in [(0, "0"), (1, "1"), (2, "0")]:
        environ = {}
        assert process_device(None, 3, local_index, environ, device_count=2) == "cuda:0"
        assert environ == {"CUDA_VISIBLE_DEVICES": expected}
    environ = {"CUDA_VISIBLE_DEVICES": "3, 5"}  # the visible ones, as the user narrowed them
    assert process_device("cuda", 2, 1, environ) == "cuda:0" and environ["CUDA_VISIBLE_DEVICES"] == "5"
    # a single process asked for cuda:N trains there, not on Trainer's first GPU
    environ = {"CUDA_VISIBLE_DEVICES": "3,5,6"}
    assert process_device("cuda:2", 1, 0, environ) == "cuda:0" and environ["CUDA_VISIBLE_DEVICES"] == "6"
    with pytest.raises(ValueError, match="sees 3 GPU"):
        process_device("cuda:3", 1, 0, {"CUDA_VISIBLE_DEVICES": "3,5,6"})
    # nothing to narrow: the CPU, no GPU, a single process without an index
    for device, num_processes, environ, count in [
        ("cpu", 2, {}, 4),
        (None, 2, {}, 0),
        (None, 2, {"CUDA_VISIBLE_DEVICES": ""}, 4),
        (None, 1, {}, 4),
        ("cuda", 1, {}, 4),
    ]:
        kept = dict(environ)
        assert process_device(device, num_processes, 1, environ, device_count=count) == device
        assert environ == kept
    environ = {"ACCELERATE_USE_CPU": "True"}  # `accelerate launch --cpu` on a machine with GPUs
    assert (
        process_device(None, 2, 1, environ, device_count=4) == "cpu" and "CUDA_VISIBLE_DEVICES" not in environ
    )
    with pytest.raises(ValueError, match="first visible GPU"):
        build_library([], "unused", device="cuda:1")


def test_a_process_whose_cuda_is_initialized_is_not_narrowed(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="already initialized"):
        process_device(None, 2, 1, device_count=2)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_slugs_titles_and_duplicate_ids(tmp_path):
    assert document_slug("rcv1") == "rcv1"
    assert document_slug("a/b c.txt") != document_slug("a_b c.txt")
    assert "/" not in document_slug("a/b c.txt")
    assert document_title("x", ".. _iris_dataset:\n\nIris plants dataset\n--------------------\n") == (
        "Iris plants dataset"
    )
    one, two = tmp_path / "one", tmp_path / "two"
    write_documents(one, {"same.txt": "first text"})
    write_documents(two, {"same.txt": "second text"})
    with pytest.raises(ValueError, match="same.txt"):
        library_module.collect_documents([str(one), str(two)])


# -- distractor mixing --------------------------------------------------------------------------------------------


def test_distractor_layout_is_a_function_of_seed_and_step():
    layouts = [distractor_layout(5, 3, seed=0, step=step) for step in range(200)]
    assert layouts == [distractor_layout(5, 3, seed=0, step=step) for step in range(200)]
    assert layouts != [distractor_layout(5, 3, seed=1, step=step) for step in range(200)]
    counts = {len(indices) for indices, _ in layouts}
    assert counts == {0, 1, 2, 3}  # 0 to max_distractors, all of them drawn
    for indices, place in layouts:
        assert len(set(indices)) == len(indices) and all(0 <= i < 5 for i in indices)
        assert 0 <= place <= len(indices)
    assert {place for indices, place in layouts if len(indices) == 3} == {0, 1, 2, 3}


def test_the_expected_distractor_tokens_are_the_mean_of_the_drawn_layouts():
    lengths = [10, 20, 30, 45, 70]
    for max_distractors in (0, 1, 3, 7):
        drawn = [
            sum(lengths[i] for i in distractor_layout(len(lengths), max_distractors, seed=0, step=step)[0])
            for step in range(4000)
        ]
        expected = expected_distractor_tokens(lengths, max_distractors)
        assert expected == pytest.approx(sum(drawn) / len(drawn), rel=0.05, abs=0.5)
    assert expected_distractor_tokens(lengths, 7) == 88  # 0 to all 5 of them: 2.5 x 35 tokens on average
    assert expected_distractor_tokens([], 7) == 0


def random_prefix(model, tokens: int, seed: int) -> PrefixKV:
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    shape = (1, config.num_key_value_heads, tokens, config.hidden_size // config.num_attention_heads)
    layers = range(config.num_hidden_layers)
    return PrefixKV(
        [torch.randn(shape, generator=generator) for _ in layers],
        [torch.randn(shape, generator=generator) for _ in layers],
    )


def test_save_prefix_round_trips_as_a_peft_cartridge(tiny_model, tmp_path):
    from peft import PeftModel

    prefix = random_prefix(tiny_model, 5, seed=0)
    save_prefix(prefix, tmp_path / "c", base_model="tiny")
    loaded = load_prefix(tmp_path / "c")
    for a, b in zip(prefix.keys + prefix.values, loaded.keys + loaded.values, strict=True):
        torch.testing.assert_close(a, b)
    peft_model = PeftModel.from_pretrained(tiny_model, str(tmp_path / "c"))
    from_peft = PrefixKV.from_peft_model(peft_model)
    torch.testing.assert_close(from_peft.keys[1], prefix.keys[1])
    torch.testing.assert_close(from_peft.values[0], prefix.values[0])


def test_the_training_batch_holds_the_expected_prefixes(tiny_model, tokenizer, tmp_path):
    """Each step's forward sees the step's distractors before and after the trained cartridge, in the drawn order,
    with the attention mask widened to all of them; gradients reach the trained cartridge."""
    from datasets import Dataset

    from hfx.cartridges.corpus import Corpus
    from hfx.cartridges.training import (
        CartridgeCollator,
        CartridgeTrainer,
        CartridgeTrainingArguments,
        create_cartridge,
    )

    text = DOCUMENTS["zorblat.txt"]
    corpus = Corpus("zorblat", text, tokenizer(text, add_special_tokens=False)["input_ids"])
    peft_model = create_cartridge(tiny_model, tokenizer, corpus, 6, initialization="first_tokens")
    distractors = [random_prefix(tiny_model, n, seed=n) for n in (3, 4, 5)]
    rows = []
    for i in range(8):
        ids = tokenizer(f"question {i} about zorblat answer", add_special_tokens=False)["input_ids"]
        k = 4
        rows.append(
            {
                "input_ids": ids,
                "answer_start": len(ids) - 2,
                "topk_token_ids": [[(i + j) % 100 for j in range(k)] for _ in range(2)],
                "topk_logprobs": [[-1.0 - j for j in range(k)] for _ in range(2)],
            }
        )
    args = CartridgeTrainingArguments(
        output_dir=str(tmp_path / "out"),
        num_virtual_tokens=6,
        per_device_train_batch_size=2,
        max_steps=6,
        save_strategy="no",
        use_cpu=True,
        max_distractors=3,
        seed=3,
    )
    trainer = CartridgeTrainer(
        model=peft_model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=CartridgeCollator(tokenizer.pad_token_id),
        distractors=distractors,
    )
    seen = []

    def capture(module, call_args, kwargs):
        own = PrefixKV.from_peft_model(peft_model)
        cache = PrefixKV.from_cache(kwargs["past_key_values"])
        seen.append((trainer.state.global_step, own, cache, kwargs["attention_mask"].clone()))

    handle = peft_model.get_base_model().register_forward_pre_hook(capture, with_kwargs=True)
    start = PrefixKV.from_peft_model(peft_model).values[0].clone()
    try:
        trainer.train()
    finally:
        handle.remove()
    assert len(seen) == 6
    mixed_steps = 0
    for step, own, cache, mask in seen:
        indices, place = distractor_layout(3, 3, seed=3, step=step)
        order = [*indices[:place], None, *indices[place:]]
        expected = PrefixKV.concat([own if i is None else distractors[i] for i in order])
        assert cache.num_tokens == expected.num_tokens
        for layer in range(len(expected.keys)):
            torch.testing.assert_close(cache.keys[layer], expected.keys[layer])
            torch.testing.assert_close(cache.values[layer], expected.values[layer])
        assert mask.shape[1] - cache.num_tokens > 0 and bool(mask[:, : cache.num_tokens].all())
        mixed_steps += bool(indices)
    assert mixed_steps >= 2
    assert not torch.equal(
        PrefixKV.from_peft_model(peft_model).values[0], start
    )  # it learned through the mix


# -- routing and answering ----------------------------------------------------------------------------------------


def test_bm25_routes_a_quoting_question_to_its_document(built):
    library = CartridgeLibrary(built["lib"])
    routed = library.route(
        ["Where does Kelvara moss grow?", "What does the lighthouse of Quintessa burn?"], k=2
    )
    assert [r[0][0] for r in routed] == ["kelvara.md", "quintessa.txt"]
    assert all(len(r) == 2 and r[0][1] >= r[1][1] for r in routed)


def test_likelihood_router_ranks_by_the_questions_likelihood_after_each_cartridge(built, tiny_model_dir):
    from hfx.cartridges.corpus import user_turn_ids
    from hfx.cartridges.prefix import forward_with_prefix
    from hfx.models import load_causal_lm

    library = CartridgeLibrary(built["lib"])
    model, tokenizer = load_causal_lm(str(tiny_model_dir), device="cpu", dtype="float32")
    question = "Who designed the Zorblat protocol?"
    scores = library.likelihoods([question], model, tokenizer)[0]
    ids = torch.tensor([user_turn_ids(tokenizer, question, after_system=False)])
    for j, doc_id in enumerate(library.ids):
        prefix = load_prefix(library.cartridge_dir(doc_id))
        logits = forward_with_prefix(model, prefix, ids, torch.ones_like(ids)).logits
        expected = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).mean().item()
        assert scores[j] == pytest.approx(expected, abs=1e-4)
    assert (
        library.cache_stats()["misses"] == 3 and library.cache_stats()["hits"] == 0
    )  # each cartridge read once
    ranked = library.route([question], k=3, router="likelihood", model=model, tokenizer=tokenizer)[0]
    assert library.cache_stats()["hits"] == 3
    assert [doc for doc, _ in ranked] == [library.ids[j] for j in sorted(range(3), key=lambda j: -scores[j])]

    # calibrated: minus each cartridge's mean likelihood of the content-free questions
    bias = library.likelihood_bias(model, tokenizer)
    calibration = library.likelihoods(list(CALIBRATION_QUESTIONS), model, tokenizer)
    assert bias == pytest.approx([sum(column) / len(column) for column in zip(*calibration, strict=True)])
    calibrated = library.route(
        [question], k=3, router="calibrated_likelihood", model=model, tokenizer=tokenizer
    )
    assert calibrated[0] == [
        (library.ids[j], pytest.approx(scores[j] - bias[j]))
        for j in sorted(range(3), key=lambda j: -(scores[j] - bias[j]))
    ]
    given = library.route([question], k=3, router="likelihood", model=model, tokenizer=tokenizer,
                          likelihoods=[[0.0, 1.0, 0.5]])  # fmt: skip
    assert [doc for doc, _ in given[0]] == [library.ids[1], library.ids[2], library.ids[0]]
    with pytest.raises(ValueError, match="questions"):
        library.route([question], router="likelihood", model=model, tokenizer=tokenizer, likelihoods=[[0.0]])


def test_ask_answers_with_the_routed_cartridges(built, tiny_model_dir, capsys):
    from hfx.cli import main

    main(
        [
            "cartridge", "library", "ask", str(built["lib"]), "Where does Kelvara moss grow?",
            "--k", "2", "--max_new_tokens", "4", "--json", "--model_name_or_path", str(tiny_model_dir),
        ]
    )  # fmt: skip
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert answer["cartridges"][0] == "kelvara.md" and len(answer["cartridges"]) == 2
    assert answer["prefix_tokens"] == 16 and answer["router"] == "bm25"
    assert isinstance(answer["text"], str)


def test_a_library_without_a_manifest_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="library build"):
        CartridgeLibrary(tmp_path)
    os.makedirs(tmp_path / "x")
    (tmp_path / "x" / LIBRARY_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CartridgeLibrary(tmp_path / "x")


def test_a_cartridge_trained_beside_distractors_plans_its_steps_with_them(
    tiny_model, tiny_model_dir, tmp_path, caplog
):
    """A budgeted run that mixes distractors times its training step with the average step's distractor tokens
    in front of the cartridge (a library's steps are slower than a lone cartridge's), and its plan says so."""
    import logging

    from hfx.cartridges.budget import read_plan
    from hfx.cartridges.pipeline import run_self_study

    folders = []
    for i, tokens in enumerate((6, 10)):
        save_prefix(random_prefix(tiny_model, tokens, seed=i), tmp_path / f"d{i}")
        folders.append(str(tmp_path / f"d{i}"))
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENTS["quintessa.txt"])
    with caplog.at_level(logging.INFO, logger="hfx.cartridges.pipeline"):
        run_self_study(
            tmp_path / "run",
            str(doc),
            synthesis=SynthesisConfig(**{**TINY["synthesis"], "num_conversations": 10_000}),
            training={**TINY["training"], "distractors": folders, "max_distractors": 2},
            model_name_or_path=str(tiny_model_dir),
            device="cpu",
            budget_minutes=0.25,
        )
    plan = read_plan(tmp_path / "run")
    assert plan.distractor_tokens == 8  # one of the two on average (0, 1 or 2), of 8 tokens on average
    assert "beside 8 distractor tokens" in caplog.text


def test_a_distractor_mixer_leaves_the_forward_alone_without_a_layout(tiny_model, tokenizer):
    from hfx.cartridges.corpus import Corpus
    from hfx.cartridges.training import create_cartridge

    text = DOCUMENTS["quintessa.txt"]
    corpus = Corpus("q", text, tokenizer(text, add_special_tokens=False)["input_ids"])
    peft_model = create_cartridge(tiny_model, tokenizer, corpus, 4, initialization="first_tokens")
    ids = torch.tensor([tokenizer("a question", add_special_tokens=False)["input_ids"]])
    before = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    mixer = DistractorMixer(peft_model, [random_prefix(tiny_model, 3, seed=1)])
    same = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    mixer.layout = ([0], 1)
    mixed = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    mixer.remove()
    torch.testing.assert_close(before, same)
    assert not torch.allclose(before, mixed)


# -- the evaluation table -----------------------------------------------------------------------------------------

QUESTIONS = {
    "zorblat.txt": [
        {
            "question": "Who designed the Zorblat protocol?",
            "choices": ["Mara Quell", "Ivo Brand"],
            "answer": 0,
        },
        {"question": "When was the Zorblat protocol designed?", "choices": ["1987", "1991"], "answer": 0},
    ],
    "kelvara.md": [
        {
            "question": "Where does Kelvara moss grow?",
            "choices": ["on basalt cliffs", "in deserts"],
            "answer": 0,
        },
    ],
    "quintessa.txt": [
        {
            "question": "What does the Quintessa lighthouse burn?",
            "choices": ["whale oil", "coal"],
            "answer": 0,
        },
    ],
}


def test_the_library_table_scores_every_condition(built, tmp_path, tiny_model_dir, monkeypatch):
    from hfx.cartridges.library_evaluation import (
        evaluate_library,
        format_library_table,
        mixed_questions,
        routing_accuracy,
    )
    from hfx.models import load_causal_lm

    alone = build_library(
        [str(built["docs"])],
        tmp_path / "alone",
        tiny_settings(tiny_model_dir, distractors="none"),
        tune_epochs=0,
    )
    questions_dir = tmp_path / "questions"
    questions_dir.mkdir()
    for doc_id, rows in QUESTIONS.items():
        (questions_dir / f"{doc_id}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    libraries = {
        "trained alone": CartridgeLibrary(alone.library),
        "with distractors": CartridgeLibrary(built["lib"]),
    }
    tagged = mixed_questions(libraries["with distractors"], questions_dir, seed=0)
    assert sorted(t.document for t in tagged) == sorted(d for d, rows in QUESTIONS.items() for _ in rows)
    model, tokenizer = load_causal_lm(str(tiny_model_dir), device="cpu", dtype="float32")
    report = evaluate_library(model, tokenizer, tagged, libraries, throughput_batch=2, throughput_tokens=2,
                              progress=False, rows_dir=tmp_path / "rows")  # fmt: skip
    rows = {row["condition"]: row for row in report["rows"]}
    assert len(rows) == 3 + 2 + 2 * (1 + 3 * 2 + 1)  # three routers, k = 1 and 2
    assert rows["no context"]["kv_tokens"] == 0 and rows["no context"]["decode_tokens_per_s"] is None
    assert (
        rows["ICL, 3 of 3 documents that fit"]["kv_tokens"]
        > rows["oracle ICL (the question's document)"]["kv_tokens"]
    )
    for label in libraries:
        assert rows[f"oracle cartridge ({label})"]["kv_tokens"] == 8
        assert rows[f"all 3 cartridges composed ({label})"]["kv_tokens"] == 24
        top1 = rows[f"routed top-1, bm25 ({label})"]
        assert top1["routing_accuracy"] == 1.0 and top1["kv_tokens"] == 8  # the questions name their document
        assert rows[f"routed top-2, likelihood ({label})"]["kv_tokens"] == 16
        assert rows[f"routed top-1, calibrated_likelihood ({label})"]["kv_tokens"] == 8
    rag, rag3 = (
        rows["RAG, BM25 chunks at the routed top-2 KV tokens"],
        rows["RAG, BM25 chunks at the routed top-2 KV tokens x3"],
    )
    assert 0 < rag["context_tokens"] < rag3["context_tokens"]
    for row in rows.values():
        low, high = row["accuracy_interval"]
        assert low <= row["accuracy"] <= high and len(row["correct"]) == len(tagged)
    assert set(report["routing_with_names_masked"]) == {
        "bm25 top-1, names masked",
        "bm25 top-2, names masked",
    }
    table = format_library_table(report)
    assert (
        table.count("\n| ") == len(rows)
        and "4 multiple-choice questions" in table
        and "name their document" in table
    )  # after the header

    # a rerun reads the rows it has (a killed evaluation resumes); other questions make other rows
    import hfx.cartridges.library_evaluation as library_evaluation

    store = tmp_path / "rows" / library_evaluation.ROWS_FOLDER
    files = {json.loads(f.read_text())["condition"]: f for f in store.glob("*.json")}
    assert (
        len(files) == len(rows) and len(list((tmp_path / "rows").glob("likelihoods-*.json"))) == 2
    )  # a library
    files[report["rows"][3]["condition"]].unlink()  # as if killed while scoring the fourth condition
    scored, computed = [], []
    score = library_evaluation.score_per_question
    likelihoods = CartridgeLibrary.likelihoods

    def counted(model, tokenizer, condition, *args, **kwargs):
        scored.append(condition.name)
        return score(model, tokenizer, condition, *args, **kwargs)

    def counted_likelihoods(self, questions, *args, **kwargs):
        computed.append(len(questions))
        return likelihoods(self, questions, *args, **kwargs)

    monkeypatch.setattr(library_evaluation, "score_per_question", counted)
    monkeypatch.setattr(CartridgeLibrary, "likelihoods", counted_likelihoods)
    again = evaluate_library(model, tokenizer, tagged, libraries, throughput_batch=2, throughput_tokens=2,
                             progress=False, rows_dir=tmp_path / "rows")  # fmt: skip
    assert scored == [report["rows"][3]["condition"]]
    assert computed == []  # the questions' likelihoods are read back, the calibration kept by each library
    assert [r["correct"] for r in again["rows"]] == [r["correct"] for r in report["rows"]]

    # a library added to the evaluation scores its own rows only (the others' and RAG's are read back)
    copy = tmp_path / "copy"
    shutil.copytree(alone.library, copy)
    scored.clear()
    evaluate_library(model, tokenizer, tagged, {**libraries, "copy": CartridgeLibrary(copy)}, throughput_batch=2,
                     throughput_tokens=2, progress=False, rows_dir=tmp_path / "rows")  # fmt: skip
    assert scored and all(name.endswith("(copy)") for name in scored) and len(scored) == 1 + 3 * 2 + 1

    # an evaluation of other conditions (one router, k = 1) reads the rows it shares with this one: it scores only
    # RAG at the routed top-1 tokens, its only new conditions
    scored.clear()
    subset = evaluate_library(model, tokenizer, tagged, libraries, throughput_batch=2, throughput_tokens=2,
                              progress=False, rows_dir=tmp_path / "rows", routers=("bm25",), ks=(1,))  # fmt: skip
    rag_top1 = "RAG, BM25 chunks at the routed top-1 KV tokens"
    assert scored == [rag_top1, f"{rag_top1} x3"]
    shared = {r["condition"]: r for r in subset["rows"] if not r["condition"].startswith("RAG")}
    assert shared and all(rows[name]["correct"] == row["correct"] for name, row in shared.items())

    # rows kept by earlier versions, one folder per set of libraries with numbered files, are adopted once
    from hfx.stages import file_fingerprint, fingerprint

    legacy = tmp_path / "rows" / fingerprint({
        "libraries": {label: file_fingerprint(lib.folder / LIBRARY_FILE) for label, lib in libraries.items()},
        "questions": [[t.document, t.question.question, t.question.answer] for t in tagged],
        "model": [str(model.config._name_or_path), str(model.dtype), str(model.device.type)],
        "settings": [2, 2, {}],
    })  # fmt: skip
    legacy.mkdir()
    for index, row in enumerate(report["rows"]):
        (legacy / f"{index:02d}.json").write_text(json.dumps(row) + "\n")
    shutil.rmtree(store)
    scored.clear()
    again = evaluate_library(model, tokenizer, tagged, libraries, throughput_batch=2, throughput_tokens=2,
                             progress=False, rows_dir=tmp_path / "rows")  # fmt: skip
    assert scored == [] and len(list(store.glob("*.json"))) == len(rows)
    assert (legacy / library_evaluation.ADOPTED_MARKER).is_file()  # adopted once: not read again
    assert [r["correct"] for r in again["rows"]] == [r["correct"] for r in report["rows"]]
    evaluate_library(model, tokenizer, tagged[:-1], libraries, throughput_batch=2, throughput_tokens=2,
                     progress=False, rows_dir=tmp_path / "rows")  # fmt: skip
    assert len(scored) == len(rows) and len(list(store.glob("*.json"))) == 2 * len(rows)
    assert (
        len(list((tmp_path / "rows").glob("likelihoods-*.json"))) == 4
    )  # other questions, other likelihoods

    # the routing alone reads the same likelihoods
    computed.clear()
    routing = routing_accuracy(model, tokenizer, tagged, libraries, likelihoods_dir=tmp_path / "rows")
    assert computed == [] and set(routing) == set(libraries)
    for label in libraries:
        assert set(routing[label]) == {f"{r} top-{k}" for r in ROUTERS for k in (1, 2)}
        assert routing[label]["bm25 top-1"] == rows[f"routed top-1, bm25 ({label})"]["routing_accuracy"]
        top2 = rows[f"routed top-2, calibrated_likelihood ({label})"]["routing_accuracy"]
        assert routing[label]["calibrated_likelihood top-2"] == top2


@pytest.mark.integration
def test_accelerate_launch_shares_the_documents_between_processes(tmp_path, tiny_model_dir):
    """Under `accelerate launch` each process trains its own documents alone (one process per cartridge), and the
    manifest ends complete."""
    from tests.launching import ROOT, accelerate_cpu, finish, start

    docs = write_documents(tmp_path / "docs", DOCUMENTS)
    lib = tmp_path / "lib"
    synthesis = [f"--{name}={value}" for name, value in TINY["synthesis"].items()]
    arguments = [
        "cartridge", "library", "build", "--documents", str(docs), "--output_dir", str(lib),
        "--model_name_or_path", str(tiny_model_dir), "--num_virtual_tokens", "8", "--num_train_epochs", "1",
        *synthesis,
    ]  # fmt: skip
    log = tmp_path / "build.log"
    finish(start(accelerate_cpu(ROOT / "src" / "hfx" / "cli.py", 2, arguments), log), log)
    printed = log.read_text()
    trained = sorted(line.split()[1] for line in printed.splitlines() if line.startswith("trained "))
    assert trained == sorted(DOCUMENTS)  # each document once, by one of the two processes
    manifest = json.loads((lib / LIBRARY_FILE).read_text())
    assert manifest["pending"] == [] and len(manifest["documents"]) == 3
    for document in manifest["documents"]:
        metadata = json.loads((lib / document["cartridge"] / "hfx_cartridge.json").read_text())
        assert metadata["num_processes"] == 1  # trained alone, not in one data-parallel job with the other
    # then tuned together by the first process once the other's documents were finished (the default)
    assert manifest["tuned"] == "tuned" and printed.count("cartridges tuned together in") == 1
    assert CartridgeLibrary(lib).manifest["tuning"]["steps"] == 2 * 3


# -- sharing ------------------------------------------------------------------------------------------------------


def test_push_dry_run_writes_a_library_that_loads_and_routes(built, tmp_path, capsys):
    from hfx.cli import main

    main(["cartridge", "library", "push", str(built["lib"]), "--repo_id", "someone/zorblat-library",
          "--dry-run", str(tmp_path / "upload")])  # fmt: skip
    assert "library for https://huggingface.co/someone/zorblat-library" in capsys.readouterr().out
    upload = tmp_path / "upload"
    files = sorted(str(p.relative_to(upload)) for p in upload.rglob("*") if p.is_file())
    assert "library.json" in files and "README.md" in files
    assert not any("synthesis" in f or "checkpoint" in f or f.startswith("initial/") for f in files)
    shared = CartridgeLibrary.from_pretrained(upload)
    assert shared.ids == CartridgeLibrary(built["lib"]).ids
    assert shared.route(["Where does Kelvara moss grow?"], k=1)[0][0][0] == "kelvara.md"
    torch.testing.assert_close(
        load_prefix(shared.cartridge_dir("zorblat.txt")).keys[0],
        load_prefix(CartridgeLibrary(built["lib"]).cartridge_dir("zorblat.txt")).keys[0],
    )
    card = (upload / "README.md").read_text()
    assert "| kelvara.md | Kelvara moss |" in card and "someone/zorblat-library" in card
    assert "cartridge-library" in card
    with pytest.raises(SystemExit, match="not empty"):
        main(
            ["cartridge", "library", "push", str(built["lib"]), "--repo_id", "a/b", "--dry-run", str(upload)]
        )


def test_push_uploads_one_model_repo(built, monkeypatch):
    import huggingface_hub

    from hfx.cartridges.library import push_library_to_hub

    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(repo_id)
    )

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(
            sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        )
        return f"https://huggingface.co/{repo_id}/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    result = push_library_to_hub(built["lib"], "someone/lib", private=True)
    assert result["commit_url"].endswith("/commit/1") and calls[0] == "someone/lib"
    assert "library.json" in calls[1] and any(f.endswith("adapter_model.safetensors") for f in calls[1])


def test_from_pretrained_names_a_missing_library_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="neither a library folder nor a downloadable Hub repo"):
        CartridgeLibrary.from_pretrained("nobody/no-such-library")


def test_a_run_of_other_settings_without_its_entry_is_started_over(tmp_path, tiny_model_dir):
    docs = write_documents(tmp_path / "docs", {"zorblat.txt": DOCUMENTS["zorblat.txt"]})
    lib = tmp_path / "lib"
    build_library([str(docs)], lib, tiny_settings(tiny_model_dir, distractors="none"), tune_epochs=0)
    (
        lib / "cartridges" / "zorblat.txt" / "library_entry.json"
    ).unlink()  # killed before its entry was written
    other = tiny_settings(tiny_model_dir, distractors="none")
    other.training["learning_rate"] = 1e-2
    report = build_library([str(docs)], lib, other, tune_epochs=0)
    assert report.trained == {"zorblat.txt": "unfinished"}
    stage = json.loads(
        (lib / "cartridges" / "zorblat.txt" / "cartridge" / "hfx_stage_cartridge.json").read_text()
    )
    assert stage["settings"]["learning_rate"] == 1e-2
    assert CartridgeLibrary(lib).ids == ["zorblat.txt"]
