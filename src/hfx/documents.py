"""Documents for corpus-level jobs (quanta discovery, lens activation datasets): a bundled collection or any
text dataset.

`load_documents(spec)` accepts
  * bundled collection names, comma-separated: `pydoc_topics`, `python_stdlib`, `sklearn_descr` (interleaved
    document by document, so a token budget samples all of them);
  * a text file (.txt, .md, .rst, .py: one document), or a directory of such files (one document each);
  * a `datasets` dataset: a .parquet / .jsonl / .json / .csv file, or a directory written by `save_to_disk`,
    with a text column (`--text_column`, default "text").
"""

from __future__ import annotations

import itertools
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
DATASET_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
DEFAULT_DATASET = "pydoc_topics,python_stdlib"


def load_documents(spec: str, text_column: str = "text") -> list[tuple[str, str]]:
    """(name, text) pairs; empty documents are dropped. Raises with the path/column when the input is unusable."""
    from hfx import embedded

    path = Path(spec)
    if path.exists():
        documents = _from_path(path, text_column)
    else:
        names = [name.strip() for name in spec.split(",") if name.strip()]
        unknown = [name for name in names if name not in embedded.DOCUMENT_COLLECTIONS]
        if unknown or not names:
            raise ValueError(
                f"{spec!r} is neither an existing path nor bundled collection names "
                f"({', '.join(embedded.DOCUMENT_COLLECTIONS)}, comma-separated)."
            )
        collections = [
            [(f"{name}/{doc}", text) for doc, text in embedded.load_documents(name)] for name in names
        ]
        documents = [doc for group in itertools.zip_longest(*collections) for doc in group if doc is not None]
    documents = [(name, text) for name, text in documents if text.strip()]
    if not documents:
        raise ValueError(f"{spec}: no non-empty documents.")
    return documents


def _from_path(path: Path, text_column: str) -> list[tuple[str, str]]:
    if path.is_dir() and not (path / "dataset_info.json").exists():
        files = text_files(path)
        if not files:
            raise ValueError(
                f"{path}: directory has no {'/'.join(TEXT_SUFFIXES)} files and is not a saved dataset."
            )
        return [(str(p.relative_to(path)), read_text_file(p)) for p in files]
    if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
        return [(path.name, read_text_file(path))]
    import datasets

    if path.is_dir():
        dataset = datasets.load_from_disk(str(path))
    elif path.suffix in DATASET_SUFFIXES:
        dataset = datasets.load_dataset(DATASET_SUFFIXES[path.suffix], data_files=str(path), split="train")
    else:
        raise ValueError(
            f"{path}: unsupported file type; use {', '.join(TEXT_SUFFIXES + tuple(DATASET_SUFFIXES))} or a directory."
        )
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[next(iter(dataset))]
    if text_column not in dataset.column_names:
        raise ValueError(
            f"{path}: no column {text_column!r} (columns: {dataset.column_names}); set --text_column."
        )
    return [(f"{path.name}[{i}]", text or "") for i, text in enumerate(dataset[text_column])]


def text_files(folder: Path) -> list[Path]:
    """The text files of ``folder`` and its subfolders (by suffix, :data:`TEXT_SUFFIXES`), in path order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)


def read_text_file(path: Path) -> str:
    """The UTF-8 text of ``path``; ``ValueError`` naming the file when it is binary or another encoding."""
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise ValueError(f"{path}: looks like a binary file (NUL bytes), not UTF-8 text.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not valid UTF-8 text (byte {error.start}).") from None
