"""Loading `.keras` checkpoints and telling which MNv4 variant a model or weight file holds.

A variant is recognised by its block structure, not by its name: per stage, the kind of each
block and its kernel sizes (or, for attention, its heads, key dim and key/value downsampling).
That layout is unique to each variant at any width, so a checkpoint renamed, built with another
width or imported from timm is still identified. The export CLI and the latency benchmark load
checkpoints through `load_checkpoint`; the timm converters (`mnv4_train/timm_weights.py`) build
the same signature from a state dict.

`load_model` is the one loader of saved models in the project: the trainer's online teacher,
the distillation job's teacher, select_d3's classifier and `load_checkpoint` all go through it.
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


def load_model(path: str, *, what: str = "model", saved_model: bool = True):
  """Loads a Keras 3 `.keras` file or (with `saved_model`) a TensorFlow SavedModel folder.

  The MNv4 layers are registered first, so our models load in any process (a Beam worker
  too). SavedModels, which Keras 3 no longer loads, go through `tf.saved_model.load`.

  Args:
    path: a local or bucket path (Keras 3.15 copies a bucket `.keras` file to a local temporary
      file itself; TensorFlow reads a bucket SavedModel).
    what: how the user gave the path (e.g. "--teacher", "loss.teacher_model"), for the error.
    saved_model: accept a SavedModel folder as well as a `.keras` file.

  Raises:
    InputPathError: one line, when the path does not exist or does not load.
  """
  # pylint: disable=import-outside-toplevel
  import keras
  import tensorflow as tf

  import mnv4_train.models.layers  # noqa: F401  # pylint: disable=unused-import  (registers them)
  kinds = "a Keras 3 .keras file" + (" or a SavedModel folder" if saved_model else "")
  if not tf.io.gfile.exists(path):
    raise InputPathError(f"{what} {path} does not exist; pass {kinds}")
  try:
    if saved_model and tf.io.gfile.isdir(path):
      return tf.saved_model.load(path)
    return keras.saving.load_model(path, compile=False)
  except Exception as e:  # noqa: BLE001  any failure to read the file is the user's to fix
    raise InputPathError(f"cannot load {what} {path} as {kinds} ({first_line(e, limit=200)})"
                         ) from None


def _isfile(path: str) -> bool:
  """A local file, or a `gs://` (any tf.io.gfile URL) object that is not a folder."""
  if "://" not in path:
    return os.path.isfile(path)
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path)


def load_checkpoint(path: str, *, model: str):
  """Loads a `.keras` checkpoint and checks that it holds variant `model`.

  Raises InputPathError for a missing or unreadable file and ConfigError when the file holds
  another variant (naming it) or no MNv4 model at all. `path` may be a `gs://` object.
  """
  S.get_spec(model)  # an unknown name fails first, listing the valid ones
  if not _isfile(path):
    raise InputPathError(f"checkpoint {path} does not exist; pass a .keras file saved with "
                         "model.save('name.keras')")
  if not path.endswith(".keras"):
    raise ConfigError(f"checkpoint {path} is not a .keras file; save the model with Keras 3 "
                      "model.save('name.keras')")
  loaded = load_model(path, what="checkpoint", saved_model=False)
  found = identify(loaded)
  if found is None:
    raise ConfigError(f"checkpoint {path} holds no MNv4 model (model {loaded.name!r} has no "
                      "stage{i}_block{j} layout of any variant); export models built by "
                      "mnv4_train.models.build")
  if found != model:
    raise ConfigError(f"checkpoint {path} holds a {found} model, not {model}; pass "
                      f"--model {found}")
  return loaded
