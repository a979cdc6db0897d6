"""The one model loader (`mnv4_train.models.checkpoint.load_model`) and the safe first line."""

import numpy as np
import pytest
import tensorflow as tf

from mnv4_train import models
from mnv4_train.errors import InputPathError, first_line
from mnv4_train.models import checkpoint


def test_first_line_never_fails_on_an_empty_message():
  assert first_line(ValueError("")) == "ValueError"
  assert first_line(ValueError("  \n ")) == "ValueError"
  assert first_line(RuntimeError("\n  bad thing \nmore")) == "bad thing"
  assert first_line(OSError("x" * 300), limit=200) == "x" * 200


@pytest.fixture(scope="module")
def tiny_model():
  return models.build("conv_s", num_classes=3, width=0.25, resolution=32)


def test_a_keras_file_loads_with_our_layers(tiny_model, tmp_path):
  path = str(tmp_path / "m.keras")
  tiny_model.save(path)
  loaded = checkpoint.load_model(path, what="--teacher")
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
  np.testing.assert_allclose(loaded(x, training=False), tiny_model(x, training=False),
                             atol=1e-6)
  assert checkpoint.identify(loaded) == "conv_s"


def test_a_saved_model_folder_loads_only_where_allowed(tmp_path):
  module = tf.Module()
  module.scale = tf.Variable(2.0)
  module.f = tf.function(lambda x: x * module.scale,
                         input_signature=[tf.TensorSpec([None], tf.float32)])
  folder = str(tmp_path / "sm")
  tf.saved_model.save(module, folder, signatures={"serving_default": module.f})
  loaded = checkpoint.load_model(folder, what="--teacher")
  assert float(loaded.f(tf.constant([3.0]))[0]) == 6.0
  with pytest.raises(InputPathError, match=r"^cannot load train.teacher_model .*\.keras file \("):
    checkpoint.load_model(folder, what="train.teacher_model", saved_model=False)


@pytest.mark.parametrize("case", ["missing", "not a zip", "empty"])
def test_a_bad_path_is_one_line_naming_the_flag(tmp_path, case):
  path = tmp_path / "teacher.keras"
  if case == "not a zip":
    path.write_bytes(b"this is not a zip file")
  elif case == "empty":
    path.write_bytes(b"")
  with pytest.raises(InputPathError) as info:
    checkpoint.load_model(str(path), what="--teacher")
  message = str(info.value)
  assert "\n" not in message and f"--teacher {path}" in message
  if case == "missing":
    assert "does not exist" in message and "SavedModel folder" in message
  else:
    assert message.startswith("cannot load --teacher") and message.endswith(")")
