"""The cartridge chat engine: a base model answering through one or more cartridges, next to the document in
context (ICL), streamed word by word, for several users at once.

Used by the ``cartridge-chat`` Space (``spaces/cartridge-chat/app.py``, the UI and its wiring) and usable without
Gradio: :class:`ChatEngine` loads base models and cartridges once, composes cartridges by concatenating their KV
prefixes (checked against the base model), prefills the ICL document once per (model, document) with the same cut as
the evaluation (:func:`hfx.cartridges.corpus.document_prefix_ids_within`), and streams both sides' answers.
:func:`unpack_upload` turns uploaded files and zip archives into cartridge folders safely.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from hfx import embedded
from hfx.cartridges.composition import composed_prefix
from hfx.cartridges.corpus import chat_ids, document_prefix_ids_within
from hfx.cartridges.evaluation import format_bytes
from hfx.cartridges.prefix import PrefixKV, generate_after_prefix
from hfx.cartridges.routing import LRUCache
from hfx.cartridges.training import METADATA_FILE
from hfx.documents import TEXT_SUFFIXES, read_document
from hfx.models import load_causal_lm, model_id, resolve

logger = logging.getLogger(__name__)

CARTRIDGE_FILES = ("adapter_config.json", "adapter_model.safetensors", METADATA_FILE)
#: Room kept for the conversation after an ICL document (tokens), on top of the answer's own tokens.
CONVERSATION_ROOM = 512
#: Greedy decoding with a light repetition penalty: a 135M model otherwise loops on its own phrases.
GENERATION_KWARGS = {"do_sample": False, "repetition_penalty": 1.1, "disable_compile": True}
MAX_ZIP_BYTES = 2 * 2**30
MAX_ZIP_ENTRIES = 1000
CACHE_ENTRIES = 8

DOC_FROM_CARTRIDGES = "cartridges"
DOC_FROM_ARGUMENT = "argument"
DOC_UPLOADED = "upload"
CORPUS_PREFIX = "corpus:"


class ChatError(ValueError):
    """A problem with what the user asked for (a cartridge, a document, a message): shown to them as is."""


# ----------------------------------------------------------------------------------------------------------------
# Shared, read-only after loading: base models, command-line cartridges, caches of prefixes


@dataclass
class BaseModel:
    """One loaded base model, shared read-only by every request."""

    name: str  # as given on the command line ("embedded", a path, a Hub id)
    display_name: str  # as recorded in cartridges' metadata, e.g. "HuggingFaceTB/SmolLM2-135M-Instruct"
    model: torch.nn.Module
    tokenizer: object
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", None) or 2048)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes of one token across all layers (keys and values), at the model's dtype."""
        config = self.model.config.get_text_config()
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        element = torch.empty((), dtype=self.model.dtype).element_size()
        return config.num_hidden_layers * 2 * kv_heads * head_dim * element

    def encode(self, text: str) -> list[int]:
        with self.tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class Cartridge:
    """A cartridge the user can pick: ``key`` is what the UI and the API send, never a path."""

    key: str
    label: str
    path: Path


def read_cartridge_metadata(path: Path) -> dict:
    """``hfx_cartridge.json`` (empty when absent); a clear error when it is not a JSON object."""
    file = path / METADATA_FILE
    if not file.is_file():
        return {}
    try:
        metadata = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ChatError(f"{file.name}: not valid JSON ({err}); re-save the cartridge with hfx.") from None
    if not isinstance(metadata, dict):
        raise ChatError(f"{file.name}: expected a JSON object, got {type(metadata).__name__}.")
    return metadata


def cartridge_label(path: Path) -> str:
    """What a cartridge is called in the UI: its corpus and size from the metadata, else its folder name."""
    metadata = read_cartridge_metadata(path)
    size = metadata.get("num_virtual_tokens")
    if size is None:
        try:
            size = json.loads((path / "adapter_config.json").read_text()).get("num_virtual_tokens")
        except (OSError, ValueError, AttributeError):
            size = None
    name = str(metadata.get("corpus") or path.name)
    return f"{name} (p={size})" if size is not None else name


def cartridge_corpora(path: Path) -> list[str]:
    """The corpus names a cartridge's metadata records (each part of a composed cartridge)."""
    metadata = read_cartridge_metadata(path)
    parts = metadata.get("composed_from")
    if isinstance(parts, list):
        return [str(part.get("corpus")) for part in parts if isinstance(part, dict) and part.get("corpus")]
    return [str(metadata["corpus"])] if metadata.get("corpus") else []


def weights_signature(path: Path) -> tuple:
    """Changes when a cartridge's files change on disk, so a cached prefix is never stale."""
    signature = []
    for name in CARTRIDGE_FILES:
        file = path / name
        if file.is_file():
            stat = file.stat()
            signature.append((name, stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


def resolve_cartridge(source: str | Path) -> Path:
    """A local cartridge folder, or a Hub model repo id downloaded to the local cache."""
    path = Path(source).expanduser()
    if not path.exists() and str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        logger.info("%s is not a local path: downloading it as a Hub model repo.", source)
        try:
            path = Path(snapshot_download(repo_id=str(source), allow_patterns=list(CARTRIDGE_FILES)))
        except (OSError, ValueError) as err:  # offline, a missing or private repo, an invalid repo id
            raise FileNotFoundError(
                f"--cartridge {source}: neither a folder nor a downloadable Hub repo ({type(err).__name__}: {err})."
            ) from err
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"--cartridge {source}: no adapter_config.json there; give the folder a cartridge was saved to."
        )
    return path.resolve()


def readable(err: Exception, cartridges: list[Cartridge]) -> str:
    """The library's message with server-side paths replaced by the names the user sees."""
    message = str(err)
    for cartridge in cartridges:
        message = message.replace(
            str(cartridge.path / "adapter_config.json"), f"{cartridge.label}/adapter_config.json"
        )
        message = message.replace(str(cartridge.path), cartridge.label)
    return message


def message_text(content) -> str:
    """The text of a chat message as Gradio hands it over (a string, or a list of content blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def history_messages(history: list | None) -> list[dict]:
    """A Chatbot's value as plain ``{"role", "content"}`` turns for the chat template."""
    turns = []
    for item in history or []:
        role = item.get("role") if isinstance(item, dict) else getattr(item, "role", None)
        content = item.get("content") if isinstance(item, dict) else getattr(item, "content", None)
        if role in ("user", "assistant"):
            turns.append({"role": role, "content": message_text(content)})
    return turns


def prompt_ids(base: BaseModel, messages: list[dict], after_system: bool) -> list[int]:
    """Ids of the conversation up to the assistant header.

    ``after_system=False`` (a cartridge) renders the whole prompt, so the chat template adds its default system
    turn after the cartridge, as in training and in ``cartridge_condition``. ``after_system=True`` (ICL) goes on
    after the document's system turn: the conversation is rendered after a placeholder system turn which is then
    cut off, the multi-turn form of ``hfx.cartridges.corpus.user_turn_ids``.
    """
    tokenizer = base.tokenizer
    if not after_system:
        with base.tokenizer_lock:
            return chat_ids(tokenizer, messages, add_generation_prompt=True)
    system = [{"role": "system", "content": "x"}]
    head = tokenizer.apply_chat_template(system, tokenize=False)
    full = tokenizer.apply_chat_template(system + messages, tokenize=False, add_generation_prompt=True)
    if not full.startswith(head):
        raise ChatError(
            f"{base.name}: its chat template does not render the system turn as a prefix of the prompt, "
            "so the document cannot be put in context once for the whole conversation."
        )
    return base.encode(full[len(head) :])


def fit_conversation(
    base: BaseModel, messages: list[dict], after_system: bool, room: int, what: str
) -> list[int]:
    """The prompt's ids, dropping the oldest exchanges until it fits in ``room`` tokens."""
    turns = list(messages)
    while True:
        ids = prompt_ids(base, turns, after_system)
        if len(ids) <= room:
            return ids
        if len(turns) <= 1:
            raise ChatError(
                f"Your message is {len(ids)} tokens, but after {what} the model's window of {base.window} "
                f"tokens leaves room for {max(room, 0)}; shorten the message or ask for fewer new tokens."
            )
        # Drop the oldest user turn and everything up to the next one (its answer).
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]


class StopOnEvent(StoppingCriteria):
    """Stops ``generate`` when the request is abandoned (the user left or pressed stop)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class SideStreamer(TextStreamer):
    """Word-by-word text of one side (cartridge or ICL) into a queue shared with the other side."""

    def __init__(self, tokenizer, side: str, events: queue.Queue):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.side = side
        self.events = events
        self.ended = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.ended:
            self.events.put((self.side, text, stream_end, None))
        self.ended = self.ended or stream_end


@dataclass
class Side:
    """One answer to stream: a prefix (or none) and the prompt that continues it."""

    name: str
    prefix: PrefixKV | None
    prompt: list[int]


class ChatEngine:
    """Everything all users share: the base models, the command-line cartridges and documents, prefix caches.

    The models are only read; each request builds its own KV cache from a shared prefix (``PrefixKV.cache``
    copies it), so concurrent requests never write to the same tensors.
    """

    def __init__(
        self,
        base_models: list[str] | None = None,
        cartridges: list[str | Path] | None = None,
        document: str | None = None,
        max_new_tokens: int = 256,
        dtype: str = "auto",
        loader: Callable[[str], tuple] | None = None,
        device: str | None = None,
        library: str | Path | None = None,
    ):
        self.base_names = list(dict.fromkeys(base_models or ["embedded"]))
        self.max_new_tokens = max_new_tokens
        # Checked now, so a device or dtype this machine lacks stops the app before it serves anything.
        self.device, self.dtype = resolve(device, dtype)
        self._loader = loader or (lambda name: load_causal_lm(name, device=self.device, dtype=self.dtype))
        self._models: dict[str, BaseModel] = {}
        self._models_lock = threading.Lock()
        self._prefixes = LRUCache(CACHE_ENTRIES)
        self._icl = LRUCache(CACHE_ENTRIES)
        self.cartridges: dict[str, Cartridge] = {}
        for source in cartridges or []:
            self.add_server_cartridge(source)
        self.document: tuple[str, str] | None = None
        if document:
            try:
                self.document = read_document(document)
            except (OSError, ValueError) as err:
                raise ValueError(f"--document {document}: {err}") from None
        self.library = None
        self.library_cartridges: dict[str, Cartridge] = {}
        self._route_lock = threading.Lock()
        if library:
            self.load_library(library)

    def load_library(self, folder: str | Path) -> None:
        """Serve a cartridge library (:mod:`hfx.cartridges.library`): each question can be routed to its cartridges."""
        from hfx.cartridges.library import CartridgeLibrary

        try:
            self.library = CartridgeLibrary(folder)
        except (OSError, ValueError) as err:
            raise ValueError(f"--library {folder}: {err}") from None
        self.library_cartridges = {
            doc_id: Cartridge(
                f"library-{i}",
                f"{doc_id} (p={self.library.document(doc_id).num_virtual_tokens})",
                self.library.cartridge_dir(doc_id),
            )
            for i, doc_id in enumerate(self.library.ids)
        }

    def route(self, base: BaseModel, message: str, k: int, router: str) -> list[tuple[Cartridge, float]]:
        """The library's top-``k`` cartridges for ``message`` by ``router``, with the router's scores."""
        if self.library is None:
            raise ChatError("This server has no cartridge library (start it with --library DIR).")
        message = (message or "").strip()
        if not message:
            raise ChatError("Type a message first.")
        k = max(1, min(int(k), len(self.library_cartridges)))
        try:
            with self._route_lock, base.tokenizer_lock:  # the library's cartridge cache is not thread-safe
                (routed,) = self.library.route(
                    [message], k=k, router=router, model=base.model, tokenizer=base.tokenizer
                )
        except (KeyError, ValueError) as err:
            raise ChatError(str(err)) from None
        return [(self.library_cartridges[doc_id], score) for doc_id, score in routed]

    def answer_library(
        self,
        message: str,
        k: int = 2,
        router: str = "bm25",
        max_new_tokens: int = 64,
        base_model: str | None = None,
    ) -> Iterator[tuple[str, list[str]]]:
        """Answer one message through the library's cartridges routed for it; streams (answer, cartridges used)."""
        base = self.base(base_model)
        chosen = [cartridge for cartridge, _ in self.route(base, message, k, router)]
        used = [cartridge.label for cartridge in chosen]
        sides = self.sides(base, chosen, [], None, [], message, max_new_tokens)
        for texts in self.stream(base, sides, max_new_tokens):
            yield texts["cartridge"], used

    def add_server_cartridge(self, source: str | Path) -> Cartridge:
        path = resolve_cartridge(source)
        label = cartridge_label(path)
        if label in {c.label for c in self.cartridges.values()}:
            label = f"{label} [{path.name}]"
        key = f"cli-{len(self.cartridges)}"
        self.cartridges[key] = Cartridge(key, label, path)
        return self.cartridges[key]

    # -- models ----------------------------------------------------------------------------------------------

    def base(self, name: str | None = None) -> BaseModel:
        """A base model by name (the first one by default), loaded on first use."""
        name = name or self.base_names[0]
        if name not in self.base_names:
            raise ChatError(f"Unknown base model {name!r}; this app serves {', '.join(self.base_names)}.")
        if name in self._models:  # loaded: no lock, so a model being loaded for someone else blocks no one
            return self._models[name]
        with self._models_lock:
            if name not in self._models:
                logger.info("Loading base model %s", name)
                model, tokenizer = self._loader(name)
                if tokenizer.pad_token_id is None:
                    tokenizer.pad_token = tokenizer.eos_token
                if not getattr(tokenizer, "chat_template", None):
                    raise ValueError(
                        f"Base model {name}: its tokenizer has no chat template; pick a chat model."
                    )
                self._models[name] = BaseModel(name, model_id(name), model, tokenizer)
            return self._models[name]

    # -- cartridges ------------------------------------------------------------------------------------------

    def compose(self, base: BaseModel, cartridges: list[Cartridge]) -> PrefixKV | None:
        """The selected cartridges' KV prefix composed in order (``None``: no cartridge, the base model alone).

        Raises :class:`ChatError` naming the cartridge that does not fit ``base`` (shape, base model, weights).
        """
        if not cartridges:
            return None
        key = (base.name, tuple((str(c.path), weights_signature(c.path)) for c in cartridges))

        def make() -> PrefixKV:
            for cartridge in cartridges:
                try:
                    read_cartridge_metadata(cartridge.path)
                except ChatError as err:
                    raise ChatError(f"{cartridge.label}: {err}") from None
            try:
                prefix = composed_prefix(
                    [c.path for c in cartridges],
                    model_config=base.model.config,
                    base_model=base.display_name,
                    dtype=base.model.dtype,
                    device=base.model.device,
                )
            except (ValueError, FileNotFoundError) as err:
                raise ChatError(readable(err, cartridges)) from None
            return prefix

        return self._prefixes.get_or_make(key, make)

    # -- documents -------------------------------------------------------------------------------------------

    def resolve_document(
        self, choice: str | None, cartridges: list[Cartridge], uploaded: tuple[str, str] | None
    ) -> tuple[str, str]:
        """``(name, text)`` of the ICL document the user picked; :class:`ChatError` when there is none."""
        if choice == DOC_FROM_ARGUMENT and self.document is not None:
            return self.document
        if choice == DOC_UPLOADED:
            if uploaded is None:
                raise ChatError(
                    "No document uploaded yet: upload a .txt/.md/.rst file or pick another document."
                )
            return uploaded
        if choice and choice.startswith(CORPUS_PREFIX):
            name = choice[len(CORPUS_PREFIX) :]
            if name not in embedded.corpus_names():
                raise ChatError(f"Unknown corpus {name!r}; pick one of the listed documents.")
            return read_document(name)
        # The cartridges' own documents: only bundled corpus names (an uploaded cartridge's metadata must not
        # make the server read its files); a command-line cartridge may also name an existing text file.
        names, texts, unknown = [], [], []
        for cartridge in cartridges:
            for corpus in cartridge_corpora(cartridge.path):
                if corpus in names:
                    continue
                trusted = cartridge.key in self.cartridges and Path(corpus).is_file()
                if corpus in embedded.corpus_names() or trusted:
                    name, text = read_document(corpus)
                    names.append(corpus)
                    texts.append(text)
                else:
                    unknown.append(corpus)
        if not texts:
            if not cartridges:
                raise ChatError(
                    "No cartridge is selected, so there is no cartridge document: pick a document."
                )
            detail = f" (they name {', '.join(map(repr, unknown))})" if unknown else ""
            raise ChatError(
                f"The selected cartridges do not name a bundled corpus{detail}: pick a document or upload one."
            )
        return " + ".join(Path(n).stem for n in names), "\n\n".join(texts)

    def icl_prefix_ids(self, base: BaseModel, text: str) -> tuple[list[int], bool]:
        """Ids of the document's system turn, cut to fit the window; and whether it was cut."""
        limit = base.window - self.max_new_tokens - CONVERSATION_ROOM
        with base.tokenizer_lock:
            return document_prefix_ids_within(base.tokenizer, text, limit)

    def icl_tokens(self, base: BaseModel, text: str) -> tuple[int, bool]:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        ids, cut = self._icl.get_or_make(("ids", base.name, digest), lambda: self.icl_prefix_ids(base, text))
        return len(ids), cut

    def icl_prefix(self, base: BaseModel, text: str) -> PrefixKV:
        """The document's system turn prefilled once per (model, document) and shared by all requests."""
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()

        def make() -> PrefixKV:
            ids, _ = self._icl.get_or_make(
                ("ids", base.name, digest), lambda: self.icl_prefix_ids(base, text)
            )
            return PrefixKV.prefill(base.model, ids)

        return self._icl.get_or_make(("kv", base.name, digest), make)

    # -- one user's selection and uploads -------------------------------------------------------------------

    def selected(self, keys: list[str] | None, session: dict | None) -> list[Cartridge]:
        """The picked cartridges, in order; keys the server does not know (or another user's) are ignored."""
        known = {**self.cartridges, **(session or {}).get("uploads", {})}
        return [known[key] for key in keys or [] if key in known]

    def named(self, names: list[str] | None) -> list[Cartridge]:
        """The server's cartridges by label (or key), all of them for ``None``; ``ChatError`` naming unknown ones."""
        by_name = {c.label: c for c in self.cartridges.values()} | self.cartridges
        names = list(self.cartridges) if names is None else list(names)
        unknown = [name for name in names if name not in by_name]
        if unknown:
            known = ", ".join(repr(c.label) for c in self.cartridges.values()) or "none"
            raise ChatError(f"Unknown cartridges {unknown}; this server has {known}.")
        return [by_name[name] for name in names]

    def document_for(
        self, choice: str | None, keys: list[str] | None, session: dict | None
    ) -> tuple[str, str]:
        """:meth:`resolve_document` for a user's selection; any problem reading it is a :class:`ChatError`."""
        try:
            return self.resolve_document(
                choice, self.selected(keys, session), (session or {}).get("document")
            )
        except (OSError, ValueError) as err:  # ChatError is a ValueError
            raise ChatError(str(err)) from None

    def cartridge_choices(self, session: dict) -> list[tuple[str, str]]:
        """(label, key) of the server's cartridges and of the user's uploads."""
        choices = [(c.label, c.key) for c in self.cartridges.values()]
        return choices + [(f"{c.label} — uploaded", c.key) for c in session["uploads"].values()]

    def document_choices(self, session: dict | None = None) -> list[tuple[str, str]]:
        """(label, choice) of the documents ICL can use: --document, the cartridges' own, bundled, uploaded."""
        choices = []
        if self.document is not None:
            choices.append((f"{self.document[0]} (--document)", DOC_FROM_ARGUMENT))
        choices.append(("the cartridges' own documents", DOC_FROM_CARTRIDGES))
        choices += [(name, f"{CORPUS_PREFIX}{name}") for name in embedded.corpus_names()]
        if session and session.get("document"):
            choices.append((f"uploaded: {session['document'][0]}", DOC_UPLOADED))
        return choices

    def default_document(self) -> str:
        return DOC_FROM_ARGUMENT if self.document is not None else DOC_FROM_CARTRIDGES

    def memory(
        self, base_name: str | None, keys, choice, session, cartridges: list[Cartridge] | None = None
    ) -> str:
        """The KV memory summary of a selection (or of ``cartridges``, a library's routed ones); the ICL line is left
        out while no document can be found."""
        base = self.base(base_name)
        try:
            document = self.document_for(choice, keys, session)
        except ChatError:
            document = None
        chosen = self.selected(keys, session) if cartridges is None else cartridges
        return self.memory_summary(base, chosen, document)

    def add_uploads(
        self, paths: list[str], base_name: str | None, keys: list[str] | None, session: dict
    ) -> tuple[list[str], list[str], list[str]]:
        """Unpack uploaded cartridges into the session, each checked against the base model.

        Returns the selection with the new cartridges added, their labels, and one message per upload refused.
        """
        if session["folder"] is None:
            session["folder"] = tempfile.mkdtemp(prefix="cartridge-chat-")
        upload_dir = Path(session["folder"]) / uuid.uuid4().hex[:8]
        keys = list(keys or [])
        added, problems = [], []
        try:
            base = self.base(base_name)
            folders = unpack_upload(paths, upload_dir)
        except ChatError as err:
            shutil.rmtree(upload_dir, ignore_errors=True)
            folders, problems = [], [str(err)]
        for folder in folders:
            try:
                cartridge = Cartridge(f"upload-{uuid.uuid4().hex[:12]}", cartridge_label(folder), folder)
                self.compose(base, [cartridge])  # shape, base model and weights, checked now
            except ChatError as err:
                problems.append(str(err))
                shutil.rmtree(folder, ignore_errors=True)
                continue
            session["uploads"][cartridge.key] = cartridge
            keys.append(cartridge.key)
            added.append(cartridge.label)
        return keys, added, problems

    def add_document(self, path: str | Path, session: dict) -> str:
        """Read an uploaded text document into the session for ICL; returns its name (``ChatError`` if unusable)."""
        path = Path(path)
        try:
            if path.suffix.lower() not in TEXT_SUFFIXES:
                raise ChatError(f"{path.name}: a document must be a {', '.join(TEXT_SUFFIXES)} file.")
            name, text = read_document(path)
        except (OSError, ValueError) as err:
            raise ChatError(str(err).replace(str(path), path.name)) from None
        session["document"] = (name, text)
        return name

    def check_cartridges(self) -> None:
        """With one base model, every server cartridge must compose with it: a start-up error, not a later one."""
        if len(self.base_names) != 1:
            return
        for cartridge in self.cartridges.values():
            try:
                self.compose(self.base(), [cartridge])
            except ChatError as err:
                raise ChatError(f"--cartridge {cartridge.path}: {err}") from None
        for cartridge in self.library_cartridges.values():
            try:
                self.compose(self.base(), [cartridge])
            except ChatError as err:
                raise ChatError(f"--library: {cartridge.label}: {err}") from None

    def answer(
        self,
        message: str,
        cartridges: list[str] | None = None,
        with_icl: bool = False,
        max_new_tokens: int = 64,
        document: str | None = None,
        base_model: str | None = None,
    ) -> Iterator[tuple[str, str]]:
        """Answer one message (no history) through the server's cartridges; streams (cartridge answer, ICL answer).

        ``cartridges``: labels (or keys) of the server's cartridges, all of them when omitted. ``document``: a
        bundled corpus name; else the server's ``--document``, else the cartridges' own documents. The ICL answer is
        empty unless ``with_icl``.
        """
        base = self.base(base_model)
        chosen = self.named(cartridges)
        doc = None
        if with_icl:
            choice = f"{CORPUS_PREFIX}{document}" if document else self.default_document()
            doc = self.resolve_document(choice, chosen, None)
        sides = self.sides(base, chosen, [], doc, [], message, max_new_tokens)
        for texts in self.stream(base, sides, max_new_tokens):
            yield texts["cartridge"], texts.get("icl", "")

    # -- memory ----------------------------------------------------------------------------------------------

    def memory_summary(
        self, base: BaseModel, cartridges: list[Cartridge], document: tuple[str, str] | None
    ) -> str:
        """The KV memory of each condition for one conversation, e.g. "cartridge: 3 parts, 384 tokens, 8.4 MiB"."""
        prefix = self.compose(base, cartridges)
        if prefix is None:
            cartridge = "cartridge: none (the base model alone), 0 tokens"
        else:
            parts = f"{len(cartridges)} part{'s' if len(cartridges) != 1 else ''}"
            cartridge = f"cartridge: {parts}, {prefix.num_tokens:,} tokens, {format_bytes(prefix.nbytes)}"
        lines = [f"**KV memory per conversation** on {base.display_name}", f"- {cartridge}"]
        if document is not None:
            tokens, cut = self.icl_tokens(base, document[1])
            icl_bytes = tokens * base.kv_bytes_per_token
            note = " (cut to fit the window)" if cut else ""
            line = f"- ICL ({document[0]}): {tokens:,} tokens, {format_bytes(icl_bytes)}{note}"
            if prefix is not None and prefix.nbytes:
                line += f" — {icl_bytes / prefix.nbytes:.1f}× the cartridge"
            lines.append(line)
        return "\n".join(lines)

    # -- answering -------------------------------------------------------------------------------------------

    def sides(
        self,
        base: BaseModel,
        cartridges: list[Cartridge],
        cartridge_history: list[dict],
        document: tuple[str, str] | None,
        icl_history: list[dict],
        message: str,
        max_new_tokens: int,
    ) -> list[Side]:
        """What to generate: the cartridge answer, and the ICL answer when a document is given."""
        message = (message or "").strip()
        if not message:
            raise ChatError("Type a message first.")
        max_new_tokens = max(1, min(int(max_new_tokens), self.max_new_tokens))
        prefix = self.compose(base, cartridges)
        prefix_tokens = prefix.num_tokens if prefix is not None else 0
        what = f"the cartridge ({prefix_tokens} tokens)" if prefix is not None else "nothing"
        turns = cartridge_history + [{"role": "user", "content": message}]
        room = base.window - prefix_tokens - max_new_tokens
        sides = [Side("cartridge", prefix, fit_conversation(base, turns, False, room, what))]
        if document is not None:
            icl = self.icl_prefix(base, document[1])
            turns = icl_history + [{"role": "user", "content": message}]
            room = base.window - icl.num_tokens - max_new_tokens
            what = f"the document ({icl.num_tokens} tokens)"
            sides.append(Side("icl", icl, fit_conversation(base, turns, True, room, what)))
        return sides

    def stream(self, base: BaseModel, sides: list[Side], max_new_tokens: int) -> Iterator[dict[str, str]]:
        """Generate every side at once in its own thread; yield ``{side: text so far}`` as words arrive.

        Closing the iterator (a user who leaves) stops the generation threads at their next token.
        """
        max_new_tokens = max(1, min(int(max_new_tokens), self.max_new_tokens))
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        pad_id = base.tokenizer.pad_token_id

        def run(side: Side) -> None:
            streamer = SideStreamer(base.tokenizer, side.name, events)
            try:
                with torch.inference_mode():
                    generate_after_prefix(
                        base.model,
                        side.prefix,
                        [side.prompt],
                        pad_id,
                        max_new_tokens=max_new_tokens,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([StopOnEvent(stop)]),
                        **GENERATION_KWARGS,
                    )
            except Exception as err:  # noqa: BLE001 - reported to the user, the server keeps serving
                logger.exception("Generation failed (%s)", side.name)
                events.put((side.name, "", True, f"{type(err).__name__}: {err}"))
            else:
                if not streamer.ended:
                    streamer.end()

        texts = {side.name: "" for side in sides}
        threads = [threading.Thread(target=run, args=(side,), daemon=True) for side in sides]
        for thread in threads:
            thread.start()
        running = set(texts)
        errors = []
        try:
            while running:
                try:
                    batch = [events.get(timeout=1.0)]
                except queue.Empty:
                    if not any(thread.is_alive() for thread in threads):
                        break
                    continue
                while True:  # everything already there goes out in one update
                    try:
                        batch.append(events.get_nowait())
                    except queue.Empty:
                        break
                for name, text, ended, error in batch:
                    texts[name] += text
                    if error:
                        errors.append(f"{name}: {error}")
                    if ended:
                        running.discard(name)
                yield dict(texts)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        if errors:
            raise RuntimeError("Generation failed: " + "; ".join(errors))


# ----------------------------------------------------------------------------------------------------------------
# Uploads: loose cartridge files, or a .zip of one or more cartridge folders


def unpack_upload(paths: list[str], destination: Path) -> list[Path]:
    """Cartridge folders under ``destination`` made from uploaded files; :class:`ChatError` names a bad one.

    Loose files are one cartridge (``adapter_config.json``, ``adapter_model.safetensors``, optional
    ``hfx_cartridge.json``); each ``.zip`` holds one or more cartridge folders. Only those file names are taken
    out of a zip, by name, so no entry can write outside ``destination``.
    """
    loose: dict[str, Path] = {}
    folders: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.suffix.lower() == ".zip":
            folders.extend(unpack_zip(path, destination / f"zip-{len(folders)}-{uuid.uuid4().hex[:8]}"))
        elif path.name in CARTRIDGE_FILES:
            if path.name in loose:
                raise ChatError(
                    f"{path.name} was uploaded twice: upload one cartridge's files at a time, "
                    "or one .zip per cartridge folder."
                )
            loose[path.name] = path
        elif path.suffix.lower() == ".bin":
            raise ChatError(
                f"{path.name}: pickled weights are not loaded; save the cartridge as safetensors."
            )
        else:
            raise ChatError(
                f"{path.name}: not a cartridge file. Upload adapter_config.json and adapter_model.safetensors "
                f"(and {METADATA_FILE} if there is one), or a .zip of the cartridge folder."
            )
    if loose:
        missing = [name for name in CARTRIDGE_FILES[:2] if name not in loose]
        if missing:
            raise ChatError(
                f"The upload has no {' and no '.join(missing)}; a cartridge needs both adapter files "
                f"(and optionally {METADATA_FILE})."
            )
        folder = destination / f"files-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        for name, path in loose.items():
            shutil.copyfile(path, folder / name)
        folders.append(folder)
    if not folders:
        raise ChatError("Nothing to add: upload a cartridge's files or a .zip of its folder.")
    return folders


def unpack_zip(path: Path, destination: Path) -> list[Path]:
    if not zipfile.is_zipfile(path):
        raise ChatError(f"{path.name}: not a readable .zip file.")
    with zipfile.ZipFile(path) as archive:
        entries = [
            info
            for info in archive.infolist()
            if not info.is_dir() and not info.filename.startswith("__MACOSX/")
        ]
        if len(entries) > MAX_ZIP_ENTRIES:
            raise ChatError(f"{path.name}: {len(entries)} files; a cartridge .zip holds a few.")
        groups: dict[str, dict[str, zipfile.ZipInfo]] = {}
        for info in entries:
            parent, _, name = info.filename.replace("\\", "/").rpartition("/")
            if name in CARTRIDGE_FILES:
                groups.setdefault(parent, {})[name] = info
        groups = {parent: files for parent, files in groups.items() if "adapter_config.json" in files}
        if not groups:
            raise ChatError(f"{path.name}: no adapter_config.json inside; not a cartridge folder.")
        for parent, files in groups.items():
            if "adapter_model.safetensors" not in files:
                raise ChatError(
                    f"{path.name}: {parent or 'the top folder'} has adapter_config.json but no "
                    "adapter_model.safetensors next to it; zip the whole cartridge folder."
                )
        total = sum(info.file_size for files in groups.values() for info in files.values())
        if total > MAX_ZIP_BYTES:
            raise ChatError(
                f"{path.name}: unpacks to {format_bytes(total)}, more than {format_bytes(MAX_ZIP_BYTES)}."
            )
        folders = []
        for index, (parent, files) in enumerate(sorted(groups.items())):
            folder = destination / f"{index}-{Path(parent).name or path.stem}"
            folder.mkdir(parents=True)
            for name, info in files.items():
                try:
                    with archive.open(info) as source, open(folder / name, "wb") as target:
                        shutil.copyfileobj(source, target)
                except (zipfile.BadZipFile, OSError, EOFError) as err:
                    raise ChatError(f"{path.name}: {info.filename} cannot be unpacked ({err}).") from None
            folders.append(folder)
    return folders


# ----------------------------------------------------------------------------------------------------------------
# Sessions: what one user uploaded


def new_session() -> dict:
    """Per-user state: uploaded cartridges (key -> Cartridge), the uploaded document, their temp folder."""
    return {"uploads": {}, "document": None, "folder": None}


def delete_session(session: dict) -> None:
    if session and session.get("folder"):
        shutil.rmtree(session["folder"], ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def add_engine_arguments(parser) -> None:
    """The engine's options on an ``argparse`` parser; each falls back to a ``CARTRIDGE_CHAT_*`` variable."""
    parser.add_argument(
        "--base-model",
        action="append",
        default=None,
        help="base model: 'embedded' (SmolLM2-135M-Instruct, the default), a local checkpoint or a Hub id; "
        "repeat to offer several (the first is the default). $CARTRIDGE_CHAT_BASE_MODEL, comma-separated.",
    )
    parser.add_argument(
        "--cartridge",
        action="append",
        default=None,
        metavar="DIR",
        help="a saved cartridge folder or a Hub model repo id; repeat to offer several (all composed by "
        "default). $CARTRIDGE_CHAT_CARTRIDGES, comma-separated.",
    )
    parser.add_argument(
        "--document",
        default=os.environ.get("CARTRIDGE_CHAT_DOCUMENT"),
        metavar="FILE",
        help="the document for ICL: a text file, a folder of them or a bundled corpus name "
        "(default: the cartridges' own corpora; $CARTRIDGE_CHAT_DOCUMENT)",
    )
    parser.add_argument(
        "--library",
        default=os.environ.get("CARTRIDGE_CHAT_LIBRARY"),
        metavar="DIR",
        help="a cartridge library (hfx cartridge library build): each question is routed to its cartridges "
        "($CARTRIDGE_CHAT_LIBRARY)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=256, help="the most tokens one answer may have (default: 256)"
    )
    parser.add_argument(
        "--device",
        default=os.environ.get("CARTRIDGE_CHAT_DEVICE"),
        help="cuda, cuda:N, xpu, mps or cpu (default: the accelerator accelerate finds, else the CPU)",
    )
    parser.add_argument(
        "--dtype",
        default=os.environ.get("CARTRIDGE_CHAT_DTYPE", "auto"),
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto = bfloat16 on a GPU that supports it, else float32",
    )


def engine_from_arguments(args) -> ChatEngine:
    """A :class:`ChatEngine` from :func:`add_engine_arguments`'s options, its cartridges checked against its
    base models. Raises ``ValueError`` (a :class:`ChatError` for a cartridge) or ``FileNotFoundError``."""

    def from_env(name: str) -> list[str]:
        return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    engine = ChatEngine(
        args.base_model or from_env("CARTRIDGE_CHAT_BASE_MODEL") or ["embedded"],
        args.cartridge or from_env("CARTRIDGE_CHAT_CARTRIDGES"),
        args.document,
        args.max_new_tokens,
        dtype=args.dtype,
        device=args.device,
        library=args.library,
    )
    engine.check_cartridges()
    return engine
