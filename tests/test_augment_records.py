"""Replayable augmentation and the record formats."""

import numpy as np
import pytest
import tensorflow as tf
from official.vision.ops import augment as mg

from mnv4_train.data import augment as A
from mnv4_train.data import records


def _textured(h=48, w=64, seed=0):
  rng = np.random.default_rng(seed)
  base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
  return tf.constant(np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype("uint8"))


def _params(recipe="d1", replica=0, example_id="a", shape=(48, 64, 3)):
  rec = A.RECIPES[recipe]
  return A.sample(rec, A.key_seed(recipe, replica, example_id), shape,
                  shape if rec.mixup else None)


def _equal(a, b):
  return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in A.PARAM_SPEC)


def test_parameters_are_a_function_of_the_key():
  assert _equal(_params(), _params())
  assert not _equal(_params(replica=0), _params(replica=1))
  assert not _equal(_params(example_id="a"), _params(example_id="b"))
  assert not _equal(_params("d1"), _params("d3"))
  seed_copy = A.key_seed("d3", 0, "a", copy=1)
  assert not np.array_equal(seed_copy, A.key_seed("d3", 0, "a", copy=0))


@pytest.mark.parametrize("recipe", sorted(A.RECIPES))
def test_sampled_parameters_respect_the_recipe(recipe):
  rec = A.RECIPES[recipe]
  for replica in range(40):
    p = _params(recipe, replica)
    y, x, h, w = p["crop"].numpy()
    assert 0 <= y and 0 <= x and y + h <= 48 and x + w <= 64
    assert h * w >= 0.08 * 48 * 64 * 0.9  # area range (up to rounding)
    ops = p["ra_op"].numpy()
    assert np.all(ops[rec.ra_layers:] == A.IDENTITY_OP)
    assert np.all((0 <= ops) & (ops <= A.IDENTITY_OP))
    assert np.all(p["ra_magnitude"].numpy()[:rec.ra_layers] == rec.ra_magnitude)
    assert set(np.unique(p["ra_sign"].numpy())) <= {-1.0, 1.0}
    ratio = float(p["mix_ratio"])
    assert (0.0 < ratio < 1.0) if rec.mixup else ratio == 1.0
  # Over many keys every RandAugment branch (16 ops + identity) gets drawn.
  if rec.ra_layers:
    drawn = {int(op) for r in range(300) for op in _params(recipe, r)["ra_op"][:rec.ra_layers]}
    assert drawn == set(range(A.IDENTITY_OP + 1))


def test_apply_in_tf_data_replays_the_eager_pixels():
  image = _textured()
  params = [_params("d1", r) for r in range(6)]
  eager = [A.apply(image, p, 40).numpy() for p in params]
  ds = tf.data.Dataset.from_tensor_slices({k: tf.stack([p[k] for p in params]) for k in params[0]})
  replayed = list(ds.map(lambda p: A.apply(image, p, 40)).as_numpy_iterator())
  for a, b in zip(eager, replayed):
    assert a.shape == (40, 40, 3) and a.min() >= -1.0 and a.max() <= 1.0
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_every_op_in_every_layer_gives_tf_data_the_eager_pixels_exactly():
  """tf.data runs the RandAugment layers as one traced layer in a loop, eagerly they are
  unrolled: each op, in the first and in a later layer, gives the same bytes both ways."""
  image = _textured()
  n = len(A.RA_OPS) + 1  # with the identity
  params = []
  for op in range(n):
    p = _params("d1", op)
    p["ra_op"] = tf.constant([op, (op + 5) % n, (op + 11) % n])
    params.append(p)
  eager = [A.apply(image, p, 40, ra_layers=3).numpy() for p in params]
  ds = tf.data.Dataset.from_tensor_slices({k: tf.stack([p[k] for p in params]) for k in params[0]})
  replayed = list(ds.map(lambda p: A.apply(image, p, 40, ra_layers=3)).as_numpy_iterator())
  for op, (a, b) in enumerate(zip(eager, replayed)):
    np.testing.assert_array_equal(a, b, err_msg=f"op {op}")


def _with_op(op, sign=1.0, cutout=(0.5, 0.5), magnitude=9.0):
  p = _params()
  p["ra_op"] = tf.constant([op, A.IDENTITY_OP, A.IDENTITY_OP])
  p["ra_sign"] = tf.constant([sign, 1.0, 1.0])
  p["ra_magnitude"] = tf.constant([magnitude, 0.0, 0.0])
  p["ra_cutout"] = tf.constant([cutout, (0, 0), (0, 0)], tf.float32)
  return p


def test_every_randaugment_op_changes_the_image_and_identity_does_not():
  image = _textured()
  plain = A.apply(image, _with_op(A.IDENTITY_OP), 40).numpy()
  for op, name in enumerate(A.RA_OPS):
    out = A.apply(image, _with_op(op), 40).numpy()
    assert out.shape == (40, 40, 3), name
    assert not np.array_equal(out, plain), f"{name} left the image unchanged"


def test_recorded_sign_and_cutout_position_are_honoured():
  image = _textured()
  rotate = A.RA_OPS.index("Rotate")
  left = A.apply(image, _with_op(rotate, sign=1.0), 40).numpy()
  right = A.apply(image, _with_op(rotate, sign=-1.0), 40).numpy()
  assert not np.allclose(left, right)
  cutout = A.RA_OPS.index("Cutout")
  grey = 128 / 127.5 - 1.0
  top_left = A.apply(image, _with_op(cutout, cutout=(0.1, 0.1)), 40).numpy()
  bottom_right = A.apply(image, _with_op(cutout, cutout=(0.9, 0.9)), 40).numpy()
  np.testing.assert_allclose(top_left[4, 4], grey, atol=1e-6)
  np.testing.assert_allclose(bottom_right[36, 36], grey, atol=1e-6)
  assert not np.allclose(top_left[36, 36], grey, atol=1e-6)


def test_ops_are_the_model_gardens():
  """Our Solarize and Posterize branches equal calling the Model Garden's ops directly."""
  image = _textured()
  base = A.apply(image, _with_op(A.IDENTITY_OP), 40)
  uint8 = tf.cast(tf.round((base + 1.0) * 127.5), tf.uint8)
  for name, expected in [("Solarize", mg.solarize(uint8, int(9 / 10 * 256))),
                         ("Posterize", mg.posterize(uint8, int(9 / 10 * 4)))]:
    out = A.apply(image, _with_op(A.RA_OPS.index(name)), 40)
    np.testing.assert_allclose(out.numpy(), tf.cast(expected, tf.float32) / 127.5 - 1.0,
                               atol=1e-6)


# ---- RandAugment settings as the Model Garden's (supervised recipes) ---------------------------

def _supervised(**kwargs):
  return A.Recipe("supervised", ra_layers=2, ra_magnitude=9.0, const_resolution=None, **kwargs)


def test_d1_d3_draws_are_unchanged_by_the_new_settings():
  """Default settings draw what d1/d3 records were built with: 17 uniform choices, all fire."""
  for name in ("d1", "d3"):
    rec = A.RECIPES[name]
    assert rec.translate_const == 100.0 and rec.cutout_const == 40.0
    assert rec.const_resolution == 224 and rec.prob_to_apply is None and not rec.exclude_ops
    for replica in range(5):
      seed = A.key_seed(name, replica, "x")
      split = tf.random.experimental.stateless_split(seed, 8)
      old = tf.random.stateless_uniform([2], split[2], 0, len(A.RA_OPS) + 1, dtype=tf.int32)
      np.testing.assert_array_equal(A.sample(rec, seed, (48, 64, 3))["ra_op"][:2], old)


def test_recipe_builds_the_model_gardens_randaugment():
  rec = _supervised(translate_const=20.0, cutout_const=20.0, prob_to_apply=0.5,
                    exclude_ops=["Cutout"])
  ra = rec.randaugment()
  assert isinstance(ra, mg.RandAugment)
  assert "Cutout" not in ra.available_ops and len(ra.available_ops) == len(A.RA_OPS) - 1
  assert (ra.translate_const, ra.cutout_const, ra.prob_to_apply) == (20.0, 20.0, 0.5)
  with pytest.raises(ValueError, match="Cutoff"):
    _supervised(exclude_ops=("Cutoff",))


def test_excluded_ops_are_never_drawn_and_prob_to_apply_skips_layers():
  excluded = _supervised(exclude_ops=("Cutout",))
  ops = np.concatenate([A.sample(excluded, A.key_seed("s", r, "a"), (48, 64, 3))["ra_op"][:2]
                        for r in range(400)])
  assert A.RA_OPS.index("Cutout") not in ops
  assert set(ops) == set(range(A.IDENTITY_OP + 1)) - {A.RA_OPS.index("Cutout")}
  # prob_to_apply 0.5: about half the layers are the identity (1/16 of them drawn as such).
  half = _supervised(exclude_ops=("Cutout",), prob_to_apply=0.5)
  ops = np.concatenate([A.sample(half, A.key_seed("s", r, "a"), (48, 64, 3))["ra_op"][:2]
                        for r in range(400)])
  share = np.mean(ops == A.IDENTITY_OP)
  assert abs(share - (0.5 + 0.5 / 16)) < 0.06, share
  never = _supervised(prob_to_apply=0.0)
  assert np.all(A.sample(never, A.key_seed("s", 0, "a"), (48, 64, 3))["ra_op"] == A.IDENTITY_OP)


def test_translate_is_in_pixels_for_the_supervised_recipe_and_scaled_for_d1():
  """Magnitude 10 shifts by translate_const pixels at any resolution (the Model Garden's
  level-to-argument map); d1 keeps its 100 px at 224, scaled to the output size."""
  image = _textured(64, 64)
  translate = A.RA_OPS.index("TranslateX")
  params = _with_op(A.IDENTITY_OP)
  params["crop"] = tf.constant([0, 0, 64, 64], tf.int32)
  base = tf.cast(tf.round((A.apply(image, params, 64) + 1.0) * 127.5), tf.uint8)
  params = _with_op(translate, sign=1.0)
  params["crop"] = tf.constant([0, 0, 64, 64], tf.int32)
  params["ra_magnitude"] = tf.constant([10.0, 0.0, 0.0])
  for recipe, pixels in [(_supervised(translate_const=20.0), 20.0),
                         (A.RECIPES["d1"], 100.0 * 64 / 224)]:
    out = A.apply(image, params, 64, constants=recipe.ra_constants(64))
    want = mg.translate_x(base, pixels, [128, 128, 128])
    np.testing.assert_allclose(out.numpy(), tf.cast(want, tf.float32) / 127.5 - 1.0, atol=1e-6)
  # No constants given: d1's (what records made before this setting meant).
  np.testing.assert_array_equal(
      A.apply(image, params, 64), A.apply(image, params, 64, A.RECIPES["d1"].ra_constants(64)))


def test_recipe_settings_round_trip_through_a_manifest_dict():
  import dataclasses
  import json
  rec = _supervised(exclude_ops=("Cutout",), prob_to_apply=0.7, translate_const=10.0)
  again = A.Recipe.from_settings(json.loads(json.dumps(dataclasses.asdict(rec))))
  assert again == rec
  # An older manifest without the fields means the defaults d1/d3 were built with.
  assert A.Recipe.from_settings({"name": "d1", "ra_layers": 2, "ra_magnitude": 9.0}) == \
      A.Recipe("d1", ra_layers=2, ra_magnitude=9.0)


def test_mixup_blends_with_the_partner_by_the_recorded_ratio():
  image, partner = _textured(seed=1), _textured(seed=2)
  p = _params("d2")
  own = dict(p, mix_ratio=tf.constant(1.0))
  mixed = A.apply(image, p, 40, partner).numpy()
  alone = A.apply(image, own, 40, partner).numpy()
  other = A.apply(partner, dict(p, crop=p["mix_crop"], flip=p["mix_flip"]), 40).numpy()
  ratio = float(p["mix_ratio"])
  np.testing.assert_allclose(mixed, ratio * alone + (1 - ratio) * other, atol=1e-5)


def test_mixup_partner_is_another_position_of_the_shard():
  partners = [A.sample_partner(A.key_seed("d2", r, f"x{r}"), 3, 10) for r in range(50)]
  assert all(0 <= q < 10 and q != 3 for q in partners)
  assert len(set(partners)) > 5
  assert A.sample_partner(A.key_seed("d2", 0, "x"), 0, 1) == 0


def _numpy_params(recipe):
  return {k: v.numpy() for k, v in _params(recipe).items()}


def test_distill_record_round_trip_full_and_top_k():
  logits = np.random.default_rng(0).normal(0, 4, 1000).astype("float32")
  params = {k: v.numpy() for k, v in _params("d2").items()}
  full = records.distill_record(example_id="n01/x.jpg", source_shard=3, source_index=17,
                                recipe="d2", replica=5, copy=0, params=params, logits=logits,
                                partner_id="n01/y.jpg", partner_index=9)
  parsed = records.parse_distill(tf.constant(full))
  assert parsed["id"].numpy() == b"n01/x.jpg" and parsed["partner_index"] == 9
  assert int(parsed["replica"]) == 5 and int(parsed["source_index"]) == 17
  for k in A.PARAM_SPEC:
    np.testing.assert_array_equal(parsed["params"][k].numpy(), params[k])
  np.testing.assert_array_equal(parsed["teacher_logits"].numpy(),
                                logits.astype(np.float16).astype(np.float32))
  topk = records.distill_record(example_id="n01/x.jpg", source_shard=3, source_index=17,
                                recipe="d2", replica=5, copy=0, params=params, logits=logits,
                                top_k=10)
  parsed_k = records.parse_distill(tf.constant(topk), top_k=10)
  best = np.argsort(-logits)[:10]
  np.testing.assert_array_equal(parsed_k["topk_indices"].numpy(), best)
  np.testing.assert_allclose(parsed_k["topk_values"].numpy(), logits[best], rtol=1e-3)
  # Parameters + float16 logits stay a couple of kilobytes; top-10 a fraction of that.
  assert 2000 < len(full) < 3000 and len(topk) < 700
  # A vector of records parses in one op into the same fields, each with a leading [n].
  other = records.distill_record(example_id="n02/z.jpg", source_shard=1, source_index=2,
                                 recipe="d2", replica=0, copy=1, params=_numpy_params("d1"),
                                 logits=-logits)
  for serialized, k in (([full, other], 0), ([topk, topk], 10)):
    one_by_one = [records.parse_distill(tf.constant(r), top_k=k) for r in serialized]
    together = records.parse_distill(tf.constant(serialized), top_k=k)
    for i, single in enumerate(one_by_one):
      tf.nest.map_structure(lambda a, b, i=i: np.testing.assert_array_equal(a.numpy(),
                                                                            b[i].numpy()),
                            single, together)


def test_source_example_round_trip():
  data = tf.io.encode_png(_textured()).numpy()
  serialized = records.source_example("c/1.png", data, 4, 48, 64, "png")
  py = records.read_source_example(serialized)
  assert py == {"id": "c/1.png", "encoded": data, "label": 4, "height": 48, "width": 64,
                "format": "png", "original_format": ""}
  parsed = records.parse_source(tf.constant(serialized))
  assert parsed["image/encoded"].numpy() == data and int(parsed["image/label"]) == 4
  assert records.image_format(data) == "png" and records.image_format(b"hello") is None


def test_replay_skips_only_what_every_recipe_leaves_as_the_identity():
  """`replay` runs only the RandAugment layers and the mixup the mixed recipes use: the pixels
  are those of the full function, and a manifest without its recipe gets the full function."""
  from mnv4_train.data import pipeline
  image = _textured()
  data = tf.io.encode_png(image)
  partner = tf.io.encode_png(_textured(seed=1))
  for recipe, layers, mixup in ((A.RECIPES["d1"], 2, False), (A.Recipe("plain"), 0, False),
                                (A.RECIPES["d2"], 0, True)):
    assert (recipe.ra_layers, recipe.mixup) == (layers, mixup)
    for example_id in ("a", "b", "c"):
      p = A.sample(recipe, A.key_seed(recipe.name, 0, example_id), (48, 64, 3),
                   (48, 64, 3) if recipe.mixup else None)
      element = {"image": data, "partner": partner, "params": p, "label": 0, "teacher": 0,
                 "dataset": 0, "ra_constants": tf.constant(recipe.ra_constants(40))}
      full = pipeline.replay(element, 40)["image"].numpy()
      lean = pipeline.replay(element, 40, ra_layers=layers, mixup=mixup)["image"].numpy()
      np.testing.assert_array_equal(lean, full)
  d1 = pipeline.DatasetInfo(name="d1", path="", kind="distill", pairs=(), num_classes=10,
                            num_examples=1, epoch_examples=1, recipe="d1",
                            recipe_settings=A.RECIPES["d1"])
  d2 = pipeline.DatasetInfo(name="d2", path="", kind="distill", pairs=(), num_classes=10,
                            num_examples=1, epoch_examples=1, recipe="d2",
                            recipe_settings=A.RECIPES["d2"])
  source = pipeline.DatasetInfo(name="s", path="", kind="source", pairs=(), num_classes=10,
                                num_examples=1, epoch_examples=1)
  plain = pipeline.StreamOptions(supervised_recipe=A.Recipe("plain", flip=False))
  assert pipeline.replay_static([source], plain) == {"ra_layers": 0, "mixup": False}
  assert pipeline.replay_static([d1, d2], plain) == {"ra_layers": 2, "mixup": True}
  assert pipeline.replay_static([d1, source], pipeline.StreamOptions()) == {"ra_layers": 2,
                                                                           "mixup": False}
  unrecorded = pipeline.DatasetInfo(name="old", path="", kind="distill", pairs=(),
                                    num_classes=10, num_examples=1, epoch_examples=1,
                                    recipe="d1")
  assert pipeline.replay_static([unrecorded, source], plain) == {"ra_layers": A.MAX_RA_LAYERS,
                                                                 "mixup": True}
