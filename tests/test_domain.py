"""The domain filter of select_d3 on real images: garments in, digits out."""

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

from data_prep import domain, fashion_mnist
from mnv4_train.data import augment


@tf.function(input_signature=[tf.TensorSpec([None, None], tf.uint8)])
def _one(image):
  rgb = tf.repeat(image[..., None], 3, axis=-1)
  return domain.features_tf(augment.center_crop(rgb, 32))


def _features(images):
  """uint8 [n, h, w] grey images -> their domain features, as select_d3 computes them (the
  classifier's central crop at 32 px, then the features), in one traced function."""
  return np.stack([_one(tf.constant(image)).numpy() for image in images])


def _rows(prefix, feats):
  ids = [f"{prefix}/{i}" for i in range(len(feats))]
  return [(i, domain.half(i), f) for i, f in zip(ids, feats)]


def test_the_domain_filter_keeps_garments_and_keeps_out_digits_whatever_the_input_order():
  assert fashion_mnist.locate("train"), fashion_mnist.HOW_TO_GET
  images, _ = fashion_mnist.load("train")
  digits = load_digits().images  # 8x8, 0..16: another kind of image
  digits = np.kron(digits * (255.0 / 16.0), np.ones((4, 4))).astype(np.uint8)[:, 2:30, 2:30]
  train = _rows("train", _features(images[:800]))
  heldout = _rows("val", _features(images[800:1200]))
  garments = _rows("corpus/garment", _features(images[1200:1800]))
  others = _rows("corpus/digit", _features(digits[:300]))
  corpus = garments + others

  models = domain.fit(train, corpus)
  cut = domain.threshold(models, heldout, 0.95)
  assert cut["heldout_images"] == 400 and 0.94 <= cut["heldout_passed"] <= 0.96

  def passed(rows):
    s = domain.scores(models, [r[1] for r in rows], [r[2] for r in rows])
    return float(np.mean(s > cut["threshold"]))

  # The goal: most in-domain corpus images in, at most a tenth of the others.
  assert passed(garments) >= 0.85, passed(garments)
  assert passed(others) <= 0.10, passed(others)

  # Beam hands the lists over in any order: the same models and threshold whatever it is.
  rng = np.random.default_rng(0)
  again = domain.fit([train[i] for i in rng.permutation(len(train))],
                     [corpus[i] for i in rng.permutation(len(corpus))])
  assert domain.threshold(again, heldout[::-1], 0.95) == cut
  both = [r[2] for r in corpus]
  np.testing.assert_array_equal(domain.scores(models, [r[1] for r in corpus], both),
                                domain.scores(again, [r[1] for r in corpus], both))
  # Cross-fitting: each half is scored by a model that never saw it as a negative.
  assert {r[1] for r in corpus} == {0, 1}


def test_without_a_corpus_or_labelled_images_the_filter_passes_everything():
  feats = np.zeros((3, domain.NUM_FEATURES), np.float32)
  rows = _rows("x", feats)
  assert domain.fit(rows, []) == [] and domain.fit([], rows) == []
  assert domain.threshold([], rows, 0.98)["threshold"] is None
  np.testing.assert_array_equal(domain.scores([], [0, 1, 0], feats), np.ones(3))
  assert domain.half("a") in (0, 1) and domain.half("a") == domain.half("a")
  drawn = [domain.sampled(str(i), 0.25) for i in range(4000)]
  assert 0.22 < np.mean(drawn) < 0.28 and all(domain.sampled(str(i), 1.0) for i in range(10))
