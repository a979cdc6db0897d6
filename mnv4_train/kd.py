"""The distillation loss and the Keras model wrapper that trains a student with it.

    loss = distill_weight * KL(softmax(t / T) || softmax(s / T)) * T^2
         + label_weight  * cross-entropy(label smoothed by `label_smoothing`, s)

with student logits s, teacher logits t and temperature T (Hinton et al.; the T^2 keeps the
gradient scale independent of T). The teacher's logits come from the records (full, or top-k:
classes a top-k record lacks are -inf, i.e. probability 0, and the KL runs over the k classes
it keeps, renormalised), or from a teacher model run on the same batch (`teacher="online"`, the
"patient and consistent" function-matching baseline).

Everything here is `keras.ops`, so the loss and `Distiller` run on any Keras backend; the
multi-device training loop (`mnv4_train.train`) is TensorFlow's `tf.distribute`.
"""

from __future__ import annotations

import keras
from keras import ops


def topk_to_dense(indices, values, num_classes: int):
  """Top-k teacher logits -> [..., num_classes] logits with -inf for the missing classes: the
  record format's `mnv4_train.data.records.topk_to_dense` (TensorFlow; the input pipeline
  densifies top-k records with it), imported on use so that this module stays backend-free."""
  from mnv4_train.data import records  # pylint: disable=import-outside-toplevel
  return records.topk_to_dense(indices, values, num_classes)


def kd_loss(student_logits, teacher_logits, temperature: float = 1.0):
  """Per-example KL(teacher_T || student_T) * T^2. Teacher -inf entries are absent classes."""
  t = ops.cast(teacher_logits, "float32") / temperature
  s = ops.cast(student_logits, "float32") / temperature
  log_p = ops.log_softmax(t, axis=-1)
  p = ops.exp(log_p)
  log_q = ops.log_softmax(s, axis=-1)
  # 0 * log 0 = 0 for classes the teacher gives no mass (top-k records); where() also keeps
  # the -inf of those entries out of the gradient.
  terms = ops.where(p > 0, p * (ops.where(p > 0, log_p, 0.0) - log_q), 0.0)
  return ops.sum(terms, axis=-1) * (temperature ** 2)


def label_loss(student_logits, labels, num_classes: int, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy with smoothed one-hot labels."""
  targets = ops.one_hot(ops.cast(labels, "int32"), num_classes)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  log_q = ops.log_softmax(ops.cast(student_logits, "float32"), axis=-1)
  return -ops.sum(targets * log_q, axis=-1)


def soft_label_loss(student_logits, targets):
  """Per-example softmax cross-entropy against soft targets ([batch, classes], rows summing to
  one: mixup/cutmix labels, already smoothed by the mixer, so no smoothing here, as the Model
  Garden's `soft_labels` loss)."""
  log_q = ops.log_softmax(ops.cast(student_logits, "float32"), axis=-1)
  return -ops.sum(ops.cast(targets, "float32") * log_q, axis=-1)


class Distiller(keras.Model):
  """Wraps a student (and optionally an online teacher) with the distillation loss.

  `call` is the student. `y` is a dict with `label` and, unless a teacher model is given,
  `teacher` (the stored logits, [batch, classes]); a batch mixed by mixup/cutmix also has
  `targets`, its soft labels, which the label term then uses instead of `label`. Works with `fit` on one device on any
  backend, and is what the `tf.distribute` loop of `mnv4_train.train` calls per replica
  (`per_example_losses`). The teacher is frozen and not part of the student's weights.
  """

  def __init__(self, student: keras.Model, teacher: keras.Model | None = None, *,
               temperature: float = 1.0, distill_weight: float = 1.0,
               label_weight: float = 0.0, label_smoothing: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    if temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {temperature}")
    self.student = student
    self.teacher = teacher
    if teacher is not None:
      teacher.trainable = False
    self.temperature = float(temperature)
    self.distill_weight = float(distill_weight)
    self.label_weight = float(label_weight)
    self.label_smoothing = float(label_smoothing)
    self.num_classes = int(student.output_shape[-1])

  def call(self, inputs, training=False):
    return self.student(inputs, training=training)

  def teacher_logits(self, x, y):
    if self.teacher is not None:
      return ops.stop_gradient(self.teacher(x, training=False))
    return y["teacher"]

  def per_example_losses(self, x, y, student_logits):
    """{"kd", "ce", "loss", "teacher"} per example (kd is 0 when distill_weight is 0)."""
    zeros = ops.zeros(ops.shape(student_logits)[:1])
    teacher = None
    kd = zeros
    if self.distill_weight:
      teacher = self.teacher_logits(x, y)
      kd = kd_loss(student_logits, teacher, self.temperature)
    ce = zeros
    if self.label_weight and "targets" in y:  # mixed batches carry their soft labels
      ce = soft_label_loss(student_logits, y["targets"])
    elif self.label_weight:
      ce = label_loss(student_logits, y["label"], self.num_classes, self.label_smoothing)
    loss = self.distill_weight * kd + self.label_weight * ce
    return {"kd": kd, "ce": ce, "loss": loss, "teacher": teacher}

  def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
    del sample_weight, training
    loss = ops.mean(self.per_example_losses(x, y, y_pred)["loss"])
    if self.student.losses:
      loss = loss + ops.sum(self.student.losses)
    return loss
