"""Per-step training statistics as named sums, and the history row an interval of them makes.

Each replica returns sums over its examples under fixed names (`names`); the compiled loop adds
them up over steps and replicas, and the host adds the loop's results up over a log interval in
float64 (`Sums`). Dividing by the examples gives the interval's means (`Sums.row`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# Sums over examples: the loss and its two terms, top-1 against the labels, agreement with the
# teacher's argmax, and the examples themselves; then the examples drawn from each dataset.
LOSS, KD, CE, CORRECT, AGREE, EXAMPLES = "loss", "kd", "ce", "correct", "agree", "examples"
BASE_NAMES = (LOSS, KD, CE, CORRECT, AGREE, EXAMPLES)


def dataset_key(name: str) -> str:
  """The name under which the examples drawn from dataset `name` are counted."""
  return f"examples/{name}"


def names(datasets: Iterable[str]) -> tuple[str, ...]:
  """Every statistic's name, in a fixed order, for a run mixing `datasets`."""
  return BASE_NAMES + tuple(dataset_key(d) for d in datasets)


class Sums:
  """Running sums of named statistics over one log interval, kept in float64."""

  def __init__(self, datasets: Iterable[str]):
    self.datasets = tuple(datasets)
    self.names = names(self.datasets)
    self.values = dict.fromkeys(self.names, 0.0)

  def add(self, sums: Mapping[str, float]) -> None:
    """Adds one compiled call's sums (every name must be one of `names`)."""
    for name, value in sums.items():
      if name not in self.values:
        raise KeyError(f"unknown statistic {name!r}; known: {list(self.names)}")
      self.values[name] += float(value)

  def __getitem__(self, name: str) -> float:
    return self.values[name]

  def mean(self, name: str) -> float:
    """The sum of `name` per example (0 when the interval is empty)."""
    return self.values[name] / max(self.values[EXAMPLES], 1.0)

  def reset(self) -> None:
    self.values = dict.fromkeys(self.names, 0.0)

  def row(self, step: int, *, has_teacher: bool, learning_rate: float,
          examples_per_second: float) -> dict:
    """The interval as a history.jsonl row (means per example; the observed mixture)."""
    return {"step": step, "loss": self.mean(LOSS), "kd": self.mean(KD), "ce": self.mean(CE),
            "accuracy": self.mean(CORRECT),
            "agreement": self.mean(AGREE) if has_teacher else None,
            "learning_rate": learning_rate, "examples_per_second": examples_per_second,
            "mixture": {d: self.mean(dataset_key(d)) for d in self.datasets}}
