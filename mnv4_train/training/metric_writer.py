"""Where a run's numbers go: history.jsonl, eval.jsonl, TensorBoard, curves.png, the console.

Files are written by the chief only; every host prints its console lines. A resumed run first
drops the lines past its checkpoint (`MetricWriter.start`), so the files read as one run.
"""

from __future__ import annotations

import json
import logging
import os

import tensorflow as tf

log = logging.getLogger(__name__)

_TRAIN_SCALARS = ("loss", "kd", "ce", "accuracy", "learning_rate", "examples_per_second")


def write_text(path, text):
  """Writes `text` to `path` through a temporary file (readers never see half a file)."""
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def append_jsonl(path, rows, upto_step=None):
  """Appends rows; with `upto_step`, first drops lines past it (a resumed run rewrites them)."""
  kept = []
  if upto_step is not None and tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= upto_step]
  text = "".join(kept) + "".join(json.dumps(r) + "\n" for r in rows)
  if upto_step is not None:
    write_text(path, text)
  else:
    with tf.io.gfile.GFile(path, "a") as f:
      f.write(text)


def read_jsonl(path):
  if not tf.io.gfile.exists(path):
    return []
  with tf.io.gfile.GFile(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(workdir: str):
  """history.jsonl + eval.jsonl -> curves.png (loss; train agreement/accuracy and eval top-1)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  hist = read_jsonl(os.path.join(workdir, "history.jsonl"))
  evals = read_jsonl(os.path.join(workdir, "eval.jsonl"))
  if not hist:
    return None
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  steps = [h["step"] for h in hist]
  ax1.plot(steps, [h["loss"] for h in hist], label="loss")
  if any(h["kd"] for h in hist):
    ax1.plot(steps, [h["kd"] for h in hist], label="KL (teacher || student)", alpha=0.7)
  if any(h["ce"] for h in hist):
    ax1.plot(steps, [h["ce"] for h in hist], label="label cross-entropy", alpha=0.7)
  ax1.set_xlabel("step")
  ax1.set_yscale("log")
  ax1.set_title("training loss")
  ax1.legend()
  ax2.plot(steps, [h["accuracy"] for h in hist], label="train top-1 (labels)")
  if any(h.get("agreement") is not None for h in hist):
    ax2.plot(steps, [h["agreement"] for h in hist], label="train agreement with teacher")
  if evals:
    ax2.plot([e["step"] for e in evals], [e["top1"] for e in evals], "o-", label="eval top-1")
  ax2.set_xlabel("step")
  ax2.set_ylim(0, 1)
  ax2.set_title("accuracy")
  ax2.legend(loc="lower right")
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  path = os.path.join(workdir, "curves.png")
  with tf.io.gfile.GFile(path, "wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)
  return path


def format_duration(seconds: float) -> str:
  """12s, 3m05s, 2h07m: a duration as a person reads it."""
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(row: dict, *, train_steps: int, global_batch: int) -> str:
  """A history row as the console's progress line: step/total, loss, rate and time left."""
  rate = row["examples_per_second"]
  left = (train_steps - row["step"]) * global_batch / rate if rate > 0 else float("inf")
  head = f"step {row['step']}/{train_steps} ({100.0 * row['step'] / train_steps:.0f}%)"
  parts = [f"loss {row['loss']:.4f}", f"train top-1 {row['accuracy']:.3f}"]
  if row["agreement"] is not None:
    parts.append(f"teacher agreement {row['agreement']:.3f}")
  parts.append(f"lr {row['learning_rate']:.2e}")
  if len(row["mixture"]) > 1:
    parts.append("mix " + " ".join(f"{k} {v:.2f}" for k, v in row["mixture"].items()))
  parts.append(f"{rate:.1f} examples/s")
  parts.append(f"ETA {format_duration(left) if left != float('inf') else '?'}")
  return f"{head}: " + ", ".join(parts)


class MetricWriter:
  """Writes each log interval and evaluation to every place a run's numbers go."""

  def __init__(self, workdir: str, *, chief: bool, train_steps: int, global_batch: int):
    self.workdir = workdir
    self.chief = chief
    self.train_steps = train_steps
    self.global_batch = global_batch
    self.history_path = os.path.join(workdir, "history.jsonl")
    self.eval_path = os.path.join(workdir, "eval.jsonl")
    if chief:
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    else:
      self._tb = tf.summary.create_noop_writer()

  def start(self, step: int) -> None:
    """Drops what a resumed run wrote after its checkpoint at `step`."""
    if self.chief:
      append_jsonl(self.history_path, [], upto_step=step)
      append_jsonl(self.eval_path, [], upto_step=step)

  def train(self, row: dict) -> None:
    """One log interval (a `Sums.row`): history.jsonl, TensorBoard, the progress line."""
    if self.chief:
      append_jsonl(self.history_path, [row])
      with self._tb.as_default(step=row["step"]):
        for key in _TRAIN_SCALARS:
          tf.summary.scalar(f"train/{key}", row[key])
        if row["agreement"] is not None:
          tf.summary.scalar("train/teacher_agreement", row["agreement"])
        for name, share in row["mixture"].items():
          tf.summary.scalar(f"mixture/{name}", share)
    log.info("%s", progress_line(row, train_steps=self.train_steps,
                                 global_batch=self.global_batch))

  def eval(self, result: dict) -> None:
    """One evaluation ({step, top1, top5, examples}): eval.jsonl, TensorBoard, a line."""
    step = result["step"]
    if self.chief:
      append_jsonl(self.eval_path, [result], upto_step=step)
      with self._tb.as_default(step=step):
        tf.summary.scalar("eval/top1", result["top1"])
        tf.summary.scalar("eval/top5", result["top5"])
    log.info("eval at step %d: top-1 %.4f top-5 %.4f (%d images)", step, result["top1"],
             result["top5"], result["examples"])

  def close(self) -> None:
    """Flushes TensorBoard and draws curves.png (chief)."""
    if self.chief:
      self._tb.flush()
      plot_curves(self.workdir)
