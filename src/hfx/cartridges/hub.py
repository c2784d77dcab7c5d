"""Stage 5: share a cartridge and its self-study dataset on the Hub, each with a card that links the other.

What is uploaded is assembled (staged) first, as two folders: ``model/`` holds the PEFT adapter, its metadata and
evaluation, and a card re-rendered with the repo ids; ``dataset/`` holds the Parquet shards, the synthesis settings
and their card. Trainer checkpoints, optimizer states, temp files, hidden files and pickles are left out, and the
adapter's ``base_model_name_or_path`` becomes the base model's Hub id, so the pushed repos load the same way the
local folders do::

    PeftModel.from_pretrained(base_model, repo_id)
    datasets.load_dataset(dataset_repo_id, split="train")

With ``dry_run_dir`` the staged folders are kept there (written to a temp name, then renamed) and nothing is
uploaded; otherwise each folder is uploaded with ``upload_folder`` (dataset first, so the model card's link
resolves), and the repo ends up holding exactly the staged files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hfx.artifacts import shard_files
from hfx.atomic import atomic_folder, write_text_atomic
from hfx.cartridges.synthesis import FEATURES, SHARDS_WHAT, shard_statistics
from hfx.cartridges.training import METADATA_FILE, check_cartridge_weights
from hfx.hub import is_ignored, push_folder, render_card

logger = logging.getLogger(__name__)

MODEL_FOLDER = "model"
DATASET_FOLDER = "dataset"
EVAL_RESULTS_FILE = "eval_results.json"
SYNTHESIS_CONFIG_FILE = "synthesis_config.json"
#: Metadata fields the cartridge card cannot do without.
REQUIRED_METADATA = ("base_model", "corpus", "num_virtual_tokens")
MODEL_TAGS = ["hfx", "cartridges", "peft", "cartridge", "self-study"]
DATASET_TAGS = ["hfx", "cartridges", "self-study", "synthetic"]
HUB_URL = "https://huggingface.co"


@dataclass
class PushArguments:
    """`hfx cartridge push`: upload a cartridge (and the dataset it was trained on) with linked cards."""

    repo_id: str = field(metadata={"help": "Model repo id (user/name) to upload the cartridge to."})
    cartridge: str = field(
        default="outputs/cartridge", metadata={"help": "A saved cartridge folder (PEFT CARTRIDGE adapter)."}
    )
    synthesis_dir: str | None = field(
        default=None,
        metadata={"help": "Also upload this synthesis folder (the cartridge's training data) as a dataset."},
    )
    dataset_repo_id: str | None = field(
        default=None,
        metadata={"help": "Dataset repo id for --synthesis_dir; unset: <repo_id>-data."},
    )
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of the base model, for a cartridge trained from a local path; unset: the one "
            "recorded in the cartridge's hfx_cartridge.json."
        },
    )
    private: bool = field(default=False, metadata={"help": "Create the repos as private."})
    dry_run: str | None = field(
        default=None,
        metadata={
            "help": "Write the folders that would be uploaded to DIR/model and DIR/dataset and upload nothing."
        },
    )
    commit_message: str | None = field(default=None, metadata={"help": "Commit message of the uploads."})


# ----------------------------------------------------------------------------------------------------------------
# Checking the inputs: everything is read and validated before anything is written or uploaded.


@dataclass
class CartridgeFolder:
    """A saved cartridge, checked: its adapter config, hfx metadata and evaluation report (if any)."""

    path: Path
    adapter_config: dict
    metadata: dict
    report: dict | None


@dataclass
class SynthesisFolder:
    """A synthesis folder, checked: its shards, settings, and the numbers its card reports."""

    path: Path
    shards: list[Path]
    manifest: dict
    num_rows: int
    answer_tokens: int
    seed_kind_counts: dict[str, int]

    def summary(self) -> dict:
        return {
            "num_rows": self.num_rows,
            "answer_tokens": self.answer_tokens,
            "seed_kind_counts": self.seed_kind_counts,
            "top_k": self.manifest.get("top_k"),
            "corpus": self.manifest.get("corpus"),
        }


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot be read as JSON ({err}); {what}.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}; {what}.")
    return data


def check_cartridge(cartridge_dir: str | Path) -> CartridgeFolder:
    """Check that ``cartridge_dir`` is a finished hfx cartridge; raise naming the missing or broken file."""
    path = Path(cartridge_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: no such folder; pass a saved cartridge (the output_dir of training)."
        )
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{path}: no adapter_config.json; not a saved cartridge (train one with `hfx cartridge train`)."
        )
    adapter_config = _read_json(config_path, "a cartridge needs the PEFT adapter config")
    if adapter_config.get("peft_type") != "CARTRIDGE":
        raise ValueError(
            f"{config_path}: adapter type is {adapter_config.get('peft_type')!r}, not 'CARTRIDGE'; only "
            "cartridges are pushed by this command."
        )
    check_cartridge_weights(path, adapter_config.get("num_virtual_tokens"))
    metadata_path = path / METADATA_FILE
    if not metadata_path.is_file():
        raise FileNotFoundError(
            f"{path}: no {METADATA_FILE}, the metadata hfx writes after training (base model, corpus, steps) "
            "that the card is made from; train the cartridge with `hfx cartridge train`."
        )
    metadata = _read_json(metadata_path, "it is written by hfx after training")
    missing = [key for key in REQUIRED_METADATA if not metadata.get(key)]
    if missing:
        raise ValueError(
            f"{metadata_path}: missing {', '.join(missing)}; the card cannot be written without it."
        )
    report = None
    if (path / EVAL_RESULTS_FILE).is_file():
        report = _read_json(path / EVAL_RESULTS_FILE, "it is written by `hfx cartridge eval`")
        if "table" not in report:
            raise ValueError(
                f"{path / EVAL_RESULTS_FILE}: no 'table'; not an hfx evaluation. Run `hfx cartridge eval` "
                "again to rewrite it."
            )
    return CartridgeFolder(path, adapter_config, metadata, report)


def check_synthesis(synthesis_dir: str | Path) -> SynthesisFolder:
    """Check that ``synthesis_dir`` holds a self-study dataset (shards with every column of ``FEATURES``).

    Only the columns the card counts are read (row count, answer tokens, seed-prompt kinds), shard by shard.
    """
    path = Path(synthesis_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: no such folder; pass the synthesis_dir of `hfx cartridge synthesize`."
        )
    shards = shard_files(path, "train", "run `hfx cartridge synthesize` first", SHARDS_WHAT)
    config_path = path / SYNTHESIS_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{path}: no {SYNTHESIS_CONFIG_FILE} (the synthesis settings); not a folder made by "
            "`hfx cartridge synthesize`."
        )
    manifest = _read_json(config_path, "it is written by `hfx cartridge synthesize`")
    seed_kind_counts, answer_tokens, num_rows = shard_statistics(path)
    if num_rows == 0:
        raise ValueError(f"{path}: the shards hold no conversations; synthesize again with other settings.")
    return SynthesisFolder(path, shards, manifest, num_rows, answer_tokens, seed_kind_counts)


def check_same_run(cartridge: CartridgeFolder, synthesis: SynthesisFolder) -> None:
    """The dataset must be the one the cartridge was distilled from: same base model, same corpus."""
    for key, manifest_key, what in (("base_model", "model", "base model"), ("corpus", "corpus", "corpus")):
        trained_on, synthesized_on = cartridge.metadata.get(key), synthesis.manifest.get(manifest_key)
        if not synthesized_on:
            logger.warning("%s records no %s; cannot check it matches the cartridge's", synthesis.path, what)
        elif trained_on != synthesized_on:
            raise ValueError(
                f"{cartridge.path / METADATA_FILE} names the {what} {trained_on!r}, but "
                f"{synthesis.path / SYNTHESIS_CONFIG_FILE} names {synthesized_on!r}: this dataset did not train "
                "this cartridge. Pass the synthesis_dir the cartridge was trained on."
            )


def hub_model_id(name: str | None) -> str | None:
    """``name`` if it can be a Hub model id, else ``None``: a local path cannot be a card's ``base_model``."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not name or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _check_repo_id(repo_id: str, option: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{option} {repo_id!r} is not a valid Hub repo id ({err}); use user/name.") from None
    if "/" not in repo_id:
        raise ValueError(f"{option} {repo_id!r} has no namespace; use user/name or org/name.")


# ----------------------------------------------------------------------------------------------------------------
# Cards.


def render_cartridge_card(
    metadata: dict,
    output: str | Path,
    report: dict | None = None,
    repo_id: str | None = None,
    dataset_repo_id: str | None = None,
    base_model: str | None = None,
    dataset: dict | None = None,
) -> str:
    """Render ``model_cards/cartridge_card.md`` for a cartridge into ``output``; return the text.

    ``repo_id``/``dataset_repo_id`` are the repos the cartridge and its dataset are shared as (the card then
    loads from the repo and lists the dataset under ``datasets:``); ``base_model`` overrides the recorded one.
    """
    hub_base = base_model or hub_model_id(metadata.get("base_model"))
    return render_card(
        "cartridge_card.md",
        output,
        card_data={
            "library_name": "peft",
            "base_model": hub_base,
            "datasets": [dataset_repo_id] if dataset_repo_id else None,
            "pipeline_tag": "text-generation",
            "tags": MODEL_TAGS,
        },
        meta=metadata,
        report=report,
        repo_id=repo_id,
        dataset_repo_id=dataset_repo_id,
        base_model=hub_base,
        dataset=dataset,
    )


def _size_category(num_rows: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if num_rows < limit:
            return name
    return "100K<n<1M" if num_rows < 1_000_000 else "n>1M"


def render_synthesis_card(
    synthesis: SynthesisFolder,
    output: str | Path,
    repo_id: str | None = None,
    model_repo_id: str | None = None,
    base_model: str | None = None,
) -> str:
    """Render ``model_cards/dataset_card.md`` for a synthesis folder, linking the cartridge repo when given.

    ``base_model``: the Hub id to show for the synthesizing model when it was recorded as a local path.
    """
    manifest = {**synthesis.manifest, "model": base_model} if base_model else synthesis.manifest
    return render_card(
        "dataset_card.md",
        output,
        card_kind="dataset",
        card_data={
            "pretty_name": f"Self-study conversations about {synthesis.manifest.get('corpus')}",
            "size_categories": _size_category(synthesis.num_rows),
            "task_categories": ["text-generation"],
            "tags": DATASET_TAGS,
            "configs": [{"config_name": "default", "data_files": "data/train-*.parquet"}],
        },
        manifest=manifest,
        num_rows=synthesis.num_rows,
        answer_tokens=synthesis.answer_tokens,
        seed_kind_counts=synthesis.seed_kind_counts,
        features=FEATURES,
        repo_id=repo_id,
        model_repo_id=model_repo_id,
    )


# ----------------------------------------------------------------------------------------------------------------
# Staging: the exact folders that are uploaded.


def _place(source: Path, target: Path, link: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(source, target)  # a throwaway upload folder: no need to copy large shards
            return
        except OSError:
            pass
    shutil.copy2(source, target)


def _files_of(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def stage_cartridge(
    cartridge: CartridgeFolder,
    target: Path,
    repo_id: str | None,
    dataset_repo_id: str | None = None,
    base_model: str | None = None,
    dataset: dict | None = None,
    link: bool = False,
) -> list[str]:
    """Write the cartridge's upload folder into ``target``: its top-level files minus what must not be shared,
    ``adapter_config.json`` pointing at the base model's Hub id, and the re-rendered card. Returns the file list."""
    target.mkdir(parents=True)
    skipped = []
    for entry in sorted(cartridge.path.iterdir()):
        if entry.name in ("README.md", "adapter_config.json"):
            continue
        if not entry.is_file() or is_ignored(entry.name):
            skipped.append(entry.name)
            continue
        _place(entry, target / entry.name, link)
    if skipped:
        logger.info("Not uploaded from %s: %s", cartridge.path, ", ".join(skipped))
    adapter_config = dict(cartridge.adapter_config)
    if base_model:
        adapter_config["base_model_name_or_path"] = base_model
    write_text_atomic(
        target / "adapter_config.json", json.dumps(adapter_config, indent=2, sort_keys=True) + "\n"
    )
    render_cartridge_card(
        cartridge.metadata,
        target / "README.md",
        report=cartridge.report,
        repo_id=repo_id,
        dataset_repo_id=dataset_repo_id,
        base_model=base_model,
        dataset=dataset,
    )
    return _files_of(target)


def stage_synthesis(
    synthesis: SynthesisFolder,
    target: Path,
    repo_id: str | None,
    model_repo_id: str | None = None,
    base_model: str | None = None,
    link: bool = False,
) -> list[str]:
    """Write the dataset's upload folder into ``target``: the shards, the synthesis settings and the card."""
    target.mkdir(parents=True)
    for shard in synthesis.shards:
        _place(shard, target / "data" / shard.name, link)
    _place(synthesis.path / SYNTHESIS_CONFIG_FILE, target / SYNTHESIS_CONFIG_FILE, link)
    render_synthesis_card(
        synthesis, target / "README.md", repo_id=repo_id, model_repo_id=model_repo_id, base_model=base_model
    )
    return _files_of(target)


def _new_folder(folder: Path):
    """:func:`hfx.atomic.atomic_folder` for a folder the user named, which must be new or empty."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(
            f"{folder} exists and is not empty; choose another --dry-run folder or delete it."
        )
    return atomic_folder(folder)


# ----------------------------------------------------------------------------------------------------------------
# The entry point.


def push_cartridge_to_hub(
    cartridge_dir: str | Path,
    repo_id: str,
    synthesis_dir: str | Path | None = None,
    dataset_repo_id: str | None = None,
    base_model: str | None = None,
    private: bool = False,
    dry_run_dir: str | Path | None = None,
    commit_message: str | None = None,
) -> dict:
    """Upload a cartridge to the model repo ``repo_id`` and, with ``synthesis_dir``, its self-study dataset to
    ``dataset_repo_id`` (default ``<repo_id>-data``), each with a card linking the other.

    Every input is checked before anything is written. ``dry_run_dir``: write the upload folders to
    ``dry_run_dir/model`` and ``dry_run_dir/dataset`` instead, and upload nothing. Returns, per repo, its id,
    URL, files, and the dry-run folder or the commit URL.
    """
    cartridge = check_cartridge(cartridge_dir)
    _check_repo_id(repo_id, "repo_id")
    if dataset_repo_id and synthesis_dir is None:
        raise ValueError(
            f"dataset_repo_id {dataset_repo_id!r} given without synthesis_dir: nothing to upload there."
        )
    synthesis = None
    if synthesis_dir is not None:
        dataset_repo_id = dataset_repo_id or f"{repo_id}-data"
        _check_repo_id(dataset_repo_id, "dataset_repo_id")
        synthesis = check_synthesis(synthesis_dir)
        check_same_run(cartridge, synthesis)
    if base_model is not None:
        _check_repo_id(base_model, "base_model")
    hub_base = base_model or hub_model_id(cartridge.metadata["base_model"])
    if hub_base is None:
        logger.warning(
            "The cartridge was trained on %r, not a Hub model id: the card will have no base_model. "
            "Pass base_model (--base_model) with the model's Hub id.",
            cartridge.metadata["base_model"],
        )

    def stage(root: Path, link: bool) -> dict:
        staged = {}
        if synthesis is not None:
            files = stage_synthesis(
                synthesis, root / DATASET_FOLDER, dataset_repo_id, repo_id, base_model=hub_base, link=link
            )
            staged["dataset"] = {
                "repo_id": dataset_repo_id,
                "repo_type": "dataset",
                "url": f"{HUB_URL}/datasets/{dataset_repo_id}",
                "files": files,
            }
        files = stage_cartridge(
            cartridge,
            root / MODEL_FOLDER,
            repo_id,
            dataset_repo_id,
            hub_base,
            synthesis.summary() if synthesis else None,
            link=link,
        )
        staged["model"] = {
            "repo_id": repo_id,
            "repo_type": "model",
            "url": f"{HUB_URL}/{repo_id}",
            "files": files,
        }
        return staged

    if dry_run_dir is not None:
        dry_run_dir = Path(dry_run_dir)
        with _new_folder(dry_run_dir) as tmp:
            staged = stage(tmp, link=False)
        for name, folder in (("model", MODEL_FOLDER), ("dataset", DATASET_FOLDER)):
            if name in staged:
                staged[name]["folder"] = str(dry_run_dir / folder)
        logger.info("Dry run: upload folders written to %s; nothing uploaded", dry_run_dir)
        return {"dry_run": True, **staged}

    with tempfile.TemporaryDirectory(prefix="hfx-push-") as tmp:
        staged = stage(Path(tmp), link=True)
        # The dataset goes first so that the model card's link points at an existing repo.
        for name, folder in (("dataset", DATASET_FOLDER), ("model", MODEL_FOLDER)):
            if name not in staged:
                continue
            logger.info("Uploading %s to %s", name, staged[name]["url"])
            staged[name]["commit_url"] = push_folder(
                Path(tmp) / folder,
                staged[name]["repo_id"],
                repo_type=staged[name]["repo_type"],
                private=private,
                commit_message=commit_message
                or f"Upload the {cartridge.metadata['corpus']} cartridge's {name} with hfx",
                delete_patterns=["*"],  # the repo mirrors the staged folder: no stale shards or weights
            )
    return {"dry_run": False, **staged}
