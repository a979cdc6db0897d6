"""The training loop: a student learns from teacher logits (or labels) on one CPU or a pod.

`train` is the entry point (`mnv4_train.main` parses the gin files and calls it). Its settings
have one home, the groups below (`GROUPS`: data, augment, student, loss, schedule, optimizer,
cadence, runtime), each a gin configurable made from its bindings, e.g.
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
           "TrainingDiverged", "DISTRIBUTIONS", "TEACHERS"]

TEACHERS = ("records", "online", "none")

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
  """The loss became NaN or infinite."""


# ---- the settings ----------------------------------------------------------------------------
# One home: each group is a frozen dataclass that gin makes from its bindings (`data.datasets =
# {...}`, `schedule.train_steps = 100`), each setting documented once, where it is declared.
# `GROUPS` holds them in order; `RENAMED` maps the flat `train.X` names of before to them.

GROUPS = {}  # gin name -> group class, in `Config`'s order


def _group(name: str):
  """Registers the class as the frozen dataclass and gin configurable `name`."""
  def register(cls):
    cls = gin.configurable(name)(dataclasses.dataclass(frozen=True)(cls))
    GROUPS[name] = cls
    return cls
  return register


def _formerly(old: str, default):
  """A setting whose flat name before the groups was `train.<old>` (`RENAMED`)."""
  return dataclasses.field(default=default, metadata={"formerly": old})


@_group("data")
class DataConfig:
  """What the student reads: the training datasets and their mixture, the held-out set, and
  how the input is read."""
  # name -> folder: distillation records (`data_prep.distill`, replayed as recorded) or source
  # shards (`data_prep.ingest`, augmented online as `augment` says).
  datasets: dict = gin.REQUIRED
  # The mixture: weights by dataset name (default: equal), or
  weights: dict | None = None
  # [(start_step, {name: weight}), ...], the weights from each start step on (instead of
  # `weights`, not with them).
  weight_schedule: list | None = None
  # A folder (or bucket path) that relative `datasets` and `eval_data` paths are in.
  root: str | None = _formerly("data_root", None)
  # Held-out source shards for top-1/top-5 (evaluated every `cadence.eval_every` steps and at
  # the end), center-cropped to `eval_crop` of the image, `eval_batch_size` at a time.
  eval_data: str | None = None
  eval_crop: float = 0.875
  eval_batch_size: int = 256
  # A fresh random order of each data file's records every epoch.
  shuffle: bool = True
  # Data files read at once (interleaved one element each).
  cycle_length: int = 16
  # How hosts split the input: "files" (each host its own share of every dataset's files),
  # "data" (every host reads all of them and keeps its share of the batches) or "auto" (files
  # when every dataset has a file per host).
  shard_policy: str = "auto"
  # tf.data's deterministic order (a seeded run repeats).
  deterministic: bool = True
  # Hold the run's datasets in memory as pixels (source images decoded whole, at most a flip;
  # distillation records replayed once) and gather whole batches, as `fit` on arrays does;
  # small data only (`pipeline.memory_cache_problem`). Its order (and a source recipe's
  # flips) are its own, not the streaming input's.
  memory_cache: bool = False


@_group("augment")
class AugmentConfig:
  """The online augmentation of source-shard datasets; distillation records are replayed as
  recorded, so nothing here changes them. The supervised recipes set these together (their
  yamls' RandAugment and mixup_and_cutmix blocks); a distillation recipe never does."""
  # An inception crop of at least this fraction of the image's area (1.0: the whole image).
  crop_area_min: float = 0.08
  # A random horizontal flip.
  flip: bool = True
  # RandAugment as the Model Garden's `RandAugment`: `layers` ops per image (num_layers; 0:
  # none) at `magnitude`, `translate_const` and `cutout_const` in pixels at any resolution (as
  # it applies them), each op applied with `prob_to_apply` (None: always), `exclude_ops` never
  # drawn (e.g. ['Cutout']). Defaults: its `common.RandAugment` config's.
  layers: int = _formerly("augment_layers", 2)
  magnitude: float = _formerly("augment_magnitude", 9.0)
  translate_const: float = _formerly("augment_translate_const", 10.0)
  cutout_const: float = _formerly("augment_cutout_const", 40.0)
  prob_to_apply: float | None = _formerly("augment_prob_to_apply", None)
  exclude_ops: tuple = _formerly("augment_exclude_ops", ())
  # Batch mixup / cutmix, the Model Garden's `MixupAndCutmix` (alpha, cutmix_alpha, prob,
  # switch_prob, label_smoothing) on each batch, off while both alphas are 0; its soft labels
  # take the label term's place, so label-only runs only (`loss.teacher` "none").
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_prob: float = 1.0
  mix_switch_prob: float = 0.5
  mix_label_smoothing: float = 0.1


@_group("student")
class StudentConfig:
  """The model that learns."""
  # The MNv4 variant (`models.MODEL_NAMES`), e.g. "conv_s".
  model: str = gin.REQUIRED
  # Keyword arguments of `models.build`: width, dropout, drop_path_rate, bn_momentum, ...
  options: dict | None = _formerly("model_options", None)
  # Classes (default: the data's).
  num_classes: int | None = None
  # Input size (default: the records' resolution, else the variant's canonical one).
  resolution: int | None = None


@_group("loss")
class LossConfig:
  """What the student learns from: the teacher and the loss terms (`mnv4_train.kd`)."""
  # "records" (the logits stored with the distillation records), "online" (`teacher_model`
  # runs on each batch) or "none" (labels only: set `label_weight`).
  teacher: str = "records"
  # The online teacher, a `.keras` file.
  teacher_model: str | None = None
  # The distillation term: KL(teacher || student) at `temperature`, times `distill_weight`.
  temperature: float = 1.0
  distill_weight: float = 1.0
  # The label term: cross-entropy with `label_smoothing`, times `label_weight`.
  label_weight: float = 0.0
  label_smoothing: float = 0.0


@_group("schedule")
class ScheduleConfig:
  """The run's length and its learning rate: linear warmup, then cosine decay."""
  # Images per step, over all replicas and hosts.
  global_batch_size: int = 256
  # The length: `epochs`, or `train_steps` (which wins when both are set). An epoch is
  # `examples_per_epoch` images (default: one pass over the first dataset's source images).
  epochs: float | None = None
  train_steps: int | None = None
  examples_per_epoch: int | None = None
  # The peak learning rate, reached after the warmup.
  learning_rate: float = 0.004
  # The warmup in steps, or in epochs (converted as `epochs` is; when set it replaces
  # `warmup_steps`).
  warmup_steps: int = 1560
  warmup_epochs: float | None = None
  # Where the cosine decay ends.
  end_learning_rate: float = 0.0


@_group("optimizer")
class OptimizerConfig:
  """AdamW (decoupled weight decay on kernels only: not on norms, biases or layer scales), an
  optional extra L2 loss and a weight EMA."""
  # AdamW's decoupled weight decay, its moment decays and its epsilon.
  weight_decay: float = 0.1
  beta_1: float = 0.9
  beta_2: float = 0.999
  epsilon: float = 1e-7
  # Clip the gradients' global norm to this (None: no clipping).
  clipnorm: float | None = None
  # An extra 0.5 * l2 * |w|^2 loss on kernels, not depthwise ones (the Model Garden's Conv-S).
  l2_regularization: float = 0.0
  # Keep an exponential moving average of the weights with this decay (evaluated and
  # exported; None: none).
  ema_decay: float | None = None
  # The average follows the weights exactly until this optimizer step, and averages from there
  # on (the Model Garden's `ExponentialMovingAverage(start_step=...)`); None: at the end of the
  # warmup, as its MNv4 recipes set it.
  ema_start_step: int | None = None


@_group("cadence")
class CadenceConfig:
  """When the run logs, checkpoints, evaluates and stops (`mnv4_train.training.cadence`)."""
  # Steps per compiled loop (one host round trip).
  steps_per_loop: int = 100
  # Steps between history.jsonl lines, checkpoints and evaluations (None: only the final one).
  log_every: int = 100
  checkpoint_every: int = 1000
  eval_every: int | None = None
  # Checkpoints kept.
  keep_checkpoints: int = 3
  # Stop (checkpointed) after this many steps of this invocation, as a preemption would; the
  # schedule still spans the whole run.
  stop_after_steps: int | None = None


@_group("runtime")
class RuntimeConfig:
  """Where and how the steps run: devices, precision, seeds."""
  # "cpu", "gpu", "multiworker" or "tpu"; `tpu` and `cpu_replicas`: see `make_strategy`.
  distribution: str = "cpu"
  tpu: str = "local"
  cpu_replicas: int = 1
  # None, "mixed_bfloat16", "mixed_float16" or "auto" (bf16 on TPU, float16 on GPU, float32
  # on CPU).
  mixed_precision: str | None = "auto"
  # Seeds the student's initial weights, the input's order and the online augmentation.
  seed: int = 0
  # TensorFlow's deterministic kernels (bit-equal reruns; slower).
  op_determinism: bool = False


@dataclasses.dataclass(frozen=True)
class Config:
  """One run's settings: its workdir and one instance of each group (`GROUPS`, this order)."""
  workdir: str
  data: DataConfig
  augment: AugmentConfig
  student: StudentConfig
  loss: LossConfig
  schedule: ScheduleConfig
  optimizer: OptimizerConfig
  cadence: CadenceConfig
  runtime: RuntimeConfig

  @classmethod
  def make(cls, workdir: str, **groups) -> Config:
    """The groups given by name; gin makes the others from their bindings."""
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
      raise TypeError(f"no settings group {unknown}; the groups are {list(GROUPS)}")
    return cls(workdir, **{name: group() if groups.get(name) is None else groups[name]
                            for name, group in GROUPS.items()})


# The flat `train.X` names of before the groups -> their bindings now, e.g. "data_root" ->
# "data.root" (`mnv4_train.main` names them when a gin file or binding uses an old one).
RENAMED = {field.metadata.get("formerly", field.name): f"{name}.{field.name}"
           for name, group in GROUPS.items() for field in dataclasses.fields(group)}


def renamed(names) -> str:
  """One line naming the binding now of each old flat `train.X` name in `names`."""
  each = "; ".join(f"train.{n} is now {RENAMED[n]}" if n in RENAMED else
                   f"train.{n} is no setting" for n in dict.fromkeys(names))
  return (f"{each} (the settings are in groups now: {', '.join(GROUPS)}; see "
          "mnv4_train/train.py)")


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
  if (a.mixup_alpha or a.cutmix_alpha) and loss.teacher != "none":
    raise ConfigError("batch mixup/cutmix (augment.mixup_alpha, augment.cutmix_alpha) is for "
                      "label-only runs (loss.teacher='none'): it would change the pixels the "
                      "teacher's logits belong to; set both alphas to 0")
  if not distill_weight and not loss.label_weight:
    raise ConfigError("nothing to learn from: set loss.distill_weight (with a teacher) or "
                      "loss.label_weight")
  if not isinstance(d.datasets, dict) or not d.datasets:
    raise ConfigError("data.datasets must map dataset names to folders, e.g. "
                      "{'d1': '/data/d1', 'd2': '/data/d2'}")
  if sched.global_batch_size < 1:
    raise ConfigError(f"schedule.global_batch_size must be >= 1, got {sched.global_batch_size}")
  datasets, eval_data = d.datasets, d.eval_data
  if d.root:
    datasets = {name: _under(d.root, path) for name, path in datasets.items()}
    eval_data = eval_data and _under(d.root, eval_data)
  ownership.check_overlap(config.workdir, {
      **{f"data.datasets['{name}']": path for name, path in datasets.items()},
      "data.eval_data": eval_data, "loss.teacher_model": loss.teacher_model}, what="--workdir")
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
      ema_start_step=warmup_steps if start is None else start)


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
      teacher_net = load_teacher(loss.teacher_model, plan.num_classes)
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
