"""Loading `.keras` checkpoints and telling which MNv4 variant a model or weight file holds.

A variant is recognised by its block structure, not by its name: per stage, the kind of each
block and its kernel sizes (or, for attention, its heads, key dim and key/value downsampling).
That layout is unique to each variant at any width, so a checkpoint renamed, built with another
width or imported from timm is still identified. The export CLI and the latency benchmark load
checkpoints through `load_checkpoint`; the timm converter (`mnv4_train/convert.py`) builds the
same signature from a state dict.
"""

from __future__ import annotations

import os
import re

from mnv4_train.errors import ConfigError, InputPathError, first_line
from mnv4_train.models import specs as S

_BLOCK_NAME = re.compile(r"^stage(\d+)_block(\d+)$")


def block_signature(block: S.Block) -> tuple:
  """What identifies a block of a spec table: kind and kernels (attention: heads, dims, kv)."""
  return block.signature


def spec_signature(spec: S.ModelSpec) -> tuple:
  return tuple(tuple(block_signature(b) for b in stage) for stage in spec.stages)


def identify_signature(signature: tuple) -> str | None:
  """The variant whose table has this layout, or None."""
  for name in S.MODEL_NAMES:
    if spec_signature(S.get_spec(name)) == signature:
      return name
  return None


def _layer_signature(layer) -> tuple | None:
  from mnv4_train.models import layers as L
  block = L.block_spec_of(layer)
  return block.signature if block is not None else None


def model_signature(model) -> tuple | None:
  """The layout of a built model's `stage{i}_block{j}` layers, or None if it has none."""
  stages: dict[int, dict[int, tuple]] = {}
  for layer in model.layers:
    match = _BLOCK_NAME.match(layer.name)
    if match:
      stages.setdefault(int(match[1]), {})[int(match[2])] = _layer_signature(layer)
  if not stages or sorted(stages) != list(range(len(stages))):
    return None
  return tuple(tuple(stage[j] for j in sorted(stage)) for _, stage in sorted(stages.items()))


def identify(model) -> str | None:
  """The MNv4 variant a built Keras model is, or None if it is not one of ours."""
  signature = model_signature(model)
  return identify_signature(signature) if signature else None


def load_checkpoint(path: str, *, model: str):
  """Loads a `.keras` checkpoint and checks that it holds variant `model`.

  Raises InputPathError for a missing or unreadable file and ConfigError when the file holds
  another variant (naming it) or no MNv4 model at all.
  """
  S.get_spec(model)  # an unknown name fails first, listing the valid ones
  if not os.path.isfile(path):
    raise InputPathError(f"checkpoint {path} does not exist; pass a .keras file saved with "
                         "model.save('name.keras')")
  if not path.endswith(".keras"):
    raise ConfigError(f"checkpoint {path} is not a .keras file; save the model with Keras 3 "
                      "model.save('name.keras')")
  import keras

  import mnv4_train.models.layers  # noqa: F401  registers our layers for deserialisation
  try:
    loaded = keras.saving.load_model(path, compile=False)
  except Exception as e:  # noqa: BLE001  any failure to read the file is the user's to fix
    reason = first_line(e)
    raise InputPathError(f"cannot load checkpoint {path} as a Keras 3 .keras file "
                         f"({reason[:200]})") from None
  found = identify(loaded)
  if found is None:
    raise ConfigError(f"checkpoint {path} holds no MNv4 model (model {loaded.name!r} has no "
                      "stage{i}_block{j} layout of any variant); export models built by "
                      "mnv4_train.models.build")
  if found != model:
    raise ConfigError(f"checkpoint {path} holds a {found} model, not {model}; pass "
                      f"--model {found}")
  return loaded
