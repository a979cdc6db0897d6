"""Checkpoints of a run: student + optimizer, and beside them each host's input iterator.

  checkpoints/ckpt-<step>                 student + optimizer (written by the chief)
  checkpoints/data-host<h>/ckpt-<step>    host h's tf.data iterator at that step

The input position is saved first: the model's checkpoint is what marks a step as done, so a
run killed between the two saves resumes from the previous step with both halves present.
Other hosts write their (identical) model checkpoint to `tmp/host<h>/`, which
MultiWorkerMirroredStrategy needs every worker to do, and remove it at the end.
"""

from __future__ import annotations

import logging
import os

import tensorflow as tf

from mnv4_train import ownership
from mnv4_train.errors import InputPathError

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves and restores student + optimizer and this host's input iterator together."""

  def __init__(self, workdir: str, *, model, optimizer, iterator, host: int = 0,
               keep: int = 3):
    self.workdir = workdir
    self.host = host
    self.chief = host == 0
    self.dir = os.path.join(workdir, "checkpoints")
    model_dir = self.dir if self.chief else self._scratch_dir()
    self._model = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, optimizer=optimizer), model_dir, keep)
    self._data_dir = os.path.join(self.dir, f"data-host{host}")
    self._data_ckpt = tf.train.Checkpoint(iterator=iterator)
    self._data = tf.train.CheckpointManager(self._data_ckpt, self._data_dir, keep)

  def _scratch_dir(self):
    return os.path.join(self.workdir, "tmp", f"host{self.host}")

  def restore(self) -> int:
    """Restores the latest checkpoint, if any; the step it was taken at (0 without one).

    Raises:
      InputPathError: the model checkpoint has no input position for this host (the run was
        started with another host layout).
    """
    latest = tf.train.latest_checkpoint(self.dir)
    if not latest:
      return 0
    self._model.checkpoint.restore(latest).assert_existing_objects_matched()
    # The step is in the name (`save` numbers checkpoints by step), not the optimizer's
    # iterations: under float16 loss scaling a step with non-finite gradients is skipped and
    # does not count as an iteration, but it did consume a batch.
    step = int(latest.rsplit("-", 1)[1])
    data_path = os.path.join(self._data_dir, f"ckpt-{step}")
    if not tf.io.gfile.exists(data_path + ".index"):
      raise InputPathError(f"{self.workdir} has a checkpoint at step {step} but no input "
                           f"position for host {self.host} ({data_path}); resume with the same "
                           "hosts")
    self._data_ckpt.restore(data_path).assert_existing_objects_matched()
    log.info("resumed from %s at step %d", latest, step)
    return step

  def save(self, step: int) -> None:
    """Saves both halves at `step`; on a failed write (a full disk) removes what it began.

    Raises:
      StorageError: the disk (or quota) is full: one line; the run's earlier checkpoints are
        intact and the same command resumes from the last of them.
    """
    try:
      self._data.save(checkpoint_number=step)   # the input position first: the model's
      self._model.save(checkpoint_number=step)  # checkpoint is what marks a step as done
    except (tf.errors.OpError, OSError) as e:
      self._remove_partial(step)
      problem = ownership.storage_problem(e, self.dir)
      if problem is not None:
        raise problem from None
      raise

  def _remove_partial(self, step: int) -> None:
    """TensorFlow's staging folders of a save that failed (`ckpt-<step>_temp`), never more."""
    for folder in (self._model.directory, self._data_dir):
      partial = os.path.join(folder, f"ckpt-{step}_temp")
      try:
        if tf.io.gfile.isdir(partial):
          tf.io.gfile.rmtree(partial)
      except tf.errors.OpError as e:
        log.warning("could not remove the partial checkpoint %s: %s", partial, e)

  def latest(self) -> str | None:
    """The last complete checkpoint of the run (what a failed run can go back to)."""
    return self._model.latest_checkpoint if self.chief else tf.train.latest_checkpoint(self.dir)

  def close(self) -> None:
    """Removes a non-chief host's scratch copy of the model checkpoints."""
    if not self.chief:
      tf.io.gfile.rmtree(self._scratch_dir())
