"""A cartridge library: many documents, one cartridge each, trained to be mixed, kept in one folder, routed per question.

``LIB/`` holds

* ``library.json``, the manifest: per document its id, title, token count, p, the hash of its text and of the
  settings that made its cartridge, and where its files are;
* ``documents/<slug>.txt``: each document's text (what its cartridge studied; what BM25 and ICL read);
* ``initial/<slug>/``: each document's cartridge before training (the KV of its most attended tokens), the
  distractors that other documents' cartridges are trained beside (:class:`~hfx.cartridges.training.DistractorMixer`);
* ``cartridges/<slug>/``: each document's main job (synthesis, cartridge, plan), a set of stages (:mod:`hfx.stages`),
  with ``library_entry.json`` saying which text and settings it is for;
* ``tuned/``: the cartridges tuned together once every document has its own (:mod:`hfx.cartridges.library_tuning`),
  a library folder of its own; ``library.json`` names it (``"tuned"``) once the tuning is finished for the current
  cartridges, and :class:`CartridgeLibrary` then serves them (``tuned=False``: the cartridges trained alone).

A rebuild trains only the documents that are missing or whose text or settings changed, resumes the one a kill
interrupted, and removes the documents that are no longer given. ``library.json`` is rewritten after each cartridge,
so a kill loses at most the cartridge in progress. Processes of a launch share the documents (document ``i`` goes to
process ``i % num_processes``), each training its own alone on its own device; a file lock orders their writes.

Mixing is on by default: each cartridge is first trained alone, then the library's cartridges are tuned together
(``tune_epochs``, 2 by default; 0 leaves them as trained alone), so that any mix of them keeps each document's
answers. A changed document retunes the whole library (the tuning is joint); a rebuild that changes nothing reuses
the tuning. The tuning runs on the first process once every process's documents are finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock
from tqdm.auto import tqdm

from hfx.atomic import write_text_atomic
from hfx.models import DeviceArguments
from hfx.stages import Stage, StageMismatch, fingerprint

if TYPE_CHECKING:
    from hfx.cartridges.library_tuning import TuningReport

logger = logging.getLogger(__name__)

LIBRARY_FILE = "library.json"
ENTRY_FILE = "library_entry.json"
LOCK_FILE = ".library.lock"
#: Version of the library's on-disk layout.
LIBRARY_FORMAT = 1
#: Where distractors come from: none (cartridges trained alone), the other documents' initial cartridges (fixed,
#: so every document trains independently, in any order, on any process), or their trained cartridges where they
#: exist (the initial ones otherwise).
DISTRACTOR_SOURCES = ("none", "initial", "trained")
#: Cartridges are trained alone, then tuned together (``build_library(tune_epochs=...)``): trained beside fixed
#: distractors, they composed no better than alone and were weaker alone.
DEFAULT_DISTRACTORS = "none"
#: Where a library keeps its cartridges tuned together (a library folder inside it).
TUNED_FOLDER = "tuned"


@dataclass
class LibraryDocument:
    """One document of a library and its cartridge (paths relative to the library's folder)."""

    id: str
    title: str
    source: str
    num_tokens: int
    num_virtual_tokens: int
    text_sha256: str
    settings_fingerprint: str
    document: str
    cartridge: str
    initial: str | None = None
    report: dict = field(default_factory=dict)


@dataclass
class BuildReport:
    """What a build did: the ids of the documents it trained (and why), kept, and removed."""

    library: Path
    trained: dict[str, str] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    #: what the tuning together did, None when not tuned
    tuning: TuningReport | None = None


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def document_slug(doc_id: str, taken: set[str] | None = None) -> str:
    """A folder name for a document id: its letters, digits, ``.``, ``_`` and ``-``, others as ``_``; a short hash
    of the id is added when characters were replaced or the name is ``taken``, so two ids never share a folder."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", doc_id).strip("._") or "document"
    if slug != doc_id or (taken is not None and slug in taken):
        slug = f"{slug[:60]}-{hashlib.sha256(doc_id.encode()).hexdigest()[:8]}"
    return slug


def document_title(doc_id: str, text: str) -> str:
    """The first line of ``text`` that reads as a title (not reST markup), at most 80 characters; else the id."""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("..") or not re.search(r"[A-Za-z0-9]", line):
            continue
        line = re.sub(r"^#+\s*", "", line)
        return line if len(line) <= 80 else line[:77].rstrip() + "..."
    return doc_id


def collect_documents(sources: list[str]) -> list[tuple[str, str, str]]:
    """``(id, text, source)`` of every document in ``sources``, in order: each source is what
    :func:`hfx.documents.load_documents` reads (a file, a folder of files, a bundled collection such as
    ``sklearn_descr`` or a corpus name, a URL), one document per file or collection member."""
    from hfx.documents import load_documents

    if not sources:
        raise ValueError("Give at least one document (--documents PATH ...).")
    documents: list[tuple[str, str, str]] = []
    seen: dict[str, str] = {}
    for source in sources:
        for doc_id, text in load_documents(source):
            if doc_id in seen:
                raise ValueError(
                    f"Two documents have the id {doc_id!r} (from {seen[doc_id]} and {source}); a library keeps "
                    "one cartridge per id: rename one, or give each folder once."
                )
            seen[doc_id] = str(source)
            documents.append((doc_id, text.strip(), str(source)))
    return documents


def read_library_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / LIBRARY_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}).") from err
    if manifest.get("format") != LIBRARY_FORMAT:
        raise ValueError(
            f"{path}: library format {manifest.get('format')!r}, this hfx reads {LIBRARY_FORMAT}."
        )
    return manifest


def _read_entry(folder: Path) -> dict | None:
    path = folder / ENTRY_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:  # written atomically, so only a foreign file can be broken: rebuild it
        return None


@dataclass
class LibrarySettings:
    """What makes every cartridge of a library (beside each document's text and p)."""

    model_name_or_path: str = "embedded"
    budget_minutes: float | None = None
    synthesis: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    distractors: str = DEFAULT_DISTRACTORS

    def for_document(self, num_virtual_tokens: int) -> dict:
        """Everything that makes one document's cartridge, defaults written out (a changed default retrains)."""
        from hfx.cartridges.synthesis import SynthesisConfig
        from hfx.cartridges.training import CartridgeTrainingArguments
        from hfx.models import model_id
        from hfx.stages import TRAINER_SETTINGS

        fields = CartridgeTrainingArguments.__dataclass_fields__
        names = (*TRAINER_SETTINGS, "num_frozen_tokens", "initialization", "model_dtype", "max_distractors")
        training = {name: fields[name].default for name in names if name in fields}
        training.update(self.training)
        training["num_virtual_tokens"] = num_virtual_tokens
        if self.distractors == "none":
            training.pop("max_distractors")
        return {
            "model_name_or_path": model_id(self.model_name_or_path),
            "budget_minutes": self.budget_minutes,
            "synthesis": asdict(SynthesisConfig(**self.synthesis)),
            "training": training,
            "distractors": self.distractors,
        }


#: A document's cartridge has 1/DEFAULT_COMPRESSION of its tokens unless the build says otherwise.
DEFAULT_COMPRESSION = 8


def _num_virtual_tokens(training: dict, num_tokens: int, compression: int = DEFAULT_COMPRESSION) -> int:
    p = training.get("num_virtual_tokens")
    return int(p) if p else max(1, num_tokens // compression)


def build_library(
    sources: list[str],
    output_dir: str | Path,
    settings: LibrarySettings | None = None,
    device: str | None = None,
    dtype: str = "auto",
    process_index: int = 0,
    num_processes: int = 1,
    compression: int = DEFAULT_COMPRESSION,
    tune_epochs: float | None = None,
) -> BuildReport:
    """Build or update the library in ``output_dir`` from the documents of ``sources`` (see the module's docstring).

    Each document's cartridge is the main job (:func:`hfx.cartridges.pipeline.run_self_study`) with ``settings``
    (a per-document ``budget_minutes``); with ``settings.distractors`` other than ``"none"`` it is trained beside a
    changing mix of the other documents' cartridges. ``process_index`` / ``num_processes`` share the documents among
    the processes of a launch, each training alone on ``device``. Each cartridge has ``1/compression`` of its
    document's tokens (at least one) unless ``settings.training`` sets ``num_virtual_tokens`` for all; p is part of
    what makes a cartridge, so another compression retrains every document whose p it changes.

    Then the cartridges are tuned together into ``output_dir/tuned`` for ``tune_epochs`` (None: the tuning's
    default, :class:`~hfx.cartridges.library_tuning.LibraryTuningArguments`; 0: not tuned), on the first process
    once every document is finished, on ``device``.
    """
    from hfx.cartridges.synthesis import SynthesisConfig
    from hfx.cartridges.training import CartridgeTrainingArguments
    from hfx.models import load_tokenizer

    settings = settings or LibrarySettings()
    if tune_epochs is not None and tune_epochs < 0:
        raise ValueError(f"tune_epochs={tune_epochs}: give a number of epochs >= 0 (0: no tuning together).")
    if int(compression) != compression or compression < 1:
        raise ValueError(
            f"compression={compression}: give a whole number >= 1 (p = a document's tokens // it)."
        )
    if settings.distractors not in DISTRACTOR_SOURCES:
        raise ValueError(f"distractors must be one of {DISTRACTOR_SOURCES}, got {settings.distractors!r}.")
    if device is not None and str(device).startswith("cuda:") and str(device) != "cuda:0":
        raise ValueError(
            f"device={device!r}: Trainer trains on the first visible GPU (cuda:0); narrow this process to the GPU "
            "first (CUDA_VISIBLE_DEVICES, or process_device(), which `hfx cartridge library build` calls)."
        )
    known_training = set(CartridgeTrainingArguments.__dataclass_fields__)
    unknown = sorted(set(settings.training) - known_training)
    if unknown:
        raise ValueError(f"Unknown training settings {unknown}; see CartridgeTrainingArguments.")
    if "distractors" in settings.training:
        raise ValueError("A library chooses each cartridge's distractors itself; set settings.distractors.")
    SynthesisConfig(**settings.synthesis)  # unknown or invalid synthesis settings stop here
    output_dir = Path(output_dir)
    existing = read_library_manifest(output_dir)
    if existing is not None and "tuning" in existing:
        raise ValueError(
            f"{output_dir} is a tuned library (`hfx cartridge library tune` of {existing['tuning']['source']}); "
            "build into its source, then tune it again."
        )
    documents = collect_documents(sources)
    tokenizer = load_tokenizer(settings.model_name_or_path)
    report = BuildReport(output_dir)
    taken: set[str] = set()
    entries: list[LibraryDocument] = []
    for doc_id, text, source in documents:
        slug = document_slug(doc_id, taken)
        taken.add(slug)
        num_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        p = _num_virtual_tokens(settings.training, num_tokens, int(compression))
        entries.append(
            LibraryDocument(
                id=doc_id,
                title=document_title(doc_id, text),
                source=source,
                num_tokens=num_tokens,
                num_virtual_tokens=p,
                text_sha256=text_sha256(text),
                settings_fingerprint=fingerprint(settings.for_document(p)),
                document=f"documents/{slug}.txt",
                cartridge=f"cartridges/{slug}/cartridge",
                initial=f"initial/{slug}" if settings.distractors != "none" else None,
            )
        )
    texts = {entry.id: text for entry, (_, text, _) in zip(entries, documents, strict=True)}
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(output_dir / LOCK_FILE))
    with lock:
        if process_index == 0:
            report.removed = _remove_stale(output_dir, entries)
        for entry in entries:  # every process may write them: the same text, atomically, under the lock
            path = output_dir / entry.document
            if not path.is_file() or path.read_text(encoding="utf-8") != texts[entry.id]:
                write_text_atomic(path, texts[entry.id])
        _write_manifest(output_dir, entries, settings)
    if settings.distractors != "none":
        with lock:  # one process makes the missing ones; the others find them made
            _make_initial_cartridges(output_dir, entries, settings, device, dtype)
    mine = [entry for i, entry in enumerate(entries) if i % num_processes == process_index]
    for entry in tqdm(mine, desc=f"library (process {process_index})", unit="document"):
        reason = _train_reason(output_dir, entry)
        if reason is None:
            report.kept.append(entry.id)
            continue
        logger.info("library: training %s (%s)", entry.id, reason)
        report.trained[entry.id] = reason
        _train_document(output_dir, entry, entries, settings, device, dtype, reason)
        with lock:
            _write_manifest(output_dir, entries, settings)
    with lock:
        _write_manifest(output_dir, entries, settings)
    if tune_epochs != 0 and process_index == 0 and len(entries) > 1:  # one cartridge has nothing to mix with
        if num_processes > 1:  # alone, a document left unfinished stops the tuning with a clear error instead
            _wait_for_others(output_dir, lock)
        report.tuning = _tune_together(output_dir, settings, tune_epochs, device)
        with lock:
            _write_manifest(output_dir, entries, settings, tuned=TUNED_FOLDER)
    return report


def _wait_for_others(output_dir: Path, lock: FileLock, poll_seconds: float = 10.0) -> None:
    """Until every document of the library is finished (the other processes of a launch train theirs)."""
    import time

    waited = 0.0
    while True:
        with lock:
            pending = (read_library_manifest(output_dir) or {}).get("pending", [])
        if not pending:
            return
        if waited % 300 < poll_seconds:
            logger.info("library: tuning waits for the other processes' documents: %s", ", ".join(pending))
        time.sleep(poll_seconds)
        waited += poll_seconds


def _tune_together(
    output_dir: Path, settings: LibrarySettings, tune_epochs: float | None, device: str | None
):
    """The library's cartridges tuned together into ``output_dir/tuned`` (a stage: reused when current; other
    tuning settings tune it again, as other settings retrain a document)."""
    from hfx.cartridges.library_tuning import LibraryTuningArguments, tune_library

    tuned = output_dir / TUNED_FOLDER
    extra = {} if tune_epochs is None else {"num_train_epochs": float(tune_epochs)}
    args = LibraryTuningArguments(str(tuned), use_cpu=device == "cpu", **extra)
    report = tune_library(
        output_dir, tuned, args, model_name_or_path=settings.model_name_or_path, overwrite=True
    )
    logger.info("library: cartridges tuned together (%s, %d steps)", report.status, report.steps)
    return report


def _run_folder(output_dir: Path, entry: LibraryDocument) -> Path:
    return output_dir / Path(entry.cartridge).parent


def _train_reason(output_dir: Path, entry: LibraryDocument) -> str | None:
    """Why ``entry``'s cartridge must be (re)trained, or ``None`` when its finished cartridge is current."""
    from hfx.cartridges.training import is_trained_cartridge

    run = _run_folder(output_dir, entry)
    recorded = _read_entry(run)
    if recorded is None:
        return "new" if not run.exists() else "unfinished"
    if recorded.get("text_sha256") != entry.text_sha256:
        return "its text changed"
    if recorded.get("settings_fingerprint") != entry.settings_fingerprint:
        return "its settings changed"
    if not recorded.get("complete") or not is_trained_cartridge(output_dir / entry.cartridge):
        return "unfinished"
    return None


def _train_document(
    output_dir: Path,
    entry: LibraryDocument,
    entries: list[LibraryDocument],
    settings: LibrarySettings,
    device: str | None,
    dtype: str,
    reason: str,
) -> None:
    from hfx.cartridges.pipeline import run_self_study
    from hfx.cartridges.synthesis import SynthesisConfig
    from hfx.cartridges.training import is_trained_cartridge

    run = _run_folder(output_dir, entry)
    if reason in ("its text changed", "its settings changed"):
        shutil.rmtree(
            run
        )  # its entry goes with it: a kill from here on leaves a folder without one ("unfinished")
    run.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run / ENTRY_FILE, json.dumps({**asdict(entry), "complete": False}, indent=2))
    training = {**settings.training, "num_virtual_tokens": entry.num_virtual_tokens}
    if settings.distractors != "none":
        others = []
        for other in entries:
            if other.id == entry.id:
                continue
            trained = output_dir / other.cartridge
            use_trained = settings.distractors == "trained" and is_trained_cartridge(trained)
            others.append(str(trained if use_trained else output_dir / other.initial))
        training["distractors"] = others

    def run_study():
        return run_self_study(
            run,
            corpus_source=str(output_dir / entry.document),
            synthesis=SynthesisConfig(**settings.synthesis),
            training=training,
            model_name_or_path=settings.model_name_or_path,
            device=device,
            dtype=dtype,
            budget_minutes=settings.budget_minutes,
        )

    try:
        result = run_study()
    except (
        StageMismatch
    ) as err:  # a folder left by a build of other settings, killed before its entry was written
        logger.warning("library: %s holds a run of other settings (%s); starting it over", run, err)
        shutil.rmtree(run)
        run.mkdir(parents=True)
        write_text_atomic(run / ENTRY_FILE, json.dumps({**asdict(entry), "complete": False}, indent=2))
        result = run_study()
    entry.report = {"minutes": round(result.seconds / 60, 2)}
    write_text_atomic(run / ENTRY_FILE, json.dumps({**asdict(entry), "complete": True}, indent=2))


def _remove_stale(output_dir: Path, entries: list[LibraryDocument]) -> list[str]:
    """Remove the documents of an earlier build that are not among ``entries``: manifest first, then files."""
    current = {Path(e.cartridge).parent.name for e in entries}
    removed = []
    manifest = read_library_manifest(output_dir)
    kept = [d for d in (manifest or {}).get("documents", []) if Path(d["cartridge"]).parent.name in current]
    if manifest is not None and len(kept) != len(manifest["documents"]):
        write_text_atomic(output_dir / LIBRARY_FILE, json.dumps({**manifest, "documents": kept}, indent=2))
    for kind in ("cartridges", "initial"):
        folder = output_dir / kind
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.is_dir() and path.name not in current and not path.name.startswith("."):
                entry = _read_entry(path) or {}
                removed.append(entry.get("id", path.name))
                shutil.rmtree(path)
    documents = output_dir / "documents"
    for path in sorted(documents.glob("*.txt")) if documents.is_dir() else []:
        if path.stem not in current:
            path.unlink()
    removed = sorted(set(removed))
    if removed:
        logger.info("library: removed %s (no longer among the documents)", ", ".join(removed))
    return removed


def _write_manifest(
    output_dir: Path, entries: list[LibraryDocument], settings: LibrarySettings, tuned: str | None = None
) -> None:
    """``library.json`` with the documents whose cartridge is finished and current (the others are in progress);
    ``tuned``: the folder of their tuning together, only once it is finished for them (any other write drops it, so a
    library being rebuilt never names a stale tuning)."""
    finished = []
    for entry in entries:
        recorded = _read_entry(_run_folder(output_dir, entry))
        if _train_reason(output_dir, entry) is None and recorded is not None:
            finished.append({**asdict(entry), "report": recorded.get("report", {})})
    manifest = {
        "format": LIBRARY_FORMAT,
        "base_model": settings.for_document(0)["model_name_or_path"],
        "settings": asdict(settings),
        "num_documents": len(entries),
        "documents": finished,
        "pending": [e.id for e in entries if e.id not in {d["id"] for d in finished}],
    }
    if tuned is not None and not manifest["pending"]:
        manifest["tuned"] = tuned
    write_text_atomic(output_dir / LIBRARY_FILE, json.dumps(manifest, indent=2) + "\n")


#: The stage of an initial cartridge (a document's untrained prefix, a distractor for the others).
INITIAL_STAGE = "initial-cartridge"


def _make_initial_cartridges(
    output_dir: Path, entries: list[LibraryDocument], settings: LibrarySettings, device, dtype
) -> None:
    """Each document's untrained cartridge (a stage, made once): the KV of its most attended tokens, or of its first
    tokens for a model without rotary positions, saved as a CARTRIDGE adapter."""
    from hfx.cartridges.composition import save_prefix
    from hfx.cartridges.corpus import document_prefix_ids
    from hfx.cartridges.prefix import PrefixKV
    from hfx.cartridges.training import attended_tokens_prefix, check_initialization
    from hfx.models import load_causal_lm, model_id

    base = model_id(settings.model_name_or_path)
    model = tokenizer = initialization = None
    for entry in entries:
        folder = output_dir / entry.initial
        text = (output_dir / entry.document).read_text(encoding="utf-8")
        stage_settings = {"num_virtual_tokens": entry.num_virtual_tokens}
        stage = Stage(
            folder, INITIAL_STAGE, stage_settings, {"base_model": base, "text_sha256": entry.text_sha256}
        )
        if stage.done:
            continue
        if model is None:
            model, tokenizer = load_causal_lm(settings.model_name_or_path, device=device, dtype=dtype)
            try:
                check_initialization(model, "attended_tokens")
                initialization = "attended_tokens"
            except ValueError:
                initialization = "first_tokens"
        if stage.begin(overwrite=True) == "done":
            continue
        if initialization == "attended_tokens":
            prefix = attended_tokens_prefix(model, tokenizer, text, entry.num_virtual_tokens)
        else:
            prefix = PrefixKV.prefill(model, document_prefix_ids(tokenizer, text)[: entry.num_virtual_tokens])
        save_prefix(
            prefix,
            folder,
            base_model=base,
            metadata={
                "corpus": Path(entry.document).stem,
                "initialization": initialization,
                "trained": False,
            },
        )
        stage.finish()


# ----------------------------------------------------------------------------------------------------------------
# Using a library: route a question to its documents' cartridges and answer with them composed.

#: The routers of :meth:`CartridgeLibrary.route`: BM25 over the documents' text (bm25s); the question's mean token
#: log-likelihood after each document's cartridge (the library's own cartridges, no text needed); and the same,
#: calibrated: minus the cartridge's mean log-likelihood of content-free questions (:data:`CALIBRATION_QUESTIONS`),
#: so that a cartridge that makes every question likely does not win them all.
ROUTERS = ("bm25", "likelihood", "calibrated_likelihood")

#: Questions about no document in particular: the log-likelihood a cartridge gives them is its bias.
CALIBRATION_QUESTIONS = (
    "What is this about?",
    "What does the document say?",
    "Which of the following is true?",
    "What is the main topic of the text?",
    "How many are there?",
    "Who made it, and when?",
    "What are its main features?",
    "Can you summarize the description?",
)


@dataclass
class LibraryAnswer:
    """An answer of the library: its text and the cartridges (document ids, router scores) it was given."""

    question: str
    text: str
    cartridges: list[str]
    scores: list[float]
    router: str
    prefix_tokens: int


class CartridgeLibrary:
    """A built library (``library.json`` and its folders), read-only: routing, composed prefixes, answers.

    ``cache_bytes`` bounds the loaded cartridges kept in the model's device memory (least recently used go first).
    A library whose cartridges were tuned together (``library.json`` names the folder) serves the tuned ones;
    ``tuned=False`` serves those trained alone. :attr:`folder` is the folder served.
    """

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, cache_bytes: int = 2 << 30, tuned: bool = True
    ) -> CartridgeLibrary:
        """A library from a local folder or a Hub model repo (downloaded to the Hub cache), as
        :func:`push_library_to_hub` uploads it."""
        path = Path(name_or_path).expanduser()
        if (
            not path.exists()
            and str(name_or_path).count("/") == 1
            and not str(name_or_path).startswith((".", "/"))
        ):
            from huggingface_hub import snapshot_download

            try:
                path = Path(snapshot_download(repo_id=str(name_or_path)))
            except (OSError, ValueError) as err:  # offline, a missing or private repo
                raise FileNotFoundError(
                    f"{name_or_path}: neither a library folder nor a downloadable Hub repo ({type(err).__name__}: {err})."
                ) from err
        return cls(path, cache_bytes=cache_bytes, tuned=tuned)

    def __init__(self, folder: str | Path, cache_bytes: int = 2 << 30, tuned: bool = True):
        self.folder = Path(folder)
        manifest = read_library_manifest(self.folder)
        if manifest is None:
            raise FileNotFoundError(
                f"{self.folder}: no {LIBRARY_FILE}; build one with `hfx cartridge library build`."
            )
        if tuned and manifest.get("tuned"):
            built = manifest
            self.folder = self.folder / manifest["tuned"]
            manifest = read_library_manifest(self.folder)
            same = [(d["id"], d["text_sha256"]) for d in (manifest or {}).get("documents", [])]
            if same != [(d["id"], d["text_sha256"]) for d in built["documents"]]:
                raise ValueError(
                    f"{self.folder}: not the tuning of {folder}'s current documents; run the build again (or load "
                    "it with tuned=False for the cartridges trained alone)."
                )
        tuning = self.folder / "hfx_stage_library-tuning"  # a tuned library's stage (a shared copy has none)
        if tuning.with_suffix(".json").is_file() and not tuning.with_suffix(".done").is_file():
            raise ValueError(
                f"{self.folder}: its tuning has not finished; run `hfx cartridge library tune` again to finish it."
            )
        self.manifest = manifest
        self.documents = [LibraryDocument(**d) for d in manifest["documents"]]
        if not self.documents:
            raise ValueError(
                f"{self.folder}: no finished cartridge yet (pending: {', '.join(manifest.get('pending', []))}); "
                "run the build again to finish it."
            )
        self.by_id = {d.id: d for d in self.documents}
        self.cache_bytes = cache_bytes
        self._bm25 = None
        self._prefixes = None
        self._bias = None

    @property
    def ids(self) -> list[str]:
        return [d.id for d in self.documents]

    @property
    def base_model(self) -> str:
        """The base model's id, as cartridges record it."""
        return self.manifest["base_model"]

    @property
    def model_name_or_path(self) -> str:
        """The base model as the build was given it (``embedded``, a path): what to load to use the library."""
        return self.manifest["settings"]["model_name_or_path"]

    def document(self, doc_id: str) -> LibraryDocument:
        if doc_id not in self.by_id:
            raise KeyError(f"{self.folder}: no document {doc_id!r}; the library has {', '.join(self.ids)}.")
        return self.by_id[doc_id]

    def text(self, doc_id: str) -> str:
        return (self.folder / self.document(doc_id).document).read_text(encoding="utf-8")

    def cartridge_dir(self, doc_id: str) -> Path:
        return self.folder / self.document(doc_id).cartridge

    # -- routing ---------------------------------------------------------------------------------------------

    def bm25(self):
        from hfx.cartridges.routing import BM25Router

        if self._bm25 is None:
            self._bm25 = BM25Router([(d.id, self.text(d.id)) for d in self.documents])
        return self._bm25

    def route(
        self,
        questions: list[str],
        k: int = 1,
        router: str = "bm25",
        model=None,
        tokenizer=None,
        likelihoods: list[list[float]] | None = None,
    ) -> list[list[tuple[str, float]]]:
        """The top-``k`` documents of each question, best first, with the router's scores. ``likelihoods``: the
        questions' :meth:`likelihoods` when they are already computed (both likelihood routers read them)."""
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}.")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        if router == "bm25":
            return self.bm25().route_many(list(questions), k)
        if model is None or tokenizer is None:
            raise ValueError(f"The {router} router scores with the base model: pass model and tokenizer.")
        if likelihoods is not None and (
            len(likelihoods) != len(questions) or any(len(row) != len(self.ids) for row in likelihoods)
        ):
            raise ValueError(
                f"likelihoods must be [questions][documents] = [{len(questions)}][{len(self.ids)}] for this library."
            )
        scores = likelihoods if likelihoods is not None else self.likelihoods(questions, model, tokenizer)
        if router == "calibrated_likelihood":
            bias = self.likelihood_bias(model, tokenizer)
            scores = [[value - b for value, b in zip(row, bias, strict=True)] for row in scores]
        ranked = []
        for row in scores:
            order = sorted(range(len(self.ids)), key=lambda j: (-row[j], j))[: min(k, len(self.ids))]
            ranked.append([(self.ids[j], float(row[j])) for j in order])
        return ranked

    def likelihoods(self, questions: list[str], model, tokenizer, batch_size: int = 16) -> list[list[float]]:
        """Each question's mean token log-likelihood after each document's cartridge, ``[questions][documents]``:
        the cartridge a question reads as most likely is the one it is about."""
        import torch

        from hfx.batching import padded
        from hfx.cartridges.corpus import user_turn_ids
        from hfx.cartridges.prefix import forward_with_prefix

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        prompts = [user_turn_ids(tokenizer, q, after_system=False) for q in questions]
        scores = [[0.0] * len(self.ids) for _ in questions]
        documents = tqdm(
            list(enumerate(self.ids)),
            desc="likelihood router",
            unit="cartridge",
            disable=len(prompts) * len(self.ids) < 64 * batch_size,
        )
        with torch.no_grad():
            for j, doc_id in documents:
                prefix = self.prefix([doc_id], model)
                for start in range(0, len(prompts), batch_size):
                    batch = prompts[start : start + batch_size]
                    ids, mask = padded(batch, pad_id)
                    ids, mask = ids.to(model.device), mask.to(model.device)
                    logits = forward_with_prefix(model, prefix, ids, mask).logits.float()
                    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
                    valid = mask[:, 1:].to(logprobs.dtype)
                    mean = (logprobs * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)
                    for row, value in enumerate(mean.tolist()):
                        scores[start + row][j] = value
        return scores

    def likelihood_bias(self, model, tokenizer) -> list[float]:
        """Each cartridge's mean of :meth:`likelihoods` over :data:`CALIBRATION_QUESTIONS` (computed once per model,
        dtype and device): what the calibrated router subtracts."""
        key = (model.config.name_or_path, model.dtype, model.device)
        if self._bias is None or self._bias[0] != key:
            rows = self.likelihoods(list(CALIBRATION_QUESTIONS), model, tokenizer)
            self._bias = (key, [sum(column) / len(column) for column in zip(*rows, strict=True)])
        return list(self._bias[1])

    # -- answering -------------------------------------------------------------------------------------------

    def cache_stats(self) -> dict:
        """The counters of the cache of loaded cartridges (hits, misses, evictions, bytes); empty before first use."""
        return self._prefixes[1].stats() if self._prefixes is not None else {}

    def prefix(self, doc_ids: list[str], model):
        """The composed KV prefix of ``doc_ids``' cartridges in that order, in ``model``'s dtype and device; each
        cartridge is read from disk once and kept while the cache has room."""
        from hfx.cartridges.composition import check_same_base, load_prefix
        from hfx.cartridges.prefix import PrefixKV
        from hfx.cartridges.routing import CartridgeCache

        if self._prefixes is None or self._prefixes[0] != (model.dtype, model.device):
            check_same_base([self.cartridge_dir(i) for i in self.ids], model.config)
            cache = CartridgeCache(
                self.cache_bytes,
                load=lambda doc_id: load_prefix(
                    self.cartridge_dir(doc_id), dtype=model.dtype, device=model.device
                ),
                size_of=lambda prefix: prefix.nbytes,
            )
            self._prefixes = ((model.dtype, model.device), cache)
        cache = self._prefixes[1]
        return PrefixKV.concat([cache.get(self.document(doc_id).id) for doc_id in doc_ids])

    def answer(
        self,
        question: str,
        model,
        tokenizer,
        k: int = 2,
        router: str = "bm25",
        max_new_tokens: int = 128,
    ) -> LibraryAnswer:
        """Route ``question`` to its top-``k`` cartridges and answer greedily with them composed."""
        from hfx.cartridges.corpus import user_turn_ids
        from hfx.cartridges.prefix import generate_after_prefix

        (routed,) = self.route([question], k=k, router=router, model=model, tokenizer=tokenizer)
        doc_ids = [doc_id for doc_id, _ in routed]
        prefix = self.prefix(doc_ids, model)
        prompt = user_turn_ids(tokenizer, question, after_system=False)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        output, width = generate_after_prefix(
            model, prefix, [prompt], pad_id, max_new_tokens=max_new_tokens, do_sample=False
        )
        text = tokenizer.decode(
            output.sequences[0, width:] if hasattr(output, "sequences") else output[0, width:],
            skip_special_tokens=True,
        )
        return LibraryAnswer(
            question, text.strip(), doc_ids, [s for _, s in routed], router, prefix.num_tokens
        )


# ----------------------------------------------------------------------------------------------------------------
# `hfx cartridge library build` / `ask` (examples/cartridges/library.py under `accelerate launch`).

#: The variables a launcher (accelerate, torchrun) sets to make one distributed job of its processes.
LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
)


def leave_launch(environ=None) -> tuple[int, int, int]:
    """``(process_index, num_processes, local_index)`` of this process in a launch, taking the launcher's variables
    out of ``environ`` (``os.environ``): a library build gives each process its own documents to train alone, so
    no Trainer of it may join the others in one data-parallel job. Call it before anything reads the launch."""
    import os

    environ = os.environ if environ is None else environ
    position = (
        int(environ.get("RANK", 0)),
        int(environ.get("WORLD_SIZE", 1)),
        int(environ.get("LOCAL_RANK", 0)),
    )
    for name in LAUNCH_VARIABLES:
        environ.pop(name, None)
    return position


def process_device(
    device: str | None, num_processes: int, local_index: int, environ=None, device_count: int | None = None
) -> str | None:
    """The device a library build's process trains on, with this process narrowed to that one GPU.

    Trainer does not take a device: outside a distributed job it trains on the first visible GPU, and spreads a
    step over every visible GPU with ``DataParallel``. So a process of a launch (after :func:`leave_launch`),
    or a single process asked for ``cuda:N``, sets ``CUDA_VISIBLE_DEVICES`` (in ``environ``, ``os.environ`` by
    default) to its own GPU: the ``local_index``-th visible one in a launch (round robin when there are more
    processes than GPUs), the N-th for ``cuda:N``. Every stage (synthesis, training, tuning) then runs there, as
    ``cuda:0``. A launch with ``--cpu`` gives ``"cpu"``; anything else (the CPU, no GPU visible, a single process
    without an index) is returned as given.
    Must run before CUDA is initialized in this process (before any ``torch.cuda`` call but ``device_count``)."""
    import os

    import torch

    environ = os.environ if environ is None else environ
    if device is not None and device not in ("cuda", "auto") and not device.startswith("cuda:"):
        return device
    if device is None and environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return "cpu"  # `accelerate launch --cpu`, which Trainer follows too
    if device is not None and device.startswith("cuda:"):
        index = int(device.split(":", 1)[1])
    elif num_processes > 1:
        index = local_index
    else:
        return device
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [part.strip() for part in visible.split(",") if part.strip()]
    else:  # NVML's count: it does not initialize CUDA
        ids = [str(i) for i in range(torch.cuda.device_count() if device_count is None else device_count)]
    if not ids:
        return device
    if device is not None and device.startswith("cuda:") and index >= len(ids):
        raise ValueError(
            f"--device {device}: this process sees {len(ids)} GPU(s) (cuda:0 to cuda:{len(ids) - 1})."
        )
    if environ is os.environ and torch.cuda.is_initialized():  # too late for this process to see fewer GPUs
        raise RuntimeError(
            "CUDA is already initialized in this process, so it cannot be narrowed to one GPU; "
            "set CUDA_VISIBLE_DEVICES before starting it."
        )
    environ["CUDA_VISIBLE_DEVICES"] = ids[index % len(ids)]
    return "cuda:0"


@dataclass
class LibraryBuildArguments(DeviceArguments):
    documents: list[str] = field(
        default_factory=list,
        metadata={
            "help": "The documents, one cartridge each: files (text, PDF, HTML), folders of them (one document per "
            "file), bundled collections or corpus names (sklearn_descr, rcv1, ...), URLs."
        },
    )
    output_dir: str = field(default="outputs/library", metadata={"help": "The library's folder (resumable)."})
    model_name_or_path: str = field(
        default="embedded",
        metadata={"help": "Base model: 'embedded' (SmolLM2-135M-Instruct) or a local path."},
    )
    budget_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Minutes per document on this machine (the main job's planner); default: --num_conversations."
        },
    )
    distractors: str = field(
        default=DEFAULT_DISTRACTORS,
        metadata={
            "help": "Train each cartridge beside a changing mix of the others so that they compose: 'initial' (the "
            "others' untrained cartridges; documents train independently), 'trained' (their trained cartridges "
            "where they exist) or 'none' (each alone)."
        },
    )
    max_distractors: int = field(default=7, metadata={"help": "The most distractors in one training step."})
    num_virtual_tokens: int | None = field(
        default=None,
        metadata={"help": "Cartridge size p for every document; default: see --compression."},
    )
    tune_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Epochs of tuning the trained cartridges together (into OUTPUT_DIR/tuned, what the library then "
            "serves) so that any mix of them keeps each document's answers; default: the tuning's (2); 0: none."
        },
    )
    compression: int = field(
        default=DEFAULT_COMPRESSION,
        metadata={
            "help": "Each cartridge has 1/compression of its document's tokens (unless --num_virtual_tokens)."
        },
    )
    num_train_epochs: float | None = field(default=None, metadata={"help": "Default: the main job's."})
    learning_rate: float | None = field(default=None, metadata={"help": "Default: the main job's."})
    model_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype of the frozen base in training; default: the main job's (auto)."},
    )


def build_from_arguments(args: LibraryBuildArguments, synthesis) -> BuildReport:
    """`hfx cartridge library build`: this process's share of the documents, on its own device."""
    import dataclasses

    from hfx.cartridges.synthesis import SynthesisConfig

    process_index, num_processes, local_index = leave_launch()
    device = process_device(args.device, num_processes, local_index)
    training = {
        name: getattr(args, name)
        for name in ("num_virtual_tokens", "num_train_epochs", "learning_rate", "model_dtype")
        if getattr(args, name) is not None
    }
    if args.distractors != "none":
        training["max_distractors"] = args.max_distractors
    defaults = SynthesisConfig()
    changed = {
        f.name: getattr(synthesis, f.name)
        for f in dataclasses.fields(synthesis)
        if getattr(synthesis, f.name) != getattr(defaults, f.name)
    }
    settings = LibrarySettings(
        model_name_or_path=args.model_name_or_path,
        budget_minutes=args.budget_minutes,
        synthesis=changed,
        training=training,
        distractors=args.distractors,
    )
    return build_library(
        args.documents,
        args.output_dir,
        settings,
        device=device,
        dtype=args.dtype,
        process_index=process_index,
        num_processes=num_processes,
        compression=args.compression,
        tune_epochs=args.tune_epochs,
    )


# ----------------------------------------------------------------------------------------------------------------
# Sharing a library on the Hub.

#: The files of a cartridge folder that a shared library carries (no checkpoints, no synthesis).
SHARED_CARTRIDGE_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "hfx_cartridge.json",
    "README.md",
)


def stage_library(library: CartridgeLibrary, target: Path, repo_id: str | None = None) -> list[str]:
    """Write the upload folder of ``library`` into ``target``: ``library.json``, the documents' text, each finished
    cartridge (adapter, metadata, card) and its entry, and a card listing the documents. Returns the file list."""
    from hfx.cartridges.hub import MODEL_TAGS, hub_model_id
    from hfx.hub import render_card

    target.mkdir(parents=True, exist_ok=True)
    for document in library.documents:
        source_text = library.folder / document.document
        (target / document.document).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source_text, target / document.document)
        cartridge = Path(document.cartridge)
        (target / cartridge).mkdir(parents=True, exist_ok=True)
        for name in SHARED_CARTRIDGE_FILES:
            if (library.folder / cartridge / name).is_file():
                shutil.copy2(library.folder / cartridge / name, target / cartridge / name)
        entry = library.folder / cartridge.parent / ENTRY_FILE
        if entry.is_file():
            shutil.copy2(entry, target / cartridge.parent / ENTRY_FILE)
    manifest = {**library.manifest, "documents": [asdict(d) for d in library.documents], "pending": []}
    write_text_atomic(target / LIBRARY_FILE, json.dumps(manifest, indent=2) + "\n")
    hub_base = hub_model_id(library.base_model)
    render_card(
        "library_card.md",
        target / "README.md",
        card_data={
            "library_name": "peft",
            "base_model": hub_base,
            "pipeline_tag": "text-generation",
            "tags": [*MODEL_TAGS, "cartridge-library"],
        },
        manifest=library.manifest,
        documents=library.documents,
        repo_id=repo_id,
        base_model=hub_base,
    )
    return sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())


def push_library_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    dry_run_dir: str | Path | None = None,
    commit_message: str | None = None,
) -> dict:
    """Upload a library's finished cartridges, texts and manifest to the model repo ``repo_id`` with a card
    (:meth:`CartridgeLibrary.from_pretrained` loads it back). ``dry_run_dir``: write the upload folder there instead
    and upload nothing. Returns the repo id, URL, files, and the dry-run folder or the commit URL."""
    import tempfile

    from hfx.atomic import atomic_folder
    from hfx.cartridges.hub import HUB_URL, _check_repo_id
    from hfx.hub import push_folder

    library = CartridgeLibrary(folder)
    _check_repo_id(repo_id, "repo_id")
    if library.manifest.get("pending"):
        logger.warning(
            "%s: %s not finished; the upload leaves them out", folder, ", ".join(library.manifest["pending"])
        )
    result = {"repo_id": repo_id, "url": f"{HUB_URL}/{repo_id}"}
    if dry_run_dir is not None:
        dry_run_dir = Path(dry_run_dir)
        if dry_run_dir.exists() and any(dry_run_dir.iterdir()):
            raise FileExistsError(f"{dry_run_dir} exists and is not empty; choose another --dry-run folder.")
        with atomic_folder(dry_run_dir) as tmp:
            result["files"] = stage_library(library, tmp, repo_id)
        return {**result, "dry_run": True, "folder": str(dry_run_dir)}
    with tempfile.TemporaryDirectory(prefix="hfx-push-library-") as tmp:
        result["files"] = stage_library(library, Path(tmp) / "library", repo_id)
        result["commit_url"] = push_folder(
            Path(tmp) / "library",
            repo_id,
            private=private,
            commit_message=commit_message
            or f"Upload a cartridge library of {len(library.ids)} documents with hfx",
            delete_patterns=["*"],
        )
    return {**result, "dry_run": False}
