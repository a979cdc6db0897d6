"""The trainer's input pipeline (tf.data): replayed distillation records, mixed; plain inputs.

One distillation dataset is a `data_prep.distill` output: record files `r<replica>/shard-...`,
each beside the source shard of the same name. Its stream, per host:

  (epoch, pair) from a stateless permutation of the (record file, source shard) pairs per epoch
  -> interleave: read the pair's source shard once (encoded images, labels) and parse its
     record file in one op, shuffle the pair's records, attach each record's image, mixup
     partner and label (cheap: no decoding yet)
  -> mixing of the datasets by weight, optionally a schedule of weights over training steps
     (`tf.data.Dataset.sample_from_datasets` with a dataset of weights), read ahead in one
     thread (a prefetch: the interleaves below it are sequential, see `_stream`)
  -> host sharding -> replay: decode + `augment.apply` with the recorded parameters and the
     dataset's JPEG quality (its manifest's recipe_spec), the very function the Beam job ran
     before the teacher -> batch -> prefetch.

A source-shards folder (`data_prep.ingest`) streams the same way, with augmentation parameters
drawn from a stateless key of (seed, epoch, example id) instead of read from records: the
plain supervised input (and the input of `teacher="online"` runs). `eval_dataset` is the
evaluation input: a central crop of every source image, once, in order.

Determinism: every random choice is keyed (pair permutation per epoch, record shuffle seed per
(epoch, pair), mixing seed; a pair's records are permuted whole, with no shuffle buffer), so the stream is a function of the seed. The iterator is saved in
checkpoints (`tf.train.Checkpoint(iterator=...)`), so a resumed run reads on from the same
position. Reading a source shard inside the interleave is a stateful op for tf.data; the
iterator is saved with `ExternalStatePolicy.IGNORE`, which is safe because that read is a pure
function of the file: on restore the interleave reads the shard again.

Sharding over hosts: "files" gives each host its own (record, source) pairs; "data" has every
host build the global stream and take its own part of each global batch, so N hosts see exactly
the batches one host with N replicas would (for small datasets, and to check multi-worker runs).

Damaged data. `check_files` (the trainer calls it on every dataset before it builds anything)
checks that every file a dataset reads is there and, where the manifest records sizes, has its
size. During the run every file is read whole by `_read_checked`, which fails with an
InvalidArgumentError that names the file when it holds fewer whole records than its manifest
says (missing, truncated, a record whose CRC fails: TFRecordDataset's own DataLossError does
not say which file) or more; `naming_bad_files` turns such an error into a `DataError` that
names the file, its dataset and the command that rebuilds it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import re
from typing import Optional

import tensorflow as tf

from mnv4_train.data import augment, formats, records
from mnv4_train.errors import ConfigError, DataError, InputPathError, first_line

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShardPair:
  """A source shard and, for distillation records, the record file that replays it."""
  source_shard: str                  # path of the source shard
  source_count: int                  # images in it
  record_file: Optional[str] = None  # None for a source-shards dataset (parameters are drawn)
  record_count: int = 0
  source_bytes: Optional[int] = None  # the files' sizes as the manifests record them (None:
  record_bytes: Optional[int] = None  # a manifest written before sizes were recorded)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """One training dataset as the pipeline reads it (from its manifest)."""
  name: str
  path: str
  kind: str                          # "distill" (records + sources) or "source" (source shards)
  pairs: tuple[ShardPair, ...]
  num_classes: int
  num_examples: int                  # records, or source images
  epoch_examples: int                # source images one replica covers (what an epoch means)
  resolution: int | None = None      # the resolution the teacher saw (distill)
  top_k: int = 0
  recipe: str = ""
  # The records' augmentation recipe as the Beam job built it (manifest `recipe_settings`;
  # None for older manifests without it): replay needs its RandAugment constants, JPEG quality
  # and how many RandAugment layers it ran.
  recipe_settings: augment.Recipe | None = None
  source_path: str | None = None     # the source shards folder the records replay (distill)
  what: str = ""                     # how messages name it (default: "dataset '<name>'")

  @property
  def jpeg_quality(self) -> int:
    """The JPEG round trip before the teacher (0: none; source shards and records built before
    the JPEG step have none)."""
    return self.recipe_settings.jpeg_quality if self.recipe_settings else 0

  @property
  def label(self) -> str:
    return self.what or f"dataset '{self.name}'"


def open_dataset(path: str, name: str | None = None, *, what: str | None = None) -> DatasetInfo:
  """Reads a stage output's manifest: distillation records or source shards.

  `what` is how messages name the dataset (default "dataset '<name>'"). The files themselves
  are not looked at here: `check_files` does that.
  """
  name = name or os.path.basename(path.rstrip("/"))
  what = what or f"dataset '{name}'"
  manifest = formats.read(path, what, formats.DistillRecords, formats.SourceShards)
  if isinstance(manifest, formats.DistillRecords):
    source = manifest.source_folder(path)
    if not tf.io.gfile.exists(os.path.join(source, formats.MANIFEST)):
      raise DataError(f"{what} ({path}) was built from source shards {source}, which are gone; "
                      "put them back at that path, or rebuild them with data_prep.ingest and "
                      "these records with data_prep.distill")
    source_shards = {s.path: s for s in
                     formats.SourceShards.read(source, f"the source of {what}").shards}
    pairs = []
    for f in manifest.files:
      record_file = formats.inside(path, f.path, what)
      if not f.count:
        continue
      shard = source_shards.get(os.path.basename(f.path))
      if shard is None:
        raise DataError(f"{what}: record file {record_file} replays source shard "
                        f"{os.path.basename(f.path)}, which the source shards {source} do not "
                        "list (the records were built from other shards); rebuild the records "
                        "with data_prep.distill")
      pairs.append(ShardPair(
          source_shard=formats.inside(source, shard.path, f"the source of {what}"),
          source_count=shard.count, record_file=record_file, record_count=f.count,
          source_bytes=shard.bytes, record_bytes=f.bytes))
    return DatasetInfo(name=name, path=path, kind="distill", pairs=tuple(pairs),
                       num_classes=int(manifest.num_classes),
                       num_examples=int(manifest.num_records),
                       epoch_examples=max(1, int(manifest.num_records) // int(manifest.replicas)),
                       resolution=int(manifest.resolution), top_k=int(manifest.top_k),
                       recipe=manifest.recipe,
                       recipe_settings=augment.Recipe.from_settings(
                           {"name": manifest.recipe, **manifest.recipe_settings})
                       if manifest.recipe_settings else None,
                       source_path=source, what=what if what != f"dataset '{name}'" else "")
  pairs = tuple(ShardPair(source_shard=formats.inside(path, s.path, what), source_count=s.count,
                          source_bytes=s.bytes)
                for s in manifest.shards if s.count)
  return DatasetInfo(name=name, path=path, kind="source", pairs=pairs,
                     num_classes=int(manifest.num_classes),
                     num_examples=int(manifest.num_examples),
                     epoch_examples=int(manifest.num_examples),
                     what=what if what != f"dataset '{name}'" else "")


# ---- damaged data: checked before the run, named when a read fails during it -----------------

def _files_of(info: DatasetInfo):
  """(path, "record file" | "source shard", manifest count, manifest bytes) of every file the
  dataset reads, each once."""
  seen = {}
  for p in info.pairs:
    if p.record_file:
      seen.setdefault(p.record_file, ("record file", p.record_count, p.record_bytes))
    seen.setdefault(p.source_shard, ("source shard", p.source_count, p.source_bytes))
  return [(path, *rest) for path, rest in seen.items()]


def _rebuild(info: DatasetInfo, kind: str) -> str:
  """The command(s) that rebuild a dataset's file of `kind`."""
  if kind == "record file":
    return f"rebuild {info.label} ({info.path}) with data_prep.distill"
  if info.kind == "distill":
    return (f"rebuild its source shards ({info.source_path}) with data_prep.ingest, then "
            f"{info.label} from them with data_prep.distill")
  return f"rebuild {info.label} ({info.path}) with data_prep.ingest"


def _bad_file(info: DatasetInfo, path: str, kind: str, problem: str) -> DataError:
  return DataError(f"{info.label}: {kind} {path} {problem}; {_rebuild(info, kind)}")


def _size(path: str) -> int | None:
  try:
    return tf.io.gfile.stat(path).length
  except tf.errors.NotFoundError:
    return None


def check_files(info: DatasetInfo, *, threads: int = 32) -> None:
  """Every file `info` reads exists and, where its manifest records one, has that size.

  One stat per file (in `threads` threads: a bucket answers each in tens of ms).

  Raises:
    DataError: the first missing or mis-sized file, with its dataset and the rebuild command.
  """
  files = _files_of(info)
  if len(files) > 8:
    with concurrent.futures.ThreadPoolExecutor(min(threads, len(files))) as pool:
      sizes = list(pool.map(_size, [f[0] for f in files]))
  else:
    sizes = [_size(f[0]) for f in files]
  for (path, kind, _, want), got in zip(files, sizes):
    if got is None:
      raise _bad_file(info, path, kind, "is missing")
    if want is not None and got != want:
      raise _bad_file(info, path, kind, f"is {got} bytes but its manifest says {want} "
                      "(truncated or overwritten)")


def diagnose(path: str, count: int, size: int | None = None) -> str | None:
  """What is wrong with one TFRecord file that should hold `count` records (of `size` bytes,
  when known), found by reading it whole; None when nothing is."""
  got = _size(path)
  if got is None:
    return "is missing"
  if size is not None and got != size:
    return f"is {got} bytes but its manifest says {size} (truncated or overwritten)"
  n = 0
  try:
    for _ in tf.data.TFRecordDataset(path):
      n += 1
  except tf.errors.OpError as e:
    if "truncated" not in e.message:
      return f"is corrupt after {n} of its {count} records ({_reason(e)})"
  if n < count:  # TFRecordDataset ends a file cut inside a record's header without an error
    return f"is truncated: it holds {n} whole records, its manifest lists {count}"
  if n > count:
    return (f"holds {n} records, more than the {count} its manifest lists (not the file the "
            "manifest lists)")
  return None


def _reason(error) -> str:
  """A TensorFlow error's message without its function-node and op decorations."""
  text = first_line(getattr(error, "message", error))
  text = re.sub(r"\{\{[^}]*\}\}", "", text)
  text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text)
  return text.strip() or type(error).__name__


def bad_file_error(infos, error: tf.errors.OpError) -> DataError | None:
  """The DataError for a read error that names one of the datasets' files (the checked reads'
  assertion, or TensorFlow's own NotFoundError), else None."""
  message = str(getattr(error, "message", error))
  named = [(len(path), i, info, path, kind, count, size)
           for i, info in enumerate(infos) if info is not None
           for path, kind, count, size in _files_of(info) if path in message]
  if not named:
    return None
  # The longest path named (one file's path may begin another's); the first dataset reading it.
  _, _, info, path, kind, count, size = max(named, key=lambda n: (n[0], -n[1]))
  problem = diagnose(path, count, size) or f"could not be read ({_reason(error)})"
  return _bad_file(info, path, kind, problem)


@contextlib.contextmanager
def naming_bad_files(infos):
  """Turns a TensorFlow error raised inside the block that names one of the datasets' files
  into that file's DataError (one line: the file, its dataset, the rebuild command)."""
  try:
    yield
  except tf.errors.OpError as e:
    error = bad_file_error(infos, e)
    if error is None:
      raise
    raise error from None


# ---- per-dataset streams of light elements (encoded images, parameters, teacher) --------------

CHECKED_READ = "mnv4-checked-read"  # in the assertion's message, before the file's path


def _glob_literal(path):
  """`path` as a pattern that matches only itself (tf.io.matching_files takes globs)."""
  return tf.strings.regex_replace(path, r"([*?\[\]\\])", r"\\\1")


def _read_checked(path, count):
  """A TFRecord file's records, all of them, as one [count] string tensor, or an
  InvalidArgumentError naming the file when it holds fewer whole records (missing, truncated,
  a record failing its CRC) or more than `count` (its manifest's count).

  TFRecordDataset's own errors do not name the file, so they are skipped (`ignore_errors`
  ends the file at its first bad record) and the count tells. A file that cannot be opened
  would be retried forever by `ignore_errors`: the file is looked up first.
  """
  count = tf.cast(count, tf.int64)
  exists = tf.size(tf.io.matching_files(_glob_literal(path))) > 0

  def read():
    return (tf.data.TFRecordDataset(path).ignore_errors()
            .batch(count + 1)
            .concatenate(tf.data.Dataset.from_tensors(tf.zeros([0], tf.string)))
            .take(1).get_single_element())
  got = tf.cond(exists, read, lambda: tf.zeros([0], tf.string))
  n = tf.size(got, out_type=tf.int64)
  check = tf.debugging.Assert(tf.equal(n, count), [CHECKED_READ, path, "whole records:", n,
                                                   "manifest:", count])
  with tf.control_dependencies([check]):
    return tf.identity(got)


def _read_whole(path, count):
  """A file's `count` records as one batch (count from the manifest, so nothing over-allocates);
  checked (`_read_checked`)."""
  return _read_checked(path, count)


def _source_table(shard_path, count):
  """One source shard, read whole (checked): encoded images, labels, ids, heights, widths by
  position."""
  ex = tf.io.parse_example(_read_checked(shard_path, count), records.SOURCE_FEATURES)
  return {"encoded": ex["image/encoded"], "label": tf.cast(ex["image/label"], tf.int32),
          "id": ex["image/id"], "height": tf.cast(ex["image/height"], tf.int32),
          "width": tf.cast(ex["image/width"], tf.int32)}


def _checked_records(pairs):
  """The source shards of `pairs`, one after another, record by record (checked)."""
  files = tf.constant([p.source_shard for p in pairs])
  counts = tf.constant([p.source_count for p in pairs], tf.int64)
  return tf.data.Dataset.from_tensor_slices((files, counts)).flat_map(
      lambda f, c: tf.data.Dataset.from_tensor_slices(_read_checked(f, c)))


def _permuted(count, seed, shuffle: bool):
  """Positions 0..count-1, in a stateless random order of `seed` when shuffling."""
  positions = tf.data.Dataset.range(count)
  if not shuffle:
    return positions
  return positions.map(lambda j: tf.random.experimental.index_shuffle(j, seed, count - 1))


def _dense_teacher(ex, num_classes):
  """Full logits as stored, or top-k logits scattered into -inf (`records.topk_to_dense`)."""
  if "teacher_logits" in ex:
    return ex["teacher_logits"]
  return records.topk_to_dense(ex["topk_indices"], ex["topk_values"], num_classes)


def _pair_seed(seed, dataset_index, epoch, pair):
  """The [2] stateless seed of one (dataset, epoch, pair)."""
  return tf.stack([tf.cast(seed * 1_000_003 + dataset_index, tf.int64),
                   tf.cast(epoch, tf.int64) * 1_000_003 + tf.cast(pair, tf.int64)])


@dataclasses.dataclass(frozen=True)
class StreamOptions:
  """How the per-dataset streams are read."""
  seed: int = 0
  shuffle: bool = True              # a fresh random order of each pair's records every epoch
  cycle_length: int = 16            # pairs read at once (interleaved one element each)
  supervised_recipe: augment.Recipe = augment.Recipe("supervised", ra_layers=2, ra_magnitude=9.0)
  memory_cache: bool | str = False  # small datasets held as pixels, batches gathered; "auto":
                                    # when they fit (`memory_cache_problem`), else streamed


def _recipe(dataset: DatasetInfo, opts: StreamOptions) -> augment.Recipe | None:
  """The augmentation recipe of a dataset's elements: the recorded one of distillation records
  (None for records whose manifest predates recipe_settings), the supervised one of sources."""
  return dataset.recipe_settings if dataset.kind == "distill" else opts.supervised_recipe


def _stream(dataset: DatasetInfo, index: int, num_classes: int, opts: StreamOptions, pairs,
            resolution: int):
  """Infinite stream of one dataset's light elements, epoch after epoch."""
  count = len(pairs)
  recipe = _recipe(dataset, opts) or augment.Recipe(dataset.recipe or "records")
  constants = tf.constant(recipe.ra_constants(resolution), tf.float32)
  # Source-shard datasets have no record files: "" fills the tensor, and source_pair ignores it.
  rec_files = tf.constant([p.record_file or "" for p in pairs])
  rec_counts = tf.constant([p.record_count for p in pairs], tf.int64)
  src_files = tf.constant([p.source_shard for p in pairs])
  src_counts = tf.constant([p.source_count for p in pairs], tf.int64)

  def pick(i):
    epoch = i // count
    k = i % count
    if opts.shuffle:
      perm_seed = tf.stack([tf.constant(opts.seed * 1_000_003 + index, tf.int64), epoch])
      k = tf.random.experimental.index_shuffle(k, perm_seed, count - 1)
    return epoch, k, rec_files[k], rec_counts[k], src_files[k], src_counts[k]

  def distill_pair(epoch, k, rec_file, rec_count, src_file, src_count):
    table = _source_table(src_file, src_count)
    recs = records.parse_distill(_read_whole(rec_file, rec_count), dataset.top_k)

    def attach(j):
      ex = tf.nest.map_structure(lambda field: field[j], recs)
      at = ex["source_index"]
      partner = tf.where(ex["partner_index"] >= 0, ex["partner_index"], at)
      return {"image": table["encoded"][at], "partner": table["encoded"][partner],
              "params": ex["params"], "label": table["label"][at],
              "teacher": _dense_teacher(ex, num_classes),
              "dataset": tf.constant(index, tf.int32), "ra_constants": constants}
    return _permuted(rec_count, _pair_seed(opts.seed, index, epoch, k), opts.shuffle).map(attach)

  def source_pair(epoch, k, rec_file, rec_count, src_file, src_count):
    del rec_file, rec_count
    table = _source_table(src_file, src_count)

    def draw(j):
      key = tf.random.experimental.stateless_fold_in(
          _pair_seed(opts.seed, index, epoch, 0)[:2],
          tf.strings.to_hash_bucket_fast(table["id"][j], 1 << 62))
      shape = tf.stack([table["height"][j], table["width"][j], 3])
      return {"image": table["encoded"][j], "partner": table["encoded"][j],
              "params": augment.sample(recipe, key, shape), "label": table["label"][j],
              "teacher": tf.zeros([num_classes], tf.float32),
              "dataset": tf.constant(index, tf.int32), "ra_constants": constants}
    return _permuted(src_count, _pair_seed(opts.seed, index, epoch, k), opts.shuffle).map(draw)

  make_pair = distill_pair if dataset.kind == "distill" else source_pair
  # A sequential interleave: `train_dataset` reads it ahead in one thread (a prefetch above the
  # mixing). tf.data's parallel interleave crashed the process (SIGSEGV in
  # ParallelInterleaveIterator::WriteFutureElements) when `sample_from_datasets` saved it as a
  # symbolic checkpoint while its workers ran, about one run in four of a two-dataset mixture
  # here; it also cost ~0.4 CPU ms per element in thread hand-offs (issue 12).
  return (tf.data.Dataset.counter()
          .map(pick)
          .interleave(make_pair, cycle_length=min(opts.cycle_length, count), block_length=1))


# ---- the in-memory cache of small datasets (`memory_cache`) --------------------------------------

MEMORY_CACHE_LIMIT_BYTES = 4 << 30  # decoded pixels at the training resolution


def _fractional(dataset: DatasetInfo) -> bool:
  """Records whose replayed pixels are not whole grey levels: mixup without the JPEG step."""
  return (dataset.kind != "source" and dataset.recipe_settings is not None
          and bool(dataset.recipe_settings.mixup) and not dataset.jpeg_quality)


def memory_cache_problem(datasets, recipe: augment.Recipe, resolution: int) -> str | None:
  """Why `memory_cache` cannot serve this input (None: it can). It serves datasets small enough
  to hold as pixels at the training resolution: source shards whose recipe is the whole image
  with at most a flip (what a fixed array serves), and distillation records of any recipe. The
  pixels are held as uint8 grey levels, or as the replay's float32 values when a dataset's are
  fractional (mixup without the JPEG step): 4 bytes a channel instead of 1."""
  for dataset in datasets:
    if dataset.kind == "source":
      if recipe.crop_area[0] < 1.0 or recipe.ra_layers or recipe.mixup or recipe.jpeg_quality:
        return ("it serves source images whole with at most a flip (crop_area_min=1.0, "
                "augment_layers=0), as the digits and Fashion-MNIST student recipes train")
    elif dataset.recipe_settings is None:
      return (f"the records of '{dataset.name}' do not record their recipe (built before "
              "manifests held recipe_settings); rebuild them with data_prep.distill")
  channel_bytes = 4 if any(_fractional(d) for d in datasets) else 1
  size = sum(d.num_examples for d in datasets) * resolution * resolution * 3 * channel_bytes
  if size > MEMORY_CACHE_LIMIT_BYTES:
    return (f"the decoded images would take {size / 2**30:.1f} GiB, over its "
            f"{MEMORY_CACHE_LIMIT_BYTES / 2**30:.0f} GiB limit")
  return None


def decode_all(dataset: DatasetInfo, resolution: int):
  """Every image of a source-shards dataset, whole and resized as the streaming input gives it
  (`augment.apply` with the full-image crop, no flip), uint8 [n, res, res, 3], with its labels
  int32 [n], in file order."""
  def whole(serialized):
    ex = records.parse_source(serialized)
    image = augment.decode(ex["image/encoded"])
    shape = tf.shape(image)
    crop = tf.stack([0, 0, shape[0], shape[1]])
    return (augment.crop_resize_flip(image, crop, tf.constant(0), resolution),
            tf.cast(ex["image/label"], tf.int32))
  images, labels = (_checked_records(dataset.pairs)
                    .map(whole, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                    .batch(dataset.num_examples).get_single_element())
  return images, labels


def replay_all(dataset: DatasetInfo, num_classes: int, opts: StreamOptions, resolution: int):
  """Every record of a distillation dataset replayed once, in file order: pixels
  [n, res, res, 3], labels int32 [n] and teacher logits float32 [n, classes] (top-k: -inf
  elsewhere). The pixels are uint8 grey levels v (the replayed [-1, 1] pixels are v / 127.5 - 1),
  or the replayed float32 pixels themselves where they are fractional (`_fractional`)."""
  once = dataclasses.replace(opts, shuffle=False, cycle_length=1)  # pair after pair, in order
  static = replay_static([dataset], once)
  fractional = _fractional(dataset)

  def levels(element):
    out = replay(element, resolution, (dataset.jpeg_quality,), **static)
    pixels = out["image"] if fractional else tf.cast(tf.round((out["image"] + 1.0) * 127.5),
                                                     tf.uint8)
    return pixels, out["label"], out["teacher"]
  return (_stream(dataset, 0, num_classes, once, dataset.pairs, resolution)
          .take(dataset.num_examples)
          .map(levels, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .batch(dataset.num_examples).get_single_element())


def _cached_stream(datasets, num_classes: int, opts: StreamOptions, resolution: int,
                   host_batch: int, num_hosts: int, host: int, boundaries, table):
  """Batches of datasets held in memory as pixels (`decode_all` of source shards, `replay_all`
  of records: uint8 grey levels, or all of them as float32 [-1, 1] when one dataset's replayed
  pixels are fractional), mixed by the weight table, all of it batch-level work (a draw, a
  gather, a where, a scale: the cost of `fit` on arrays).

  Step s draws the dataset of each of the B = host_batch * num_hosts positions of the global
  batch from the weights of step s (keyed by (seed, step)); the k-th draw of a dataset takes
  position k of its endless sequence of epochs, each epoch a stateless permutation of its
  examples keyed by (seed, epoch, dataset); the running draw counts are the `scan` state, so
  a restored iterator goes on where it was. Source recipes with a flip draw one keyed flip per
  position. Every host computes the global batch's draws and gathers its own part.
  """
  images, labels, teachers, flippable = [], [], [], []
  for d in datasets:
    if d.kind == "source":
      x, y = decode_all(d, resolution)
      t = tf.zeros([d.num_examples, num_classes], tf.float32)
      flippable.append(opts.supervised_recipe.flip)
    else:
      x, y, t = replay_all(d, num_classes, opts, resolution)
      flippable.append(False)  # the records' own flips are in the replayed pixels
    images.append(x)
    labels.append(y)
    teachers.append(t)
  as_float = any(x.dtype == tf.float32 for x in images)
  if as_float:  # what the end of `make` does to grey levels, done once
    images = [x if x.dtype == tf.float32 else tf.cast(x, tf.float32) / 127.5 - 1.0
              for x in images]
  images, labels, teachers = (tf.concat(images, 0), tf.concat(labels, 0),
                              tf.concat(teachers, 0))
  sizes = [d.num_examples for d in datasets]
  counts = tf.constant(sizes, tf.int64)
  offsets = tf.constant([sum(sizes[:i]) for i in range(len(sizes))], tf.int64)
  any_flips, flippable = any(flippable), tf.constant(flippable)
  bounds = tf.constant(boundaries, tf.int64)
  log_weights = tf.math.log(tf.constant(table, tf.float32))
  mixed, size, mine = len(datasets) > 1, host_batch * num_hosts, slice(
      host * host_batch, (host + 1) * host_batch)

  def make(drawn, step):
    if mixed:
      row = tf.searchsorted(bounds, step[None], side="right")[0] - 1
      key = tf.stack([tf.constant(opts.seed, tf.int64) * 1_000_003 + 29, step])
      choice = tf.random.stateless_categorical(log_weights[row][None], size, key)[0]
    else:
      choice = tf.zeros([size], tf.int64)
    one_hot = tf.one_hot(choice, len(sizes), dtype=tf.int64)
    k = (tf.gather(drawn, choice)
         + tf.reduce_sum(tf.cumsum(one_hot, axis=0, exclusive=True) * one_hot, axis=1))
    n = tf.gather(counts, choice)
    epoch, j = k // n, k % n
    if opts.shuffle:
      seeds = tf.stack([tf.fill([size], tf.constant(opts.seed, tf.int64)), epoch,
                        1_000_003 + choice], axis=1)
      j = tf.raw_ops.RandomIndexShuffle(index=j, seed=seeds, max_index=n - 1, rounds=4)
    index = (tf.gather(offsets, choice) + j)[mine]
    x = tf.gather(images, index)
    if any_flips:
      flips = tf.random.stateless_uniform(
          [size], tf.stack([tf.constant(opts.seed, tf.int64) * 1_000_003 + 17, step])) < 0.5
      flips = tf.logical_and(flips, tf.gather(flippable, choice))[mine]
      x = tf.where(flips[:, None, None, None], tf.reverse(x, axis=[2]), x)
    return drawn + tf.reduce_sum(one_hot, axis=0), {
        "image": x if as_float else tf.cast(x, tf.float32) / 127.5 - 1.0,
        "label": tf.gather(labels, index),
        "teacher": tf.gather(teachers, index), "dataset": tf.cast(choice[mine], tf.int32)}
  return tf.data.Dataset.counter().scan(tf.zeros([len(sizes)], tf.int64), make)


# ---- mixing ---------------------------------------------------------------------------------

def normalise_schedule(names, weights=None, schedule=None):
  """-> (boundaries [n], weight table [n, datasets]): weights from step boundaries[i] on.

  `weights` maps dataset name -> weight; `schedule` is [(start_step, {name: weight}), ...]
  beginning at step 0. Missing names weigh 0. Weights need not sum to one.
  """
  if schedule is None:
    schedule = [(0, weights if weights is not None else {n: 1.0 for n in names})]
  elif weights is not None:
    raise ConfigError("set either the mixture weights or a weight schedule, not both")
  schedule = sorted(((int(s), dict(w)) for s, w in schedule), key=lambda x: x[0])
  if schedule[0][0] != 0:
    raise ConfigError(f"the weight schedule must start at step 0, not {schedule[0][0]}")
  table = []
  for start, w in schedule:
    unknown = sorted(set(w) - set(names))
    if unknown:
      raise ConfigError(f"mixture weights name {unknown}, which are not training datasets "
                        f"{sorted(names)}; use one of those names")
    row = [float(w.get(n, 0.0)) for n in names]
    if min(row) < 0 or sum(row) <= 0:
      raise ConfigError(f"mixture weights at step {start} must be >= 0 with a positive sum, "
                        f"got {w}")
    table.append([r / sum(row) for r in row])
  return [s for s, _ in schedule], table


def mix(streams, boundaries, table, examples_per_step: int, seed: int):
  """Draws each element from one stream, with the weights of the element's training step."""
  if len(streams) == 1:
    return streams[0]
  if len(table) == 1:
    return tf.data.Dataset.sample_from_datasets(streams, weights=table[0], seed=seed,
                                                stop_on_empty_dataset=True)
  bounds = tf.constant(boundaries, tf.int64)
  rows = tf.constant(table, tf.float32)

  def weights_at(i):
    step = i // examples_per_step
    return rows[tf.searchsorted(bounds, step[None], side="right")[0] - 1]
  weights = tf.data.Dataset.counter().map(weights_at)
  return tf.data.Dataset.sample_from_datasets(streams, weights=weights, seed=seed,
                                              stop_on_empty_dataset=True)


# ---- replay and the whole pipeline -----------------------------------------------------------

def replay(element, resolution: int, jpeg_qualities=(0,), ra_layers=augment.MAX_RA_LAYERS,
           mixup=True):
  """Light element -> the pixels the teacher saw (float32 [-1, 1]), label, teacher, dataset.

  `jpeg_qualities` holds each dataset's JPEG quality, by dataset index. `ra_layers` and `mixup`
  (static) are the most RandAugment layers and whether any mixup, over the mixed datasets'
  recipes: what they leave out is the identity in every element, so skipping it changes no
  pixel (`replay_static`).
  """
  params = element["params"]
  image = augment.decode(element["image"])
  partner = None
  if mixup:
    partner = tf.cond(params["mix_ratio"] < 1.0, lambda: augment.decode(element["partner"]),
                      lambda: tf.zeros([1, 1, 3], tf.uint8))
  if len(set(jpeg_qualities)) == 1:
    quality = jpeg_qualities[0]
  else:  # datasets built with different qualities: each element takes its dataset's
    quality = tf.gather(tf.constant(jpeg_qualities, tf.int32), element["dataset"])
  pixels = augment.apply(image, params, resolution, partner, constants=element["ra_constants"],
                         jpeg_quality=quality, jpeg_choices=jpeg_qualities, ra_layers=ra_layers)
  return {"image": pixels, "label": element["label"], "teacher": element["teacher"],
          "dataset": element["dataset"]}


def replay_static(datasets, opts: StreamOptions) -> dict:
  """`replay`'s static `ra_layers` and `mixup` for a mixture: the most over its recipes, and
  everything (MAX_RA_LAYERS, mixup) when a dataset's recipe is not recorded."""
  recipes = [_recipe(d, opts) for d in datasets]
  if any(r is None for r in recipes):
    return {"ra_layers": augment.MAX_RA_LAYERS, "mixup": True}
  return {"ra_layers": max(r.ra_layers for r in recipes),
          "mixup": any(r.mixup for r in recipes)}


def _options(deterministic: bool):
  options = tf.data.Options()
  options.deterministic = deterministic
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  options.experimental_symbolic_checkpoint = True
  return options


def mix_batch(batch, batch_mix):
  """A batch through the Model Garden's `MixupAndCutmix`: images mixed (or cut and pasted)
  with the reversed batch, and `targets`, the soft labels ([batch, classes], smoothed by the
  mixer's `label_smoothing` and mixed with the images' ratios; the batch's labels stay for the
  top-1 statistics)."""
  images, targets = batch_mix(batch["image"], batch["label"])
  return {**batch, "image": images, "targets": targets}


def train_dataset(datasets, *, resolution: int, host_batch: int, num_classes: int,
                  weights=None, schedule=None, num_hosts: int = 1, host: int = 0,
                  shard_policy: str = "auto", deterministic: bool = True,
                  options: StreamOptions = StreamOptions(), batch_mix=None):
  """The training input of one host: batches of {image, label, teacher, dataset}.

  `batch_mix`, an `official.vision.ops.augment.MixupAndCutmix`, mixes each batch and adds
  its soft labels as `targets` (label-only training: it would break the pixels a teacher's
  stored logits belong to). It draws from TensorFlow's stateful RNG, as the Model Garden does:
  a seeded run repeats, but a resumed one draws other mixes from there on.
  """
  names = [d.name for d in datasets]
  boundaries, table = normalise_schedule(names, weights, schedule)
  for d in datasets:
    if d.num_classes != num_classes:
      what = "teacher logits over" if d.kind == "distill" else "labels of"
      raise ConfigError(f"dataset '{d.name}' ({d.path}) has {what} {d.num_classes} "
                        f"classes but the model has {num_classes}; train on data with the "
                        "model's classes")
    if not d.pairs:
      raise InputPathError(f"dataset '{d.name}' ({d.path}) holds no examples")
  if shard_policy == "auto":
    shard_policy = "files" if all(len(d.pairs) >= num_hosts for d in datasets) else "data"
  if shard_policy not in ("files", "data"):
    raise ConfigError(f"shard_policy must be 'auto', 'files' or 'data', not {shard_policy!r}")
  if shard_policy == "files" and any(len(d.pairs) < num_hosts for d in datasets):
    raise ConfigError(f"shard_policy 'files' needs at least {num_hosts} files per dataset (one "
                      "per host); use shard_policy='data'")
  cache = options.memory_cache
  if cache not in (True, False, "auto"):
    raise ConfigError(f"data.memory_cache must be True, False or 'auto', not {cache!r}")
  if cache:
    problem = memory_cache_problem(datasets, options.supervised_recipe, resolution)
    if problem and cache == "auto":
      log.info("the input is streamed, not held in memory (data.memory_cache='auto'): %s",
               problem)
      cache = False
    elif problem:
      raise ConfigError(f"data.memory_cache cannot hold this input: {problem}; set "
                        "data.memory_cache='auto' (held when it fits) or False")
  if cache:
    ds = _cached_stream(datasets, num_classes, options, resolution, host_batch, num_hosts,
                        host, boundaries, table)
  else:
    ds = _streamed(datasets, resolution, host_batch, num_classes, boundaries, table, num_hosts,
                   host, shard_policy, options)
  if batch_mix is not None:
    ds = ds.map(lambda b: mix_batch(b, batch_mix))  # sequential: the RNG draws stay in order
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options(deterministic))


def _streamed(datasets, resolution, host_batch, num_classes, boundaries, table, num_hosts,
              host, shard_policy, options):
  """`train_dataset`'s streaming input: per-dataset streams, mixed, replayed, batched."""
  per_host = shard_policy == "files" and num_hosts > 1
  streams = [_stream(d, i, num_classes, options,
                     d.pairs[host::num_hosts] if per_host else d.pairs, resolution)
             for i, d in enumerate(datasets)]
  step_examples = host_batch if per_host else host_batch * num_hosts
  ds = mix(streams, boundaries, table, step_examples, options.seed).prefetch(tf.data.AUTOTUNE)
  if shard_policy == "data" and num_hosts > 1:
    ds = ds.batch(host_batch, drop_remainder=True).shard(num_hosts, host).unbatch()
  qualities = tuple(d.jpeg_quality for d in datasets)
  static = replay_static(datasets, options)
  return (ds.map(lambda e: replay(e, resolution, qualities, **static),
                 num_parallel_calls=tf.data.AUTOTUNE)
          .batch(host_batch, drop_remainder=True))


def eval_dataset(path: str, *, resolution: int, batch_size: int, crop_fraction: float = 0.875,
                 what: str = "the eval data"):
  """Held-out source shards -> batches of {image (central crop), label}, every image once.

  Its files are checked as `check_files` does, and read checked (`naming_bad_files` with the
  returned info names a damaged one)."""
  info = open_dataset(path, "eval", what=what)
  if info.kind != "source":
    raise ConfigError(f"eval data {path} must be source shards (data_prep.ingest output)")
  check_files(info)

  def prepare(serialized):
    ex = records.parse_source(serialized)
    image = augment.center_crop(augment.decode(ex["image/encoded"]), resolution, crop_fraction)
    return {"image": image, "label": tf.cast(ex["image/label"], tf.int32)}
  ds = (_checked_records(info.pairs)
        .map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE))
  return ds, info
