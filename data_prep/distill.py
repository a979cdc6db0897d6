"""Distillation datasets: augmentation parameters + teacher logits per (example, replica) (step 3).

    python -m data_prep.distill --recipe=d1 --source=SOURCE_SHARDS --teacher=teacher.keras \\
        --out=DIR [--replicas=N] [--replica_offset=K] [--top_k=0] [--selection=D3_SELECTION] \\
        [--jpeg_quality=95] \\
        [standard Beam options: --runner=DataflowRunner ... | --direct_num_workers=2
         --direct_running_mode=multi_processing]

Recipes (`mnv4_train.data.augment.RECIPES`): d1 inception crop + RandAugment l2m9, d2 inception
crop + extreme mixup with a partner from the same source shard, d3 inception crop + RandAugment
l2m5 over the class-balanced selection of `data_prep.select_d3` (its replicated images get one
record per copy). For every (example, replica, copy) the parameters are drawn from a stateless
seed of (recipe, replica, id, copy), applied by `augment.apply` (the function the trainer
replays), which ends with the recipe's JPEG encode + decode (quality `augment.JPEG_QUALITY`, 95,
unless --jpeg_quality says otherwise; 0 skips it; the manifest's recipe_spec records it), and
the teacher runs through Beam `RunInference`.

Work is split into tasks of (source shard, block of replicas): a task reads its shard once and
emits fixed batches in a fixed order, so the records of a run are byte-identical to the last.
Output: `r<replica>/shard-XXXXX-of-YYYYY.tfrecord` beside each source shard's name, records
sorted by (source_index, copy); format in `mnv4_train/data/records.py`; `manifest.json` as
`mnv4_train/data/formats.py` has it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import threading

if __name__ == "__main__":  # the command line: TensorFlow's C++ start-up lines are noise
  from mnv4_train.cli import quiet_tensorflow  # first: the imports below load TensorFlow
  quiet_tensorflow()  # (not with --verbose)

import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from apache_beam.ml.inference.base import RunInference  # noqa: E402

from data_prep import console, files, transforms  # noqa: E402
from mnv4_train.data import augment, formats, records  # noqa: E402
from mnv4_train.errors import ArgumentParser, ConfigError, run_then_exit  # noqa: E402


def parse_args(argv):
  parser = ArgumentParser(prog="data_prep.distill", description=__doc__.split("\n")[0])
  parser.add_argument("--recipe", required=True, choices=sorted(augment.RECIPES))
  parser.add_argument("--source", required=True, help="source shards folder (data_prep.ingest)")
  parser.add_argument("--teacher", required=True, help="teacher: .keras file or SavedModel dir")
  parser.add_argument("--out", required=True, help="output folder (local or gs://)")
  parser.add_argument("--selection", default=None, help="D3 selection folder (recipe d3)")
  parser.add_argument("--replicas", type=int, default=None,
                      help="replicas to build (default: the paper's count for the recipe)")
  parser.add_argument("--replica_offset", type=int, default=0,
                      help="first replica index, to build a recipe's replicas in several jobs")
  parser.add_argument("--resolution", type=int, default=None,
                      help="teacher input size (default: the teacher's fixed size, else 224)")
  parser.add_argument("--teacher_input", default="minus_one_to_one",
                      choices=sorted(transforms.INPUT_SCALES),
                      help="pixel range the teacher expects")
  parser.add_argument("--teacher_outputs", default="logits", choices=["logits", "probabilities"],
                      help="probabilities are stored as log-probabilities")
  parser.add_argument("--top_k", type=int, default=0,
                      help="store the top-k logits (indices + float16 values); 0 = all")
  parser.add_argument("--batch_size", type=int, default=32, help="teacher batch size")
  parser.add_argument("--replicas_per_task", type=int, default=4,
                      help="replicas one worker builds per read of a source shard")
  parser.add_argument("--crop_area_min", type=float, default=None,
                      help="smallest inception-crop area (default: the recipe's 0.08)")
  parser.add_argument("--ra_magnitude", type=float, default=None,
                      help="RandAugment magnitude (default: the recipe's)")
  parser.add_argument("--jpeg_quality", type=int, default=None,
                      help="JPEG round trip of each augmented image before the teacher, 1-100; "
                           "0 = none (default: the recipe's, "
                           f"{augment.JPEG_QUALITY})")
  parser.add_argument("--no_flip", action="store_true",
                      help="no horizontal flips (e.g. for glyphs such as digits)")
  parser.add_argument("--teacher_clean_top1", type=float, default=None,
                      help="the teacher's top-1 on clean held-out images, to compare with its "
                      "top-1 on the views it labels (default: the metrics.json of the run that "
                      "exported the teacher, when there is one)")
  parser.add_argument("--overwrite", action="store_true", help="replace a finished output")
  parser.add_argument("--verbose", action="store_true", help=console.VERBOSE_HELP)
  args, beam_args = parser.parse_known_args(argv)
  recipe = augment.RECIPES[args.recipe]
  if args.crop_area_min is not None and not 0.0 < args.crop_area_min <= 1.0:
    parser.error(f"--crop_area_min must be in (0, 1], got {args.crop_area_min}")
  if args.replicas is None:
    args.replicas = recipe.replicas
  for flag in ("replicas", "batch_size", "replicas_per_task"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
  if args.jpeg_quality is not None and not 0 <= args.jpeg_quality <= 100:
    parser.error(f"--jpeg_quality must be in [0, 100] (0: no JPEG step), got {args.jpeg_quality}")
  if args.teacher_clean_top1 is not None and not 0.0 <= args.teacher_clean_top1 <= 1.0:
    parser.error(f"--teacher_clean_top1 is a fraction in [0, 1], got {args.teacher_clean_top1}")
  if args.replica_offset < 0 or args.top_k < 0:
    parser.error("--replica_offset and --top_k must be >= 0")
  if args.resolution is not None and args.resolution < 16:
    parser.error(f"--resolution must be >= 16, got {args.resolution}")
  if args.recipe == "d3" and not args.selection:
    parser.error("recipe d3 needs --selection (the output of data_prep.select_d3)")
  if args.recipe != "d3" and args.selection:
    parser.error(f"--selection is for recipe d3 only, not {args.recipe}")
  return args, beam_args


def recipe_from_args(args) -> augment.Recipe:
  """The recipe of --recipe with the overrides given on the command line."""
  recipe = augment.RECIPES[args.recipe]
  changes = {}
  if args.crop_area_min is not None:
    changes["crop_area"] = (args.crop_area_min, recipe.crop_area[1])
  if args.ra_magnitude is not None:
    changes["ra_magnitude"] = args.ra_magnitude
  if args.no_flip:
    changes["flip"] = False
  if args.jpeg_quality is not None:
    changes["jpeg_quality"] = args.jpeg_quality
  return dataclasses.replace(recipe, **changes)


# ---- tasks ------------------------------------------------------------------------------------

def make_tasks(shards, replica_offset, replicas, per_task):
  """(shard index, shard path, first replica, replica count) work units."""
  tasks = []
  for index, path in enumerate(shards):
    for start in range(replica_offset, replica_offset + replicas, per_task):
      tasks.append((index, path, start, min(per_task, replica_offset + replicas - start)))
  return tasks


class AugmentStream:
  """One tf.data map of the augmentation that lives as long as its worker, fed task by task.

  The job's pixels must be the trainer's replay pixels bit for bit, so the augmentation runs
  where the replay runs it, inside a tf.data map (see `AugmentTask`). Making a tf.data iterator
  is expensive: instantiating a map function with 17 RandAugment branches per layer costs about
  1 s of CPU per iterator, so an iterator per (task, replica) of a few hundred images spent most
  of the job's time there (issue 12: 95 ms of CPU per image against 2.6 ms in one stream).
  Here one iterator is made on first use and reused: its input is a `tf.queue.FIFOQueue` that
  each call fills with its elements, and the call takes exactly as many outputs back, in order
  (a sequential dequeue, `deterministic=True`). Between calls the iterator's read-ahead waits on
  the queue inside TensorFlow's own threads (no Python generator, no GIL); `close` closes the
  queue, which ends the stream.
  """

  _DTYPES = (tf.int64, tf.string, tf.string)
  _SHAPES = ([2], [], [])

  def __init__(self, map_fn):
    self._map_fn = map_fn
    self._queue = None
    self._iterator = None
    self._pending = 0  # outputs queued but not taken (a caller that stopped early)

  def _start(self):
    self._queue = tf.queue.FIFOQueue(capacity=2**31 - 1, dtypes=self._DTYPES,
                                     shapes=self._SHAPES)
    queue = self._queue

    def dequeue(_):
      seed, data, partner = queue.dequeue()
      return {"seed": seed, "data": data, "partner": partner}

    ds = (tf.data.Dataset.range(1).repeat()
          .map(dequeue)  # sequential: elements leave the queue in the order they entered
          .map(self._map_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))
    self._iterator = iter(ds)

  def __call__(self, seeds, data, partners):
    """Columns (seeds [n, 2] int64, data [n] and partners [n] encoded images) -> (pixels,
    params) per element, in order."""
    if self._iterator is None:
      self._start()
    while self._pending:  # outputs a caller left behind are not this call's
      self._pending -= 1
      next(self._iterator)
    self._queue.enqueue_many([seeds, data, partners])
    self._pending = int(seeds.shape[0])
    while self._pending:
      self._pending -= 1
      yield next(self._iterator)

  def close(self):
    """Ends the stream: closes the queue, then drops the iterator. The order matters: an
    iterator dropped while its read-ahead waits on an open queue crashes TensorFlow (SIGSEGV);
    a closed queue ends the wait first. Runs eagerly even when called from inside a trace
    (the garbage collector can run `__del__` anywhere)."""
    if self._queue is not None:
      with tf.init_scope():
        self._queue.close(cancel_pending_enqueues=True)
    self._iterator = None
    self._queue = None
    self._pending = 0

  def __del__(self):
    self.close()


class AugmentTask(beam.DoFn):
  """A task -> (key, image batch) elements for RunInference, in a fixed order.

  key = (output file, [(sort key, metadata)...]) with one metadata dict per image: ids,
  positions, replica, copy and the augmentation parameters. `recipe` is the `augment.Recipe`
  (overrides included); its name keys the seeds. `selection` maps a source position to its
  number of copies (D3); None takes every example once.

  Sampling and `augment.apply` run inside a tf.data map, as the trainer's replay does: some
  Model Garden ops truncate floats to uint8, and a `tf.function` called on its own (whose graph
  optimiser reorders float arithmetic) can land one grey level off the eager and tf.data result.
  The map function is traced once per process (`augment_function`, shared by the task
  instances of a multi-threaded worker) and one `AugmentStream` (one tf.data iterator) per task
  instance serves every task: tracing takes seconds and each new iterator ~1 s of CPU, more than
  a shard's work.
  """

  _SIGNATURE = [{"seed": tf.TensorSpec([2], tf.int64), "data": tf.TensorSpec([], tf.string),
                 "partner": tf.TensorSpec([], tf.string)}]

  def __init__(self, recipe: augment.Recipe, resolution, teacher_input, batch_size, num_shards):
    self.recipe = recipe
    self.resolution = resolution
    self.teacher_input = teacher_input
    self.batch_size = batch_size
    self.num_shards = num_shards
    self.images = beam.metrics.Metrics.counter(transforms.NAMESPACE, "augmented_images")

  def setup(self):
    self._augment_fn = augment_function(self.recipe, self.resolution, self.teacher_input)
    self._stream = AugmentStream(self._augment_fn)

  def teardown(self):
    self._stream.close()

  def batches(self, seeds, data, partners):
    """Columns of elements -> (pixels [n, res, res, C], {param: [n, ...]}) batches of
    `batch_size`, in order; the last may be smaller."""
    pixels, params = [], []
    for image, p in self._stream(seeds, data, partners):
      pixels.append(image)
      params.append(p)
      if len(pixels) == self.batch_size:
        yield _stacked(pixels, params)
        pixels, params = [], []
    if pixels:
      yield _stacked(pixels, params)

  def process(self, element):
    (shard, path, first, count), selection = element
    examples = transforms.read_shard(path)
    recipe = self.recipe
    shard_file = files.shard_name("shard", shard, self.num_shards)
    for replica in range(first, first + count):
      seeds, data, partners, keys = [], [], [], []
      for position, ex in enumerate(examples):
        copies, selected_class = (1, -1) if selection is None else selection.get(position,
                                                                                (0, -1))
        for copy in range(copies):
          seed = augment.key_seed(recipe.name, replica, ex["id"], copy)
          # label / selected_class / partner_label: what `ViewAccuracy` scores the teacher's
          # output against; they stay out of the records.
          meta = {"id": ex["id"], "source_shard": shard, "source_index": position,
                  "replica": replica, "copy": copy, "partner_id": "", "partner_index": -1,
                  "label": ex["label"], "selected_class": selected_class, "partner_label": -1}
          if recipe.mixup:
            p_index = augment.sample_partner(seed, position, len(examples))
            meta.update(partner_id=examples[p_index]["id"], partner_index=p_index,
                        partner_label=examples[p_index]["label"])
          seeds.append(seed)
          data.append(ex["encoded"])
          partners.append(examples[meta["partner_index"]]["encoded"])
          keys.append(((position, copy), meta))
      if not keys:
        continue
      out_file = f"r{replica:04d}/{shard_file}"
      start = 0
      for pixels, params in self.batches(tf.stack(seeds), tf.constant(data),
                                         tf.constant(partners)):
        batch_keys = keys[start:start + len(pixels)]
        start += len(pixels)
        for i, (_, meta) in enumerate(batch_keys):
          meta["params"] = {k: v[i] for k, v in params.items()}
        self.images.inc(len(batch_keys))
        yield (out_file, batch_keys), pixels


_AUGMENT_FUNCTIONS: dict = {}  # (recipe, resolution, teacher input) -> the traced map function
_AUGMENT_LOCK = threading.Lock()


def augment_function(recipe: augment.Recipe, resolution: int, teacher_input: str):
  """The job's map function for these settings, one per process.

  Tracing it takes 1-3 s of Python (17 RandAugment branches per layer, AutoGraph's conversion
  the first time), and a worker process may hold several task instances: one per thread of
  Beam's multi-threaded runners (Dataflow's harness threads, the DirectRunner's
  `multi_threading` mode). They share one traced function; each keeps its own stream
  (`AugmentStream`). A function of the settings, not a bound method: no reference cycle back to
  a task, so a dropped task frees its stream at once, closing it first.

  Traced on first use (the stream's first call), not here: an instance that never gets a
  task costs nothing, and `tf.function` traces a signature once however many threads call it.
  """
  key = (recipe, resolution, teacher_input)
  with _AUGMENT_LOCK:
    if key not in _AUGMENT_FUNCTIONS:
      _AUGMENT_FUNCTIONS[key] = tf.function(
          functools.partial(_augment_element, recipe, resolution, teacher_input),
          input_signature=AugmentTask._SIGNATURE)  # pylint: disable=protected-access
    return _AUGMENT_FUNCTIONS[key]


def forget_augment_functions():
  """Drops the traced map functions: the next task traces its own (benchmarks time that)."""
  with _AUGMENT_LOCK:
    _AUGMENT_FUNCTIONS.clear()


def _augment_element(recipe, resolution, teacher_input, element):
  """{seed, data, partner} -> (teacher-scaled pixels, params): the job's map function."""
  image = augment.decode(element["data"])
  partner = augment.decode(element["partner"]) if recipe.mixup else None
  params = augment.sample(recipe, element["seed"], tf.shape(image),
                          tf.shape(partner) if recipe.mixup else None)
  scale, offset = transforms.INPUT_SCALES[teacher_input]
  pixels = augment.apply(image, params, resolution, partner,
                         constants=recipe.ra_constants(resolution),
                         jpeg_quality=recipe.jpeg_quality, ra_layers=recipe.ra_layers)
  return pixels * scale + offset, params


def _stacked(pixels, params):
  """Per-element stream outputs -> one batch: pixels [n, ...] and {param: array [n, ...]}."""
  return (tf.stack(pixels),
          {k: np.stack([p[k].numpy() for p in params]) for k in params[0]})


class MakeRecords(beam.DoFn):
  """(key, teacher batch output) -> (output file, (sort key, serialized record)) per image."""

  def __init__(self, recipe, teacher_outputs, top_k, num_classes):
    self.recipe = recipe
    self.teacher_outputs = teacher_outputs
    self.top_k = top_k
    self.num_classes = num_classes
    self.nonfinite = beam.metrics.Metrics.counter(transforms.NAMESPACE, "nonfinite_logits")

  def process(self, element):
    (out_file, keys), result = element
    outputs = np.asarray(result.inference, np.float32)
    if self.teacher_outputs == "probabilities":
      outputs = np.log(np.clip(outputs, 1e-30, None))
    # The teacher's top-1 and its probability for the whole batch in one softmax (rows that are
    # not finite become dead letters below and are never read).
    with np.errstate(invalid="ignore", over="ignore"):
      wide = outputs.astype(np.float64)
      probs = np.exp(wide - wide.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
    tops = np.argmax(wide, -1)
    for (sort_key, meta), logits, top, prob in zip(keys, outputs, tops, probs):
      if logits.shape[-1] != self.num_classes or not np.all(np.isfinite(logits)):
        self.nonfinite.inc()
        yield beam.pvalue.TaggedOutput(transforms.DEAD_LETTER, {
            "id": meta["id"], "replica": meta["replica"], "copy": meta["copy"],
            "error": f"teacher output of shape {logits.shape} is not {self.num_classes} "
                     "finite values"})
        continue
      record = records.distill_record(
          example_id=meta["id"], source_shard=meta["source_shard"],
          source_index=meta["source_index"], recipe=self.recipe, replica=meta["replica"],
          copy=meta["copy"], params=meta["params"], logits=logits, top_k=self.top_k,
          partner_id=meta["partner_id"], partner_index=meta["partner_index"])
      yield out_file, (sort_key, record)
      yield beam.pvalue.TaggedOutput(VIEWS, view_row(meta, int(top), float(prob[top])))


# ---- the teacher on its own views -------------------------------------------------------------

VIEWS = "views"  # MakeRecords' side output: one view_row per record written

# How far (absolute top-1) the teacher may fall on its views below its clean accuracy before the
# job warns. Views are meant to be harder than clean images; a teacher that is wrong on most of
# them hands the student its mistakes (README, "See the teacher").
VIEW_GAP_WARNING = 0.2


def view_row(meta, top: int, confidence: float):
  """(target, partner target, share of the image, teacher top-1 `top`, its probability
  `confidence`, what the target is) of one view; target -1: nothing to score against (an
  unlabelled image outside a selection).

  The target is the image's label, else (an unlabelled corpus) the class the D3 selection gave
  it. For mixup it is the label of the image with the larger share (the image itself at a
  share of exactly one half); the partner's label is kept for "either of the two".
  """
  if meta["label"] >= 0:
    target, against = meta["label"], "label"
  else:
    target, against = meta["selected_class"], "selection class"
  share = float(meta["params"]["mix_ratio"]) if meta["partner_index"] >= 0 else 1.0
  partner = meta["partner_label"]
  if share < 0.5 and partner >= 0:
    target, partner = partner, target
  return (int(target), int(partner), share, top, confidence, against)


class ViewAccuracy(beam.CombineFn):
  """The teacher's accuracy on the views it labelled, combined across workers (no second pass
  over the records): `teacher_on_views` of the manifest.

  examples: views with a target; top1: the teacher's top-1 equals the target; mean_confidence:
  the mean top-class probability (over every view, scored or not); per_class_top1 and
  per_class_examples: by target class (None where a class has no view); top1_either (mixup): the
  top-1 is either image's label; against: "label" or "selection class" (what the targets are).
  """

  def __init__(self, num_classes: int, mixup: bool):
    self.num_classes = num_classes
    self.mixup = mixup

  # Confidences are summed as whole multiples of 2^-32: integer sums do not depend on the order
  # the workers' partial sums are merged in, so the manifest is byte-identical on any runner.
  _UNIT = 2**32

  def create_accumulator(self):
    # [views, confidence sum (in _UNIT), scored, right, either right], per class [scored,
    # right], against
    return [0, 0, 0, 0, 0, [0] * self.num_classes, [0] * self.num_classes, []]

  def add_input(self, acc, row):
    target, partner, _, top, confidence, against = row
    acc[0] += 1
    acc[1] += int(round(confidence * self._UNIT))
    if 0 <= target < self.num_classes:
      acc[2] += 1
      acc[3] += top == target
      acc[4] += top in (target, partner)
      acc[5][target] += 1
      acc[6][target] += top == target
      if against not in acc[7]:
        acc[7] = sorted(acc[7] + [against])
    return acc

  def merge_accumulators(self, accumulators):
    out = self.create_accumulator()
    for acc in accumulators:
      for i in range(5):
        out[i] += acc[i]
      out[5] = [a + b for a, b in zip(out[5], acc[5])]
      out[6] = [a + b for a, b in zip(out[6], acc[6])]
      out[7] = sorted(set(out[7]) | set(acc[7]))
    return out

  def extract_output(self, acc):
    views, confidence, scored, right, either, per_n, per_right, against = acc
    if not scored:
      return None  # nothing to score against: an unlabelled corpus without a selection
    out = {
        "examples": scored,
        "against": " or ".join(against),
        "top1": right / scored,
        "mean_confidence": confidence / self._UNIT / views,
        "per_class_top1": [r / n if n else None for r, n in zip(per_right, per_n)],
        "per_class_examples": per_n,
    }
    if self.mixup:
      out["top1_either"] = either / scored
    return out


def clean_top1(teacher: str, given: float | None) -> tuple[float | None, str | None]:
  """The teacher's top-1 on clean held-out images, and where it comes from: --teacher_clean_top1,
  else the `metrics.json` of the training run that exported it (this project's trainer writes
  `<workdir>/export/student.keras` and `<workdir>/metrics.json`), else (None, None)."""
  if given is not None:
    return given, "--teacher_clean_top1"
  folder = os.path.dirname(teacher.rstrip("/"))
  for candidate in (folder, os.path.dirname(folder)):
    path = os.path.join(candidate, "metrics.json")
    try:
      if not tf.io.gfile.exists(path):
        continue
      with tf.io.gfile.GFile(path) as f:
        metrics = json.load(f)
    except (tf.errors.OpError, OSError, ValueError):
      continue
    if (isinstance(metrics, dict) and isinstance(metrics.get("top1"), (int, float))
        and os.path.normpath(str(metrics.get("export", ""))) == os.path.normpath(teacher)):
      return float(metrics["top1"]), path
  return None, None


def view_warning(recipe: str, views: dict | None, clean: float | None) -> str | None:
  """One line when the teacher's top-1 on its views (either image's label for mixup) is more
  than VIEW_GAP_WARNING below its clean top-1; else None."""
  if not views or clean is None:
    return None
  on_views = views.get("top1_either", views["top1"])
  if clean - on_views <= VIEW_GAP_WARNING:
    return None
  return (f"distill {recipe}: the teacher is right on {100 * on_views:.1f}% of the views it "
          f"labelled against {100 * clean:.1f}% on clean images, and a student distilled on "
          "them learns its mistakes: try a weaker recipe (--ra_magnitude, --crop_area_min) or a "
          "teacher trained on such views")


def describe_views(views: dict | None) -> str:
  """The closing line's words on the teacher's views."""
  if not views:
    return "teacher accuracy on its views: no labels to score against"
  text = (f"teacher top-1 on its views {100 * views['top1']:.1f}% against the "
          f"{views['against']}")
  if "top1_either" in views:
    text += f" (either image's label: {100 * views['top1_either']:.1f}%)"
  return text + f", mean confidence {views['mean_confidence']:.2f}"


def _batch_size(element):
  """Images in a teacher batch ((out_file, keys), inference result)."""
  return len(element[0][1])


# ---- D3 selection join ------------------------------------------------------------------------

def _selection_by_shard(line):
  row = json.loads(line)
  return row["source_shard"], (row["source_index"], (row["copies"], row["class"]))


def _attach_selection(element):
  """(shard, {tasks, selection}) -> (task, {position: (copies, class)}) for every task of the
  shard."""
  _, grouped = element
  selection = dict(grouped["selection"])
  for task in grouped["tasks"]:
    yield task, selection


# ---- the job ----------------------------------------------------------------------------------

def _write_manifest(stats, folder, dead, views, info):
  stats = sorted(stats, key=lambda s: s["path"])
  formats.DistillRecords(
      **info, files=tuple(formats.FileCount(s["path"], s["count"], s["bytes"]) for s in stats),
      num_records=sum(s["count"] for s in stats), dead_letter=dead,
      teacher_on_views=views).write(folder)


def check_inputs(args):
  """Loads the manifests and the teacher; one clear error for each mismatch."""
  source = formats.SourceShards.read(args.source, "--source")
  teacher = transforms.load_teacher(args.teacher, what="--teacher")
  resolution = args.resolution or transforms.teacher_resolution(teacher, 224)
  classes = transforms.teacher_output_classes(teacher, resolution)
  if source.num_classes and classes != source.num_classes:
    raise ConfigError(f"teacher {args.teacher} outputs {classes} classes but source "
                      f"{args.source} has {source.num_classes}; use a teacher trained on "
                      "these classes")
  selection = None
  if args.selection:
    selection = formats.D3Selection.read(args.selection, "--selection")
    if ([(s.path, s.count) for s in selection.source_shards]
        != [(s.path, s.count) for s in source.shards]):
      raise ConfigError(f"--selection {args.selection} was made from other source shards than "
                        f"--source {args.source}; pass the corpus it was selected from")
    if not selection.num_selected_total:
      raise ConfigError(f"--selection {args.selection} selected no image (no score above its "
                        "threshold); lower select_d3's --threshold or use a larger corpus")
  return source, resolution, classes, selection


def build_pipeline(p, args, tmp, source, resolution, classes):
  shards = [formats.inside(args.source, s.path, "--source") for s in source.shards]
  tasks = make_tasks(shards, args.replica_offset, args.replicas, args.replicas_per_task)
  task_list = p | "Tasks" >> beam.Create(tasks)
  if args.selection:
    rows = (p
            | "ReadSelection" >> beam.io.ReadFromText(
                os.path.join(args.selection, "selection-*.jsonl"))
            | "SelectionByShard" >> beam.Map(_selection_by_shard))
    work = ({"tasks": task_list | "TasksByShard" >> beam.Map(lambda t: (t[0], t)),
             "selection": rows}
            | "JoinSelection" >> beam.CoGroupByKey()
            | "AttachSelection" >> beam.FlatMap(_attach_selection))
  else:
    work = task_list | "NoSelection" >> beam.Map(lambda t: (t, None))
  batches = (work
             | "Spread" >> beam.Reshuffle()
             | "Augment" >> beam.ParDo(AugmentTask(recipe_from_args(args), resolution,
                                                   args.teacher_input, args.batch_size,
                                                   len(shards))))
  made = (batches
          | "Teacher" >> RunInference(transforms.teacher_handler(args.teacher))
          | "Progress" >> console.ReportProgress(_batch_size)
          | "MakeRecords" >> beam.ParDo(MakeRecords(args.recipe, args.teacher_outputs,
                                                    args.top_k, classes)).with_outputs(
                                                        transforms.DEAD_LETTER, VIEWS,
                                                        main="records"))
  views = made[VIEWS] | "TeacherOnViews" >> beam.CombineGlobally(
      ViewAccuracy(classes, recipe_from_args(args).mixup))
  dead = made[transforms.DEAD_LETTER] | "WriteDeadLetters" >> transforms.WriteSortedJsonLines(
      os.path.join(tmp, "dead_letter.jsonl"))
  info = {
      "recipe": args.recipe, "recipe_settings": dataclasses.asdict(recipe_from_args(args)),
      "replicas": args.replicas, "replica_offset": args.replica_offset,
      "source": formats.relative_to(args.out, args.source),
      "selection": args.selection and formats.relative_to(args.out, args.selection),
      "teacher": args.teacher, "resolution": resolution,
      "teacher_input": args.teacher_input, "teacher_outputs": args.teacher_outputs,
      "top_k": args.top_k, "num_classes": classes, "num_source_shards": len(shards),
  }
  _ = (made.records
       | "WriteRecords" >> transforms.WriteSortedShards(tmp)
       | "CollectStats" >> beam.combiners.ToList()
       | "WriteManifest" >> beam.Map(_write_manifest, tmp, beam.pvalue.AsSingleton(dead),
                                     beam.pvalue.AsSingleton(views), info))


def run(argv=None, pipeline=None) -> dict:
  """Runs the distillation-dataset job; returns its manifest as written (JSON)."""
  args, beam_args = parse_args(argv)
  inputs = {"--source": args.source, "--teacher": args.teacher, "--selection": args.selection}
  files.check_out(args.out, args.overwrite, formats.DistillRecords, inputs)  # before any work
  source, resolution, classes, selection = check_inputs(args)
  logging.info("distill %s: %d replicas from %d, teacher %s at %dpx, %d classes -> %s",
               args.recipe, args.replicas, args.replica_offset, args.teacher, resolution,
               classes, args.out)
  per_replica = selection.num_selected_total if selection else source.num_examples
  console.expect(args.replicas * per_replica, "records")
  manifest = files.run_staged(
      out=args.out, overwrite=args.overwrite,
      pipeline=pipeline or files.make_pipeline(beam_args),
      build=lambda p, tmp: build_pipeline(p, args, tmp, source, resolution, classes),
      manifest=formats.DistillRecords,
      inputs=inputs)
  logging.info("distill %s: %d records in %d files, %d dead letters -> %s; %s", args.recipe,
               manifest.num_records, len(manifest.files), manifest.dead_letter, args.out,
               describe_views(manifest.teacher_on_views))
  clean, where = clean_top1(args.teacher, args.teacher_clean_top1)
  if clean is not None:
    logging.info("distill %s: the teacher's clean top-1 is %.1f%% (%s)", args.recipe,
                 100 * clean, where)
  warning = view_warning(args.recipe, manifest.teacher_on_views, clean)
  if warning:
    logging.warning(warning)
  return manifest.to_json()


if __name__ == "__main__":
  run_then_exit(files.job_main, "data_prep.distill", run, sys.argv[1:])
