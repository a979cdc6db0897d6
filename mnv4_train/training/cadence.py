"""When the training loop logs, evaluates and checkpoints, and how far one compiled call runs."""

from __future__ import annotations

import dataclasses

from mnv4_train.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Cadence:
  """Answers "is it time to log / evaluate / checkpoint" at a step, and where to stop next.

  Attributes:
    train_steps: the run's length (the learning-rate schedule spans it).
    stop_at: where this invocation stops (`train_steps`, or earlier with stop_after_steps).
    steps_per_loop: steps in one compiled call at most.
    log_every, checkpoint_every: every so many steps, and at `stop_at`.
    eval_every: every so many steps before the end (the end evaluates anyway); None or 0 for
      never, as when there is no eval data.
  """
  train_steps: int
  stop_at: int
  steps_per_loop: int = 100
  log_every: int = 100
  checkpoint_every: int = 1000
  eval_every: int | None = None

  def __post_init__(self):
    for name in ("steps_per_loop", "log_every", "checkpoint_every"):
      if getattr(self, name) < 1:
        raise ConfigError(f"cadence.{name} must be >= 1, got {getattr(self, name)}")
    if self.eval_every is not None and self.eval_every < 0:
      raise ConfigError(f"cadence.eval_every must be >= 0 or None, got {self.eval_every}")

  def next_stop(self, step: int) -> int:
    """The first step after `step` at which the loop must come back to Python."""
    stops = [self.stop_at] + [(step // every + 1) * every for every in (
        self.steps_per_loop, self.log_every, self.checkpoint_every, self.eval_every) if every]
    return min(stops)

  def log(self, step: int) -> bool:
    return step % self.log_every == 0 or step == self.stop_at

  def checkpoint(self, step: int) -> bool:
    return step % self.checkpoint_every == 0 or step == self.stop_at

  def evaluate(self, step: int) -> bool:
    """An evaluation during training (the finished run's final one is not counted here)."""
    return bool(self.eval_every) and step % self.eval_every == 0 and step < self.train_steps
