"""Run a test's child process from a server that has already imported torch, transformers and hfx.

Kill tests need a process of their own (it is SIGKILLed), but most of a fresh interpreter's time goes into
importing torch and transformers. :func:`run_prewarmed` forks the child from multiprocessing's forkserver, which
imports :data:`PRELOAD` once per test session; the child then runs the code as ``python -c`` would (``sys.argv``,
``__main__``), with its own environment, its output in files, and its exit status (``-9`` when killed) returned
like ``subprocess.run``'s.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

#: Imported once, by the forkserver, before any child is forked.
PRELOAD = [
    "torch",
    "transformers",
    "peft",
    "datasets",
    "hfx.cartridges.pipeline",
    "hfx.lens.pipeline",
    "hfx.lens.nla_pipeline",
    "hfx.peer_mla.training",
    "hfx.cli",
]

_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(code: str, argv: list[str], env: dict, stdout: str, stderr: str, cwd: str | None) -> None:
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    sys.argv = ["-c", *argv]
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})


class Prewarmed:
    """A child started by :func:`start_prewarmed`: ``kill()``, ``wait(timeout)`` (its exit status), its output."""

    def __init__(self, code: str, argv: list[str], env: dict, cwd: str | None):
        self._tmp = tempfile.TemporaryDirectory()
        self.stdout_path, self.stderr_path = Path(self._tmp.name) / "stdout", Path(self._tmp.name) / "stderr"
        self.args = [sys.executable, "-c", code, *argv]
        self.process = _forkserver().Process(
            target=_child, args=(code, argv, env, str(self.stdout_path), str(self.stderr_path), cwd)
        )
        self.process.start()

    def poll(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
            raise subprocess.TimeoutExpired(self.args[:2], timeout)
        return self.process.exitcode

    def output(self) -> tuple[str, str]:
        read = lambda path: path.read_text(errors="replace") if path.exists() else ""  # noqa: E731
        return read(self.stdout_path), read(self.stderr_path)

    def close(self) -> None:
        self._tmp.cleanup()


def start_prewarmed(code: str, args: list, env: dict | None = None, cwd=None) -> Prewarmed:
    """``subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=cwd)``, forked from the prewarmed
    server; its output goes to files (:meth:`Prewarmed.output`)."""
    return Prewarmed(code, [str(a) for a in args], dict(env or os.environ), None if cwd is None else str(cwd))


def run_prewarmed(code: str, args: list, env: dict | None = None, timeout: float = 600, cwd=None):
    """``subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True)``,
    forked from the prewarmed server."""
    child = start_prewarmed(code, args, env, cwd)
    try:
        status = child.wait(timeout)
        return subprocess.CompletedProcess(child.args, status, *child.output())
    finally:
        child.close()
