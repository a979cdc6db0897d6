"""Examples/s of the trainer's replaying input pipeline against an online augmentation pipeline.

    .venv/bin/python benchmarks/replay_throughput.py [--images 256] [--resolution 224]
        [--batches 24] [--rounds 6]

Data: 500x375 JPEGs cut from the two real photographs scikit-learn ships (random windows,
quality 90), ingested as source shards; D1 records built from them by `data_prep.distill` with
a small random-weight teacher (its cost is not measured here).

Anchor (online): the same source shards read with tf.data, decoded, and augmented the usual way
with the stateful RNG: the Model Garden's inception crop (`preprocess_ops.random_crop_image`),
its `RandAugment(num_layers=2, magnitude=9).distort`, a random flip, resized to the resolution,
scaled to [-1, 1], batched. Ours (replay): `mnv4_train.data.pipeline.train_dataset` over the D1
records: read the records and the source shards, attach each record's image, decode, replay the
recorded crop + RandAugment + flip with `augment.apply`, batch; twice: D1 built without the
JPEG step (the same work as the anchor: the like-for-like ratio) and D1 as the recipe builds it
(JPEG round trip at quality 95, which replay repeats). All use tf.data's parallel map (AUTOTUNE)
and prefetching; each round makes a fresh iterator per pipeline, takes 4 batches untimed, then
times --batches (only one pipeline lives at a time); rounds alternate A B C C B A ...;
examples/s is the best and the median round.
Cost of replay = online / replay throughput - 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from official.vision.ops import augment as mg_augment  # noqa: E402
from official.vision.ops import preprocess_ops  # noqa: E402
from sklearn.datasets import load_sample_images  # noqa: E402

from data_prep import distill, ingest  # noqa: E402
from mnv4_train import models  # noqa: E402
from mnv4_train.data import augment, pipeline, records  # noqa: E402


def write_photo_folder(root, count, seed=0):
  """`count` 500x375 JPEG windows of sklearn's two photographs, in two classes."""
  rng = np.random.default_rng(seed)
  photos = load_sample_images().images  # 427 x 640
  for i in range(count):
    k = i % 2
    photo = photos[k]
    y = rng.integers(0, photo.shape[0] - 375 + 1)
    x = rng.integers(0, photo.shape[1] - 500 + 1)
    window = photo[y:y + 375, x:x + 500]
    os.makedirs(os.path.join(root, str(k)), exist_ok=True)
    with open(os.path.join(root, str(k), f"{i:05d}.jpg"), "wb") as f:
      f.write(tf.io.encode_jpeg(window, quality=90).numpy())


def photo_source_and_teacher(work, images, resolution):
  """(source shards of `images` photo windows, a random-weight Conv-S x0.25 teacher .keras),
  both under `work`: what the replay benchmarks build their D1 records from."""
  write_photo_folder(os.path.join(work, "images"), images)
  source = os.path.join(work, "source")
  ingest.run([f"--images={work}/images", f"--out={source}", "--num_shards=4"])
  teacher = os.path.join(work, "teacher.keras")
  models.build("conv_s", num_classes=2, width=0.25, resolution=resolution).save(teacher)
  return source, teacher


def online_dataset(source, resolution, batch):
  """The anchor: decode + MG inception crop + MG RandAugment(2, 9) + flip, stateful RNG."""
  files = sorted(tf.io.gfile.glob(os.path.join(source, "shard-*.tfrecord")))
  randaug = mg_augment.RandAugment(num_layers=2, magnitude=9.0)

  def prepare(serialized):
    ex = records.parse_source(serialized)
    image = tf.io.decode_image(ex["image/encoded"], channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    image = preprocess_ops.random_crop_image(image)
    image = tf.image.resize(image, [resolution, resolution], method="bilinear")
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    image = tf.image.random_flip_left_right(image)
    image = randaug.distort(image)
    return {"image": tf.cast(image, tf.float32) / 127.5 - 1.0,
            "label": tf.cast(ex["image/label"], tf.int32)}
  return (tf.data.TFRecordDataset(files).repeat()
          .map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
          .batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def replay_dataset(records_dir, resolution, batch):
  dataset = pipeline.open_dataset(records_dir, "d1")
  return pipeline.train_dataset([dataset], resolution=resolution, host_batch=batch,
                                num_classes=dataset.num_classes)


def timed(dataset, batches, batch, lead_in=4):
  """Examples/s of `batches` batches from a fresh iterator, after `lead_in` untimed batches
  (start-up). One iterator at a time: a live iterator of another pipeline would fill its
  read-ahead buffers while this one is timed, taking CPU from it, then hand out buffered
  batches at no cost when its own turn comes."""
  iterator = iter(dataset)
  for _ in range(lead_in):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)["image"].numpy()
  seconds = time.perf_counter() - start
  del iterator
  return batches * batch / seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=24, help="timed batches per round")
  parser.add_argument("--rounds", type=int, default=6)
  args = parser.parse_args()

  work = tempfile.mkdtemp(prefix="mnv4_replay_")
  try:
    source, teacher = photo_source_and_teacher(work, args.images, args.resolution)
    # D1 as the online anchor augments (no JPEG step: the same work), and D1 as the recipe
    # records it (JPEG round trip at quality 95 before the teacher, replayed by the trainer).
    built = {}
    for quality in (0, augment.JPEG_QUALITY):
      built[quality] = os.path.join(work, f"d1_q{quality}")
      distill.run(["--recipe=d1", f"--source={source}", f"--teacher={teacher}",
                   f"--out={built[quality]}", "--replicas=2", "--batch_size=32",
                   f"--jpeg_quality={quality}"])

    names = {"online": "anchor: online, MG crop + MG RandAugment(2, 9) + flip",
             "replay": "replay: D1 records, recorded crop + RandAugment + flip",
             "replay_jpeg": f"replay: D1 records + the recipe's JPEG q{augment.JPEG_QUALITY}"}
    datasets = {"online": online_dataset(source, args.resolution, args.batch),
                "replay": replay_dataset(built[0], args.resolution, args.batch),
                "replay_jpeg": replay_dataset(built[augment.JPEG_QUALITY], args.resolution,
                                              args.batch)}
    results = {name: [] for name in names}
    for r in range(args.rounds):
      order = list(names) if r % 2 == 0 else list(reversed(names))
      for name in order:
        results[name].append(timed(datasets[name], args.batches, args.batch))
      print(f"round {r + 1}: " + ", ".join(f"{name} {results[name][-1]:.1f}" for name in names)
            + " examples/s", flush=True)

    print(f"\n{args.images} JPEGs of 500x375 -> {args.resolution}px, batch {args.batch}, "
          f"{args.rounds} rounds of {args.batches} batches, {os.cpu_count()} cores")
    print(f"{'pipeline':<62}{'best':>8}{'median':>8}{'/online':>8}")
    online = statistics.median(results["online"])
    for name, label in names.items():
      values = results[name]
      print(f"{label:<62}{max(values):>8.1f}{statistics.median(values):>8.1f}"
            f"{statistics.median(values) / online:>8.2f}")
    for name in ("replay", "replay_jpeg"):
      best = max(results["online"]) / max(results[name])
      median = online / statistics.median(results[name])
      print(f"{name} costs {best - 1:+.1%} (best rounds), {median - 1:+.1%} (median rounds) "
            f"against online; throughput ratio {1 / median:.2f} (median)")
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
