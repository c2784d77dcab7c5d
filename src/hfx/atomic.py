"""Files and folders that appear only when complete: written under a temp name beside the target, then renamed.

Every writer in hfx goes through these, so a kill at any moment leaves either the previous state or the finished
file, never a half-written one that looks complete. Temp names start with a dot and are unique per call (several
processes and threads may write beside each other), and a failed block removes its temp file or folder.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temp_name(path: Path) -> Path:
    # Unique per process and call; created with the umask's permissions (mkstemp/mkdtemp would make it private).
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block succeeds it is renamed onto ``path`` (replacing it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside ``folder``; when the block succeeds it is renamed to ``folder``.

    ``folder`` may not exist or be empty. When another process or thread has put a non-empty ``folder`` there
    in the meantime, ``FileExistsError`` is raised (and the temp folder removed): the caller decides whether the
    other writer's result is the one it wanted.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(folder)
    tmp.mkdir()
    try:
        yield tmp
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        try:
            os.replace(tmp, folder)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(f"{folder} already exists and is not empty.") from err
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temp name and a rename: readers never see half of it."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
