"""sklearn's digits (1,797 real 8x8 scans of handwritten digits, 10 classes) as an image folder.

The small real dataset that ships offline with scikit-learn: the embedded default for local runs,
tests and benchmarks. `python -m data_prep.digits --out DIR` writes DIR/<digit>/<index>.png.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # the command line: TensorFlow's C++ start-up lines are noise
  from mnv4_train.cli import quiet_tensorflow  # first: the imports below load TensorFlow
  quiet_tensorflow()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def write_digits_folder(root: str, *, size: int = 32, limit: int | None = None,
                        per_class: int | None = None, fmt: str = "png") -> dict[str, int]:
  """Writes digits as root/<digit>/<index>.png, upsampled to `size`; returns {id: label}."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = (digits.images / 16.0 * 255.0).astype("float32")[..., None]
  taken: dict[int, int] = {}
  written = {}
  for i, (image, label) in enumerate(zip(images, digits.target)):
    if limit is not None and len(written) >= limit:
      break
    if per_class is not None and taken.get(int(label), 0) >= per_class:
      continue
    taken[int(label)] = taken.get(int(label), 0) + 1
    big = tf.image.resize(np.repeat(image, 3, axis=-1), (size, size), method="bilinear")
    big = tf.cast(tf.clip_by_value(tf.round(big), 0, 255), tf.uint8)
    data = tf.io.encode_png(big) if fmt == "png" else tf.io.encode_jpeg(big, quality=95)
    rel = os.path.join(str(label), f"{i:04d}.{fmt}")
    os.makedirs(os.path.join(root, str(label)), exist_ok=True)
    with open(os.path.join(root, rel), "wb") as f:
      f.write(data.numpy())
    written[rel] = int(label)
  return written


def main(argv=None):
  from mnv4_train.errors import ArgumentParser
  parser = ArgumentParser(prog="data_prep.digits", description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="folder to write <digit>/<index>.png into")
  parser.add_argument("--size", type=int, default=32, help="image side in pixels")
  parser.add_argument("--per_class", type=int, default=None, help="images per class")
  args = parser.parse_args(argv)
  written = write_digits_folder(args.out, size=args.size, per_class=args.per_class)
  print(f"wrote {len(written)} digit images to {args.out}")


if __name__ == "__main__":
  main()
