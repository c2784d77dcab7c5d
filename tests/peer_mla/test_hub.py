"""The PEER kernel repository hfx ships: where a run finds it (a path given, $HFX_PEER_KERNEL_REPO, the packaged
copy), and `hfx peer-mla push-kernel`, which publishes it in the layout `kernels.get_kernel` reads (HfApi
intercepted: what would be sent is recorded, each uploaded folder copied aside)."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import huggingface_hub
import pytest

from hfx.cli import main
from hfx.peer_mla.hub import (
    PEER_KERNEL_REPO_ENV,
    kernel_version,
    packaged_peer_kernel,
    peer_kernel_repository,
    push_peer_kernel,
)

ROOT = Path(__file__).resolve().parents[2]
KERNEL_REPO = ROOT / "hub_kernels" / "peer"
REPO_ID = "hfx-test/peer-kernel"
BUILD_FILES = {
    f"build/{variant}/{name}"
    for variant in ("torch-cpu", "torch-cuda")
    for name in ("metadata.json", "peer/__init__.py", "peer/_peer_triton.py", "peer/layers.py")
}


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()}


def _copy_of_the_kernel(tmp_path: Path, version: int | None = None) -> Path:
    copy = tmp_path / "peer-copy"
    shutil.copytree(KERNEL_REPO, copy, symlinks=True)
    if version is not None:
        metadata_path = copy / "build" / "torch-cuda" / "metadata.json"
        metadata = json.loads(metadata_path.read_text())
        metadata_path.write_text(json.dumps({**metadata, "version": version}))
    return copy


def test_the_kernel_is_package_data_of_hfx_and_found_in_order(tmp_path, monkeypatch):
    """The packaged copy is hfx's own `hub_kernels/peer` (in a checkout, the top-level folder it links to); the
    environment variable overrides it, and a path given overrides both."""
    monkeypatch.delenv(PEER_KERNEL_REPO_ENV, raising=False)
    packaged = Path(str(resources.files("hfx") / "hub_kernels" / "peer"))
    assert packaged_peer_kernel() == packaged.resolve() == KERNEL_REPO
    assert peer_kernel_repository() == KERNEL_REPO
    other = _copy_of_the_kernel(tmp_path)
    monkeypatch.setenv(PEER_KERNEL_REPO_ENV, str(other))
    assert peer_kernel_repository() == other
    assert peer_kernel_repository(KERNEL_REPO) == KERNEL_REPO
    with pytest.raises(FileNotFoundError, match=rf"not at {tmp_path} \(the path given\): no build/"):
        peer_kernel_repository(tmp_path)
    monkeypatch.setenv(PEER_KERNEL_REPO_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"not at \\${PEER_KERNEL_REPO_ENV} = {tmp_path}"):
        peer_kernel_repository()
    assert kernel_version(KERNEL_REPO) == 1


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """HfApi.create_repo / create_branch / upload_folder recorded instead of sent; uploaded folders copied aside
    (only the files the upload's allow_patterns let through)."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/kernels/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        copy = tmp_path / "uploaded" / f"{len(calls)}"
        allowed = kwargs.get("allow_patterns")
        shutil.copytree(
            folder_path,
            copy,
            ignore=None if allowed is None else lambda d, names: [n for n in names if n not in allowed],
        )
        calls.append(("upload_folder", repo_id, {**kwargs, "folder": copy}))
        return f"https://huggingface.co/kernels/{repo_id}/commit/{len(calls)}"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_puts_the_card_on_main_and_the_build_variants_on_the_version_branch(fake_hub, monkeypatch):
    monkeypatch.delenv(PEER_KERNEL_REPO_ENV, raising=False)
    result = push_peer_kernel(REPO_ID, private=True)
    assert [
        (name, repo, kw.get("repo_type"), kw.get("revision", kw.get("branch"))) for name, repo, kw in fake_hub
    ] == [
        ("create_repo", REPO_ID, "kernel", None),
        ("upload_folder", REPO_ID, "kernel", None),
        ("create_repo", REPO_ID, "kernel", None),
        ("create_branch", REPO_ID, "kernel", "v1"),
        ("upload_folder", REPO_ID, "kernel", "v1"),
    ]
    assert all(kw["private"] is True and kw["exist_ok"] for name, _, kw in fake_hub if name == "create_repo")
    card_upload, build_upload = (kw for name, _, kw in fake_hub if name == "upload_folder")
    assert card_upload["allow_patterns"] == ["README.md"] and not card_upload["delete_patterns"]
    assert _tree(card_upload["folder"]) == {"README.md"}
    # The version branch holds exactly the build variants (links resolved into files) and the card.
    assert build_upload["delete_patterns"] == ["*"] and build_upload["allow_patterns"] is None
    uploaded = build_upload["folder"]
    assert _tree(uploaded) == BUILD_FILES | {"README.md"}
    assert not any(path.is_symlink() for path in uploaded.rglob("*"))
    source = (KERNEL_REPO / "torch-ext" / "peer" / "layers.py").read_text()
    assert (uploaded / "build" / "torch-cpu" / "peer" / "layers.py").read_text() == source
    card = (uploaded / "README.md").read_text()
    assert f'get_kernel("{REPO_ID}", version=1)' in card and "<org>/peer" not in card
    assert huggingface_hub.ModelCard(card).data.library_name == "kernels"
    assert result["commit_url"] == f"https://huggingface.co/kernels/{REPO_ID}/commit/5"
    assert (result["url"], result["version"], result["revision"]) == (
        f"https://huggingface.co/kernels/{REPO_ID}",
        1,
        "v1",
    )
    assert not result["dry_run"] and result["kernel_dir"] == str(KERNEL_REPO)


def test_cli_push_kernel_dry_run_writes_a_folder_kernels_resolves(tmp_path, capsys, monkeypatch):
    from kernels.resolver import resolve_local_kernel

    monkeypatch.delenv(PEER_KERNEL_REPO_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["peer-mla", "push-kernel", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--repo_id" in help_text and "--kernel_dir" in help_text and "--dry_run" in help_text

    staged = tmp_path / "staged"
    main(["peer-mla", "push-kernel", "--repo_id", REPO_ID, "--dry_run", str(staged)])
    out = capsys.readouterr().out
    assert f"kernel for https://huggingface.co/kernels/{REPO_ID} (version 1, branch v1): {staged}" in out
    assert "nothing uploaded" in out and "next: set peer_kernel_repo" in out
    assert _tree(staged) == BUILD_FILES | {"README.md"}
    local = resolve_local_kernel(staged, backend="cpu")
    assert (
        local.variant_str == "torch-cpu"
        and str(local.metadata.name) == "peer"
        and local.metadata.version == 1
    )


def test_push_kernel_refuses_bad_input_before_uploading(tmp_path, fake_hub, monkeypatch):
    monkeypatch.delenv(PEER_KERNEL_REPO_ENV, raising=False)
    with pytest.raises(
        SystemExit, match="repo_id must be a Hub repository id 'owner/name', got 'peer-kernel'"
    ):
        main(["peer-mla", "push-kernel", "--repo_id", "peer-kernel"])
    with pytest.raises(
        SystemExit, match=rf"hfx peer-mla push-kernel: error: .*not at {tmp_path} \(the path given\)"
    ):
        main(["peer-mla", "push-kernel", "--repo_id", REPO_ID, "--kernel_dir", str(tmp_path)])
    mixed = _copy_of_the_kernel(tmp_path, version=2)
    with pytest.raises(ValueError, match="the build variants disagree on the kernel's name and version"):
        push_peer_kernel(REPO_ID, mixed)
    assert fake_hub == []
