"""Several CPU processes from ``accelerate launch --cpu --num_processes N``.

Without MPI, accelerate's launcher runs a ``--cpu`` script as one plain process whatever ``--num_processes`` says
(it only sets ``MASTER_ADDR``/``MASTER_PORT``). The example scripts call :func:`relaunch_cpu_processes` first: when
it sees that situation it starts the N processes itself with ``torch.distributed.run`` (gloo), which accelerate's
CPU backend then joins, so the command does what it reads as.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

_DISTRIBUTED_ENV = ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _flag(argv: list[str], names: tuple[str, ...]) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def requested_cpu_processes(launcher_argv: list[str] | None = None) -> int | None:
    """How many processes ``accelerate launch --cpu`` was asked for, when it started only this one; else None."""
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1", "yes"):
        return None
    if "MASTER_ADDR" not in env or any(name in env for name in _DISTRIBUTED_ENV):
        return None  # one process was asked for, or a distributed launcher already started them
    if launcher_argv is None:
        try:
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
                launcher_argv = [a.decode(errors="replace") for a in handle.read().split(b"\0") if a]
        except OSError:
            launcher_argv = []
    value = _flag(launcher_argv, ("--num_processes", "--num-processes"))
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def relaunch_cpu_processes() -> None:
    """Start ``--num_processes`` gloo processes of this script when ``accelerate launch --cpu`` started one.

    Returns in the worker processes (and whenever no relaunch is needed); the launching process exits with the
    workers' status.
    """
    processes = requested_cpu_processes()
    if processes is None or processes < 2:
        return
    from torch.distributed import run

    logger.warning("accelerate launch --cpu started one process; starting %d gloo processes.", processes)
    args = [
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        os.environ["MASTER_ADDR"],
        "--master_port",
        os.environ.get("MASTER_PORT", "29500"),
        sys.argv[0],
        *sys.argv[1:],
    ]
    try:
        run.main(args)
    except SystemExit as exit_:
        raise SystemExit(exit_.code) from None
    except Exception as err:  # the workers' failure is already in their output
        raise SystemExit(f"{processes} training processes failed: {type(err).__name__}") from None
    raise SystemExit(0)
