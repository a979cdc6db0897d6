"""The domain filter of `select_d3`: keep out corpus images that do not look like the labelled set.

The paper's relevance rule (top-class probability > 0.3) was set for 1,000 classes; with few
classes almost every image passes it, whatever it shows. The domain filter asks another
question: does this image look like the images the student is meant for? It is a
positive-unlabelled classifier: the labelled training images (positives) against a sample of
the corpus (unlabelled: in-domain and out-of-domain images mixed). A corpus image that looks
like the training images cannot be told apart from them and scores high; one of another kind
scores low.

- Features: a 16x16 grey thumbnail (area mean) of the classifier's own input (the central
  crop), plus each channel's mean and standard deviation: 262 numbers, computed in the same
  pass that feeds the classifier.
- Model: gradient-boosted trees (scikit-learn's HistGradientBoostingClassifier, fixed seed, no
  early stopping). Unweighted: the threshold is a rank on held-out images, so the balance of
  the two sides shifts the scores but hardly the order (sample weights cost 10x the fit time).
- Cross-fitting: every corpus image falls into one of two halves by a hash of its id; the model
  that scores half A was fitted on corpus images of half B only (and the reverse), so no image
  is scored by a model that saw it as a negative.
- Threshold: chosen on held-out labelled images (the validation split, never used to fit) so
  that a given fraction of them (`--domain_pass`, 0.98 by default) passes.

Everything is sorted by id before fitting, so the same inputs give the same models and the
same selection on every runner, whatever order Beam delivers them in.
"""

from __future__ import annotations

import numpy as np

THUMBNAIL = 16
NUM_FEATURES = THUMBNAIL * THUMBNAIL + 6
ROUNDS = 200
MODEL = (f"HistGradientBoostingClassifier({ROUNDS} rounds), cross-fitted on two "
         "id-hash halves of the corpus")
FEATURES = f"{THUMBNAIL}x{THUMBNAIL} grey thumbnail of the central crop + channel mean/std"


def _unit(text: str) -> float:
  from data_prep import transforms  # pylint: disable=import-outside-toplevel
  return transforms.stable_hash(text) / 2.0**64


def half(example_id: str) -> int:
  """Which cross-fitting half (0 or 1) an image belongs to: a stable hash of its id."""
  return int(_unit("domain-half\x1f" + example_id) < 0.5)


def sampled(example_id: str, rate: float) -> bool:
  """Whether an image is in the (stable, id-hashed) sample drawn at `rate`."""
  return rate >= 1.0 or _unit("domain-sample\x1f" + example_id) < rate


def features_tf(crop):
  """[h, w, 3] pixels in [-1, 1] (the classifier's central crop) -> [NUM_FEATURES] float32."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  grey = tf.reduce_mean(crop, axis=-1, keepdims=True)
  thumb = tf.image.resize(grey, [THUMBNAIL, THUMBNAIL], method="area")
  return tf.concat([tf.reshape(thumb, [-1]), tf.reduce_mean(crop, axis=[0, 1]),
                    tf.math.reduce_std(crop, axis=[0, 1])], axis=0)


def _matrix(rows):
  """[(id, half, features)] -> (ids, halves, X) sorted by id."""
  rows = sorted(rows, key=lambda r: r[0])
  ids = [r[0] for r in rows]
  halves = np.asarray([r[1] for r in rows], np.int64)
  x = np.asarray([np.asarray(r[2], np.float32) for r in rows], np.float32).reshape(
      len(rows), NUM_FEATURES)
  return ids, halves, x


def _one_thread():
  """scikit-learn's OpenMP threads limited to one: a Beam worker shares its machine with other
  workers, and OpenMP's many short parallel loops, with a thread descheduled, wait at every
  barrier (a 1,700-image fit took 31 s on 2 threads against 7 s on one, with two other busy
  processes on 2 cores; 1.3 s against 1.8 s on an idle machine)."""
  import threadpoolctl  # pylint: disable=import-outside-toplevel
  return threadpoolctl.threadpool_limits(limits=1, user_api="openmp")


def _fit_one(pos, neg):
  from sklearn.ensemble import HistGradientBoostingClassifier  # pylint: disable=import-outside-toplevel
  x = np.concatenate([pos, neg])
  y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
  model = HistGradientBoostingClassifier(max_iter=ROUNDS, early_stopping=False, random_state=0)
  with _one_thread():
    model.fit(x, y)
  return model


def fit(in_domain, corpus_sample) -> list:
  """Fits the two cross-fitted models: [model for half 0, model for half 1].

  `in_domain` and `corpus_sample` are lists of (id, half, features). The model for half h is
  fitted on every in-domain image against the corpus images of the other half (both halves
  when the other one is empty). No corpus images, or no in-domain images: [] (nothing to
  learn; the filter then passes everything).
  """
  if not in_domain or not corpus_sample:
    return []
  _, _, pos = _matrix(in_domain)
  _, halves, neg = _matrix(corpus_sample)
  models = []
  for h in (0, 1):
    other = neg[halves != h]
    models.append(_fit_one(pos, other if len(other) else neg))
  return models


def scores(models, halves, x) -> np.ndarray:
  """In-domain probability of each row, each scored by the model of its half; ones if no
  models."""
  x = np.asarray(x, np.float32).reshape(-1, NUM_FEATURES)
  halves = np.asarray(halves, np.int64)
  out = np.ones(len(x), np.float64)
  if not models:
    return out
  with _one_thread():
    for h in (0, 1):
      rows = halves == h
      if rows.any():
        out[rows] = models[h].predict_proba(x[rows])[:, 1]
  return out


def threshold(models, heldout, pass_fraction: float) -> dict:
  """The score a corpus image must exceed: the one that `pass_fraction` of the held-out
  in-domain images exceed. {threshold (None: no models, nothing filtered), heldout_images,
  heldout_passed}."""
  if not models or not heldout:
    return {"threshold": None, "heldout_images": len(heldout), "heldout_passed": None}
  _, halves, x = _matrix(heldout)
  return cut(scores(models, halves, x), pass_fraction)


def cut(heldout_scores, pass_fraction: float) -> dict:
  """`threshold` from the held-out images' scores already computed."""
  s = np.sort(np.asarray(heldout_scores, np.float64))
  index = int(np.floor((1.0 - pass_fraction) * len(s)))
  t = float(np.nextafter(s[index], -np.inf)) if index < len(s) else float(s[-1])
  return {"threshold": t, "heldout_images": len(s),
          "heldout_passed": round(float(np.mean(s > t)), 6)}
