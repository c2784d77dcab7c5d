import pytest
import torch

from hfx import embedded


def test_named_corpora_are_the_sklearn_descriptions(tokenizer):
    names = embedded.corpus_names()
    assert embedded.DEFAULT_CORPUS in names and embedded.ALL_DESCRIPTIONS in names
    default_tokens = len(tokenizer(embedded.corpus_text(embedded.DEFAULT_CORPUS))["input_ids"])
    assert 500 <= default_tokens <= 1500
    everything = len(tokenizer(embedded.corpus_text(embedded.ALL_DESCRIPTIONS))["input_ids"])
    assert everything > 8192  # the long-corpus case exceeds the model's window
    with pytest.raises(ValueError, match="Unknown corpus"):
        embedded.corpus_text("no_such_corpus")


def test_kernels_is_inside_the_window_transformers_accepts():
    from transformers.utils.import_utils import is_kernels_available

    assert is_kernels_available(), (
        "transformers ignores the installed `kernels`: fix the pins in pyproject.toml"
    )


def test_model_path_resolution(embedded_dir):
    assert embedded.resolve_model_path("embedded") == str(embedded_dir)
    assert embedded.resolve_model_path(embedded.EMBEDDED_MODEL_ID) == str(embedded_dir)
    assert embedded.resolve_model_path("/some/dir") == "/some/dir"


@pytest.mark.integration
def test_embedded_model_answers_a_question(embedded_model, tokenizer):
    assert embedded_model.config.num_hidden_layers == 30
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = embedded_model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def test_importing_hfx_is_light():
    import subprocess
    import sys

    code = "import sys, hfx; print(hfx.__version__); print('torch' in sys.modules, 'gradio' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [__import__("hfx").__version__, "False", "False"]
    from hfx.losses import topk_distillation_loss

    assert __import__("hfx").topk_distillation_loss is topk_distillation_loss  # the lazy export resolves


def test_python_stdlib_is_one_collection_for_every_system():
    from pathlib import Path

    from hfx.peer_mla.data import builtin_source

    files = embedded.stdlib_files()
    root = Path(files[0]).parent
    documents = embedded.collection_documents("python_stdlib")
    # The same files, in the same order, for the corpus-level jobs and for PEER-MLA's pretraining mixture.
    assert [name for name, _ in documents] == [p.relative_to(root).as_posix() for p in files]
    assert builtin_source("python_stdlib").path_or_files == [str(p) for p in files]
    names = [name for name, _ in documents]
    assert "argparse.py" in names and "json/decoder.py" in names  # top-level modules and packages
    assert not any(
        part in ("test", "tests", "site-packages") for name in names for part in name.split("/")[:-1]
    )
    depths = [name.count("/") for name in names]
    assert depths == sorted(depths)  # top-level modules first
