"""Batch-1 LiteRT latency of our MNv4 exports, in the paper's method, against the Model Garden's
MNv4-Conv-S exported the same way and measured in the same run.

    .venv/bin/python benchmarks/tflite_latency.py                 # conv_s + hybrid_m, 3 formats
    .venv/bin/python benchmarks/tflite_latency.py --all           # every variant
    .venv/bin/python benchmarks/tflite_latency.py --models conv_m --formats tflite_int8

Method (the paper's appendix B): each model is converted to TFLite float32, float16 and int8
(full-integer post-training quantization) by `mnv4_train.export.tflite_model`, the one set of
converter settings, from a batch-1 SavedModel at the variant's canonical resolution. Each is run
by the LiteRT interpreter with XNNPACK (its default CPU delegate, int8 included) on `--threads`
threads, the process pinned to as many cores. Per model and format: warm-up, then `--repeats`
repeats of `--runs` back-to-back invocations; the figure is the median of the repeat means (the
paper: 1000 runs x 5 repeats; the default here is 200 x 5 to keep the run near five minutes).
Repeats alternate between the models (ABBA order), so the anchor and ours see the same machine.

Anchor: the official implementation, TensorFlow Model Garden `MobileNet(model_id=
"MobileNetV4ConvSmall")` + `ClassificationModel` (tf_keras), at 224 px, exported and converted
exactly as ours. Weights are random (latency does not depend on their values); int8 is calibrated
on a few random images (the ranges set the int8 scales, not the work). The ratio is ours /
anchor in the same format: < 1 means ours is faster. Never asserts a time.

For reference, measured on this kind of machine with 2 threads: the Model Garden's Conv-S in
LiteRT ran 2.64 ms float32 and 1.01 ms int8; timm's Conv-S through ONNX Runtime 2.24 ms float32.
Converted files are kept in `--workdir` (default: a temporary folder) and reused when present.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FORMATS = ("tflite_float32", "tflite_float16", "tflite_int8")
DEFAULT_MODELS = ("conv_s", "hybrid_m")
ANCHOR = "anchor: Model Garden conv_s"
WARMUP_RUNS = 20
CALIBRATION_IMAGES = 8


def _anchor_saved_model(path: str, resolution: int) -> None:
  import tensorflow as tf
  import tf_keras
  from official.vision.modeling import classification_model
  from official.vision.modeling.backbones import mobilenet
  specs = tf_keras.layers.InputSpec(shape=[1, resolution, resolution, 3])
  backbone = mobilenet.MobileNet(model_id="MobileNetV4ConvSmall", input_specs=specs)
  model = classification_model.ClassificationModel(backbone, num_classes=1000,
                                                   input_specs=specs)
  serve = tf.function(lambda images: model(images, training=False)).get_concrete_function(
      tf.TensorSpec((1, resolution, resolution, 3), tf.float32, name="images"))
  tf.saved_model.save(model, path, signatures={"serving_default": serve})


def _our_saved_model(path: str, name: str, resolution: int) -> None:
  from mnv4_train import export, models
  model = models.build(name, num_classes=1000, resolution=resolution)
  export.write_saved_model(model, path, resolution=resolution, batch=1)


def convert(key: str, name: str, resolution: int, formats, workdir: str) -> dict[str, str]:
  """TFLite files of one model in `formats` (reused from `workdir` when already there)."""
  import numpy as np

  from mnv4_train import export
  folder = os.path.join(workdir, key)
  paths = {fmt: os.path.join(folder, f"{fmt}.tflite") for fmt in formats}
  missing = [fmt for fmt, path in paths.items() if not os.path.exists(path)]
  if missing:
    saved_model = os.path.join(folder, "saved_model")
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(saved_model):
      if key == "anchor":
        _anchor_saved_model(saved_model, resolution)
      else:
        _our_saved_model(saved_model, name, resolution)
    images = np.random.default_rng(0).uniform(
        -1, 1, (CALIBRATION_IMAGES, resolution, resolution, 3)).astype("float32")
    for fmt in missing:
      started = time.perf_counter()
      content = export.tflite_model(saved_model, fmt, representative=images)
      with open(paths[fmt] + ".tmp", "wb") as f:
        f.write(content)
      os.replace(paths[fmt] + ".tmp", paths[fmt])
      print(f"  converted {key} {fmt} in {time.perf_counter() - started:.0f} s", flush=True)
  return paths


def _repeat_mean(interpreter, runs: int) -> float:
  invoke = interpreter.invoke
  started = time.perf_counter()
  for _ in range(runs):
    invoke()
  return (time.perf_counter() - started) / runs


def main(argv=None) -> int:
  from mnv4_train import models
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                      help="comma-separated variants (default: conv_s,hybrid_m)")
  parser.add_argument("--all", action="store_true", help="every variant")
  parser.add_argument("--formats", default=",".join(FORMATS))
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--runs", type=int, default=200, help="invocations per repeat")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--workdir", default=None, help="keep converted models here")
  args = parser.parse_args(argv)
  names = list(models.MODEL_NAMES) if args.all else [n.strip() for n in args.models.split(",")]
  formats = [f.strip() for f in args.formats.split(",")]
  bad = [n for n in names if n not in models.MODEL_NAMES] + [f for f in formats
                                                             if f not in FORMATS]
  if bad:
    parser.error(f"unknown {', '.join(bad)}; models: {', '.join(models.MODEL_NAMES)}; "
                 f"formats: {', '.join(FORMATS)}")

  # Pin the process to as many cores as threads: the paper sets CPU affinity for its runs.
  cores = sorted(os.sched_getaffinity(0))[:args.threads]
  os.sched_setaffinity(0, cores)
  workdir = args.workdir or tempfile.mkdtemp(prefix="tflite_latency_")
  print(f"converting into {workdir} (pinned to cores {cores})", flush=True)
  contenders = {ANCHOR: convert("anchor", "conv_s", 224, formats, workdir)}
  for name in names:
    contenders[name] = convert(name, name, models.canonical_resolution(name), formats, workdir)

  import numpy as np

  from mnv4_train import export
  interpreters = {}
  for key, paths in contenders.items():
    for fmt, path in paths.items():
      with open(path, "rb") as f:
        interpreter = export.make_interpreter(f.read(), num_threads=args.threads)
      inp = interpreter.get_input_details()[0]
      interpreter.set_tensor(inp["index"], np.random.default_rng(1).uniform(
          -1, 1, inp["shape"]).astype(inp["dtype"]))
      _repeat_mean(interpreter, WARMUP_RUNS)
      interpreters[key, fmt] = interpreter

  order = list(interpreters)
  means = {k: [] for k in order}
  for r in range(args.repeats):
    for k in (order if r % 2 == 0 else order[::-1]):  # ABBA: no model always runs first
      means[k].append(_repeat_mean(interpreters[k], args.runs))
    print(f"  repeat {r + 1}/{args.repeats} done", flush=True)
  latency = {k: statistics.median(v) * 1e3 for k, v in means.items()}

  print(f"\nbatch-1 LiteRT latency, XNNPACK, {args.threads} threads pinned, median of "
        f"{args.repeats} repeat means x {args.runs} runs; ratio = ours / anchor (same format)")
  print(f"{'model':<28}{'res':>5}  " + "".join(f"{f.replace('tflite_', ''):>10}{'ratio':>7}"
                                              for f in formats) + "   MB (" + ", ".join(
                                                  f.replace("tflite_", "") for f in formats) + ")")
  for key, paths in contenders.items():
    res = 224 if key == ANCHOR else models.canonical_resolution(key)
    row = f"{key:<28}{res:>5}  "
    for fmt in formats:
      ms = latency[key, fmt]
      row += f"{ms:>8.2f}ms{ms / latency[ANCHOR, fmt]:>7.2f}"
    sizes = ", ".join(f"{os.path.getsize(paths[f]) / 2**20:.1f}" for f in formats)
    print(row + f"   {sizes}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
