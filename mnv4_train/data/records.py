"""Record formats: source shards and distillation records (tf.train.Example).

Source shard (`data_prep.ingest`), one Example per image, stored once:
  image/id        bytes   stable example id (e.g. `n01440764/n01440764_10026.JPEG`)
  image/encoded   bytes   the original encoded image (JPEG/PNG/GIF/BMP), not re-encoded; WebP
                          is stored as a lossless PNG of its pixels (`data_prep.transforms`)
  image/format    bytes   `jpeg`, `png`, `gif` or `bmp`: what image/encoded holds
  image/original_format  bytes  `webp` for converted images; absent when image/format is the
                          file's own format
  image/label     int64   class index, -1 when unlabeled
  image/height, image/width  int64

Distillation record (`data_prep.distill`), one Example per (example, replica, copy):
  id, partner_id          bytes   the source example (and D2's mixup partner, else empty)
  source_shard, source_index, partner_index   int64   where the images sit in the source shards
  recipe                  bytes   `d1`, `d2`, `d3`
  replica, copy           int64   copy > 0 only for D3 images replicated to balance a class
  aug/<name>              the augmentation parameters of `augment.PARAM_SPEC` (int64 / float)
  num_classes             int64
  logits                  bytes   float16 little-endian, num_classes values  (full logits)
  topk/indices, topk/values  bytes int32 / float16 little-endian, k values (top-k mode)

Examples are serialised with `deterministic=True` (feature maps in key order): otherwise the
bytes depend on the process's hash seed, and two workers write different files.

Records of one (recipe, replica, source shard) live in one file, sorted by source_index then
copy, so the trainer streams a source shard beside its records with no global random access.

The manifests that describe a folder of these files (kind, version, shards, counts) are the typed
records of `formats.py`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mnv4_train.data import augment

IMAGE_FORMATS = {b"\xff\xd8\xff": "jpeg", b"\x89PNG": "png", b"GIF8": "gif", b"BM": "bmp"}


def image_format(data: bytes) -> str | None:
  """The container format from the magic bytes, or None if it is not an image we take."""
  for magic, name in IMAGE_FORMATS.items():
    if data.startswith(magic):
      return name
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "webp"  # ingest stores it as PNG
  return None


def _bytes(*values):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _floats(values):
  return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def _as_bytes(s):
  return s if isinstance(s, bytes) else s.encode("utf-8")


# ---- source shards ----------------------------------------------------------------------------

def source_example(example_id, encoded: bytes, label: int, height: int, width: int,
                   fmt: str, original_format: str = "") -> bytes:
  feature = {
      "image/id": _bytes(_as_bytes(example_id)),
      "image/encoded": _bytes(encoded),
      "image/format": _bytes(fmt.encode()),
      "image/label": _ints([label]),
      "image/height": _ints([height]),
      "image/width": _ints([width]),
  }
  if original_format and original_format != fmt:
    feature["image/original_format"] = _bytes(original_format.encode())
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(
      deterministic=True)


SOURCE_FEATURES = {
    "image/id": tf.io.FixedLenFeature([], tf.string),
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "image/original_format": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "image/label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    "image/height": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "image/width": tf.io.FixedLenFeature([], tf.int64, default_value=0),
}


def parse_source(serialized: tf.Tensor) -> dict:
  """tf.data-friendly parse of one source Example."""
  return tf.io.parse_single_example(serialized, SOURCE_FEATURES)


def read_source_example(serialized: bytes) -> dict:
  """Python-side parse (Beam): id (str), encoded (bytes), label (int), height, width, format,
  original_format ("" unless converted)."""
  ex = tf.train.Example.FromString(serialized)
  f = ex.features.feature
  return {
      "id": f["image/id"].bytes_list.value[0].decode("utf-8", "surrogateescape"),
      "encoded": f["image/encoded"].bytes_list.value[0],
      "label": int(f["image/label"].int64_list.value[0]) if "image/label" in f else -1,
      "height": int(f["image/height"].int64_list.value[0]) if "image/height" in f else 0,
      "width": int(f["image/width"].int64_list.value[0]) if "image/width" in f else 0,
      "format": f["image/format"].bytes_list.value[0].decode() if "image/format" in f else "",
      "original_format": (f["image/original_format"].bytes_list.value[0].decode()
                          if "image/original_format" in f else ""),
  }


# ---- distillation records ---------------------------------------------------------------------

def _param_feature(name, value):
  value = np.asarray(value).reshape(-1)
  if augment.PARAM_SPEC[name][1] == tf.int32:
    return _ints(value)
  return _floats(value)


def distill_record(*, example_id, source_shard: int, source_index: int, recipe: str,
                   replica: int, copy: int, params: dict, logits: np.ndarray,
                   top_k: int = 0, partner_id="", partner_index: int = -1) -> bytes:
  """Serialises one distillation record; `logits` is the teacher's float vector."""
  logits = np.asarray(logits, np.float32).reshape(-1)
  feature = {
      "id": _bytes(_as_bytes(example_id)),
      "partner_id": _bytes(_as_bytes(partner_id)),
      "source_shard": _ints([source_shard]),
      "source_index": _ints([source_index]),
      "partner_index": _ints([partner_index]),
      "recipe": _bytes(recipe.encode()),
      "replica": _ints([replica]),
      "copy": _ints([copy]),
      "num_classes": _ints([logits.size]),
  }
  for name in augment.PARAM_SPEC:
    feature[f"aug/{name}"] = _param_feature(name, np.asarray(params[name]))
  if top_k:
    # Ties broken by class index, so the same logits always give the same record.
    order = np.lexsort((np.arange(logits.size), -logits))[:top_k]
    feature["topk/indices"] = _bytes(order.astype("<i4").tobytes())
    feature["topk/values"] = _bytes(logits[order].astype("<f2").tobytes())
  else:
    feature["logits"] = _bytes(logits.astype("<f2").tobytes())
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def distill_features(top_k: int = 0) -> dict:
  """The tf.io features to parse a distillation record (full logits, or top-k when top_k > 0)."""
  features = {
      "id": tf.io.FixedLenFeature([], tf.string),
      "partner_id": tf.io.FixedLenFeature([], tf.string),
      "source_shard": tf.io.FixedLenFeature([], tf.int64),
      "source_index": tf.io.FixedLenFeature([], tf.int64),
      "partner_index": tf.io.FixedLenFeature([], tf.int64),
      "recipe": tf.io.FixedLenFeature([], tf.string),
      "replica": tf.io.FixedLenFeature([], tf.int64),
      "copy": tf.io.FixedLenFeature([], tf.int64),
      "num_classes": tf.io.FixedLenFeature([], tf.int64),
  }
  for name, (shape, dtype) in augment.PARAM_SPEC.items():
    size = int(np.prod(shape)) if shape else 1
    features[f"aug/{name}"] = tf.io.FixedLenFeature(
        [size], tf.int64 if dtype == tf.int32 else tf.float32)
  if top_k:
    features["topk/indices"] = tf.io.FixedLenFeature([], tf.string)
    features["topk/values"] = tf.io.FixedLenFeature([], tf.string)
  else:
    features["logits"] = tf.io.FixedLenFeature([], tf.string)
  return features


def parse_distill(serialized: tf.Tensor, top_k: int = 0) -> dict:
  """tf.data-friendly parse: ids, positions, `params` (augment.PARAM_SPEC shapes), teacher.

  The teacher's output is `teacher_logits` (float32 [num_classes]) for full records, or
  `topk_indices` (int32 [k]) and `topk_values` (float32 [k]) for top-k records. A vector of
  records ([n]) parses in one op, every field with a leading [n] (the trainer parses a whole
  record file at once: one parse per file instead of one per record).
  """
  batched = serialized.shape.rank == 1
  if batched:
    ex = tf.io.parse_example(serialized, distill_features(top_k))
  else:
    ex = tf.io.parse_single_example(serialized, distill_features(top_k))
  lead = [-1] if batched else []
  params = {}
  for name, (shape, dtype) in augment.PARAM_SPEC.items():
    params[name] = tf.reshape(tf.cast(ex.pop(f"aug/{name}"), dtype), lead + list(shape))
  ex["params"] = params
  if top_k:
    ex["topk_indices"] = tf.io.decode_raw(ex.pop("topk/indices"), tf.int32, little_endian=True)
    ex["topk_values"] = tf.cast(
        tf.io.decode_raw(ex.pop("topk/values"), tf.float16, little_endian=True), tf.float32)
  else:
    ex["teacher_logits"] = tf.cast(
        tf.io.decode_raw(ex.pop("logits"), tf.float16, little_endian=True), tf.float32)
  return ex


def topk_to_dense(indices, values, num_classes: int) -> tf.Tensor:
  """Top-k teacher logits -> dense logits, -inf for the classes the record lacks.

  `indices` (int) and `values` (float) are [..., k], one record's (`parse_distill`'s
  `topk_indices`, `topk_values`) or a batch's; the result is float32 [..., num_classes]. A
  -inf is probability 0: the distillation loss (`mnv4_train.kd.kd_loss`) then runs over the k
  classes the record keeps, renormalised. TensorFlow ops, so it runs inside tf.data.
  """
  indices = tf.cast(indices, tf.int32)
  values = tf.cast(values, tf.float32)
  shape = tf.shape(indices)
  rows = tf.reshape(indices, [-1, shape[-1]])  # [n, k]
  n = tf.shape(rows)[0]
  positions = rows + tf.range(n)[:, None] * num_classes  # in the flat [n * num_classes]
  dense = tf.tensor_scatter_nd_update(tf.fill([n * num_classes], float("-inf")),
                                      tf.reshape(positions, [-1, 1]), tf.reshape(values, [-1]))
  dense = tf.reshape(dense, tf.concat([shape[:-1], [num_classes]], 0))
  dense.set_shape(indices.shape[:-1].concatenate([num_classes]))
  return dense
