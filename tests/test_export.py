"""Export: SavedModel and TFLite float32/float16/int8 of a briefly trained tiny MNv4, checked
numerically with real conversions and real LiteRT interpreter runs; the representative-set
readers; and the one-line refusals of bad input."""

import glob
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from mnv4_train import export, models
from mnv4_train.errors import InputPathError
from tests.conftest import run_cli

RES = 32
NUM_TRAIN = 1000


def _digits():
  """sklearn's 8x8 digits (they ship offline) as 32x32 RGB in [-1, 1], and their labels."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = np.repeat(digits.images[..., None] / 16.0, 3, axis=-1).astype("float32")
  images = tf.image.resize(images, (RES, RES)).numpy()
  return images * 2.0 - 1.0, digits.target.astype("int32")


def _png(image):
  return tf.io.encode_png(np.round((image + 1.0) * 127.5).astype("uint8")).numpy()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny conv_s trained for a few epochs on digits, saved as .keras; held-out digits as a
  class/xxx.png folder and as two TFRecord shards of tf.train.Example."""
  root = tmp_path_factory.mktemp("export")
  images, labels = _digits()
  keras.utils.set_random_seed(0)
  model = models.build("conv_s", num_classes=10, width=0.5, bn_momentum=0.9)
  model.compile(optimizer=keras.optimizers.Adam(2e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
  model.fit(images[:NUM_TRAIN], labels[:NUM_TRAIN], batch_size=32, epochs=4, verbose=0)
  checkpoint = str(root / "conv_s.keras")
  model.save(checkpoint)
  held_out = range(NUM_TRAIN, NUM_TRAIN + 240)
  for i in held_out:
    folder = root / "images" / str(labels[i])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{i}.png").write_bytes(_png(images[i]))
  for shard in range(2):
    with tf.io.TFRecordWriter(str(root / f"source-{shard:05d}-of-00002.tfrecord")) as writer:
      for i in list(held_out)[shard::2]:
        feature = {
            "image/id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"d{i}".encode()])),
            "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_png(images[i])])),
            "image/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[labels[i]])),
        }
        writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                     .SerializeToString())
  return dict(root=root, checkpoint=checkpoint, images=root / "images",
              records=str(root / "source-*.tfrecord"), model=model,
              held_out=(images[list(held_out)], labels[list(held_out)]))


@pytest.fixture(scope="module")
def exported(trained):
  out = trained["root"] / "out"
  assert export.main(["--model", "conv_s", "--checkpoint", trained["checkpoint"],
                      "--out", str(out), "--format", "all", "--resolution", str(RES),
                      "--representative", str(trained["images"]),
                      "--num_calibration", "80", "--num_check", "160"]) == 0
  with open(out / "export_report.json") as f:
    return out, json.load(f)


def _held_out_images(trained):
  """The images the export checked on: the folder's images after the calibration ones."""
  return export.load_images(str(trained["images"]), resolution=RES, count=240)[80:]


def test_export_writes_every_format_and_nothing_else(exported):
  out, report = exported
  assert sorted(os.listdir(out)) == ["export_report.json", "model_float16.tflite",
                                     "model_float32.tflite", "model_int8.tflite", "saved_model"]
  assert set(report["formats"]) == set(export.FORMATS)
  assert report["resolution"] == RES and report["check_images"] == "held-out representative"


def test_float32_tflite_matches_keras(exported, trained):
  out, report = exported
  images = _held_out_images(trained)
  content = (out / "model_float32.tflite").read_bytes()
  interpreter = export.make_interpreter(content)
  assert list(interpreter.get_input_details()[0]["shape"]) == [1, RES, RES, 3]
  ours = export.run_tflite(content, images)
  keras_out = trained["model"].predict(images, verbose=0)
  assert np.max(np.abs(keras_out)) > 5  # a trained model's logits, not near-zero noise
  assert np.max(np.abs(ours - keras_out)) < 1e-3
  assert report["formats"]["tflite_float32"]["check"]["max_abs_diff"] < 1e-3


def test_saved_model_matches_keras_at_any_batch(exported, trained):
  out, _ = exported
  images = _held_out_images(trained)[:5]
  loaded = tf.saved_model.load(str(out / "saved_model"))
  np.testing.assert_allclose(loaded.serve(images).numpy(),
                             trained["model"].predict(images, verbose=0), rtol=1e-5, atol=1e-5)


def _tensor_dtypes(content):
  interpreter = export.make_interpreter(content)
  return [t["dtype"] for t in interpreter.get_tensor_details()]


def test_float16_tflite_has_half_weights_and_agrees(exported):
  out, report = exported
  dtypes = _tensor_dtypes((out / "model_float16.tflite").read_bytes())
  assert np.float16 in dtypes
  assert (out / "model_float16.tflite").stat().st_size < 0.6 * (
      out / "model_float32.tflite").stat().st_size
  check = report["formats"]["tflite_float16"]["check"]
  assert check["max_abs_diff"] < 0.5 and check["top1_agreement"] >= 0.98


def test_int8_tflite_is_integer_inside_and_agrees_with_float32(exported, trained):
  out, report = exported
  content = (out / "model_int8.tflite").read_bytes()
  dtypes = _tensor_dtypes(content)
  # Float input and output for a drop-in model; everything between them is integer.
  assert dtypes.count(np.float32) == 2 and np.int8 in dtypes
  images = _held_out_images(trained)
  int8 = export.run_tflite(content, images).argmax(-1)
  float32 = trained["model"].predict(images, verbose=0).argmax(-1)
  agreement = float(np.mean(int8 == float32))
  assert agreement >= 0.85
  assert report["formats"]["tflite_int8"]["check"]["top1_agreement"] == pytest.approx(agreement)
  # and the float model is worth agreeing with: it reads digits
  labels = trained["held_out"][1]
  accuracy = np.mean(trained["model"].predict(trained["held_out"][0], verbose=0).argmax(-1)
                     == labels)
  assert accuracy > 0.5


def test_tfrecord_reader_decodes_resizes_and_normalises(trained):
  images = export.load_images(trained["records"], resolution=RES, count=1000)
  assert images.shape == (240, RES, RES, 3) and images.dtype == np.float32
  assert images.min() >= -1.0 and images.max() <= 1.0
  # shard 0 holds every other held-out digit from the first: file order is kept
  np.testing.assert_allclose(images[0], trained["held_out"][0][0], atol=1 / 127.5)
  np.testing.assert_allclose(images[1], trained["held_out"][0][2], atol=1 / 127.5)
  bigger = export.load_images(trained["records"], resolution=48, count=3)
  assert bigger.shape == (3, 48, 48, 3)


def test_representative_reader_refuses_what_it_cannot_read(tmp_path):
  with tf.io.TFRecordWriter(str(tmp_path / "bad.tfrecord")) as writer:
    example = tf.train.Example(features=tf.train.Features(feature={
        "image/id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"]))}))
    writer.write(example.SerializeToString())
  with pytest.raises(InputPathError, match="image/encoded"):
    export.load_images(str(tmp_path / "*.tfrecord"), resolution=RES, count=4)
  with pytest.raises(InputPathError, match="neither a folder nor a glob"):
    export.load_images(str(tmp_path / "nothing-*.tfrecord"), resolution=RES, count=4)
  (tmp_path / "empty").mkdir()
  with pytest.raises(InputPathError, match="no .jpg/.png"):
    export.load_images(str(tmp_path / "empty"), resolution=RES, count=4)


@pytest.mark.slow
def test_hybrid_exports_attention_to_tflite(trained, tmp_path):
  """MQA (einsum, softmax, reshapes) through float32 and full-integer TFLite."""
  rng = np.random.default_rng(0)
  model = models.build("hybrid_m", num_classes=10, width=0.25, bn_momentum=0.5)
  x = rng.uniform(-1, 1, (16, 64, 64, 3)).astype("float32")
  for _ in range(3):
    model(x, training=True)  # move the BatchNorm statistics off their initial values
  for w in model.weights:
    if "layer_scale" in w.path:  # at 1e-5 the attention would barely reach the logits
      w.assign(rng.uniform(0.2, 0.6, w.shape).astype("float32"))
  checkpoint = str(tmp_path / "hybrid_m.keras")
  model.save(checkpoint)
  report = export.export(model_name="hybrid_m", checkpoint=checkpoint, out=str(tmp_path / "out"),
                         formats=("tflite_float32", "tflite_int8"), resolution=64,
                         representative=trained["records"], num_calibration=16, num_check=16,
                         log=lambda *_: None)
  f32 = report["formats"]["tflite_float32"]["check"]
  assert f32["images"] == 16 and f32["reference_scale"] > 0.1
  assert f32["max_abs_diff"] < 1e-4 * (1 + f32["reference_scale"])
  int8 = report["formats"]["tflite_int8"]["check"]
  assert np.isfinite(int8["max_abs_diff"]) and int8["max_abs_diff"] < int8["reference_scale"]
  assert (tmp_path / "out" / "model_int8.tflite").stat().st_size > 0


def _run_cli(*args):
  return run_cli("mnv4_train.export", *args, cwd=os.getcwd(), timeout=300)


def _one_line(stderr):
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in stderr, stderr
  return lines[0]


def test_unknown_format_is_one_line(trained, tmp_path):
  result = _run_cli("--model", "conv_s", "--checkpoint", trained["checkpoint"],
                    "--out", str(tmp_path / "out"), "--format", "tflite_float32,onnx")
  assert result.returncode == 2
  line = _one_line(result.stderr)
  assert "'onnx'" in line and "tflite_int8" in line
  assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_variant_is_one_line(trained, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    export.main(["--model", "conv_m", "--checkpoint", trained["checkpoint"],
                 "--out", str(tmp_path / "out"), "--format", "tflite_float32"])
  assert exit_.value.code == 2
  line = _one_line(capsys.readouterr().err)
  assert "holds a conv_s model, not conv_m" in line and "--model conv_s" in line
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["int8 without images", "missing", "not keras", "corrupt"])
def test_other_bad_input_is_one_line(trained, tmp_path, capsys, case):
  checkpoint, formats, match = trained["checkpoint"], "tflite_float32", None
  if case == "int8 without images":
    formats, match = "tflite_int8", "--representative"
  elif case == "missing":
    checkpoint, match = str(tmp_path / "nope.keras"), "does not exist"
  elif case == "not keras":
    checkpoint, match = str(tmp_path / "model.h5"), "not a .keras file"
    (tmp_path / "model.h5").write_bytes(b"x")
  else:
    checkpoint, match = str(tmp_path / "broken.keras"), "cannot load"
    (tmp_path / "broken.keras").write_bytes(b"this is not a zip file")
  with pytest.raises(SystemExit) as exit_:
    export.main(["--model", "conv_s", "--checkpoint", checkpoint, "--out", str(tmp_path / "out"),
                 "--format", formats])
  assert exit_.value.code == 2
  assert match in _one_line(capsys.readouterr().err)
  assert not glob.glob(str(tmp_path / "out" / "*"))


# What the converter and LiteRT print from C++ when left alone.
NATIVE_CHATTER = ("All log messages before absl::InitializeLog()", "Ignored output_format",
                  "Created TensorFlow Lite XNNPACK delegate")


def test_the_command_line_keeps_native_chatter_off_the_console(trained, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's
  result = subprocess.run(
      [sys.executable, "-m", "mnv4_train.export", "--model", "conv_s", "--checkpoint",
       trained["checkpoint"], "--out", str(tmp_path / "out"), "--format", "tflite_float32"],
      capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 0, result.stderr
  output = result.stdout + result.stderr
  assert not any(c in output for c in NATIVE_CHATTER), output
  # and TensorFlow's own start-up lines: the command line quiets them, the library does not
  assert not any(c in output for c in ("cpu_feature_guard", "oneDNN custom", "cuda")), output
  assert "model_float32.tflite" in result.stdout and (tmp_path / "out" / export.REPORT).exists()


def test_bucket_paths_go_through_gfile(trained):
  """`ram://`, TensorFlow's in-memory file system, stands in for gs://: same tf.io.gfile path."""
  gfile = tf.io.gfile
  checkpoint, out = "ram://export-test/conv_s.keras", "ram://export-test/out"
  gfile.makedirs("ram://export-test")
  gfile.copy(trained["checkpoint"], checkpoint, overwrite=True)
  report = export.export(model_name="conv_s", checkpoint=checkpoint, out=out,
                         formats=("tflite_float32",), resolution=RES, log=lambda *_: None)
  assert sorted(gfile.listdir(out)) == [export.REPORT, "model_float32.tflite"]
  assert report["checkpoint"] == checkpoint
  with gfile.GFile(f"{out}/{export.REPORT}") as f:
    assert json.load(f)["formats"]["tflite_float32"]["path"] == f"{out}/model_float32.tflite"
  with gfile.GFile(f"{out}/model_float32.tflite", "rb") as f:
    assert export.run_tflite(f.read(), _held_out_images(trained)[:2]).shape == (2, 10)
  with pytest.raises(SystemExit):  # a finished export: replaced only with --overwrite
    export.main(["--model", "conv_s", "--checkpoint", checkpoint, "--out", out,
                 "--format", "tflite_float32"])
  gfile.rmtree("ram://export-test")
