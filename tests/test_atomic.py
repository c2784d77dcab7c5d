"""Files and folders appear only when complete (hfx.atomic), and the embedded model is converted once when several
processes ask for it at the same time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from hfx.atomic import atomic_file, atomic_folder, write_text_atomic


def test_a_failed_write_leaves_the_previous_file_and_no_temp(tmp_path):
    target = tmp_path / "sub" / "result.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError, match="killed"), atomic_file(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new"


def test_written_files_and_folders_follow_the_umask_not_private_temp_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        with atomic_folder(tmp_path / "folder") as staging:
            (staging / "b.txt").write_text("y")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "folder" / "b.txt").read_text() == "y"


def test_a_folder_appears_only_when_its_block_succeeds_and_never_over_another_writers(tmp_path):
    folder = tmp_path / "out"
    with pytest.raises(ValueError), atomic_folder(folder) as staging:
        (staging / "part").write_text("1")
        raise ValueError("failed half way")
    assert not folder.exists() and list(tmp_path.iterdir()) == []

    folder.mkdir()  # an empty folder (made by the caller) is replaced
    with atomic_folder(folder) as staging:
        (staging / "done").write_text("1")
    assert (folder / "done").is_file()

    with pytest.raises(FileExistsError, match="already exists"), atomic_folder(folder) as staging:
        (staging / "other").write_text("2")
    assert sorted(p.name for p in folder.iterdir()) == ["done"]  # the first writer's result stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


CONVERT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import hfx.embedded as embedded

    def slow_convert(target: Path) -> None:  # stands in for the GGUF conversion, slow enough to overlap
        print("converting", flush=True)
        time.sleep(1.5)
        from hfx.atomic import atomic_folder
        with atomic_folder(target) as staging:
            (staging / "config.json").write_text("{}")
            (staging / "model.safetensors").write_bytes(b"weights")

    embedded._convert = slow_convert
    path = embedded.embedded_model_path()
    print("ready", (path / "model.safetensors").read_bytes().decode(), flush=True)
    """
)


def test_the_embedded_model_is_converted_once_when_processes_start_together(tmp_path):
    env = {**os.environ, "HFX_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen([sys.executable, "-c", CONVERT], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    assert sum(out.count("converting") for out in outputs) == 1, outputs
    assert all(out.strip().endswith("ready weights") for out in outputs), outputs
    models = tmp_path / "cache" / "models"
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == [
        "SmolLM2-135M-Instruct"
    ]
