"""Training images/s of our trainer against plain Keras `fit`, same model, batch and optimizer.

    .venv/bin/python benchmarks/trainer_vs_fit.py [--steps 132] [--warmup 66] [--lead_in 22]
        [--rounds 4] [--batch 64] [--resolution 32] [--width 0.75] [--images 1797]

Data: sklearn's digits (real 8x8 scans, 10 classes, upsampled to the resolution, PNG), ingested
as source shards by `data_prep.ingest`; D1 records built from them by `data_prep.distill`
(2 replicas, crops of >= 50% area, no flips, as the digits job) with a random-weight Conv-S
x0.25 teacher (its cost is not measured). Nothing is downloaded.

The model everywhere: MNv4 Conv-S at `--width` (digits recipe: bn_momentum 0.9), 10 classes,
fixed `--resolution` input, float32 on the CPU (`--distribution cpu` hides any GPU; `gpu` runs
both sides there, the trainer with its "auto" mixed_float16 and the anchor under the same
global policy). The settings are the recipes' (`gin_configs/digits_student.gin`,
`digits_distill.gin`, read with gin) with `--batch`, `--resolution`, `--width` put in.

Anchor (fit): plain `keras.Model.fit` (verbose 0, no callback but the timing hook below, no
XLA: `jit_compile=False`, as the trainer's `tf.function`) on in-memory arrays: every digit's
central crop as `pipeline.eval_dataset` makes it ([-1, 1] floats), `from_tensor_slices(...)
.repeat().batch(drop_remainder=True).prefetch(AUTOTUNE)`, no augmentation. Its optimizer is
built by the trainer's own `train.build_optimizer` from the labels row's settings (AdamW,
warmup + cosine, no decay on 1-D weights); loss softmax cross-entropy on labels
(`SparseCategoricalCrossentropy(from_logits=True)`); top-1 as a metric (the trainer sums its
top-1 too). The script stops if the rows' models differ in parameter count.

Ours: `mnv4_train.train`'s own parts, as `python -m mnv4_train.main --gin_file=...` runs them:
`plan_run` + `build` (strategy, student, optimizer, `Trainer`, input) once, then `run_loop`
(the compiled multi-step loop, `steps_per_loop` and `log_every` of the recipe, history.jsonl
and TensorBoard lines each log interval) for each round, continuing from the previous step.
Checkpoint saves and evaluations are not timed (fit does neither): the checkpointer given to
`run_loop` saves nothing, and there is no eval data. Four rows:
  - labels: `digits_student.gin`, labels only (teacher "none") from the source shards: decode,
    the recipe's online augmentation (none for digits: whole image, no RandAugment, no flip),
    with `data.memory_cache=False` (the streaming input every other recipe reads);
  - labels, memory_cache: the same as the recipe ships it (`data.memory_cache='auto'`, which
    holds the digits; set to True here): the
    digits decoded once and held in memory, each step one gather of its batch (what fit's
    arrays do);
  - distill: `digits_distill.gin` on D1 alone (teacher "records") with
    `data.memory_cache=False`: replay of the stored crop + RandAugment + JPEG round trip, KL
    against the stored teacher logits;
  - distill, memory_cache: the same as the recipe ships it (`'auto'`; True here): every
    record replayed once into memory before training, each step one gather.

Timing, the same for every row: first one untimed call of `--warmup` steps (tracing, tf.data
start), then `--rounds` rounds. A round runs `--lead_in` untimed steps, then times `--steps`
steps, wall clock and process CPU time: fit in one call of lead_in + steps steps, the clock
started by a callback as step lead_in begins (after reading the optimizer's step count, so the
steps before it are done); ours `run_loop` for lead_in steps, then a timed `run_loop` of steps
(it ends reading its statistics, so its steps are done). The lead-in takes what is not steady
state out of the timed window on both sides: fit's new iterator and its first batches each
call, and the batches ours prefetches while the other rows run (its iterator lives on). Rounds
alternate the order (fit, labels, labels cached, distill, distill cached, then the reverse).
Figures: images/s of the best and the median round, images per CPU-second (median; throttling
and other jobs on the machine change it less), and the ratio ours / fit (> 1: ours is faster). The trainer's own examples/s
from history.jsonl (median over the log intervals of the timed calls) is printed as a check.

Defaults: the digits recipe's loop of 22 steps per compiled call, logs every 66: warm-up 66,
lead-in 22, 132 timed steps (two log intervals) per round, 4 rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import gin  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mnv4_train import main as train_main  # noqa: E402
from mnv4_train import models  # noqa: E402
from mnv4_train import train as train_lib  # noqa: E402
from mnv4_train.data import pipeline  # noqa: E402
from mnv4_train.training.cadence import Cadence  # noqa: E402
from mnv4_train.training.metric_writer import MetricWriter, read_jsonl  # noqa: E402

LABELS_GIN = "digits_student.gin"
DISTILL_GIN = "digits_distill.gin"


# ---- settings ---------------------------------------------------------------------------------

def recipe_config(gin_file: str, workdir: str, *, width: float, overrides: dict
                  ) -> train_lib.Config:
  """The settings `gin_file` binds, made by gin as `train.train` makes them, the student's
  width replaced by `width` (its other options kept), then `overrides` by binding name
  ("data.memory_cache": False, ...). Leaves gin's configuration cleared."""
  probe_filter = train_main._GinProbeFilter()  # pylint: disable=protected-access
  logging.getLogger().addFilter(probe_filter)  # gin's "Path not found" probes for `include`
  try:
    gin.clear_config()
    gin.add_config_file_search_path(train_main.GIN_DIR)
    gin.parse_config_file(train_main.resolve_gin_file(gin_file))
    options = gin.get_bindings("student").get("options") or {}
    gin.bind_parameter("student.options", {**options, "width": width})
    for name, value in overrides.items():
      gin.bind_parameter(name, value)
    return train_lib.Config.make(workdir)
  finally:
    gin.clear_config()
    logging.getLogger().removeFilter(probe_filter)


def trainer_overrides(args, datasets: dict) -> dict:
  """What every trainer row changes in its recipe: data, shape, length, no evaluation."""
  return {"data.datasets": datasets, "data.weights": None, "data.weight_schedule": None,
          "data.root": None, "data.eval_data": None, "cadence.eval_every": None,
          "schedule.global_batch_size": args.batch, "student.resolution": args.resolution,
          "schedule.train_steps": args.warmup + args.rounds * (args.lead_in + args.steps),
          "schedule.epochs": None, "runtime.distribution": args.distribution,
          "runtime.mixed_precision": args.mixed_precision}


def cached(config: train_lib.Config, workdir: str) -> train_lib.Config:
  """`config` with `data.memory_cache` on, in `workdir`."""
  return dataclasses.replace(config, workdir=workdir,
                             data=dataclasses.replace(config.data, memory_cache=True))


# ---- data -------------------------------------------------------------------------------------

def digits_data(work: str, images: int, resolution: int):
  """(source shards, D1 records) of `images` digits at `resolution` px."""
  from data_prep import distill, ingest  # Beam: imported only when the data is built
  from data_prep.digits import write_digits_folder
  folder = os.path.join(work, "images")
  write_digits_folder(folder, size=resolution, limit=images)
  source = os.path.join(work, "source")
  ingest.run([f"--images={folder}", f"--out={source}", "--num_shards=4"])
  teacher = os.path.join(work, "teacher.keras")
  models.build("conv_s", num_classes=10, width=0.25, resolution=resolution).save(teacher)
  d1 = os.path.join(work, "d1")
  distill.run(["--recipe=d1", f"--source={source}", f"--teacher={teacher}", f"--out={d1}",
               "--replicas=2", "--replicas_per_task=1", "--batch_size=64",
               f"--resolution={resolution}", "--crop_area_min=0.5", "--no_flip"])
  return source, d1


def source_arrays(source: str, resolution: int):
  """Every image of the source shards, whole (the digits fill the frame), as numpy arrays."""
  ds, _ = pipeline.eval_dataset(source, resolution=resolution, batch_size=256,
                                crop_fraction=1.0)
  batches = list(ds.as_numpy_iterator())
  return (np.concatenate([b["image"] for b in batches]),
          np.concatenate([b["label"] for b in batches]).astype("int32"))


# ---- the contenders ---------------------------------------------------------------------------

class Clock:
  """Wall-clock and process CPU seconds from its creation to `stop`."""

  def __init__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()

  def stop(self) -> "Clock":
    self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
    return self


class FitRow:
  """The anchor: plain `fit` on in-memory arrays, the trainer's optimizer and model settings."""

  def __init__(self, config: train_lib.Config, plan: train_lib.Plan, images, labels):
    self.model = models.build(config.student.model, num_classes=plan.num_classes,
                              resolution=plan.resolution, **(config.student.options or {}))
    optimizer = train_lib.build_optimizer(config, self.model, plan.train_steps,
                                          plan.mixed_precision, warmup_steps=plan.warmup_steps,
                                          ema_start_step=plan.ema_start_step)
    self.model.compile(optimizer=optimizer,
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       metrics=[keras.metrics.SparseCategoricalAccuracy()], jit_compile=False)
    self.ds = (tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
               .batch(config.schedule.global_batch_size, drop_remainder=True)
               .prefetch(tf.data.AUTOTUNE))

  def params(self) -> int:
    return self.model.count_params()

  def steps(self, n: int, callbacks=None):
    self.model.fit(self.ds, steps_per_epoch=n, epochs=1, verbose=0, shuffle=False,
                   callbacks=callbacks)

  def round(self, lead_in: int, n: int) -> Clock:
    """One `fit` call of lead_in + n steps, the last n timed."""
    mark = _StartClock(lead_in)
    self.steps(lead_in + n, callbacks=[mark])
    return mark.clock.stop()

  def close(self):
    pass


class _StartClock(keras.callbacks.Callback):
  """Starts a `Clock` as `fit` begins its step `at`, once the steps before it are done (the
  optimizer's step count read). Only a batch-begin hook: fit keeps its asynchronous dispatch of
  batch-end callbacks, as with no callback."""

  def __init__(self, at: int):
    super().__init__()
    self.at = at
    self.clock = None

  def on_train_batch_begin(self, batch, logs=None):
    if batch == self.at:
      self.model.optimizer.iterations.numpy()
      self.clock = Clock()


class _NoCheckpoint:
  """`run_loop`'s checkpointer, saving nothing: checkpoint saves are not timed."""

  def save(self, step):
    del step

  def latest(self):
    return None


class TrainerRow:
  """Ours: the trainer's plan, build and loop, continued round after round."""

  def __init__(self, config: train_lib.Config):
    self.config = config
    self.plan = train_lib.plan_run(config)
    self.run = train_lib.build(self.plan)
    self.writer = MetricWriter(config.workdir, chief=True, train_steps=self.plan.train_steps,
                               global_batch=config.schedule.global_batch_size)
    self.writer.start(0)
    self.step = 0
    self.timed = []  # (first, last] steps of each timed call

  def params(self) -> int:
    return self.run.student.count_params()

  def steps(self, n: int):
    c = self.config.cadence
    cadence = Cadence(train_steps=self.plan.train_steps, stop_at=self.step + n,
                      steps_per_loop=c.steps_per_loop, log_every=c.log_every,
                      checkpoint_every=c.checkpoint_every, eval_every=None)
    self.step = train_lib.run_loop(self.plan, self.run, cadence, self.step, _NoCheckpoint(),
                                   self.writer)

  def round(self, lead_in: int, n: int) -> Clock:
    """`run_loop` for lead_in steps, then a timed `run_loop` of n steps."""
    self.steps(lead_in)
    clock = Clock()
    start = self.step
    self.steps(n)
    self.timed.append((start, self.step))
    return clock.stop()

  def logged_rate(self) -> float | None:
    """The trainer's own examples/s: median over the history rows of the timed calls."""
    rows = read_jsonl(os.path.join(self.config.workdir, "history.jsonl"))
    rates = [r["examples_per_second"] for r in rows
             if any(a < r["step"] <= b for a, b in self.timed)]
    return statistics.median(rates) if rates else None

  def close(self):
    self.writer.close()


# ---- timing and the table ---------------------------------------------------------------------

@dataclasses.dataclass
class Round:
  images_per_second: float
  images_per_cpu_second: float


def timed(row, lead_in: int, steps: int, batch: int) -> Round:
  """One round of `row`: `lead_in` untimed steps, then `steps` timed ones."""
  clock = row.round(lead_in, steps)
  return Round(steps * batch / clock.wall, steps * batch / max(clock.cpu, 1e-9))


def round_orders(names: list[str], rounds: int) -> list[list[str]]:
  """Each round's order: as given, then reversed, alternately (no row always goes first)."""
  return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(rounds)]


@dataclasses.dataclass
class Summary:
  name: str
  best: float
  median: float
  cpu_median: float
  ratio_best: float | None     # ours / anchor; None for the anchor itself
  ratio_median: float | None


def summarise(results: dict[str, list[Round]], anchor: str) -> list[Summary]:
  """Best and median images/s per row, median images/CPU-s, and each row's ratio to `anchor`
  (best to best, median to median)."""
  def stats(rounds):
    rates = [r.images_per_second for r in rounds]
    return (max(rates), statistics.median(rates),
            statistics.median(r.images_per_cpu_second for r in rounds))
  a_best, a_median, _ = stats(results[anchor])
  out = []
  for name, rounds in results.items():
    best, median, cpu = stats(rounds)
    ours = name != anchor
    out.append(Summary(name, best, median, cpu, best / a_best if ours else None,
                       median / a_median if ours else None))
  return out


def table(summaries: list[Summary]) -> str:
  lines = [f"{'row':<46}{'best':>8}{'median':>8}{'/CPU-s':>8}{'ours/fit best':>15}"
           f"{'median':>8}"]
  for s in summaries:
    ratios = (f"{s.ratio_best:>15.2f}{s.ratio_median:>8.2f}" if s.ratio_best is not None
              else f"{'':>15}{'':>8}")
    lines.append(f"{s.name:<46}{s.best:>8.1f}{s.median:>8.1f}{s.cpu_median:>8.1f}{ratios}")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=132, help="timed steps per round")
  parser.add_argument("--warmup", type=int, default=66, help="untimed steps first (tracing)")
  parser.add_argument("--lead_in", type=int, default=22,
                      help="untimed steps at the start of each round")
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--resolution", type=int, default=32)
  parser.add_argument("--width", type=float, default=0.75)
  parser.add_argument("--images", type=int, default=1797, help="digits used (1797: all)")
  parser.add_argument("--distribution", choices=["cpu", "gpu"], default="cpu",
                      help="cpu hides any GPU from both sides")
  parser.add_argument("--mixed_precision", choices=["auto", "mixed_bfloat16", "float32"],
                      default="auto", help="the dtype policy of every row (the trainer's "
                      "runtime.mixed_precision; auto: float32 on the CPU). mixed_bfloat16: "
                      "bf16 convolutions and matmuls, float32 variables, BatchNorm and softmax")
  args = parser.parse_args()
  for flag in ("steps", "warmup", "lead_in", "rounds", "batch", "resolution", "images"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag} must be >= 1")
  if args.distribution == "cpu":
    tf.config.set_visible_devices([], "GPU")

  work = tempfile.mkdtemp(prefix="mnv4_trainer_vs_fit_")
  try:
    source, d1 = digits_data(work, args.images, args.resolution)
    rows = {}
    labels = recipe_config(LABELS_GIN, os.path.join(work, "run_labels"), width=args.width,
                           overrides={**trainer_overrides(args, {"digits": source}),
                                      "data.memory_cache": False})
    rows["ours: labels, source shards"] = TrainerRow(labels)
    rows["ours: labels, memory_cache"] = TrainerRow(cached(labels,
                                                           os.path.join(work, "run_cached")))
    distill = recipe_config(DISTILL_GIN, os.path.join(work, "run_distill"), width=args.width,
                            overrides={**trainer_overrides(args, {"d1": d1}),
                                       "data.memory_cache": False})
    rows["ours: distill, D1 replay"] = TrainerRow(distill)
    rows["ours: distill, D1 memory_cache"] = TrainerRow(
        cached(distill, os.path.join(work, "run_distill_cached")))
    images, y = source_arrays(source, args.resolution)
    anchor = "anchor: keras fit, in-memory arrays"
    # Built last, under the global dtype policy the trainer's plan set.
    rows = {anchor: FitRow(labels, rows["ours: labels, source shards"].plan, images, y), **rows}
    params = {name: row.params() for name, row in rows.items()}
    if len(set(params.values())) != 1:
      raise SystemExit(f"the rows build different models: {params}")
    print(f"conv_s x{args.width}: {params[anchor]:,} parameters on every row; "
          f"{len(images)} digits, {args.resolution}px, batch {args.batch}", flush=True)

    for name, row in rows.items():  # trace and start every input before any timing
      start = time.perf_counter()
      row.steps(args.warmup)
      print(f"warm-up {name}: {args.warmup} steps in {time.perf_counter() - start:.1f}s",
            flush=True)

    results = {name: [] for name in rows}
    for r, order in enumerate(round_orders(list(rows), args.rounds)):
      for name in order:
        results[name].append(timed(rows[name], args.lead_in, args.steps, args.batch))
      print(f"round {r + 1}/{args.rounds}: " + ", ".join(
          f"{name.split(': ')[-1]} {results[name][-1].images_per_second:.1f}" for name in rows)
            + " images/s", flush=True)

    print(f"\nMNv4 Conv-S x{args.width}, {args.resolution}px, batch {args.batch}, "
          f"{args.distribution}, {args.mixed_precision} precision, {args.warmup} warm-up steps, "
          f"{args.rounds} rounds of "
          f"{args.lead_in} + {args.steps} timed steps, {os.cpu_count()} cores; images/s; "
          "ratio = ours / fit")
    print(table(summarise(results, anchor)))
    for name, row in rows.items():
      if isinstance(row, TrainerRow):
        rate = row.logged_rate()
        print(f"{name}: the trainer's own log (history.jsonl) says "
              f"{rate:.1f} examples/s (median of the timed intervals)"
              if rate is not None else f"{name}: no history rows")
    for row in rows.values():
      row.close()
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
