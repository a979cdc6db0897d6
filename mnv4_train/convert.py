"""Import timm's MobileNetV4 weights (safetensors) into our Keras model, to start from a
pretrained network; or timm's TF-ported EfficientNets, as teachers.

    python -m mnv4_train.convert --from_timm model.safetensors --model conv_m --out conv_m.keras

(`--model efficientnet_b0` ... `efficientnet_l2` takes timm's `tf_efficientnet_*` weights, the
paper's teacher included: see mnv4_train/convert_efficientnet.py. What follows is MobileNetV4.)

Takes the `model.safetensors` file timm publishes for `mobilenetv4_conv_small|medium|large` and
`mobilenetv4_hybrid_medium|large` (any head size, any channel multiplier) and writes a `.keras`
file of our model carrying the same weights and the source's settings, so that its logits equal
timm's (eval mode, same NHWC input; tests/test_convert.py holds the parity to 1e-4):

- timm's conventions, not the Model Garden's: BatchNorm epsilon 1e-5 and momentum 0.9 (PyTorch's
  0.1), convolutions padded k//2 on every side (`padding="symmetric"`); Hybrid-L's exact GELU
  throughout comes with the variant.
- inputs: timm's MNv4 weights were trained on ImageNet-normalised images ((pixel / 255 - mean) /
  std). By default (`--input project`) the model takes the project's [-1, 1] images and a fixed
  first layer `input_norm` maps them onto timm's normalisation exactly, so it drops into our
  training and export unchanged; `--input timm` leaves that layer out (the model then takes
  timm-normalised images, as timm's does).
- every layer's channel count is read from the file, not recomputed from a width multiplier
  (timm keeps the stem at full width under a multiplier; our `width` rounding would not).
- which variant the file holds is read from its block layout (kinds, kernel sizes, attention
  heads), so a file of another variant, or not of MobileNetV4 at all, is refused in one line.
- timm's anti-aliased variants (`mobilenetv4_conv_aa_*`, `mobilenetv4_conv_blur_*`) blur-pool
  their strided convs, which our model does not; their weights are indistinguishable from the
  plain ones, so the `config.json` timm publishes beside `model.safetensors` is read when present:
  its architecture must be a plain `mobilenetv4_*` of the variant, and its `pretrained_cfg`
  mean/std (if any) set the input normalisation.

Runs on NumPy and safetensors only; nothing is downloaded. Where this sits: outside the training
flow, a way in for pretrained weights; the `.keras` it writes is what `mnv4_train.export` and the
trainer load. Layout of timm's state dict (timm 1.0): `conv_stem`/`bn1`, `blocks.{stage}.{i}`
(stages 0-3 are the paper's tables, stage 4 the 1x1 conv to 960), `conv_head`/`norm_head`,
`classifier`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import zipfile

from mnv4_train import ownership
from mnv4_train.errors import (ArgumentParser, ConfigError, InputPathError, exit_on_user_error,
                               first_line, run_then_exit)
from mnv4_train.models import specs as S

TIMM_NAMES = {
    "conv_s": "mobilenetv4_conv_small",
    "conv_m": "mobilenetv4_conv_medium",
    "conv_l": "mobilenetv4_conv_large",
    "hybrid_m": "mobilenetv4_hybrid_medium",
    "hybrid_l": "mobilenetv4_hybrid_large",
}
# The source's settings (timm builds every MNv4 with PyTorch BatchNorm defaults and k//2 padding).
TIMM_SETTINGS = dict(padding="symmetric", bn_epsilon=1e-5, bn_momentum=0.9)
# The input normalisation of timm's published MNv4 weights (their pretrained_cfg).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUTS = ("project", "timm")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
_BN = ("weight", "bias", "running_mean", "running_var")


class TimmWeights:
  """A timm state dict (MobileNetV4 or EfficientNet): tensors by name, grouped into blocks,
  tracking use. `family` and `timm_names` only word the errors."""

  def __init__(self, tensors: dict, source: str, *, family: str = "MobileNetV4",
               timm_names: str = "mobilenetv4_*"):
    self.tensors = tensors
    self.source = source
    self.family = family
    self.used: set[str] = set()
    self.blocks: dict[int, dict[int, set[str]]] = {}
    for key in tensors:
      match = _BLOCK_KEY.match(key)
      if match:
        self.blocks.setdefault(int(match[1]), {}).setdefault(int(match[2]), set()).add(match[3])
    if "conv_stem.weight" not in tensors or not self.blocks:
      sample = ", ".join(sorted(tensors)[:3]) or "no tensors"
      raise ConfigError(f"{source} is not a timm {family} checkpoint (no conv_stem.weight and "
                        f"blocks.N.M tensors; it has {sample}, ...); pass the model.safetensors "
                        f"of a timm {timm_names} model")

  def take(self, key: str):
    if key not in self.tensors:
      raise ConfigError(f"{self.source} lacks tensor {key}; it is not a timm {self.family} "
                        "layout this converter knows")
    self.used.add(key)
    return self.tensors[key]

  def shape(self, key: str) -> tuple:
    return tuple(self.tensors[key].shape)

  def unused(self) -> list[str]:
    return sorted(k for k in self.tensors
                  if k not in self.used and not k.endswith("num_batches_tracked"))


def read_safetensors(path: str) -> dict:
  """All tensors of a safetensors file as float32 NumPy arrays (integer counters kept as is)."""
  import numpy as np
  if not os.path.isfile(path):
    raise InputPathError(f"--from_timm {path} does not exist; pass timm's model.safetensors")
  try:
    from safetensors.numpy import load_file
    tensors = load_file(path)
  except Exception as e:  # noqa: BLE001  a corrupt or foreign file is the user's to fix
    reason = first_line(e, limit=200)
    raise InputPathError(f"cannot read {path} as a safetensors file ({reason})") from None
  return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
          for k, v in tensors.items()}


def _timm_block(weights: TimmWeights, stage: int, index: int) -> tuple:
  """The block signature (see models/checkpoint.py) of timm block `blocks.{stage}.{index}`."""
  keys = weights.blocks[stage][index]
  prefix = f"blocks.{stage}.{index}."
  kernel = lambda k: weights.shape(prefix + k)[2] if k in keys else 0
  if "attn.query.proj.weight" in keys:
    key_dim = weights.shape(prefix + "attn.key.proj.weight")[0]
    heads = weights.shape(prefix + "attn.query.proj.weight")[0] // key_dim
    return ("MQA", heads, key_dim, "attn.key.down_conv.weight" in keys)
  if "pw_exp.conv.weight" in keys:
    return ("UIB", kernel("dw_start.conv.weight"), kernel("dw_mid.conv.weight"))
  if "conv_exp.weight" in keys:
    return ("FusedIB", kernel("conv_exp.weight"))
  if "conv.weight" in keys:
    return ("ConvBN", kernel("conv.weight"))
  return ("unknown", tuple(sorted(keys))[:2])


def identify_timm(weights: TimmWeights) -> str | None:
  """The variant whose layout the file holds: stages 0-3 as the tables, stage 4 one 1x1 conv."""
  from mnv4_train.models.checkpoint import identify_signature
  stages = sorted(weights.blocks)
  if stages != list(range(5)) or len(weights.blocks[4]) != 1:
    return None
  if _timm_block(weights, 4, 0) != ("ConvBN", 1):
    return None
  signature = tuple(tuple(_timm_block(weights, s, i) for i in sorted(weights.blocks[s]))
                    for s in range(4))
  return identify_signature(signature)


def _out_channels(weights: TimmWeights, spec) -> dict[str, int]:
  """Our `filters` overrides: every layer's output channels as the file has them."""
  filters = {"stem": weights.shape("conv_stem.weight")[0],
             "stage4_conv": weights.shape("blocks.4.0.conv.weight")[0],
             "head_conv": weights.shape("conv_head.weight")[0]}
  for s, stage in enumerate(spec.stages):
    for i, block in enumerate(stage):
      keys = weights.blocks[s][i]
      for key in ("pw_proj.conv.weight", "conv_pwl.weight", "conv.weight"):
        if key in keys:
          filters[f"stage{s}_block{i}"] = weights.shape(f"blocks.{s}.{i}.{key}")[0]
          break
  return filters


def _assign(variable, value, key: str, source: str, family: str = "MobileNetV4") -> None:
  if tuple(variable.shape) != tuple(value.shape):
    raise ConfigError(f"{source}: tensor {key} has shape {tuple(value.shape)} where our model "
                      f"expects {tuple(variable.shape)} ({variable.path}); the file's layout "
                      f"differs from timm's {family}")
  variable.assign(value)


def _conv(layer, weights: TimmWeights, key: str) -> None:
  import keras
  w = weights.take(key)
  # PyTorch (out, in/groups, kh, kw); Keras Conv2D (kh, kw, in, out), depthwise (kh, kw, in, 1).
  if isinstance(layer, keras.layers.DepthwiseConv2D):
    value = w.transpose(2, 3, 0, 1)
  else:
    value = w.transpose(2, 3, 1, 0)
  _assign(layer.kernel, value, key, weights.source, weights.family)


def _bn(layer, weights: TimmWeights, prefix: str) -> None:
  for name, variable in zip(_BN, (layer.gamma, layer.beta, layer.moving_mean,
                                  layer.moving_variance)):
    _assign(variable, weights.take(f"{prefix}.{name}"), f"{prefix}.{name}", weights.source,
            weights.family)


def _ops(block) -> dict:
  return {op.name: op for op in block.ops_}


def _load_mqa(block, weights: TimmWeights, prefix: str) -> None:
  _bn(block.norm, weights, f"{prefix}.norm")
  _conv(block.query[-1], weights, f"{prefix}.attn.query.proj.weight")
  for branch, ops in (("key", block.key), ("value", block.value)):
    named = {op.name: op for op in ops}
    if f"{branch}_dw" in named:
      _conv(named[f"{branch}_dw"], weights, f"{prefix}.attn.{branch}.down_conv.weight")
      _bn(named[f"{branch}_dw_bn"], weights, f"{prefix}.attn.{branch}.norm")
    _conv(named[f"{branch}_proj"], weights, f"{prefix}.attn.{branch}.proj.weight")
  _conv(block.output_proj, weights, f"{prefix}.attn.output.proj.weight")
  if block.layer_scale is not None:
    _assign(block.layer_scale.gamma, weights.take(f"{prefix}.layer_scale.gamma"),
            f"{prefix}.layer_scale.gamma", weights.source)


def _chain_loader(pairs):
  """Loads a block whose sublayers are one chain (`ops_`): (our conv, timm conv key, our BN,
  timm BN prefix) per conv the block may hold, then its layer scale if any."""
  def load(block, weights: TimmWeights, prefix: str) -> None:
    ops = _ops(block)
    for conv, conv_key, bn, bn_key in pairs:
      if conv in ops:
        _conv(ops[conv], weights, f"{prefix}.{conv_key}")
        _bn(ops[bn], weights, f"{prefix}.{bn_key}")
    if "layer_scale" in ops:
      _assign(ops["layer_scale"].gamma, weights.take(f"{prefix}.layer_scale.gamma"),
              f"{prefix}.layer_scale.gamma", weights.source)
  return load


# How timm names each kind of block's tensors, by the block record its layer builds.
_TIMM_LOADERS = {
    S.ConvBN: _chain_loader([("conv", "conv.weight", "bn", "bn1")]),
    S.FusedIB: _chain_loader([("expand", "conv_exp.weight", "expand_bn", "bn1"),
                              ("project", "conv_pwl.weight", "project_bn", "bn2")]),
    S.UIB: _chain_loader([("start_dw", "dw_start.conv.weight", "start_dw_bn", "dw_start.bn"),
                          ("expand", "pw_exp.conv.weight", "expand_bn", "pw_exp.bn"),
                          ("middle_dw", "dw_mid.conv.weight", "middle_dw_bn", "dw_mid.bn"),
                          ("project", "pw_proj.conv.weight", "project_bn", "pw_proj.bn")]),
    S.MQA: _load_mqa,
}


def _load_block(block, weights: TimmWeights, prefix: str) -> None:
  from mnv4_train.models import layers as L
  _TIMM_LOADERS[type(L.block_spec_of(block))](block, weights, prefix)


def read_timm_config(path: str) -> tuple[str, dict]:
  """(path, contents) of the config.json timm publishes beside `path`; ("", {}) if none."""
  config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
  if not os.path.isfile(config_path):
    return "", {}
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise InputPathError(f"{config_path} beside {path} is not readable JSON ({e}); fix or move "
                         "it") from None
  return config_path, config if isinstance(config, dict) else {}


def _check_config(config_path: str, config: dict, model: str) -> tuple | None:
  """Refuses architectures the weights cannot tell apart; returns the config's (mean, std)."""
  arch = str(config.get("architecture", "")).split(".")[0]
  if arch:
    if "_aa_" in arch or "_blur_" in arch:
      raise ConfigError(f"{config_path} names {arch}, an anti-aliased MobileNetV4 (blur-pooled "
                        "strided convs) that our model does not implement; convert a plain "
                        "mobilenetv4_* model")
    if not arch.startswith(TIMM_NAMES[model]):
      raise ConfigError(f"{config_path} names {arch}, but the weights have the {model} layout "
                        f"({TIMM_NAMES[model]}); the folder mixes files of two models")
  pretrained = config.get("pretrained_cfg") or {}
  mean, std = pretrained.get("mean"), pretrained.get("std")
  if mean and std and len(mean) == 3 and len(std) == 3:
    return tuple(mean), tuple(std)
  return None


def from_timm(path: str, *, model: str, inputs: str = "project"):
  """Our Keras `model` variant carrying the weights of timm's MobileNetV4 safetensors at `path`.

  `inputs="project"` gives a model taking [-1, 1] images (timm's ImageNet normalisation is its
  fixed first layer); `"timm"` one taking timm-normalised images. Raises ConfigError if the file
  holds another variant (naming it) or is not a timm MNv4.
  """
  if inputs not in INPUTS:
    raise ConfigError(f"unknown --input {inputs!r}; choose {' or '.join(INPUTS)}")
  from mnv4_train import models
  spec = models.get_spec(model)
  weights = TimmWeights(read_safetensors(path), path)
  found = identify_timm(weights)
  if found is None:
    from mnv4_train import convert_efficientnet  # pylint: disable=import-outside-toplevel
    if convert_efficientnet.file_layout(weights) is not None:
      raise ConfigError(f"{path} holds a timm EfficientNet, not a MobileNetV4; pass --model "
                        "efficientnet_b0 ... efficientnet_l2 (the variant it is)")
    raise ConfigError(f"{path}'s block layout matches no MobileNetV4 variant; pass the "
                      f"model.safetensors of one of timm's {', '.join(TIMM_NAMES.values())}")
  if found != model:
    raise ConfigError(f"{path} holds timm's {TIMM_NAMES[found]} ({found}) weights, not "
                      f"{model}; pass --model {found}")
  config_path, config = read_timm_config(path)
  source_norm = _check_config(config_path, config, model) or (IMAGENET_MEAN, IMAGENET_STD)
  if "classifier.weight" not in weights.tensors:
    raise ConfigError(f"{path} has no classifier.weight (a headless timm model); convert a "
                      "checkpoint with its classifier")
  num_classes = weights.shape("classifier.weight")[0]
  normalization = source_norm if inputs == "project" else None
  keras_model = models.build(model, num_classes=num_classes, filters=_out_channels(weights, spec),
                             source_normalization=normalization, **TIMM_SETTINGS)
  stem = _ops(keras_model.get_layer("stem"))
  _conv(stem["conv"], weights, "conv_stem.weight")
  _bn(stem["bn"], weights, "bn1")
  for s, stage in enumerate(spec.stages):
    for i in range(len(stage)):
      _load_block(keras_model.get_layer(f"stage{s}_block{i}"), weights, f"blocks.{s}.{i}")
  _load_block(keras_model.get_layer("stage4_conv"), weights, "blocks.4.0")
  head = _ops(keras_model.get_layer("head_conv"))
  _conv(head["conv"], weights, "conv_head.weight")
  _bn(head["bn"], weights, "norm_head")
  logits = keras_model.get_layer("logits")
  _assign(logits.kernel, weights.take("classifier.weight").T, "classifier.weight", path)
  _assign(logits.bias, weights.take("classifier.bias"), "classifier.bias", path)
  leftover = weights.unused()
  if leftover:
    raise ConfigError(f"{path} has {len(leftover)} tensors our {model} has no place for (e.g. "
                      f"{', '.join(leftover[:3])}); it is not a plain timm {TIMM_NAMES[model]}")
  return keras_model


def check_out(out: str, overwrite: bool, inputs: dict) -> None:
  """Refuses an `--out` that overlaps an input, or that exists and is not a Keras model file
  (one is replaced only with `overwrite`)."""
  ownership.check_overlap(out, inputs)
  if not os.path.lexists(out):
    return
  if os.path.isdir(out) or not zipfile.is_zipfile(out) or "config.json" not in (
      zipfile.ZipFile(out).namelist()):
    raise InputPathError(f"--out {out} exists and is not a .keras model file; it is never "
                         "replaced: choose another --out")
  if not overwrite:
    raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it or choose "
                      "another --out")


def save_keras(model, out: str) -> None:
  """`model.save` through a temporary name in the same folder, renamed into place."""
  folder = os.path.dirname(os.path.abspath(out))
  tmp = None
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".keras", dir=folder)
    os.close(fd)
    model.save(tmp)
    os.replace(tmp, out)
  except OSError as e:
    problem = ownership.storage_problem(e, folder)
    if problem is not None:
      raise problem from None
    raise
  finally:
    if tmp and os.path.exists(tmp):
      os.remove(tmp)


def _convert_efficientnet(args) -> None:
  from mnv4_train import convert_efficientnet as E
  model = E.from_timm(args.from_timm, model=args.model, inputs=args.input,
                      resolution=args.resolution, width=args.width_coefficient,
                      depth=args.depth_coefficient)
  save_keras(model, args.out)
  size = model.input_shape[1]
  print(f"wrote {args.out}: {args.model} from timm's {E.VARIANTS[args.model].timm_name}, "
        f"{model.get_layer('predictions').units} classes, {model.count_params():,} parameters, "
        f"fixed {size}x{size} input (data_prep.distill reads it from the file); inputs: "
        + ("[-1, 1] (--teacher_input minus_one_to_one)" if args.input == "project"
           else "ImageNet mean/std-normalised, as timm"))


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(prog="mnv4_train.convert", description=__doc__.split("\n")[0])
  parser.add_argument("--from_timm", required=True, metavar="SAFETENSORS",
                      help="timm's model.safetensors of a mobilenetv4_* or tf_efficientnet_* "
                           "model")
  parser.add_argument("--model", required=True,
                      help="the variant the file holds: conv_s ... hybrid_l (MobileNetV4), or "
                           "efficientnet_b0 ... efficientnet_b8, efficientnet_l2 (timm's "
                           "tf_efficientnet_*, see mnv4_train/convert_efficientnet.py)")
  parser.add_argument("--out", required=True, help="the .keras file to write")
  parser.add_argument("--input", default="project", choices=INPUTS,
                      help="project (default): the model takes [-1, 1] images; timm: it takes "
                           "ImageNet mean/std-normalised images, as timm's model does")
  parser.add_argument("--resolution", type=int, default=None,
                      help="EfficientNet only: the fixed input size (TF 'same' padding depends "
                           "on it; default: config.json's input size, else the variant's)")
  parser.add_argument("--width_coefficient", type=float, default=None,
                      help="EfficientNet only: override the variant's width coefficient")
  parser.add_argument("--depth_coefficient", type=float, default=None,
                      help="EfficientNet only: override the variant's depth coefficient")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing .keras file at --out (nothing else is replaced)")
  args = parser.parse_args(argv)
  with exit_on_user_error(parser.prog):
    if not args.out.endswith(".keras"):
      raise ConfigError(f"--out {args.out} must end in .keras (a Keras 3 model file)")
    check_out(args.out, args.overwrite, {"--from_timm": args.from_timm})
    if args.model.startswith("efficientnet"):
      _convert_efficientnet(args)
      return 0
    extra = [f for f in ("resolution", "width_coefficient", "depth_coefficient")
             if getattr(args, f) is not None]
    if extra:
      raise ConfigError(f"--{extra[0]} is for EfficientNet teachers (--model efficientnet_*); "
                        f"a MobileNetV4 --model {args.model} takes the file's own layout")
    model = from_timm(args.from_timm, model=args.model, inputs=args.input)
    save_keras(model, args.out)
    stem = model.get_layer("stem")
    print(f"wrote {args.out}: {args.model} from timm's {TIMM_NAMES[args.model]}, "
          f"{model.get_layer('logits').units} classes, {model.count_params():,} parameters; "
          f"padding={stem.padding}, BatchNorm epsilon={stem.bn_epsilon}, "
          f"activation={stem.activation}; inputs: "
          + ("[-1, 1] (pixel / 127.5 - 1)" if args.input == "project"
             else "ImageNet mean/std-normalised, as timm"))
  return 0


if __name__ == "__main__":
  run_then_exit(main)
