"""Beam transforms shared by the data_prep jobs.

Small named DoFns and PTransforms: validating images (bad ones go to a dead-letter output and bump
a counter), assigning deterministic shards, writing sorted shard files, reading source shards
with their positions, and teacher inference through Beam's `RunInference`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.ml.inference import base as inference_base
from apache_beam.ml.inference import tensorflow_inference as tf_inference
from PIL import Image

from data_prep import console, files
from mnv4_train.data import records
from mnv4_train.errors import first_line
from mnv4_train.models import checkpoint

DEAD_LETTER = "dead_letter"
NAMESPACE = console.NAMESPACE  # of every job's counters (the console prints them at the end)


def stable_hash(text: str) -> int:
  """A 64-bit hash that is the same on every machine and run (unlike Python's hash())."""
  return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()[:8],
                        "little")


# ---- validation -------------------------------------------------------------------------------

class ValidateImage(beam.DoFn):
  """Keeps examples whose bytes decode as an image; routes the rest to `dead_letter`.

  In: dict(id, encoded, label, ...). Out: the same dict with height, width, format and
  original_format set. Dead letters are dict(id, error).

  JPEG, PNG, GIF and BMP bytes are kept as they are. WebP is read with Pillow and stored as a
  lossless PNG of the same pixels (the first frame of an animation, as for GIF), with
  original_format `webp`: TensorFlow's WebP decoder takes only some files (not RGBA with
  channels=3) and aborts the process on animated ones, so no WebP bytes reach it here or in the
  trainer.
  """

  def __init__(self):
    self.good = beam.metrics.Metrics.counter(NAMESPACE, "images_ok")
    self.bad = beam.metrics.Metrics.counter(NAMESPACE, "images_corrupt")
    self.converted = beam.metrics.Metrics.counter(NAMESPACE, "images_webp_to_png")

  def process(self, example):
    data = example["encoded"]
    fmt = original = records.image_format(data)
    error = None if fmt else "not a JPEG, PNG, GIF, BMP or WebP file"
    if fmt == "webp":
      try:
        data, fmt = webp_to_png(data), "png"
      except Exception as e:  # Pillow raises several types for a bad file; all are the file's
        error = f"cannot decode WebP: {_pil_error_text(e)}"
    if not error:
      try:
        shape = tf.io.decode_image(data, channels=3, expand_animations=False).shape
        if shape[0] == 0 or shape[1] == 0:
          error = "empty image"
      except tf.errors.OpError as e:
        error = f"cannot decode: {_op_error_text(e)}"
    if error:
      self.bad.inc()
      yield beam.pvalue.TaggedOutput(DEAD_LETTER, {"id": example["id"], "error": error})
      return
    self.good.inc()
    if original != fmt:
      self.converted.inc()
    yield {**example, "encoded": data, "height": int(shape[0]), "width": int(shape[1]),
           "format": fmt, "original_format": original}


def webp_to_png(data: bytes) -> bytes:
  """WebP bytes -> a PNG of the same pixels (lossless; the first frame of an animation)."""
  with Image.open(io.BytesIO(data), formats=["WEBP"]) as image:
    image.load()
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
      image = image.convert("RGBA" if "A" in image.mode else "RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
  return out.getvalue()


def _pil_error_text(error: Exception) -> str:
  """Pillow's message without object addresses (dead letters are the same run to run)."""
  text = first_line(error)
  return re.sub(r" ?<[^>]* at 0x[0-9a-fA-F]+>", "", text).strip()


def _op_error_text(error: tf.errors.OpError) -> str:
  """The readable part of a TensorFlow op error (no function-node prefix or op suffix)."""
  text = first_line(error.message or "", type(error).__name__)
  text = text.split("}} ", 1)[-1]
  return text.split(" [Op:", 1)[0].strip()


# ---- sharded, sorted, deterministic output ----------------------------------------------------

class WriteSortedShards(beam.PTransform):
  """(file name, (sort key, serialized record)) -> one sorted file per name.

  Files ending in `.jsonl` get one record (a str) per line; any other name is a TFRecord file.

  Beam's WriteToTFRecord spreads records over shards and orders them as bundles arrive, so two
  runs write different bytes; grouping by file and sorting gives byte-identical files. The file
  name is relative to `folder`. Emits dict(path, count, bytes) per written file.
  """

  def __init__(self, folder: str, label=None):
    super().__init__(label)
    self.folder = folder

  def expand(self, keyed):
    return (keyed
            | "GroupByFile" >> beam.GroupByKey()
            | "WriteFile" >> beam.ParDo(_WriteShardFile(self.folder)))


class _WriteShardFile(beam.DoFn):

  def __init__(self, folder):
    self.folder = folder
    self.written = beam.metrics.Metrics.counter(NAMESPACE, "records_written")

  def process(self, element):
    name, items = element
    path = os.path.join(self.folder, name)
    tf.io.gfile.makedirs(os.path.dirname(path))
    ordered = (record for _, record in sorted(items, key=lambda kv: kv[0]))
    if name.endswith(".jsonl"):
      lines = list(ordered)
      with tf.io.gfile.GFile(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))
      n = len(lines)
    else:
      n = files.write_tfrecords(path, ordered)
    self.written.inc(n)
    yield {"path": name, "count": n, "bytes": tf.io.gfile.stat(path).length}


class WriteSortedJsonLines(beam.PTransform):
  """Small collections (dead letters, selections per class) -> one sorted JSON-lines file."""

  def __init__(self, path: str, label=None):
    super().__init__(label)
    self.path = path

  def expand(self, pcoll):
    return (pcoll
            | "ToList" >> beam.combiners.ToList()
            | "Write" >> beam.Map(_write_jsonl, self.path))


def _write_jsonl(items, path):
  lines = sorted(json.dumps(item, sort_keys=True) for item in items)
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.gfile.GFile(path, "w") as f:
    f.write("".join(line + "\n" for line in lines))
  return len(lines)


# ---- reading source shards --------------------------------------------------------------------

def read_shard(path: str) -> list[dict]:
  """All examples of one source shard, in file order (position = list index)."""
  return [records.read_source_example(r) for r in files.read_tfrecords(path)]


# ---- teacher inference ------------------------------------------------------------------------

INPUT_SCALES = {
    # name: (scale, offset) applied to [-1, 1] pixels
    "minus_one_to_one": (1.0, 0.0),
    "zero_to_one": (0.5, 0.5),
    "zero_to_255": (127.5, 127.5),
}


def batched_inference_fn(model, batch, inference_args, model_id=None):
  """RunInference's TF inference function for elements that are already batches.

  The jobs batch upstream in a fixed order (RunInference's own batching follows bundle
  boundaries, and a teacher's float output can differ in the last bit with batch composition),
  so records are byte-identical run to run. The forward pass is compiled once per model, where
  Beam's default calls the model eagerly on every batch.
  """
  fn = getattr(model, "_mnv4_serve", None)
  if fn is None:
    fn = model._mnv4_serve = _forward_fn(model)
  return [inference_base.PredictionResult(x, np.asarray(fn(x))) for x in batch]


def _forward_fn(model):
  """images -> outputs for a Keras model or a SavedModel's serving signature."""
  if hasattr(model, "predict"):
    return tf.function(lambda x: model(x, training=False), reduce_retracing=True)
  signature = model.signatures["serving_default"]
  return lambda x: next(iter(signature(x).values()))


_LOADED: dict = {}  # the last teacher this process loaded: {(path, size, mtime): model}


def load_teacher(path: str, what: str = "teacher"):
  """A teacher or classifier, loaded once per process while its file stays the same.

  A job's launcher loads the teacher to check it (`check_inputs`), and RunInference loads it
  again in every worker; with the in-process runner (the default) both are this process, and
  the second load (about 0.4 s for Conv-S) is the first one's model. The key is the path with
  its size and modification time, so a teacher rewritten in place loads anew; only the last
  model is kept. Inference only: callers never train or change it.
  """
  try:
    stat = tf.io.gfile.stat(path)
    # A folder (SavedModel) is not kept: its time does not change when a file in it does.
    key = None if stat.is_directory else (path, stat.length, stat.mtime_nsec)
  except tf.errors.OpError:  # a missing path: the loader says so
    key = None
  if key is not None and key in _LOADED:
    return _LOADED[key]
  model = checkpoint.load_model(path, what=what)
  if key is not None:
    _LOADED.clear()
    _LOADED[key] = model
  return model


def forget_teachers():
  """Drops the kept teacher: the next `load_teacher` reads its file again."""
  _LOADED.clear()


class TeacherHandler(tf_inference.TFModelHandlerTensor):
  """RunInference handler for a teacher: a `.keras` file or a TensorFlow SavedModel folder.

  Loads through the project's one loader (`mnv4_train.models.checkpoint.load_model`), so the
  MNv4 layers are registered in every worker process (Beam's own loader calls keras without
  them), and SavedModels, which Keras 3 no longer loads, go through `tf.saved_model.load`.
  """

  def load_model(self):
    return load_teacher(self._model_uri)


def teacher_handler(path: str):
  """A keyed RunInference handler; elements are (key, batch tensor), one forward pass each."""
  handler = TeacherHandler(model_uri=path, inference_fn=batched_inference_fn,
                           min_batch_size=1, max_batch_size=1)
  return inference_base.KeyedModelHandler(handler)


def teacher_output_classes(model, resolution: int) -> int:
  """The number of logits a teacher produces: its Keras output shape where the model states it
  and takes `resolution`, else by running it once on a blank image."""
  outputs = getattr(model, "output_shape", None)
  inputs = getattr(model, "input_shape", None)
  if (isinstance(outputs, tuple) and len(outputs) == 2 and outputs[-1]
      and isinstance(inputs, tuple) and len(inputs) == 4
      and inputs[1] in (None, resolution) and inputs[2] in (None, resolution)):
    return int(outputs[-1])
  out = _forward_fn(model)(tf.zeros((1, resolution, resolution, 3)))
  return int(np.asarray(out).shape[-1])


def teacher_resolution(model, default: int | None) -> int | None:
  """A fixed input size from the teacher's input shape, else `default`."""
  shape = getattr(model, "input_shape", None)
  if shape and len(shape) == 4 and shape[1]:
    return int(shape[1])
  return default
