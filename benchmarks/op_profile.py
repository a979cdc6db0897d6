"""Where a training step's time goes, op type by op type: our MNv4 against the Model Garden's.

    .venv/bin/python benchmarks/op_profile.py [--model conv_s] [--batch 32] [--steps 10]
        [--by_layer 12]

Both models are built, compiled and fed exactly as in `benchmarks/model_throughput.py` (`fit`
with SGD on one in-memory batch, plain TF graphs). Each is warmed up, then `--steps` steps run
under TensorFlow's profiler; the kernels' own times are read back from the profile
(`XSpace`, the profiler's protocol buffer that TensorFlow ships) and summed per op type.
Times are the kernels' wall time summed over TensorFlow's inter-op threads (two ops that
overlap both count), in ms per step: a map of where the step goes, not a throughput figure
(that is `model_throughput.py`'s). `--by_layer N` also lists our N costliest layers with their
op types.

What it answers: whether the two implementations run the same kernels, how often, and which
layers carry the step. `--stride2_rewrite` also times one exact alternative for the costliest
layer kind (a 3x3 stride-2 convolution, SAME padding, as a 2x2 stride-1 convolution over
`space_to_depth` of its input, the kernel rearranged; same outputs and gradients to float
rounding), forward and backward against the plain op. Never asserts a time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_throughput  # noqa: E402  (same builders and data as the throughput benchmark)

_LAYER = re.compile(r"(stem|stage\d_block\d+|stage\d_conv|head_conv|head)\w*?/(\w+?)(?:_\d+)?/")


def kernel_events(profile_dir):
  """(op name, op type, milliseconds) for every kernel the profile recorded on TF's threads."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=import-outside-toplevel
  paths = glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise SystemExit(f"no profile was written under {profile_dir}")
  space = xplane_pb2.XSpace()
  with open(paths[0], "rb") as f:
    space.ParseFromString(f.read())
  for plane in space.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_Compute"):
        continue
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if ":" in name and "::" not in name:  # kernels are "op/name:OpType"
          op_name, op_type = name.rsplit(":", 1)
          op_type = op_type.replace("_MklNative", "").replace("_Mkl", "")
          yield op_name, op_type, event.duration_ps / 1e9


def profile(model, ds, steps):
  """Per-op-type and per-layer ms/step over `steps` profiled training steps."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  folder = tempfile.mkdtemp(prefix="mnv4_ops_")
  tf.profiler.experimental.start(folder)
  try:
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
  finally:
    tf.profiler.experimental.stop()
  by_type, counts = collections.Counter(), collections.Counter()
  by_layer = collections.defaultdict(collections.Counter)
  for op_name, op_type, ms in kernel_events(folder):
    by_type[op_type] += ms / steps
    counts[op_type] += 1 / steps
    m = _LAYER.search(op_name)
    if m:
      by_layer[f"{m.group(1)}/{m.group(2)}"][op_type] += ms / steps
  return by_type, counts, by_layer


CONV_BN = ("Conv2D", "Conv2DBackpropFilter", "Conv2DBackpropInput", "DepthwiseConv2dNative",
           "DepthwiseConv2dNativeBackpropFilter", "DepthwiseConv2dNativeBackpropInput",
           "FusedBatchNormEx", "FusedBatchNormV3", "FusedBatchNormGradV3", "ReluGrad")


def stride2_rewrite(tf, batch, size, channels, out_channels, repeats=20, rounds=3):
  """ms per forward + backward of a 3x3 stride-2 SAME conv: plain vs space-to-depth."""
  import time  # pylint: disable=import-outside-toplevel
  x = tf.random.stateless_normal((batch, size, size, channels), seed=(0, 3))
  w = tf.Variable(tf.random.stateless_normal((3, 3, channels, out_channels), seed=(0, 4)) * 0.1)

  def plain(x):
    return tf.nn.conv2d(x, w, 2, "SAME")

  def s2d(x):  # output i reads input rows 2i, 2i+1, 2i+2: blocks i (both phases) and i+1 (phase 0)
    z = tf.pad(tf.nn.space_to_depth(x, 2), [[0, 0], [0, 1], [0, 1], [0, 0]])
    k = tf.reshape(tf.pad(w, [[0, 1], [0, 1], [0, 0], [0, 0]]),
                   (2, 2, 2, 2, channels, out_channels))  # (block y, phase y, block x, phase x)
    k = tf.reshape(tf.transpose(k, (0, 2, 1, 3, 4, 5)), (2, 2, 4 * channels, out_channels))
    return tf.nn.conv2d(z, k, 1, "VALID")

  def step(conv):
    @tf.function
    def run(x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = conv(x)
        loss = tf.reduce_sum(y * y)
      return y, tape.gradient(loss, [x, w])
    return run

  a, b = step(plain), step(s2d)
  (ya, ga), (yb, gb) = a(x), b(x)
  error = max(float(tf.reduce_max(tf.abs(u - v)) / tf.reduce_max(tf.abs(u)))
              for u, v in ((ya, yb), (ga[0], gb[0]), (ga[1], gb[1])))
  best = {"plain": float("inf"), "space_to_depth": float("inf")}
  for _ in range(rounds):
    for name, fn in (("plain", a), ("space_to_depth", b)):
      start = time.perf_counter()
      for _ in range(repeats):
        fn(x)[0].numpy()
      best[name] = min(best[name], (time.perf_counter() - start) / repeats * 1e3)
  return best, error


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="conv_s", choices=sorted(model_throughput.ANCHOR_IDS))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--rows", type=int, default=16, help="op types to list")
  parser.add_argument("--by_layer", type=int, default=12, help="our costliest layers to list")
  parser.add_argument("--stride2_rewrite", action="store_true",
                      help="also time the space-to-depth form of Conv-S's stage-0 3x3 s2 conv")
  args = parser.parse_args()

  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.threading.set_intra_op_parallelism_threads(args.threads)
  tf.config.threading.set_inter_op_parallelism_threads(args.threads)
  # pylint: disable-next=protected-access
  ds = model_throughput._data(tf, args.batch, args.resolution, 1000)
  results = {}
  for name, build in (("ours", model_throughput.build_ours),
                      ("anchor", model_throughput.build_anchor)):
    model = build(args.model, args.resolution, 1000)
    model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # traced and warm before profiling
    results[name] = profile(model, ds, args.steps)
    print(f"profiled {name}: {args.steps} steps", flush=True)

  (ours, ours_n, layers), (anchor, anchor_n, _) = results["ours"], results["anchor"]
  print(f"\n{args.model}, batch {args.batch}, {args.resolution}px, {args.threads} threads: kernel "
        "ms per training step (summed over threads), ours vs the Model Garden's")
  print(f"{'op type':<38}{'ours':>9}{'calls':>7}{'anchor':>9}{'calls':>7}")
  for op_type, _ in (ours + anchor).most_common(args.rows):
    print(f"{op_type:<38}{ours[op_type]:>9.1f}{ours_n[op_type]:>7.0f}"
          f"{anchor[op_type]:>9.1f}{anchor_n[op_type]:>7.0f}")
  total_o, total_a = sum(ours.values()), sum(anchor.values())
  print(f"{'all kernels':<38}{total_o:>9.1f}{sum(ours_n.values()):>7.0f}"
        f"{total_a:>9.1f}{sum(anchor_n.values()):>7.0f}")
  share_o = sum(ours[t] for t in CONV_BN) / total_o
  share_a = sum(anchor[t] for t in CONV_BN) / total_a
  print(f"share in convolution and BatchNorm kernels (and ReluGrad): ours {share_o:.0%}, "
        f"anchor {share_a:.0%}")
  same = sorted(t for t in CONV_BN if round(ours_n[t]) != round(anchor_n[t]))
  print("same convolution/BatchNorm kernels, same number of calls: "
        + ("yes" if not same else "no (" + ", ".join(same) + ")"))
  if args.by_layer:
    print(f"\nour {args.by_layer} costliest layers (ms per step, op types)")
    ranked = sorted(layers.items(), key=lambda kv: -sum(kv[1].values()))[:args.by_layer]
    for layer, types in ranked:
      parts = ", ".join(f"{t} {ms:.1f}" for t, ms in types.most_common(3))
      print(f"{sum(types.values()):7.1f}  {layer:<26}{parts}")
  if args.stride2_rewrite:
    size = args.resolution // 2
    best, error = stride2_rewrite(tf, args.batch, size, 32, 32)
    print(f"\n3x3 stride-2 conv 32->32 on {args.batch}x{size}x{size}, forward + backward, "
          f"best of 3 rounds: plain {best['plain']:.1f} ms, space_to_depth {best['space_to_depth']:.1f} ms "
          f"({best['plain'] / best['space_to_depth']:.2f}x); largest relative difference of "
          f"outputs and gradients {error:.1e}")


if __name__ == "__main__":
  main()
