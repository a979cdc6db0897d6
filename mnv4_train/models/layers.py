"""MobileNetV4 building blocks as Keras 3 layers (keras.layers and keras.ops only).

One layer per idea: `ConvBNAct`, `FusedIB`, `UniversalInvertedBottleneck` (IB, ConvNext, ExtraDW
and FFN are its instantiations), `MobileMQA` (multi-query attention with optional key/value
downsampling), plus `LayerScale`. Every layer returns its init args from `get_config()`, so a
model saves to `.keras` and loads on the TensorFlow and JAX backends alike.

`BLOCK_LAYERS` (at the end) is the one table from a block record of `specs.py` to the layer that
builds it: `block_layer(record, ...)` builds one, and `block_spec_of(layer)` gives a block
layer's record back (its kind and kernels identify a checkpoint's variant).

Conventions shared by all blocks (README.md, "Choices where the paper is silent"):
convolutions have no bias and are followed by BatchNorm; `padding="same"` is TensorFlow SAME
(the Model Garden's convention, extra pixel bottom/right for stride 2), `padding="symmetric"`
pads k//2 on every side (timm's convention, for imported PyTorch weights).
"""

from __future__ import annotations

import math

import keras
from keras import ops

from mnv4_train.models import specs as S
from mnv4_train.models.specs import make_divisible

PADDINGS = ("same", "symmetric")

# The Model Garden's conv initializer (VarianceScaling, fan_in, truncated normal).
def _conv_init():
  return keras.initializers.VarianceScaling()


def _spatial_conv(filters, kernel_size, strides, padding, name, depthwise=False, initializer=None):
  """A bias-free (depthwise) conv; symmetric padding for strided convs is an explicit pad."""
  explicit_pad = padding == "symmetric" and strides > 1 and kernel_size > 1
  conv_padding = "valid" if explicit_pad else "same"
  initializer = initializer or _conv_init()
  if depthwise:
    conv = keras.layers.DepthwiseConv2D(
        kernel_size, strides=strides, padding=conv_padding, use_bias=False,
        depthwise_initializer=initializer, name=name)
  else:
    conv = keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding=conv_padding, use_bias=False,
        kernel_initializer=initializer, name=name)
  if not explicit_pad:
    return [conv]
  return [keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad"), conv]


@keras.saving.register_keras_serializable(package="mnv4")
class BatchNorm(keras.layers.BatchNormalization):
  """Keras BatchNormalization with TensorFlow's fused kernel on the TensorFlow backend.

  Same weights, same maths and the same moving-statistics update as the parent (biased batch
  variance); only the kernel differs. Keras 3 computes BatchNorm as separate moments and
  normalise ops, which on CPU costs MobileNets about a fifth of their training throughput and
  keeps Grappler from folding BN into the preceding conv at inference. Other backends, and the
  cases the fused kernel cannot take (masks, renorm, epsilon below its 1.001e-5 floor), fall
  back to the parent unchanged.
  """

  def _fusable(self, inputs, mask):
    return (keras.backend.backend() == "tensorflow" and mask is None and len(inputs.shape) == 4
            and self.axis % 4 == 3 and self.center and self.scale and not self.renorm
            and not self.synchronized and self.epsilon >= 1.001e-5)

  def call(self, inputs, training=None, mask=None):
    if not self._fusable(inputs, mask):
      return super().call(inputs, training=training, mask=mask)
    import tensorflow as tf  # only reached on the TensorFlow backend

    fused = tf.compat.v1.nn.fused_batch_norm
    if training and self.trainable:
      y, mean, variance = fused(inputs, self.gamma, self.beta, epsilon=self.epsilon,
                                is_training=True)
      # The kernel returns the unbiased (Bessel-corrected) variance; Keras tracks the biased one.
      n = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], variance.dtype)
      variance = tf.math.multiply_no_nan(variance, (n - 1.0) / n)
      self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
      self.moving_variance.assign(
          self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
    else:
      y, _, _ = fused(inputs, self.gamma, self.beta, mean=self.moving_mean,
                      variance=self.moving_variance, epsilon=self.epsilon, is_training=False)
    return ops.cast(y, self.compute_dtype)


class _Block(keras.layers.Layer):
  """Shared plumbing: BN settings, padding, and building a chain of sublayers from a shape."""

  def __init__(self, *, activation="relu", padding="same", bn_momentum=0.997, bn_epsilon=1e-3,
               **kwargs):
    super().__init__(**kwargs)
    if padding not in PADDINGS:
      raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    self.activation = activation
    self.padding = padding
    self.bn_momentum = bn_momentum
    self.bn_epsilon = bn_epsilon

  def _bn(self, name):
    return BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon, name=name)

  def _act(self, name):
    return keras.layers.Activation(self.activation, name=name)

  @staticmethod
  def _build_chain(layers, shape):
    """Builds `layers` in order from `shape` (so `.keras` loading finds every weight)."""
    for layer in layers:
      layer.build(shape)
      shape = layer.compute_output_shape(shape)
    return shape

  @staticmethod
  def _run(layers, x, training=None):
    for layer in layers:
      x = layer(x, training=training)
    return x

  def _set_residual(self, use_residual: bool):
    """Whether the block adds its input back; stochastic depth drops the branch if it does."""
    self.use_residual = use_residual
    self.drop_path = _drop_path(self.drop_path_rate, "drop_path") if use_residual else None

  def _residual_tail(self, shortcut, y, training=None):
    """shortcut + drop_path(y) for a residual block, else y."""
    if not self.use_residual:
      return y
    if self.drop_path is not None:
      y = self.drop_path(y, training=training)
    return shortcut + y

  @classmethod
  def from_spec(cls, block, *, filters, name, layer_scale=None, drop_path_rate=0.0, **common):
    """The layer of a `specs.py` block record, with `filters` output channels."""
    raise NotImplementedError

  def block_spec(self):
    """The `specs.py` block record this layer builds (the inverse of `from_spec`)."""
    raise NotImplementedError

  def get_config(self):
    config = super().get_config()
    config.update(activation=self.activation, padding=self.padding,
                  bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon)
    return config


@keras.saving.register_keras_serializable(package="mnv4")
class LayerScale(keras.layers.Layer):
  """Per-channel learned scale (CaiT), initialised to `init_value`."""

  def __init__(self, init_value=1e-5, **kwargs):
    super().__init__(**kwargs)
    self.init_value = init_value

  def build(self, input_shape):
    self.gamma = self.add_weight(
        name="gamma", shape=(input_shape[-1],),
        initializer=keras.initializers.Constant(self.init_value))

  def call(self, x):
    return x * ops.cast(self.gamma, x.dtype)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "init_value": self.init_value}


def _drop_path(rate, name):
  # Stochastic depth: drop the whole residual branch per example, rescaling the kept ones.
  return keras.layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=name) if rate else None


@keras.saving.register_keras_serializable(package="mnv4")
class ConvBNAct(_Block):
  """Conv k x k -> BatchNorm -> activation (the stem, Conv-S's early stages, stage 4, head)."""

  def __init__(self, filters, kernel_size, strides=1, **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.kernel_size = kernel_size
    self.strides = strides

  def build(self, input_shape):
    self.ops_ = [*_spatial_conv(self.filters, self.kernel_size, self.strides, self.padding, "conv"),
                 self._bn("bn"), self._act("act")]
    self._build_chain(self.ops_, input_shape)

  def call(self, x, training=None):
    return self._run(self.ops_, x, training)

  def compute_output_shape(self, input_shape):
    return _conv_output_shape(input_shape, self.filters, self.strides)

  @classmethod
  def from_spec(cls, block, *, filters, name, layer_scale=None, drop_path_rate=0.0, **common):
    del layer_scale, drop_path_rate  # no residual branch
    return cls(filters, block.kernel, block.stride, name=name, **common)

  def block_spec(self):
    return S.ConvBN(kernel=self.kernel_size, stride=self.strides, filters=self.filters)

  def get_config(self):
    return {**super().get_config(), "filters": self.filters,
            "kernel_size": self.kernel_size, "strides": self.strides}


@keras.saving.register_keras_serializable(package="mnv4")
class FusedIB(_Block):
  """Fused inverted bottleneck: full k x k conv expansion, 1x1 projection (first block of M/L)."""

  def __init__(self, filters, expand_ratio, kernel_size=3, strides=1, drop_path_rate=0.0,
               **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.expand_ratio = expand_ratio
    self.kernel_size = kernel_size
    self.strides = strides
    self.drop_path_rate = drop_path_rate

  def build(self, input_shape):
    in_filters = input_shape[-1]
    mid = make_divisible(in_filters * self.expand_ratio)
    self.ops_ = [
        *_spatial_conv(mid, self.kernel_size, self.strides, self.padding, "expand"),
        self._bn("expand_bn"), self._act("expand_act"),
        keras.layers.Conv2D(self.filters, 1, use_bias=False, kernel_initializer=_conv_init(),
                            name="project"),
        self._bn("project_bn"),
    ]
    self._build_chain(self.ops_, input_shape)
    self._set_residual(self.strides == 1 and in_filters == self.filters)

  def call(self, x, training=None):
    return self._residual_tail(x, self._run(self.ops_, x, training), training)

  def compute_output_shape(self, input_shape):
    return _conv_output_shape(input_shape, self.filters, self.strides)

  @classmethod
  def from_spec(cls, block, *, filters, name, layer_scale=None, drop_path_rate=0.0, **common):
    del layer_scale  # fused blocks have no layer scale
    return cls(filters, block.expand_ratio, kernel_size=block.kernel, strides=block.stride,
               drop_path_rate=drop_path_rate, name=name, **common)

  def block_spec(self):
    return S.FusedIB(kernel=self.kernel_size, stride=self.strides, filters=self.filters,
                     expand_ratio=self.expand_ratio)

  def get_config(self):
    return {**super().get_config(), "filters": self.filters, "expand_ratio": self.expand_ratio,
            "kernel_size": self.kernel_size, "strides": self.strides,
            "drop_path_rate": self.drop_path_rate}


@keras.saving.register_keras_serializable(package="mnv4")
class UniversalInvertedBottleneck(_Block):
  """The UIB block (paper section 4.1, figure 4).

  [start DW -> BN] -> PW expand -> BN -> act -> [middle DW -> BN -> act] -> PW project -> BN
  -> [layer scale] -> [drop path] -> + shortcut (stride 1 and C_in == C_out only).
  A kernel of 0 leaves that depthwise conv out: (k, k) ExtraDW, (0, k) IB, (k, 0) ConvNext,
  (0, 0) FFN. The stride sits on the middle DW when there is one, otherwise on the start DW.
  """

  def __init__(self, filters, expand_ratio, start_dw_kernel_size=0, middle_dw_kernel_size=0,
               strides=1, layer_scale_init_value=None, drop_path_rate=0.0, **kwargs):
    super().__init__(**kwargs)
    if strides > 1 and not (start_dw_kernel_size or middle_dw_kernel_size):
      raise ValueError("a strided UIB needs a start or middle depthwise conv")
    self.filters = filters
    self.expand_ratio = expand_ratio
    self.start_dw_kernel_size = start_dw_kernel_size
    self.middle_dw_kernel_size = middle_dw_kernel_size
    self.strides = strides
    self.layer_scale_init_value = layer_scale_init_value
    self.drop_path_rate = drop_path_rate

  def build(self, input_shape):
    in_filters = input_shape[-1]
    mid = make_divisible(in_filters * self.expand_ratio)
    middle_stride = self.strides if self.middle_dw_kernel_size else 1
    start_stride = 1 if self.middle_dw_kernel_size else self.strides
    ops_ = []
    if self.start_dw_kernel_size:
      ops_ += [*_spatial_conv(None, self.start_dw_kernel_size, start_stride, self.padding,
                              "start_dw", depthwise=True),
               self._bn("start_dw_bn")]  # no activation after the start DW
    ops_ += [keras.layers.Conv2D(mid, 1, use_bias=False, kernel_initializer=_conv_init(),
                                 name="expand"),
             self._bn("expand_bn"), self._act("expand_act")]
    if self.middle_dw_kernel_size:
      ops_ += [*_spatial_conv(None, self.middle_dw_kernel_size, middle_stride, self.padding,
                              "middle_dw", depthwise=True),
               self._bn("middle_dw_bn"), self._act("middle_dw_act")]
    ops_ += [keras.layers.Conv2D(self.filters, 1, use_bias=False,
                                 kernel_initializer=_conv_init(), name="project"),
             self._bn("project_bn")]
    if self.layer_scale_init_value is not None:
      ops_.append(LayerScale(self.layer_scale_init_value, name="layer_scale"))
    self.ops_ = ops_
    self._build_chain(ops_, input_shape)
    self._set_residual(self.strides == 1 and in_filters == self.filters)

  def call(self, x, training=None):
    return self._residual_tail(x, self._run(self.ops_, x, training), training)

  def compute_output_shape(self, input_shape):
    return _conv_output_shape(input_shape, self.filters, self.strides)

  @classmethod
  def from_spec(cls, block, *, filters, name, layer_scale=None, drop_path_rate=0.0, **common):
    return cls(filters, block.expand_ratio, start_dw_kernel_size=block.start_dw_kernel,
               middle_dw_kernel_size=block.middle_dw_kernel, strides=block.stride,
               layer_scale_init_value=layer_scale, drop_path_rate=drop_path_rate, name=name,
               **common)

  def block_spec(self):
    return S.UIB(start_dw_kernel=self.start_dw_kernel_size,
                 middle_dw_kernel=self.middle_dw_kernel_size, stride=self.strides,
                 filters=self.filters, expand_ratio=self.expand_ratio)

  def get_config(self):
    return {**super().get_config(), "filters": self.filters, "expand_ratio": self.expand_ratio,
            "start_dw_kernel_size": self.start_dw_kernel_size,
            "middle_dw_kernel_size": self.middle_dw_kernel_size, "strides": self.strides,
            "layer_scale_init_value": self.layer_scale_init_value,
            "drop_path_rate": self.drop_path_rate}


@keras.saving.register_keras_serializable(package="mnv4")
class MobileMQA(_Block):
  """Mobile MQA block (paper section 4.2): pre-norm multi-query attention with a residual.

  x + drop_path(layer_scale(MQA(BN(x)))). Queries have `num_heads` heads of `key_dim`; keys
  and values have one shared head each, and when `kv_strides` > 1 each is first downsampled by
  its own depthwise `dw_kernel_size` conv + BN (the asymmetric spatial reduction). Softmax runs
  in float32 under mixed precision.
  """

  def __init__(self, num_heads, key_dim, value_dim=None, kv_strides=1, dw_kernel_size=3,
               layer_scale_init_value=None, drop_path_rate=0.0, **kwargs):
    super().__init__(**kwargs)
    self.num_heads = num_heads
    self.key_dim = key_dim
    self.value_dim = value_dim or key_dim
    self.kv_strides = kv_strides
    self.dw_kernel_size = dw_kernel_size
    self.layer_scale_init_value = layer_scale_init_value
    self.drop_path_rate = drop_path_rate
    self.channels = None  # input (= output) channels, known once built

  def _kv_branch(self, prefix, out_dim):
    ops_ = []
    if self.kv_strides > 1:
      ops_ += [*_spatial_conv(None, self.dw_kernel_size, self.kv_strides, self.padding,
                              f"{prefix}_dw", depthwise=True,
                              initializer=keras.initializers.GlorotUniform()),
               self._bn(f"{prefix}_dw_bn")]
    ops_.append(self._proj(out_dim, f"{prefix}_proj"))
    return ops_

  @staticmethod
  def _proj(filters, name):
    return keras.layers.Conv2D(filters, 1, use_bias=False,
                               kernel_initializer=keras.initializers.GlorotUniform(), name=name)

  def build(self, input_shape):
    channels = self.channels = input_shape[-1]
    self.norm = self._bn("norm")
    self.norm.build(input_shape)
    self.query = [self._proj(self.num_heads * self.key_dim, "query_proj")]
    self.key = self._kv_branch("key", self.key_dim)
    self.value = self._kv_branch("value", self.value_dim)
    for branch in (self.query, self.key, self.value):
      self._build_chain(branch, input_shape)
    self.output_proj = self._proj(channels, "output_proj")
    self.output_proj.build(tuple(input_shape[:-1]) + (self.num_heads * self.value_dim,))
    self.layer_scale = None
    if self.layer_scale_init_value is not None:
      self.layer_scale = LayerScale(self.layer_scale_init_value, name="layer_scale")
      self.layer_scale.build(input_shape)
    self._set_residual(True)

  def call(self, x, training=None):
    shortcut = x
    x = self.norm(x, training=training)
    shape = ops.shape(x)
    batch, height, width = shape[0], shape[1], shape[2]
    q = self._run(self.query, x, training) * ops.cast(1.0 / math.sqrt(self.key_dim), x.dtype)
    q = ops.reshape(q, (batch, -1, self.num_heads, self.key_dim))           # [B, L, h, dk]
    k = ops.reshape(self._run(self.key, x, training), (batch, -1, self.key_dim))      # [B, P, dk]
    v = ops.reshape(self._run(self.value, x, training), (batch, -1, self.value_dim))  # [B, P, dv]
    logits = ops.einsum("blhk,bpk->blhp", q, k)
    weights = ops.cast(ops.softmax(ops.cast(logits, "float32"), axis=-1), v.dtype)
    o = ops.einsum("blhp,bpk->blhk", weights, v)
    o = ops.reshape(o, (batch, height, width, self.num_heads * self.value_dim))
    o = self.output_proj(o)
    if self.layer_scale is not None:
      o = self.layer_scale(o)
    return self._residual_tail(shortcut, o, training)

  def compute_output_shape(self, input_shape):
    return tuple(input_shape)

  @classmethod
  def from_spec(cls, block, *, filters, name, layer_scale=None, drop_path_rate=0.0, **common):
    del filters  # attention keeps its input width
    return cls(block.num_heads, block.key_dim, block.value_dim, kv_strides=block.kv_stride,
               dw_kernel_size=block.dw_kernel, layer_scale_init_value=layer_scale,
               drop_path_rate=drop_path_rate, name=name, **common)

  def block_spec(self):
    return S.MQA(num_heads=self.num_heads, key_dim=self.key_dim, kv_stride=self.kv_strides,
                 filters=self.channels, dw_kernel=self.dw_kernel_size)

  def get_config(self):
    return {**super().get_config(), "num_heads": self.num_heads, "key_dim": self.key_dim,
            "value_dim": self.value_dim, "kv_strides": self.kv_strides,
            "dw_kernel_size": self.dw_kernel_size,
            "layer_scale_init_value": self.layer_scale_init_value,
            "drop_path_rate": self.drop_path_rate}


def _conv_output_shape(input_shape, filters, strides):
  """Output shape of a SAME/symmetric conv stack: ceil(H / s) either way for odd kernels."""
  b, h, w, _ = input_shape
  out = lambda d: None if d is None else -(-d // strides)
  return (b, out(h), out(w), filters)


# ---- the block table: the one place that knows which layer builds which kind of block ---------

BLOCK_LAYERS: dict[type, type[_Block]] = {
    S.ConvBN: ConvBNAct,
    S.FusedIB: FusedIB,
    S.UIB: UniversalInvertedBottleneck,
    S.MQA: MobileMQA,
}


def block_layer(block, *, filters, name, layer_scale=None, drop_path_rate=0.0, **common):
  """The layer of a block record (`specs.py`): `filters` output channels (ignored by attention),
  `layer_scale` init value or None, stochastic depth `drop_path_rate`, `common` the BN, padding
  and activation settings."""
  layer_class = BLOCK_LAYERS.get(type(block))
  if layer_class is None:
    raise TypeError(f"unknown block record {block!r}")
  return layer_class.from_spec(block, filters=filters, name=name, layer_scale=layer_scale,
                               drop_path_rate=drop_path_rate, **common)


def block_spec_of(layer):
  """The block record a block layer builds, or None for any other layer."""
  if not isinstance(layer, tuple(BLOCK_LAYERS.values())):
    return None
  return layer.block_spec()
