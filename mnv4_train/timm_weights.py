"""timm state dicts, read and copied into Keras layers: what the two weight converters share.

`mnv4_train.convert` (MobileNetV4) and `mnv4_train.convert_efficientnet` (the EfficientNet
teachers) both read timm's `model.safetensors` (and the `config.json` beside it), track which
tensors they took, copy PyTorch-layout convolutions and BatchNorms into Keras layers with a
one-line error for a shape that does not fit, and tell a MobileNetV4 file from an EfficientNet
one to word their refusals. Those pieces live here, so that neither converter imports the other
for them (`convert`'s command line dispatches to `convert_efficientnet`; nothing goes back).

NumPy and safetensors only (Keras for the layer types); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re

from mnv4_train.errors import ConfigError, InputPathError, first_line

# The input normalisation of timm's published MNv4 weights (their pretrained_cfg).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUTS = ("project", "timm")  # what the converted model takes: [-1, 1] or timm-normalised
TIMM_NAMES = {
    "conv_s": "mobilenetv4_conv_small",
    "conv_m": "mobilenetv4_conv_medium",
    "conv_l": "mobilenetv4_conv_large",
    "hybrid_m": "mobilenetv4_hybrid_medium",
    "hybrid_l": "mobilenetv4_hybrid_large",
}
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


# ---- which MobileNetV4 a file holds -------------------------------------------------------------

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
  """The MNv4 variant whose layout the file holds (stages 0-3 as the tables, stage 4 one 1x1
  conv), or None."""
  from mnv4_train.models.checkpoint import identify_signature
  stages = sorted(weights.blocks)
  if stages != list(range(5)) or len(weights.blocks[4]) != 1:
    return None
  if _timm_block(weights, 4, 0) != ("ConvBN", 1):
    return None
  signature = tuple(tuple(_timm_block(weights, s, i) for i in sorted(weights.blocks[s]))
                    for s in range(4))
  return identify_signature(signature)


# ---- into Keras layers --------------------------------------------------------------------------

def assign(variable, value, key: str, source: str, family: str = "MobileNetV4") -> None:
  """`variable.assign(value)`, or one line naming tensor `key` when the shapes differ."""
  if tuple(variable.shape) != tuple(value.shape):
    raise ConfigError(f"{source}: tensor {key} has shape {tuple(value.shape)} where our model "
                      f"expects {tuple(variable.shape)} ({variable.path}); the file's layout "
                      f"differs from timm's {family}")
  variable.assign(value)


def load_conv(layer, weights: TimmWeights, key: str) -> None:
  """timm's conv kernel `key` into a Keras Conv2D or DepthwiseConv2D `layer`."""
  import keras
  w = weights.take(key)
  # PyTorch (out, in/groups, kh, kw); Keras Conv2D (kh, kw, in, out), depthwise (kh, kw, in, 1).
  if isinstance(layer, keras.layers.DepthwiseConv2D):
    value = w.transpose(2, 3, 0, 1)
  else:
    value = w.transpose(2, 3, 1, 0)
  assign(layer.kernel, value, key, weights.source, weights.family)


def load_bn(layer, weights: TimmWeights, prefix: str) -> None:
  """timm's BatchNorm `prefix` (weight, bias, running mean and variance) into a Keras one."""
  for name, variable in zip(_BN, (layer.gamma, layer.beta, layer.moving_mean,
                                  layer.moving_variance)):
    assign(variable, weights.take(f"{prefix}.{name}"), f"{prefix}.{name}", weights.source,
           weights.family)
