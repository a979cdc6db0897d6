"""Turns a `ModelSpec` table into a `keras.Model`.

    model = mnv4_train.models.build("conv_l", num_classes=1000)

The model is functional: stem -> blocks `stage{i}_block{j}` -> stage 4 ConvBN 1x1 -> global
average pool -> head ConvBN 1x1 (1280) -> dropout -> linear classifier (logits, no softmax).
Inputs are float images, NHWC; normalisation is the input pipeline's job.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import keras

from mnv4_train.errors import ConfigError
from mnv4_train.models import layers as L
from mnv4_train.models import specs as S

DROP_PATH_SCHEDULES = ("flat", "linear")


def scale_filters(filters: int, width: float) -> int:
  """The Model Garden's width rounding (`round_filters`): multiple of 8, at least 8."""
  return filters if width == 1.0 else S.make_divisible(filters * width)


def _check_options(spec, *, num_classes, width, resolution, dropout, drop_path_rate,
                   drop_path_schedule, padding, activation):
  problems = []
  if not isinstance(num_classes, int) or num_classes < 1:
    problems.append(f"num_classes must be a positive integer, got {num_classes!r}")
  if not width > 0:
    problems.append(f"width must be > 0, got {width!r}")
  if resolution is not None and (not isinstance(resolution, int) or resolution < 32):
    problems.append(f"resolution must be an integer >= 32, got {resolution!r}")
  if not 0 <= dropout < 1:
    problems.append(f"dropout must be in [0, 1), got {dropout!r}")
  if not 0 <= drop_path_rate < 1:
    problems.append(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
  if drop_path_schedule not in DROP_PATH_SCHEDULES:
    problems.append(f"drop_path_schedule must be one of {DROP_PATH_SCHEDULES}, "
                    f"got {drop_path_schedule!r}")
  if padding not in L.PADDINGS:
    problems.append(f"padding must be one of {L.PADDINGS}, got {padding!r}")
  if activation is not None and activation not in ("relu", "gelu"):
    problems.append(f"activation must be 'relu' or 'gelu', got {activation!r}")
  if problems:
    raise ConfigError(f"{spec.name}: " + "; ".join(problems))


def build(
    name: str,
    *,
    num_classes: int = 1000,
    width: float = 1.0,
    resolution: int | None = None,
    dropout: float = 0.0,
    drop_path_rate: float = 0.0,
    drop_path_schedule: str = "flat",
    bn_momentum: float = 0.997,
    bn_epsilon: float = 1e-3,
    padding: str = "same",
    activation: str | None = None,
    layer_scale_init_value: float = 1e-5,
    filters: Mapping[str, int] | None = None,
    source_normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    model_name: str | None = None,
) -> keras.Model:
  """Builds an MNv4 variant by name (`conv_s`, `conv_m`, `conv_l`, `hybrid_m`, `hybrid_l`).

  Args:
    name: variant name; an unknown one raises `ConfigError` listing the valid names.
    num_classes: classifier outputs.
    width: channel multiplier, rounded as the Model Garden does (multiples of 8, the 1280-wide
      head kept); < 1 gives tiny test models. Attention heads and key dims are not scaled.
    resolution: fixed input size; None (default) builds a model that takes any size.
    dropout: dropout before the classifier.
    drop_path_rate: stochastic depth on residual blocks. "flat" applies the same rate to every
      block (the Model Garden default); "linear" ramps it with depth as the Model Garden does
      (`block_drop_path_rate`).
    bn_momentum, bn_epsilon: BatchNorm settings (defaults: the Model Garden MNv4 recipes; timm
      weights use epsilon 1e-5, short local runs want momentum ~0.9).
    padding: "same" (TensorFlow/Model Garden) or "symmetric" (timm/PyTorch).
    activation: override the variant's activation ("relu" or "gelu"); None keeps the table's.
    layer_scale_init_value: initial layer-scale value in the hybrids' UIB and MQA blocks.
    filters: explicit output channels by top-level layer name (`stem`, `stage{i}_block{j}`,
      `stage4_conv`, `head_conv`), overriding `width` for those layers. For imported weights
      whose channels were rounded another way (timm keeps the stem at full width under a
      channel multiplier): the source's counts are taken, not approximated. MQA blocks keep
      their input width and take no entry.
    source_normalization: (mean, std) per RGB channel of pixel / 255 that imported weights were
      trained on (timm: ImageNet's). The model still takes the project's [-1, 1] inputs: a
      fixed first layer `input_norm` maps them onto the source's normalisation exactly.
    model_name: Keras model name (default `mnv4_<name>`).
  """
  spec = S.get_spec(name)
  _check_options(spec, num_classes=num_classes, width=width, resolution=resolution,
                 dropout=dropout, drop_path_rate=drop_path_rate,
                 drop_path_schedule=drop_path_schedule, padding=padding, activation=activation)
  chosen = _check_filters(spec, filters)
  out = lambda layer_name, default: chosen.get(layer_name, scale_filters(default, width))
  common = dict(activation=activation or spec.activation, padding=padding,
                bn_momentum=bn_momentum, bn_epsilon=bn_epsilon)
  layer_scale = layer_scale_init_value if spec.layer_scale else None
  blocks = spec.blocks

  inputs = x = keras.Input(shape=(resolution, resolution, 3), name="image")
  if source_normalization is not None:
    x = _input_norm(spec, source_normalization)(x)
  x = L.ConvBNAct(out("stem", spec.stem_filters), 3, 2, name="stem", **common)(x)
  index = 0
  for stage_id, stage in enumerate(spec.stages):
    for block_id, block in enumerate(stage):
      rate = block_drop_path_rate(block, index, len(blocks), drop_path_rate, drop_path_schedule)
      index += 1
      block_name = f"stage{stage_id}_block{block_id}"
      x = L.block_layer(block, filters=out(block_name, block.filters), layer_scale=layer_scale,
                        drop_path_rate=rate, name=block_name, **common)(x)
  x = L.ConvBNAct(out("stage4_conv", spec.last_filters), 1, name="stage4_conv", **common)(x)
  x = keras.layers.GlobalAveragePooling2D(keepdims=True, name="pool")(x)
  # The head keeps its full width at any multiplier (the Model Garden's finegrain mode).
  x = L.ConvBNAct(chosen.get("head_conv", spec.head_filters), 1, name="head_conv", **common)(x)
  x = keras.layers.Flatten(name="flatten")(x)
  if dropout:
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
  outputs = keras.layers.Dense(num_classes, name="logits", dtype="float32")(x)
  return keras.Model(inputs, outputs, name=model_name or f"mnv4_{name}")


def block_drop_path_rate(block, index: int, num_blocks: int, rate: float,
                         schedule: str) -> float:
  """The stochastic-depth rate of the `index`-th of `num_blocks` stage blocks.

  As the Model Garden's MobileNet backbone: "flat" gives every block `rate`; "linear" gives
  `rate * (i + 1) / n` (`nn_layers.get_stochastic_depth_rate`), where i is the block's position
  in the Model Garden's block list and n that list's length. Its list also holds the stem
  (before the stage blocks) and the last 1x1 conv, the global pooling and the head conv (after
  them), so i = index + 1 and n = num_blocks + 4: the last stage block gets rate * (n - 3) / n,
  never the full rate. Its attention (MQA) blocks take the flat `rate` under either schedule.
  """
  if schedule == "flat" or isinstance(block, S.MQA):
    return rate
  return rate * (index + 2) / (num_blocks + 4)


def _input_norm(spec, source_normalization) -> keras.layers.Layer:
  """[-1, 1] (pixel / 127.5 - 1) -> (pixel / 255 - mean) / std, per channel."""
  try:
    mean, std = (tuple(float(v) for v in values) for values in source_normalization)
  except (TypeError, ValueError):
    mean = std = ()
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ConfigError(f"{spec.name}: source_normalization must be (mean, std) with three values "
                      f"each and std > 0, got {source_normalization!r}")
  # pixel / 255 = (x + 1) / 2, so (pixel / 255 - mean) / std = x * 0.5 / std + (0.5 - mean) / std.
  return keras.layers.Rescaling(scale=[0.5 / s for s in std],
                                offset=[(0.5 - m) / s for m, s in zip(mean, std)],
                                name="input_norm")


def _check_filters(spec, filters) -> dict[str, int]:
  """The `filters` overrides, checked against the variant's layer names."""
  if not filters:
    return {}
  valid = {"stem", "stage4_conv", "head_conv"} | {
      f"stage{i}_block{j}" for i, stage in enumerate(spec.stages)
      for j, block in enumerate(stage) if not isinstance(block, S.MQA)}
  unknown = sorted(set(filters) - valid)
  if unknown:
    raise ConfigError(f"{spec.name}: filters has no layer {', '.join(unknown)}; valid names are "
                      "stem, stage{i}_block{j} (not MQA blocks), stage4_conv, head_conv")
  bad = sorted(k for k, v in filters.items() if not isinstance(v, int) or v < 1)
  if bad:
    raise ConfigError(f"{spec.name}: filters for {', '.join(bad)} must be positive integers")
  return dict(filters)


def canonical_resolution(name: str) -> int:
  return S.get_spec(name).resolution

