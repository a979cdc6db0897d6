"""Ingest: an ImageNet-style source -> sharded source TFRecords + manifest.json (data flow step 1).

    python -m data_prep.ingest --images=DIR --out=DIR     # class_name/*: JPEG PNG GIF BMP WebP
    python -m data_prep.ingest --tfds=imagenet2012 --tfds_data_dir=D --tfds_manual_dir=M --out=DIR
    python -m data_prep.ingest --tfds_dir=PREPARED_DATASET_DIR --split=train --out=DIR
    python -m data_prep.ingest --tfrecords='gs://b/train-*' --out=DIR [--label_offset=-1]
    python -m data_prep.ingest --fashion_mnist=train|test --out=DIR       # offline IDX files
    ... [--hash_range=LO,HI] [--class_fraction=C:F,...] [--drop_labels]
        [--unlabeled_images=DIR]  (a labelled subset, or an unlabelled, imbalanced corpus)
    ... [--num_shards=N] [--overwrite] [standard Beam options: --runner, --direct_num_workers, ...]

Each image is validated (decoded once) and stored once, as its original bytes (JPEG, PNG, GIF,
BMP; WebP as a lossless PNG), in a shard chosen by a stable hash of its id, sorted by id: the
same inputs give byte-identical shards on any runner. Files that are not decodable images are
counted (`mnv4:images_corrupt`) and listed in `dead_letter.jsonl`. The manifest holds class
names, counts per class, shards and counts.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import sys

if __name__ == "__main__":  # the command line: TensorFlow's C++ start-up lines are noise
  from mnv4_train.cli import quiet_tensorflow  # first: the imports below load TensorFlow
  quiet_tensorflow()  # (not with --verbose)

import apache_beam as beam  # noqa: E402
import tensorflow as tf  # noqa: E402
from apache_beam.io import fileio  # noqa: E402

from data_prep import console, fashion_mnist, files, transforms  # noqa: E402
from mnv4_train.data import formats, records  # noqa: E402
from mnv4_train.errors import (  # noqa: E402
    ArgumentParser, ConfigError, InputPathError, first_line, run_then_exit)

EXAMPLES_PER_SHARD = 1024


def parse_args(argv):
  parser = ArgumentParser(prog="data_prep.ingest", description=__doc__.split("\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--images",
                      help="image folder laid out class_name/image: JPEG, PNG, GIF, BMP or WebP "
                      "files, known by their bytes whatever the extension (others are dead "
                      "letters)")
  source.add_argument("--tfds", help="TFDS dataset name (e.g. imagenet2012), prepared or with "
                      "--tfds_manual_dir")
  source.add_argument("--tfds_dir", help="folder of an already prepared TFDS dataset version")
  source.add_argument("--tfrecords", help="glob of TFRecord files of tf.train.Example")
  source.add_argument("--fashion_mnist", choices=sorted(fashion_mnist.SPLITS),
                      help="Fashion-MNIST's official train or test split, read from its IDX "
                      "files (Debian package dataset-fashion-mnist, or the Keras cache)")
  source.add_argument("--unlabeled_only", metavar="DIR",
                      help="only the --unlabeled_images-style folder DIR, no labelled source")
  parser.add_argument("--out", required=True, help="output folder (local or gs://)")
  parser.add_argument("--split", default="train", help="TFDS split (default train)")
  parser.add_argument("--tfds_data_dir", default=None)
  parser.add_argument("--tfds_manual_dir", default=None)
  parser.add_argument("--image_key", default=None,
                      help="feature holding the encoded image (default: image/encoded for "
                      "TFRecords, image for TFDS)")
  parser.add_argument("--label_key", default=None,
                      help="feature holding the label (default: image/class/label, label)")
  parser.add_argument("--id_key", default="image/source_id",
                      help="TFRecord feature with a stable id; a content hash when absent")
  parser.add_argument("--label_offset", type=int, default=0,
                      help="added to TFRecord labels (-1 for 1-based ImageNet TFRecords)")
  parser.add_argument("--class_names", default=None,
                      help="text file, one class name per line (TFRecord sources)")
  parser.add_argument("--num_shards", type=int, default=0,
                      help=f"output shards (default: one per {EXAMPLES_PER_SHARD} images)")
  parser.add_argument("--holdout_fraction", type=float, default=0.0,
                      help="fraction of images (by a stable hash of the id) held out for "
                      "evaluation; ingest twice, with --subset=train and --subset=holdout")
  parser.add_argument("--subset", default="all", choices=["all", "train", "holdout"],
                      help="which side of --holdout_fraction to write")
  parser.add_argument("--fashion_mnist_dir", default=None,
                      help="folder holding Fashion-MNIST's *-ubyte.gz files (default: the Debian "
                      "path, then the Keras cache)")
  parser.add_argument("--hash_range", default=None, metavar="LO,HI",
                      help="keep the images whose stable id hash, as a fraction in [0, 1), lies "
                      "in [LO, HI): disjoint ranges give disjoint subsets (e.g. 0,0.09 train, "
                      "0.09,0.11 validation, 0.11,1 corpus); --holdout_fraction=F --subset=holdout "
                      "is the range 0,F")
  parser.add_argument("--class_fraction", default=None, metavar="C:F,...",
                      help="keep only the fraction F of class C (by a stable hash of the id), to "
                      "make a corpus class-imbalanced on purpose")
  parser.add_argument("--drop_labels", action="store_true",
                      help="withhold the labels: every image is written unlabelled (-1)")
  parser.add_argument("--unlabeled_images", default=None, metavar="DIR",
                      help="also add every image file in DIR (and its subfolders), unlabelled, "
                      "e.g. out-of-distribution images a relevance filter should reject")
  parser.add_argument("--overwrite", action="store_true", help="replace a finished output")
  parser.add_argument("--verbose", action="store_true", help=console.VERBOSE_HELP)
  args, beam_args = parser.parse_known_args(argv)
  args.hash_range = _parse_range(parser, args.hash_range)
  args.class_fraction = _parse_fractions(parser, args.class_fraction)
  if args.unlabeled_only:
    args.unlabeled_images = args.unlabeled_only
  if args.hash_range and args.holdout_fraction:
    parser.error("--hash_range and --holdout_fraction both pick a subset; give one")
  if args.num_shards < 0:
    parser.error(f"--num_shards must be >= 0, got {args.num_shards}")
  if not 0.0 <= args.holdout_fraction < 1.0:
    parser.error(f"--holdout_fraction must be in [0, 1), got {args.holdout_fraction}")
  if (args.subset == "all") != (args.holdout_fraction == 0.0):
    parser.error("--holdout_fraction and --subset=train|holdout go together")
  return args, beam_args


def _parse_range(parser, text):
  if text is None:
    return None
  try:
    lo, hi = (float(v) for v in text.split(","))
  except ValueError:
    parser.error(f"--hash_range takes LO,HI (two numbers), got {text!r}")
  if not 0.0 <= lo < hi <= 1.0:
    parser.error(f"--hash_range needs 0 <= LO < HI <= 1, got {text!r}")
  return lo, hi


def _parse_fractions(parser, text):
  if not text:
    return {}
  out = {}
  try:
    for item in text.split(","):
      cls, frac = item.split(":")
      out[int(cls)] = float(frac)
  except ValueError:
    parser.error(f"--class_fraction takes CLASS:FRACTION,... (e.g. 2:0.1,4:0.1), got {text!r}")
  if any(not 0.0 <= f <= 1.0 for f in out.values()):
    parser.error(f"--class_fraction fractions must be in [0, 1], got {text!r}")
  return out


# ---- sources ----------------------------------------------------------------------------------

def image_folder_classes(root: str) -> list[str]:
  """Class names of an image folder: its subfolders, sorted."""
  if not tf.io.gfile.isdir(root):
    raise InputPathError(f"--images {root} is not a folder; give a folder of class_name/ "
                         "subfolders holding the images")
  names = sorted(n.rstrip("/") for n in tf.io.gfile.listdir(root)
                 if tf.io.gfile.isdir(os.path.join(root, n)))
  if not names:
    raise InputPathError(f"--images {root} has no class subfolders; lay it out as "
                         "class_name/image.jpg")
  return names


class _FolderExample(beam.DoFn):
  """A matched file -> dict(id=class/file, encoded, label)."""

  def __init__(self, root, class_index):
    self.root = root.rstrip("/")
    self.class_index = class_index

  def process(self, readable):
    path = readable.metadata.path
    rel = os.path.relpath(path, self.root)
    class_name = rel.split(os.sep)[0]
    if class_name not in self.class_index:
      return
    yield {"id": rel, "encoded": readable.read(), "label": self.class_index[class_name]}


class ReadImageFolder(beam.PTransform):
  def __init__(self, root, class_names):
    super().__init__()
    self.root = root.rstrip("/")
    self.class_index = {name: i for i, name in enumerate(class_names)}

  def expand(self, p):
    return (p
            | "Match" >> fileio.MatchFiles(f"{self.root}/*/*")
            | "ReadMatches" >> fileio.ReadMatches()
            | "ToExample" >> beam.ParDo(_FolderExample(self.root, self.class_index)))


def _tfds_builder(args):
  import tensorflow_datasets as tfds
  try:
    if args.tfds_dir:
      return tfds.builder_from_directory(args.tfds_dir)
    builder = tfds.builder(args.tfds, data_dir=args.tfds_data_dir)
    if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
      if not args.tfds_manual_dir:
        raise InputPathError(f"TFDS dataset {args.tfds} is not prepared in {builder.data_dir}; "
                             "pass --tfds_manual_dir with its downloaded files")
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=args.tfds_manual_dir))
    return builder
  except (tfds.core.registered.DatasetNotFoundError, FileNotFoundError) as e:
    raise InputPathError(f"cannot open the TFDS dataset: {first_line(e)}") from None


class _TfdsExample(beam.DoFn):

  def __init__(self, image_key, label_key):
    self.image_key = image_key
    self.label_key = label_key

  def process(self, ex):
    ex = {k: v.numpy() if hasattr(v, "numpy") else v for k, v in ex.items()}
    name = ex.get("file_name", b"") or ex["tfds_id"]
    yield {"id": name.decode() if isinstance(name, bytes) else str(name),
           "encoded": bytes(ex[self.image_key]),
           "label": int(ex[self.label_key]) if self.label_key in ex else -1}


class _TFRecordExample(beam.DoFn):

  def __init__(self, image_key, label_key, id_key, label_offset):
    self.image_key, self.label_key, self.id_key = image_key, label_key, id_key
    self.label_offset = label_offset
    self.bad = beam.metrics.Metrics.counter(transforms.NAMESPACE, "records_without_image")

  def process(self, serialized):
    f = tf.train.Example.FromString(serialized).features.feature
    if self.image_key not in f or not f[self.image_key].bytes_list.value:
      self.bad.inc()
      digest = hashlib.sha1(serialized).hexdigest()
      yield beam.pvalue.TaggedOutput(transforms.DEAD_LETTER,
                                     {"id": f"sha1:{digest}", "error": f"no {self.image_key}"})
      return
    if self.id_key in f and f[self.id_key].bytes_list.value:
      example_id = f[self.id_key].bytes_list.value[0].decode("utf-8", "surrogateescape")
    else:
      example_id = "sha1:" + hashlib.sha1(serialized).hexdigest()
    label = -1
    if self.label_key in f and f[self.label_key].int64_list.value:
      label = int(f[self.label_key].int64_list.value[0]) + self.label_offset
    yield {"id": example_id, "encoded": f[self.image_key].bytes_list.value[0], "label": label}


class _FashionMnistExamples(beam.DoFn):
  """(start, stop) index range -> dict(id, encoded PNG, label) for those images of a split.

  The ids and labels are known before the pixels are encoded, so `selection` (--hash_range,
  --class_fraction) drops what it would drop downstream here, unencoded, counted the same: a
  subset of the 60,000 costs its own size, not the split's."""

  def __init__(self, split, folder, selection=None):
    self.split = split
    self.folder = folder
    self.selection = selection
    self.dropped = _drop_counters()

  def setup(self):
    self._images, self._labels = fashion_mnist.load(self.split, self.folder)

  def process(self, bounds):
    for i in range(*bounds):
      example_id, label = fashion_mnist.example_id(self.split, i), int(self._labels[i])
      verdict = self.selection.verdict(example_id, label) if self.selection else None
      if verdict:
        self.dropped[verdict].inc()
        continue
      png = tf.io.encode_png(self._images[i][:, :, None]).numpy()
      yield {"id": example_id, "encoded": png, "label": label}


def _read_fashion_mnist(p, args):
  try:
    images, _ = fashion_mnist.load(args.fashion_mnist, args.fashion_mnist_dir)
  except FileNotFoundError as e:
    raise InputPathError(str(e)) from None
  except fashion_mnist.IdxError as e:
    raise InputPathError(f"{e}; reinstall the files ({fashion_mnist.HOW_TO_GET})") from None
  n, step = len(images), 2048
  return (p
          | "FashionMnistRanges" >> beam.Create([(i, min(n, i + step)) for i in range(0, n, step)])
          | "FashionMnistSpread" >> beam.Reshuffle()
          | "FashionMnist" >> beam.ParDo(_FashionMnistExamples(
              args.fashion_mnist, args.fashion_mnist_dir,
              Selection(args.hash_range, args.class_fraction))))


class _UnlabeledExample(beam.DoFn):
  """A matched file -> dict(id=unlabeled/<folder>/<relative path>, encoded, label=-1)."""

  def __init__(self, root):
    self.root = root.rstrip("/")
    self.prefix = "unlabeled/" + os.path.basename(self.root)

  def process(self, readable):
    rel = os.path.relpath(readable.metadata.path, self.root)
    yield {"id": f"{self.prefix}/{rel}", "encoded": readable.read(), "label": -1}


def read_unlabeled(p, root):
  """Every file in `root` and its subfolders (one level), unlabelled."""
  if not tf.io.gfile.isdir(root):
    raise InputPathError(f"--unlabeled_images {root} is not a folder of images")
  root = root.rstrip("/")
  return (p
          | "UnlabeledPatterns" >> beam.Create([f"{root}/*", f"{root}/*/*"])
          | "MatchUnlabeled" >> fileio.MatchAll(
              empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
          | "ReadUnlabeled" >> fileio.ReadMatches()
          | "ToUnlabeledExample" >> beam.ParDo(_UnlabeledExample(root)))


def read_source(p, args):
  """The chosen source as (examples, dead letters, class names or None, source description)."""
  empty = p | "NoDeadLetters" >> beam.Create([])
  if args.unlabeled_only:
    return p | "NoLabelled" >> beam.Create([]), empty, None, {"kind": "none"}
  if args.fashion_mnist:
    return (_read_fashion_mnist(p, args), empty, list(fashion_mnist.CLASS_NAMES),
            {"kind": "fashion_mnist", "split": args.fashion_mnist})
  if args.images:
    names = image_folder_classes(args.images)
    return (p | "ReadImageFolder" >> ReadImageFolder(args.images, names), empty, names,
            {"kind": "image_folder", "path": args.images})
  if args.tfds or args.tfds_dir:
    import tensorflow_datasets as tfds
    builder = _tfds_builder(args)
    image_key, label_key = args.image_key or "image", args.label_key or "label"
    features = builder.info.features
    label_feature = features[label_key] if label_key in features.keys() else None
    names = list(getattr(label_feature, "names", None) or []) or None
    if args.split not in builder.info.splits:
      raise ConfigError(f"TFDS dataset {builder.name} has no split {args.split!r}; it has: "
                        f"{', '.join(sorted(builder.info.splits))}")
    examples = (p
                | "ReadTFDS" >> tfds.beam.ReadFromTFDS(
                    builder, split=args.split,
                    decoders={image_key: tfds.decode.SkipDecoding()},
                    read_config=tfds.ReadConfig(add_tfds_id=True))
                | "ToExample" >> beam.ParDo(_TfdsExample(image_key, label_key)))
    return examples, empty, names, {"kind": "tfds", "name": builder.name,
                                    "version": str(builder.version), "split": args.split}
  if not tf.io.gfile.glob(args.tfrecords):
    raise InputPathError(f"--tfrecords {args.tfrecords} matches no file")
  names = None
  if args.class_names:
    if not tf.io.gfile.exists(args.class_names):
      raise InputPathError(f"--class_names {args.class_names} does not exist")
    with tf.io.gfile.GFile(args.class_names) as f:
      names = [line.strip() for line in f if line.strip()]
  parsed = (p
            | "ReadTFRecords" >> beam.io.ReadFromTFRecord(args.tfrecords)
            | "ToExample" >> beam.ParDo(_TFRecordExample(
                args.image_key or "image/encoded", args.label_key or "image/class/label",
                args.id_key, args.label_offset)).with_outputs(
                    transforms.DEAD_LETTER, main="examples"))
  return (parsed.examples, parsed[transforms.DEAD_LETTER], names,
          {"kind": "tfrecords", "glob": args.tfrecords})


def source_size(args) -> int | None:
  """How many images the job validates (for the progress line); None when not known up front."""
  if args.hash_range or args.class_fraction:
    return None  # a selection of the source
  n = 0
  if args.unlabeled_images:
    root = args.unlabeled_images.rstrip("/")
    n += len([f for f in tf.io.gfile.glob(f"{root}/*") + tf.io.gfile.glob(f"{root}/*/*")
              if not tf.io.gfile.isdir(f)])
  if args.unlabeled_only:
    return n
  if args.images:
    return n + len(tf.io.gfile.glob(os.path.join(args.images.rstrip("/"), "*", "*")))
  if args.fashion_mnist:
    paths = fashion_mnist.locate(args.fashion_mnist, args.fashion_mnist_dir)
    count = _idx_count(paths[0]) if paths else None
    return None if count is None else n + count
  if args.tfds or args.tfds_dir:
    splits = _tfds_builder(args).info.splits
    return n + splits[args.split].num_examples if args.split in splits else None
  return None


def _idx_count(path: str) -> int | None:
  """The first dimension an IDX file's header gives (its number of images)."""
  try:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
      head = f.read(8)
  except (OSError, EOFError):
    return None  # read_source reports it
  return int.from_bytes(head[4:8], "big") if len(head) == 8 else None


# ---- the pipeline -----------------------------------------------------------------------------

HASH_BUCKETS = 1_000_000


def hash_bucket(example_id: str, salt: str = "holdout") -> int:
  """An id's stable bucket in [0, HASH_BUCKETS): the same on every machine and run.

  The "holdout" buckets place an id for --holdout_fraction and --hash_range alike, so the range
  0,F is exactly --holdout_fraction=F --subset=holdout.
  """
  return transforms.stable_hash(salt + "\x1f" + example_id) % HASH_BUCKETS


def in_holdout(example_id: str, fraction: float) -> bool:
  """Whether an id falls in the held-out fraction: a stable hash, the same on every machine."""
  return hash_bucket(example_id) < fraction * HASH_BUCKETS


class Selection:
  """--hash_range and --class_fraction as a verdict on one example's id and label."""

  def __init__(self, hash_range, class_fraction):
    self.hash_range = hash_range
    self.class_fraction = class_fraction or {}

  def __bool__(self):
    return bool(self.hash_range or self.class_fraction)

  def verdict(self, example_id: str, label: int) -> str | None:
    """None when the example is kept, else the counter it is dropped under."""
    if self.hash_range:
      lo, hi = self.hash_range
      if not lo * HASH_BUCKETS <= hash_bucket(example_id) < hi * HASH_BUCKETS:
        return "outside_hash_range"
    keep = self.class_fraction.get(label)
    if keep is not None and hash_bucket(example_id, "class_fraction") >= keep * HASH_BUCKETS:
      return "dropped_by_class_fraction"
    return None


def _drop_counters():
  return {name: beam.metrics.Metrics.counter(transforms.NAMESPACE, name)
          for name in ("outside_hash_range", "dropped_by_class_fraction")}


class _Select(beam.DoFn):
  """--hash_range, --class_fraction and --drop_labels on the labelled source's examples."""

  def __init__(self, selection, drop_labels):
    self.selection = selection
    self.drop_labels = drop_labels
    self.dropped = _drop_counters()

  def process(self, ex):
    verdict = self.selection.verdict(ex["id"], ex["label"])
    if verdict:
      self.dropped[verdict].inc()
      return
    yield {**ex, "label": -1} if self.drop_labels else ex


class _KeepSubset(beam.DoFn):
  """Keeps the examples of one side of the train/holdout split; counts the others."""

  def __init__(self, fraction, subset):
    self.fraction = fraction
    self.subset = subset
    self.other = beam.metrics.Metrics.counter(transforms.NAMESPACE, "in_other_subset")

  def process(self, ex):
    if self.subset == "all" or in_holdout(ex["id"], self.fraction) == (self.subset == "holdout"):
      yield ex
    else:
      self.other.inc()


class _AssignShard(beam.DoFn):
  """example -> (shard file name, (id, serialized source Example)); shard = stable hash of id."""

  def process(self, ex, num_shards):
    shard = transforms.stable_hash(ex["id"]) % num_shards
    record = records.source_example(ex["id"], ex["encoded"], ex["label"], ex["height"],
                                    ex["width"], ex["format"], ex["original_format"])
    yield files.shard_name("shard", shard, num_shards), (ex["id"], record)


def _num_shards(count, requested):
  return requested or max(1, math.ceil(count / EXAMPLES_PER_SHARD))


def _write_manifest(stats, folder, num_shards, label_counts, dead, class_names, source):
  by_name = {s["path"]: s["count"] for s in stats}
  sizes = {s["path"]: s["bytes"] for s in stats}
  shards = []
  for i in range(num_shards):  # shards no example hashed into still exist, empty
    name = files.shard_name("shard", i, num_shards)
    if name not in by_name:
      files.write_tfrecords(os.path.join(folder, name), [])
      sizes[name] = tf.io.gfile.stat(os.path.join(folder, name)).length
    shards.append(formats.FileCount(name, by_name.get(name, 0), sizes[name]))
  counts = dict(label_counts)
  labelled = [k for k in counts if k >= 0]
  if class_names is None and labelled:
    class_names = [str(i) for i in range(max(labelled) + 1)]
  class_names = class_names or []
  manifest = formats.SourceShards(
      source=source,
      num_examples=sum(by_name.values()),
      num_classes=len(class_names),
      class_names=class_names,
      counts_per_class=[counts.get(i, 0) for i in range(len(class_names))],
      unlabeled=counts.get(-1, 0),
      shards=tuple(shards),
      dead_letter=dead)
  manifest.write(folder)
  return manifest


def build_pipeline(p, args, tmp):
  examples, early_dead, class_names, source = read_source(p, args)
  if args.hash_range or args.class_fraction or args.drop_labels:
    examples = examples | "Select" >> beam.ParDo(
        _Select(Selection(args.hash_range, args.class_fraction), args.drop_labels))
  if args.unlabeled_images:
    examples = ((examples, read_unlabeled(p, args.unlabeled_images))
                | "WithUnlabeled" >> beam.Flatten())
  checked = (examples
             | "Progress" >> console.ReportProgress()
             | "Validate" >> beam.ParDo(transforms.ValidateImage()).with_outputs(
                 transforms.DEAD_LETTER, main="images"))
  images = checked.images | "KeepSubset" >> beam.ParDo(
      _KeepSubset(args.holdout_fraction, args.subset))
  dead = ((checked[transforms.DEAD_LETTER], early_dead) | "AllDeadLetters" >> beam.Flatten())
  dead_count = dead | "WriteDeadLetters" >> transforms.WriteSortedJsonLines(
      os.path.join(tmp, "dead_letter.jsonl"))
  num_shards = (images
                | "Count" >> beam.combiners.Count.Globally()
                | "NumShards" >> beam.Map(_num_shards, args.num_shards))
  stats = (images
           | "AssignShard" >> beam.ParDo(_AssignShard(), beam.pvalue.AsSingleton(num_shards))
           | "WriteShards" >> transforms.WriteSortedShards(tmp))
  label_counts = (images
                  | "Labels" >> beam.Map(lambda ex: ex["label"])
                  | "CountLabels" >> beam.combiners.Count.PerElement()
                  | "LabelCounts" >> beam.combiners.ToList())
  _ = (stats
       | "CollectStats" >> beam.combiners.ToList()
       | "WriteManifest" >> beam.Map(
           _write_manifest, tmp, beam.pvalue.AsSingleton(num_shards),
           beam.pvalue.AsSingleton(label_counts), beam.pvalue.AsSingleton(dead_count),
           class_names, {**source, "subset": args.subset,
                         "holdout_fraction": args.holdout_fraction,
                         **_selection_info(args)}))


def _selection_info(args):
  """The subset flags, recorded in the manifest's source (only those that were given)."""
  info = {}
  if args.hash_range:
    info["hash_range"] = list(args.hash_range)
  if args.class_fraction:
    info["class_fraction"] = {str(k): v for k, v in sorted(args.class_fraction.items())}
  if args.drop_labels:
    info["labels_dropped"] = True
  if args.unlabeled_images:
    info["unlabeled_images"] = args.unlabeled_images
  return info


def _inputs(args) -> dict:
  """Every path the job reads, by flag (its --out may overlap none of them)."""
  inputs = {f"--{k}": getattr(args, k) for k in (
      "images", "tfds_dir", "tfds_data_dir", "tfds_manual_dir", "tfrecords", "class_names",
      "unlabeled_images")}
  if args.fashion_mnist:  # the IDX files themselves (a folder beside them is fine)
    for i, path in enumerate(fashion_mnist.locate(args.fashion_mnist, args.fashion_mnist_dir)
                             or ()):
      inputs[f"--fashion_mnist ({'images' if i == 0 else 'labels'})"] = path
  return inputs


def run(argv=None, pipeline=None) -> dict:
  """Runs the ingest job; returns the manifest as written (JSON). `pipeline`: a TestPipeline."""
  args, beam_args = parse_args(argv)
  inputs = _inputs(args)
  files.check_out(args.out, args.overwrite, formats.SourceShards, inputs)  # before any work
  logging.info("ingest: writing %s", args.out)
  console.expect(source_size(args), "images")
  manifest = files.run_staged(
      out=args.out, overwrite=args.overwrite,
      pipeline=pipeline or files.make_pipeline(beam_args),
      build=lambda p, tmp: build_pipeline(p, args, tmp), manifest=formats.SourceShards,
      inputs=inputs)
  logging.info("ingest: %d images in %d classes, %d shards, %d dead letters -> %s",
               manifest.num_examples, manifest.num_classes, len(manifest.shards),
               manifest.dead_letter, args.out)
  return manifest.to_json()


if __name__ == "__main__":
  run_then_exit(files.job_main, "data_prep.ingest", run, sys.argv[1:])
