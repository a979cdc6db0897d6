"""Fashion-MNIST from its original IDX files, found offline (a `data_prep.ingest` source).

Fashion-MNIST (Zalando Research, MIT licence): 70,000 real 28x28 grayscale product photos in 10
classes, 60,000 for training and 10,000 for testing. The four original files
`{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz` are looked for, in order, in:

  1. `--fashion_mnist_dir` (any folder holding them),
  2. `/usr/share/datasets/fashion-mnist` (Debian: `apt-get install dataset-fashion-mnist`),
  3. the Keras cache, `$KERAS_HOME/datasets/fashion-mnist` or `~/.keras/datasets/fashion-mnist`
     (what `keras.datasets.fashion_mnist.load_data()` leaves on a machine with internet).

Nothing is downloaded. Each image becomes a lossless grayscale PNG with the id
`fashion-mnist/<split>/<index>` (its position in the official file), so ids are stable across
machines and the official test set is exactly the 10,000 `t10k` images.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

CLASS_NAMES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
               "sneaker", "bag", "ankle_boot")
SPLITS = {"train": "train", "test": "t10k"}
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
HOW_TO_GET = ("install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, offline "
              "package), or run `keras.datasets.fashion_mnist.load_data()` once on a machine with "
              "internet, or pass --fashion_mnist_dir=FOLDER holding the four *-ubyte.gz files")


class IdxError(ValueError):
  """An IDX file that is not what its header or its partner file says."""


def candidate_dirs(explicit: str | None = None) -> list[str]:
  """Folders searched for the files, in order."""
  if explicit:
    return [explicit]
  keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
  return [DEBIAN_DIR, os.path.join(keras_home, "datasets", "fashion-mnist")]


def file_names(split: str) -> tuple[str, str]:
  prefix = SPLITS[split]
  return f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"


def locate(split: str, explicit: str | None = None) -> tuple[str, str] | None:
  """(images path, labels path) of `split` in the first folder that has both, else None."""
  images, labels = file_names(split)
  for folder in candidate_dirs(explicit):
    paths = os.path.join(folder, images), os.path.join(folder, labels)
    if all(os.path.isfile(p) for p in paths):
      return paths
  return None


def read_idx(path: str) -> np.ndarray:
  """An IDX file (gzipped or not) as a uint8 array of the shape its header gives."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise IdxError(f"{path} cannot be read: {e}") from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise IdxError(f"{path} is not an IDX file of unsigned bytes")
  ndim = data[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(data) < header:
    raise IdxError(f"{path} has a truncated IDX header")
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  size = int(np.prod(shape))
  if len(data) - header != size:
    raise IdxError(f"{path} holds {len(data) - header} bytes of data, its header says {size}")
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load(split: str, explicit: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(images [n, 28, 28] uint8, labels [n] int64) of `split`; IdxError if absent or broken."""
  paths = locate(split, explicit)
  if paths is None:
    where = ", ".join(candidate_dirs(explicit))
    raise FileNotFoundError(f"Fashion-MNIST ({split}) is not in {where}; {HOW_TO_GET}")
  images, labels = read_idx(paths[0]), read_idx(paths[1])
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise IdxError(f"{paths[0]} and {paths[1]} do not pair up: images {images.shape}, labels "
                   f"{labels.shape}")
  if labels.size and labels.max() >= len(CLASS_NAMES):
    raise IdxError(f"{paths[1]} has label {labels.max()}; Fashion-MNIST has 10 classes")
  return images, labels.astype(np.int64)


def example_id(split: str, index: int) -> str:
  return f"fashion-mnist/{split}/{index:05d}"
