"""Tuning a library's cartridges together, so that any mix of them keeps each document's answers.

A cartridge trained alone learned to be the whole context: composed with others, each one speaks about every
question, and the composition of a library's eight cartridges answers worse than any one of them. Distractor mixing
(``hfx cartridge library build --distractors``) trains a cartridge beside fixed other prefixes: it learns to be heard
among them, but nothing teaches the others to keep quiet about questions that are not theirs.

Tuning together does. Each step takes one document's synthesized conversations (their teacher is the model with that
document in context), composes that document's cartridge with a changing set of the library's other cartridges in a
random order, and trains every cartridge in the prefix on the teacher's answers: the document's own to give them,
the others to leave them as the teacher gives them. No new synthesis is needed: the conversations are the ones each
cartridge was trained on.

``hfx cartridge library build`` does this by default, into ``LIB/tuned`` (which the library then serves);
:func:`tune_library` and ``hfx cartridge library tune`` tune into any folder, with any settings. The result is a new
library folder, a stage (:mod:`hfx.stages`): the source library's documents with the tuned
cartridges, its ``library.json`` naming the source and the tuning. A rerun with the same settings and source reuses
it; a killed run resumes from its last checkpoint; a rebuilt source cartridge tunes the library again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from hfx.atomic import write_text_atomic
from hfx.cartridges.composition import check_same_base, prefix_from_embeddings, save_prefix
from hfx.cartridges.library import LIBRARY_FILE, LIBRARY_FORMAT, CartridgeLibrary, LibraryDocument
from hfx.cartridges.training import (
    CartridgeCollator,
    CartridgeTrainer,
    CartridgeTrainerDefaults,
    read_metadata,
)
from hfx.checkpoints import remove_checkpoints, train_or_restore
from hfx.stages import Stage, file_fingerprint, fingerprint, trainer_settings

logger = logging.getLogger(__name__)

TUNING_STAGE = "library-tuning"
#: The Trainer's folder (checkpoints, loss curve) inside the tuned library.
TUNING_DIR = "tuning"
WEIGHTS_FILE = "model.safetensors"  # what Trainer writes for a model that is not a PreTrainedModel


@dataclass
class LibraryTuningArguments(CartridgeTrainerDefaults):
    """``TrainingArguments`` of a library's tuning: one optimizer step is one document's ``conversations_per_step``
    conversations behind its cartridge and 0 to ``max_others`` of the others, in a random order."""

    output_dir: str | None = field(
        default="outputs/library-tuned",
        metadata={"help": "The tuned library's folder (the Trainer's checkpoints go to its tuning/)."},
    )
    conversations_per_step: int = field(
        default=8,
        metadata={"help": "Conversations of one document in each step (all behind the same prefix)."},
    )
    max_others: int = field(
        default=7,
        metadata={
            "help": "The most other cartridges beside the document's own in one step (0 to this, uniformly)."
        },
    )
    learning_rate: float = field(
        default=2e-2,
        metadata={"help": "Adam learning rate (the cartridges are trained already: below theirs)."},
    )
    #: The library table: all 8 composed 0.421 after 1 epoch, 0.457 after 2 (0.347 untuned; oracle ICL 0.547).
    num_train_epochs: float = field(default=2.0)
    per_device_train_batch_size: int = field(default=1)  # one step's group of conversations is one item

    def __post_init__(self):
        super().__post_init__()
        if self.per_device_train_batch_size != 1:
            raise ValueError(
                "A library's tuning batches one document's conversations per step: set conversations_per_step, "
                f"not per_device_train_batch_size ({self.per_device_train_batch_size})."
            )
        if self.conversations_per_step < 1:
            raise ValueError(f"conversations_per_step must be >= 1, got {self.conversations_per_step}.")
        if self.max_others < 0:
            raise ValueError(f"max_others must be >= 0, got {self.max_others}.")


@dataclass
class LibraryTuneCommand:
    """`hfx cartridge library tune`'s own options (the Trainer's are :class:`LibraryTuningArguments`, whose
    ``--output_dir`` is the tuned library's folder)."""

    library: str = field(
        metadata={"help": "The built library to tune (made by `hfx cartridge library build`)."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model (default: the library's)."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Start over in an output folder tuned with other settings."}
    )


# -- the steps --------------------------------------------------------------------------------------------------


def document_groups(sizes: list[int], conversations_per_step: int, seed: int) -> list[tuple[int, list[int]]]:
    """One epoch of a tuning's steps: ``(document, its conversations' row indices)``, every document's
    conversations once, shuffled and cut into groups of ``conversations_per_step``."""
    rng = random.Random(f"hfx-library-tuning-{seed}")
    groups = []
    for document, size in enumerate(sizes):
        rows = list(range(size))
        rng.shuffle(rows)
        groups += [
            (document, rows[start : start + conversations_per_step])
            for start in range(0, size, conversations_per_step)
        ]
    return groups


def tuning_layout(num_documents: int, document: int, max_others: int, seed: int, step: int) -> list[int]:
    """The prefix's documents, in order, for ``document``'s conversations at optimizer step ``step``: the document
    once and 0 to ``max_others`` distinct others (a uniform count, then a uniform choice), in a random order. A
    function of its arguments alone, so a resumed run mixes as the uninterrupted one did."""
    rng = random.Random(f"hfx-library-tuning-{seed}-{step}-{document}")
    others = [d for d in range(num_documents) if d != document]
    order = rng.sample(others, rng.randint(0, min(max_others, len(others))))
    order.insert(rng.randint(0, len(order)), document)
    return order


class DocumentGroups(torch.utils.data.Dataset):
    """The groups of :func:`document_groups` over the documents' synthesized datasets, one item per group."""

    def __init__(self, datasets: list, groups: list[tuple[int, list[int]]]):
        self.datasets = datasets
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict:
        document, rows = self.groups[index]
        return {"document": document, "rows": [self.datasets[document][i] for i in rows]}


class DocumentGroupCollator:
    """One group into the student's inputs (:class:`CartridgeCollator`) and its ``document``."""

    def __init__(self, pad_token_id: int):
        self.rows = CartridgeCollator(pad_token_id)

    def __call__(self, items: list[dict]) -> dict:
        if len(items) != 1:
            raise ValueError(
                f"One document's group per batch, got {len(items)} (per_device_train_batch_size must be 1)."
            )
        # the document stays a Python int: the step's layout is drawn on the host, with no device round trip
        return {**self.rows(items[0]["rows"]), "document": int(items[0]["document"])}


class MixedCartridges(torch.nn.Module):
    """A library's cartridges as parameters, fed to a frozen base model composed in any order.

    Each cartridge is PEFT's ``prompt_embeddings`` ``[p, layers * 2 * heads * head_dim]``: its first
    ``num_frozen_tokens`` rows frozen (the attention sink), the rest trained in float32. The base model is held, not
    registered: the module's state (what Trainer checkpoints) is the cartridges alone.
    """

    def __init__(
        self, base_model, embeddings: list[torch.Tensor], num_heads: int, num_frozen_tokens: int = 1
    ):
        super().__init__()
        object.__setattr__(self, "base", base_model)  # frozen, shared, not part of the saved state
        self.num_layers = base_model.config.num_hidden_layers
        self.num_heads = num_heads
        self.frozen = torch.nn.ParameterList(
            [
                torch.nn.Parameter(e[:num_frozen_tokens].float().clone(), requires_grad=False)
                for e in embeddings
            ]
        )
        self.trainable = torch.nn.ParameterList(
            [torch.nn.Parameter(e[num_frozen_tokens:].float().clone()) for e in embeddings]
        )

    @property
    def config(self):
        return self.base.config

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

    def embeddings(self, index: int) -> torch.Tensor:
        """Cartridge ``index``'s whole ``prompt_embeddings``."""
        return torch.cat([self.frozen[index], self.trainable[index]], dim=0)

    def forward(self, input_ids, attention_mask, order, **kwargs):
        indices = order.tolist() if torch.is_tensor(order) else list(order)
        embeddings = torch.cat([self.embeddings(i) for i in indices], dim=0)
        prefix = prefix_from_embeddings(embeddings, self.num_layers, self.num_heads, dtype=self.base.dtype)
        batch = input_ids.shape[0]
        cache = DynamicCache(config=self.base.config)
        for layer, (k, v) in enumerate(zip(prefix.keys, prefix.values, strict=True)):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), layer)
        mask = torch.cat([attention_mask.new_ones(batch, prefix.num_tokens), attention_mask], dim=1)
        return self.base(input_ids=input_ids, attention_mask=mask, past_key_values=cache, **kwargs)


class LibraryTuner(CartridgeTrainer):
    """:class:`CartridgeTrainer` whose student is :class:`MixedCartridges`, each group behind its step's prefix
    (:meth:`layout`)."""

    def __init__(self, *args, num_documents: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_documents = num_documents
        self.last_order: list[int] | None = None

    def layout(self, document: int) -> list[int]:
        """The prefix order for ``document``'s conversations at this step (:func:`tuning_layout`)."""
        return tuning_layout(
            self.num_documents, document, self.args.max_others, self.args.seed, self.state.global_step
        )

    def student_forward(self, model, inputs):
        self.last_order = self.layout(int(inputs["document"]))
        return super().student_forward(model, inputs, order=self.last_order)


# -- the tuned library ------------------------------------------------------------------------------------------


@dataclass
class TuningReport:
    """What a tuning did: the tuned library's folder, ``"done"`` when it was reused, its steps and minutes."""

    library: Path
    status: str
    steps: int = 0
    minutes: float = 0.0
    train_loss: float | None = None


def synthesis_dir(library: CartridgeLibrary, document: LibraryDocument) -> Path:
    """Where a built library keeps a document's synthesized conversations (beside its cartridge)."""
    return (library.folder / document.cartridge).parent / "synthesis"


def tuning_stage(
    library: CartridgeLibrary, output_dir: Path, args: LibraryTuningArguments, base: str
) -> Stage:
    """The stage of tuning ``library`` into ``output_dir``: the tuning's settings, and as inputs each document's
    text and cartridge and the synthesis it tunes on (a rebuilt source tunes again)."""
    settings = {
        **trainer_settings(args, own=("conversations_per_step", "max_others", "model_dtype")),
        "base_model": base,
    }
    inputs = {
        d.id: {
            "text_sha256": d.text_sha256,
            "cartridge": file_fingerprint(library.folder / d.cartridge / "adapter_model.safetensors"),
            "synthesis": fingerprint(
                sorted(p.name for p in (synthesis_dir(library, d) / "data").glob("*.parquet"))
            )
            + file_fingerprint(*sorted((synthesis_dir(library, d) / "data").glob("*.parquet"))),
        }
        for d in library.documents
    }
    return Stage(output_dir, TUNING_STAGE, settings, inputs)


def tune_library(
    source: str | Path,
    output_dir: str | Path,
    args: LibraryTuningArguments | None = None,
    model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> TuningReport:
    """Tune the cartridges of the library in ``source`` together (module docstring) into a new library in
    ``output_dir``; returns what it did. ``args.output_dir`` is replaced by ``output_dir/tuning``."""
    from hfx.cartridges.synthesis import load_synthesis
    from hfx.models import load_model, load_tokenizer, model_id, resolve_training_dtype

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "A library's tuning runs in one process (one GPU or the CPU): every step may touch every cartridge. "
            "Run it without `accelerate launch`, or with --num_processes 1."
        )
    source, output_dir = Path(source), Path(output_dir)
    if source.resolve() == output_dir.resolve():
        raise ValueError(f"{output_dir}: a tuned library goes into a folder of its own, not its source's.")
    library = CartridgeLibrary(source, tuned=False)  # what the build trained, each alone
    if library.manifest.get("pending"):
        raise ValueError(
            f"{source}: documents {', '.join(library.manifest['pending'])} have no cartridge yet; finish the build "
            "(run it again) before tuning."
        )
    missing = [d.id for d in library.documents if not (synthesis_dir(library, d) / "data").is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{source}: no synthesized conversations for {', '.join(missing)} (expected beside each cartridge, in "
            "cartridges/<document>/synthesis); tuning needs a library built here, not one downloaded."
        )
    tuning_dir = str(output_dir / TUNING_DIR)
    # the caller's arguments are left as they are: the Trainer's folder is the tuned library's
    args = dataclasses.replace(args, output_dir=tuning_dir) if args else LibraryTuningArguments(tuning_dir)
    model_name_or_path = model_name_or_path or library.model_name_or_path
    base = model_id(model_name_or_path)
    stage = tuning_stage(library, output_dir, args, base)
    status = stage.begin(overwrite=overwrite)
    if status == "done":
        remove_checkpoints(args.output_dir)  # left by a run killed after it finished
        return TuningReport(output_dir, "done", **_recorded(output_dir))

    start = time.time()
    tokenizer = load_tokenizer(model_name_or_path)
    device = args.device  # where Trainer trains: the frozen base goes there too
    model = load_model(
        model_name_or_path, device=device, dtype=resolve_training_dtype(args.model_dtype, device)
    )
    for param in model.parameters():
        param.requires_grad_(False)
    dirs = [library.cartridge_dir(d.id) for d in library.documents]
    check_same_base(dirs, model.config, base)
    from peft import PeftConfig
    from safetensors.torch import load_file

    heads = {PeftConfig.from_pretrained(str(d)).num_attention_heads for d in dirs}
    if len(heads) != 1:
        raise ValueError(f"{source}: cartridges with different numbers of heads ({sorted(heads)}).")
    sinks = {read_metadata(d).get("num_frozen_tokens", 1) for d in dirs}  # each cartridge's frozen sink stays
    if len(sinks) != 1:
        raise ValueError(f"{source}: cartridges with different numbers of frozen tokens ({sorted(sinks)}).")
    embeddings = [load_file(d / "adapter_model.safetensors")["prompt_embeddings"] for d in dirs]
    student = MixedCartridges(model, embeddings, heads.pop(), num_frozen_tokens=sinks.pop()).to(model.device)
    datasets = [load_synthesis(synthesis_dir(library, d)) for d in library.documents]
    groups = document_groups([len(d) for d in datasets], args.conversations_per_step, args.seed)
    trainer = LibraryTuner(
        model=student,
        args=args,
        train_dataset=DocumentGroups(datasets, groups),
        data_collator=DocumentGroupCollator(tokenizer.pad_token_id),
        num_documents=len(datasets),
    )
    logger.info(
        "Tuning %d cartridges of %s together: %d steps of %d conversations beside 0 to %d others",
        len(dirs),
        source,
        trainer.args.max_steps if trainer.args.max_steps > 0 else round(len(groups) * args.num_train_epochs),
        args.conversations_per_step,
        args.max_others,
    )
    train_loss, _ = train_or_restore(
        trainer, lambda checkpoint: student.load_state_dict(load_file(checkpoint / WEIGHTS_FILE))
    )
    trainer.save_state()  # the loss curve
    minutes = (time.time() - start) / 60
    _write_tuned_library(
        library, output_dir, student, base, args, trainer.state.global_step, minutes, train_loss
    )
    stage.finish()
    remove_checkpoints(args.output_dir)
    return TuningReport(output_dir, status, trainer.state.global_step, minutes, train_loss)


def _recorded(output_dir: Path) -> dict:
    tuning = json.loads((output_dir / LIBRARY_FILE).read_text(encoding="utf-8"))["tuning"]
    return {"steps": tuning["steps"], "minutes": tuning["minutes"], "train_loss": tuning["train_loss"]}


def _write_tuned_library(
    library: CartridgeLibrary,
    output_dir: Path,
    student: MixedCartridges,
    base: str,
    args: LibraryTuningArguments,
    steps: int,
    minutes: float,
    train_loss: float | None,
) -> None:
    """The tuned cartridges and the documents' text, then ``library.json`` last (the library is whole once it is
    there; the stage's marker follows)."""
    documents = []
    for index, document in enumerate(library.documents):
        folder = output_dir / document.cartridge
        with torch.no_grad():
            prefix = prefix_from_embeddings(student.embeddings(index), student.num_layers, student.num_heads)
        save_prefix(
            prefix,
            folder,
            base_model=base,
            metadata={"corpus": document.id, "tuned_from": str(library.folder / document.cartridge)},
        )
        text = output_dir / document.document
        text.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(library.folder / document.document, text)
        documents.append({**asdict(document), "initial": None})
    manifest = {
        "format": LIBRARY_FORMAT,
        "base_model": library.base_model,
        "settings": library.manifest["settings"],
        "tuning": {
            "source": str(library.folder),
            "settings": json.loads(
                json.dumps(trainer_settings(args, own=("conversations_per_step", "max_others")))
            ),
            "steps": steps,
            "minutes": minutes,
            "train_loss": train_loss,
        },
        "num_documents": len(documents),
        "documents": documents,
        "pending": [],
    }
    write_text_atomic(output_dir / LIBRARY_FILE, json.dumps(manifest, indent=2) + "\n")
