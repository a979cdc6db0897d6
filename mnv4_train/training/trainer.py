"""The compiled train and eval steps of a student under a tf.distribute strategy.

Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy ("Attempt to convert a value
(PerReplica...)"), so the loop is a `tf.function` that takes a host batch from the input
iterator, hands each local replica its slice (`experimental_distribute_values_from_function`)
and runs `Trainer.replica_step` with `strategy.run`; the Keras 3 optimizer all-reduces the
gradients. Statistics come back as named sums (`mnv4_train.training.stats`).

A stop request (`stop`, the flag of `mnv4_train.training.preemption.StopSignals`) ends a loop
after the step it is in: each replica adds its host's flag to the step's statistics vector,
which is all-reduced every step, so every worker leaves the loop after the same step.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from mnv4_train.kd import Distiller
from mnv4_train.training import stats
from mnv4_train.training.strategy import host_info


def l2_variables(student) -> list:
  """The weights the extra L2 loss covers: every trainable kernel but the depthwise ones.

  As the Model Garden's MobileNet backbone with `regularize_depthwise=False` (its default, and
  the MNv4 recipes'): its kernel regularizer is set on the regular and pointwise convs and the
  classifier, never on depthwise kernels; norms, biases and layer scales (1-D) are left alone.
  """
  depthwise = {id(layer.kernel) for layer in student._flatten_layers()  # pylint: disable=protected-access
               if isinstance(layer, keras.layers.DepthwiseConv2D)}
  return [v for v in student.trainable_variables
          if len(v.shape) > 1 and id(v) not in depthwise]


class Trainer:
  """Holds the strategy, student, optimizer and the compiled train/eval loops."""

  def __init__(self, strategy, distiller: Distiller, optimizer, *, global_batch: int,
               datasets: list[str], l2_regularization: float = 0.0, stop=None):
    self.strategy = strategy
    self.distiller = distiller
    self.student = distiller.student
    self.optimizer = optimizer
    self.global_batch = global_batch
    self.datasets = list(datasets)
    self.stat_names = stats.names(self.datasets)
    self.l2 = l2_regularization
    self.l2_variables = l2_variables(self.student) if l2_regularization else []
    self.host, self.num_hosts, self.local_replicas = host_info(strategy)
    self.replica_batch = global_batch // strategy.num_replicas_in_sync
    self.has_teacher = distiller.distill_weight > 0
    # A boolean tf.Variable that, set from any thread, ends the running loop after its step.
    self.stop = stop if stop is not None else tf.Variable(False, trainable=False,
                                                          name="stop_requested")
    self._train_loop = tf.function(self._train_loop_fn)
    self.eval_batch = tf.function(self._eval_batch)

  def train_loop(self, iterator, steps: int) -> tuple[dict[str, float], int, bool]:
    """Runs `steps` steps from `iterator`, fewer when a stop is requested.

    Returns the sums of every statistic over the steps run, by name, how many steps ran, and
    whether a stop was requested on any worker (then every worker ran the same steps).
    """
    totals, done, stopped = self._train_loop(iterator, tf.constant(steps))
    return dict(zip(self.stat_names, totals.numpy())), int(done), bool(stopped)

  def _slice(self, batch):
    """Host batch -> this host's replicas' slices, as distributed values."""
    if self.local_replicas == 1:
      return self.strategy.experimental_distribute_values_from_function(lambda ctx: batch)
    size = self.replica_batch

    def value_fn(ctx):
      local = ctx.replica_id_in_sync_group % self.local_replicas
      return tf.nest.map_structure(lambda t: t[local * size:(local + 1) * size], batch)
    return self.strategy.experimental_distribute_values_from_function(value_fn)

  def replica_step(self, batch) -> dict:
    """One optimizer step on this replica's slice; the sums of its statistics, by name."""
    x = batch["image"]
    with tf.GradientTape() as tape:
      logits = self.student(x, training=True)
      losses = self.distiller.per_example_losses(x, batch, logits)
      loss = tf.reduce_sum(losses["loss"]) / self.global_batch
      extra = list(self.student.losses)
      if self.l2:
        extra.append(self.l2 * tf.add_n([tf.nn.l2_loss(v) for v in self.l2_variables]))
      if extra:
        loss += tf.add_n(extra) / self.strategy.num_replicas_in_sync
      scaled = self.optimizer.scale_loss(loss)
    variables = self.student.trainable_variables
    grads = tape.gradient(scaled, variables)
    self.optimizer.apply_gradients(zip(grads, variables))
    predicted = tf.argmax(logits, -1, output_type=tf.int32)
    if self.has_teacher:
      agree = tf.reduce_sum(tf.cast(
          predicted == tf.argmax(losses["teacher"], -1, output_type=tf.int32), tf.float32))
    else:
      agree = tf.constant(0.0)
    per_dataset = tf.reduce_sum(tf.one_hot(batch["dataset"], len(self.datasets)), 0)
    sums = {stats.LOSS: tf.reduce_sum(losses["loss"]), stats.KD: tf.reduce_sum(losses["kd"]),
            stats.CE: tf.reduce_sum(losses["ce"]),
            stats.CORRECT: tf.reduce_sum(tf.cast(predicted == batch["label"], tf.float32)),
            stats.AGREE: agree, stats.EXAMPLES: tf.cast(tf.shape(x)[0], tf.float32)}
    sums.update({stats.dataset_key(d): per_dataset[i] for i, d in enumerate(self.datasets)})
    return sums

  def _packed_step(self, batch, stop):
    # One vector in `stat_names` order and the stop flag last, so the replicas' sums and the
    # workers' stop requests take a single all-reduce.
    sums = self.replica_step(batch)
    return tf.stack([sums[name] for name in self.stat_names] + [stop])

  def _stop_value(self):
    """This host's stop flag as a float, read afresh at every step."""
    return tf.cast(self.stop.read_value(), tf.float32)

  def _train_loop_fn(self, iterator, steps):
    totals = tf.zeros([len(self.stat_names)])
    done = tf.constant(0)
    stopped = tf.constant(False)
    for _ in tf.range(steps):
      batch = next(iterator)
      packed = self.strategy.run(self._packed_step, args=(self._slice(batch),
                                                          self._stop_value()))
      reduced = self.strategy.reduce(tf.distribute.ReduceOp.SUM, packed, axis=None)
      totals += reduced[:-1]
      done += 1
      stopped = reduced[-1] > 0  # the same on every worker: all of them leave after this step
      if stopped:
        break
    return totals, done, stopped

  def replica_eval(self, batch, stop=0.0):
    logits = self.student(batch["image"], training=False)
    mask = batch["mask"]
    top1 = tf.cast(tf.math.in_top_k(batch["label"], logits, 1), tf.float32)
    k = min(5, int(logits.shape[-1]))
    top5 = tf.cast(tf.math.in_top_k(batch["label"], logits, k), tf.float32)
    return tf.stack([tf.reduce_sum(top1 * mask), tf.reduce_sum(top5 * mask), tf.reduce_sum(mask),
                     stop])

  def _eval_batch(self, batch):
    sums = self.strategy.run(self.replica_eval, args=(self._slice(batch), self._stop_value()))
    return self.strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

  def evaluate(self, dataset, host_batch: int) -> dict | None:
    """Top-1 / top-5 over `dataset` (batches padded to `host_batch`, the padding masked).

    None when a stop was requested on any worker during it (all of them agree, batch by batch,
    through the same all-reduce as the sums): the evaluation is abandoned.
    """
    totals = np.zeros(4)
    for batch in dataset:
      n = int(batch["label"].shape[0])
      pad = host_batch - n
      batch = {"image": tf.pad(batch["image"], [[0, pad], [0, 0], [0, 0], [0, 0]]),
               "label": tf.pad(batch["label"], [[0, pad]]),
               "mask": tf.concat([tf.ones([n]), tf.zeros([pad])], 0)}
      totals += self.eval_batch(batch).numpy()
      if totals[3] > 0:
        return None
    count = max(totals[2], 1.0)
    return {"top1": float(totals[0] / count), "top5": float(totals[1] / count),
            "examples": int(totals[2] / self.num_hosts)}


def ema_optimizer(optimizer):
  """The optimizer that keeps the weights' moving averages.

  Keras' LossScaleOptimizer (mixed_float16) reports `use_ema=False` whatever the optimizer it
  wraps does: the averages live in, and are updated by, `inner_optimizer`.
  """
  inner = getattr(optimizer, "inner_optimizer", None)
  return optimizer if inner is None else inner


class EMASwap:
  """Puts the optimizer's EMA weights into the student for a block (eval, export)."""

  def __init__(self, optimizer, student):
    self.optimizer = ema_optimizer(optimizer)
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
