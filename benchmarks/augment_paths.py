"""CPU per image of the distill job's augmentation against the trainer's replay, in one process.

    .venv/bin/python benchmarks/augment_paths.py [--images 64] [--replicas 2] [--resolution 224]
        [--shards 4] [--rounds 2]

Same real images (sklearn's digits, ingested as source shards), D1 recipe, the same map function
(`distill._augment_element`: decode, sample, `augment.apply`). Three paths:
  - anchor, replay: the trainer's way, one tf.data map over every (example, replica) with the
    recorded parameters (`pipeline.replay`'s decode + `augment.apply`); its iterator is made
    once and warmed up, as a training run makes it once;
  - per-task datasets: what `data_prep.distill` did before issue 12, a new
    `from_tensor_slices(...).map(...)` dataset and iterator per (source shard, replica);
  - job (`AugmentTask.batches`): one tf.data map stream per worker, fed task by task through
    a queue (`distill.AugmentStream`).
CPU seconds are the process's (all threads; the machine may be shared, so wall seconds are
printed but the ratios use CPU). Each path's pixels are checked bit for bit against the replay.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from data_prep import distill, ingest, transforms  # noqa: E402
from data_prep.digits import write_digits_folder  # noqa: E402
from mnv4_train.data import augment, formats  # noqa: E402


def _timed(fn):
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.process_time() - cpu, time.perf_counter() - wall


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--replicas", type=int, default=2)
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--shards", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()

  work = tempfile.mkdtemp(prefix="mnv4_augpaths_")
  try:
    write_digits_folder(os.path.join(work, "images"), limit=args.images)
    source = os.path.join(work, "source")
    ingest.run([f"--images={work}/images", f"--out={source}", f"--num_shards={args.shards}"])
    manifest = formats.SourceShards.read(source, "source")
    shards = [transforms.read_shard(os.path.join(source, s.path)) for s in manifest.shards]
    recipe = augment.RECIPES["d1"]  # with its JPEG round trip (quality 95), as the recipes have it
    task = distill.AugmentTask(recipe, args.resolution, "minus_one_to_one", 32,
                               len(shards))
    task.setup()
    tasks = [{"seed": tf.stack([augment.key_seed("d1", r, ex["id"]) for ex in examples]),
              "data": tf.constant([ex["encoded"] for ex in examples])}
             for examples in shards for r in range(args.replicas)]
    total = sum(int(t["seed"].shape[0]) for t in tasks)

    def job():
      return [b for t in tasks for b in task.batches(t["seed"], t["data"], t["data"])]

    def per_task():
      out = []
      for t in tasks:
        columns = {"seed": t["seed"], "data": t["data"], "partner": t["data"]}
        ds = (tf.data.Dataset.from_tensor_slices(columns)
              .map(task._augment_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
              .batch(32))
        out.extend(ds)
      return out

    batches = job()  # warm-up: traces, the stream's iterator, every branch once
    recorded = {k: tf.constant(np.concatenate([p[k] for _, p in batches]))
                for k in batches[0][1]}
    data = tf.concat([t["data"] for t in tasks], 0)

    # The trainer makes its replay iterator once per run: made once here, warmed up, and each
    # round takes the next pass over the same elements.
    batch = math.gcd(total, 32)
    replayed = iter(tf.data.Dataset.from_tensor_slices((data, recorded)).repeat()
                    .map(lambda d, p: augment.apply(
                        augment.decode(d), p, args.resolution,
                        constants=recipe.ra_constants(args.resolution),
                        jpeg_quality=recipe.jpeg_quality), num_parallel_calls=tf.data.AUTOTUNE)
                    .batch(batch))
    for _ in range(total // batch):
      next(replayed)

    def replay():
      return [next(replayed) for _ in range(total // batch)]

    paths = {"anchor: replay, one dataset (the trainer's way)": replay,
             "per-task datasets (the job before issue 12)": per_task,
             "job: AugmentTask.batches, one stream per worker": job}
    results = {name: [] for name in paths}
    pixels = {}
    for r in range(args.rounds):
      for name, fn in (paths.items() if r % 2 == 0 else reversed(paths.items())):
        out, cpu, wall = _timed(fn)
        results[name].append((cpu, wall))
        pixels[name] = np.concatenate([np.asarray(b[0] if isinstance(b, tuple) else b)
                                       for b in out])
    anchor = pixels[next(iter(paths))]
    print(f"\nD1 at {args.resolution}px: {args.images} digits x {args.replicas} replicas = "
          f"{total} images in {len(tasks)} (shard, replica) tasks; best of {args.rounds} rounds "
          f"(CPU of this process; machine possibly shared)")
    print(f"{'path':<52}{'CPU ms/img':>11}{'wall ms/img':>12}{'x replay':>9}{'same px':>8}")
    best_anchor = min(c for c, _ in results[next(iter(paths))])
    for name, values in results.items():
      cpu = min(c for c, _ in values)
      wall = min(w for _, w in values)
      same = np.array_equal(pixels[name], anchor)
      print(f"{name:<52}{1000 * cpu / total:>11.2f}{1000 * wall / total:>12.2f}"
            f"{cpu / best_anchor:>9.2f}{str(same):>8}")
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
