"""Stage 1: the document a cartridge is made from, as text and tokens.

A corpus is a named bundled corpus (see :mod:`hfx.embedded`), a ``.txt``/``.md``/``.rst`` file, or a folder of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hfx import embedded

TEXT_SUFFIXES = (".txt", ".md", ".rst")


@dataclass
class Corpus:
    """A document and its tokenization by the model's tokenizer."""

    name: str
    text: str
    token_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise ValueError(f"{path}: looks like a binary file (NUL bytes); a corpus must be UTF-8 text.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); a corpus must be UTF-8 text.") from None
    return text.strip()


def read_document(source: str | Path) -> tuple[str, str]:
    """Return ``(name, text)`` for a corpus name, a text file or a folder of text files.

    Raises ``ValueError`` naming the file for empty or binary input and ``FileNotFoundError`` for missing paths.
    """
    path = Path(source)
    if not path.exists():
        if isinstance(source, str) and "/" not in source and not path.suffix:
            return source, embedded.load_corpus(source)
        raise FileNotFoundError(
            f"{source}: no such file or folder, and not a corpus name ({embedded.corpus_names()})."
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: folder has no {'/'.join(TEXT_SUFFIXES)} files to use as a corpus.")
        parts = [_read_text_file(p) for p in files]
        text = "\n\n".join(t for t in parts if t)
    else:
        text = _read_text_file(path)
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
