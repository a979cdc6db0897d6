"""The timm importers: logits parity on shipped timm fixtures, the source's settings, bad files.

The fixtures (tests/fixtures/timm/*) are tiny timm MobileNetV4s with randomised BatchNorm
statistics and layer scales, tiny TF-ported EfficientNets (`effnet_*`, for the teacher importer)
with randomised affine parameters and biases and calibrated statistics, and timm's own eval-mode
logits; tests/fixtures/make_timm_fixtures.py
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


# EfficientNet teachers (timm's tf_efficientnet_*, mnv4_train/convert_efficientnet.py).
EFFNETS = ("effnet_b0", "effnet_scaled")


def _effnet_flags(meta):
  """The convert flags a fixture was made with: its --model, coefficients and input size."""
  return ["--model", meta["model"], "--width_coefficient", str(meta["width_coefficient"]),
          "--depth_coefficient", str(meta["depth_coefficient"]),
          "--resolution", str(meta["resolution"])]


@pytest.fixture(scope="module")
def converted_effnets(tmp_path_factory):
  """name -> .keras path written by the CLI with timm's input convention."""
  out = {}
  for name in EFFNETS:
    path, _, _, meta = _fixture(name)
    out[name] = str(tmp_path_factory.mktemp(name) / f"{name}.keras")
    assert convert.main(["--from_timm", path, "--out", out[name], "--input", "timm"]
                        + _effnet_flags(meta)) == 0
  return out


@pytest.mark.parametrize("name", EFFNETS)
def test_efficientnet_logits_match_timm(converted_effnets, name):
  from mnv4_train.models import checkpoint
  _, x, timm_logits, meta = _fixture(name)
  model = checkpoint.load_model(converted_effnets[name], what="--teacher")  # as distill does
  ours = model.predict(x, verbose=0)
  assert ours.shape == timm_logits.shape == (2, meta["num_classes"])
  diff = float(np.max(np.abs(ours - timm_logits)))
  print(f"{name}: max |keras - timm| logits = {diff:.2e}")
  assert diff < 1e-4
  # the fixture's logits are not degenerate, and they depend on the input, not only on biases
  assert np.std(timm_logits) > 0.1 and np.max(np.abs(timm_logits[0] - timm_logits[1])) > 0.1
  assert model.input_shape == (None, meta["resolution"], meta["resolution"], 3)


def test_efficientnet_project_inputs_give_timm_logits_for_the_same_pixels(tmp_path):
  """By default the model takes [-1, 1] images (distill's --teacher_input minus_one_to_one)."""
  path, x_timm, timm_logits, meta = _fixture("effnet_b0")
  out = str(tmp_path / "b0.keras")
  assert convert.main(["--from_timm", path, "--out", out] + _effnet_flags(meta)) == 0
  model = keras.saving.load_model(out)
  mean, std = np.array(convert.IMAGENET_MEAN), np.array(convert.IMAGENET_STD)
  pixels = x_timm * std + mean  # the pixels / 255 that timm's input encodes
  ours = model.predict((pixels * 2 - 1).astype("float32"), verbose=0)
  assert np.max(np.abs(ours - timm_logits)) < 1e-4
  assert np.max(np.abs(model.predict(x_timm, verbose=0) - timm_logits)) > 1e-2


def test_efficientnet_parity_check_is_sensitive_to_padding_and_epsilon(converted_effnets):
  """Symmetric stride-2 padding (PyTorch's) or BatchNorm epsilon 1e-5 miss timm's logits: the
  fixture checks that the import keeps TF 'same' padding and epsilon 1e-3."""
  _, x, timm_logits, _ = _fixture("effnet_b0")
  source = keras.saving.load_model(converted_effnets["effnet_b0"])
  for change in ("padding", "epsilon"):
    config = source.get_config()
    for layer in config["layers"]:
      if change == "padding" and layer["class_name"] == "ZeroPadding2D":
        pad = max(max(p) for p in layer["config"]["padding"])
        layer["config"]["padding"] = ((pad, pad), (pad, pad))
      if change == "epsilon" and layer["class_name"] == "BatchNormalization":
        layer["config"]["epsilon"] = 1e-5
    other = keras.Model.from_config(config)
    other.set_weights(source.get_weights())
    for layer in other.layers:
      if isinstance(layer, keras.layers.Normalization):
        layer.finalize_state()  # set_weights leaves its mean/variance constants as built
    assert np.max(np.abs(other.predict(x, verbose=0) - timm_logits)) > 5e-4, change


def test_efficientnet_layouts_follow_the_papers_coefficients():
  from mnv4_train import convert_efficientnet as E
  b0 = E.expected_layout(1.0, 1.0)
  assert (b0.stem, b0.repeats, b0.channels, b0.head) == (
      32, (1, 2, 2, 3, 3, 4, 1), (16, 24, 40, 80, 112, 192, 320), 1280)
  l2 = E.expected_layout(4.3, 5.3)  # Noisy Student's L2, as timm builds tf_efficientnet_l2
  assert (l2.stem, l2.repeats, l2.head) == (136, (6, 11, 11, 16, 16, 22, 6), 5504)
  assert l2.channels == (72, 104, 176, 344, 480, 824, 1376)


def _refusal(capsys, argv):
  with pytest.raises(SystemExit) as exit_:
    convert.main(argv)
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


def test_mismatched_efficientnet_files_are_refused_in_one_line(capsys, tmp_path):
  from safetensors.numpy import load_file, save_file
  out = str(tmp_path / "x.keras")
  b0, _, _, meta = _fixture("effnet_b0")
  # the B0-structured fixture at B0's own coefficients: its widths are 0.25x
  line = _refusal(capsys, ["--from_timm", b0, "--model", "efficientnet_b0", "--out", out])
  assert "stem 8" in line and "efficientnet_b0 at width 1" in line and "stem 32" in line
  # a MobileNetV4 file given as an EfficientNet, and the other way round: each names the fix
  line = _refusal(capsys, ["--from_timm", _fixture("conv_s")[0], "--model", "efficientnet_l2",
                           "--out", out])
  assert "mobilenetv4_conv_small" in line and "--model conv_s" in line
  line = _refusal(capsys, ["--from_timm", b0, "--model", "conv_s", "--out", out])
  assert "EfficientNet" in line and "--model efficientnet_" in line
  # a tensor the model has no place for
  tensors = load_file(b0)
  tensors["blocks.1.0.conv_extra.weight"] = np.zeros((8, 8, 1, 1), np.float32)
  save_file(tensors, str(tmp_path / "extra.safetensors"))
  line = _refusal(capsys, ["--from_timm", str(tmp_path / "extra.safetensors"), "--out", out]
                  + _effnet_flags(meta))
  assert "conv_extra" in line and "tf_efficientnet_b0" in line
  # an unknown variant, and MobileNetV4 given an EfficientNet flag
  assert "efficientnet_l2" in _refusal(capsys, ["--from_timm", b0, "--model", "efficientnet_b9",
                                                "--out", out])
  assert "--resolution" in _refusal(capsys, ["--from_timm", _fixture("conv_s")[0], "--model",
                                             "conv_s", "--resolution", "64", "--out", out])
  assert not list(tmp_path.glob("*.keras")) and not list(tmp_path.glob(".tmp-*"))


def test_efficientnet_config_json_refuses_pytorch_native_weights(tmp_path):
  """timm's PyTorch-native efficientnet_* have tf_efficientnet_*'s tensors but pad and normalise
  otherwise; only the config.json beside the weights tells them apart."""
  import shutil
  path, _, _, meta = _fixture("effnet_b0")
  weights = tmp_path / "model.safetensors"
  shutil.copy(path, weights)
  kwargs = dict(model="efficientnet_b0", inputs="timm", resolution=meta["resolution"],
                width=meta["width_coefficient"], depth=meta["depth_coefficient"])
  from mnv4_train import convert_efficientnet as E
  config = tmp_path / "config.json"
  config.write_text(json.dumps({"architecture": "efficientnet_b0"}))
  with pytest.raises(ConfigError, match="PyTorch-native"):
    E.from_timm(str(weights), **kwargs)
  config.write_text(json.dumps({"architecture": "tf_efficientnet_b3"}))
  with pytest.raises(ConfigError, match="--model efficientnet_b3"):
    E.from_timm(str(weights), **kwargs)
  # timm's own config: its input size is the default resolution, its mean/std the normalisation
  config.write_text(json.dumps({"architecture": "tf_efficientnet_b0",
                                "pretrained_cfg": {"input_size": [3, 77, 77],
                                                   "mean": [0.5, 0.5, 0.5],
                                                   "std": [0.5, 0.5, 0.5]}}))
  kwargs.update(resolution=None, inputs="project")
  model = E.from_timm(str(weights), **kwargs)
  assert model.input_shape == (None, 77, 77, 3)
  norm = next(l for l in model.layers if isinstance(l, keras.layers.Normalization))
  # [-1, 1] is already (p - 0.5) / 0.5: the layer only undoes the builder's 1/255
  np.testing.assert_allclose(np.ravel(norm.mean), 0.0, atol=1e-9)
  np.testing.assert_allclose(np.sqrt(np.ravel(norm.variance)), 1 / 255, rtol=1e-6)


def test_converted_efficientnet_is_a_distillation_teacher(converted_effnets, source_shards,
                                                         tmp_path):
  """The .keras file runs as data_prep.distill --teacher: fixed size and classes read from it."""
  from data_prep import distill
  out = str(tmp_path / "d1")
  m = distill.run(["--recipe=d1", f"--source={source_shards[0]}",
                   f"--teacher={converted_effnets['effnet_b0']}", f"--out={out}",
                   "--replicas=1", "--batch_size=64"])
  assert m["resolution"] == 75 and m["num_classes"] == 10 and m["num_records"] == 200
