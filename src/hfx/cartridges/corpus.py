"""Stage 1: the document a cartridge is made from, as text and tokens.

A corpus is a named bundled corpus (see :mod:`hfx.embedded`), a document file (:data:`hfx.documents.TEXT_SUFFIXES`:
text, PDF, HTML), a folder of them, or an http(s) URL of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hfx import embedded
from hfx.documents import TEXT_SUFFIXES, fetch_document, read_text_file, text_files


@dataclass
class Corpus:
    """A document and its tokenization by the model's tokenizer."""

    name: str
    text: str
    token_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def read_document(source: str | Path) -> tuple[str, str]:
    """Return ``(name, text)`` for a corpus name, a document file (text, PDF, HTML), a folder of them or a URL.

    Raises ``ValueError`` naming the file for empty or binary input and ``FileNotFoundError`` for missing paths.
    """
    if isinstance(source, str) and source.lower().startswith(("http://", "https://")):
        name, text = fetch_document(source)
        if not text.strip():
            raise ValueError(f"{source}: the document is empty; a cartridge needs text to study.")
        return name, text.strip()
    path = Path(source)
    if not path.exists():
        if isinstance(source, str) and "/" not in source and not path.suffix:
            return source, embedded.corpus_text(source)
        raise FileNotFoundError(
            f"{source}: no such file or folder, and not a corpus name ({embedded.corpus_names()})."
        )
    if path.is_dir():
        files = text_files(path)
        if not files:
            raise ValueError(f"{path}: folder has no {'/'.join(TEXT_SUFFIXES)} files to use as a corpus.")
        parts = [read_text_file(p).strip() for p in files]
        text = "\n\n".join(t for t in parts if t)
    else:
        text = read_text_file(path).strip()
    if not text:
        raise ValueError(f"{path}: the document is empty; a cartridge needs text to study.")
    return path.stem if path.is_file() else path.name, text


def load_corpus(source: str | Path, tokenizer) -> Corpus:
    """Read and tokenize a corpus (no special tokens: the chunker and prompts add their own)."""
    name, text = read_document(source)
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not token_ids:
        raise ValueError(f"{source}: the document tokenizes to no tokens.")
    return Corpus(name=name, text=text, token_ids=list(token_ids))


def document_system_prompt(text: str) -> str:
    """The system message that puts a document (or a chunk of it) in context: for ICL and the synthesis teacher."""
    return f"Please read the following document and then answer questions about it.\n\n<document>\n{text}\n</document>"


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def document_prefix_ids(tokenizer, text: str) -> list[int]:
    """Ids of the system turn holding ``text``: the part of an ICL prompt that is the same for every question."""
    return chat_ids(tokenizer, [{"role": "system", "content": document_system_prompt(text)}])


def document_prefix_ids_within(tokenizer, text: str, max_tokens: int) -> tuple[list[int], bool]:
    """Ids of the system turn holding ``text``, at most ``max_tokens`` of them; and whether ``text`` was cut.

    The document is cut at its end, never the template, so the system turn stays well formed. A cut text can
    tokenize differently where it was cut, so the cut is shortened until the turn fits.
    """
    ids = document_prefix_ids(tokenizer, text)
    if len(ids) <= max_tokens:
        return ids, False
    doc_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = max(0, max_tokens - (len(ids) - len(doc_ids)))
    while True:
        ids = document_prefix_ids(tokenizer, tokenizer.decode(doc_ids[:keep]))
        if len(ids) <= max_tokens:
            return ids, True
        if keep == 0:
            raise ValueError(
                f"A limit of {max_tokens} tokens cannot hold the document's system turn, which takes {len(ids)} "
                "tokens without any of the document."
            )
        keep = max(0, keep - (len(ids) - max_tokens))


def user_turn_ids(tokenizer, content: str, after_system: bool) -> list[int]:
    """Ids of one user turn and the assistant header. ``after_system=False`` renders a whole prompt (the chat
    template then adds its default system turn, as it would for any user of the model without context)."""
    if not after_system:
        return chat_ids(tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True)
    system = [{"role": "system", "content": "x"}]
    head = tokenizer.apply_chat_template(system, tokenize=False)
    full = tokenizer.apply_chat_template(
        system + [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    if not full.startswith(head):
        raise ValueError(
            "The tokenizer's chat template does not render the system turn as a prefix of the prompt."
        )
    return tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
