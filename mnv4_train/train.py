"""The training loop: a student learns from teacher logits (or labels) on one CPU or a pod.

`train` is the one gin-configurable entry point (`mnv4_train.main` parses the gin files and
calls it). It reads top-down: plan the run from the settings (`plan_run`), build the student,
optimizer and input (`build`), restore the last checkpoint, run the loop (`run_loop`) and
finish (final evaluation, export, metrics). The parts live in `mnv4_train.training`: the
strategy, the compiled steps (`Trainer`), statistics as named sums, the cadence, the
checkpointer (student + optimizer + each host's input iterator, so a resumed run continues at
the same step with the same data), the metric writer and the stop signals.

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

__all__ = ["train", "make_strategy", "host_info", "plot_curves", "read_jsonl", "Trainer",
           "TrainingDiverged", "DISTRIBUTIONS", "TEACHERS"]

TEACHERS = ("records", "online", "none")

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
  """The loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """The arguments of `train`, as given (see its docstring); one field per argument."""
  workdir: str
  model: str
  datasets: dict
  weights: dict | None
  weight_schedule: list | None
  eval_data: str | None
  data_root: str | None
  model_options: dict | None
  num_classes: int | None
  resolution: int | None
  teacher: str
  teacher_model: str | None
  temperature: float
  distill_weight: float
  label_weight: float
  label_smoothing: float
  augment_layers: int
  augment_magnitude: float
  augment_translate_const: float
  augment_cutout_const: float
  augment_prob_to_apply: float | None
  augment_exclude_ops: tuple
  mixup_alpha: float
  cutmix_alpha: float
  mix_prob: float
  mix_switch_prob: float
  mix_label_smoothing: float
  crop_area_min: float
  flip: bool
  global_batch_size: int
  epochs: float | None
  train_steps: int | None
  examples_per_epoch: int | None
  learning_rate: float
  warmup_steps: int
  warmup_epochs: float | None
  end_learning_rate: float
  weight_decay: float
  beta_1: float
  beta_2: float
  epsilon: float
  clipnorm: float | None
  l2_regularization: float
  ema_decay: float | None
  ema_start_step: int | None
  distribution: str
  tpu: str
  cpu_replicas: int
  mixed_precision: str | None
  steps_per_loop: int
  log_every: int
  checkpoint_every: int
  eval_every: int | None
  keep_checkpoints: int
  eval_batch_size: int
  eval_crop: float
  seed: int
  deterministic: bool
  shard_policy: str
  shuffle: bool
  cycle_length: int
  memory_cache: bool
  stop_after_steps: int | None
  op_determinism: bool


@dataclasses.dataclass
class Plan:
  """What the settings come to on this process: strategy, host layout, data and lengths."""
  settings: Settings
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

@gin.configurable(denylist=["workdir"])
def train(
    workdir: str,
    *,
    model: str = gin.REQUIRED,
    datasets: dict = gin.REQUIRED,
    weights: dict | None = None,
    weight_schedule: list | None = None,
    eval_data: str | None = None,
    data_root: str | None = None,
    model_options: dict | None = None,
    num_classes: int | None = None,
    resolution: int | None = None,
    teacher: str = "records",
    teacher_model: str | None = None,
    temperature: float = 1.0,
    distill_weight: float = 1.0,
    label_weight: float = 0.0,
    label_smoothing: float = 0.0,
    augment_layers: int = 2,
    augment_magnitude: float = 9.0,
    augment_translate_const: float = 10.0,
    augment_cutout_const: float = 40.0,
    augment_prob_to_apply: float | None = None,
    augment_exclude_ops: tuple = (),
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    mix_prob: float = 1.0,
    mix_switch_prob: float = 0.5,
    mix_label_smoothing: float = 0.1,
    crop_area_min: float = 0.08,
    flip: bool = True,
    global_batch_size: int = 256,
    epochs: float | None = None,
    train_steps: int | None = None,
    examples_per_epoch: int | None = None,
    learning_rate: float = 0.004,
    warmup_steps: int = 1560,
    warmup_epochs: float | None = None,
    end_learning_rate: float = 0.0,
    weight_decay: float = 0.1,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    clipnorm: float | None = None,
    l2_regularization: float = 0.0,
    ema_decay: float | None = None,
    ema_start_step: int | None = None,
    distribution: str = "cpu",
    tpu: str = "local",
    cpu_replicas: int = 1,
    mixed_precision: str | None = "auto",
    steps_per_loop: int = 100,
    log_every: int = 100,
    checkpoint_every: int = 1000,
    eval_every: int | None = None,
    keep_checkpoints: int = 3,
    eval_batch_size: int = 256,
    eval_crop: float = 0.875,
    seed: int = 0,
    deterministic: bool = True,
    shard_policy: str = "auto",
    shuffle: bool = True,
    cycle_length: int = 16,
    memory_cache: bool = False,
    stop_after_steps: int | None = None,
    op_determinism: bool = False,
) -> dict:
  """Trains `model` on `datasets` and returns the final metrics.

  Args:
    workdir: run folder (local or a bucket); an existing run in it resumes.
    model: MNv4 variant name; `model_options` go to `models.build` (width, dropout,
      drop_path_rate, bn_momentum, ...); `num_classes` defaults to the data's.
    datasets: name -> folder: distillation records (`data_prep.distill`) or source shards
      (`data_prep.ingest`, augmented online with an inception crop of at least
      `crop_area_min` of the image + RandAugment + a horizontal flip when `flip`).
    augment_layers, augment_magnitude, augment_translate_const, augment_cutout_const,
      augment_prob_to_apply, augment_exclude_ops: that RandAugment, as the Model Garden's
      `RandAugment` arguments (num_layers, magnitude, translate_const, cutout_const,
      prob_to_apply, exclude_ops; constants in pixels at any resolution, as it applies them;
      defaults: its `common.RandAugment` config's).
    mixup_alpha, cutmix_alpha, mix_prob, mix_switch_prob, mix_label_smoothing: batch mixup /
      cutmix, the Model Garden's `MixupAndCutmix` (alpha, cutmix_alpha, prob, switch_prob,
      label_smoothing) on each batch, its soft labels taking the label term's place
      (label-only runs, teacher "none"); off while both alphas are 0.
    weights / weight_schedule: mixture weights by dataset name, or [(start_step, weights), ...].
    eval_data: held-out source shards for top-1/top-5.
    data_root: a folder (or bucket path) that relative `datasets` and `eval_data` paths are in.
    resolution: student input size (default: the records' resolution, else the canonical one).
    teacher: "records" (stored logits), "online" (`teacher_model` runs on each batch) or "none"
      (labels only: set label_weight).
    temperature, distill_weight, label_weight, label_smoothing: the loss (`mnv4_train.kd`).
    global_batch_size, epochs | train_steps, examples_per_epoch: the length; an epoch is
      `examples_per_epoch` images (default: one pass over the first dataset's source images).
    learning_rate, warmup_steps, end_learning_rate: linear warmup then cosine decay.
    warmup_epochs: the warmup in epochs (converted to steps as `epochs` is); when set it
      replaces `warmup_steps`.
    weight_decay, beta_1, beta_2, epsilon, clipnorm: AdamW (no decay on norms, biases, scales).
    l2_regularization: an extra 0.5 * l2 * |w|^2 loss on kernels (the Model Garden's Conv-S).
    ema_decay: keep an exponential moving average of the weights (evaluated and exported).
    ema_start_step: the average follows the weights exactly until this optimizer step, and
      averages from there on (the Model Garden's `ExponentialMovingAverage(start_step=...)`);
      None: at the end of the warmup, as its MNv4 recipes set it.
    distribution, tpu, cpu_replicas: see `make_strategy`.
    mixed_precision: None, "mixed_bfloat16", "mixed_float16" or "auto" (bf16 on TPU, float16
      on GPU, float32 on CPU).
    steps_per_loop, log_every, checkpoint_every, eval_every, keep_checkpoints: cadence.
    seed, deterministic, shard_policy, shuffle, cycle_length: the input pipeline.
    memory_cache: hold the run's datasets in memory as pixels (source images decoded whole,
      at most a flip; distillation records replayed once) and gather whole batches, as `fit`
      on arrays does; small data only (`pipeline.memory_cache_problem`). Its order (and a
      source recipe's flips) are its own, not the streaming input's.
    stop_after_steps: stop (checkpointed) after this many steps of this invocation, as a
      preemption would; the schedule still spans the whole run.
    op_determinism: TensorFlow's deterministic kernels (bit-equal reruns; slower).
  """
  settings = Settings(**locals())  # first: every argument, by name
  started = time.time()
  plan = plan_run(settings)
  # One trainer per workdir: the chief claims it (a second one stops naming the first; a claim
  # left by a killed run on this host is taken over), released however the run ends.
  claim = ownership.claim(workdir, "--workdir") if plan.chief else None
  try:
    return _train(plan, settings, started)
  finally:
    if claim is not None:
      claim.release()


def _train(plan: Plan, settings: Settings, started: float) -> dict:
  s = settings
  workdir, eval_batch_size, eval_crop = s.workdir, s.eval_batch_size, s.eval_crop
  global_batch_size, keep_checkpoints = s.global_batch_size, s.keep_checkpoints
  stop_after_steps, steps_per_loop, log_every = s.stop_after_steps, s.steps_per_loop, s.log_every
  checkpoint_every, eval_every = s.checkpoint_every, s.eval_every
  # From here on SIGTERM / SIGINT stop the run at a step boundary, saved (the strategy exists:
  # the stop flag is a variable, and MultiWorkerMirroredStrategy must come before any).
  with StopSignals() as signals:
    run = build(plan, stop=signals.flag)
    ckpt = Checkpointer(workdir, model=run.student, optimizer=run.optimizer,
                        iterator=run.iterator, host=plan.host, keep=keep_checkpoints)
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
          plan.eval_data, resolution=plan.resolution, batch_size=eval_batch_size,
          crop_fraction=eval_crop)
    writer = MetricWriter(workdir, chief=plan.chief, train_steps=plan.train_steps,
                          global_batch=global_batch_size)
    writer.start(step)
    stop_at = plan.train_steps if stop_after_steps is None else min(plan.train_steps,
                                                                    step + stop_after_steps)
    cadence = Cadence(train_steps=plan.train_steps, stop_at=stop_at,
                      steps_per_loop=steps_per_loop, log_every=log_every,
                      checkpoint_every=checkpoint_every,
                      eval_every=eval_every if run.eval_ds is not None else None)
    try:
      step = run_loop(plan, run, cadence, step, ckpt, writer, signals)
      result = finish(plan, run, step, writer, signals)
    except Preempted:
      writer.close()  # what was written so far: TensorBoard flushed, curves drawn
      ckpt.close()
      raise
    ckpt.close()
  result["seconds"] = time.time() - started
  return result


# ---- plan ------------------------------------------------------------------------------------

def plan_run(s: Settings) -> Plan:
  """Checks the settings, makes the strategy and opens the datasets; one ConfigError each."""
  if s.teacher not in TEACHERS:
    raise ConfigError(f"train.teacher must be one of {list(TEACHERS)}, not {s.teacher!r}")
  distill_weight = 0.0 if s.teacher == "none" else s.distill_weight
  if (s.mixup_alpha or s.cutmix_alpha) and s.teacher != "none":
    raise ConfigError("batch mixup/cutmix (train.mixup_alpha, train.cutmix_alpha) is for "
                      "label-only runs (train.teacher='none'): it would change the pixels the "
                      "teacher's logits belong to; set both alphas to 0")
  if not distill_weight and not s.label_weight:
    raise ConfigError("nothing to learn from: set train.distill_weight (with a teacher) or "
                      "train.label_weight")
  if not isinstance(s.datasets, dict) or not s.datasets:
    raise ConfigError("train.datasets must map dataset names to folders, e.g. "
                      "{'d1': '/data/d1', 'd2': '/data/d2'}")
  if s.global_batch_size < 1:
    raise ConfigError(f"train.global_batch_size must be >= 1, got {s.global_batch_size}")
  datasets, eval_data = s.datasets, s.eval_data
  if s.data_root:
    datasets = {name: _under(s.data_root, path) for name, path in datasets.items()}
    eval_data = eval_data and _under(s.data_root, eval_data)
  ownership.check_overlap(s.workdir, {
      **{f"train.datasets['{name}']": path for name, path in datasets.items()},
      "train.eval_data": eval_data, "train.teacher_model": s.teacher_model}, what="--workdir")
  check_workdir(s.workdir)
  keras.utils.set_random_seed(s.seed)
  if s.op_determinism:
    tf.config.experimental.enable_op_determinism()

  strategy = make_strategy(s.distribution, s.tpu, s.cpu_replicas)
  host, num_hosts, _ = host_info(strategy)
  replicas = strategy.num_replicas_in_sync
  if s.global_batch_size % replicas:
    raise ConfigError(f"train.global_batch_size {s.global_batch_size} is not divisible by the "
                      f"{replicas} replicas")
  mixed_precision = s.mixed_precision
  if mixed_precision == "auto":
    mixed_precision = {"tpu": "mixed_bfloat16", "gpu": "mixed_float16"}.get(s.distribution)
  keras.mixed_precision.set_dtype_policy(mixed_precision or "float32")

  infos = [pipeline.open_dataset(path, name) for name, path in datasets.items()]
  for info in infos:  # every file there, of its recorded size: a bad dataset fails now
    pipeline.check_files(info)
  if (s.teacher == "records" and distill_weight
      and {info.kind for info in infos} != {"distill"}):
    raise ConfigError("train.teacher='records' needs distillation records for every dataset; "
                      "source shards have no teacher logits (use teacher='online' or 'none')")
  examples_per_epoch = s.examples_per_epoch
  if examples_per_epoch is None:
    examples_per_epoch = infos[0].epoch_examples
  train_steps = s.train_steps
  if train_steps is None:
    if s.epochs is None:
      raise ConfigError("set train.epochs or train.train_steps")
    train_steps = max(1, math.ceil(s.epochs * examples_per_epoch / s.global_batch_size))
  warmup_steps = s.warmup_steps
  if s.warmup_epochs is not None:
    if s.warmup_epochs < 0:
      raise ConfigError(f"train.warmup_epochs must be >= 0, got {s.warmup_epochs}")
    warmup_steps = math.ceil(s.warmup_epochs * examples_per_epoch / s.global_batch_size)
  ema_start_step = warmup_steps if s.ema_start_step is None else s.ema_start_step
  return Plan(
      settings=s, strategy=strategy, host=host, num_hosts=num_hosts, replicas=replicas,
      host_batch=s.global_batch_size // num_hosts, mixed_precision=mixed_precision,
      distill_weight=distill_weight, datasets=datasets, eval_data=eval_data, infos=infos,
      num_classes=s.num_classes or infos[0].num_classes,
      resolution=s.resolution or infos[0].resolution or models.canonical_resolution(s.model),
      train_steps=train_steps, warmup_steps=warmup_steps, ema_start_step=ema_start_step)


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
  s = plan.settings
  options = pipeline.StreamOptions(
      seed=s.seed, shuffle=s.shuffle, cycle_length=s.cycle_length, memory_cache=s.memory_cache,
      supervised_recipe=supervised_recipe(s))
  batch_mix = None
  if s.mixup_alpha or s.cutmix_alpha:
    batch_mix = mg_augment.MixupAndCutmix(
        num_classes=plan.num_classes, mixup_alpha=s.mixup_alpha, cutmix_alpha=s.cutmix_alpha,
        prob=s.mix_prob, switch_prob=s.mix_switch_prob, label_smoothing=s.mix_label_smoothing)
  with pipeline.naming_bad_files(plan.infos):  # memory_cache reads every file here
    train_ds = pipeline.train_dataset(
        plan.infos, resolution=plan.resolution, host_batch=plan.host_batch,
        num_classes=plan.num_classes, weights=s.weights, schedule=s.weight_schedule,
        num_hosts=plan.num_hosts, host=plan.host, shard_policy=s.shard_policy,
        deterministic=s.deterministic, options=options, batch_mix=batch_mix)
  with plan.strategy.scope():
    student = models.build(s.model, num_classes=plan.num_classes, resolution=plan.resolution,
                           **(s.model_options or {}))
    teacher_net = None
    if s.teacher == "online" and plan.distill_weight:
      teacher_net = load_teacher(s.teacher_model, plan.num_classes)
    distiller = Distiller(student, teacher_net, temperature=s.temperature,
                          distill_weight=plan.distill_weight, label_weight=s.label_weight,
                          label_smoothing=s.label_smoothing)
    optimizer = build_optimizer(s, student, plan.train_steps, plan.mixed_precision,
                                warmup_steps=plan.warmup_steps,
                                ema_start_step=plan.ema_start_step)
  trainer = Trainer(plan.strategy, distiller, optimizer, global_batch=s.global_batch_size,
                    datasets=[info.name for info in plan.infos],
                    l2_regularization=s.l2_regularization, stop=stop)
  return Run(student=student, optimizer=optimizer, trainer=trainer, iterator=iter(train_ds))


def supervised_recipe(s: Settings) -> augment.Recipe:
  """The online augmentation of source-shard datasets: inception crop, RandAugment as the
  Model Garden's (constants in pixels), flip."""
  try:
    return augment.Recipe(
        "supervised", ra_layers=s.augment_layers, ra_magnitude=s.augment_magnitude,
        crop_area=(s.crop_area_min, 1.0), flip=s.flip,
        translate_const=s.augment_translate_const, cutout_const=s.augment_cutout_const,
        const_resolution=None, prob_to_apply=s.augment_prob_to_apply,
        exclude_ops=tuple(s.augment_exclude_ops))
  except ValueError as e:
    raise ConfigError(f"train.augment_*: {e}") from None


def load_teacher(path: str | None, num_classes: int):
  """The online teacher (a `.keras` file), checked to output `num_classes` logits."""
  if not path:
    raise ConfigError("train.teacher='online' needs train.teacher_model (a .keras file)")
  teacher = checkpoint.load_model(path, what="train.teacher_model", saved_model=False)
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


def build_optimizer(s: Settings, student, train_steps: int, mixed_precision: str | None, *,
                    warmup_steps: int | None = None, ema_start_step: int = 0):
  """AdamW with warmup + cosine decay, no weight decay on 1-D weights, built for `student`."""
  warmup_steps = s.warmup_steps if warmup_steps is None else warmup_steps
  optimizer = AdamW(
      learning_rate=_schedule(s.learning_rate, warmup_steps, train_steps, s.end_learning_rate),
      weight_decay=s.weight_decay, beta_1=s.beta_1, beta_2=s.beta_2, epsilon=s.epsilon,
      global_clipnorm=s.clipnorm, use_ema=bool(s.ema_decay), ema_momentum=s.ema_decay or 0.99,
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
  s = plan.settings
  write_text(os.path.join(s.workdir, "config.gin"), gin.config_str())
  write_text(os.path.join(s.workdir, "run.json"), json.dumps({
      "model": s.model, "num_classes": plan.num_classes, "resolution": plan.resolution,
      "train_steps": plan.train_steps, "global_batch_size": s.global_batch_size,
      "datasets": {info.name: {"path": info.path, "kind": info.kind, "recipe": info.recipe,
                               "jpeg_quality": info.jpeg_quality,
                               "examples": info.num_examples} for info in plan.infos},
      "distribution": s.distribution, "replicas": plan.replicas, "hosts": plan.num_hosts,
      "mixed_precision": plan.mixed_precision, "git_revision": _git_revision()}, indent=1))


def describe(plan: Plan) -> str:
  """The run's start line: model, data, length and layout."""
  s = plan.settings
  data = ", ".join(f"{info.name} ({info.kind} {info.recipe})".replace(" )", ")")
                   for info in plan.infos)
  return (f"{s.model}: {plan.num_classes} classes at {plan.resolution}px, {plan.train_steps} "
          f"steps of {s.global_batch_size} ({plan.replicas} replicas on {plan.num_hosts} "
          f"hosts), datasets {data}")


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
                             f"is {ckpt.latest() or 'none'}; lower train.learning_rate or "
                             "check the teacher logits")
    if cadence.log(step) or (stopped and step > interval_start):
      seconds = time.time() - interval_time
      writer.train(sums.row(
          step, has_teacher=run.trainer.has_teacher,
          learning_rate=float(run.optimizer.learning_rate),
          examples_per_second=(step - interval_start) * plan.settings.global_batch_size
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
    result = run.trainer.evaluate(run.eval_ds, plan.settings.eval_batch_size)
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
  workdir = plan.settings.workdir
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
