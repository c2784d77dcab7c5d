"""Cards and Hub transfer shared by every hfx artifact.

Cards are rendered from the templates in ``model_cards/`` with huggingface_hub's own card classes, so the YAML
front matter is what the Hub expects; pushing is ``upload_folder`` on the artifact directory as saved.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp name and a rename: readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (card included); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type=repo_type,
        commit_message=commit_message or f"Upload {Path(folder).name} with hfx",
        ignore_patterns=["checkpoint-*", "*.tmp*", ".*"],
    )
    return str(info)
