"""Per-layer cost of a built model: MACs, weights and activation traffic.

Counts what the reference counts (timm's FlopCounterMode with attention as explicit matmuls):
multiply-accumulates of convolutions, depthwise convolutions, dense layers and the two
attention matmuls (QK^T and AV). BatchNorm, activations, layer scale, pooling and residual adds
are not counted (BatchNorm folds into the preceding conv at inference).

Activation traffic is the roofline model of the paper's section 3: each MAC layer reads its input
and writes its output once, at batch 1. The summary CLI and the roofline analysis build on this.
"""

from __future__ import annotations

import dataclasses
import math

import keras

from mnv4_train.models import layers as L


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

  def activation_bytes(self, bytes_per_elem: int = 4) -> int:
    return (self.input_elems + self.output_elems) * bytes_per_elem

  def intensity(self, bytes_per_elem: int = 4) -> float:
    """Operational intensity: MACs per byte moved (weights + activations)."""
    moved = (self.weights + self.input_elems + self.output_elems) * bytes_per_elem
    return self.macs / moved if moved else 0.0


def _numel(shape) -> int:
  return math.prod(int(d) for d in shape[1:])


def stage_of(layer_name: str) -> str:
  """Groups top-level layer names into the paper's stages: stem, stage0..stage4, head."""
  if layer_name.startswith("stage4"):
    return "stage4"
  if layer_name.startswith("stage"):
    return layer_name.split("_", 1)[0]
  return "stem" if layer_name == "stem" else "head"


def _leaf_cost(layer, shape, path, stage):
  out = layer.compute_output_shape(shape)
  if isinstance(layer, keras.layers.DepthwiseConv2D):
    k = math.prod(layer.kernel_size)
    macs = _numel(out) * k
    return LayerCost(path, stage, "dwconv", macs, layer.count_params(), _numel(shape), _numel(out))
  if isinstance(layer, keras.layers.Conv2D):
    k = math.prod(layer.kernel_size)
    macs = _numel(out) * k * int(shape[-1]) // layer.groups
    return LayerCost(path, stage, "conv", macs, layer.count_params(), _numel(shape), _numel(out))
  if isinstance(layer, keras.layers.Dense):
    macs = int(shape[-1]) * layer.units
    return LayerCost(path, stage, "dense", macs, layer.count_params(), _numel(shape), _numel(out))
  return None


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
  costs.append(LayerCost(f"{prefix}/qk", stage, "attention", h * queries * keys * dk, 0,
                         h * queries * dk + keys * dk, h * queries * keys))
  costs.append(LayerCost(f"{prefix}/av", stage, "attention", h * queries * keys * dv, 0,
                         h * queries * keys + keys * dv, h * queries * dv))
  o_shape = tuple(shape[:-1]) + (h * dv,)
  costs.append(_leaf_cost(block.output_proj, o_shape, f"{prefix}/output_proj", stage))
  return costs


def layer_costs(model: keras.Model, resolution: int) -> list[LayerCost]:
  """Every MAC-bearing op of `model` at a square `resolution`, in execution order."""
  shape = (1, resolution, resolution, 3)
  costs = []
  for layer in model.layers:
    if isinstance(layer, keras.layers.InputLayer):
      continue
    stage = stage_of(layer.name)
    if isinstance(layer, L.MobileMQA):
      costs += _mqa_costs(layer, shape, layer.name, stage)
    elif hasattr(layer, "ops_"):
      costs += _chain_costs(layer.ops_, shape, layer.name, stage)[0]
    else:
      cost = _leaf_cost(layer, shape, layer.name, stage)
      if cost:
        costs.append(cost)
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
