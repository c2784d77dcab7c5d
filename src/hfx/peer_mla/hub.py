"""The PEER Triton kernel as a `kernels` repository: the copy hfx ships, where a run finds it, and its push to the Hub.

hfx ships ``hub_kernels/peer`` (the kernel-builder layout: ``build.toml``, ``torch-ext/peer``, and the build
variants ``build/torch-cuda`` and ``build/torch-cpu`` that ``kernels.LocalLayerRepository`` loads) inside the
package, so an installed hfx kernelizes PEER experts without a source checkout. :func:`peer_kernel_repository`
finds it: an explicit path, else ``$HFX_PEER_KERNEL_REPO``, else the shipped copy.

:func:`push_peer_kernel` publishes it as a Hub repository of type ``kernel``, in the layout ``kernels.get_kernel``
reads: the build variants and the card on the branch ``v<version>`` (``v1``), the card alone on ``main``. A
PEER-MLA model then names it in its config (``PeerMlaConfig(peer_kernel_repo="user/peer-kernel")``), and a model
loaded with ``trust_remote_code=True`` where hfx is not installed kernelizes its experts from there::

    hfx peer-mla push-kernel --repo_id you/peer-kernel
    model.kernelize_peer_experts()  # or from_pretrained(..., trust_remote_code=True, use_kernels=True)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from hfx.atomic import atomic_folder
from hfx.hub import is_ignored, push_folder

#: Path of a PEER kernel repository to use instead of the copy shipped with hfx (a development checkout, say).
PEER_KERNEL_REPO_ENV = "HFX_PEER_KERNEL_REPO"
PEER_KERNEL_NAME = "peer"
CARD_NAME = "README.md"
HUB_URL = "https://huggingface.co"
# Left out of what is pushed: bytecode (an installed copy has it) besides what no hfx upload carries.
_STAGE_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


@dataclass
class PushKernelArguments:
    """`hfx peer-mla push-kernel`: publish the PEER Triton kernel as a Hub kernel repository."""

    repo_id: str = field(
        metadata={"help": "Hub repository id (user/name) of type kernel to publish the kernel to."}
    )
    kernel_dir: str | None = field(
        default=None,
        metadata={
            "help": f"The kernel repository folder to publish; unset: ${PEER_KERNEL_REPO_ENV}, else the copy "
            "shipped with hfx."
        },
    )
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    dry_run: str | None = field(
        default=None,
        metadata={"help": "Write the folder that would be uploaded to DIR and upload nothing."},
    )
    commit_message: str | None = field(default=None, metadata={"help": "Commit message of the uploads."})


def packaged_peer_kernel() -> Path:
    """The PEER kernel repository shipped inside the hfx package (``hfx/hub_kernels/peer``)."""
    return Path(str(resources.files("hfx") / "hub_kernels" / PEER_KERNEL_NAME)).resolve()


def peer_kernel_repository(repo_path: str | os.PathLike | None = None) -> Path:
    """The local PEER kernel repository (the `kernels` layout) to load: ``repo_path`` when given, else
    ``$HFX_PEER_KERNEL_REPO`` when set, else the copy shipped with hfx. Raises when the chosen folder has no build
    variants."""
    configured = os.environ.get(PEER_KERNEL_REPO_ENV)
    if repo_path is not None:
        candidate, where = Path(repo_path), f"{repo_path} (the path given)"
    elif configured:
        candidate, where = Path(configured), f"${PEER_KERNEL_REPO_ENV} = {configured}"
    else:
        candidate, where = packaged_peer_kernel(), f"{packaged_peer_kernel()} (the copy shipped with hfx)"
    if any((candidate / "build").glob("*/metadata.json")):
        return candidate
    raise FileNotFoundError(
        f"The PEER Triton kernel repository is not at {where}: no build/<variant>/metadata.json there. Point "
        f"{PEER_KERNEL_REPO_ENV} (or the path given) at a kernel repository in the `kernels` layout, such as "
        "hub_kernels/peer of an hfx checkout, unset it to use the copy shipped with hfx, or use --peer_kernel pytorch."
    )


def kernel_version(repo: str | os.PathLike) -> int:
    """The version every build variant of the kernel repository ``repo`` declares (its Hub branch is ``v<it>``)."""
    found = {}
    for metadata_path in sorted(Path(repo).glob("build/*/metadata.json")):
        try:
            metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
            found[metadata_path.parent.name] = (metadata["name"], int(metadata["version"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{metadata_path}: not a kernel build's metadata (a JSON object with 'name' and an integer "
                f"'version'): {err}."
            ) from None
    if not found:
        raise FileNotFoundError(f"{repo}: no build/<variant>/metadata.json, so no build variant to publish.")
    if len(set(found.values())) != 1:
        raise ValueError(
            f"{repo}: the build variants disagree on the kernel's name and version ({found}); one version is "
            "published at a time, so make their metadata.json agree."
        )
    return next(iter(found.values()))[1]


def stage_peer_kernel(repo: str | os.PathLike, folder: str | os.PathLike, repo_id: str) -> list[str]:
    """Write what a push uploads into ``folder``: ``build/`` (links resolved: the Hub stores files) and the card,
    with the repository id in its usage examples; returns the files, relative to ``folder``."""
    repo, folder = Path(repo), Path(folder)
    shutil.copytree(repo / "build", folder / "build", symlinks=False, ignore=_STAGE_IGNORE)
    card = repo / CARD_NAME
    if not card.is_file():
        raise FileNotFoundError(f"{repo}: no {CARD_NAME}, the kernel's card on the Hub.")
    (folder / CARD_NAME).write_text(
        card.read_text(encoding="utf-8").replace(f"<org>/{PEER_KERNEL_NAME}", repo_id), encoding="utf-8"
    )
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return [name for name in files if not is_ignored(name)]


def push_peer_kernel(
    repo_id: str,
    repo_path: str | os.PathLike | None = None,
    private: bool = False,
    dry_run_dir: str | os.PathLike | None = None,
    commit_message: str | None = None,
) -> dict:
    """Publish the PEER kernel repository (:func:`peer_kernel_repository` of ``repo_path``) to the Hub kernel
    repository ``repo_id``: the card on ``main``, then the build variants and the card on the branch
    ``v<version>``, which then holds exactly them. ``kernels.get_kernel(repo_id, version=<version>)`` loads it.

    With ``dry_run_dir`` the folder that would be uploaded is written there and nothing is uploaded. Returns the
    repository's URL, the version and its branch, the files, and (uploaded) the commit URLs."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must be a Hub repository id 'owner/name', got {repo_id!r}.")
    repo = peer_kernel_repository(repo_path)
    version = kernel_version(repo)
    result = {
        "repo_id": repo_id,
        "url": f"{HUB_URL}/kernels/{repo_id}",
        "kernel_dir": str(repo),
        "version": version,
        "revision": f"v{version}",
        "dry_run": dry_run_dir is not None,
    }
    if dry_run_dir is not None:
        with atomic_folder(dry_run_dir) as staged:
            result["files"] = stage_peer_kernel(repo, staged, repo_id)
        result["folder"] = str(dry_run_dir)
        return result
    with tempfile.TemporaryDirectory(prefix="hfx-peer-kernel-") as tmp:
        staged = Path(tmp) / repo_id.split("/")[1]
        staged.mkdir()
        result["files"] = stage_peer_kernel(repo, staged, repo_id)
        message = commit_message or f"Upload the PEER kernel version {version} with hfx"
        result["card_commit_url"] = push_folder(
            staged,
            repo_id,
            repo_type="kernel",
            private=private,
            commit_message=message,
            allow_patterns=[CARD_NAME],
        )
        result["commit_url"] = push_folder(
            staged,
            repo_id,
            repo_type="kernel",
            private=private,
            commit_message=message,
            delete_patterns=["*"],
            revision=result["revision"],
        )
    return result


__all__ = [
    "PEER_KERNEL_REPO_ENV",
    "PushKernelArguments",
    "kernel_version",
    "packaged_peer_kernel",
    "peer_kernel_repository",
    "push_peer_kernel",
    "stage_peer_kernel",
]
