"""Stage 1: the document a cartridge is made from, as text and tokens.

A corpus is whatever hfx's one document reader takes (:func:`hfx.documents.read_document`): a named bundled
corpus or collection, a document file (text, PDF, HTML), a folder of them, an http(s) URL of one, or a text
dataset; several documents are joined into one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hfx.documents import read_document


@dataclass
class Corpus:
    """A document and its tokenization by the model's tokenizer."""

    name: str
    text: str
    token_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


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
