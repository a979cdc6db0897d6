"""Export a trained MNv4 for deployment: SavedModel and TFLite/LiteRT (float32, float16, int8).

    python -m mnv4_train.export --model conv_s --checkpoint runs/x/model.keras \\
        --out exports/x [--format all] [--representative 'sources/in/train-*.tfrecord']

The last stage of the flow (README.md, "Export: SavedModel and TFLite/LiteRT"): it takes a `.keras` checkpoint
(Keras 3 `model.save`), checks that it holds the variant `--model` names, and writes under `--out`:

  saved_model/           TensorFlow SavedModel, signature `serve` (= serving_default), any batch
  model_float32.tflite   batch 1; XNNPACK runs it as is
  model_float16.tflite   float16 weights (the paper's mobile-GPU format)
  model_int8.tflite      full-integer post-training quantization (the paper's CPU/DSP/EdgeTPU
                         format), calibrated on `--num_calibration` images of `--representative`
  export_report.json     sizes and the numeric checks below

Inputs. Every export takes what the Keras model takes: float32 NHWC images at the export
resolution, values in [-1, 1] (pixel / 127.5 - 1), the project's input convention; outputs are
logits. The int8 model keeps float32 input and output (quantize / dequantize ops at its ends),
so it is a drop-in replacement. The representative set is either a folder of images
(`class/xxx.jpg|png`) or a glob of TFRecord files of tf.train.Example with an `image/encoded`
bytes feature (the source shards); each image is decoded, resized to the export resolution
(bilinear, antialiased, no crop) and normalised to [-1, 1]. Folder images are taken in a fixed
shuffled order, records in file order.

Numeric checks, run before anything is moved into `--out` (a failed float check exits 1 and
leaves nothing behind): the SavedModel and the float32 TFLite model against the Keras outputs
(max abs difference), float16 likewise; int8 top-1 agreement with the float32 Keras model on
`--num_check` held-out images (the representative images after the calibration ones), plus its
max abs difference. Without `--representative` the float checks use fixed random inputs.

Outputs are written to a temporary folder inside `--out` and renamed into place when all
conversions and checks are done, so a file that exists is complete. `--checkpoint`,
`--representative` and `--out` may be `gs://` paths (through `tf.io.gfile`): for a bucket
`--out` the conversions run in a local temporary folder and the checked files are copied up,
`export_report.json` last (a bucket export is finished when it has its report; its claim file
is the weaker one `mnv4_train.ownership` describes for buckets).

The converter and the LiteRT interpreter log from C++ ("Created TensorFlow Lite XNNPACK
delegate", "Ignored output_format", ...); the command line keeps those off the console and
passes through what looks like an error (`--verbose` shows everything).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Iterable, Sequence

from mnv4_train import cli, ownership
from mnv4_train.errors import (ArgumentParser, ConfigError, InputPathError, exit_on_user_error,
                               first_line, run_then_exit)

FORMATS = ("saved_model", "tflite_float32", "tflite_float16", "tflite_int8")
TFLITE_FILES = {"tflite_float32": "model_float32.tflite", "tflite_float16": "model_float16.tflite",
                "tflite_int8": "model_int8.tflite"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Float exports must reproduce the Keras logits; beyond this (relative to the logits' scale)
# the export is broken, not merely rounded.
FLOAT32_TOLERANCE = 1e-3
NUM_RANDOM_CHECK_IMAGES = 8


def parse_formats(text: str) -> tuple[str, ...]:
  """`all` or a comma-separated subset of FORMATS, in FORMATS order."""
  names = [f.strip() for f in text.split(",") if f.strip()]
  if names == ["all"]:
    return FORMATS
  unknown = [f for f in names if f not in FORMATS]
  if unknown or not names:
    raise ConfigError(f"unknown --format {', '.join(map(repr, unknown)) or repr(text)}; choose "
                      f"from {', '.join(FORMATS)} (comma-separated) or all")
  return tuple(f for f in FORMATS if f in names)


# ---------------------------------------------------------------------------------------------
# Paths: local ones through `os` (renames are atomic there), `gs://` ones through tf.io.gfile


def _gfile():
  import tensorflow as tf
  return tf.io.gfile


def _exists(path: str) -> bool:
  return _gfile().exists(path) if ownership.is_url(path) else os.path.exists(path)


def _isdir(path: str) -> bool:
  return _gfile().isdir(path) if ownership.is_url(path) else os.path.isdir(path)


def _isfile(path: str) -> bool:
  if ownership.is_url(path):
    return _gfile().exists(path) and not _gfile().isdir(path)
  return os.path.isfile(path)


def _listdir(path: str) -> list[str]:
  if ownership.is_url(path):
    return [name.rstrip("/") for name in _gfile().listdir(path)]
  return os.listdir(path)


def _walk(folder: str):
  return _gfile().walk(folder) if ownership.is_url(folder) else os.walk(folder)


def _upload(src: str, dst: str) -> None:
  """Copies a local file or folder `src` to the bucket path `dst`, replacing what is there."""
  gfile = _gfile()
  if gfile.isdir(dst):
    gfile.rmtree(dst)
  if not os.path.isdir(src):
    gfile.copy(src, dst, overwrite=True)
    return
  for folder, _, names in os.walk(src):
    rel = os.path.relpath(folder, src)
    target = dst if rel == "." else f"{dst.rstrip('/')}/{rel}"
    gfile.makedirs(target)
    for name in names:
      gfile.copy(os.path.join(folder, name), f"{target}/{name}", overwrite=True)


# ---------------------------------------------------------------------------------------------
# Representative images


def _decode(encoded, resolution: int):
  import tensorflow as tf
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image = tf.image.resize(image, (resolution, resolution), antialias=True)
  image.set_shape((resolution, resolution, 3))
  return image / 127.5 - 1.0


def _folder_images(folder: str) -> list[str]:
  import numpy as np
  files = sorted(os.path.join(root, name) for root, _, names in _walk(folder)
                 for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise InputPathError(f"--representative {folder} has no .jpg/.png images; lay it out as "
                         "class/xxx.jpg")
  # Sorted paths are grouped by class; a fixed shuffle mixes the classes into every slice.
  return [files[i] for i in np.random.default_rng(0).permutation(len(files))]


def representative_dataset(source: str, *, resolution: int):
  """A tf.data.Dataset of single images in [-1, 1] from an image folder or a TFRecord glob."""
  import tensorflow as tf
  if _isdir(source):
    files = tf.data.Dataset.from_tensor_slices(_folder_images(source))
    return files.map(lambda path: _decode(tf.io.read_file(path), resolution))
  shards = sorted(tf.io.gfile.glob(source))
  if not shards:
    raise InputPathError(f"--representative {source} is neither a folder nor a glob matching "
                         "TFRecord files")
  feature = {"image/encoded": tf.io.FixedLenFeature([], tf.string)}
  records = tf.data.TFRecordDataset(shards)
  return records.map(
      lambda r: _decode(tf.io.parse_single_example(r, feature)["image/encoded"], resolution))


def load_images(source: str, *, resolution: int, count: int):
  """Up to `count` representative images as one float32 array [N, res, res, 3]."""
  import numpy as np
  import tensorflow as tf
  dataset = representative_dataset(source, resolution=resolution).take(count).batch(64)
  try:
    batches = [b.numpy() for b in dataset]
  except tf.errors.OpError as e:
    reason = first_line(e.message or "", type(e).__name__, limit=200)
    raise InputPathError(f"--representative {source}: cannot read an image ({reason}); records "
                         "need an 'image/encoded' bytes feature holding a JPEG or PNG") from None
  if not batches:
    raise InputPathError(f"--representative {source} holds no images")
  return np.concatenate(batches).astype("float32")


# ---------------------------------------------------------------------------------------------
# Conversion


def write_saved_model(model, path: str, *, resolution: int, batch: int | None = None) -> None:
  """A SavedModel whose `serve` signature runs `model` in inference mode on [batch, res, res, 3]."""
  import keras
  import tensorflow as tf
  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint(
      "serve", tf.function(lambda images: model(images, training=False)),
      input_signature=[tf.TensorSpec((batch, resolution, resolution, 3), tf.float32,
                                     name="images")])
  archive.write_out(path, verbose=False)


def tflite_model(saved_model_dir: str, fmt: str, *, representative: Iterable | None = None) -> bytes:
  """Converts a SavedModel to TFLite `fmt` (tflite_float32 | tflite_float16 | tflite_int8).

  The one set of converter settings for every model, ours and the benchmark's anchor alike.
  int8 needs `representative`: an iterable of single float32 images [res, res, 3].
  """
  import tensorflow as tf
  converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
  if fmt == "tflite_float16":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  elif fmt == "tflite_int8":
    if representative is None:
      raise ConfigError("int8 export needs representative images")
    images = list(representative)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in images)
    # Every op in int8 (conversion fails rather than leaving float ops behind); float32 I/O.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  elif fmt != "tflite_float32":
    raise ConfigError(f"not a TFLite format: {fmt!r}")
  return converter.convert()


def make_interpreter(model_content: bytes, *, num_threads: int = 2):
  """A LiteRT interpreter (XNNPACK, the default delegate) for a TFLite flatbuffer."""
  try:
    from ai_edge_litert.interpreter import Interpreter
  except ImportError:  # older stacks: the same interpreter inside TensorFlow
    from tensorflow.lite import Interpreter
  interpreter = Interpreter(model_content=model_content, num_threads=num_threads)
  interpreter.allocate_tensors()
  return interpreter


def run_tflite(model_content: bytes, images, *, num_threads: int = 2):
  """Runs a batch-1 TFLite model over `images` one at a time; float32 outputs [N, classes]."""
  import numpy as np
  interpreter = make_interpreter(model_content, num_threads=num_threads)
  inp = interpreter.get_input_details()[0]
  out = interpreter.get_output_details()[0]
  results = []
  for image in images:
    x = image[None]
    if inp["dtype"] != np.float32:  # a model with quantized input: quantize as it expects
      scale, zero = inp["quantization"]
      x = np.clip(np.round(x / scale + zero), np.iinfo(inp["dtype"]).min,
                  np.iinfo(inp["dtype"]).max).astype(inp["dtype"])
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    y = interpreter.get_tensor(out["index"])[0]
    if out["dtype"] != np.float32:
      scale, zero = out["quantization"]
      y = (y.astype("float32") - zero) * scale
    results.append(np.array(y, dtype="float32"))
  return np.stack(results)


def compare(outputs, reference) -> dict:
  """Max abs difference and top-1 agreement of `outputs` against `reference` logits."""
  import numpy as np
  return {"max_abs_diff": float(np.max(np.abs(outputs - reference))),
          "top1_agreement": float(np.mean(outputs.argmax(-1) == reference.argmax(-1))),
          "images": int(len(reference)),
          "reference_scale": float(np.max(np.abs(reference)))}


# ---------------------------------------------------------------------------------------------
# The export job


def _resolution(model, name: str, requested: int | None) -> int:
  from mnv4_train.models import canonical_resolution
  fixed = model.input_shape[1]
  if requested is not None:
    if fixed is not None and fixed != requested:
      raise ConfigError(f"--resolution {requested} differs from the checkpoint's fixed input "
                        f"size {fixed}; drop --resolution or pass {fixed}")
    return requested
  return fixed or canonical_resolution(name)


REPORT = "export_report.json"  # written last: a folder with it is a finished export
_STAGING_PREFIXES = (".tmp-export-", ".tmp-old-")


def _ours(name: str) -> bool:
  """An entry of `--out` this command makes while it runs (claim, staging folders)."""
  return name == ownership.OWNER or name.startswith(_STAGING_PREFIXES)


def check_out(out: str, overwrite: bool, inputs: dict) -> None:
  """Refuses an `--out` this command must not write: one that overlaps an input, a file, or a
  non-empty folder that is not a finished export (a finished one only with `overwrite`)."""
  ownership.check_overlap(out, inputs)
  if not _exists(out):
    return
  if not _isdir(out):
    raise InputPathError(f"--out {out} is a file; give a folder")
  if _isfile(os.path.join(out, REPORT)):
    if not overwrite:
      raise ConfigError(f"--out {out} already holds a finished export; pass --overwrite to "
                        "replace it or choose another --out")
    return
  if any(not _ours(name) for name in _listdir(out)):
    raise InputPathError(f"--out {out} exists and is not a finished export (no {REPORT}); it "
                         "is never replaced: choose another --out or move it away")


def _clear_staging(out):
  for name in _listdir(out):
    if name.startswith(_STAGING_PREFIXES):
      path = os.path.join(out, name)
      if ownership.is_url(out):
        _gfile().rmtree(path)
      else:
        shutil.rmtree(path, ignore_errors=True)


def export(*, model_name: str, checkpoint: str, out: str, formats: Sequence[str],
           resolution: int | None = None, representative: str | None = None,
           num_calibration: int = 100, num_check: int = 100, num_threads: int = 2,
           overwrite: bool = False, log=print, quiet: bool = False) -> dict:
  """Exports `checkpoint` in `formats` under `out`; returns the report (also export_report.json).

  Only a finished export is replaced (with `overwrite`), one export writes an `out` at a time
  (its claim file, `mnv4_train.ownership`), and a full disk is one line. `quiet` keeps the
  converter's and the interpreter's native log lines off stderr, but for errors (the command
  line's default).
  """
  if "tflite_int8" in formats and not representative:
    raise ConfigError("int8 export needs --representative (a folder of class/xxx.jpg images or "
                      "a glob of TFRecord source shards) to calibrate on")
  check_out(out, overwrite, {"--checkpoint": checkpoint, "--representative": representative})
  made = not _exists(out)
  remote = ownership.is_url(out)
  try:
    if remote:
      _gfile().makedirs(out)
    else:
      os.makedirs(out, exist_ok=True)
    claim = ownership.claim(out, "--out", on_stale=lambda _: _clear_staging(out))
  except _storage_errors(remote) as e:
    raise ownership.storage_problem(e, out) or InputPathError(
        f"cannot create --out {out}: {getattr(e, 'strerror', None) or first_line(e)}; check the "
        "path and its permissions") from None
  try:
    return _export(model_name=model_name, checkpoint=checkpoint, out=out, formats=formats,
                   resolution=resolution, representative=representative,
                   num_calibration=num_calibration, num_check=num_check,
                   num_threads=num_threads, log=log, quiet=quiet)
  except BaseException as e:
    problem = ownership.storage_problem(e, out)
    if problem is not None:
      raise problem from None
    raise
  finally:
    claim.release()
    if made and not _listdir(out):  # ours, and nothing was exported into it
      if remote:
        _gfile().rmtree(out)
      else:
        os.rmdir(out)


def _storage_errors(remote: bool) -> tuple:
  """What a failed write raises: OSError locally, TensorFlow's OpError for a bucket too."""
  if not remote:
    return (OSError,)
  import tensorflow as tf
  return (OSError, tf.errors.OpError)


def _export(*, model_name, checkpoint, out, formats, resolution, representative,
            num_calibration, num_check, num_threads, log, quiet=False) -> dict:
  import numpy as np

  from mnv4_train.models.checkpoint import load_checkpoint
  model = load_checkpoint(checkpoint, model=model_name)
  res = _resolution(model, model_name, resolution)

  calibration = held_out = None
  if representative:
    images = load_images(representative, resolution=res, count=num_calibration + num_check)
    calibration, held_out = images[:num_calibration], images[num_calibration:]
    if not len(held_out):
      log(f"note: {representative} has no images beyond the {len(calibration)} calibration "
          "ones; the checks run on calibration images")
      held_out = calibration
  check_images = held_out if held_out is not None else np.random.default_rng(0).uniform(
      -1, 1, (NUM_RANDOM_CHECK_IMAGES, res, res, 3)).astype("float32")
  reference = np.asarray(model.predict(check_images, batch_size=32, verbose=0), "float32")

  remote = ownership.is_url(out)
  # Inside a local --out, so that finished files are renamed into place; for a bucket, a local
  # temporary folder whose checked files are copied up.
  staging = tempfile.mkdtemp(prefix=".tmp-export-", dir=None if remote else out)

  def native():  # around the converter and LiteRT, which log from C++
    return cli.chatter_filter(verbose=not quiet)

  shown = checkpoint if ownership.is_url(checkpoint) else os.path.abspath(checkpoint)
  report = {"model": model_name, "checkpoint": shown, "resolution": res,
            "input": "float32 NHWC in [-1, 1] (pixel / 127.5 - 1)", "output": "logits",
            "check_images": "held-out representative" if held_out is not None else "random",
            "formats": {}}
  try:
    staged = {}
    if "saved_model" in formats:
      import tensorflow as tf
      path = os.path.join(staging, "saved_model")
      write_saved_model(model, path, resolution=res)
      loaded = tf.saved_model.load(path)  # keep a reference: the function needs its variables
      outputs = loaded.serve(check_images).numpy()
      report["formats"]["saved_model"] = {"check": compare(outputs, reference)}
      staged["saved_model"] = path
    tflite_formats = [f for f in formats if f in TFLITE_FILES]
    if tflite_formats:
      # TFLite models take batch 1: static shapes let the converter fold every reshape.
      batch1 = os.path.join(staging, "batch1_saved_model")
      write_saved_model(model, batch1, resolution=res, batch=1)
      for fmt in tflite_formats:
        log(f"converting {fmt} ...")
        with native():
          content = tflite_model(batch1, fmt, representative=calibration)
        path = os.path.join(staging, TFLITE_FILES[fmt])
        with open(path, "wb") as f:
          f.write(content)
        with native():
          outputs = run_tflite(content, check_images, num_threads=num_threads)
        report["formats"][fmt] = {"check": compare(outputs, reference)}
        if fmt == "tflite_int8":
          report["formats"][fmt]["calibration_images"] = int(len(calibration))
        staged[fmt] = path
    for fmt in ("saved_model", "tflite_float32"):
      check = report["formats"].get(fmt, {}).get("check")
      if check and check["max_abs_diff"] > FLOAT32_TOLERANCE * (1 + check["reference_scale"]):
        log(f"export check failed: {fmt} differs from the Keras model by "
            f"{check['max_abs_diff']:.3g}; nothing written")
        raise SystemExit(1)
    report_path = os.path.join(out, REPORT)
    if remote and _gfile().exists(report_path):
      _gfile().remove(report_path)  # copies are not renames: unfinished until the new report
    for fmt, path in staged.items():
      final = os.path.join(out, os.path.basename(path))
      report["formats"][fmt]["path"] = final
      report["formats"][fmt]["megabytes"] = round(_size(path) / 2**20, 3)
      if remote:
        _upload(path, final)
        continue
      if os.path.isdir(final):
        old = tempfile.mkdtemp(prefix=".tmp-old-", dir=out)
        os.replace(final, os.path.join(old, "x"))
        shutil.rmtree(old)
      os.replace(path, final)
    with open(os.path.join(staging, REPORT), "w") as f:
      json.dump(report, f, indent=2)
    if remote:
      _upload(os.path.join(staging, REPORT), report_path)
    else:
      os.replace(os.path.join(staging, REPORT), report_path)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return report


def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files)


def format_report(report: dict) -> str:
  lines = [f"{report['model']} at {report['resolution']}px; checks on {report['check_images']} "
           "images against the Keras float32 model",
           f"{'format':<16}{'MB':>8}  {'max |diff|':>11}{'top-1 agree':>13}  path"]
  for fmt, r in report["formats"].items():
    c = r["check"]
    lines.append(f"{fmt:<16}{r['megabytes']:>8.2f}  {c['max_abs_diff']:>11.2e}"
                 f"{100 * c['top1_agreement']:>12.1f}%  {r['path']}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(prog="mnv4_train.export", description=__doc__.split("\n")[0])
  parser.add_argument("--model", required=True, help="variant the checkpoint holds (conv_s, ...)")
  parser.add_argument("--checkpoint", required=True, help=".keras file (Keras 3 model.save)")
  parser.add_argument("--out", required=True, help="folder for the exports")
  parser.add_argument("--format", default="all",
                      help=f"comma-separated subset of {', '.join(FORMATS)}, or all (default)")
  parser.add_argument("--resolution", type=int, default=None,
                      help="input size (default: the checkpoint's fixed size, else the variant's "
                           "canonical resolution)")
  parser.add_argument("--representative", default=None,
                      help="images for int8 calibration and the checks: a folder (class/x.jpg) "
                           "or a glob of TFRecord files with an image/encoded feature")
  parser.add_argument("--num_calibration", type=int, default=100)
  parser.add_argument("--num_check", type=int, default=100,
                      help="held-out images (after the calibration ones) for the checks")
  parser.add_argument("--num_threads", type=int, default=2, help="interpreter threads")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace a finished export in --out (nothing else is ever replaced)")
  parser.add_argument("--verbose", action="store_true",
                      help="print everything TensorFlow, its converter and LiteRT log")
  args = parser.parse_args(argv)
  cli.quiet_tensorflow(args.verbose)  # before anything loads TensorFlow
  with exit_on_user_error(parser.prog):
    formats = parse_formats(args.format)
    for flag in ("resolution", "num_calibration", "num_check", "num_threads"):
      value = getattr(args, flag)
      if value is not None and value < (32 if flag == "resolution" else 1):
        raise ConfigError(f"--{flag} must be at least {32 if flag == 'resolution' else 1}, "
                          f"got {value}")
    report = export(model_name=args.model, checkpoint=args.checkpoint, out=args.out,
                    formats=formats, resolution=args.resolution,
                    representative=args.representative, num_calibration=args.num_calibration,
                    num_check=args.num_check, num_threads=args.num_threads,
                    overwrite=args.overwrite, quiet=not args.verbose)
    print(format_report(report))
  return 0


if __name__ == "__main__":
  run_then_exit(main)
