"""Bytes per distillation record (parameters + teacher logits) against a materialised JPEG.

    .venv/bin/python benchmarks/record_size.py [--classes 1000] [--resolution 224]

Anchor: what the paper's offline datasets would cost if the augmented pixels were stored: the
D1-augmented image encoded as JPEG (quality 95), for the two real photographs scikit-learn ships.
Ours: the serialized record (tf.train.Example: ids, positions, all augmentation parameters,
logits as float16, or the top-k indices + float16 values). Prints bytes and the ratio, and what
that means for D1 at the paper's scale (500 replicas of ImageNet's 1.28M training images).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_sample_images  # noqa: E402

from mnv4_train.data import augment, records  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--classes", type=int, default=1000)
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--replicas", type=int, default=20, help="augmentations per photo")
  args = parser.parse_args()

  photos = load_sample_images().images  # china.jpg, flower.jpg: 427 x 640 RGB
  logits = np.random.default_rng(0).normal(0, 3, args.classes).astype("float32")
  rows = {"full": [], "top-10": [], "top-100": [], "jpeg": []}
  for i, photo in enumerate(photos):
    image = tf.constant(photo)
    for replica in range(args.replicas):
      params = augment.sample(augment.RECIPES["d1"], augment.key_seed("d1", replica, str(i)),
                              tf.shape(image))
      pixels = augment.apply(image, params, args.resolution)
      jpeg = tf.io.encode_jpeg(tf.cast(tf.round((pixels + 1.0) * 127.5), tf.uint8), quality=95)
      rows["jpeg"].append(len(jpeg.numpy()))
      common = dict(example_id=f"n01440764/n01440764_{10000 + i}.JPEG", source_shard=123,
                    source_index=456, recipe="d1", replica=replica, copy=0,
                    params={k: v.numpy() for k, v in params.items()}, logits=logits)
      rows["full"].append(len(records.distill_record(**common)))
      rows["top-10"].append(len(records.distill_record(**common, top_k=10)))
      rows["top-100"].append(len(records.distill_record(**common, top_k=100)))

  jpeg = float(np.mean(rows["jpeg"]))
  print(f"{args.classes} classes, D1 at {args.resolution}px, {len(photos)} photos x "
        f"{args.replicas} replicas")
  print(f"{'what':<34}{'bytes':>10}{'vs JPEG':>10}{'D1 at paper scale':>20}")
  scale = 500 * IMAGENET_TRAIN
  for name, label in (("jpeg", "anchor: augmented image as JPEG"),
                      ("full", "record, float16 logits"), ("top-10", "record, top-10"),
                      ("top-100", "record, top-100")):
    b = float(np.mean(rows[name]))
    print(f"{label:<34}{b:>10.0f}{b / jpeg:>10.3f}{b * scale / 1e12:>17.2f} TB")


if __name__ == "__main__":
  main()
