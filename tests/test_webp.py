"""WebP input: real files written by Pillow go through ingest, are stored as PNG, and train."""

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_prep import files, ingest, transforms
from data_prep.digits import write_digits_folder
from mnv4_train.data import augment, pipeline, records


def _webp(frames, **options):
  out = io.BytesIO()
  images = [Image.fromarray(f) for f in frames]
  images[0].save(out, format="WEBP", save_all=len(images) > 1, append_images=images[1:],
                 **options)
  return out.getvalue()


def _pixels(rng, h, w, channels=3):
  return rng.integers(0, 256, (h, w, channels), dtype=np.uint8)


@pytest.fixture(scope="module")
def webp_folder(tmp_path_factory):
  """20 digit PNGs plus WebP files of every kind, and one corrupt WebP, in class folders."""
  root = str(tmp_path_factory.mktemp("webp"))
  write_digits_folder(root, per_class=2)
  rng = np.random.default_rng(0)
  rgb, rgba, frame2 = _pixels(rng, 24, 40), _pixels(rng, 30, 20, 4), _pixels(rng, 24, 40)
  lossy = _webp([rgb], quality=80)
  with Image.open(io.BytesIO(lossy)) as im:
    lossy_pixels = np.asarray(im.convert("RGB"))
  files_ = {
      "0/lossless.webp": (_webp([rgb], lossless=True), rgb),
      "1/lossy.webp": (lossy, lossy_pixels),
      "2/alpha.webp": (_webp([rgba], lossless=True, exact=True), rgba[..., :3]),
      "3/animated.webp": (_webp([rgb, frame2], lossless=True), rgb),
      "4/broken.webp": (lossy[:len(lossy) // 2], None),
  }
  for rel, (data, _) in files_.items():
    with open(os.path.join(root, rel), "wb") as f:
      f.write(data)
  return root, {rel: pixels for rel, (_, pixels) in files_.items()}


def test_webp_is_stored_as_png_with_the_same_pixels_and_corrupt_webp_is_dead_lettered(
    webp_folder, tmp_path):
  root, expected = webp_folder
  out = str(tmp_path / "sources")
  manifest = ingest.run([f"--images={root}", f"--out={out}", "--num_shards=2"])
  assert manifest["num_examples"] == 20 + 4 and manifest["dead_letter"] == 1
  with open(os.path.join(out, "dead_letter.jsonl")) as f:
    dead = [json.loads(line) for line in f]
  assert dead == [{"id": "4/broken.webp", "error": "cannot decode WebP: could not create "
                   "decoder object"}]
  stored = {}
  for shard in manifest["shards"]:
    for r in files.read_tfrecords(os.path.join(out, shard["path"])):
      ex = records.read_source_example(r)
      stored[ex["id"]] = ex
  for rel, pixels in expected.items():
    if pixels is None:
      assert rel not in stored
      continue
    ex = stored[rel]
    assert (ex["format"], ex["original_format"]) == ("png", "webp")
    assert records.image_format(ex["encoded"]) == "png"
    assert (ex["height"], ex["width"]) == pixels.shape[:2]
    # What the trainer and the distill job decode: exactly the WebP's pixels (lossless PNG).
    np.testing.assert_array_equal(augment.decode(ex["encoded"]).numpy(), pixels)
  digit = stored["0/0000.png"]
  assert (digit["format"], digit["original_format"]) == ("png", "")  # PNGs are not touched
  # The trainer's evaluation input reads every stored image.
  ds, _ = pipeline.eval_dataset(out, resolution=16, batch_size=64)
  batch = next(iter(ds))
  assert batch["image"].shape == (24, 16, 16, 3)
  assert bool(tf.reduce_all(tf.math.is_finite(tf.cast(batch["image"], tf.float32))))


def test_validate_image_names_the_webp_problem_without_object_addresses():
  assert records.image_format(b"RIFF\x10\x00\x00\x00WEBPVP8 ") == "webp"
  assert records.image_format(b"RIFF\x10\x00\x00\x00WAVEfmt ") is None
  not_webp = b"RIFF\x10\x00\x00\x00WEBPnonsense-nonsense"
  try:
    transforms.webp_to_png(not_webp)
  except Exception as e:  # noqa: BLE001  (whatever Pillow raises)
    text = transforms._pil_error_text(e)
  else:
    pytest.fail("garbage decoded")
  assert text and "0x" not in text and "<" not in text
