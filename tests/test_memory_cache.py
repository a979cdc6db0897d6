"""`data.memory_cache`: one small source dataset decoded once, batches gathered (issue 12)."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from mnv4_train.data import augment, pipeline
from mnv4_train.errors import ConfigError
from tests.conftest import load_source_arrays, run_cli
from tests.test_train import _history, _main

WHOLE = augment.Recipe("supervised", crop_area=(1.0, 1.0), flip=False, const_resolution=None)
FLIPS = augment.Recipe("supervised", crop_area=(1.0, 1.0), flip=True, const_resolution=None)


def _cached(spec, recipe, host_batch, seed=0, num_hosts=1, host=0, resolution=32):
  opts = pipeline.StreamOptions(seed=seed, supervised_recipe=recipe, memory_cache=True)
  return pipeline.train_dataset([spec], resolution=resolution, host_batch=host_batch,
                                num_classes=10, num_hosts=num_hosts, host=host, options=opts)


def _keys(images, labels):
  return sorted((int(y), x.tobytes()) for x, y in zip(images, labels))


def test_each_epoch_is_every_image_once_with_the_streaming_inputs_pixels(source_shards):
  spec = pipeline.open_dataset(source_shards[0], "a")
  n = spec.num_examples
  xs, ys, _ = load_source_arrays(source_shards[0])  # whole images, as the eval input makes them
  batches = list(_cached(spec, WHOLE, host_batch=n // 4).take(8))  # two epochs
  images = np.concatenate([b["image"].numpy() for b in batches])
  labels = np.concatenate([b["label"].numpy() for b in batches])
  assert _keys(images[:n], labels[:n]) == _keys(xs, ys)
  assert _keys(images[n:], labels[n:]) == _keys(xs, ys)
  assert not np.array_equal(labels[:n], labels[n:])  # each epoch its own order
  assert not np.array_equal(labels[:n], ys)          # shuffled
  # The streaming input of the same recipe gives the same pixels, image by image (its epochs
  # overlap where one shard's pair ends before the other's, so compare images, not epochs).
  opts = pipeline.StreamOptions(supervised_recipe=WHOLE)
  stream = pipeline.train_dataset([spec], resolution=32, host_batch=n // 4, num_classes=10,
                                  options=opts)
  streamed = set(_keys(np.concatenate([b["image"].numpy() for b in stream.take(4)]),
                       np.concatenate([b["label"].numpy() for b in stream.take(4)])))
  assert len(streamed) > n // 2 and streamed <= set(_keys(xs, ys))
  b = batches[0]
  assert b["teacher"].shape == (n // 4, 10) and not np.any(b["teacher"].numpy())
  assert b["dataset"].dtype == tf.int32


def test_flips_mirror_about_half_the_images_and_the_order_is_the_seeds(source_shards):
  spec = pipeline.open_dataset(source_shards[0], "a")
  xs, ys, _ = load_source_arrays(source_shards[0])
  plain = {x.tobytes() for x in xs}
  mirrored = {x[:, ::-1].tobytes() for x in xs} - plain
  first = list(_cached(spec, FLIPS, host_batch=50, seed=3).take(8))
  images = np.concatenate([b["image"].numpy() for b in first])
  flipped = [x.tobytes() in mirrored for x in images]
  assert all(x.tobytes() in plain or f for x, f in zip(images, flipped))
  assert 0.3 < np.mean(flipped) < 0.7
  again = list(_cached(spec, FLIPS, host_batch=50, seed=3).take(8))
  other = list(_cached(spec, FLIPS, host_batch=50, seed=4).take(8))
  np.testing.assert_array_equal(images, np.concatenate([b["image"].numpy() for b in again]))
  assert not np.array_equal(first[0]["label"].numpy(), other[0]["label"].numpy())


def test_two_hosts_take_the_halves_of_one_hosts_batches(source_shards, distill_records):
  spec = pipeline.open_dataset(source_shards[0], "a")
  d1 = pipeline.open_dataset(distill_records["d1"], "d1")
  one = list(_cached_mix([spec, d1], 60).take(5))
  halves = [list(_cached_mix([spec, d1], 30, num_hosts=2, host=h).take(5)) for h in (0, 1)]
  for whole, a, b in zip(one, *halves):
    for key in ("image", "label", "teacher", "dataset"):
      np.testing.assert_array_equal(whole[key].numpy(),
                                    np.concatenate([a[key].numpy(), b[key].numpy()]))


def _cached_mix(datasets, host_batch, **kwargs):
  opts = pipeline.StreamOptions(supervised_recipe=FLIPS, memory_cache=True)
  return pipeline.train_dataset(datasets, resolution=32, host_batch=host_batch, num_classes=10,
                                options=opts, **kwargs)


def test_a_mixture_draws_by_weight_each_dataset_epoch_by_epoch_and_follows_a_schedule(
    source_shards, distill_records):
  d1 = pipeline.open_dataset(distill_records["d1"], "d1")  # 400 records
  spec = pipeline.open_dataset(source_shards[0], "src")   # 200 images, flipped half the time
  batches = list(_cached_mix([d1, spec], 50, weights={"d1": 0.75, "src": 0.25}).take(24))
  which = np.concatenate([b["dataset"].numpy() for b in batches])
  assert 0.68 < np.mean(which == 0) < 0.82
  # The first 400 draws of D1 are its 400 records once each, with their teacher logits.
  d1_alone = list(_cached(d1, WHOLE, host_batch=100).take(4))
  mixed_d1 = [{k: b[k].numpy()[b["dataset"].numpy() == 0] for k in ("image", "teacher")}
              for b in batches]
  firsts = {k: np.concatenate([m[k] for m in mixed_d1])[:400] for k in ("image", "teacher")}
  assert _pairs([firsts]) == _pairs(d1_alone)
  # Source images: no teacher, flipped or not.
  src = np.concatenate([b["teacher"].numpy()[b["dataset"].numpy() == 1] for b in batches])
  assert len(src) > 100 and not np.any(src)
  # A schedule: D1 alone for steps 0-4, the sources alone from step 5 on.
  schedule = [(0, {"d1": 1.0}), (5, {"src": 1.0})]
  steps = [b["dataset"].numpy() for b in _cached_mix([d1, spec], 20, schedule=schedule).take(8)]
  assert all(np.all(s == 0) for s in steps[:5]) and all(np.all(s == 1) for s in steps[5:])


def test_a_restored_iterator_goes_on_with_the_same_batches(source_shards, distill_records,
                                                           tmp_path):
  spec = pipeline.open_dataset(source_shards[0], "a")
  d1 = pipeline.open_dataset(distill_records["d1"], "d1")
  ds = _cached_mix([d1, spec], 64)
  it = iter(ds)
  for _ in range(3):
    next(it)
  path = tf.train.Checkpoint(iterator=it).write(str(tmp_path / "it"))
  expected = [next(it)["label"].numpy() for _ in range(4)]
  fresh = iter(ds)
  tf.train.Checkpoint(iterator=fresh).read(path).assert_consumed()
  for want in expected:
    np.testing.assert_array_equal(next(fresh)["label"].numpy(), want)


def _pairs(batches):
  """Sorted (pixels, teacher logits) byte strings of every element of `batches`."""
  return sorted(x.tobytes() + t.tobytes() for b in batches
                for x, t in zip(np.asarray(b["image"]), np.asarray(b["teacher"])))


def test_records_are_replayed_once_to_the_streaming_replays_pixels_and_logits(distill_records):
  d1 = pipeline.open_dataset(distill_records["d1"], "d1")  # JPEG round trip, full logits
  n = d1.num_examples
  cached = list(_cached(d1, WHOLE, host_batch=n // 4).take(8))  # two epochs
  # The streaming replay, pair after pair in file order, once: the same records exactly.
  once = pipeline.StreamOptions(shuffle=False, cycle_length=1)
  stream = list(pipeline.train_dataset([d1], resolution=32, host_batch=n // 4, num_classes=10,
                                       options=once).take(4))
  assert _pairs(cached[:4]) == _pairs(stream) == _pairs(cached[4:])
  labels = [np.concatenate([b["label"].numpy() for b in part]) for part in (cached[:4], stream)]
  assert sorted(labels[0]) == sorted(labels[1]) and not np.array_equal(*labels)
  # No extra flip on records: every cached image is a replayed one as it is.
  streamed = {x.tobytes() for b in stream for x in b["image"].numpy()}
  assert all(x.tobytes() in streamed for b in cached for x in b["image"].numpy())


def test_fractional_records_are_held_as_the_replays_own_float_pixels(source_shards,
                                                                    distill_records):
  """Mixup without the JPEG step replays fractional grey levels: held as float32, the same
  pixels as the streaming replay's, and a mixture with it holds every dataset that way."""
  d2 = pipeline.open_dataset(distill_records["d2"], "d2")  # mixup without the JPEG step
  n = d2.num_examples
  cached = list(_cached(d2, WHOLE, host_batch=n // 4).take(4))
  once = pipeline.StreamOptions(shuffle=False, cycle_length=1)
  stream = list(pipeline.train_dataset([d2], resolution=32, host_batch=n // 4, num_classes=10,
                                       options=once).take(4))
  assert _pairs(cached) == _pairs(stream)
  levels = (np.concatenate([b["image"].numpy() for b in cached]) + 1.0) * 127.5
  assert np.mean(np.abs(levels - np.round(levels)) > 1e-3) > 0.1  # not whole grey levels
  # Beside whole grey levels (source images): each keeps its own pixels.
  spec = pipeline.open_dataset(source_shards[0], "src")
  batches = list(_cached_mix([d2, spec], 50, weights={"d2": 0.5, "src": 0.5}).take(8))
  which = np.concatenate([b["dataset"].numpy() for b in batches])
  images = np.concatenate([b["image"].numpy() for b in batches])
  src = images[which == 1]
  grey = np.round((src + 1.0) * 127.5).astype(np.float32)  # whole grey levels, scaled as ever
  assert len(src) > 100 and np.array_equal(grey / np.float32(127.5) - np.float32(1.0), src)
  mixed = {x.tobytes() for x in images[which == 0]}
  assert mixed and mixed <= {x.tobytes() for b in stream for x in b["image"].numpy()}
  # 200 images at 2,000 px: 2.4 GB as grey levels, 4 bytes a channel as float: over 4 GiB.
  assert pipeline.memory_cache_problem([spec], WHOLE, 2_000) is None
  assert "GiB" in pipeline.memory_cache_problem([d2], WHOLE, 2_000)
  assert pipeline.memory_cache_problem([d2], WHOLE, 1_000) is None


def test_inputs_it_cannot_hold_stop_with_a_config_error(source_shards):
  spec = pipeline.open_dataset(source_shards[0], "a")
  augmented = augment.Recipe("supervised", ra_layers=2, ra_magnitude=9.0, const_resolution=None)
  with pytest.raises(ConfigError, match="memory_cache='auto' .held when it fits. or False"):
    pipeline.train_dataset([spec], resolution=32, host_batch=8, num_classes=10,
                           options=pipeline.StreamOptions(supervised_recipe=augmented,
                                                          memory_cache=True))
  assert pipeline.memory_cache_problem([spec], WHOLE, 32) is None
  assert "GiB" in pipeline.memory_cache_problem([spec], WHOLE, 100_000)
  with pytest.raises(ConfigError, match="True, False or 'auto'"):
    pipeline.train_dataset([spec], resolution=32, host_batch=8, num_classes=10,
                           options=pipeline.StreamOptions(memory_cache="yes"))


def test_auto_holds_what_fits_and_streams_the_rest_saying_why(source_shards, caplog):
  spec = pipeline.open_dataset(source_shards[0], "a")
  augmented = augment.Recipe("supervised", ra_layers=2, ra_magnitude=9.0, const_resolution=None)

  def first(recipe, cache):
    opts = pipeline.StreamOptions(supervised_recipe=recipe, memory_cache=cache)
    return next(iter(pipeline.train_dataset([spec], resolution=32, host_batch=8,
                                            num_classes=10, options=opts)))["image"].numpy()
  with caplog.at_level("INFO", logger="mnv4_train.data.pipeline"):
    assert np.array_equal(first(WHOLE, "auto"), first(WHOLE, True))  # it fits: held
    assert not caplog.records
    assert np.array_equal(first(augmented, "auto"), first(augmented, False))  # streamed
  assert len(caplog.records) == 1 and "streamed" in caplog.records[0].getMessage()
  assert "crop_area_min=1.0" in caplog.records[0].getMessage()


def test_a_cached_label_only_run_trains_and_resumes(source_shards, tmp_path):
  work = str(tmp_path / "cached")
  bindings = [f"data.datasets={{'a': '{source_shards[0]}'}}", "loss.teacher='none'",
              "loss.distill_weight=0.0", "loss.label_weight=1.0", "data.memory_cache=True",
              "augment.crop_area_min=1.0", "augment.layers=0", "augment.flip=True"]
  _main(work, *bindings, "cadence.stop_after_steps=2", "cadence.checkpoint_every=2")
  _main(work, *bindings)
  metrics = json.load(open(os.path.join(work, "metrics.json")))
  assert metrics["finished"] and metrics["step"] == 3
  assert [h["step"] for h in _history(work)] == [1, 2, 3]
  assert all(np.isfinite(h["loss"]) for h in _history(work))
  # With RandAugment on, the run stops with one line naming the setting.
  proc = _main(str(tmp_path / "bad"), *bindings[:-3], "augment.layers=2", check=False)
  assert proc.returncode == 2 and "data.memory_cache" in proc.stderr
  assert "Traceback" not in proc.stderr


# ---- the streaming input's interleave (issue 12: it crashed mixtures and cost CPU) ------------

def _dataset_ops(ds):
  serialized = ds._as_serialized_graph()  # pylint: disable=protected-access
  graph = tf.compat.v1.GraphDef.FromString(serialized.numpy())
  ops = [n.op for n in graph.node]
  for f in graph.library.function:
    ops += [n.op for n in f.node_def]
  return ops


def test_no_parallel_interleave_runs_under_the_mixing_and_a_mixture_streams(source_shards,
                                                                             distill_records):
  """tf.data's parallel interleave under `sample_from_datasets` with symbolic checkpoints
  crashed (SIGSEGV in ParallelInterleaveIterator::WriteFutureElements) about one run in four."""
  d1 = pipeline.open_dataset(distill_records["d1"], "d1")
  spec = pipeline.open_dataset(source_shards[0], "src")
  ds = pipeline.train_dataset([d1, spec], resolution=32, host_batch=16, num_classes=10)
  ops = _dataset_ops(ds)
  assert "DirectedInterleaveDataset" in ops and "InterleaveDataset" in ops
  assert not [op for op in ops if op.startswith("ParallelInterleave")]
  for _ in range(3):
    # each in a process of its own, forked from the warm server (no TensorFlow runtime started)
    proc = run_cli("tests.mixture_stream", distill_records["d1"], source_shards[0])
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "40", proc.stderr[-2000:]
