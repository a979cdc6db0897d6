"""Training and inference throughput of our MNv4 against the Model Garden's, in the same run.

    .venv/bin/python benchmarks/model_throughput.py [--model conv_s] [--batch 32] [--threads 2]

Anchor: the official implementation, TensorFlow Model Garden `MobileNet(model_id=
"MobileNetV4ConvSmall")` + `ClassificationModel` (tf_keras), trained and run exactly as ours:
`fit` with plain SGD on the same in-memory batch, `predict` in inference mode, plain TF graphs
(no XLA: on this CPU, jit_compile is far slower for depthwise-heavy models).

This machine's throughput is bimodal (whole rounds run at about half speed when the host
throttles), so many short rounds alternate between the two models (ABBA order), and three
figures are reported per model: the best round and the median round in images per wall-clock
second, and images per CPU-second of the process (which throttling does not change). The ratio
is ours / anchor: > 1 means we are faster. Never asserts a time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ANCHOR_IDS = {
    "conv_s": "MobileNetV4ConvSmall",
    "conv_m": "MobileNetV4ConvMedium",
    "conv_l": "MobileNetV4ConvLarge",
    "hybrid_m": "MobileNetV4HybridMedium",
    "hybrid_l": "MobileNetV4HybridLarge",
}


def _data(tf, batch, resolution, num_classes):
  images = tf.random.stateless_uniform((batch, resolution, resolution, 3), seed=(0, 1),
                                       minval=-1.0, maxval=1.0)
  labels = tf.random.stateless_uniform((batch,), seed=(0, 2), maxval=num_classes, dtype=tf.int32)
  return tf.data.Dataset.from_tensors((images, labels)).repeat()


def build_ours(name, resolution, num_classes):
  import keras
  from mnv4_train import models
  model = models.build(name, num_classes=num_classes, resolution=resolution)
  model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=False)
  return model


def build_anchor(name, resolution, num_classes):
  import tf_keras
  from official.vision.modeling import classification_model
  from official.vision.modeling.backbones import mobilenet
  specs = tf_keras.layers.InputSpec(shape=[None, resolution, resolution, 3])
  backbone = mobilenet.MobileNet(model_id=ANCHOR_IDS[name], input_specs=specs)
  model = classification_model.ClassificationModel(backbone, num_classes=num_classes,
                                                   input_specs=specs)
  model.compile(optimizer=tf_keras.optimizers.SGD(0.01, momentum=0.9),
                loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=False)
  return model


def _timed(fn):
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - wall, time.process_time() - cpu


def time_train(model, ds, steps):
  return _timed(lambda: model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0))


def time_predict(model, ds, steps):
  images = ds.map(lambda x, y: x)
  return _timed(lambda: model.predict(images, steps=steps, verbose=0))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="conv_s", choices=sorted(ANCHOR_IDS))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--steps", type=int, default=4, help="batches per timed round")
  parser.add_argument("--rounds", type=int, default=8)
  args = parser.parse_args()

  import tensorflow as tf
  tf.config.threading.set_intra_op_parallelism_threads(args.threads)
  tf.config.threading.set_inter_op_parallelism_threads(args.threads)
  ds = _data(tf, args.batch, args.resolution, 1000)
  contenders = {
      "ours (Keras 3)": build_ours(args.model, args.resolution, 1000),
      "Model Garden (anchor)": build_anchor(args.model, args.resolution, 1000),
  }
  for model in contenders.values():  # trace and warm up both before any timing
    time_train(model, ds, 2)
    time_predict(model, ds, 2)

  names = list(contenders)
  results = {}
  for task, fn in (("train", time_train), ("inference", time_predict)):
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(args.rounds):
      order = names if r % 2 == 0 else names[::-1]  # ABBA: neither model always goes first
      for name in order:
        seconds, cpu_seconds = fn(contenders[name], ds, args.steps)
        images = args.steps * args.batch
        wall[name].append(images / seconds)
        cpu[name].append(images / cpu_seconds)
        print(f"  {task} round {r + 1}/{args.rounds} {name}: {wall[name][-1]:.1f} images/s, "
              f"{cpu[name][-1]:.1f} images/CPU-s", flush=True)
    results[task] = {name: (max(wall[name]), statistics.median(wall[name]),
                            statistics.median(cpu[name])) for name in names}

  ours, anchor = names
  print(f"\n{args.model}, batch {args.batch}, {args.resolution}px, {args.threads} threads, "
        f"{args.rounds} rounds x {args.steps} batches; ratio = ours / anchor")
  print(f"{'task':<11}{'figure':<22}{'ours':>10}{'anchor':>10}{'ratio':>8}")
  for task, r in results.items():
    for i, figure in enumerate(("best images/s", "median images/s", "images/CPU-second")):
      print(f"{task:<11}{figure:<22}{r[ours][i]:>10.1f}{r[anchor][i]:>10.1f}"
            f"{r[ours][i] / r[anchor][i]:>8.2f}")


if __name__ == "__main__":
  main()
