"""Cards and Hub transfer shared by every hfx artifact.

Cards are rendered from the templates in ``model_cards/`` with huggingface_hub's own card classes, so the YAML
front matter is what the Hub expects; pushing is ``upload_folder`` on the artifact directory as saved, minus what is
never shared (:data:`UPLOAD_IGNORE_PATTERNS`).
"""

from __future__ import annotations

import fnmatch
from importlib import resources
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

from hfx.atomic import write_text_atomic

#: Never uploaded: Trainer checkpoints (resume state, optimizer moments), temp files of atomic writes, hidden
#: files, and pickled objects (``training_args.bin``, ``optimizer.pt``, ``rng_state.pth``...): hfx artifacts are
#: safetensors, Parquet and JSON only.
UPLOAD_IGNORE_PATTERNS = [
    "checkpoint-*",
    "*/checkpoint-*",
    "*.tmp*",
    ".*",
    "*/.*",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.pkl",
    "*.pickle",
    "runs/*",
    # a stage's manifest and marker (hfx.stages) describe the local folder and its inputs, not the artifact
    "hfx_stage_*",
    "*/hfx_stage_*",
]


def is_ignored(path_in_repo: str) -> bool:
    """Whether ``path_in_repo`` (relative, ``/``-separated) matches :data:`UPLOAD_IGNORE_PATTERNS`."""
    return any(fnmatch.fnmatch(path_in_repo, pattern) for pattern in UPLOAD_IGNORE_PATTERNS)


def template_path(name: str) -> Path:
    """Path of a card template shipped in ``model_cards/``."""
    path = Path(str(resources.files("hfx") / "model_cards" / name))
    if not path.is_file():
        raise FileNotFoundError(f"Card template {name!r} not found in {path.parent}.")
    return path


def render_card(
    template: str, output: str | Path, card_kind: str = "model", card_data: dict | None = None, **context
) -> str:
    """Render ``model_cards/<template>`` with ``context`` into ``output`` (written atomically); return the text."""
    if card_kind == "dataset":
        card = DatasetCard.from_template(
            DatasetCardData(**(card_data or {})), template_path=str(template_path(template)), **context
        )
    else:
        card = ModelCard.from_template(
            ModelCardData(**(card_data or {})), template_path=str(template_path(template)), **context
        )
    write_text_atomic(output, str(card))
    return str(card)


def push_folder(
    folder: str | Path,
    repo_id: str,
    repo_type: str = "model",
    private: bool = False,
    commit_message: str | None = None,
    delete_patterns: list[str] | None = None,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (card included); returns the commit URL.

    Files matching :data:`UPLOAD_IGNORE_PATTERNS` are never uploaded, and with ``allow_patterns`` only the files
    matching them are. Remote files matching ``delete_patterns`` that the folder does not have are deleted in the
    same commit (``["*"]``: the repo mirrors the folder). ``revision``: the branch to commit to (created from
    ``main`` if needed; kernel repositories keep each version on a branch ``v<version>``), ``main`` by default.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder to upload.")
    api = HfApi()
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    if revision not in (None, "main"):
        api.create_branch(repo_id, repo_type=repo_type, branch=revision, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type=repo_type,
        commit_message=commit_message or f"Upload {folder.name} with hfx",
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
        delete_patterns=delete_patterns,
        revision=revision,
        allow_patterns=allow_patterns,
    )
    return str(info)
