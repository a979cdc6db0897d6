"""MobileNetV4 architectures as data: one table per variant.

Each variant is a `ModelSpec`: a stem, four stages of typed block records, and the common
stage-4 / head layers. The tables mirror the paper's appendix tables and the official
implementation (TensorFlow Model Garden, `official/vision/modeling/backbones/mobilenet.py`);
`tests/test_models.py` pins every variant's parameter count to the official one.

The builder (`builder.py`) turns a spec into a `keras.Model`; the profiler (`profile.py`) turns
it into per-layer MACs and bytes. Nothing here depends on Keras.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Union

from mnv4_train.errors import ConfigError

# Channel rounding of the official implementation (`nn_layers.make_divisible`).
DIVISOR = 8


def make_divisible(value: float, divisor: int = DIVISOR, min_value: int | None = None) -> int:
  """Rounds `value` to the nearest multiple of `divisor`, never dropping more than 10%."""
  min_value = divisor if min_value is None else min_value
  new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if new_value < 0.9 * value:
    new_value += divisor
  return int(new_value)


@dataclasses.dataclass(frozen=True)
class ConvBN:
  """Conv k x k (stride s) -> BatchNorm -> activation. No residual."""
  kernel: int
  stride: int
  filters: int

  @property
  def kind(self) -> str:
    return "ConvBN"

  @property
  def signature(self) -> tuple:
    """What identifies the block in a variant's layout, at any width (`checkpoint.py`)."""
    return ("ConvBN", self.kernel)


@dataclasses.dataclass(frozen=True)
class FusedIB:
  """Fused inverted bottleneck: Conv k x k (stride s, C_in -> C_in*e) -> BN -> act -> Conv 1x1 -> BN.

  Residual only when stride 1 and C_in == C_out (never in the MNv4 tables).
  """
  kernel: int
  stride: int
  filters: int
  expand_ratio: float

  @property
  def kind(self) -> str:
    return "FusedIB"

  @property
  def signature(self) -> tuple:
    return ("FusedIB", self.kernel)


@dataclasses.dataclass(frozen=True)
class UIB:
  """Universal Inverted Bottleneck (paper section 4.1).

  [start DW k_a -> BN] -> PW expand -> BN -> act -> [middle DW k_m -> BN -> act] -> PW project -> BN.
  A kernel of 0 means that depthwise conv is absent. The stride sits on the middle DW when it
  exists, otherwise on the start DW.
  """
  start_dw_kernel: int
  middle_dw_kernel: int
  stride: int
  filters: int
  expand_ratio: float

  def __post_init__(self):
    if self.stride > 1 and not (self.start_dw_kernel or self.middle_dw_kernel):
      raise ValueError(f"{self}: a strided UIB needs a start or middle depthwise conv")

  @property
  def kind(self) -> str:
    """The paper's name for this instantiation (figure 4)."""
    return {
        (True, True): "ExtraDW",
        (False, True): "IB",
        (True, False): "ConvNext",
        (False, False): "FFN",
    }[(bool(self.start_dw_kernel), bool(self.middle_dw_kernel))]

  @property
  def middle_dw_downsample(self) -> bool:
    return bool(self.middle_dw_kernel)

  @property
  def signature(self) -> tuple:
    return ("UIB", self.start_dw_kernel, self.middle_dw_kernel)


@dataclasses.dataclass(frozen=True)
class MQA:
  """Mobile multi-query attention block (paper section 4.2), pre-norm and residual.

  One key and one value head shared by `num_heads` query heads; keys and values are optionally
  downsampled spatially by their own stride-`kv_stride` depthwise conv + BN.
  """
  num_heads: int
  key_dim: int
  kv_stride: int
  filters: int
  dw_kernel: int = 3

  @property
  def value_dim(self) -> int:
    return self.key_dim

  @property
  def stride(self) -> int:
    return 1

  @property
  def kind(self) -> str:
    return "MQA"

  @property
  def signature(self) -> tuple:
    return ("MQA", self.num_heads, self.key_dim, self.kv_stride > 1)


Block = Union[ConvBN, FusedIB, UIB, MQA]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A whole variant: stem, stages 0..3 (the paper's tables), then the common tail.

  The tail is the same for every variant: stage 4 is ConvBN 1x1 -> `last_filters`, then global
  average pooling, ConvBN 1x1 -> `head_filters` (no bias), dropout and a linear classifier.
  """
  name: str
  paper_name: str
  resolution: int
  activation: str
  stem_filters: int
  stages: tuple[tuple[Block, ...], ...]
  layer_scale: bool = False
  last_filters: int = 960
  head_filters: int = 1280
  paper_top1: float | None = None

  @property
  def blocks(self) -> tuple[Block, ...]:
    return tuple(b for stage in self.stages for b in stage)


# Helpers: one line per block in the tables below.
def conv_bn(k: int, s: int, c: int) -> ConvBN:
  return ConvBN(kernel=k, stride=s, filters=c)


def fused_ib(k: int, s: int, c: int, e: float) -> FusedIB:
  return FusedIB(kernel=k, stride=s, filters=c, expand_ratio=e)


def uib(start_k: int, mid_k: int, s: int, c: int, e: float) -> UIB:
  return UIB(start_dw_kernel=start_k, middle_dw_kernel=mid_k, stride=s, filters=c, expand_ratio=e)


def mqa(heads: int, key_dim: int, kv_stride: int, c: int) -> MQA:
  return MQA(num_heads=heads, key_dim=key_dim, kv_stride=kv_stride, filters=c)


def conv_s() -> ModelSpec:
  """MNv4-Conv-S, paper table 11 (73.8% top-1, 3.8M params, 0.2G MACs at 224)."""
  return ModelSpec(
      name="conv_s", paper_name="MNv4-Conv-S", resolution=224, activation="relu",
      stem_filters=32, paper_top1=73.8,
      stages=(
          (  # stage 0, 112x112 in
              conv_bn(3, 2, 32),
              conv_bn(1, 1, 32),
          ),
          (  # stage 1, 56x56 in
              conv_bn(3, 2, 96),
              conv_bn(1, 1, 64),
          ),
          (  # stage 2, 28x28 in
              uib(5, 5, 2, 96, 3.0),
              uib(0, 3, 1, 96, 2.0),
              uib(0, 3, 1, 96, 2.0),
              uib(0, 3, 1, 96, 2.0),
              uib(0, 3, 1, 96, 2.0),
              uib(3, 0, 1, 96, 4.0),
          ),
          (  # stage 3, 14x14 in
              uib(3, 3, 2, 128, 6.0),
              uib(5, 5, 1, 128, 4.0),
              uib(0, 5, 1, 128, 4.0),
              uib(0, 5, 1, 128, 3.0),
              uib(0, 3, 1, 128, 4.0),
              uib(0, 3, 1, 128, 4.0),
          ),
      ))


def conv_m() -> ModelSpec:
  """MNv4-Conv-M, paper table 12 (79.9% top-1 at 256)."""
  return ModelSpec(
      name="conv_m", paper_name="MNv4-Conv-M", resolution=256, activation="relu",
      stem_filters=32, paper_top1=79.9,
      stages=(
          (  # stage 0, 128x128 in
              fused_ib(3, 2, 48, 4.0),
          ),
          (  # stage 1, 64x64 in
              uib(3, 5, 2, 80, 4.0),
              uib(3, 3, 1, 80, 2.0),
          ),
          (  # stage 2, 32x32 in
              uib(3, 5, 2, 160, 6.0),
              uib(3, 3, 1, 160, 4.0),
              uib(3, 3, 1, 160, 4.0),
              uib(3, 5, 1, 160, 4.0),
              uib(3, 3, 1, 160, 4.0),
              uib(3, 0, 1, 160, 4.0),
              uib(0, 0, 1, 160, 2.0),
              uib(3, 0, 1, 160, 4.0),
          ),
          (  # stage 3, 16x16 in
              uib(5, 5, 2, 256, 6.0),
              uib(5, 5, 1, 256, 4.0),
              uib(3, 5, 1, 256, 4.0),
              uib(3, 5, 1, 256, 4.0),
              uib(0, 0, 1, 256, 4.0),
              uib(3, 0, 1, 256, 4.0),
              uib(3, 5, 1, 256, 2.0),
              uib(5, 5, 1, 256, 4.0),
              uib(0, 0, 1, 256, 4.0),
              uib(0, 0, 1, 256, 4.0),
              uib(5, 0, 1, 256, 2.0),
          ),
      ))


def conv_l() -> ModelSpec:
  """MNv4-Conv-L, paper table 13 (82.9% top-1 at 384; 85.9% distilled)."""
  return ModelSpec(
      name="conv_l", paper_name="MNv4-Conv-L", resolution=384, activation="relu",
      stem_filters=24, paper_top1=82.9,
      stages=(
          (  # stage 0, 192x192 in
              fused_ib(3, 2, 48, 4.0),
          ),
          (  # stage 1, 96x96 in
              uib(3, 5, 2, 96, 4.0),
              uib(3, 3, 1, 96, 4.0),
          ),
          (  # stage 2, 48x48 in
              uib(3, 5, 2, 192, 4.0),
              uib(3, 3, 1, 192, 4.0),
              uib(3, 3, 1, 192, 4.0),
              uib(3, 3, 1, 192, 4.0),
              uib(3, 5, 1, 192, 4.0),
              uib(5, 3, 1, 192, 4.0),
              uib(5, 3, 1, 192, 4.0),
              uib(5, 3, 1, 192, 4.0),
              uib(5, 3, 1, 192, 4.0),
              uib(5, 3, 1, 192, 4.0),
              uib(3, 0, 1, 192, 4.0),
          ),
          (  # stage 3, 24x24 in
              uib(5, 5, 2, 512, 4.0),
              uib(5, 5, 1, 512, 4.0),
              uib(5, 5, 1, 512, 4.0),
              uib(5, 5, 1, 512, 4.0),
              uib(5, 0, 1, 512, 4.0),
              uib(5, 3, 1, 512, 4.0),
              uib(5, 0, 1, 512, 4.0),
              uib(5, 0, 1, 512, 4.0),
              uib(5, 3, 1, 512, 4.0),
              uib(5, 5, 1, 512, 4.0),
              uib(5, 0, 1, 512, 4.0),
              uib(5, 0, 1, 512, 4.0),
              uib(5, 0, 1, 512, 4.0),
          ),
      ))


def hybrid_m() -> ModelSpec:
  """MNv4-Hybrid-M, paper table 14 (80.7% top-1 at 256). Layer scale on every UIB and MQA."""
  return ModelSpec(
      name="hybrid_m", paper_name="MNv4-Hybrid-M", resolution=256, activation="relu",
      stem_filters=32, layer_scale=True, paper_top1=80.7,
      stages=(
          (  # stage 0, 128x128 in
              fused_ib(3, 2, 48, 4.0),
          ),
          (  # stage 1, 64x64 in
              uib(3, 5, 2, 80, 4.0),
              uib(3, 3, 1, 80, 2.0),
          ),
          (  # stage 2, 32x32 in
              uib(3, 5, 2, 160, 6.0),
              uib(0, 0, 1, 160, 2.0),
              uib(3, 3, 1, 160, 4.0),
              uib(3, 5, 1, 160, 4.0),
              mqa(4, 64, 2, 160),
              uib(3, 3, 1, 160, 4.0),
              mqa(4, 64, 2, 160),
              uib(3, 0, 1, 160, 4.0),
              mqa(4, 64, 2, 160),
              uib(3, 3, 1, 160, 4.0),
              mqa(4, 64, 2, 160),
              uib(3, 0, 1, 160, 4.0),
          ),
          (  # stage 3, 16x16 in
              uib(5, 5, 2, 256, 6.0),
              uib(5, 5, 1, 256, 4.0),
              uib(3, 5, 1, 256, 4.0),
              uib(3, 5, 1, 256, 4.0),
              uib(0, 0, 1, 256, 2.0),
              uib(3, 5, 1, 256, 2.0),
              uib(0, 0, 1, 256, 2.0),
              uib(0, 0, 1, 256, 4.0),
              mqa(4, 64, 1, 256),
              uib(3, 0, 1, 256, 4.0),
              mqa(4, 64, 1, 256),
              uib(5, 5, 1, 256, 4.0),
              mqa(4, 64, 1, 256),
              uib(5, 0, 1, 256, 4.0),
              mqa(4, 64, 1, 256),
              uib(5, 0, 1, 256, 4.0),
          ),
      ))


def hybrid_l() -> ModelSpec:
  """MNv4-Hybrid-L, paper table 15 (83.4% top-1 at 384; 87.0% distilled). GELU throughout."""
  return ModelSpec(
      name="hybrid_l", paper_name="MNv4-Hybrid-L", resolution=384, activation="gelu",
      stem_filters=24, layer_scale=True, paper_top1=83.4,
      stages=(
          (  # stage 0, 192x192 in
              fused_ib(3, 2, 48, 4.0),
          ),
          (  # stage 1, 96x96 in
              uib(3, 5, 2, 96, 4.0),
              uib(3, 3, 1, 96, 4.0),
          ),
          (  # stage 2, 48x48 in
              uib(3, 5, 2, 192, 4.0),
              uib(3, 3, 1, 192, 4.0),
              uib(3, 3, 1, 192, 4.0),
              uib(3, 3, 1, 192, 4.0),
              uib(3, 5, 1, 192, 4.0),
              uib(5, 3, 1, 192, 4.0),
              uib(5, 3, 1, 192, 4.0),
              mqa(8, 48, 2, 192),
              uib(5, 3, 1, 192, 4.0),
              mqa(8, 48, 2, 192),
              uib(5, 3, 1, 192, 4.0),
              mqa(8, 48, 2, 192),
              uib(5, 3, 1, 192, 4.0),
              mqa(8, 48, 2, 192),
              uib(3, 0, 1, 192, 4.0),
          ),
          (  # stage 3, 24x24 in
              uib(5, 5, 2, 512, 4.0),
              uib(5, 5, 1, 512, 4.0),
              uib(5, 5, 1, 512, 4.0),
              uib(5, 5, 1, 512, 4.0),
              uib(5, 0, 1, 512, 4.0),
              uib(5, 3, 1, 512, 4.0),
              uib(5, 0, 1, 512, 4.0),
              uib(5, 0, 1, 512, 4.0),
              uib(5, 3, 1, 512, 4.0),
              uib(5, 5, 1, 512, 4.0),
              mqa(8, 64, 1, 512),
              uib(5, 0, 1, 512, 4.0),
              mqa(8, 64, 1, 512),
              uib(5, 0, 1, 512, 4.0),
              mqa(8, 64, 1, 512),
              uib(5, 0, 1, 512, 4.0),
              mqa(8, 64, 1, 512),
              uib(5, 0, 1, 512, 4.0),
          ),
      ))


# The registry: variant name -> spec function. The one list of model names in the project.
VARIANTS: dict[str, Callable[[], ModelSpec]] = {
    "conv_s": conv_s,
    "conv_m": conv_m,
    "conv_l": conv_l,
    "hybrid_m": hybrid_m,
    "hybrid_l": hybrid_l,
}
MODEL_NAMES: tuple[str, ...] = tuple(VARIANTS)


def get_spec(name: str) -> ModelSpec:
  """The spec of a variant by name; an unknown name raises ConfigError listing the valid ones."""
  try:
    return VARIANTS[name]()
  except KeyError:
    raise ConfigError(
        f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}") from None
