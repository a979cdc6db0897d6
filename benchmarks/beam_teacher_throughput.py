"""Teacher logits per second through the Beam distillation job against a bare predict loop.

    .venv/bin/python benchmarks/beam_teacher_throughput.py [--teacher conv_s] [--resolution 224]
        [--images 512] [--replicas 8] [--workers 2] [--scale 4]

Same real images (sklearn's digits, ingested as source shards), same teacher (an MNv4 at full
width, random weights), D1 augmentation. Two anchors, measured in the same run:
  - bare predict: the teacher alone over the already-augmented pixels, batch by batch, in one
    process (the ceiling: teacher throughput with no data work at all);
  - bare loop: one process doing all the job's work without Beam: decode, sample and apply the
    augmentation (the job's own `AugmentTask.batches`), the teacher, record serialization,
    TFRecord writes.
Ours: `data_prep.distill`, timed end to end (pipeline start-up included), four times:
  - as named in issue 12: the DirectRunner with `--workers` worker processes (multi_processing);
  - in-process: one worker in the calling process (`--direct_num_workers=1`, in_memory, Beam's
    own default), where TensorFlow's thread pools already use every core;
  - in-process again with `--scale` times the replicas. The two in-process runs give the job's
    steady rate, (extra logits) / (extra seconds), and its fixed cost per run (teacher load and
    trace, the augmentation's trace and iterator, the pipeline's set-up): what a paper-scale job,
    whose every worker processes millions of images, runs at;
  - with the worker processes again at `--scale` times the replicas: their steady rate the same
    way (their start-up, imports included, cancels out).
The in-process runs follow the anchors in the same process, so Python imports and AutoGraph's
conversion of the augmentation code are already done (a fresh worker pays them once, in the
fixed cost of the first run); the teacher is loaded and the augmentation traced anew by each job
(a process keeps the last teacher it loaded, `transforms.load_teacher`, which a job's check and
its RunInference share, and its traced augmentation, `distill.augment_function`, which the task
instances of a multi-threaded worker share). Ratios are against the teacher alone (the issue's
goal >= 0.5x).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

from data_prep import distill, files, ingest, transforms  # noqa: E402
from mnv4_train import models  # noqa: E402
from mnv4_train.data import augment, formats, records  # noqa: E402
from mnv4_train.models import checkpoint  # noqa: E402
from data_prep.digits import write_digits_folder  # noqa: E402


def _shards_and_batches(source, teacher_path, replicas, resolution, batch_size):
  """The teacher's forward function, and per (shard, replica) the examples and their augmented
  (pixels, params) batches, made as the job makes them (`AugmentTask.batches`: one tf.data
  stream per process, fed task by task)."""
  manifest = formats.SourceShards.read(source, "source")
  teacher = checkpoint.load_model(teacher_path, what="teacher")
  forward = tf.function(lambda x: teacher(x, training=False))
  task = distill.AugmentTask(augment.RECIPES["d1"], resolution, "minus_one_to_one", batch_size,
                             len(manifest.shards))
  task.setup()
  work = []
  for shard, info in enumerate(manifest.shards):
    examples = transforms.read_shard(os.path.join(source, info.path))
    for replica in range(replicas):
      seeds = tf.stack([augment.key_seed("d1", replica, ex["id"]) for ex in examples])
      data = tf.constant([ex["encoded"] for ex in examples])
      work.append((shard, info.path, replica, examples,
                   lambda seeds=seeds, data=data: task.batches(seeds, data, data)))
  return forward, work


def bare_loop(source, teacher_path, out, replicas, resolution, batch_size):
  """The same work as the Beam job, in one process, no Beam."""
  forward, work = _shards_and_batches(source, teacher_path, replicas, resolution, batch_size)
  n = 0
  for shard, name, replica, examples, batches in work:
    with tf.io.TFRecordWriter(os.path.join(out, f"r{replica:04d}-{name}")) as writer:
      i = 0
      for pixels, params in batches():
        logits = forward(pixels).numpy()
        for j, row in enumerate(logits):
          writer.write(records.distill_record(
              example_id=examples[i + j]["id"], source_shard=shard, source_index=i + j,
              recipe="d1", replica=replica, copy=0,
              params={k: v[j] for k, v in params.items()}, logits=row))
        i += len(logits)
        n += len(logits)
  return n


def bare_predict(source, teacher_path, replicas, resolution, batch_size):
  """Seconds the teacher alone takes over the same augmented pixels (augmentation untimed)."""
  forward, work = _shards_and_batches(source, teacher_path, replicas, resolution, batch_size)
  seconds = 0.0
  for _, _, _, _, batches in work:
    batches = [pixels for pixels, _ in batches()]
    forward(batches[0])  # traced before timing
    start = time.perf_counter()
    for pixels in batches:
      forward(pixels).numpy()
    seconds += time.perf_counter() - start
  return seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--teacher", default="conv_s", choices=models.MODEL_NAMES)
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--replicas", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--scale", type=int, default=4,
                      help="replicas of the second in-process run, in multiples of --replicas")
  args = parser.parse_args()

  work = tempfile.mkdtemp(prefix="mnv4_bench_")
  try:
    write_digits_folder(os.path.join(work, "images"), limit=args.images)
    source = os.path.join(work, "source")
    ingest.run([f"--images={work}/images", f"--out={source}", "--num_shards=4"])
    teacher = os.path.join(work, "teacher.keras")
    models.build(args.teacher, num_classes=10, resolution=args.resolution).save(teacher)
    total = args.images * args.replicas

    predict = bare_predict(source, teacher, args.replicas, args.resolution, args.batch_size)
    start = time.perf_counter()
    os.makedirs(os.path.join(work, "bare"))
    n = bare_loop(source, teacher, os.path.join(work, "bare"), args.replicas, args.resolution,
                  args.batch_size)
    bare = time.perf_counter() - start
    assert n == total

    def job(replicas, flags, name):
      out = os.path.join(work, name)
      transforms.forget_teachers()  # each job loads its teacher and traces its augmentation
      distill.forget_augment_functions()  # once, as a fresh job does
      started = time.perf_counter()
      manifest = distill.run([
          "--recipe=d1", f"--source={source}", f"--teacher={teacher}", f"--out={out}",
          f"--replicas={replicas}", f"--batch_size={args.batch_size}"] + flags)
      seconds = time.perf_counter() - started
      assert manifest["num_records"] == args.images * replicas
      shutil.rmtree(out)
      return seconds

    workers = [f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"]
    beam = job(args.replicas, workers, "beam_mp")
    local = job(args.replicas, ["--direct_num_workers=1", "--direct_running_mode=in_memory"],
                "beam_local")
    more = args.replicas * args.scale
    local_more = job(more, ["--direct_num_workers=1", "--direct_running_mode=in_memory"],
                     "beam_local_more")
    beam_more = job(more, workers, "beam_mp_more")
    extra = args.images * (more - args.replicas)
    steady = extra / (local_more - local)
    fixed = local - total / steady
    steady_workers = extra / (beam_more - beam)
    teacher_rate = total / predict

    print(f"\nteacher {args.teacher} at {args.resolution}px, {args.images} images x "
          f"{args.replicas} replicas = {total} logits, batch {args.batch_size}")
    print(f"{'':<52}{'seconds':>9}{'logits/s':>10}{'vs teacher':>12}")
    rows = [("anchor: bare predict, teacher only", predict, total),
            ("anchor: bare loop, all the work, 1 process", bare, total),
            (f"Beam DirectRunner, {args.workers} worker processes", beam, total),
            ("Beam DirectRunner, in-process", local, total),
            (f"Beam DirectRunner, in-process, {more} replicas", local_more, args.images * more),
            (f"Beam DirectRunner, {args.workers} worker processes, {more} replicas", beam_more,
             args.images * more)]
    for name, seconds, count in rows:
      rate = count / seconds
      print(f"{name:<52}{seconds:>9.1f}{rate:>10.1f}{rate / teacher_rate:>11.2f}x")
    print(f"{'Beam in-process, steady rate (from the two runs)':<52}{'':>9}{steady:>10.1f}"
          f"{steady / teacher_rate:>11.2f}x")
    print(f"{f'Beam {args.workers} worker processes, steady rate (two runs)':<52}{'':>9}"
          f"{steady_workers:>10.1f}{steady_workers / teacher_rate:>11.2f}x")
    print(f"Beam in-process fixed cost per run: {fixed:.1f} s; {args.workers} worker processes "
          f"cost {beam - local:+.1f} s more than in-process at {total} logits")
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
