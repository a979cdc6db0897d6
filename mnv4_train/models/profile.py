"""Per-layer cost of a built model: MACs, weights and activation traffic.

Counts what the reference counts (timm's FlopCounterMode with attention as explicit matmuls):
multiply-accumulates of convolutions, depthwise convolutions, dense layers and the two
attention matmuls (QK^T and AV). BatchNorm, activations, layer scale, pooling and residual adds
are not counted (BatchNorm folds into the preceding conv at inference).

Activation traffic is the roofline model of the paper's section 3: each MAC layer reads its input
and writes its output once, at batch 1. The summary CLI and the roofline analysis
(`mnv4_train/roofline.py`) build on this. Besides our MNv4 models, `layer_costs` walks any
functional Keras model with a fixed input size (the keras.applications baselines of the
roofline), counting the same things: a grouped conv with one group per channel is a depthwise
conv, and a dense layer on a feature map is a 1x1 conv.
"""

from __future__ import annotations

import dataclasses
import math

import keras

from mnv4_train.models import layers as L
from mnv4_train.models import specs as S


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """One MAC-bearing op: `path` like `stage2_block4/key_proj`, `kind` conv|dwconv|dense|attention."""
  path: str
  stage: str
  kind: str
  macs: int
  weights: int      # parameters this op reads (its kernel/bias), not BatchNorm statistics
  input_elems: int  # activation elements read (for attention: both operands)
  output_elems: int
  out_size: int = 0  # output height (square inputs); 1 after global pooling

  def activation_bytes(self, bytes_per_elem: int = 4) -> int:
    return (self.input_elems + self.output_elems) * bytes_per_elem

  def intensity(self, bytes_per_elem: int = 4) -> float:
    """Operational intensity: MACs per byte moved (weights + activations)."""
    moved = (self.weights + self.input_elems + self.output_elems) * bytes_per_elem
    return self.macs / moved if moved else 0.0


def _numel(shape) -> int:
  return math.prod(int(d) for d in shape[1:])


HEAD_LAYERS = ("pool", "head_conv", "flatten", "head_dropout", "logits")


def stage_of(layer_name: str) -> str:
  """Groups our top-level layer names into the paper's stages: stem, stage0..stage4, head.

  Layers of other models (the roofline baselines) are "body".
  """
  if layer_name.startswith("stage4"):
    return "stage4"
  if layer_name.startswith("stage"):
    return layer_name.split("_", 1)[0]
  if layer_name in ("stem", "input_norm"):
    return "stem"
  return "head" if layer_name in HEAD_LAYERS else "body"


def _out_size(shape) -> int:
  return int(shape[1]) if len(shape) == 4 else 1


def _leaf_cost(layer, shape, path, stage):
  if not isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.Conv2D,
                            keras.layers.Dense)):
    return None
  out = layer.compute_output_shape(shape)
  cost = lambda kind, macs: LayerCost(path, stage, kind, macs, layer.count_params(),
                                      _numel(shape), _numel(out), _out_size(out))
  if isinstance(layer, keras.layers.DepthwiseConv2D):
    return cost("dwconv", _numel(out) * math.prod(layer.kernel_size))
  if isinstance(layer, keras.layers.Conv2D):
    in_channels = int(shape[-1])
    kind = "dwconv" if layer.groups > 1 and layer.groups == in_channels else "conv"
    return cost(kind, _numel(out) * math.prod(layer.kernel_size) * in_channels // layer.groups)
  # Dense: on a feature map it is a 1x1 conv, one matrix-vector product per position.
  return cost("dense", _numel(out) * int(shape[-1]))


def _chain_costs(chain, shape, prefix, stage):
  costs = []
  for layer in chain:
    cost = _leaf_cost(layer, shape, f"{prefix}/{layer.name}", stage)
    if cost:
      costs.append(cost)
    shape = layer.compute_output_shape(shape)
  return costs, shape


def _mqa_costs(block: L.MobileMQA, shape, prefix, stage):
  costs, q_shape = _chain_costs(block.query, shape, prefix, stage)
  k_costs, k_shape = _chain_costs(block.key, shape, prefix, stage)
  v_costs, v_shape = _chain_costs(block.value, shape, prefix, stage)
  costs += k_costs + v_costs
  queries = int(q_shape[1]) * int(q_shape[2])
  keys = int(k_shape[1]) * int(k_shape[2])
  h, dk, dv = block.num_heads, block.key_dim, block.value_dim
  size = int(q_shape[1])
  costs.append(LayerCost(f"{prefix}/qk", stage, "attention", h * queries * keys * dk, 0,
                         h * queries * dk + keys * dk, h * queries * keys, size))
  costs.append(LayerCost(f"{prefix}/av", stage, "attention", h * queries * keys * dv, 0,
                         h * queries * keys + keys * dv, h * queries * dv, size))
  o_shape = tuple(shape[:-1]) + (h * dv,)
  costs.append(_leaf_cost(block.output_proj, o_shape, f"{prefix}/output_proj", stage))
  return costs


def _layer_costs(layer, shape, prefix, stage):
  if isinstance(L.block_spec_of(layer), S.MQA):
    return _mqa_costs(layer, shape, prefix, stage)
  if hasattr(layer, "ops_"):
    return _chain_costs(layer.ops_, shape, prefix, stage)[0]
  if isinstance(layer, keras.Sequential):
    return _chain_costs(layer.layers, shape, prefix, stage)[0]
  if isinstance(layer, keras.Model):
    return _graph_costs(layer, prefix, stage)
  cost = _leaf_cost(layer, shape, prefix, stage)
  return [cost] if cost else []


def _graph_costs(model, prefix=None, stage=None):
  """A functional model with static shapes: each layer's input shape is read from the graph."""
  costs = []
  for layer in model.layers:
    if isinstance(layer, keras.layers.InputLayer):
      continue
    if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                              keras.layers.Dense, keras.Model, L._Block)):
      continue  # adds, norms, activations, pooling: no MACs, and maybe several inputs
    shape = (1,) + tuple(int(d) for d in layer.input.shape[1:])
    path = f"{prefix}/{layer.name}" if prefix else layer.name
    costs += _layer_costs(layer, shape, path, stage or stage_of(layer.name))
  return costs


def layer_costs(model: keras.Model, resolution: int) -> list[LayerCost]:
  """Every MAC-bearing op of `model` at a square `resolution`, in execution order.

  A model built for any input size (our default) is walked as the chain of blocks it is; a
  model with a fixed input size may be any functional Keras model, and must take `resolution`.
  """
  fixed = model.input_shape[1:3]
  if None not in fixed:
    if tuple(fixed) != (resolution, resolution):
      raise ValueError(f"{model.name} takes {fixed[0]}x{fixed[1]} inputs, not {resolution}")
    return _graph_costs(model)
  shape = (1, resolution, resolution, 3)
  costs = []
  for layer in model.layers:
    if isinstance(layer, keras.layers.InputLayer):
      continue
    costs += _layer_costs(layer, shape, layer.name, stage_of(layer.name))
    shape = layer.compute_output_shape(shape)
  return costs


def stage_params(model: keras.Model) -> dict[str, tuple[int, int]]:
  """Per stage: (all parameters incl. BatchNorm statistics, trainable parameters)."""
  out: dict[str, tuple[int, int]] = {}
  for layer in model.layers:
    if isinstance(layer, keras.layers.InputLayer):
      continue
    total, trainable = out.get(stage_of(layer.name), (0, 0))
    out[stage_of(layer.name)] = (
        total + layer.count_params(),
        trainable + sum(math.prod(w.shape) for w in layer.trainable_weights))
  return out
