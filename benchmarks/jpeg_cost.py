"""What the recipes' JPEG round trip costs: per image in the Beam job's augmentation, and in replay.

    .venv/bin/python benchmarks/jpeg_cost.py [--images 128] [--resolution 224] [--rounds 4]

Data: 500x375 JPEGs cut from scikit-learn's two photographs (as `replay_throughput.py`),
ingested as source shards; D1 records built twice by `data_prep.distill` with a small
random-weight teacher, with `--jpeg_quality=95` (the recipes' default) and with
`--jpeg_quality=0`.

Anchor: the same work without the JPEG step, measured in the same run, rounds alternating.
  - Beam job: the job's own augmentation map (`distill.AugmentTask`, traced once as in a worker:
    decode, sample, `augment.apply`, scale for the teacher) over every image of every shard, in
    tf.data, as a task runs it; the teacher and the writes are not timed.
  - replay: `pipeline.train_dataset` over each D1 folder (decode, replay, batch), as training.
  - the step alone: `augment.jpeg_round_trip` on the images' central crops at the resolution,
    in a tf.data map on one thread, against the same map at quality 0 (no step).
Figures are ms per image (best and median round); the JPEG step's cost is the difference. On
a shared machine the best rounds are the steadier figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

from replay_throughput import photo_source_and_teacher, replay_dataset  # noqa: E402  (benchmarks/)
from data_prep import distill, transforms  # noqa: E402
from mnv4_train.data import augment, formats  # noqa: E402


def augment_stream(source, quality, resolution):
  """The job's augmentation of every source image (replica 0), as one tf.data stream."""
  manifest = formats.SourceShards.read(source, "source")
  recipe = dataclasses.replace(augment.RECIPES["d1"], jpeg_quality=quality)
  task = distill.AugmentTask(recipe, resolution, "minus_one_to_one", 32, len(manifest.shards))
  task.setup()
  examples = [ex for info in manifest.shards
              for ex in transforms.read_shard(os.path.join(source, info.path))]
  inputs = {"seed": tf.stack([augment.key_seed("d1", 0, ex["id"]) for ex in examples]),
            "data": [ex["encoded"] for ex in examples],
            "partner": [ex["encoded"] for ex in examples]}
  ds = (tf.data.Dataset.from_tensor_slices(inputs)
        .map(task._augment_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)  # pylint: disable=protected-access
        .batch(32))
  return ds, len(examples)


def time_augment(ds, count):
  start = time.perf_counter()
  for pixels, _ in ds:
    pixels.numpy()
  return 1000 * (time.perf_counter() - start) / count


def round_trip_stream(source, quality, resolution):
  """The JPEG step alone over the central crops of the source images, one thread."""
  manifest = formats.SourceShards.read(source, "source")
  crops = [(augment.center_crop(augment.decode(ex["encoded"]), resolution) + 1.0) * 127.5
           for info in manifest.shards
           for ex in transforms.read_shard(os.path.join(source, info.path))]
  ds = tf.data.Dataset.from_tensor_slices(tf.stack(crops)).cache()
  return ds.map(lambda image: augment.jpeg_round_trip(image, quality), num_parallel_calls=1)


def time_round_trip(ds):
  count = 0
  start = time.perf_counter()
  for _ in ds:
    count += 1
  return 1000 * (time.perf_counter() - start) / count


def time_replay(ds, batches, batch):
  # A fresh iterator per round: one kept across rounds fills its prefetch buffer while the
  # other pipelines are timed, and would then look faster than it is.
  iterator = iter(ds)
  next(iterator)  # start-up (reading the shards) untimed
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)["image"].numpy()
  return 1000 * (time.perf_counter() - start) / (batches * batch)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=128)
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--quality", type=int, default=augment.JPEG_QUALITY)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=16, help="timed replay batches per round")
  parser.add_argument("--rounds", type=int, default=6)
  args = parser.parse_args()

  work = tempfile.mkdtemp(prefix="mnv4_jpeg_")
  try:
    source, teacher = photo_source_and_teacher(work, args.images, args.resolution)
    qualities = (0, args.quality)
    streams, replays, alone = {}, {}, {}
    for q in qualities:
      out = os.path.join(work, f"d1_q{q}")
      distill.run(["--recipe=d1", f"--source={source}", f"--teacher={teacher}", f"--out={out}",
                   "--replicas=2", "--batch_size=32", f"--jpeg_quality={q}"])
      streams[q] = augment_stream(source, q, args.resolution)
      replays[q] = replay_dataset(out, args.resolution, args.batch)
      time_augment(*streams[q])  # warm
      alone[q] = round_trip_stream(source, q, args.resolution)
      time_round_trip(alone[q])  # fills the cache
    results = {(kind, q): [] for kind in ("beam", "replay", "alone") for q in qualities}
    for r in range(args.rounds):
      for q in (qualities if r % 2 == 0 else qualities[::-1]):
        results["beam", q].append(time_augment(*streams[q]))
        results["replay", q].append(time_replay(replays[q], args.batches, args.batch))
        results["alone", q].append(time_round_trip(alone[q]))
      print(f"round {r + 1}: " + ", ".join(f"{k} q{q} {v[-1]:.2f} ms"
                                           for (k, q), v in results.items()), flush=True)

    print(f"\n{args.images} JPEGs of 500x375 -> {args.resolution}px, {args.rounds} rounds, "
          f"{os.cpu_count()} cores; ms per image")
    print(f"{'':<52}{'best':>8}{'median':>8}")
    for kind, what in (("beam", "Beam job augmentation (AugmentTask map)"),
                       ("replay", "trainer replay (train_dataset)"),
                       ("alone", "the round trip alone (1 thread)")):
      for q in qualities:
        name = f"{what}, " + (f"JPEG q{q}" if q else "no JPEG (anchor)")
        values = results[kind, q]
        print(f"{name:<52}{min(values):>8.2f}{statistics.median(values):>8.2f}")
      for label, stat in (("best", min), ("median", statistics.median)):
        base = stat(results[kind, 0])
        cost = stat(results[kind, args.quality]) - base
        print(f"  JPEG step ({label} rounds): {cost:+.2f} ms/image, {cost / base:+.1%}")
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
