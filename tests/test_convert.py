"""The timm importer: logits parity on shipped timm fixtures, the source's settings, bad files.

The fixtures (tests/fixtures/timm/*) are tiny timm MobileNetV4s with randomised BatchNorm
statistics and layer scales, and timm's own eval-mode logits; tests/fixtures/make_timm_fixtures.py
(dev-only, needs torch + timm) regenerates them.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from mnv4_train import convert, models
from mnv4_train.errors import ConfigError, InputPathError
from mnv4_train.models import layers as L

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "timm")
NAMES = ("conv_s", "hybrid_l")


def _fixture(name):
  folder = os.path.join(FIXTURES, name)
  with open(os.path.join(folder, "meta.json")) as f:
    meta = json.load(f)
  return (os.path.join(folder, "model.safetensors"), np.load(os.path.join(folder, "input.npy")),
          np.load(os.path.join(folder, "logits.npy")), meta)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """name -> .keras path written by the CLI with timm's input convention."""
  out = {}
  for name in NAMES:
    path = str(tmp_path_factory.mktemp(name) / f"{name}.keras")
    assert convert.main(["--from_timm", _fixture(name)[0], "--model", name, "--out", path,
                         "--input", "timm"]) == 0
    out[name] = path
  return out


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_timm(converted, name):
  _, x, timm_logits, meta = _fixture(name)
  model = keras.saving.load_model(converted[name])  # through the .keras file, as a user would
  ours = model.predict(x, verbose=0)
  assert ours.shape == timm_logits.shape == (2, meta["num_classes"])
  assert np.max(np.abs(ours - timm_logits)) < 1e-4
  assert np.std(timm_logits) > 0.1  # the fixture's logits are not degenerate


def test_project_inputs_give_timm_logits_for_the_same_pixels(tmp_path):
  """By default the model takes [-1, 1] images and applies timm's ImageNet normalisation."""
  path, x_timm, timm_logits, _ = _fixture("conv_s")
  out = str(tmp_path / "conv_s.keras")
  assert convert.main(["--from_timm", path, "--model", "conv_s", "--out", out]) == 0
  model = keras.saving.load_model(out)
  assert model.layers[1].name == "input_norm"
  mean, std = np.array(convert.IMAGENET_MEAN), np.array(convert.IMAGENET_STD)
  pixels = x_timm * std + mean  # the pixels / 255 that timm's input encodes
  ours = model.predict((pixels * 2 - 1).astype("float32"), verbose=0)
  assert np.max(np.abs(ours - timm_logits)) < 1e-4
  # fed timm's normalised input instead, the logits are off: the layer is doing its job
  assert np.max(np.abs(model.predict(x_timm, verbose=0) - timm_logits)) > 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_converted_model_carries_the_source_settings(converted, name):
  model = keras.saving.load_model(converted[name])
  blocks = [l for l in model.layers if isinstance(l, L._Block)]
  assert {b.bn_epsilon for b in blocks} == {1e-5}
  assert {b.padding for b in blocks} == {"symmetric"}
  assert {b.activation for b in blocks} == {"gelu" if name == "hybrid_l" else "relu"}
  # timm keeps the stem at full width under its channel multiplier; so does the import.
  assert model.get_layer("stem").filters == models.get_spec(name).stem_filters


def test_parity_check_is_sensitive_to_the_settings(converted):
  """With the Model Garden's epsilon or padding, the same weights miss timm's logits."""
  _, x, timm_logits, _ = _fixture("hybrid_l")
  source = keras.saving.load_model(converted["hybrid_l"])
  filters = {l.name: l.filters for l in source.layers if hasattr(l, "filters")}
  for settings in ({"bn_epsilon": 1e-3, "padding": "symmetric"},
                   {"bn_epsilon": 1e-5, "padding": "same"}):
    other = models.build("hybrid_l", num_classes=10, filters=filters, **settings)
    other.set_weights(source.get_weights())
    # Several times the 1e-4 parity bound: the check would catch either.
    assert np.max(np.abs(other.predict(x, verbose=0) - timm_logits)) > 5e-4, settings


def test_another_variants_file_is_refused_naming_it(capsys, tmp_path):
  out = tmp_path / "x.keras"
  with pytest.raises(SystemExit) as exit_:
    convert.main(["--from_timm", _fixture("conv_s")[0], "--model", "conv_m", "--out", str(out)])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "mobilenetv4_conv_small" in err[0] and "--model conv_s" in err[0]
  assert not out.exists() and not list(tmp_path.iterdir())


def test_a_different_models_safetensors_is_refused(tmp_path):
  from safetensors.numpy import save_file
  resnet = tmp_path / "resnet.safetensors"
  save_file({"conv1.weight": np.zeros((8, 3, 7, 7), np.float32),
             "layer1.0.conv1.weight": np.zeros((8, 8, 3, 3), np.float32),
             "fc.weight": np.zeros((10, 8), np.float32)}, str(resnet))
  result = subprocess.run(
      [sys.executable, "-m", "mnv4_train.convert", "--from_timm", str(resnet), "--model", "conv_s",
       "--out", str(tmp_path / "out.keras")], capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "not a timm MobileNetV4" in lines[0], result.stderr
  assert "Traceback" not in result.stderr and not (tmp_path / "out.keras").exists()


def test_a_timm_file_with_foreign_tensors_is_refused(tmp_path):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(_fixture("conv_s")[0])
  tensors["blocks.2.1.se.conv_reduce.weight"] = np.zeros((8, 96, 1, 1), np.float32)
  path = tmp_path / "se.safetensors"
  save_file(tensors, str(path))
  with pytest.raises(ConfigError, match="se.conv_reduce"):
    convert.from_timm(str(path), model="conv_s")


def test_unreadable_or_missing_file_is_one_clear_error(tmp_path):
  junk = tmp_path / "model.safetensors"
  junk.write_bytes(b"not a safetensors file at all")
  with pytest.raises(InputPathError, match="cannot read"):
    convert.from_timm(str(junk), model="conv_s")
  with pytest.raises(InputPathError, match="does not exist"):
    convert.from_timm(str(tmp_path / "missing.safetensors"), model="conv_s")


def test_config_json_beside_the_weights_is_honoured(tmp_path):
  """timm publishes config.json beside model.safetensors: anti-aliased variants, whose weights
  look exactly like the plain ones, are refused; its mean/std set the input normalisation."""
  import shutil
  weights = tmp_path / "model.safetensors"
  shutil.copy(_fixture("conv_s")[0], weights)
  config = tmp_path / "config.json"
  config.write_text(json.dumps({"architecture": "mobilenetv4_conv_aa_large"}))
  with pytest.raises(ConfigError, match="anti-aliased"):
    convert.from_timm(str(weights), model="conv_s")
  config.write_text(json.dumps({"architecture": "mobilenetv4_conv_medium"}))
  with pytest.raises(ConfigError, match="mixes files"):
    convert.from_timm(str(weights), model="conv_s")
  config.write_text(json.dumps({"architecture": "mobilenetv4_conv_small_050",
                                "pretrained_cfg": {"mean": [0.5, 0.5, 0.5],
                                                   "std": [0.5, 0.5, 0.5]}}))
  norm = convert.from_timm(str(weights), model="conv_s").get_layer("input_norm")
  np.testing.assert_allclose(norm.scale, [1.0, 1.0, 1.0])  # [-1, 1] is already (p - .5) / .5
  np.testing.assert_allclose(norm.offset, [0.0, 0.0, 0.0], atol=1e-7)
