"""Import timm's TF-ported EfficientNets (`tf_efficientnet_b0` ... `_b8`, `_l2`) as Keras teachers.

    python -m mnv4_train.convert --from_timm model.safetensors --model efficientnet_l2 \\
        --resolution 475 --out efficientnet_l2.keras

The paper's teacher is EfficientNet-L2 (Noisy Student, 480M parameters); timm publishes its
weights as `tf_efficientnet_l2.ns_jft_in1k_475` and `tf_efficientnet_l2.ns_jft_in1k` (800 px).
This writes a `.keras` file that `checkpoint.load_model` loads and `data_prep.distill --teacher`
runs, with logits equal to timm's (eval mode; tests/test_convert.py holds the parity to 1e-4 on
tiny timm fixtures):

- the network is `keras.applications.efficientnet.EfficientNet(width, depth, size)`, the
  builder behind `EfficientNetB0..B7`, built without weights (nothing is downloaded) with the
  variant's coefficients (L2: width 4.3, depth 5.3). Its channel and repeat rounding is timm's
  (`round_filters` = timm's `round_channels`, repeats rounded up), its blocks are timm's
  (depthwise-separable first stage, MBConv with squeeze-excite after, swish, BatchNorm epsilon
  1e-3), and timm's tensors map onto its layers by position: timm's `blocks.{s}.{i}` is Keras'
  `block{s+1}{a+i}_`.
- only the `tf_` variants, which timm ported from TensorFlow: they pad like TF "same" (at stride
  2, one pixel more after than before on an even input), as Keras' builder does at a fixed input
  size (its stride-2 convs pad by `correct_pad` from the static shape). So the model has a fixed
  input size (`--resolution`, default the variant's timm resolution) and is exact at that size.
  timm's PyTorch-native `efficientnet_*` pad symmetrically with BatchNorm epsilon 1e-5; their
  tensors look the same, so the `config.json` timm publishes beside the weights is read when
  present, and any architecture but a `tf_efficientnet_{b0..b8,l2}` is refused.
- inputs: the builder opens with `Rescaling(1/255)` and a `Normalization` layer (an identity,
  mean 0 and variance 1, because the builder is always called without pretrained weights, so
  nothing is downloaded; Keras' pretrained option would set ImageNet statistics there and add a
  third rescaling). Here the Normalization layer carries the
  mapping onto the normalisation timm's weights expect ((pixel / 255 - mean) / std, mean/std from
  `config.json` when present, else ImageNet's): by default (`--input project`) the model takes
  the project's [-1, 1] images, which is `data_prep.distill --teacher_input minus_one_to_one`,
  the default; `--input timm` takes timm-normalised images (what the parity tests feed).
- the top is Keras' (global average pool, dropout, Dense) with `classifier_activation=None`:
  the model outputs logits (`--teacher_outputs logits`, the default), not Keras' softmax.

A file of another layout (another variant, a MobileNetV4, tensors the model has no place for)
is refused in one line that says what it holds. Where this sits: outside the training flow, a
way in for a pretrained teacher; `mnv4_train.convert`'s CLI dispatches here for `efficientnet_*`.
"""

from __future__ import annotations

import dataclasses
import math

from mnv4_train import timm_weights as W
from mnv4_train.errors import ConfigError

FAMILY = "EfficientNet (tf_efficientnet_*)"


@dataclasses.dataclass(frozen=True)
class Variant:
  """One EfficientNet as timm's `tf_efficientnet_*` generator builds it."""
  timm_name: str
  width: float  # channel multiplier (the paper's width coefficient)
  depth: float  # repeats multiplier (depth coefficient), rounded up per stage
  resolution: int  # input size of timm's largest pretrained cfg for the variant
  dropout: float  # before the classifier; inert in a teacher, kept as timm's


# EfficientNet (Tan & Le 2019, Table 1 and section 4) and Noisy Student's L2 (Xie et al. 2020,
# Table 7), with timm's pretrained input sizes (timm 1.0 `tf_efficientnet_*` pretrained cfgs).
VARIANTS = {
    "efficientnet_b0": Variant("tf_efficientnet_b0", 1.0, 1.0, 224, 0.2),
    "efficientnet_b1": Variant("tf_efficientnet_b1", 1.0, 1.1, 240, 0.2),
    "efficientnet_b2": Variant("tf_efficientnet_b2", 1.1, 1.2, 260, 0.3),
    "efficientnet_b3": Variant("tf_efficientnet_b3", 1.2, 1.4, 300, 0.3),
    "efficientnet_b4": Variant("tf_efficientnet_b4", 1.4, 1.8, 380, 0.4),
    "efficientnet_b5": Variant("tf_efficientnet_b5", 1.6, 2.2, 456, 0.4),
    "efficientnet_b6": Variant("tf_efficientnet_b6", 1.8, 2.6, 528, 0.5),
    "efficientnet_b7": Variant("tf_efficientnet_b7", 2.0, 3.1, 600, 0.5),
    "efficientnet_b8": Variant("tf_efficientnet_b8", 2.2, 3.6, 672, 0.5),
    "efficientnet_l2": Variant("tf_efficientnet_l2", 4.3, 5.3, 800, 0.5),
}
# timm's tensor names for each Keras layer of a block, by block kind: the first stage's
# depthwise-separable block (expand ratio 1), and the MBConv (inverted residual) after.
_SEPARABLE = (("dwconv", "conv_dw"), ("bn", "bn1"), ("se_reduce", "se.conv_reduce"),
              ("se_expand", "se.conv_expand"), ("project_conv", "conv_pw"),
              ("project_bn", "bn2"))
_MBCONV = (("expand_conv", "conv_pw"), ("expand_bn", "bn1"), ("dwconv", "conv_dw"), ("bn", "bn2"),
           ("se_reduce", "se.conv_reduce"), ("se_expand", "se.conv_expand"),
           ("project_conv", "conv_pwl"), ("project_bn", "bn3"))


@dataclasses.dataclass(frozen=True)
class Layout:
  """What identifies an EfficientNet's tensors: stem width, per-stage blocks and widths, head."""
  stem: int
  repeats: tuple
  channels: tuple
  head: int

  def describe(self) -> str:
    return (f"stem {self.stem}, blocks per stage {self.repeats}, stage channels "
            f"{self.channels}, head {self.head}")


def _builder():
  """Keras' EfficientNet module. Its public face (`keras.applications.efficientnet`) exports only
  EfficientNetB0..B7; the general `EfficientNet(width, depth, size)` they call, and its stage
  table, live beside them in keras.src."""
  from keras.src.applications import efficientnet  # pylint: disable=import-outside-toplevel
  return efficientnet


def _stages():
  return _builder().DEFAULT_BLOCKS_ARGS


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """Keras' (and timm's `round_channels`) rule: nearest multiple of 8, never 10% below."""
  filters *= width
  new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
  return int(new + divisor if new < 0.9 * filters else new)


def expected_layout(width: float, depth: float) -> Layout:
  """The layout the builder makes for these coefficients (without building it: L2 is 480M)."""
  stages = _stages()
  return Layout(stem=round_filters(32, width),
                repeats=tuple(int(math.ceil(depth * s["repeats"])) for s in stages),
                channels=tuple(round_filters(s["filters_out"], width) for s in stages),
                head=round_filters(1280, width))


def file_layout(weights: W.TimmWeights) -> Layout | None:
  """The layout of a timm EfficientNet state dict, or None if it is not one."""
  if len(weights.blocks) != len(_stages()) or "conv_head.weight" not in weights.tensors:
    return None
  repeats, channels = [], []
  for s in range(len(_stages())):
    blocks = weights.blocks.get(s)
    if not blocks or sorted(blocks) != list(range(len(blocks))):
      return None
    first = blocks[0]
    if "conv_dw.weight" not in first or "se.conv_reduce.weight" not in first:
      return None
    project = "conv_pwl.weight" if "conv_pwl.weight" in first else "conv_pw.weight"
    repeats.append(len(blocks))
    channels.append(weights.shape(f"blocks.{s}.0.{project}")[0])
  return Layout(stem=weights.shape("conv_stem.weight")[0], repeats=tuple(repeats),
                channels=tuple(channels), head=weights.shape("conv_head.weight")[0])


def _identify(weights: W.TimmWeights, path: str, model: str, width: float, depth: float) -> None:
  """Refuses, in one line naming what the file holds, weights that are not `model`'s."""
  found = file_layout(weights)
  if found is None:
    mnv4 = W.identify_timm(weights)
    if mnv4:
      raise ConfigError(f"{path} holds timm's {W.TIMM_NAMES[mnv4]} weights, not an "
                        f"EfficientNet; pass --model {mnv4}")
    raise ConfigError(f"{path}'s block layout is not a timm EfficientNet's (7 stages of "
                      "depthwise + squeeze-excite blocks); pass the model.safetensors of a timm "
                      "tf_efficientnet_* model")
  want = expected_layout(width, depth)
  if found == want:
    return
  others = [name for name, v in VARIANTS.items() if expected_layout(v.width, v.depth) == found]
  if others:
    raise ConfigError(f"{path} holds timm's {VARIANTS[others[0]].timm_name} ({others[0]}) "
                      f"weights, not {model}; pass --model {others[0]}")
  raise ConfigError(f"{path} has {found.describe()}, where {model} at width {width:g} and depth "
                    f"{depth:g} has {want.describe()}; pass the --model (or "
                    "--width_coefficient/--depth_coefficient) the file was made with")


def _check_config(config_path: str, config: dict, variant: Variant, model: str) -> dict:
  """Refuses architectures whose tensors look the same; returns the config's pretrained_cfg."""
  arch = str(config.get("architecture", "")).split(".")[0]
  if arch and arch != variant.timm_name:
    if arch.startswith("tf_efficientnet_") and arch[len("tf_efficientnet_"):] in {
        name[len("efficientnet_"):] for name in VARIANTS}:
      raise ConfigError(f"{config_path} names {arch}, but --model {model} is "
                        f"{variant.timm_name}; pass --model {arch[len('tf_'):]}")
    raise ConfigError(f"{config_path} names {arch}, not one of timm's TF-ported "
                      "tf_efficientnet_{b0..b8,l2}: other EfficientNets pad or normalise "
                      "differently (PyTorch-native efficientnet_* pad symmetrically with "
                      "BatchNorm epsilon 1e-5); convert a tf_efficientnet_* model")
  return config.get("pretrained_cfg") or {}


def _normalization_stats(inputs: str, mean, std):
  """Mean and variance for the builder's Normalization layer, which follows x / 255.

  project: x in [-1, 1] must give ((x + 1) / 2 - mean) / std = x / (2 std) + (0.5 - mean) / std;
  timm: x is already normalised, so the layer undoes the 1/255.
  """
  import numpy as np
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  if inputs == "project":
    scale = 2 * std / 255
    return ((mean - 0.5) * 2 / 255).astype(np.float32), (scale ** 2).astype(np.float32)
  return np.zeros(3, np.float32), np.full(3, (1 / 255) ** 2, np.float32)


def _load(layer, weights: W.TimmWeights, name: str) -> None:
  """timm tensor(s) `name` (a conv with optional bias, or a BatchNorm) into a Keras layer."""
  import keras
  if isinstance(layer, keras.layers.BatchNormalization):
    W.load_bn(layer, weights, name)
    return
  W.load_conv(layer, weights, f"{name}.weight")
  if layer.use_bias:
    W.assign(layer.bias, weights.take(f"{name}.bias"), f"{name}.bias", weights.source,
             weights.family)


def from_timm(path: str, *, model: str, inputs: str = "project", resolution: int | None = None,
              width: float | None = None, depth: float | None = None):
  """The Keras EfficientNet carrying timm's `tf_efficientnet_*` safetensors at `path`.

  Args:
    path: timm's model.safetensors (a config.json beside it is read when present).
    model: `efficientnet_b0` ... `efficientnet_b8`, `efficientnet_l2`.
    inputs: "project" ([-1, 1] images) or "timm" (timm-normalised images).
    resolution: the fixed input size; default config.json's, else the variant's.
    width, depth: override the variant's coefficients (for files made with other ones).

  Raises:
    ConfigError: one line, when the file holds another variant or architecture.
  """
  import keras
  if model not in VARIANTS:
    raise ConfigError(f"unknown EfficientNet --model {model!r}; choose one of "
                      f"{', '.join(VARIANTS)}")
  if inputs not in W.INPUTS:
    raise ConfigError(f"unknown --input {inputs!r}; choose {' or '.join(W.INPUTS)}")
  variant = VARIANTS[model]
  width = variant.width if width is None else width
  depth = variant.depth if depth is None else depth
  if width <= 0 or depth <= 0:
    raise ConfigError(f"--width_coefficient {width:g} and --depth_coefficient {depth:g} must be "
                      "positive")
  weights = W.TimmWeights(W.read_safetensors(path), path, family=FAMILY,
                          timm_names="tf_efficientnet_*")
  _identify(weights, path, model, width, depth)
  config_path, config = W.read_timm_config(path)
  pretrained = _check_config(config_path, config, variant, model)
  mean, std = pretrained.get("mean"), pretrained.get("std")
  if not (mean and std and len(mean) == 3 and len(std) == 3):
    mean, std = W.IMAGENET_MEAN, W.IMAGENET_STD
  input_size = pretrained.get("input_size") or [variant.resolution]
  resolution = resolution or int(input_size[-1])
  if resolution < 32:
    raise ConfigError(f"--resolution {resolution} is below Keras' EfficientNet minimum of 32")
  if "classifier.weight" not in weights.tensors:
    raise ConfigError(f"{path} has no classifier.weight (a headless timm model); convert a "
                      "checkpoint with its classifier")
  net = _builder().EfficientNet(
      width, depth, resolution, dropout_rate=variant.dropout, weights=None,
      input_shape=(resolution, resolution, 3), classes=weights.shape("classifier.weight")[0],
      classifier_activation=None, name=model)
  norm = next(l for l in net.layers if isinstance(l, keras.layers.Normalization))
  norm_mean, norm_var = _normalization_stats(inputs, mean, std)
  norm.adapt_mean.assign(norm_mean)
  norm.adapt_variance.assign(norm_var)
  norm.finalize_state()  # the layer reads mean/variance from these variables (as on load)
  _load(net.get_layer("stem_conv"), weights, "conv_stem")
  _load(net.get_layer("stem_bn"), weights, "bn1")
  for s, repeats in enumerate(expected_layout(width, depth).repeats):
    for i in range(repeats):
      name = f"block{s + 1}{chr(ord('a') + i)}_"
      names = {l.name for l in net.layers if l.name.startswith(name)}
      pairs = _MBCONV if f"{name}expand_conv" in names else _SEPARABLE
      for ours, theirs in pairs:
        _load(net.get_layer(name + ours), weights, f"blocks.{s}.{i}.{theirs}")
  _load(net.get_layer("top_conv"), weights, "conv_head")
  _load(net.get_layer("top_bn"), weights, "bn2")
  predictions = net.get_layer("predictions")
  W.assign(predictions.kernel, weights.take("classifier.weight").T, "classifier.weight", path,
           FAMILY)
  W.assign(predictions.bias, weights.take("classifier.bias"), "classifier.bias", path, FAMILY)
  leftover = weights.unused()
  if leftover:
    raise ConfigError(f"{path} has {len(leftover)} tensors the Keras {model} has no place for "
                      f"(e.g. {', '.join(leftover[:3])}); it is not a plain timm "
                      f"{variant.timm_name}")
  return net
