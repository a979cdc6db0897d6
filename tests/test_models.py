"""The MNv4 model family: exact sizes, shapes, gradients, training, serialization, backends."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from mnv4_train import models
from mnv4_train.errors import ConfigError
from mnv4_train.models import layers as L
from mnv4_train.models import profile, specs
from tests.conftest import JAX_ENV, run_cli

# The official implementation's figures at 1000 classes: the Model Garden's
# MobileNet(model_id="MobileNetV4...") backbone + classification head (identical in timm).
# params: count_params() with BatchNorm statistics / trainable only. MACs at the canonical
# resolution count convs, dense and attention matmuls (timm, attention as explicit matmuls).
GOLDEN = {
    #           params      trainable   res  GMACs  GMACs without attention
    "conv_s": (3_799_112, 3_774_024, 224, 0.186, 0.186),
    "conv_m": (9_783_416, 9_715_512, 256, 1.080, 1.080),
    "conv_l": (32_740_416, 32_590_864, 384, 6.376, 6.376),
    "hybrid_m": (11_150_488, 11_074_648, 256, 1.271, 1.229),
    "hybrid_l": (37_929_024, 37_764_624, 384, 7.712, 7.372),
}


def test_golden_table_covers_every_variant():
  assert tuple(GOLDEN) == models.MODEL_NAMES


def _trainable(model):
  return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_full_size_counts_equal_the_official(name):
  params, trainable, res, gmacs, gmacs_no_attn = GOLDEN[name]
  model = models.build(name, num_classes=1000)
  assert model.count_params() == params
  assert _trainable(model) == trainable
  assert models.canonical_resolution(name) == res
  costs = profile.layer_costs(model, res)
  macs = sum(c.macs for c in costs)
  no_attn = sum(c.macs for c in costs if c.kind != "attention")
  assert macs == pytest.approx(gmacs * 1e9, rel=0.01)
  assert no_attn == pytest.approx(gmacs_no_attn * 1e9, rel=0.01)


def test_block_kinds_are_derived_from_kernels():
  stage2 = specs.conv_s().stages[2]
  assert [b.kind for b in stage2] == ["ExtraDW", "IB", "IB", "IB", "IB", "ConvNext"]
  conv_m_stage2 = specs.conv_m().stages[2]
  assert [b.kind for b in conv_m_stage2][-3:] == ["ConvNext", "FFN", "ConvNext"]
  for name in ("hybrid_m", "hybrid_l"):
    spec = specs.get_spec(name)
    assert spec.layer_scale
    attention = [b for b in spec.blocks if b.kind == "MQA"]
    assert len(attention) == 8
    assert sorted({b.kv_stride for b in attention}) == [1, 2]
  assert not any(b.kind == "MQA" for n in ("conv_s", "conv_m", "conv_l")
                 for b in specs.get_spec(n).blocks)
  with pytest.raises(ValueError, match="strided UIB"):
    specs.uib(0, 0, 2, 64, 4.0)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
@pytest.mark.parametrize("resolution", [32, 64])
def test_tiny_forward_shapes_and_finite(name, resolution):
  model = models.build(name, num_classes=7, width=0.25)
  x = np.random.default_rng(0).uniform(-1, 1, (2, resolution, resolution, 3)).astype("float32")
  y = model(x, training=False)
  assert tuple(y.shape) == (2, 7)
  assert np.all(np.isfinite(y))
  # Five stride-2 steps: the last feature map is resolution / 32.
  features = keras.Model(model.input, model.get_layer("stage4_conv").output)(x)
  assert tuple(features.shape[1:3]) == (resolution // 32, resolution // 32)


@pytest.mark.parametrize("name", ["conv_s", "conv_m", "hybrid_m"])
def test_every_parameter_gets_a_gradient(name):
  keras.utils.set_random_seed(0)  # fixed init and drop-path draws: no run-to-run flakiness
  model = models.build(name, num_classes=5, width=0.25, drop_path_rate=0.1)
  # 64 px: the last stage still has 2x2 = 4 key tokens, so attention softmax is not constant.
  x = tf.random.stateless_uniform((4, 64, 64, 3), seed=(1, 2))
  labels = tf.constant([0, 1, 2, 3])
  with tf.GradientTape() as tape:
    logits = model(x, training=True)
    loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
  grads = tape.gradient(loss, model.trainable_weights)
  missing = [w.path for w, g in zip(model.trainable_weights, grads)
             if g is None or not np.any(np.asarray(g) != 0)]
  assert not missing


def _digits(resolution=32):
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = digits.images[..., None].astype("float32") / 16.0
  images = tf.image.resize(np.repeat(images, 3, axis=-1), (resolution, resolution)).numpy()
  return images * 2.0 - 1.0, digits.target.astype("int32")


@pytest.mark.slow
def test_tiny_model_trains_and_its_loss_falls():
  images, labels = _digits()
  images, labels = images[:512], labels[:512]
  keras.utils.set_random_seed(0)
  model = models.build("conv_s", num_classes=10, width=0.5, bn_momentum=0.9)
  model.compile(optimizer=keras.optimizers.Adam(2e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
  history = model.fit(images, labels, batch_size=32, epochs=4, verbose=0)
  losses = history.history["loss"]
  assert losses[-1] < 0.5 * losses[0]
  assert history.history["accuracy"][-1] > 0.7


@pytest.mark.parametrize("name,padding", [("hybrid_m", "same"), ("conv_m", "symmetric")])
def test_keras_file_round_trip_gives_identical_outputs(tmp_path, name, padding):
  model = models.build(name, num_classes=6, width=0.25, padding=padding, drop_path_rate=0.1,
                       dropout=0.2)
  # Non-trivial BatchNorm statistics and layer scales, so a missed weight would show.
  x = np.random.default_rng(1).normal(size=(3, 64, 64, 3)).astype("float32")
  model(x, training=True)
  for w in model.weights:
    if "gamma" in w.path and "layer_scale" in w.path:
      w.assign(np.random.default_rng(2).uniform(0.5, 1.5, w.shape).astype("float32"))
  path = tmp_path / "model.keras"
  model.save(path)
  loaded = keras.saving.load_model(path)
  np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
  assert loaded.get_layer("stage1_block0").get_config() == model.get_layer(
      "stage1_block0").get_config()


JAX_SCRIPT = r"""
import os, sys
os.environ["KERAS_BACKEND"] = "jax"
import keras, numpy as np
from mnv4_train.models import checkpoint  # the project's loader registers the MNv4 layers
assert keras.backend.backend() == "jax"
for model_path, x_path, y_path in zip(*[iter(sys.argv[1:])] * 3):
  model = checkpoint.load_model(model_path, saved_model=False)
  np.save(y_path, np.asarray(model.predict(np.load(x_path), verbose=0)))
"""


@pytest.mark.slow
def test_jax_backend_matches_tensorflow(tmp_path):
  """Conv-M and Hybrid-L saved by TensorFlow, loaded and run by Keras on JAX (one process)."""
  names, argv = ["conv_m", "hybrid_l"], []
  x = np.random.default_rng(3).normal(size=(2, 64, 64, 3)).astype("float32")
  np.save(tmp_path / "x.npy", x)
  expected = {}
  for name in names:
    model = models.build(name, num_classes=10, width=0.25)
    model(x, training=True)  # move the BatchNorm statistics off their initial values
    model.save(tmp_path / f"{name}.keras")
    expected[name] = model.predict(x, verbose=0)
    argv += [str(tmp_path / f"{name}.keras"), str(tmp_path / "x.npy"),
             str(tmp_path / f"{name}.npy")]
  env = {**os.environ, **JAX_ENV}
  out = subprocess.run([sys.executable, "-c", JAX_SCRIPT, *argv], check=False, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  for name in names:
    np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), expected[name], rtol=1e-4,
                               atol=1e-4, err_msg=name)


def test_mqa_matches_numpy_reference():
  layer = L.MobileMQA(num_heads=2, key_dim=8, kv_strides=1, layer_scale_init_value=0.5)
  x = np.random.default_rng(4).normal(size=(2, 4, 4, 16)).astype("float32")
  y = np.asarray(layer(x, training=False))
  # BatchNorm in inference with fresh statistics: x / sqrt(1 + eps).
  xn = x / np.sqrt(1.0 + 1e-3)
  wq = np.asarray(layer.query[0].kernel)[0, 0]
  wk = np.asarray(layer.key[0].kernel)[0, 0]
  wv = np.asarray(layer.value[0].kernel)[0, 0]
  wo = np.asarray(layer.output_proj.kernel)[0, 0]
  tokens = xn.reshape(2, 16, 16)
  q = (tokens @ wq).reshape(2, 16, 2, 8)
  k, v = tokens @ wk, tokens @ wv
  logits = np.einsum("blhd,bpd->bhlp", q, k) / np.sqrt(8)
  att = np.exp(logits - logits.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  o = np.einsum("bhlp,bpd->blhd", att, v).reshape(2, 16, 16)
  expected = x + 0.5 * (o @ wo).reshape(2, 4, 4, 16)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_mqa_kv_downsampling_shrinks_keys_not_queries():
  layer = L.MobileMQA(num_heads=4, key_dim=8, kv_strides=2)
  layer.build((None, 8, 8, 32))
  costs = profile._mqa_costs(layer, (1, 8, 8, 32), "mqa", "stage2")
  qk = next(c for c in costs if c.path == "mqa/qk")
  assert qk.macs == 4 * 64 * 16 * 8  # 64 queries attend to 16 downsampled keys
  assert {c.path for c in costs} >= {"mqa/key_dw", "mqa/value_dw"}  # each has its own DW


def test_uib_macs_hand_counted():
  block = L.UniversalInvertedBottleneck(16, 2.0, start_dw_kernel_size=3, middle_dw_kernel_size=3)
  block.build((None, 8, 8, 16))
  costs, shape = profile._chain_costs(block.ops_, (1, 8, 8, 16), "b", "s")
  # start DW 64*9*16 + expand 64*16*32 + middle DW 64*9*32 + project 64*32*16
  assert [c.macs for c in costs] == [9216, 32768, 18432, 32768]
  assert shape == (1, 8, 8, 16)


def test_uib_stride_sits_on_middle_dw_or_start_dw():
  for start, mid, strided in [(3, 5, "middle_dw"), (3, 0, "start_dw")]:
    block = L.UniversalInvertedBottleneck(32, 4.0, start, mid, strides=2)
    block.build((None, 16, 16, 16))
    strides = {op.name: op.strides for op in block.ops_ if hasattr(op, "strides")}
    assert strides[strided] == (2, 2)
    assert all(s == (1, 1) for n, s in strides.items() if n != strided)
    assert not block.use_residual


def test_symmetric_padding_differs_only_on_strided_convs():
  same = models.build("conv_s", num_classes=3, width=0.25)
  sym = models.build("conv_s", num_classes=3, width=0.25, padding="symmetric")
  assert same.count_params() == sym.count_params()
  sym.set_weights(same.get_weights())
  x = np.random.default_rng(5).normal(size=(1, 64, 64, 3)).astype("float32")
  assert not np.allclose(same.predict(x, verbose=0), sym.predict(x, verbose=0))


def test_drop_path_is_identity_at_inference_and_random_in_training():
  model = models.build("conv_m", num_classes=4, width=0.25, drop_path_rate=0.5)
  x = np.random.default_rng(6).normal(size=(8, 32, 32, 3)).astype("float32")
  np.testing.assert_array_equal(model(x, training=False), model(x, training=False))
  assert not np.allclose(model(x, training=True), model(x, training=True))


@pytest.mark.parametrize("name,model_id", [("conv_m", "MobileNetV4ConvMedium"),
                                           ("hybrid_m", "MobileNetV4HybridMedium")])
def test_linear_drop_path_rates_are_the_model_gardens(name, model_id):
  """rate * (i + 1) / n over the Model Garden's block list (stem and head included)."""
  from official.vision.modeling.backbones import mobilenet as mg
  from official.vision.modeling.layers import nn_layers
  mg_blocks = mg.SUPPORTED_SPECS_MAP[model_id]["block_specs"]
  model = models.build(name, num_classes=4, width=0.25, drop_path_rate=0.2,
                       drop_path_schedule="linear")
  spec = specs.get_spec(name)
  ours = [model.get_layer(f"stage{i}_block{j}") for i, stage in enumerate(spec.stages)
          for j in range(len(stage))]
  assert len(mg_blocks) == len(ours) + 4  # + stem, last 1x1 conv, pooling, head conv
  checked = 0
  for index, layer in enumerate(ours):
    block_fn = mg_blocks[index + 1][0]
    if block_fn == "convbn":  # no residual branch, no rate
      assert not hasattr(layer, "drop_path_rate")
      continue
    want = 0.2 if block_fn == "mhsa" else nn_layers.get_stochastic_depth_rate(
        0.2, index + 2, len(mg_blocks))
    assert layer.drop_path_rate == pytest.approx(want), (layer.name, block_fn)
    checked += 1
  assert checked >= 20


def test_hybrid_l_uses_exact_gelu_everywhere():
  model = models.build("hybrid_l", num_classes=4, width=0.25)
  acts = {l.activation for l in model.layers if isinstance(l, L._Block)}
  assert acts == {"gelu"}
  act = next(op for op in model.get_layer("stage1_block0").ops_
             if isinstance(op, keras.layers.Activation))
  # Exact (erf) GELU: 0.8413447 at 1; the tanh approximation gives 0.8411920.
  assert float(act(np.ones((1,), "float32"))[0]) == pytest.approx(0.8413447, abs=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"width": 0}, "width"),
    ({"num_classes": 0}, "num_classes"),
    ({"padding": "reflect"}, "padding"),
    ({"drop_path_schedule": "cosine"}, "drop_path_schedule"),
    ({"activation": "swish"}, "activation"),
])
def test_bad_options_raise_config_error(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    models.build("conv_s", **kwargs)


def test_unknown_model_lists_valid_names():
  with pytest.raises(ConfigError) as err:
    models.build("conv_xl")
  for name in models.MODEL_NAMES:
    assert name in str(err.value)


def _run_summary(*args):
  return run_cli("mnv4_train.models.summary", *args, cwd=os.getcwd(), timeout=300)


def test_summary_cli_bad_model_is_one_line():
  result = _run_summary("--model", "conv_xl")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "conv_xl" in lines[0] and "hybrid_l" in lines[0]
  assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_summary_cli_per_stage_table_adds_up():
  result = _run_summary("--model", "conv_s")
  assert result.returncode == 0, result.stderr
  rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:]
          if line.split() and line.split()[0] in ("stem", "stage0", "stage1", "stage2",
                                                 "stage3", "stage4", "head", "total")}
  params = lambda row: int(row[-4].replace(",", ""))
  assert params(rows["total"]) == GOLDEN["conv_s"][0]
  assert sum(params(r) for k, r in rows.items() if k != "total") == GOLDEN["conv_s"][0]
  assert float(rows["total"][-2]) == pytest.approx(186.0, abs=0.2)


@pytest.mark.parametrize("dtype", ["float32", "mixed_float16"])
def test_fused_batchnorm_matches_keras_batchnorm(dtype):
  x = np.random.default_rng(7).normal(2.0, 3.0, size=(4, 6, 6, 8)).astype("float32")
  ours = L.BatchNorm(momentum=0.9, epsilon=1e-3, dtype=dtype)
  ref = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, dtype=dtype)
  for layer in (ours, ref):
    layer.build(x.shape)
    layer.gamma.assign(np.linspace(0.5, 2.0, 8).astype("float32"))
    layer.beta.assign(np.linspace(-1.0, 1.0, 8).astype("float32"))
  tol = 1e-5 if dtype == "float32" else 1e-2
  for _ in range(2):
    np.testing.assert_allclose(np.asarray(ours(x, training=True), "float32"),
                               np.asarray(ref(x, training=True), "float32"), rtol=tol, atol=tol)
  np.testing.assert_allclose(ours.moving_mean, ref.moving_mean, rtol=1e-5)
  np.testing.assert_allclose(ours.moving_variance, ref.moving_variance, rtol=1e-4)
  assert not np.allclose(ours.moving_variance, 1.0)  # the statistics really moved
  np.testing.assert_allclose(np.asarray(ours(x, training=False), "float32"),
                             np.asarray(ref(x, training=False), "float32"), rtol=tol, atol=tol)


def test_explicit_filters_override_width_rounding():
  # timm keeps the stem at full width under a channel multiplier; the builder takes its counts.
  model = models.build("conv_s", num_classes=3, width=0.25,
                       filters={"stem": 32, "stage0_block0": 16, "stage4_conv": 240})
  conv = lambda name: model.get_layer(name).ops_[0]
  assert conv("stem").filters == 32
  assert conv("stage0_block0").filters == 16
  assert conv("stage0_block1").filters == 8  # not overridden: width rounding
  assert conv("stage4_conv").filters == 240
  assert model.get_layer("stage0_block0").ops_[0].kernel.shape == (3, 3, 32, 16)
  with pytest.raises(ConfigError, match="stage9_block0"):
    models.build("conv_s", filters={"stage9_block0": 8})
  with pytest.raises(ConfigError, match="stage2_block4"):
    models.build("hybrid_m", filters={"stage2_block4": 160})  # an MQA block: no filters
  with pytest.raises(ConfigError, match="source_normalization"):
    models.build("conv_s", source_normalization=((0.5, 0.5), (0.2, 0.2, 0.2)))


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_every_block_layer_gives_its_table_record_back(name):
  spec = specs.get_spec(name)
  model = models.build(name, num_classes=10, width=1.0, resolution=64)
  for s, stage in enumerate(spec.stages):
    for i, block in enumerate(stage):
      layer = model.get_layer(f"stage{s}_block{i}")
      assert type(layer) is L.BLOCK_LAYERS[type(block)]
      assert L.block_spec_of(layer) == block
  assert L.block_spec_of(model.get_layer("pool")) is None
  with pytest.raises(TypeError, match="unknown block record"):
    L.block_layer(("uib", 3), filters=8, name="x")
