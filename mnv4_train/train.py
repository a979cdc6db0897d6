"""The training loop: a student learns from teacher logits (or labels) on one CPU or a pod.

`train` is the entry point (`mnv4_train.main` parses the gin files and calls it). Its settings
have one home, the groups of `mnv4_train.config` (`GROUPS`: data, augment, student, loss,
schedule, optimizer, cadence, runtime), each a gin configurable made from its bindings, e.g.
`schedule.train_steps = 100`. It reads top-down: plan the run from the settings (`plan_run`),
build the student, optimizer and input (`build`), restore the last checkpoint, run the loop
(`run_loop`) and finish (final evaluation, export, metrics). The parts live in
`mnv4_train.training`: the strategy, the compiled steps (`Trainer`), statistics as named sums,
the cadence, the checkpointer (student + optimizer + each host's input iterator, so a resumed
run continues at the same step with the same data), the metric writer and the stop signals.

SIGTERM (a preemption) or SIGINT (Ctrl-C) stops the run after the step it is in, every worker
at the same step (`mnv4_train.training.preemption`): it saves a checkpoint there and raises
`Preempted`, without the finished run's export and metrics; the same command continues it.
A missing, damaged or miscounted data file stops it with a `DataError` naming the file, its
dataset and the command that rebuilds it (`pipeline.check_files` before the run, the checked
reads of `pipeline` during it), and nothing is saved after it.

Workdir layout:
  config.gin, operative_config.gin, run.json   the gin files as given, as used, and the run
  checkpoints/ckpt-<step>                      student + optimizer (chief)
  checkpoints/data-host<h>/ckpt-<step>         each host's input position at that step
  history.jsonl, eval.jsonl                    one line per log interval / evaluation
  tensorboard/                                 the same scalars for TensorBoard
  curves.png                                   loss and accuracy curves
  export/student.keras                         the final student (EMA weights when EMA is on)
  metrics.json                                 final evaluation
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import time
from typing import Any

import gin
import keras
import tensorflow as tf
from official.vision.ops import augment as mg_augment

from mnv4_train import models, ownership
# The settings (`mnv4_train.config`), also reachable from here as before.
from mnv4_train.config import (GROUPS, RENAMED, TEACHERS, AugmentConfig, CadenceConfig,  # noqa: F401
                               Config, DataConfig, LossConfig, OptimizerConfig, RuntimeConfig,
                               ScheduleConfig, StudentConfig, renamed)
from mnv4_train.data import augment, pipeline
from mnv4_train.errors import ConfigError, InputPathError, Preempted, UserError
from mnv4_train.kd import Distiller
from mnv4_train.models import checkpoint
from mnv4_train.training import stats
from mnv4_train.training.cadence import Cadence
from mnv4_train.training.checkpointer import Checkpointer
from mnv4_train.training.metric_writer import MetricWriter, plot_curves, read_jsonl, write_text
from mnv4_train.training.preemption import StopSignals
from mnv4_train.training.strategy import DISTRIBUTIONS, host_info, make_strategy
from mnv4_train.training.trainer import EMASwap, Trainer

__all__ = ["train", "Config", "GROUPS", "RENAMED", "DataConfig", "AugmentConfig",
           "StudentConfig", "LossConfig", "ScheduleConfig", "OptimizerConfig", "CadenceConfig",
           "RuntimeConfig", "make_strategy", "host_info", "plot_curves", "read_jsonl", "Trainer",
           "TrainingDiverged", "DISTRIBUTIONS", "TEACHERS", "renamed"]

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
  """The loss became NaN or infinite."""


@dataclasses.dataclass
class Plan:
  """What the settings come to on this process: strategy, host layout, data and lengths."""
  config: Config
  strategy: Any
  host: int
  num_hosts: int
  replicas: int
  host_batch: int
  mixed_precision: str | None
  distill_weight: float
  datasets: dict
  eval_data: str | None
  infos: list  # pipeline.DatasetInfo, one per dataset
  num_classes: int
  resolution: int
  train_steps: int
  warmup_steps: int
  ema_start_step: int
  teacher_model: str | None = None  # loss.teacher_model, under data.root when relative

  @property
  def chief(self) -> bool:
    return self.host == 0


@dataclasses.dataclass
class Run:
  """What `build` makes: the student, its optimizer, the compiled steps and the input."""
  student: keras.Model
  optimizer: Any
  trainer: Trainer
  iterator: Any
  eval_ds: Any = None
  eval_info: Any = None  # pipeline.DatasetInfo of the eval data


# ---- the entry point -------------------------------------------------------------------------

def train(workdir: str, *, data: DataConfig | None = None, augment: AugmentConfig | None = None,
          student: StudentConfig | None = None, loss: LossConfig | None = None,
          schedule: ScheduleConfig | None = None, optimizer: OptimizerConfig | None = None,
          cadence: CadenceConfig | None = None, runtime: RuntimeConfig | None = None) -> dict:
  """Trains `student.model` on `data.datasets` and returns the final metrics.

  Args:
    workdir: run folder (local or a bucket); an existing run in it resumes.
    data, augment, student, loss, schedule, optimizer, cadence, runtime: the settings, one
      group each (`DataConfig`, ...: every setting is documented there); gin makes each one
      not given from its bindings (`mnv4_train.main` parses the gin files first).
  """
  config = Config.make(workdir, data=data, augment=augment, student=student, loss=loss,
                       schedule=schedule, optimizer=optimizer, cadence=cadence, runtime=runtime)
  started = time.time()
  plan = plan_run(config)
  # One trainer per workdir: the chief claims it (a second one stops naming the first; a claim
  # left by a killed run on this host is taken over), released however the run ends.
  claim = ownership.claim(workdir, "--workdir") if plan.chief else None
  try:
    return _train(plan, started)
  finally:
    if claim is not None:
      claim.release()


def _train(plan: Plan, started: float) -> dict:
  workdir, cadence = plan.config.workdir, plan.config.cadence
  # From here on SIGTERM / SIGINT stop the run at a step boundary, saved (the strategy exists:
  # the stop flag is a variable, and MultiWorkerMirroredStrategy must come before any).
  with StopSignals() as signals:
    run = build(plan, stop=signals.flag)
    ckpt = Checkpointer(workdir, model=run.student, optimizer=run.optimizer,
                        iterator=run.iterator, host=plan.host, keep=cadence.keep_checkpoints)
    with pipeline.naming_bad_files(plan.infos):  # restoring the input reopens its files
      step = ckpt.restore()
    if step >= plan.train_steps and tf.io.gfile.exists(_metrics_path(workdir)):
      log.info("%s is a finished run of %d steps; nothing to do", workdir, plan.train_steps)
      with tf.io.gfile.GFile(_metrics_path(workdir)) as f:
        return json.load(f)
    if plan.chief:
      record_run(plan)
    log.info("%s", describe(plan))
    if plan.eval_data:
      run.eval_ds, run.eval_info = pipeline.eval_dataset(
          plan.eval_data, resolution=plan.resolution,
          batch_size=plan.config.data.eval_batch_size, crop_fraction=plan.config.data.eval_crop)
    writer = MetricWriter(workdir, chief=plan.chief, train_steps=plan.train_steps,
                          global_batch=plan.config.schedule.global_batch_size)
    writer.start(step)
    stop_at = plan.train_steps if cadence.stop_after_steps is None else min(
        plan.train_steps, step + cadence.stop_after_steps)
    timing = Cadence(train_steps=plan.train_steps, stop_at=stop_at,
                     steps_per_loop=cadence.steps_per_loop, log_every=cadence.log_every,
                     checkpoint_every=cadence.checkpoint_every,
                     eval_every=cadence.eval_every if run.eval_ds is not None else None)
    try:
      step = run_loop(plan, run, timing, step, ckpt, writer, signals)
      result = finish(plan, run, step, writer, signals)
    except Preempted:
      writer.close()  # what was written so far: TensorBoard flushed, curves drawn
      ckpt.close()
      raise
    ckpt.close()
  result["seconds"] = time.time() - started
  return result


# ---- plan ------------------------------------------------------------------------------------

def plan_run(config: Config) -> Plan:
  """Checks the settings, makes the strategy and opens the datasets; one ConfigError each."""
  d, a, loss, sched = config.data, config.augment, config.loss, config.schedule
  rt = config.runtime
  if loss.teacher not in TEACHERS:
    raise ConfigError(f"loss.teacher must be one of {list(TEACHERS)}, not {loss.teacher!r}")
  distill_weight = 0.0 if loss.teacher == "none" else loss.distill_weight
  if (a.mixup_alpha or a.cutmix_alpha) and loss.teacher == "records":
    raise ConfigError("batch mixup/cutmix (augment.mixup_alpha, augment.cutmix_alpha) is for "
                      "label-only runs and the online teacher (loss.teacher 'none' or "
                      "'online'): with 'records' it would change the pixels the stored "
                      "logits belong to; set both alphas to 0")
  if not distill_weight and not loss.label_weight:
    raise ConfigError("nothing to learn from: set loss.distill_weight (with a teacher) or "
                      "loss.label_weight")
  if not isinstance(d.datasets, dict) or not d.datasets:
    raise ConfigError("data.datasets must map dataset names to folders, e.g. "
                      "{'d1': '/data/d1', 'd2': '/data/d2'}")
  if sched.global_batch_size < 1:
    raise ConfigError(f"schedule.global_batch_size must be >= 1, got {sched.global_batch_size}")
  datasets, eval_data, teacher_model = d.datasets, d.eval_data, loss.teacher_model
  if d.root:
    datasets = {name: _under(d.root, path) for name, path in datasets.items()}
    eval_data = eval_data and _under(d.root, eval_data)
    teacher_model = teacher_model and _under(d.root, teacher_model)
  ownership.check_overlap(config.workdir, {
      **{f"data.datasets['{name}']": path for name, path in datasets.items()},
      "data.eval_data": eval_data, "loss.teacher_model": teacher_model}, what="--workdir")
  check_workdir(config.workdir)
  keras.utils.set_random_seed(rt.seed)
  if rt.op_determinism:
    tf.config.experimental.enable_op_determinism()

  strategy = make_strategy(rt.distribution, rt.tpu, rt.cpu_replicas)
  host, num_hosts, _ = host_info(strategy)
  replicas = strategy.num_replicas_in_sync
  if sched.global_batch_size % replicas:
    raise ConfigError(f"schedule.global_batch_size {sched.global_batch_size} is not divisible "
                      f"by the {replicas} replicas")
  mixed_precision = rt.mixed_precision
  if mixed_precision == "auto":
    mixed_precision = {"tpu": "mixed_bfloat16", "gpu": "mixed_float16"}.get(rt.distribution)
  keras.mixed_precision.set_dtype_policy(mixed_precision or "float32")

  infos = [pipeline.open_dataset(path, name) for name, path in datasets.items()]
  for info in infos:  # every file there, of its recorded size: a bad dataset fails now
    pipeline.check_files(info)
  if (loss.teacher == "records" and distill_weight
      and {info.kind for info in infos} != {"distill"}):
    raise ConfigError("loss.teacher='records' needs distillation records for every dataset; "
                      "source shards have no teacher logits (use teacher='online' or 'none')")
  examples_per_epoch = sched.examples_per_epoch
  if examples_per_epoch is None:
    examples_per_epoch = infos[0].epoch_examples
  train_steps = sched.train_steps
  if train_steps is None:
    if sched.epochs is None:
      raise ConfigError("set schedule.epochs or schedule.train_steps")
    train_steps = max(1, math.ceil(sched.epochs * examples_per_epoch / sched.global_batch_size))
  warmup_steps = sched.warmup_steps
  if sched.warmup_epochs is not None:
    if sched.warmup_epochs < 0:
      raise ConfigError(f"schedule.warmup_epochs must be >= 0, got {sched.warmup_epochs}")
    warmup_steps = math.ceil(sched.warmup_epochs * examples_per_epoch / sched.global_batch_size)
  start = config.optimizer.ema_start_step
  student = config.student
  return Plan(
      config=config, strategy=strategy, host=host, num_hosts=num_hosts, replicas=replicas,
      host_batch=sched.global_batch_size // num_hosts, mixed_precision=mixed_precision,
      distill_weight=distill_weight, datasets=datasets, eval_data=eval_data, infos=infos,
      num_classes=student.num_classes or infos[0].num_classes,
      resolution=(student.resolution or infos[0].resolution
                  or models.canonical_resolution(student.model)),
      train_steps=train_steps, warmup_steps=warmup_steps,
      ema_start_step=warmup_steps if start is None else start, teacher_model=teacher_model)


def check_workdir(workdir: str):
  try:
    tf.io.gfile.makedirs(workdir)
    # One probe per process: workers of one run share the workdir.
    probe = os.path.join(workdir, f".write_probe.{os.getpid()}.{time.time_ns()}")
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("ok")
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    raise InputPathError(f"--workdir {workdir} is not writable ({type(e).__name__}); choose a "
                         "folder you can write to") from None


def _under(root, path):
  return path if os.path.isabs(path) or "://" in path else os.path.join(root, path)


# ---- build -----------------------------------------------------------------------------------

def build(plan: Plan, stop=None) -> Run:
  """The input stream, then (in the strategy's scope) student, teacher and optimizer.

  `stop`: the flag (a boolean tf.Variable) that ends the compiled loop early (`StopSignals`).
  """
  c = plan.config
  d, a, loss = c.data, c.augment, c.loss
  options = pipeline.StreamOptions(
      seed=c.runtime.seed, shuffle=d.shuffle, cycle_length=d.cycle_length,
      memory_cache=d.memory_cache, supervised_recipe=supervised_recipe(a))
  batch_mix = None
  if a.mixup_alpha or a.cutmix_alpha:
    batch_mix = mg_augment.MixupAndCutmix(
        num_classes=plan.num_classes, mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha,
        prob=a.mix_prob, switch_prob=a.mix_switch_prob, label_smoothing=a.mix_label_smoothing)
  with pipeline.naming_bad_files(plan.infos):  # memory_cache reads every file here
    train_ds = pipeline.train_dataset(
        plan.infos, resolution=plan.resolution, host_batch=plan.host_batch,
        num_classes=plan.num_classes, weights=d.weights, schedule=d.weight_schedule,
        num_hosts=plan.num_hosts, host=plan.host, shard_policy=d.shard_policy,
        deterministic=d.deterministic, options=options, batch_mix=batch_mix)
  with plan.strategy.scope():
    student = models.build(c.student.model, num_classes=plan.num_classes,
                           resolution=plan.resolution, **(c.student.options or {}))
    teacher_net = None
    if loss.teacher == "online" and plan.distill_weight:
      teacher_net = load_teacher(plan.teacher_model, plan.num_classes)
    distiller = Distiller(student, teacher_net, temperature=loss.temperature,
                          distill_weight=plan.distill_weight, label_weight=loss.label_weight,
                          label_smoothing=loss.label_smoothing)
    optimizer = build_optimizer(c, student, plan.train_steps, plan.mixed_precision,
                                warmup_steps=plan.warmup_steps,
                                ema_start_step=plan.ema_start_step)
  trainer = Trainer(plan.strategy, distiller, optimizer,
                    global_batch=c.schedule.global_batch_size,
                    datasets=[info.name for info in plan.infos],
                    l2_regularization=c.optimizer.l2_regularization, stop=stop)
  return Run(student=student, optimizer=optimizer, trainer=trainer, iterator=iter(train_ds))


def supervised_recipe(a: AugmentConfig) -> augment.Recipe:
  """The online augmentation of source-shard datasets: inception crop, RandAugment as the
  Model Garden's (constants in pixels), flip."""
  try:
    return augment.Recipe(
        "supervised", ra_layers=a.layers, ra_magnitude=a.magnitude,
        crop_area=(a.crop_area_min, 1.0), flip=a.flip, translate_const=a.translate_const,
        cutout_const=a.cutout_const, const_resolution=None, prob_to_apply=a.prob_to_apply,
        exclude_ops=tuple(a.exclude_ops))
  except ValueError as e:
    raise ConfigError(f"augment.*: {e}") from None


def load_teacher(path: str | None, num_classes: int):
  """The online teacher (a `.keras` file), checked to output `num_classes` logits."""
  if not path:
    raise ConfigError("loss.teacher='online' needs loss.teacher_model (a .keras file)")
  teacher = checkpoint.load_model(path, what="loss.teacher_model", saved_model=False)
  out = int(teacher.output_shape[-1])
  if out != num_classes:
    raise ConfigError(f"teacher {path} outputs {out} classes but the data has {num_classes}")
  return teacher


class AdamW(keras.optimizers.AdamW):
  """Keras 3's AdamW whose weight EMA starts at `ema_start_step`.

  The Model Garden's `ExponentialMovingAverage(start_step=k, dynamic_decay=False)` uses decay 0
  while its step count (the update's, counting from 1) is below k, so the average is a copy of
  the weights, and `average_decay` from step k on. Keras' own EMA copies on the first update
  only; here the momentum is 0 until the update that makes the step count reach k. With k = 0
  this is Keras' EMA exactly. Not serialised to `.keras`: checkpoints hold its variables only.
  """

  def __init__(self, *args, ema_start_step: int = 0, **kwargs):
    super().__init__(*args, **kwargs)
    self.ema_start_step = int(ema_start_step)
    self._per_update = None  # {(graph, what): value} during `apply`

  def apply(self, grads, trainable_variables=None):
    """Keras' update, with what depends only on the step computed once per update and graph.

    Keras reads `learning_rate` once for the Adam step and once more per variable for the
    decoupled weight decay, and each read builds the whole warmup-cosine schedule again (a
    quarter of the optimizer's tracing time over a few hundred variables); its Adam step builds
    the bias-corrected step size per variable too. Every read of one update sees the same step
    count (it advances after the update), so one value serves them all: the same numbers, a
    smaller graph."""
    self._per_update = {}
    try:
      return super().apply(grads, trainable_variables)
    finally:
      self._per_update = None

  def _get_current_learning_rate(self):
    return self._once("learning_rate", super()._get_current_learning_rate)

  def _once(self, key, compute):
    """`compute()` once per update, graph and `key` (every call outside `apply`)."""
    memo = self._per_update
    if memo is None:
      return compute()
    key = (None if tf.executing_eagerly() else tf.compat.v1.get_default_graph(), key)
    if key not in memo:  # a tensor of another graph (a cond branch) is not reused here
      memo[key] = compute()
    return memo[key]

  def update_step(self, gradient, variable, learning_rate):
    """Keras' Adam step, its step-size factor lr * sqrt(1 - b2^t) / (1 - b1^t) computed once per
    update (Keras builds it for every variable): the same operations on the same values."""
    if self.amsgrad:
      return super().update_step(gradient, variable, learning_rate)
    dtype = variable.dtype

    def step_size():
      lr = keras.ops.cast(learning_rate, dtype)
      step = keras.ops.cast(self.iterations + 1, dtype)
      beta_1_power = keras.ops.power(keras.ops.cast(self.beta_1, dtype), step)
      beta_2_power = keras.ops.power(keras.ops.cast(self.beta_2, dtype), step)
      return lr * keras.ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    alpha = self._once(("adam_step_size", str(dtype)), step_size)
    gradient = keras.ops.cast(gradient, dtype)
    m = self._momentums[self._get_variable_index(variable)]
    v = self._velocities[self._get_variable_index(variable)]
    self.assign_add(m, keras.ops.multiply(keras.ops.subtract(gradient, m), 1 - self.beta_1))
    self.assign_add(v, keras.ops.multiply(keras.ops.subtract(keras.ops.square(gradient), v),
                                          1 - self.beta_2))
    self.assign_sub(variable, keras.ops.divide(keras.ops.multiply(m, alpha),
                                               keras.ops.add(keras.ops.sqrt(v), self.epsilon)))

  def _update_model_variables_moving_average(self, trainable_variables):
    if not self.use_ema:
      return
    count = self.iterations + 1  # this update's step count (iterations counts finished ones)
    started = keras.ops.logical_and(keras.ops.greater(count, 1),
                                    keras.ops.greater_equal(count, self.ema_start_step))
    for var, average in zip(trainable_variables, self._model_variables_moving_average):
      if average is None:
        continue
      momentum = keras.ops.cast(started, var.dtype) * self.ema_momentum
      average.assign(momentum * average + (1 - momentum) * var)


def build_optimizer(config: Config, student, train_steps: int, mixed_precision: str | None, *,
                    warmup_steps: int | None = None, ema_start_step: int = 0):
  """AdamW with warmup + cosine decay, no weight decay on 1-D weights, built for `student`."""
  o, sched = config.optimizer, config.schedule
  warmup_steps = sched.warmup_steps if warmup_steps is None else warmup_steps
  optimizer = AdamW(
      learning_rate=_schedule(sched.learning_rate, warmup_steps, train_steps,
                              sched.end_learning_rate),
      weight_decay=o.weight_decay, beta_1=o.beta_1, beta_2=o.beta_2, epsilon=o.epsilon,
      global_clipnorm=o.clipnorm, use_ema=bool(o.ema_decay), ema_momentum=o.ema_decay or 0.99,
      ema_start_step=ema_start_step)
  # Decoupled weight decay on kernels only: not on norms, biases or layer scales.
  optimizer.exclude_from_weight_decay(
      var_list=[v for v in student.trainable_variables if len(v.shape) <= 1])
  if mixed_precision == "mixed_float16":
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  optimizer.build(student.trainable_variables)
  return optimizer


def _schedule(learning_rate, warmup_steps, total_steps, end_learning_rate):
  decay = max(1, total_steps - warmup_steps)
  return keras.optimizers.schedules.CosineDecay(
      initial_learning_rate=0.0 if warmup_steps else learning_rate,
      decay_steps=decay, alpha=end_learning_rate / learning_rate if learning_rate else 0.0,
      warmup_target=learning_rate if warmup_steps else None, warmup_steps=warmup_steps)


# ---- run metadata ----------------------------------------------------------------------------

def record_run(plan: Plan):
  """config.gin (the gin files as given) and run.json (what the run is, with the git revision)."""
  c = plan.config
  write_text(os.path.join(c.workdir, "config.gin"), gin.config_str())
  write_text(os.path.join(c.workdir, "run.json"), json.dumps({
      "model": c.student.model, "num_classes": plan.num_classes, "resolution": plan.resolution,
      "train_steps": plan.train_steps, "global_batch_size": c.schedule.global_batch_size,
      "datasets": {info.name: {"path": info.path, "kind": info.kind, "recipe": info.recipe,
                               "jpeg_quality": info.jpeg_quality,
                               "examples": info.num_examples} for info in plan.infos},
      "distribution": c.runtime.distribution, "replicas": plan.replicas,
      "hosts": plan.num_hosts,
      "mixed_precision": plan.mixed_precision, "git_revision": _git_revision()}, indent=1))


def describe(plan: Plan) -> str:
  """The run's start line: model, data, length and layout."""
  c = plan.config
  data = ", ".join(f"{info.name} ({info.kind} {info.recipe})".replace(" )", ")")
                   for info in plan.infos)
  return (f"{c.student.model}: {plan.num_classes} classes at {plan.resolution}px, "
          f"{plan.train_steps} steps of {c.schedule.global_batch_size} ({plan.replicas} "
          f"replicas on {plan.num_hosts} hosts), datasets {data}")


def _git_revision():
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__), check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def _metrics_path(workdir):
  return os.path.join(workdir, "metrics.json")


# ---- the loop --------------------------------------------------------------------------------

def run_loop(plan: Plan, run: Run, cadence: Cadence, step: int, ckpt: Checkpointer,
             writer: MetricWriter, signals: StopSignals | None = None) -> int:
  """Trains from `step` to `cadence.stop_at`, logging, checkpointing and evaluating on time.

  Raises:
    Preempted: a stop was requested (`signals`); every worker left the compiled loop after
      the same step, logged the steps since the last log line and saved a checkpoint there.
    DataError: a data file turned out missing or damaged; nothing is saved.
  """
  sums = stats.Sums(run.trainer.datasets)
  interval_start, interval_time = step, time.time()
  while step < cadence.stop_at:
    boundary = cadence.next_stop(step)
    with pipeline.naming_bad_files(plan.infos):
      try:
        totals, done, stopped = run.trainer.train_loop(run.iterator, boundary - step)
      except tf.errors.OutOfRangeError:
        raise InputPathError("the training data ran out; check that the datasets hold "
                             "examples") from None
    sums.add(totals)
    step += done
    if not math.isfinite(sums[stats.LOSS]):
      raise TrainingDiverged(f"the loss became {sums[stats.LOSS]} between steps "
                             f"{interval_start} and {step}; stopped, the last good checkpoint "
                             f"is {ckpt.latest() or 'none'}; lower schedule.learning_rate or "
                             "check the teacher logits")
    if cadence.log(step) or (stopped and step > interval_start):
      seconds = time.time() - interval_time
      writer.train(sums.row(
          step, has_teacher=run.trainer.has_teacher,
          learning_rate=float(run.optimizer.learning_rate),
          examples_per_second=(step - interval_start) * plan.config.schedule.global_batch_size
          / seconds))
      sums.reset()
      interval_start, interval_time = step, time.time()
    if cadence.checkpoint(step) or stopped:
      ckpt.save(step)
    if stopped:
      raise Preempted(step, signals and signals.signum)
    if run.eval_ds is not None and cadence.evaluate(step):
      if evaluate(plan, run, step, writer) is None:  # a stop during the evaluation
        if not cadence.checkpoint(step):
          ckpt.save(step)
        raise Preempted(step, signals and signals.signum)
  return step


def evaluate(plan: Plan, run: Run, step: int, writer: MetricWriter) -> dict | None:
  """Top-1/top-5 on the eval data (EMA weights when EMA is on), written and returned; None
  (nothing written) when a stop was requested during it."""
  with EMASwap(run.optimizer, run.student), pipeline.naming_bad_files([run.eval_info]):
    result = run.trainer.evaluate(run.eval_ds, plan.config.data.eval_batch_size)
  if result is None:
    return None
  result["step"] = step
  writer.eval(result)
  return result


# ---- finish ----------------------------------------------------------------------------------

def finish(plan: Plan, run: Run, step: int, writer: MetricWriter,
           signals: StopSignals | None = None) -> dict:
  """A finished run: final evaluation, export/student.keras, operative_config.gin, metrics.

  A stop requested meanwhile (its checkpoint at `step` is already there) raises `Preempted`
  before metrics.json, which marks the run as finished, is written.
  """
  workdir = plan.config.workdir
  result = {"step": step, "train_steps": plan.train_steps, "finished": step >= plan.train_steps}
  if result["finished"]:
    if run.eval_ds is not None:
      final = evaluate(plan, run, step, writer)
      if final is None:  # every worker agreed to stop during it
        raise Preempted(step, signals and signals.signum)
      result.update(final)
    if plan.chief:
      if signals is not None and signals.requested:
        raise Preempted(step, signals.signum)
      export_dir = os.path.join(workdir, "export")
      tf.io.gfile.makedirs(export_dir)
      path = os.path.join(export_dir, "student.keras")
      with EMASwap(run.optimizer, run.student):
        run.student.save(path + ".tmp.keras")
      tf.io.gfile.rename(path + ".tmp.keras", path, overwrite=True)
      result["export"] = path
      if signals is not None and signals.requested:  # the export is whole; metrics.json not
        raise Preempted(step, signals.signum)
      write_text(os.path.join(workdir, "operative_config.gin"), gin.operative_config_str())
      write_text(_metrics_path(workdir), json.dumps(result, indent=1))
  writer.close()
  return result
