"""Replayable augmentation: parameters drawn from a key, and one function that applies them.

The distillation datasets (paper section 8) are records of augmentation *parameters* plus the
teacher's logits, never augmented pixels. The Beam job (`data_prep/distill.py`) samples the
parameters for each (recipe, replica, example id, copy) with stateless RNG, applies them and runs
the teacher; the trainer reads the parameters back and calls the same `apply` on the same source
image, so the student sees exactly the pixels the teacher saw.

Image operations are the Model Garden's (`official.vision.ops.augment`, `preprocess_ops`). Its
`RandAugment.distort` draws from the stateful RNG and its level-to-argument helpers flip signs
at random, so here the op choice, sign and cutout position are sampled explicitly and the plain
op functions are called with explicit arguments, using the Model Garden's level-to-argument
formulas. `apply` is pure TensorFlow: it runs eagerly, inside `tf.function` and inside tf.data.

Conventions: `decode` gives uint8 HWC RGB; `apply` returns float32 [res, res, 3] in [-1, 1].

RandAugment's settings are the Model Garden's `RandAugment` arguments, held by `Recipe`:
`translate_const` and `cutout_const` (the pixel shift and cutout half-size at the top level),
`prob_to_apply` (each layer fires with this probability; a layer that does not fire is
recorded as the identity op, so replay needs nothing more) and `exclude_ops` (ops never drawn).
`Recipe.randaugment()` builds the Model Garden's `RandAugment` from them, and sampling draws
from its op list. Where the constants apply: `const_resolution=None` takes them in pixels at any
resolution, as the Model Garden applies them (the supervised recipes); a resolution (224 for the
distillation recipes d1/d2/d3) scales them with the output size, so a recipe means the same at
32 px and at 384 px. The distillation recipes keep the Model Garden's class defaults (translate
100, cutout 40, scaled from 224 px; no exclusions; every layer fires): what their records were
built with, and what a manifest without these fields means.

A recipe's `jpeg_quality` ends `apply` with a JPEG encode + decode of the augmented image (the
paper's round trip before the teacher); the trainer replays it with the quality in the records'
manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib

import tensorflow as tf
from official.vision.ops import augment as mg

# The Model Garden's RandAugment op list, in its order; index len(RA_OPS) is its identity branch
# (RandAugment draws from len(ops) + 1 choices).
RA_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
          "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
          "Cutout", "SolarizeAdd")
IDENTITY_OP = len(RA_OPS)
MAX_RA_LAYERS = 3   # record schema width; unused layers hold IDENTITY_OP
_MAX_LEVEL = 10.0
_REPLACE = [128, 128, 128]
# The distillation recipes' JPEG quality. The paper JPEG-encodes and decodes each augmented
# image before the teacher but states no quality, nor do big_vision's distillation configs
# (their teacher runs online, with no JPEG step): 95 is our choice.
JPEG_QUALITY = 95


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One distillation dataset recipe (paper section 8)."""
  name: str
  ra_layers: int = 0
  ra_magnitude: float = 0.0
  mixup: bool = False
  mixup_alpha: float = 1.0          # mixing ratio ~ Beta(alpha, alpha); 1.0 is uniform on [0, 1]
  crop_area: tuple[float, float] = (0.08, 1.0)
  crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  replicas: int = 1                 # the paper's replica count (a job may build fewer)
  # RandAugment as the Model Garden's `RandAugment` arguments (module docstring); the defaults
  # are its class defaults, scaled from 224 px.
  translate_const: float = 100.0
  cutout_const: float = 40.0
  const_resolution: int | None = 224  # None: the constants are pixels at any resolution
  prob_to_apply: float | None = None  # None: every layer fires
  exclude_ops: tuple[str, ...] = ()
  jpeg_quality: int = 0             # JPEG round trip after augmenting (1-100); 0: none

  def __post_init__(self):
    if not 0 <= self.ra_layers <= MAX_RA_LAYERS:
      raise ValueError(f"{self.name}: ra_layers must be in [0, {MAX_RA_LAYERS}]")
    object.__setattr__(self, "exclude_ops", tuple(self.exclude_ops))
    unknown = sorted(set(self.exclude_ops) - set(RA_OPS))
    if unknown:
      raise ValueError(f"{self.name}: exclude_ops {unknown} are not RandAugment ops {RA_OPS}")
    if self.prob_to_apply is not None and not 0 <= self.prob_to_apply <= 1:
      raise ValueError(f"{self.name}: prob_to_apply must be in [0, 1] or None")
    if not 0 <= self.jpeg_quality <= 100:
      raise ValueError(f"{self.name}: jpeg_quality must be in [0, 100] (0: no JPEG step)")

  def randaugment(self) -> mg.RandAugment:
    """The Model Garden's `RandAugment` with this recipe's settings (constants in pixels at
    `const_resolution`). Its `distort` draws from the stateful RNG, so `sample` draws the same
    choices from a key instead, over its `available_ops`."""
    return mg.RandAugment(num_layers=self.ra_layers, magnitude=self.ra_magnitude,
                          cutout_const=self.cutout_const, translate_const=self.translate_const,
                          prob_to_apply=self.prob_to_apply, exclude_ops=list(self.exclude_ops))

  def ra_constants(self, resolution: int) -> tuple[float, float, float]:
    """(translate_const, cutout_const, scale) for `apply` at `resolution`."""
    scale = resolution / self.const_resolution if self.const_resolution else 1.0
    return (float(self.translate_const), float(self.cutout_const), float(scale))

  @classmethod
  def from_settings(cls, settings: dict) -> "Recipe":
    """A recipe from its recorded settings (a distill manifest's `recipe_settings`); fields a
    manifest lacks take the defaults, which are what older jobs built with."""
    known = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in settings.items() if k in known}
    for key in ("crop_area", "crop_aspect", "exclude_ops"):
      if key in values:
        values[key] = tuple(values[key])
    return cls(**values)


# D1: inception crop + RandAugment l2m9, 500 replicas. D2: inception crop + extreme mixup (ratio
# uniform on [0, 1], the "patient and consistent" function-matching mixup), 1000 replicas.
# D3: the class-balanced extra set, inception crop + RandAugment l2m5, 10 replicas.
# Each ends with a JPEG round trip at JPEG_QUALITY, as the paper's datasets do.
RECIPES = {
    "d1": Recipe("d1", ra_layers=2, ra_magnitude=9.0, replicas=500, jpeg_quality=JPEG_QUALITY),
    "d2": Recipe("d2", mixup=True, mixup_alpha=1.0, replicas=1000, jpeg_quality=JPEG_QUALITY),
    "d3": Recipe("d3", ra_layers=2, ra_magnitude=5.0, replicas=10, jpeg_quality=JPEG_QUALITY),
}

# Shapes and dtypes of a parameter set; records.py serialises exactly these.
PARAM_SPEC = {
    "crop": ((4,), tf.int32),                    # y, x, height, width in source pixels
    "flip": ((), tf.int32),
    "ra_op": ((MAX_RA_LAYERS,), tf.int32),
    "ra_magnitude": ((MAX_RA_LAYERS,), tf.float32),
    "ra_sign": ((MAX_RA_LAYERS,), tf.float32),
    "ra_cutout": ((MAX_RA_LAYERS, 2), tf.float32),  # cutout centre (y, x) as fractions
    "mix_ratio": ((), tf.float32),               # weight of this image; 1.0 = no mixing
    "mix_crop": ((4,), tf.int32),                # the partner's crop and flip
    "mix_flip": ((), tf.int32),
}


def key_seed(recipe: str, replica: int, example_id: str | bytes, copy: int = 0) -> tf.Tensor:
  """The stateless RNG seed of one (recipe, replica, example, copy): stable across machines."""
  if isinstance(example_id, bytes):
    example_id = example_id.decode("utf-8", "surrogateescape")
  digest = hashlib.sha256(f"{recipe}\x1f{replica}\x1f{copy}\x1f{example_id}".encode(
      "utf-8", "surrogateescape")).digest()
  a = int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF
  b = int.from_bytes(digest[8:16], "little") & 0x7FFFFFFFFFFFFFFF
  return tf.constant([a, b], tf.int64)


def decode(image_bytes: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/GIF/BMP bytes (what source shards hold: ingest stores WebP as PNG) ->
  uint8 [h, w, 3]."""
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _sample_crop(seed, image_shape, recipe: Recipe):
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_size=image_shape,
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed,
      min_object_covered=recipe.crop_area[0],  # as the Model Garden's random_crop_image
      aspect_ratio_range=recipe.crop_aspect,
      area_range=recipe.crop_area,
      max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def _sample_flip(seed, recipe: Recipe):
  if not recipe.flip:
    return tf.constant(0, tf.int32)
  return tf.cast(tf.random.stateless_uniform([], seed) < 0.5, tf.int32)


def sample_partner(seed: tf.Tensor, position: int, shard_size: int) -> int:
  """D2's mixup partner: another position of the same source shard (itself if alone)."""
  if shard_size < 2:
    return position
  seed = tf.random.experimental.stateless_fold_in(seed, 7919)
  other = int(tf.random.stateless_uniform([], seed, 0, shard_size - 1, dtype=tf.int32))
  return other + (other >= position)


def sample(recipe: Recipe, seed: tf.Tensor, image_shape, partner_shape=None) -> dict:
  """Draws one parameter set for `recipe` from `seed`, for an image of `image_shape` (h, w, c).

  `partner_shape` is the mixup partner's shape (recipes with mixup only).
  """
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 8)
  n = recipe.ra_layers
  pad = MAX_RA_LAYERS - n
  # As the Model Garden's RandAugment: one of its available ops or the identity, uniformly.
  available = [RA_OPS.index(name) for name in recipe.randaugment().available_ops]
  ops = tf.random.stateless_uniform([n], seeds[2], 0, len(available) + 1, dtype=tf.int32)
  if len(available) < len(RA_OPS):
    ops = tf.gather(tf.constant(available + [IDENTITY_OP], tf.int32), ops)
  if recipe.prob_to_apply is not None:
    # A layer that does not fire leaves the image alone: recorded as the identity op.
    fires = tf.random.stateless_uniform(
        [n], tf.random.experimental.stateless_fold_in(seeds[2], 1)) < recipe.prob_to_apply
    ops = tf.where(fires, ops, IDENTITY_OP)
  signs = tf.where(tf.random.stateless_uniform([n], seeds[3]) < 0.5, -1.0, 1.0)
  cutout = tf.random.stateless_uniform([n, 2], seeds[4])
  params = {
      "crop": _sample_crop(seeds[0], image_shape, recipe),
      "flip": _sample_flip(seeds[1], recipe),
      "ra_op": tf.concat([ops, tf.fill([pad], IDENTITY_OP)], 0),
      "ra_magnitude": tf.concat([tf.fill([n], float(recipe.ra_magnitude)), tf.zeros([pad])], 0),
      "ra_sign": tf.concat([signs, tf.ones([pad])], 0),
      "ra_cutout": tf.concat([cutout, tf.zeros([pad, 2])], 0),
      "mix_ratio": tf.constant(1.0),
      "mix_crop": tf.zeros([4], tf.int32),
      "mix_flip": tf.constant(0, tf.int32),
  }
  if recipe.mixup:
    if partner_shape is None:
      raise ValueError(f"recipe {recipe.name} mixes images: give the partner's shape")
    alpha = recipe.mixup_alpha
    g1 = tf.random.stateless_gamma([], seeds[5], alpha=alpha)
    g2 = tf.random.stateless_gamma([], seeds[6], alpha=alpha)
    params["mix_ratio"] = g1 / (g1 + g2)
    params["mix_crop"] = _sample_crop(seeds[7], partner_shape, recipe)
    params["mix_flip"] = _sample_flip(tf.random.experimental.stateless_fold_in(seeds[7], 1),
                                      recipe)
  return {k: tf.cast(v, PARAM_SPEC[k][1]) for k, v in params.items()}


def crop_resize_flip(image, crop, flip, resolution):
  """uint8 image -> the `crop` box [y, x, h, w], resized bilinearly to resolution^2, rounded to
  uint8, flipped left-right if `flip` > 0."""
  image = tf.image.crop_to_bounding_box(image, crop[0], crop[1], crop[2], crop[3])
  image = tf.image.resize(image, [resolution, resolution], method="bilinear")
  image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
  return tf.cond(flip > 0, lambda: tf.image.flip_left_right(image), lambda: image)


def _ra_branches(image, magnitude, sign, cutout, resolution, constants):
  """One callable per RA_OPS entry (+ identity), with the Model Garden's level-to-arg maps."""
  translate_const, cutout_const, scale = constants[0], constants[1], constants[2]
  level = magnitude / _MAX_LEVEL
  enhance = level * 1.8 + 0.1
  # level * const * scale in this order: the records of d1/d3 were made with 100.0 and 40.0
  # in these places, and a reordered float product can move a pixel.
  translate = level * translate_const * scale * sign
  cutout_half = tf.cast(level * cutout_const * scale, tf.int32)
  size = tf.cast(resolution, tf.float32)
  cy = tf.cast(cutout[0] * size, tf.int32)
  cx = tf.cast(cutout[1] * size, tf.int32)
  as_uint8 = lambda top: tf.cast(tf.minimum(tf.cast(level * top, tf.int32), 255), tf.uint8)
  table = {
      "AutoContrast": lambda: mg.autocontrast(image),
      "Equalize": lambda: mg.equalize(image),
      "Invert": lambda: mg.invert(image),
      "Rotate": lambda: mg.wrapped_rotate(image, level * 30.0 * sign, _REPLACE),
      "Posterize": lambda: mg.posterize(image, as_uint8(4)),
      "Solarize": lambda: mg.solarize(image, as_uint8(256)),
      "Color": lambda: mg.color(image, enhance),
      "Contrast": lambda: mg.contrast(image, enhance),
      "Brightness": lambda: mg.brightness(image, enhance),
      "Sharpness": lambda: mg.sharpness(image, enhance),
      "ShearX": lambda: mg.shear_x(image, level * 0.3 * sign, _REPLACE),
      "ShearY": lambda: mg.shear_y(image, level * 0.3 * sign, _REPLACE),
      "TranslateX": lambda: mg.translate_x(image, translate, _REPLACE),
      "TranslateY": lambda: mg.translate_y(image, translate, _REPLACE),
      # mg.cutout draws its own centre; its rectangle filler takes an explicit one.
      "Cutout": lambda: mg._fill_rectangle(image, cx, cy, cutout_half, cutout_half, _REPLACE),  # pylint: disable=protected-access
      "SolarizeAdd": lambda: mg.solarize_add(image, tf.cast(level * 110.0, tf.int64), 128),
  }
  return [table[name] for name in RA_OPS] + [lambda: tf.identity(image)]


def jpeg_round_trip(pixels: tf.Tensor, quality, choices=()) -> tf.Tensor:
  """float32 pixels in [0, 255] -> rounded to uint8, JPEG-encoded at `quality`, decoded: float32.

  `quality` 0 (or None) leaves the pixels alone. It is a Python int, or a scalar int tensor
  that takes one of the Python ints `choices` (the encoder's quality is fixed per graph: one
  branch per choice). Every setting is spelled out, so the Beam job and the trainer's replay
  encode and decode alike: baseline 4:2:0 JPEG, and the accurate integer inverse DCT (the
  decoder's default is left to the platform).
  """
  def round_trip(q):
    if not q:
      return pixels
    image = tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, 255.0), tf.uint8)
    data = tf.io.encode_jpeg(image, format="rgb", quality=int(q), progressive=False,
                             optimize_size=False, chroma_downsampling=True)
    out = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
    out.set_shape(pixels.shape)
    return tf.cast(out, tf.float32)

  if isinstance(quality, tf.Tensor):
    choices = sorted(set(int(q or 0) for q in choices))
    index = tf.argmax(tf.cast(tf.equal(tf.constant(choices), tf.cast(quality, tf.int32)),
                              tf.int32), output_type=tf.int32)
    return tf.switch_case(index, [lambda q=q: round_trip(q) for q in choices])
  return round_trip(quality)


def apply(image: tf.Tensor, params: dict, resolution: int, partner: tf.Tensor | None = None,
          constants=None, jpeg_quality=0, jpeg_choices=(), ra_layers=MAX_RA_LAYERS):
  """Source image (uint8 [h, w, 3]) + parameters -> float32 [resolution, resolution, 3] in [-1, 1].

  `partner` is the decoded mixup partner (recipes with mixup); without it, or with a mix ratio
  of 1, the mix is skipped. `constants` is the recipe's `ra_constants(resolution)` (a tuple or a
  float32 [3] tensor; default: the distillation recipes' constants). `jpeg_quality` (the
  recipe's; 0: none) ends with a JPEG round trip of the augmented (and mixed) image; see
  `jpeg_round_trip` for a per-element quality tensor and its `jpeg_choices`. `ra_layers`
  (static) is how many RandAugment layers to run: layers past the recipe's own are recorded as
  the identity, so running only the recipe's (`Recipe.ra_layers`, the most of the recipes a
  replay mixes) gives the same pixels without their branch calls.
  Run it eagerly or inside a tf.data map, as the Beam job and the trainer do (a `tf.function`
  passed to `map` runs in the tf.data runtime and gives the same pixels, and is traced once):
  a `tf.function` called on its own has its graph optimised, which may reorder float
  arithmetic, and the Model Garden's ops truncate floats to uint8, so a pixel can come out one
  grey level off.
  """
  if constants is None:
    constants = Recipe("default").ra_constants(resolution)
  constants = tf.cast(constants, tf.float32)
  out = crop_resize_flip(image, params["crop"], params["flip"], resolution)

  def layer(i, pixels):
    pixels = tf.switch_case(
        params["ra_op"][i],
        _ra_branches(pixels, params["ra_magnitude"][i], params["ra_sign"][i],
                     params["ra_cutout"][i], resolution, constants))
    pixels.set_shape([resolution, resolution, 3])
    return i + 1, pixels

  if ra_layers > 1 and not tf.executing_eagerly():
    # In a graph (tf.data), one layer's 17 branches are traced once and run in a loop: the
    # same ops on the same values as the unrolled layers (the eager path below), in half the
    # tracing and function instantiation for RandAugment's two layers.
    _, out = tf.while_loop(lambda i, _: i < ra_layers, layer, (tf.constant(0), out),
                           maximum_iterations=ra_layers)
  else:
    for i in range(ra_layers):
      _, out = layer(i, out)
  out = tf.cast(out, tf.float32)
  if partner is not None:
    ratio = params["mix_ratio"]

    def mix():
      other = tf.cast(crop_resize_flip(partner, params["mix_crop"], params["mix_flip"],
                                        resolution), tf.float32)
      return ratio * out + (1.0 - ratio) * other

    # A ratio of 1 (records of a recipe without mixup, in a mixture) leaves the image alone, so
    # the trainer can replay D1 and D2 records with one function.
    out = tf.cond(ratio < 1.0, mix, lambda: out)
  out = jpeg_round_trip(out, jpeg_quality, jpeg_choices)
  return out / 127.5 - 1.0


def center_crop(image: tf.Tensor, resolution: int, fraction: float = 0.875) -> tf.Tensor:
  """Evaluation preprocessing: central crop of `fraction` of the short side, resized; [-1, 1]."""
  shape = tf.shape(image)
  side = tf.cast(tf.cast(tf.minimum(shape[0], shape[1]), tf.float32) * fraction, tf.int32)
  side = tf.maximum(side, 1)
  y = (shape[0] - side) // 2
  x = (shape[1] - side) // 2
  crop = tf.stack([y, x, side, side])
  out = crop_resize_flip(image, crop, tf.constant(0), resolution)
  return tf.cast(out, tf.float32) / 127.5 - 1.0
