"""One resume protocol for every hfx trainer (cartridge, lens, PEER-MLA): a kill at any moment loses at most the work
since the last complete checkpoint, and never makes a later run skip work.

* A ``checkpoint-N`` folder counts only once it carries :data:`COMPLETE_MARKER`, written by
  :class:`MarkCompleteCheckpoints` after every process has written its part of it (Trainer writes checkpoints in
  place, so a kill while saving leaves a folder that looks like a checkpoint but is not one).
* :func:`last_complete_checkpoint` is what a run resumes from; incomplete folders are skipped with a warning.
* At the end of a run, results and metadata are written (atomically) first, then :func:`remove_checkpoints` takes
  each marker away before its folder is deleted; a run is marked done (its last file written) only when
  everything else is on disk.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hfx.atomic import write_text_atomic

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "hfx_checkpoint_complete"
#: Trainer's state file in a checkpoint (global step, max steps, the log history).
TRAINER_STATE = "trainer_state.json"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """The folder Trainer saves the checkpoint of ``step`` into."""
    return Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


class MarkCompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once every process has written its part, then rotates the checkpoints.

    Add it after any callback that writes into checkpoints in ``on_save``: callbacks run in the order they were
    added, and ``on_save`` runs once Trainer has written the checkpoint. With ``save_total_limit`` it keeps that
    many complete checkpoints (the best one too, when Trainer tracks it) and removes the others only after the new
    one is marked, each one's marker first (:func:`rotate_checkpoints`); Trainer's own rotation runs before the new
    checkpoint is complete, so :func:`use_checkpoint_protocol` turns it off.
    """

    def __init__(self, save_total_limit: int | None = None):
        self.save_total_limit = save_total_limit

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # every process has written its RNG state, the main one the rest
        folder = checkpoint_dir(args.output_dir, state.global_step)
        if state.is_world_process_zero and folder.is_dir():
            write_text_atomic(folder / COMPLETE_MARKER, "")
            if self.save_total_limit:
                rotate_checkpoints(args.output_dir, self.save_total_limit, keep=state.best_model_checkpoint)


def use_checkpoint_protocol(trainer) -> None:
    """Put a Trainer on hfx's checkpoint protocol: :class:`MarkCompleteCheckpoints` (added last, after the
    callbacks already there) takes over ``save_total_limit`` from Trainer's own rotation. The trainer gets its own
    copy of its arguments with ``save_total_limit=None``; the caller's arguments are left as they were."""
    import copy

    limit = trainer.args.save_total_limit
    if limit:
        trainer.args = copy.copy(trainer.args)
        trainer.args.save_total_limit = None
    trainer.add_callback(MarkCompleteCheckpoints(limit))


def rotate_checkpoints(output_dir: str | Path, limit: int, keep: str | Path | None = None) -> None:
    """Keep the ``limit`` highest-step complete checkpoints of ``output_dir`` (and ``keep``); remove the other
    complete ones, and incomplete ones below the newest complete one (left by kills). Each folder loses its marker
    before its files: a kill in the middle leaves a folder no run resumes from."""
    found = checkpoints(output_dir)
    complete = [path for _, path in found if is_complete_checkpoint(path)]
    if not complete:
        return
    kept = {path.name for path in complete[-limit:]}
    if keep is not None:
        kept.add(Path(keep).name)
    newest = max(step for step, path in found if path.name in kept)
    for step, path in found:
        if path.name in kept or step > newest:
            continue
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path)


def is_complete_checkpoint(path: str | Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-N`` folder in ``output_dir``, by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and step.isdigit():
            found.append((int(step), path))
    return sorted(found)


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step complete checkpoint of ``output_dir``, or ``None``; incomplete ones are skipped."""
    for _, path in reversed(checkpoints(output_dir)):
        if is_complete_checkpoint(path):
            return path
        logger.warning("Skipping %s: incomplete (the run was stopped while saving it).", path)
    return None


def planned_steps(trainer) -> int:
    """The optimizer steps ``trainer.train()`` takes in all, by Trainer's rule: ``max_steps`` when set, else the
    epochs times the steps of one epoch (this process's batches over the accumulation steps)."""
    if trainer.args.max_steps > 0:
        return trainer.args.max_steps
    batches = len(trainer.get_train_dataloader())
    per_epoch = max(math.ceil(batches / trainer.args.gradient_accumulation_steps), 1)
    return math.ceil(trainer.args.num_train_epochs * per_epoch)


def finished_state(checkpoint: str | Path | None, max_steps: int):
    """The checkpoint's ``TrainerState`` when it is already at the run's last step (``max_steps``): nothing is
    left to train. Else ``None``.

    A run killed after its last checkpoint has finished training. Trainer resumed from such a checkpoint takes one
    step more than ``max_steps`` (it steps before it checks), so the pipelines restore the checkpoint instead.
    """
    from transformers import TrainerState

    if checkpoint is None or not (Path(checkpoint) / TRAINER_STATE).is_file():
        return None
    state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE))
    return state if state.global_step >= max_steps > 0 else None


def train_or_restore(trainer, restore) -> tuple[float | None, float | None]:
    """Train ``trainer`` to its end, from the last complete checkpoint of its output folder when there is one.

    A run killed after its last checkpoint has finished training: it is not trained a step further (Trainer would
    take one more), ``restore(checkpoint)`` loads that checkpoint's weights into the model and Trainer's state is
    the checkpoint's. Returns the training loss and runtime (for a restored run: the mean logged loss, no runtime).
    """
    last = last_complete_checkpoint(trainer.args.output_dir)
    done = finished_state(last, planned_steps(trainer))
    if done is not None:
        logger.info("Training had finished in %s; restoring it", last)
        restore(last)
        trainer.state = done
        losses = [entry["loss"] for entry in done.log_history if "loss" in entry]
        return (sum(losses) / len(losses) if losses else None), None
    if last:
        logger.info("Resuming training from %s", last)
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    return result.training_loss, result.metrics.get("train_runtime")


def remove_checkpoints(output_dir: str | Path) -> None:
    """Delete the checkpoints of a finished run, each one's marker first: a kill half way through a deletion leaves
    a folder no later run will resume from."""
    for _, path in checkpoints(output_dir):
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path)
