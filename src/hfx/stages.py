"""The stage protocol: what every hfx stage writes into its output folder, in which order, and what a rerun does.

A *stage* is one step of a pipeline that makes files in a folder: synthesis, training a cartridge, a lens or a
PEER-MLA model, one run of an ablation, a quanta or lens dump. Each stage's folder holds

1. ``hfx_stage_<name>.json``, the manifest, written first: *what made it* — the settings that change the result,
   fingerprints of its inputs (files, upstream stages, the base model) and the version of its on-disk format;
2. the stage's own files (shards, checkpoints, weights, metrics, cards), each written atomically;
3. ``hfx_stage_<name>.done``, the completion marker, written last, once every result file is final; its content
   is the manifest's fingerprint, which downstream stages record among their inputs.

A rerun into the same folder (:meth:`Stage.begin`):

* the same manifest, marker present: the result is reused (``"done"``);
* the same manifest, no marker: the stage resumes from what it has (``"resume"``);
* other settings or another format: refused with :class:`StageMismatch`, which names each differing setting;
  ``overwrite=True`` (the commands' ``--overwrite``) clears the folder and starts over;
* the same settings but other inputs (an upstream stage was recomputed, the data changed): the folder is cleared
  and the stage recomputed (``"new"``), with a warning naming the inputs that changed;
* a folder with files but no stage manifest at all (made by something else, or by an older hfx): refused unless
  ``overwrite``. Stages may share a folder (an ablation's run and the training it launches): each has its own
  manifest and marker, and clearing the folder clears them all.

Clearing and finishing keep the order that makes a kill at any moment safe: the marker goes first and comes last,
so a folder is never "done" while half-written, half-deleted or rewritten in place (:meth:`Stage.reopen`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from hfx.atomic import write_text_atomic

logger = logging.getLogger(__name__)

MANIFEST_PREFIX = "hfx_stage_"


#: ``TrainingArguments`` that change what any trainer makes (optimizer, schedule, batch, length, seed): every
#: training stage records them among its settings, beside its own.
TRAINER_SETTINGS = (
    "learning_rate",
    "weight_decay",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "seed",
)


def trainer_settings(args, own: tuple[str, ...] = ()) -> dict:
    """The values of :data:`TRAINER_SETTINGS` and ``own`` in ``args`` (those it has), and its number of processes."""
    settings = {name: getattr(args, name) for name in (*TRAINER_SETTINGS, *own) if hasattr(args, name)}
    settings["num_processes"] = args.world_size
    return settings


class StageMismatch(ValueError):
    """A folder holds a stage made with other settings (or by something else)."""


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(value) -> str:
    """A short stable hash of a JSON-able value (settings, a manifest, a list of file fingerprints)."""
    return hashlib.sha256(_canonical(value).encode()).hexdigest()[:16]


def file_fingerprint(*paths: str | Path) -> str:
    """The fingerprint of files' contents (in the order given)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def dataset_fingerprint(dataset) -> str:
    """The fingerprint of a ``datasets.Dataset``'s rows (their Arrow data, in order, after any selection)."""
    import pyarrow as pa

    table = dataset.with_format("arrow")[:]
    digest = hashlib.sha256()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    digest.update(sink.getvalue())
    return digest.hexdigest()[:16]


def _differences(old, new, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return found
    if _canonical(old) == _canonical(new):
        return []
    return [f"{prefix}: {_canonical(old)} -> {_canonical(new)}"]


class Stage:
    """One stage's manifest and completion marker in ``directory`` (see the module's docstring).

    ``settings`` are what change the result (JSON-able); ``inputs`` are fingerprints of what the stage reads (a
    change there recomputes the stage rather than refusing it); ``version`` is the stage's on-disk format.
    """

    def __init__(
        self, directory: str | Path, name: str, settings: dict, inputs: dict | None = None, version=1
    ):
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"A stage name is letters, digits, '-' and '_'; got {name!r}.")
        self.directory = Path(directory)
        self.name = name
        self.manifest = {
            "stage": name,
            "version": version,
            "settings": json.loads(_canonical(settings)),
            "inputs": json.loads(_canonical(inputs or {})),
        }

    @classmethod
    def recorded(cls, directory: str | Path, name: str) -> Stage:
        """The stage as its folder's manifest records it (to mark done, once every process's part is written, a
        stage that each process began with the same settings)."""
        manifest = stage_manifest(directory, name)
        if manifest is None:
            raise FileNotFoundError(f"{directory}: no {MANIFEST_PREFIX}{name}.json.")
        return cls(directory, name, manifest["settings"], manifest["inputs"], manifest["version"])

    # -- files ---------------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.directory / f"{MANIFEST_PREFIX}{self.name}.json"

    @property
    def marker_path(self) -> Path:
        return self.directory / f"{MANIFEST_PREFIX}{self.name}.done"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.manifest)

    @property
    def done(self) -> bool:
        """Whether this stage, with these settings and inputs, is finished in its folder."""
        return self.marker_path.is_file() and self.read_manifest() == self.manifest

    def read_manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise StageMismatch(f"{self.manifest_path}: not a stage manifest ({error}).") from error

    # -- protocol ------------------------------------------------------------------------------------------------
    def status(self) -> str:
        """``"new"``, ``"resume"`` or ``"done"`` for this folder, without changing anything; raises
        :class:`StageMismatch` where :meth:`begin` would refuse, and answers ``"new"`` where it would recompute."""
        existing = self.read_manifest()
        if existing is None:
            # files beside another stage's manifest belong to that stage (a run folder holding its trainer's)
            if self._has_files() and not any(self.directory.glob(f"{MANIFEST_PREFIX}*.json")):
                raise StageMismatch(
                    f"{self.directory} holds files but no {self.manifest_path.name}: it was not made by the hfx "
                    f"stage {self.name!r} (or by an older hfx). Choose another folder, or pass --overwrite to "
                    "replace its contents."
                )
            return "new"
        changed = self._changed(existing, ("stage", "version", "settings"))
        if changed:
            raise StageMismatch(
                f"{self.directory} holds a {self.name} made with other settings:\n  "
                + "\n  ".join(changed)
                + "\nUse another output folder, or pass --overwrite to start over."
            )
        if self._changed(existing, ("inputs",)):
            return "new"
        return "done" if self.marker_path.is_file() else "resume"

    def begin(self, overwrite: bool = False) -> str:
        """Check the folder against this stage and prepare it: returns ``"done"`` (reuse the result),
        ``"resume"`` (continue from what is there) or ``"new"`` (an empty folder with the manifest written).
        ``overwrite`` clears a folder made with other settings (or by something else) instead of refusing."""
        try:
            status = self.status()
        except StageMismatch:
            if not overwrite:
                raise
            logger.warning("%s: --overwrite, clearing it for %s", self.directory, self.name)
            self.clear()
            status = "new"
        else:
            if status == "new" and self.read_manifest() is not None:
                changed = self._changed(self.read_manifest(), ("inputs",))
                logger.warning(
                    "%s: the inputs of %s changed (%s); recomputing it",
                    self.directory,
                    self.name,
                    "; ".join(changed),
                )
                self.clear()
        if status == "new":
            self.directory.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.manifest_path, json.dumps(self.manifest, indent=2) + "\n")
        elif status == "done":
            logger.info("%s: %s already done with these settings; reusing it", self.directory, self.name)
        else:
            logger.info("%s: resuming %s", self.directory, self.name)
        return status

    def finish(self) -> None:
        """Mark the stage done: call once every result file is final, before any cleanup."""
        if self.read_manifest() != self.manifest:
            raise RuntimeError(f"{self.directory}: finish() without begin() of this {self.name}.")
        write_text_atomic(self.marker_path, self.fingerprint + "\n")

    def restate(self) -> None:
        """Record this stage's settings in place of the folder's, unmarked: for a run continued, from what it has,
        with a setting it may change (more steps from a kept checkpoint). The caller decides that it may."""
        self.reopen()
        self.directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.manifest_path, json.dumps(self.manifest, indent=2) + "\n")

    def differences(self) -> list[str]:
        """The settings (and format) in which the folder's manifest differs from this stage's."""
        existing = self.read_manifest()
        return self._changed(existing, ("stage", "version", "settings")) if existing is not None else []

    def reopen(self) -> None:
        """Take the marker away before a finished result is rewritten in place (a kill then leaves it unfinished)."""
        self.marker_path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Empty the folder: the markers first, then the manifests' files, the manifests last."""
        if not self.directory.is_dir():
            return
        for marker in self.directory.glob(f"{MANIFEST_PREFIX}*.done"):
            marker.unlink()
        manifests = set(self.directory.glob(f"{MANIFEST_PREFIX}*.json"))
        for entry in self.directory.iterdir():
            if entry in manifests:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        for manifest in manifests:
            manifest.unlink()

    # -- helpers -------------------------------------------------------------------------------------------------
    def _has_files(self) -> bool:
        return self.directory.is_dir() and any(self.directory.iterdir())

    def _changed(self, existing: dict, keys) -> list[str]:
        found = []
        for key in keys:
            found += _differences(existing.get(key), self.manifest.get(key), key)
        return found


def run_shards(
    num_shards: int,
    shard_file,
    write_shard,
    size=lambda shard: 1,
    process_index: int = 0,
    num_processes: int = 1,
    desc: str = "shards",
    unit: str = "it",
    progress: bool = True,
) -> list[int]:
    """The resumable loop of a sharded stage: this process's shards (``i, i + n, ...`` of ``num_shards`` for
    process ``i`` of ``n``) whose file (``shard_file(shard)``) is not on disk yet are made, in order, by
    ``write_shard(shard, bar)``, which writes the file atomically and advances the progress bar by what it did (in
    the units of ``size(shard)``, the shard's share of the bar). A kill loses at most the shard being made; a rerun
    makes the rest. Returns the shards made."""
    from tqdm.auto import tqdm

    mine = range(process_index, num_shards, num_processes)
    todo = [shard for shard in mine if not Path(shard_file(shard)).exists()]
    if len(todo) < len(mine):
        logger.info("%s: resuming, %d of %d shards already written", desc, len(mine) - len(todo), len(mine))
    with tqdm(
        total=sum(size(shard) for shard in mine),
        initial=sum(size(shard) for shard in mine if shard not in todo),
        desc=desc,
        unit=unit,
        disable=not progress,
    ) as bar:
        for shard in todo:
            write_shard(shard, bar)
    return todo


def begin_stage(stage: Stage, overwrite: bool = False, process_index: int = 0, num_processes: int = 1) -> str:
    """:meth:`Stage.begin` on the main process (index 0) before the other processes read the folder: under
    ``accelerate launch`` they wait for it, so none writes into a folder that is being checked or cleared."""
    if num_processes == 1:
        return stage.begin(overwrite=overwrite)
    from accelerate import PartialState

    with PartialState().main_process_first():
        return stage.begin(overwrite=overwrite) if process_index == 0 else stage.status()


def stage_manifest(directory: str | Path, name: str) -> dict | None:
    """The manifest (settings, inputs) of stage ``name`` in ``directory``, or None when there is none."""
    path = Path(directory) / f"{MANIFEST_PREFIX}{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def stage_fingerprint(directory: str | Path, name: str) -> str | None:
    """The fingerprint a finished stage left in ``directory`` (its marker's content), or None when unfinished."""
    marker = Path(directory) / f"{MANIFEST_PREFIX}{name}.done"
    return marker.read_text(encoding="utf-8").strip() if marker.is_file() else None
