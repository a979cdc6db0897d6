"""Which relevance criterion keeps out-of-distribution images out of D3? Measured on a main-job
workspace, every threshold chosen on validation images, never on the corpus it is judged on.

    .venv/bin/python benchmarks/relevance_filter.py --workspace workspace/fashion_mnist

The main job's corpus holds Fashion-MNIST garments (in-distribution) and sklearn's digits
(out-of-distribution, ids `unlabeled/...`). The paper keeps a corpus image when the relevance
classifier's top-class probability exceeds 0.3, a threshold set for 1,000 classes; with 10 it
lets almost everything through. Here each scorer (the relevance classifier, i.e. the label-only
student, and the teacher) gives each image several scores:

  msp          top-class probability (the paper's score)
  max_logit    the largest logit
  energy       logsumexp of the logits (the negative free energy; Liu et al., 2020)
  margin       top-1 minus top-2 probability
  mahalanobis  minus the smallest Mahalanobis distance of the penultimate features (the
               `flatten` layer) to a class mean, with one shared covariance, both fitted on the
               labelled training split `sources/train` (Lee et al., 2018)
  knnK         the cosine similarity of the L2-normalised penultimate features to their K-th
               nearest neighbour among the training split's (deep nearest neighbours; Sun et
               al., 2022), K = 1, 10, 50

For each, the threshold is the one that keeps `--id_pass` (95%) of the validation split's
garments (`sources/val`, labelled, never in the corpus). The out-of-distribution digits are cut
in two halves by a stable hash of their ids: the criterion is chosen on half A (fewest digits
kept), and reported on half B and on the corpus's garments, which took no part in any choice.
The paper's rule (msp > 0.3 with the classifier) is reported beside them.

Then select_d3's domain filter (`data_prep.domain`, `--in_domain`): gradient-boosted trees on
16x16 thumbnails telling the training garments from the corpus (cross-fitted on two id-hash
halves of the corpus), its threshold keeping 95% (as the rows above) and 98% (select_d3's
default `--domain_pass`) of the validation garments, alone and with the paper's rule.

Writes relevance_filter.json and relevance_filter.png into the workspace.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")  # Keras' retracing notes: a measurement prints its table only

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_prep import domain  # noqa: E402
from mnv4_train.data import augment, formats, records  # noqa: E402
from mnv4_train.models import checkpoint  # noqa: E402

KNN = (1, 10, 50)
SCORES = ("msp", "max_logit", "energy", "margin", "mahalanobis") + tuple(f"knn{k}" for k in KNN)
OOD_PREFIX = "unlabeled/"  # ids of the images ingest's --unlabeled_images added to the corpus


def read_images(folder, resolution, crop=0.875):
  """(images [n, res, res, 3] in [-1, 1], ids) of source shards, as select_d3 feeds its
  classifier (the central `crop` resized)."""
  m = formats.SourceShards.read(folder, folder)
  paths = [formats.inside(folder, s.path, folder) for s in m.shards if s.count]

  def prepare(serialized):
    ex = records.parse_source(serialized)
    return (augment.center_crop(augment.decode(ex["image/encoded"]), resolution, crop),
            ex["image/id"], ex["image/label"])
  ds = tf.data.TFRecordDataset(paths).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  images, ids, labels = [], [], []
  for image, example_id, label in ds.batch(1024):
    images.append(image.numpy())
    ids.extend(i.decode() for i in example_id.numpy())
    labels.append(label.numpy())
  return np.concatenate(images), ids, np.concatenate(labels)


def outputs_of(model, images):
  """(logits [n, C], penultimate features [n, D]) of `images`."""
  import keras  # pylint: disable=import-outside-toplevel
  both = keras.Model(model.inputs, [model.output, model.get_layer("flatten").output])
  logits, features = both.predict(images, batch_size=512, verbose=0)
  return logits.astype(np.float64), features.astype(np.float64)


class Mahalanobis:
  """Class means and one shared covariance of training features (Lee et al., 2018)."""

  def __init__(self, features, labels, ridge=1e-3):
    classes = np.unique(labels)
    self.means = np.stack([features[labels == c].mean(0) for c in classes])
    centred = features - self.means[np.searchsorted(classes, labels)]
    cov = centred.T @ centred / len(features)
    cov += ridge * np.trace(cov) / len(cov) * np.eye(len(cov))
    self.precision = np.linalg.inv(cov)

  def score(self, features):
    """Minus the distance to the nearest class mean: higher is more in-distribution."""
    best = None
    for mean in self.means:
      d = features - mean
      dist = np.sum((d @ self.precision) * d, axis=1)
      best = dist if best is None else np.minimum(best, dist)
    return -best


class NearestNeighbours:
  """The training features, L2-normalised: a bank for the K-th nearest neighbour's similarity
  (Sun et al., 2022)."""

  def __init__(self, features, ks=KNN):
    self.bank = _unit(features)
    self.ks = ks

  def scores(self, features, chunk=2048):
    """{f"knn{k}": the cosine similarity to the k-th nearest training feature}: higher is more
    in-distribution."""
    unit = _unit(features)
    out = {k: [] for k in self.ks}
    for start in range(0, len(unit), chunk):
      sims = unit[start:start + chunk] @ self.bank.T
      top = -np.sort(-np.partition(sims, -max(self.ks), axis=1)[:, -max(self.ks):], axis=1)
      for k in self.ks:
        out[k].append(top[:, k - 1])
    return {f"knn{k}": np.concatenate(v).astype(np.float64) for k, v in out.items()}


def _unit(features):
  features = np.asarray(features, np.float32)
  return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def scores_of(model, images, fitted, neighbours):
  """{score name: [n]} of a model on `images`; `fitted` its Mahalanobis, `neighbours` its
  NearestNeighbours."""
  logits, features = outputs_of(model, images)
  top = logits.max(1, keepdims=True)
  probs = np.exp(logits - top)
  probs /= probs.sum(1, keepdims=True)
  ordered = np.sort(probs, 1)
  return {"msp": ordered[:, -1], "max_logit": logits.max(1),
          "energy": (top[:, 0] + np.log(np.exp(logits - top).sum(1))),
          "margin": ordered[:, -1] - ordered[:, -2], "mahalanobis": fitted.score(features),
          **neighbours.scores(features)}


def half(example_id):
  """0 or 1, a stable function of the id (which half of the digits it belongs to)."""
  return hashlib.sha1(example_id.encode()).digest()[0] & 1


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workspace", default="workspace/fashion_mnist")
  parser.add_argument("--id_pass", type=float, default=0.95,
                      help="fraction of the validation garments every threshold keeps")
  parser.add_argument("--resolution", type=int, default=32)
  args = parser.parse_args(argv)
  ws = args.workspace
  start = time.time()
  train, train_ids, train_labels = read_images(os.path.join(ws, "sources", "train"), args.resolution)
  val, val_ids, _ = read_images(os.path.join(ws, "sources", "val"), args.resolution)
  corpus, ids, _ = read_images(os.path.join(ws, "sources", "corpus"), args.resolution)
  ood = np.array([i.startswith(OOD_PREFIX) for i in ids])
  halves = np.array([half(i) for i in ids])
  print(f"training garments {len(train):,}, validation {len(val):,}; corpus {len(corpus):,}: {int((~ood).sum()):,} "
        f"garments, {int(ood.sum()):,} digits (half A {int((ood & (halves == 0)).sum())}, "
        f"half B {int((ood & (halves == 1)).sum())}); read in {time.time() - start:.0f} s")
  scorers = {"classifier": os.path.join(ws, "runs", "student_labels", "export", "student.keras"),
             "teacher": os.path.join(ws, "runs", "teacher", "export", "student.keras")}
  rows = []
  for scorer, path in scorers.items():
    model = checkpoint.load_model(path, what=scorer, saved_model=False)
    train_features = outputs_of(model, train)[1]
    fitted = Mahalanobis(train_features, train_labels)
    neighbours = NearestNeighbours(train_features)
    on_val = scores_of(model, val, fitted, neighbours)
    on_corpus = scores_of(model, corpus, fitted, neighbours)
    for score in SCORES:
      threshold = float(np.quantile(on_val[score], 1.0 - args.id_pass))
      rows.append(_row(f"{scorer} {score} > {threshold:.4g}", scorer, score, threshold,
                       on_val[score], on_corpus[score], ood, halves, chosen_on_val=True))
    if scorer == "classifier":
      paper = _row("classifier msp > 0.3 (the paper)", scorer, "msp", 0.3, on_val["msp"],
                   on_corpus["msp"], ood, halves, chosen_on_val=False)
      paper_keeps = (on_val["msp"] > 0.3, on_corpus["msp"] > 0.3)
  best = min(rows, key=lambda r: (r["ood_kept_half_a"], -r["id_kept_corpus"]))
  best["chosen"] = True
  rows = [paper] + rows + domain_rows(train, train_ids, val, val_ids, corpus, ids, ood, halves,
                                      paper_keeps, (args.id_pass, 0.98))
  print(f"\n{'criterion':<44}{'val kept':>9}{'corpus garments':>17}{'digits A':>10}"
        f"{'digits B':>10}")
  for r in rows:
    print(f"{r['criterion'] + (' *' if r.get('chosen') else ''):<44}{100 * r['val_kept']:>8.1f}%"
          f"{100 * r['id_kept_corpus']:>16.1f}%{100 * r['ood_kept_half_a']:>9.1f}%"
          f"{100 * r['ood_kept_half_b']:>9.1f}%")
  print("(* chosen on digits half A at the validation threshold; judge it on half B and the "
        "corpus garments)")
  out = {"workspace": ws, "id_pass": args.id_pass, "validation_images": len(val),
         "corpus_garments": int((~ood).sum()), "corpus_digits": int(ood.sum()), "rows": rows}
  with open(os.path.join(ws, "relevance_filter.json"), "w") as f:
    json.dump(out, f, indent=1)
  print(f"{os.path.join(ws, 'relevance_filter.json')}; {plot(rows, ws)}; "
        f"{time.time() - start:.0f} s")
  return out


def _features(images):
  """select_d3's domain features of [n, res, res, 3] crops in [-1, 1]."""
  out = [tf.vectorized_map(domain.features_tf, tf.constant(images[i:i + 2048])).numpy()
         for i in range(0, len(images), 2048)]
  return np.concatenate(out)


def domain_rows(train, train_ids, val, val_ids, corpus, ids, ood, halves, paper_keeps, passes):
  """The domain filter's rows: fitted as select_d3 fits it (every training garment against the
  whole corpus, cross-fitted), thresholds from validation."""
  train_rows = [(i, domain.half(i), f) for i, f in zip(train_ids, _features(train))]
  corpus_features = _features(corpus)
  corpus_halves = [domain.half(i) for i in ids]
  models = domain.fit(train_rows, list(zip(ids, corpus_halves, corpus_features)))
  on_val = domain.scores(models, [domain.half(i) for i in val_ids], _features(val))
  on_corpus = domain.scores(models, corpus_halves, corpus_features)
  rows = []
  for fraction in passes:
    cut = domain.cut(on_val, fraction)["threshold"]
    name = f"domain {100 * fraction:.0f}% val"
    rows.append(_row(name, "domain", "domain", cut, on_val, on_corpus, ood, halves,
                     chosen_on_val=True))
    rows.append(_row(name + " + the paper's rule", "domain", "domain", cut, on_val, on_corpus,
                     ood, halves, chosen_on_val=True, also=paper_keeps))
  return rows


def _row(name, scorer, score, threshold, on_val, on_corpus, ood, halves, *, chosen_on_val,
         also=None):
  keep = on_corpus > threshold
  val_keep = on_val > threshold
  if also is not None:
    val_keep, keep = val_keep & also[0], keep & also[1]
  return {"criterion": name, "scorer": scorer, "score": score, "threshold": threshold,
          "threshold_from": "validation" if chosen_on_val else "the paper",
          "val_kept": float(np.mean(val_keep)),
          "id_kept_corpus": float(np.mean(keep[~ood])),
          "ood_kept_half_a": float(np.mean(keep[ood & (halves == 0)])),
          "ood_kept_half_b": float(np.mean(keep[ood & (halves == 1)]))}


def plot(rows, ws):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(15, 4.6))
  x = np.arange(len(rows))
  ax.bar(x - 0.2, [100 * r["id_kept_corpus"] for r in rows], 0.4, color="#4477aa",
         label="corpus garments kept (in-distribution)")
  ax.bar(x + 0.2, [100 * r["ood_kept_half_b"] for r in rows], 0.4, color="#cc3311",
         label="digits kept (out-of-distribution, half B)")
  ax.axhline(95, color="#4477aa", ls=":", lw=1)
  ax.axhline(10, color="#cc3311", ls=":", lw=1)
  ax.set_xticks(x, [r["criterion"].replace(" > ", "\n> ") + ("\n(chosen)" if r.get("chosen")
                                                              else "") for r in rows],
                fontsize=6.5)
  ax.set_ylabel("% of images passing")
  ax.set_ylim(0, 105)
  ax.set_title("relevance criteria: thresholds that keep 95% of the validation garments")
  ax.legend(loc="center right", fontsize=8)
  fig.tight_layout()
  path = os.path.join(ws, "relevance_filter.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


if __name__ == "__main__":
  main()
