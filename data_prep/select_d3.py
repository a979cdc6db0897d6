"""The class-balanced extra set (D3): score a corpus, keep confident images, balance classes.

    python -m data_prep.select_d3 --corpus=SOURCE_SHARDS --classifier=relevance.keras \\
        --out=DIR [--threshold=0.3] [--per_class=130000] [standard Beam options]

The paper (section 8, after NoisyStudent): score every corpus image with a relevance classifier
trained on ImageNet (an EfficientNet-B0), keep images whose top-class probability exceeds 0.3,
take the top K per class by that probability (K = 130K), and replicate the images of rarer
classes until each class has K. Only ids are written, never pixels:

  selection-XXXXX-of-YYYYY.jsonl   one row per selected image, sorted by (class, rank):
      {"class", "rank", "id", "score", "copies", "source_shard", "source_index"}
  histogram.png, manifest.json      images kept per class before and after replication

Classifier input: the central 87.5% crop resized to its resolution (`augment.center_crop`).

With few classes the paper's rule lets almost everything through. `--in_domain=TRAIN_SHARDS
--in_domain_heldout=VAL_SHARDS` adds the domain filter (`data_prep.domain`): a classifier of
"looks like the labelled images" fitted on the training images against a corpus sample, with
its threshold set so that `--domain_pass` of the held-out images pass; corpus images at or
below it are kept out (counter `outside_domain`, manifest `domain_filter`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import typing

if __name__ == "__main__":  # the command line: TensorFlow's C++ start-up lines are noise
  from mnv4_train.cli import quiet_tensorflow  # first: the imports below load TensorFlow
  quiet_tensorflow()  # (not with --verbose)

import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from apache_beam.ml.inference.base import RunInference  # noqa: E402

from data_prep import console, domain, files, transforms  # noqa: E402
from mnv4_train.data import augment, formats  # noqa: E402
from mnv4_train.errors import ArgumentParser, InputPathError, run_then_exit  # noqa: E402

CLASSES_PER_FILE = 64


def parse_args(argv):
  parser = ArgumentParser(prog="data_prep.select_d3", description=__doc__.split("\n")[0])
  parser.add_argument("--corpus", required=True, help="source shards of the corpus (ingest)")
  parser.add_argument("--classifier", required=True,
                      help="relevance classifier: .keras file or SavedModel dir")
  parser.add_argument("--out", required=True)
  parser.add_argument("--threshold", type=float, default=0.3,
                      help="keep images whose top-class probability exceeds this")
  parser.add_argument("--per_class", type=int, default=130_000, help="K images per class")
  parser.add_argument("--resolution", type=int, default=None,
                      help="classifier input size (default: its fixed size, else 224)")
  parser.add_argument("--classifier_input", default="minus_one_to_one",
                      choices=sorted(transforms.INPUT_SCALES))
  parser.add_argument("--classifier_outputs", default="logits",
                      choices=["logits", "probabilities"])
  parser.add_argument("--in_domain", default=None,
                      help="source shards of the labelled training images: turns on the domain "
                           "filter (with --in_domain_heldout)")
  parser.add_argument("--in_domain_heldout", default=None,
                      help="source shards of held-out labelled images (the validation split): "
                           "the domain filter's threshold is set on them")
  parser.add_argument("--domain_pass", type=float, default=0.98,
                      help="fraction of the held-out images the domain filter passes")
  parser.add_argument("--domain_sample", type=int, default=200_000,
                      help="corpus images per half (and training images) the filter is fitted on")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--overwrite", action="store_true")
  parser.add_argument("--verbose", action="store_true", help=console.VERBOSE_HELP)
  args, beam_args = parser.parse_known_args(argv)
  if not 0.0 <= args.threshold < 1.0:
    parser.error(f"--threshold must be in [0, 1), got {args.threshold}")
  if args.per_class < 1 or args.batch_size < 1:
    parser.error("--per_class and --batch_size must be >= 1")
  if bool(args.in_domain) != bool(args.in_domain_heldout):
    parser.error("--in_domain and --in_domain_heldout go together (the filter is fitted on the "
                 "first and its threshold set on the second)")
  if not 0.0 < args.domain_pass < 1.0:
    parser.error(f"--domain_pass must be in (0, 1), got {args.domain_pass}")
  if args.domain_sample < 1:
    parser.error("--domain_sample must be >= 1")
  return args, beam_args


def replicate(rows, per_class: int):
  """One class's kept images, best first -> (rank, row, copies); copies sum to `per_class` in expectation.

  Rows are (score, id, shard, position). A class with at least K images keeps its top K once
  each. A rarer class of n images is duplicated at random, as Noisy Student does: every image
  gets K / n copies by stochastic rounding, floor(K / n) plus one more with probability
  K / n - floor(K / n), drawn from a stable hash of its id, so the same inputs give the same
  copies on every run and runner, and no image is favoured for its rank.
  """
  rows = sorted(rows, key=lambda r: (-r[0], r[1]))[:per_class]
  n = len(rows)
  base, extra = divmod(per_class, n)
  frac = extra / n
  return [(rank, row, base + (_unit(row[1]) < frac)) for rank, row in enumerate(rows)]


def _unit(example_id: str) -> float:
  """A stable uniform draw in [0, 1) for an id (the D3 copy lottery)."""
  return transforms.stable_hash("d3-copies\x1f" + example_id) / 2.0**64


class ScoreInputs(beam.DoFn):
  """A source shard -> (keys, image batch): central crops at the classifier's resolution.

  Keys are (id, shard, position), with (half, domain features) appended when `features`.
  """

  def __init__(self, resolution, input_scale, batch_size, features=False):
    self.resolution = resolution
    self.input_scale = input_scale
    self.batch_size = batch_size
    self.features = features

  def setup(self):
    def prepare(data):
      crop = augment.center_crop(augment.decode(data), self.resolution)
      return (crop, domain.features_tf(crop)) if self.features else crop
    # One trace: a bytes argument would be a Python constant, traced again for every image.
    self._prepare = tf.function(prepare, input_signature=[tf.TensorSpec([], tf.string)])

  def process(self, task):
    shard, path = task
    scale, offset = transforms.INPUT_SCALES[self.input_scale]
    keys, batch = [], []
    for position, ex in enumerate(transforms.read_shard(path)):
      key = (ex["id"], shard, position)
      if self.features:
        crop, features = self._prepare(ex["encoded"])
        key += (domain.half(ex["id"]), features.numpy())
      else:
        crop = self._prepare(ex["encoded"])
      keys.append(key)
      batch.append(crop * scale + offset)
      if len(batch) == self.batch_size:
        yield keys, tf.stack(batch)
        keys, batch = [], []
    if batch:
      yield keys, tf.stack(batch)


class ShardFeatures(ScoreInputs):
  """A source shard -> (id, half, domain features) for its images in the id-hashed sample."""

  def __init__(self, resolution, rate):
    super().__init__(resolution, "minus_one_to_one", 1, features=True)
    self.rate = rate

  def process(self, task):
    for ex in transforms.read_shard(task):
      if domain.sampled(ex["id"], self.rate):
        yield ex["id"], domain.half(ex["id"]), self._prepare(ex["encoded"])[1].numpy()


def _corpus_sample(element, rate):
  """Scored batch -> (id, half, features) of its images in the corpus sample."""
  for key in element[0]:
    if domain.sampled(key[0], rate):
      yield key[0], key[3], key[4]


def _batch_size(element):
  """Images in a classifier batch (keys, inference result)."""
  return len(element[0])


OUTSIDE = "outside_domain"


@beam.typehints.with_output_types(typing.Tuple[int, typing.Any])
class TopClass(beam.DoFn):
  """Classifier outputs -> (class, (score, id, shard, position)) above the threshold.

  With the domain filter (side inputs `models`, `cut`), an image whose in-domain score is at
  or below the cut goes to the tagged output OUTSIDE instead.
  """

  def __init__(self, threshold, outputs):
    self.threshold = threshold
    self.outputs = outputs
    self.scored = beam.metrics.Metrics.counter(transforms.NAMESPACE, "images_scored")
    self.dropped = beam.metrics.Metrics.counter(transforms.NAMESPACE, "below_threshold")
    self.outside = beam.metrics.Metrics.counter(transforms.NAMESPACE, OUTSIDE)

  def process(self, element, models=None, cut=None):
    keys, result = element
    out = np.asarray(result.inference, np.float64)
    if self.outputs == "logits":
      out = np.exp(out - out.max(axis=-1, keepdims=True))
      out /= out.sum(axis=-1, keepdims=True)
    inside = np.ones(len(keys), bool)
    if cut is not None and cut["threshold"] is not None:
      s = domain.scores(models, [k[3] for k in keys], [k[4] for k in keys])
      inside = s > cut["threshold"]
    for key, probs, keep in zip(keys, out, inside):
      example_id, shard, position = key[:3]
      self.scored.inc()
      if not keep:
        self.outside.inc()
        yield beam.pvalue.TaggedOutput(OUTSIDE, example_id)
        continue
      cls = int(np.argmax(probs))
      score = float(probs[cls])
      if score > self.threshold:
        yield cls, (round(score, 6), example_id, shard, position)
      else:
        self.dropped.inc()


class Replicate(beam.DoFn):
  """(class, kept rows) -> (file, (sort key, JSON row)) for each chosen image, with copies."""

  def __init__(self, per_class, num_files):
    self.per_class = per_class
    self.num_files = num_files

  def process(self, element):
    cls, rows = element
    chosen = replicate(list(rows), self.per_class)
    name = f"selection-{cls % self.num_files:05d}-of-{self.num_files:05d}.jsonl"
    for rank, (score, example_id, shard, position), copies in chosen:
      row = {"class": cls, "rank": rank, "id": example_id, "score": score, "copies": copies,
             "source_shard": shard, "source_index": position}
      yield name, ((cls, rank), json.dumps(row, sort_keys=True))


def _class_counts(element, per_class):
  """(class, rows) -> (class, (above the threshold, distinct kept, records after replication))."""
  cls, rows = element
  rows = list(rows)
  chosen = replicate(rows, per_class)
  return cls, (len(rows), len(chosen), sum(copies for _, _, copies in chosen))


def _write_outputs(stats, folder, info, kept_count, per_class, num_classes, cut=None,
                   outside=0):
  counts = dict(stats)
  if cut is not None:
    info = {**info, "domain_filter": {**info["domain_filter"], **cut, "outside": outside}}
  above = [counts.get(c, (0, 0, 0))[0] for c in range(num_classes)]
  unique = [counts.get(c, (0, 0, 0))[1] for c in range(num_classes)]
  total = [counts.get(c, (0, 0, 0))[2] for c in range(num_classes)]
  formats.D3Selection(
      **info, selected_unique_per_class=unique, selected_total_per_class=total,
      num_selected_unique=sum(unique), num_selected_total=sum(total),
      empty_classes=[c for c, n in enumerate(unique) if n == 0],
      num_above_threshold=kept_count, above_threshold_per_class=above).write(folder)
  plot_histogram(unique, per_class, os.path.join(folder, "histogram.png"))


def plot_histogram(unique, per_class, path):
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  order = np.argsort(unique)[::-1]
  fig, ax = plt.subplots(figsize=(8, 3.5), dpi=100)
  ax.bar(np.arange(len(unique)), np.asarray(unique)[order], width=1.0, color="#4477aa",
         label="distinct images kept")
  ax.axhline(per_class, color="#cc3311", lw=1.5, label=f"K = {per_class} after replication")
  ax.set_xlabel("class (sorted by images kept)")
  ax.set_ylabel("images")
  ax.set_title("D3 class balance")
  ax.legend(loc="upper right", fontsize=8)
  fig.tight_layout()
  with tf.io.gfile.GFile(path, "wb") as f:
    fig.savefig(f, format="png")
  plt.close(fig)


def _shard_paths(folder, manifest, flag):
  return [formats.inside(folder, s.path, flag) for s in manifest.shards]


def _domain_side_inputs(p, args, prepared, resolution, in_domain, heldout, corpus):
  """(models, cut) singleton side inputs of the domain filter."""
  corpus_rate = min(1.0, 2.0 * args.domain_sample / max(1, corpus.num_examples))
  train_rate = min(1.0, 2.0 * args.domain_sample / max(1, in_domain.num_examples))

  def features(name, folder, manifest, flag, rate):
    return (p
            | f"{name}Shards" >> beam.Create(_shard_paths(folder, manifest, flag))
            | f"{name}Spread" >> beam.Reshuffle()
            | f"{name}Features" >> beam.ParDo(ShardFeatures(resolution, rate))
            | f"{name}List" >> beam.combiners.ToList())

  positives = features("InDomain", args.in_domain, in_domain, "--in_domain", train_rate)
  held = features("Heldout", args.in_domain_heldout, heldout, "--in_domain_heldout", 1.0)
  negatives = (prepared
               | "CorpusSample" >> beam.FlatMap(_corpus_sample, corpus_rate)
               | "CorpusSampleList" >> beam.combiners.ToList())
  models = (p
            | "DomainStart" >> beam.Create([None])
            | "FitDomain" >> beam.Map(lambda _, pos, neg: domain.fit(pos, neg),
                                      beam.pvalue.AsSingleton(positives),
                                      beam.pvalue.AsSingleton(negatives)))
  cut = (models
         | "DomainThreshold" >> beam.Map(domain.threshold, beam.pvalue.AsSingleton(held),
                                         args.domain_pass))
  return beam.pvalue.AsSingleton(models), beam.pvalue.AsSingleton(cut), cut


def build_pipeline(p, args, tmp, corpus, resolution, num_classes, in_domain=None,
                   heldout=None):
  shards = list(enumerate(_shard_paths(args.corpus, corpus, "--corpus")))
  num_files = max(1, math.ceil(num_classes / CLASSES_PER_FILE))
  filtering = in_domain is not None
  prepared = (p
              | "Shards" >> beam.Create(shards)
              | "Spread" >> beam.Reshuffle()
              | "Prepare" >> beam.ParDo(ScoreInputs(resolution, args.classifier_input,
                                                    args.batch_size, features=filtering)))
  side = {}
  if filtering:
    models, cut_side, cut = _domain_side_inputs(p, args, prepared, resolution, in_domain,
                                                heldout, corpus)
    side = {"models": models, "cut": cut_side}
  tagged = (prepared
            | "Classifier" >> RunInference(transforms.teacher_handler(args.classifier))
            | "Progress" >> console.ReportProgress(_batch_size)
            | "TopClass" >> beam.ParDo(TopClass(args.threshold, args.classifier_outputs),
                                       **side)
            .with_outputs(OUTSIDE, main="kept"))
  scored = tagged.kept
  by_class = scored | "GroupByClass" >> beam.GroupByKey()
  _ = (by_class
       | "Replicate" >> beam.ParDo(Replicate(args.per_class, num_files))
       | "WriteSelection" >> transforms.WriteSortedShards(tmp))
  kept_count = (scored | "CountKept" >> beam.combiners.Count.Globally())
  info = {"corpus": formats.relative_to(args.out, args.corpus), "classifier": args.classifier,
          "threshold": args.threshold, "per_class": args.per_class, "resolution": resolution,
          "num_classes": num_classes, "source_shards": corpus.shards,
          "num_files": num_files}
  extra = {}
  if filtering:
    info["domain_filter"] = {
        "in_domain": formats.relative_to(args.out, args.in_domain),
        "heldout": formats.relative_to(args.out, args.in_domain_heldout),
        "pass_fraction": args.domain_pass, "sample_per_half": args.domain_sample,
        "features": domain.FEATURES, "model": domain.MODEL}
    outside = tagged[OUTSIDE] | "CountOutside" >> beam.combiners.Count.Globally()
    extra = {"cut": beam.pvalue.AsSingleton(cut), "outside": beam.pvalue.AsSingleton(outside)}
  _ = (by_class
       | "KeptPerClass" >> beam.Map(_class_counts, args.per_class)
       | "CollectStats" >> beam.combiners.ToList()
       | "WriteManifest" >> beam.Map(_write_outputs, tmp, info,
                                     beam.pvalue.AsSingleton(kept_count), args.per_class,
                                     num_classes, **extra))


def run(argv=None, pipeline=None) -> dict:
  args, beam_args = parse_args(argv)
  inputs = {"--corpus": args.corpus, "--classifier": args.classifier,
            "--in_domain": args.in_domain, "--in_domain_heldout": args.in_domain_heldout}
  files.check_out(args.out, args.overwrite, formats.D3Selection, inputs)  # before any work
  corpus = formats.SourceShards.read(args.corpus, "--corpus")
  in_domain = heldout = None
  if args.in_domain:
    in_domain = formats.SourceShards.read(args.in_domain, "--in_domain")
    heldout = formats.SourceShards.read(args.in_domain_heldout, "--in_domain_heldout")
    for flag, m in (("--in_domain", in_domain), ("--in_domain_heldout", heldout)):
      if m.num_examples < 1:
        raise InputPathError(f"{flag} {getattr(args, flag[2:])} holds no images; the domain "
                             "filter needs labelled images to learn what belongs")
  classifier = transforms.load_teacher(args.classifier, what="--classifier")
  resolution = args.resolution or transforms.teacher_resolution(classifier, 224)
  num_classes = transforms.teacher_output_classes(classifier, resolution)
  logging.info("select_d3: %d corpus images, threshold %.2f, K=%d, %d classes -> %s",
               corpus.num_examples, args.threshold, args.per_class, num_classes, args.out)
  console.expect(corpus.num_examples, "images")
  manifest = files.run_staged(
      out=args.out, overwrite=args.overwrite,
      pipeline=pipeline or files.make_pipeline(beam_args),
      build=lambda p, tmp: build_pipeline(p, args, tmp, corpus, resolution, num_classes,
                                          in_domain, heldout),
      manifest=formats.D3Selection,
      inputs=inputs)
  logging.info("select_d3: kept %d distinct images (%d after replication) of %d above the threshold; "
               "%d empty classes -> %s", manifest.num_selected_unique,
               manifest.num_selected_total, manifest.num_above_threshold,
               len(manifest.empty_classes), args.out)
  if manifest.domain_filter:
    f = manifest.domain_filter
    logging.info("select_d3: the domain filter kept out %d corpus images (threshold %s, %.1f%% "
                 "of %d held-out images pass)", f["outside"], f["threshold"],
                 100.0 * (f["heldout_passed"] or 0.0), f["heldout_images"])
  return manifest.to_json()


if __name__ == "__main__":
  run_then_exit(files.job_main, "data_prep.select_d3", run, sys.argv[1:])
