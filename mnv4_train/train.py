"""The training loop: a student learns from teacher logits (or labels) on one CPU or a pod.

`train` is the one gin-configurable entry point (`mnv4_train.main` parses the gin files and
calls it). Distribution is TensorFlow's: `cpu` (one device), `gpu` (MirroredStrategy), `multiworker`
(MultiWorkerMirroredStrategy from TF_CONFIG) and `tpu` (TPUStrategy via the cluster resolver).
Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy ("Attempt to convert a value
(PerReplica...)"), so the loop is a `tf.function` that takes a host batch from the input
iterator, hands each local replica its slice (`experimental_distribute_values_from_function`)
and runs `Trainer.replica_step` with `strategy.run`; the Keras 3 optimizer all-reduces the
gradients. Each host's tf.data iterator is a plain one, so it can be checkpointed: a resumed
run continues at the same step with the same data position.

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

import json
import logging
import math
import os
import subprocess
import time

import gin
import keras
import numpy as np
import tensorflow as tf

from mnv4_train import models
from mnv4_train.data import augment, pipeline
from mnv4_train.kd import Distiller
from mnv4_train.errors import ConfigError, InputPathError, UserError

DISTRIBUTIONS = ("cpu", "gpu", "multiworker", "tpu")
TEACHERS = ("records", "online", "none")


class TrainingDiverged(UserError):
  """The loss became NaN or infinite."""


# ---- set-up ----------------------------------------------------------------------------------

def make_strategy(distribution: str, tpu: str = "local", cpu_replicas: int = 1):
  """The tf.distribute strategy for `distribution`; one clear error when it cannot be had."""
  if distribution not in DISTRIBUTIONS:
    raise ConfigError(f"train.distribution must be one of {list(DISTRIBUTIONS)}, "
                      f"not {distribution!r}")
  if distribution == "cpu":
    if cpu_replicas > 1:  # N logical CPUs: N replicas on one host, as N GPUs would be
      cpu = tf.config.list_physical_devices("CPU")[0]
      tf.config.set_logical_device_configuration(
          cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
      return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(cpu_replicas)])
    return tf.distribute.OneDeviceStrategy("/cpu:0")
  if distribution == "gpu":
    if not tf.config.list_physical_devices("GPU"):
      raise ConfigError("train.distribution='gpu' but TensorFlow sees no GPU; install "
                        "tensorflow[and-cuda] or use train.distribution='cpu'")
    return tf.distribute.MirroredStrategy()
  if distribution == "multiworker":
    if not os.environ.get("TF_CONFIG"):
      raise ConfigError("train.distribution='multiworker' needs TF_CONFIG (cluster and task) in "
                        "the environment of every worker; see launch/gpu_cluster.py")
    return tf.distribute.MultiWorkerMirroredStrategy()
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
  tf.config.experimental_connect_to_cluster(resolver)
  tf.tpu.experimental.initialize_tpu_system(resolver)
  return tf.distribute.TPUStrategy(resolver)


def host_info(strategy):
  """(host index, number of hosts, local replicas) of this process."""
  local = len(strategy.extended.worker_devices)
  hosts = max(1, strategy.num_replicas_in_sync // local)
  resolver = getattr(strategy, "cluster_resolver", None)
  host = int(getattr(resolver, "task_id", 0) or 0) if hosts > 1 else 0
  return host, hosts, local


def _check_workdir(workdir: str):
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


def _git_revision():
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__), check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def _write_text(path, text):
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def _append_jsonl(path, rows, upto_step=None):
  """Appends rows; with `upto_step`, first drops lines past it (a resumed run rewrites them)."""
  kept = []
  if upto_step is not None and tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= upto_step]
  text = "".join(kept) + "".join(json.dumps(r) + "\n" for r in rows)
  if upto_step is not None:
    _write_text(path, text)
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


# ---- the trainer -----------------------------------------------------------------------------

class Trainer:
  """Holds the strategy, student, optimizer and the compiled train/eval loops."""

  def __init__(self, strategy, distiller: Distiller, optimizer, *, global_batch: int,
               num_datasets: int, l2_regularization: float = 0.0):
    self.strategy = strategy
    self.distiller = distiller
    self.student = distiller.student
    self.optimizer = optimizer
    self.global_batch = global_batch
    self.num_datasets = num_datasets
    self.l2 = l2_regularization
    self.host, self.num_hosts, self.local_replicas = host_info(strategy)
    self.replica_batch = global_batch // strategy.num_replicas_in_sync
    self.has_teacher = distiller.distill_weight > 0
    # loss, kd, ce, correct (labels), agreement (teacher argmax), examples, then per dataset.
    self.num_stats = 6 + num_datasets
    self.train_loop = tf.function(self._train_loop)
    self.eval_batch = tf.function(self._eval_batch)

  def _slice(self, batch):
    """Host batch -> this host's replicas' slices, as distributed values."""
    if self.local_replicas == 1:
      return self.strategy.experimental_distribute_values_from_function(lambda ctx: batch)
    size = self.replica_batch

    def value_fn(ctx):
      local = ctx.replica_id_in_sync_group % self.local_replicas
      return tf.nest.map_structure(lambda t: t[local * size:(local + 1) * size], batch)
    return self.strategy.experimental_distribute_values_from_function(value_fn)

  def replica_step(self, batch):
    x = batch["image"]
    with tf.GradientTape() as tape:
      logits = self.student(x, training=True)
      losses = self.distiller.per_example_losses(x, batch, logits)
      loss = tf.reduce_sum(losses["loss"]) / self.global_batch
      extra = list(self.student.losses)
      if self.l2:
        extra.append(self.l2 * tf.add_n([tf.nn.l2_loss(v) for v in self.student.trainable_variables
                                         if len(v.shape) > 1]))
      if extra:
        loss += tf.add_n(extra) / self.strategy.num_replicas_in_sync
      scaled = self.optimizer.scale_loss(loss)
    variables = self.student.trainable_variables
    grads = tape.gradient(scaled, variables)
    self.optimizer.apply_gradients(zip(grads, variables))
    predicted = tf.argmax(logits, -1, output_type=tf.int32)
    correct = tf.reduce_sum(tf.cast(predicted == batch["label"], tf.float32))
    if self.has_teacher:
      agree = tf.reduce_sum(tf.cast(
          predicted == tf.argmax(losses["teacher"], -1, output_type=tf.int32), tf.float32))
    else:
      agree = tf.constant(0.0)
    per_dataset = tf.reduce_sum(tf.one_hot(batch["dataset"], self.num_datasets), 0)
    return tf.concat([tf.stack([tf.reduce_sum(losses["loss"]), tf.reduce_sum(losses["kd"]),
                                tf.reduce_sum(losses["ce"]), correct, agree,
                                tf.cast(tf.shape(x)[0], tf.float32)]), per_dataset], 0)

  def _train_loop(self, iterator, steps):
    totals = tf.zeros([self.num_stats])
    for _ in tf.range(steps):
      batch = next(iterator)
      stats = self.strategy.run(self.replica_step, args=(self._slice(batch),))
      totals += self.strategy.reduce(tf.distribute.ReduceOp.SUM, stats, axis=None)
    return totals

  def replica_eval(self, batch):
    logits = self.student(batch["image"], training=False)
    mask = batch["mask"]
    top1 = tf.cast(tf.math.in_top_k(batch["label"], logits, 1), tf.float32)
    k = min(5, int(logits.shape[-1]))
    top5 = tf.cast(tf.math.in_top_k(batch["label"], logits, k), tf.float32)
    return tf.stack([tf.reduce_sum(top1 * mask), tf.reduce_sum(top5 * mask), tf.reduce_sum(mask)])

  def _eval_batch(self, batch):
    stats = self.strategy.run(self.replica_eval, args=(self._slice(batch),))
    return self.strategy.reduce(tf.distribute.ReduceOp.SUM, stats, axis=None)

  def evaluate(self, dataset, host_batch: int):
    totals = np.zeros(3)
    for batch in dataset:
      n = int(batch["label"].shape[0])
      pad = host_batch - n
      batch = {"image": tf.pad(batch["image"], [[0, pad], [0, 0], [0, 0], [0, 0]]),
               "label": tf.pad(batch["label"], [[0, pad]]),
               "mask": tf.concat([tf.ones([n]), tf.zeros([pad])], 0)}
      totals += self.eval_batch(batch).numpy()
    count = max(totals[2], 1.0)
    return {"top1": float(totals[0] / count), "top5": float(totals[1] / count),
            "examples": int(totals[2] / self.num_hosts)}


class _EMASwap:
  """Puts the optimizer's EMA weights into the student for a block (eval, export)."""

  def __init__(self, optimizer, student):
    self.optimizer = optimizer
    self.student = student
    self.saved = None

  def __enter__(self):
    if getattr(self.optimizer, "use_ema", False):
      # Keras 3 keeps the averages beside the optimizer's own list of trainable variables.
      pairs = zip(self.optimizer._trainable_variables,  # pylint: disable=protected-access
                  self.optimizer._model_variables_moving_average)  # pylint: disable=protected-access
      self.saved = []
      for var, avg in pairs:
        self.saved.append((var, tf.identity(var.value)))
        var.assign(avg)
    return self

  def __exit__(self, *exc):
    for var, value in self.saved or []:
      var.assign(value)


def _schedule(learning_rate, warmup_steps, total_steps, end_learning_rate):
  decay = max(1, total_steps - warmup_steps)
  return keras.optimizers.schedules.CosineDecay(
      initial_learning_rate=0.0 if warmup_steps else learning_rate,
      decay_steps=decay, alpha=end_learning_rate / learning_rate if learning_rate else 0.0,
      warmup_target=learning_rate if warmup_steps else None, warmup_steps=warmup_steps)


def _under(root, path):
  return path if os.path.isabs(path) or "://" in path else os.path.join(root, path)


def _load_teacher(path):
  if not path:
    raise ConfigError("train.teacher='online' needs train.teacher_model (a .keras file)")
  if not tf.io.gfile.exists(path):
    raise InputPathError(f"train.teacher_model {path} does not exist")
  try:
    return keras.saving.load_model(path, compile=False)
  except Exception as e:  # a user's file that does not load
    raise InputPathError(f"train.teacher_model {path} cannot be loaded as a .keras model: "
                         f"{str(e).splitlines()[0][:200]}") from None


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
    crop_area_min: float = 0.08,
    flip: bool = True,
    global_batch_size: int = 256,
    epochs: float | None = None,
    train_steps: int | None = None,
    examples_per_epoch: int | None = None,
    learning_rate: float = 0.004,
    warmup_steps: int = 1560,
    end_learning_rate: float = 0.0,
    weight_decay: float = 0.1,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    clipnorm: float | None = None,
    l2_regularization: float = 0.0,
    ema_decay: float | None = None,
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
      `crop_area_min` of the image + RandAugment `augment_layers`/`augment_magnitude` + a
      horizontal flip when `flip`).
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
    weight_decay, beta_1, beta_2, epsilon, clipnorm: AdamW (no decay on norms, biases, scales).
    l2_regularization: an extra 0.5 * l2 * |w|^2 loss on kernels (the Model Garden's Conv-S).
    ema_decay: keep an exponential moving average of the weights (evaluated and exported).
    distribution, tpu, cpu_replicas: see `make_strategy`.
    mixed_precision: None, "mixed_bfloat16", "mixed_float16" or "auto" (bf16 on TPU, float16
      on GPU, float32 on CPU).
    steps_per_loop, log_every, checkpoint_every, eval_every, keep_checkpoints: cadence.
    seed, deterministic, shard_policy, shuffle, cycle_length: the input pipeline.
    stop_after_steps: stop (checkpointed) after this many steps of this invocation, as a
      preemption would; the schedule still spans the whole run.
    op_determinism: TensorFlow's deterministic kernels (bit-equal reruns; slower).
  """
  t_start = time.time()
  if teacher not in TEACHERS:
    raise ConfigError(f"train.teacher must be one of {list(TEACHERS)}, not {teacher!r}")
  if teacher == "none" and distill_weight:
    distill_weight = 0.0
  if not distill_weight and not label_weight:
    raise ConfigError("nothing to learn from: set train.distill_weight (with a teacher) or "
                      "train.label_weight")
  if not isinstance(datasets, dict) or not datasets:
    raise ConfigError("train.datasets must map dataset names to folders, e.g. "
                      "{'d1': '/data/d1', 'd2': '/data/d2'}")
  if global_batch_size < 1:
    raise ConfigError(f"train.global_batch_size must be >= 1, got {global_batch_size}")
  _check_workdir(workdir)
  if data_root:
    datasets = {name: _under(data_root, path) for name, path in datasets.items()}
    eval_data = eval_data and _under(data_root, eval_data)
  keras.utils.set_random_seed(seed)
  if op_determinism:
    tf.config.experimental.enable_op_determinism()

  strategy = make_strategy(distribution, tpu, cpu_replicas)
  host, num_hosts, local = host_info(strategy)
  chief = host == 0
  replicas = strategy.num_replicas_in_sync
  if global_batch_size % replicas:
    raise ConfigError(f"train.global_batch_size {global_batch_size} is not divisible by the "
                      f"{replicas} replicas")
  host_batch = global_batch_size // num_hosts
  if mixed_precision == "auto":
    mixed_precision = {"tpu": "mixed_bfloat16", "gpu": "mixed_float16"}.get(distribution)
  keras.mixed_precision.set_dtype_policy(mixed_precision or "float32")

  specs = [pipeline.open_dataset(path, name) for name, path in datasets.items()]
  kinds = {s.kind for s in specs}
  if teacher == "records" and distill_weight and kinds != {"distill"}:
    raise ConfigError("train.teacher='records' needs distillation records for every dataset; "
                      "source shards have no teacher logits (use teacher='online' or 'none')")
  num_classes = num_classes or specs[0].num_classes
  if resolution is None:
    resolution = specs[0].resolution or models.canonical_resolution(model)
  if examples_per_epoch is None:
    examples_per_epoch = specs[0].epoch_examples
  if train_steps is None:
    if epochs is None:
      raise ConfigError("set train.epochs or train.train_steps")
    train_steps = max(1, math.ceil(epochs * examples_per_epoch / global_batch_size))
  options = pipeline.StreamOptions(
      seed=seed, shuffle=shuffle, cycle_length=cycle_length,
      supervised_recipe=augment.Recipe("supervised", ra_layers=augment_layers,
                                       ra_magnitude=augment_magnitude,
                                       crop_area=(crop_area_min, 1.0), flip=flip))
  train_ds = pipeline.train_dataset(
      specs, resolution=resolution, host_batch=host_batch, num_classes=num_classes,
      weights=weights, schedule=weight_schedule, num_hosts=num_hosts, host=host,
      shard_policy=shard_policy, deterministic=deterministic, options=options)

  with strategy.scope():
    student = models.build(model, num_classes=num_classes, resolution=resolution,
                           **(model_options or {}))
    teacher_net = None
    if teacher == "online" and distill_weight:
      teacher_net = _load_teacher(teacher_model)
      out = int(teacher_net.output_shape[-1])
      if out != num_classes:
        raise ConfigError(f"teacher {teacher_model} outputs {out} classes but the data has "
                          f"{num_classes}")
    distiller = Distiller(student, teacher_net, temperature=temperature,
                          distill_weight=distill_weight, label_weight=label_weight,
                          label_smoothing=label_smoothing)
    optimizer = keras.optimizers.AdamW(
        learning_rate=_schedule(learning_rate, warmup_steps, train_steps, end_learning_rate),
        weight_decay=weight_decay, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
        global_clipnorm=clipnorm, use_ema=bool(ema_decay), ema_momentum=ema_decay or 0.99)
    # Decoupled weight decay on kernels only: not on norms, biases or layer scales.
    optimizer.exclude_from_weight_decay(
        var_list=[v for v in student.trainable_variables if len(v.shape) <= 1])
    if mixed_precision == "mixed_float16":
      optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(student.trainable_variables)

  trainer = Trainer(strategy, distiller, optimizer, global_batch=global_batch_size,
                    num_datasets=len(specs), l2_regularization=l2_regularization)
  iterator = iter(train_ds)

  ckpt_dir = os.path.join(workdir, "checkpoints")
  model_dir = ckpt_dir if chief else os.path.join(workdir, "tmp", f"host{host}")
  model_ckpt = tf.train.Checkpoint(model=student, optimizer=optimizer)
  model_manager = tf.train.CheckpointManager(model_ckpt, model_dir, keep_checkpoints)
  data_dir = os.path.join(ckpt_dir, f"data-host{host}")
  data_ckpt = tf.train.Checkpoint(iterator=iterator)
  data_manager = tf.train.CheckpointManager(data_ckpt, data_dir, keep_checkpoints)

  step = 0
  latest = tf.train.latest_checkpoint(ckpt_dir)
  if latest:
    model_ckpt.restore(latest).assert_existing_objects_matched()
    step = int(optimizer.iterations.numpy())
    data_path = os.path.join(data_dir, f"ckpt-{step}")
    if not tf.io.gfile.exists(data_path + ".index"):
      raise InputPathError(f"{workdir} has a checkpoint at step {step} but no input position "
                           f"for host {host} ({data_path}); resume with the same hosts")
    data_ckpt.restore(data_path).assert_existing_objects_matched()
    logging.info("resumed from %s at step %d", latest, step)
    metrics_path = os.path.join(workdir, "metrics.json")
    if step >= train_steps and tf.io.gfile.exists(metrics_path):
      with tf.io.gfile.GFile(metrics_path) as f:
        logging.info("%s is a finished run of %d steps; nothing to do", workdir, train_steps)
        return json.load(f)

  if chief:
    _write_text(os.path.join(workdir, "config.gin"), gin.config_str())
    _write_text(os.path.join(workdir, "run.json"), json.dumps({
        "model": model, "num_classes": num_classes, "resolution": resolution,
        "train_steps": train_steps, "global_batch_size": global_batch_size,
        "datasets": {s.name: {"path": s.path, "kind": s.kind, "recipe": s.recipe,
                              "examples": s.num_examples} for s in specs},
        "distribution": distribution, "replicas": replicas, "hosts": num_hosts,
        "mixed_precision": mixed_precision, "git_revision": _git_revision()}, indent=1))
    writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
  else:
    writer = tf.summary.create_noop_writer()
  logging.info("%s: %d classes at %dpx, %d steps of %d (%d replicas on %d hosts), datasets %s",
               model, num_classes, resolution, train_steps, global_batch_size, replicas,
               num_hosts, ", ".join(f"{s.name} ({s.kind} {s.recipe})".replace(" )", ")")
                                    for s in specs))

  eval_ds = None
  if eval_data:
    eval_ds, _ = pipeline.eval_dataset(eval_data, resolution=resolution,
                                       batch_size=eval_batch_size, crop_fraction=eval_crop)

  def run_eval(at_step):
    with _EMASwap(optimizer, student):
      result = trainer.evaluate(eval_ds, eval_batch_size)
    result["step"] = at_step
    if chief:
      _append_jsonl(os.path.join(workdir, "eval.jsonl"), [result], upto_step=at_step)
      with writer.as_default(step=at_step):
        tf.summary.scalar("eval/top1", result["top1"])
        tf.summary.scalar("eval/top5", result["top5"])
    logging.info("eval at step %d: top-1 %.4f top-5 %.4f (%d images)", at_step, result["top1"],
                 result["top5"], result["examples"])
    return result

  def save(at_step):
    data_manager.save(checkpoint_number=at_step)   # the input position first: the model's
    model_manager.save(checkpoint_number=at_step)  # checkpoint is what marks a step as done

  if chief:  # a resumed run rewrites what came after its checkpoint
    _append_jsonl(os.path.join(workdir, "history.jsonl"), [], upto_step=step)
    _append_jsonl(os.path.join(workdir, "eval.jsonl"), [], upto_step=step)
  stop_at = train_steps if stop_after_steps is None else min(train_steps, step + stop_after_steps)
  names = [s.name for s in specs]
  interval_start, interval_time = step, time.time()
  totals = np.zeros(trainer.num_stats)
  while step < stop_at:
    boundary = min(stop_at, (step // steps_per_loop + 1) * steps_per_loop,
                   (step // log_every + 1) * log_every,
                   (step // checkpoint_every + 1) * checkpoint_every,
                   (step // eval_every + 1) * eval_every if eval_every and eval_ds else stop_at)
    try:
      totals += trainer.train_loop(iterator, tf.constant(boundary - step)).numpy()
    except tf.errors.OutOfRangeError:
      raise InputPathError("the training data ran out; check that the datasets hold examples")
    step = boundary
    if not np.isfinite(totals[0]):
      last = model_manager.latest_checkpoint if chief else tf.train.latest_checkpoint(ckpt_dir)
      raise TrainingDiverged(f"the loss became {totals[0]} between steps {interval_start} and "
                             f"{step}; stopped, the last good checkpoint is {last or 'none'}; "
                             "lower train.learning_rate or check the teacher logits")
    if step % log_every == 0 or step == stop_at:
      n = max(totals[5], 1.0)
      seconds = time.time() - interval_time
      row = {"step": step, "loss": totals[0] / n, "kd": totals[1] / n, "ce": totals[2] / n,
             "accuracy": totals[3] / n,
             "agreement": totals[4] / n if trainer.has_teacher else None,
             "learning_rate": float(optimizer.learning_rate),
             "examples_per_second": (step - interval_start) * global_batch_size / seconds,
             "mixture": {name: totals[6 + i] / n for i, name in enumerate(names)}}
      if chief:
        _append_jsonl(os.path.join(workdir, "history.jsonl"), [row])
        with writer.as_default(step=step):
          for key in ("loss", "kd", "ce", "accuracy", "learning_rate", "examples_per_second"):
            tf.summary.scalar(f"train/{key}", row[key])
          if row["agreement"] is not None:
            tf.summary.scalar("train/teacher_agreement", row["agreement"])
          for name, share in row["mixture"].items():
            tf.summary.scalar(f"mixture/{name}", share)
      logging.info("step %d/%d (%.0f%%): loss %.4f, train top-1 %.3f%s, lr %.2e, %.1f img/s%s",
                   step, train_steps, 100.0 * step / train_steps, row["loss"], row["accuracy"],
                   f", teacher agreement {row['agreement']:.3f}" if trainer.has_teacher else "",
                   row["learning_rate"], row["examples_per_second"],
                   "" if len(names) == 1 else ", mix " + " ".join(
                       f"{k} {v:.2f}" for k, v in row["mixture"].items()))
      totals[:] = 0
      interval_start, interval_time = step, time.time()
    if step % checkpoint_every == 0 or step == stop_at:
      save(step)
    if eval_ds is not None and eval_every and step % eval_every == 0 and step < train_steps:
      run_eval(step)

  result = {"step": step, "train_steps": train_steps, "finished": step >= train_steps}
  if step >= train_steps:
    if eval_ds is not None:
      result.update(run_eval(step))
    if chief:
      export_dir = os.path.join(workdir, "export")
      tf.io.gfile.makedirs(export_dir)
      path = os.path.join(export_dir, "student.keras")
      with _EMASwap(optimizer, student):
        student.save(path + ".tmp.keras")
      tf.io.gfile.rename(path + ".tmp.keras", path, overwrite=True)
      result["export"] = path
      _write_text(os.path.join(workdir, "operative_config.gin"), gin.operative_config_str())
      _write_text(os.path.join(workdir, "metrics.json"), json.dumps(result, indent=1))
  if chief:
    writer.flush()
    plot_curves(workdir)
  if not chief:
    tf.io.gfile.rmtree(os.path.join(workdir, "tmp", f"host{host}"))
  result["seconds"] = time.time() - t_start
  return result
