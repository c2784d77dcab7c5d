"""Shared fixtures: the real tokenizer, a tiny random-weight Llama for fast tests, and the embedded model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

DATA = Path(__file__).parent / "data"


def pytest_collection_modifyitems(config, items):
    skip_heavy = pytest.mark.skip(reason="heavy: set HFX_RUN_HEAVY=1 to run")
    skip_gpu = pytest.mark.skip(reason="gpu: needs a CUDA device")
    run_heavy = os.environ.get("HFX_RUN_HEAVY") == "1"
    for item in items:
        if "heavy" in item.keywords and not run_heavy:
            item.add_marker(skip_heavy)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A small real chat tokenizer trained on bundled text: no download, no embedded model. The GPU tests build
    random-weight models around it, since the embedded model's weights do not travel to a GPU machine."""
    from hfx.tokenization import small_chat_tokenizer

    return small_chat_tokenizer()


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from hfx import embedded

    return embedded.embedded_model_path()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


def make_tiny_llama(tokenizer, layers: int = 2, hidden: int = 64, seed: int = 0, init_std: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        initializer_range=init_std,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_llama(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama saved as a checkpoint with the real tokenizer, for end-to-end CLI tests."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def embedded_model(embedded_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()


#: The tiny study's document: one made-up fact, repeated, so that a tiny model has something to learn from it.
ZORBLAT = "The Zorblat protocol was designed in 1987 by Mara Quell at the Ostrava Institute. " * 10
ZORBLAT_QUESTIONS = [
    {"question": "Who designed the Zorblat protocol?", "choices": ["Mara Quell", "Ivo Brand"], "answer": 0},
    {"question": "When was it designed?", "choices": ["1987", "1991", "2003"], "answer": 0},
]


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory, tiny_model_dir) -> dict:
    """One tiny self-study, run once for the session through ``hfx cartridge run`` (synthesis -> cartridge ->
    evaluation on a tiny random Llama), for the tests that only read what it made: its folders and what it
    printed. A test that changes files copies the folder first (``shutil.copytree``)."""
    import contextlib
    import io
    import json

    from hfx.cli import main

    root = tmp_path_factory.mktemp("tiny-study")
    doc = root / "zorblat.txt"
    doc.write_text(ZORBLAT)
    questions = root / "q.jsonl"
    questions.write_text("".join(json.dumps(row) + "\n" for row in ZORBLAT_QUESTIONS))
    argv = [
        "cartridge", "run", "--corpus", str(doc), "--model_name_or_path", str(tiny_model_dir),
        "--output_dir", str(root / "run"), "--questions", str(questions), "--num_conversations", "4",
        "--conversations_per_chunk", "2", "--chunk_min_tokens", "20", "--chunk_max_tokens", "40",
        "--max_question_tokens", "4", "--max_answer_tokens", "4", "--num_virtual_tokens", "8",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "2",
    ]  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(argv)
    return {
        "root": root,
        "doc": doc,
        "questions": questions,
        "synthesis": root / "run" / "synthesis",
        "cartridge": root / "run" / "cartridge",
        "printed": printed.getvalue(),
        "argv": argv,
    }


def example_module(path: Path, name: str):
    """Yield the example script at `path` imported as module `name` (registered in sys.modules while in use, where
    its dataclasses look their module up); for module-scoped fixtures of the tests of examples/."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]
