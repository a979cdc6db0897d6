"""The Beam jobs: each transform on TestPipeline, each job end to end on real digit images."""

import filecmp
import glob
import json
import os

import apache_beam as beam
import keras
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from data_prep import distill, domain, files, ingest, select_d3, transforms
from mnv4_train.data import augment, pipeline, records
from tests.conftest import CORRUPT_FILES, run_cli

pytestmark = pytest.mark.slow


def _same_tree(a, b):
  """Every file under a and b, byte for byte (file lists equal too)."""
  cmp = filecmp.dircmp(a, b)
  assert not cmp.left_only and not cmp.right_only, (cmp.left_only, cmp.right_only)
  _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
  assert not mismatch and not errors, mismatch
  for sub in cmp.common_dirs:
    _same_tree(os.path.join(a, sub), os.path.join(b, sub))


def _cli(module, *args):
  return run_cli(module, *args, cwd=os.getcwd(), timeout=300)


def _one_line_error(result, *needles):
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("data_prep."), result.stderr[-2000:]
  for needle in needles:
    assert needle in lines[0]


# ---- transforms on TestPipeline ---------------------------------------------------------------

def test_validate_image_routes_bad_files_to_dead_letter_and_counts_them():
  good = tf.io.encode_png(tf.zeros((5, 7, 3), tf.uint8)).numpy()
  inputs = [{"id": "ok.png", "encoded": good, "label": 1},
            {"id": "bad.jpg", "encoded": b"\xff\xd8\xff broken", "label": 2},
            {"id": "text", "encoded": b"hello", "label": 3}]
  p = TestPipeline()
  out = (p | beam.Create(inputs)
         | beam.ParDo(transforms.ValidateImage()).with_outputs(transforms.DEAD_LETTER,
                                                               main="ok"))
  assert_that(out.ok | "Ids" >> beam.Map(lambda e: (e["id"], e["height"], e["width"],
                                                    e["format"])),
              equal_to([("ok.png", 5, 7, "png")]), label="good")
  assert_that(out[transforms.DEAD_LETTER] | "DeadIds" >> beam.Map(lambda e: e["id"]),
              equal_to(["bad.jpg", "text"]), label="dead")
  result = p.run()
  result.wait_until_finish()
  counters = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}
  assert counters["images_ok"] == 1 and counters["images_corrupt"] == 2


def test_write_sorted_shards_sorts_and_groups_by_file(tmp_path):
  items = [("a.tfrecord", (k, f"a{k}".encode())) for k in (3, 1, 2)] + [
      ("sub/b.tfrecord", (0, b"b0"))]
  with TestPipeline() as p:
    stats = p | beam.Create(items) | transforms.WriteSortedShards(str(tmp_path))
    # A TFRecord is 16 bytes of framing (length, two CRCs) around each record's data.
    assert_that(stats, equal_to([{"path": "a.tfrecord", "count": 3, "bytes": 3 * (16 + 2)},
                                 {"path": "sub/b.tfrecord", "count": 1, "bytes": 16 + 2}]))
  assert os.path.getsize(tmp_path / "a.tfrecord") == 54
  assert list(files.read_tfrecords(str(tmp_path / "a.tfrecord"))) == [b"a1", b"a2", b"a3"]
  assert list(files.read_tfrecords(str(tmp_path / "sub/b.tfrecord"))) == [b"b0"]


def test_replication_copies_rare_classes_at_random_with_the_expected_count():
  rows = [(0.9, "a", 0, 0), (0.8, "b", 0, 1), (0.7, "c", 1, 0)]
  # Abundant class: the top K once each, best first.
  assert [(r[1], c) for _, r, c in select_d3.replicate(rows, 2)] == [("a", 1), ("b", 1)]
  assert sum(c for _, _, c in select_d3.replicate(rows[:1], 130_000)) == 130_000
  # Rare class: 3 images, K = 8 -> each gets 2 copies plus a third with probability 2/3.
  copies = [c for _, _, c in select_d3.replicate(rows, 8)]
  assert set(copies) <= {2, 3}
  assert copies == [c for _, _, c in select_d3.replicate(list(reversed(rows)), 8)]  # stable
  # Expected count per class is K, and the extra copy does not go to the best-ranked image:
  # 3,000 classes of 3 images each (ids differ per class), K = 8.
  totals, extra_by_rank = [], np.zeros(3)
  for k in range(3000):
    cls_rows = [(0.9 - 0.1 * i, f"class{k}/img{i}", 0, i) for i in range(3)]
    chosen = select_d3.replicate(cls_rows, 8)
    totals.append(sum(c for _, _, c in chosen))
    extra_by_rank += [c - 2 for _, _, c in chosen]
  assert abs(np.mean(totals) - 8.0) < 0.05, np.mean(totals)
  assert np.all(np.abs(extra_by_rank / 3000 - 2 / 3) < 0.04), extra_by_rank / 3000


def test_d3_selection_on_a_constructed_score_table():
  """Threshold, top-K per class and replication, on scores we choose."""
  probs = {  # id -> class probabilities (3 classes)
      "a": [0.90, 0.05, 0.05], "b": [0.80, 0.10, 0.10], "c": [0.70, 0.20, 0.10],
      "d": [0.35, 0.33, 0.32], "e": [0.29, 0.28, 0.43], "f": [0.10, 0.60, 0.30],
      "g": [0.25, 0.25, 0.50], "h": [0.34, 0.33, 0.33]}
  keys = [(i, 0, n) for n, i in enumerate(sorted(probs))]
  batch = PredictionResult(None, np.array([probs[i] for i, _, _ in keys]))
  with TestPipeline() as p:
    rows = (p | beam.Create([(keys, batch)])
            | beam.ParDo(select_d3.TopClass(0.3, "probabilities"))
            | beam.GroupByKey()
            | beam.ParDo(select_d3.Replicate(per_class=2, num_files=1))
            | beam.Map(lambda kv: json.loads(kv[1][1])))
    summary = rows | beam.Map(lambda r: (r["class"], r["id"], r["copies"]))
    # class 0: a, b, c, d, h pass 0.3 -> top 2 are a, b. class 1: f alone -> 2 copies.
    # class 2: e (0.43) and g (0.50) -> g first. Nothing below 0.3 survives.
    assert_that(summary, equal_to([(0, "a", 1), (0, "b", 1), (1, "f", 2), (2, "g", 1),
                                   (2, "e", 1)]))


def test_augment_task_batches_in_a_fixed_order_and_make_records_sets_bad_logits_aside(
    source_shards):
  src, manifest = source_shards
  path = os.path.join(src, manifest["shards"][0]["path"])
  count = manifest["shards"][0]["count"]
  # Replicas 3 and 4; D3-style (copies, selected class) for 2 positions.
  task = ((0, path, 3, 2), {0: (2, 4), 5: (1, 7)})
  with TestPipeline() as p:
    batches = (p | beam.Create([task])
               | beam.ParDo(distill.AugmentTask(augment.RECIPES["d3"], 32, "minus_one_to_one", 2,
                                                2)))
    assert_that(batches | beam.Map(lambda kv: (kv[0][0], [k for k, _ in kv[0][1]],
                                               tuple(kv[1].shape))),
                equal_to([("r0003/shard-00000-of-00002.tfrecord", [(0, 0), (0, 1)],
                           (2, 32, 32, 3)),
                          ("r0003/shard-00000-of-00002.tfrecord", [(5, 0)], (1, 32, 32, 3)),
                          ("r0004/shard-00000-of-00002.tfrecord", [(0, 0), (0, 1)],
                           (2, 32, 32, 3)),
                          ("r0004/shard-00000-of-00002.tfrecord", [(5, 0)], (1, 32, 32, 3))]))
  assert count > 5
  # MakeRecords: finite logits become records, NaN or wrong-sized outputs go to dead letters.
  meta = {"id": "x", "source_shard": 0, "source_index": 0, "replica": 0, "copy": 0,
          "partner_id": "", "partner_index": -1, "label": 2, "selected_class": -1,
          "partner_label": -1,
          "params": {k: v.numpy() for k, v in augment.sample(
              augment.RECIPES["d1"], augment.key_seed("d1", 0, "x"), (8, 8, 3)).items()}}
  keys = ("f.tfrecord", [((0, 0), meta), ((1, 0), dict(meta, id="y"))])
  outputs = np.array([[0.5, -1.0, 2.0], [np.nan, 0.0, 1.0]], np.float32)
  with TestPipeline() as p:
    made = (p | beam.Create([(keys, PredictionResult(None, outputs))])
            | beam.ParDo(distill.MakeRecords("d1", "logits", 0, 3)).with_outputs(
                transforms.DEAD_LETTER, distill.VIEWS, main="records"))
    assert_that(made.records | beam.Map(lambda kv: (kv[0], kv[1][0])),
                equal_to([("f.tfrecord", (0, 0))]), label="records")
    # One view row per record: (target, partner, share, teacher top-1, its probability, what).
    assert_that(made[distill.VIEWS] | beam.Map(lambda v: (v[0], v[1], v[2], v[3], v[5],
                                                          round(v[4], 4))),
                equal_to([(2, -1, 1.0, 2, "label", 0.7856)]), label="views")
    assert_that(made[transforms.DEAD_LETTER] | beam.Map(lambda d: d["id"]), equal_to(["y"]),
                label="dead")


def test_the_jobs_pixels_and_the_replayed_pixels_are_bit_equal_with_the_jpeg_step(
    source_shards):
  """D2 (mixup, so the JPEG encoder gets rounded floats) through the job's own augmentation map
  and through the trainer's replay, each in tf.data: the same bits, JPEG round trip included."""
  src, manifest = source_shards
  examples = transforms.read_shard(os.path.join(src, manifest["shards"][0]["path"]))[:40]
  recipe = augment.RECIPES["d2"]
  assert recipe.jpeg_quality == augment.JPEG_QUALITY
  task = distill.AugmentTask(recipe, 48, "minus_one_to_one", 8, 2)
  task.setup()
  seeds = [augment.key_seed("d2", 0, ex["id"]) for ex in examples]
  partners = [examples[augment.sample_partner(seed, i, len(examples))]["encoded"]
              for i, seed in enumerate(seeds)]
  inputs = {"seed": tf.stack(seeds), "data": tf.constant([ex["encoded"] for ex in examples]),
            "partner": tf.constant(partners)}
  # The job's own path: one stream per worker, fed task by task (two calls here, 25 + 15).
  batches = [b for lo, hi in ((0, 25), (25, 40))
             for b in task.batches(inputs["seed"][lo:hi], inputs["data"][lo:hi],
                                   inputs["partner"][lo:hi])]
  assert [len(px) for px, _ in batches] == [8, 8, 8, 1, 8, 7]
  job = [(px, {k: v[i] for k, v in p.items()}) for pxs, p in batches for i, px in enumerate(pxs)]
  params = {k: tf.constant(np.stack([p[k] for _, p in job])) for k in augment.PARAM_SPEC}
  assert np.all(params["mix_ratio"].numpy() < 1.0)
  light = tf.data.Dataset.from_tensor_slices({
      "image": inputs["data"], "partner": partners, "params": params,
      "label": tf.zeros([len(examples)], tf.int32), "teacher": tf.zeros([len(examples), 10]),
      "dataset": tf.zeros([len(examples)], tf.int32),
      # The stream's per-element RandAugment constants (the recipe's, at 48 px).
      "ra_constants": tf.tile(tf.constant([recipe.ra_constants(48)], tf.float32),
                              [len(examples), 1])})
  # One quality for the whole mixture, and a per-element choice among several (D2 is dataset 0).
  for qualities in [(recipe.jpeg_quality,), (recipe.jpeg_quality, 0)]:
    replayed = list(light.map(lambda e, q=qualities: pipeline.replay(e, 48, q)))
    assert len(replayed) == len(job) == 40
    for (pixels, _), r in zip(job, replayed):
      np.testing.assert_array_equal(pixels.numpy(), r["image"].numpy())
  # The JPEG step is there: replayed without it, the pixels differ.
  plain = list(light.map(lambda e: pipeline.replay(e, 48, (0,))))
  assert all(not np.array_equal(p.numpy(), r["image"].numpy()) for (p, _), r in zip(job, plain))


def test_the_augment_stream_keeps_each_calls_outputs_in_order_across_calls():
  """One iterator serves every task: a caller that stops early leaves outputs behind, and the
  next call still gets exactly its own, in order; after close a call starts a new stream."""
  stream = distill.AugmentStream(lambda e: (e["seed"][0] * 10 + e["seed"][1],
                                            {"length": tf.strings.length(e["data"])}))

  def call(first, n):
    seeds = tf.constant([[first + i, i] for i in range(n)], tf.int64)
    data = tf.constant(["x" * (first + i) for i in range(n)])
    return stream(seeds, data, data)

  assert [(int(v), int(p["length"])) for v, p in call(1, 4)] == [(10, 1), (21, 2), (32, 3),
                                                                (43, 4)]
  left = call(100, 30)
  assert int(next(left)[0]) == 1000  # and the other 29 are never taken
  assert [int(v) for v, _ in call(7, 3)] == [70, 81, 92]
  stream.close()
  assert [int(v) for v, _ in call(5, 2)] == [50, 61]
  stream.close()


def test_task_instances_of_one_process_share_one_traced_augmentation():
  d1, d2 = augment.RECIPES["d1"], augment.RECIPES["d2"]
  tasks = [distill.AugmentTask(r, 32, "minus_one_to_one", 8, 1) for r in (d1, d1, d2)]
  for task in tasks:
    task.setup()
  assert tasks[0]._augment_fn is tasks[1]._augment_fn  # one trace for the same settings
  assert tasks[2]._augment_fn is not tasks[0]._augment_fn  # another recipe, another function
  assert tasks[0]._stream is not tasks[1]._stream  # each instance its own stream
  distill.forget_augment_functions()
  fresh = distill.augment_function(d1, 32, "minus_one_to_one")
  assert fresh is not tasks[0]._augment_fn
  for task in tasks:
    task.teardown()


# ---- jobs end to end --------------------------------------------------------------------------

def test_ingest_keeps_every_good_image_and_dead_letters_the_rest(source_shards, digits_folder):
  out, manifest = source_shards
  _, written = digits_folder
  assert manifest["num_examples"] == len(written) == 200
  assert manifest["counts_per_class"] == [20] * 10
  assert manifest["class_names"] == [str(i) for i in range(10)]
  assert manifest["dead_letter"] == len(CORRUPT_FILES)
  dead = [json.loads(line) for line in open(os.path.join(out, "dead_letter.jsonl"))]
  assert sorted(d["id"] for d in dead) == sorted(CORRUPT_FILES)
  seen = {}
  for shard in manifest["shards"]:
    ids = [records.read_source_example(r)["id"]
           for r in files.read_tfrecords(os.path.join(out, shard["path"]))]
    assert ids == sorted(ids) and len(ids) == shard["count"]
    for r in files.read_tfrecords(os.path.join(out, shard["path"])):
      ex = records.read_source_example(r)
      seen[ex["id"]] = ex["label"]
  assert seen == written  # every good image, with its label, exactly once
  assert not os.path.exists(out + ".tmp")


def test_ingest_is_deterministic_across_runs_and_runners(digits_folder, source_shards, tmp_path):
  out = str(tmp_path / "again")
  ingest.run([f"--images={digits_folder[0]}", f"--out={out}", "--num_shards=2",
              "--direct_num_workers=2", "--direct_running_mode=multi_processing"])
  _same_tree(source_shards[0], out)


def test_ingest_from_tfrecords_and_from_a_prepared_tfds_dataset(source_shards, tmp_path):
  import tensorflow_datasets as tfds
  src, manifest = source_shards
  # Existing TFRecords in the Model Garden's layout (1-based labels, no id feature).
  path = str(tmp_path / "mg-00000-of-00001")
  originals = []
  with tf.io.TFRecordWriter(path) as w:
    for shard in manifest["shards"]:
      for r in files.read_tfrecords(os.path.join(src, shard["path"])):
        ex = records.read_source_example(r)
        originals.append(ex)
        w.write(tf.train.Example(features=tf.train.Features(feature={
            "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(
                value=[ex["encoded"]])),
            "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(
                value=[ex["label"] + 1])),
        })).SerializeToString())
  m = ingest.run([f"--tfrecords={path}", f"--out={tmp_path / 'from_tfrecords'}",
                  "--label_offset=-1"])
  assert m["num_examples"] == 200 and m["counts_per_class"] == [20] * 10

  # A real prepared TFDS dataset, built offline from the same images.
  images = np.stack([tf.io.decode_png(ex["encoded"]).numpy() for ex in originals[:30]])
  labels = np.array([ex["label"] for ex in originals[:30]])
  builder = tfds.dataset_builders.TfDataBuilder(
      name="digits_test", config="default", version="1.0.0",
      data_dir=str(tmp_path / "tfds"),
      split_datasets={"train": tf.data.Dataset.from_tensor_slices(
          {"image": images, "label": labels})},
      features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(32, 32, 3)),
          "label": tfds.features.ClassLabel(num_classes=10)}))
  builder.download_and_prepare()
  m = ingest.run([f"--tfds_dir={builder.data_dir}", "--split=train",
                  f"--out={tmp_path / 'from_tfds'}"])
  assert m["num_examples"] == 30 and sum(m["counts_per_class"]) == 30
  assert m["counts_per_class"] == np.bincount(labels, minlength=10).tolist()


def _load_records(folder, top_k=0):
  out = []
  for f in sorted(tf.io.gfile.glob(os.path.join(folder, "r*/shard-*.tfrecord"))):
    for r in tf.data.TFRecordDataset(f).map(lambda s: records.parse_distill(s, top_k)):
      out.append((os.path.relpath(f, folder), r))
  return out


@pytest.mark.parametrize("jpeg_flags", [[], ["--jpeg_quality=0"]], ids=["jpeg95", "no_jpeg"])
def test_d1_records_replay_to_the_teachers_logits(source_shards, teacher_path, tmp_path,
                                                  jpeg_flags):
  src, manifest = source_shards
  out = str(tmp_path / "d1")
  m = distill.run(["--recipe=d1", f"--source={src}", f"--teacher={teacher_path}",
                   f"--out={out}", "--replicas=2", "--replicas_per_task=1", "--batch_size=16",
                   *jpeg_flags])
  assert m["num_records"] == 2 * 200 and m["num_classes"] == 10 and m["dead_letter"] == 0
  quality = m["recipe_spec"]["jpeg_quality"]
  assert quality == (0 if jpeg_flags else augment.JPEG_QUALITY)
  recs = _load_records(out)
  assert len(recs) == 400
  keys = [(f, int(r["source_index"])) for f, r in recs]
  assert keys == sorted(keys)  # each file sorted by source position
  # Replay as the trainer does (tf.data): fetch the source image by (shard, index), apply the
  # recorded parameters and the manifest's JPEG quality with the shared function, run the
  # teacher: the stored float16 logits come back.
  shards = [transforms.read_shard(os.path.join(src, s["path"])) for s in manifest["shards"]]
  teacher = keras.saving.load_model(teacher_path)
  encoded, params, stored = [], [], []
  for f, r in recs[::5]:
    ex = shards[int(r["source_shard"])][int(r["source_index"])]
    assert ex["id"] == r["id"].numpy().decode()
    assert f"r{int(r['replica']):04d}/" in f
    encoded.append(ex["encoded"])
    params.append(r["params"])
    stored.append(r["teacher_logits"].numpy())
  stored = np.stack(stored)

  def replayed_logits(jpeg_quality):
    replay = tf.data.Dataset.from_tensor_slices(
        (encoded, {k: tf.stack([p[k] for p in params]) for k in augment.PARAM_SPEC})).map(
            lambda data, p: augment.apply(augment.decode(data), p, 32,
                                          jpeg_quality=jpeg_quality)).batch(len(encoded))
    return teacher.predict(replay, verbose=0)
  # float16 storage: relative error 2^-11, plus the teacher's own float noise.
  np.testing.assert_allclose(stored, replayed_logits(quality), rtol=1e-3, atol=1e-3)
  if quality:  # the teacher saw the JPEG round trip: without it the logits are others
    assert np.max(np.abs(stored - replayed_logits(0))) > 0.05
  # Replicas differ: the same example gets other parameters in replica 1.
  by_replica = {}
  for _, r in recs:
    by_replica.setdefault(r["id"].numpy(), []).append(r["params"]["crop"].numpy())
  assert sum(not np.array_equal(*v) for v in by_replica.values()) > 150
  if jpeg_flags:
    return

  # Determinism: another run, other task split, two worker processes: the same bytes.
  again = str(tmp_path / "d1_again")
  distill.run(["--recipe=d1", f"--source={src}", f"--teacher={teacher_path}",
               f"--out={again}", "--replicas=2", "--replicas_per_task=2", "--batch_size=16",
               "--direct_num_workers=2", "--direct_running_mode=multi_processing"])
  _same_tree(out, again)
  # Two worker threads, whose task instances share one traced augmentation: the same bytes.
  threads = str(tmp_path / "d1_threads")
  distill.run(["--recipe=d1", f"--source={src}", f"--teacher={teacher_path}",
               f"--out={threads}", "--replicas=2", "--replicas_per_task=1", "--batch_size=16",
               "--direct_num_workers=2", "--direct_running_mode=multi_threading"])
  _same_tree(out, threads)


def test_d2_mixes_with_a_partner_from_the_same_shard(source_shards, teacher_path, tmp_path):
  src, manifest = source_shards
  out = str(tmp_path / "d2")
  m = distill.run(["--recipe=d2", f"--source={src}", f"--teacher={teacher_path}",
                   f"--out={out}", "--replicas=1", "--top_k=3"])
  assert m["num_records"] == 200 and m["top_k"] == 3
  shards = [transforms.read_shard(os.path.join(src, s["path"])) for s in manifest["shards"]]
  ratios = []
  for _, r in _load_records(out, top_k=3):
    shard = shards[int(r["source_shard"])]
    partner = int(r["partner_index"])
    assert partner != int(r["source_index"]) and 0 <= partner < len(shard)
    assert shard[partner]["id"] == r["partner_id"].numpy().decode()
    ratios.append(float(r["params"]["mix_ratio"]))
    values = r["topk_values"].numpy()
    assert values.shape == (3,) and np.all(np.diff(values) <= 0)
  assert 0.0 < min(ratios) and max(ratios) < 1.0 and np.std(ratios) > 0.15


def test_d3_selection_and_its_distillation_dataset(source_shards, teacher_path, tmp_path):
  src, manifest = source_shards
  sel = str(tmp_path / "sel")
  s = select_d3.run([f"--corpus={src}", f"--classifier={teacher_path}", f"--out={sel}",
                     "--per_class=30", "--threshold=0.3"])
  for n, total, above in zip(s["selected_unique_per_class"], s["selected_total_per_class"],
                             s["above_threshold_per_class"]):
    assert n == min(above, 30)
    if n == 30:
      assert total == 30  # abundant: the top K once each
    elif n:  # rare: K / n copies each, stochastically rounded
      assert (30 // n) * n <= total <= -(-30 // n) * n
  assert 0 < s["num_selected_unique"] <= 200
  assert os.path.getsize(os.path.join(sel, "histogram.png")) > 1000
  rows = [json.loads(line) for f in sorted(os.listdir(sel)) if f.startswith("selection-")
          for line in open(os.path.join(sel, f))]
  assert all(r["score"] > 0.3 for r in rows)
  copies = sum(r["copies"] for r in rows)
  assert copies == s["num_selected_total"]
  out = str(tmp_path / "d3")
  m = distill.run(["--recipe=d3", f"--source={src}", f"--teacher={teacher_path}",
                   f"--out={out}", "--replicas=1", f"--selection={sel}"])
  assert m["num_records"] == copies
  recs = _load_records(out)
  seeds = {(r["id"].numpy(), int(r["copy"])) for _, r in recs}
  assert len(seeds) == copies  # replicated images get distinct copies (distinct parameters)


def test_select_d3_with_the_domain_filter_keeps_what_its_models_pass(
    source_shards, digits_folder, teacher_path, tmp_path):
  src, _ = source_shards
  split = {}
  for subset in ("train", "holdout"):
    split[subset] = str(tmp_path / subset)
    ingest.run([f"--images={digits_folder[0]}", f"--out={split[subset]}", "--num_shards=1",
                "--holdout_fraction=0.3", f"--subset={subset}"])
  common = [f"--corpus={src}", f"--classifier={teacher_path}", "--per_class=30",
            "--threshold=0.3"]
  plain = select_d3.run(common + [f"--out={tmp_path / 'plain'}"])
  sel = str(tmp_path / "sel")
  s = select_d3.run(common + [f"--out={sel}", f"--in_domain={split['train']}",
                              f"--in_domain_heldout={split['holdout']}", "--domain_pass=0.9"])
  f = s["domain_filter"]
  assert plain.get("domain_filter") is None
  assert (f["in_domain"], f["heldout"], f["pass_fraction"]) == ("../train", "../holdout", 0.9)

  # The filter recomputed from the same images, outside the pipeline.
  features = select_d3.ShardFeatures(32, 1.0)
  features.setup()

  def rows(folder):
    return [r for shard in sorted(glob.glob(os.path.join(folder, "shard-*")))
            for r in features.process(shard)]

  corpus = rows(src)
  models = domain.fit(rows(split["train"]), corpus)
  cut = domain.threshold(models, rows(split["holdout"]), 0.9)
  assert cut == {k: f[k] for k in cut} and 0.85 <= cut["heldout_passed"] < 1.0
  scores = domain.scores(models, [r[1] for r in corpus], [r[2] for r in corpus])
  inside = {r[0] for r, score in zip(corpus, scores) if score > cut["threshold"]}
  assert f["outside"] == len(corpus) - len(inside) > 0

  def selected(folder):
    return {json.loads(line)["id"] for name in sorted(os.listdir(folder))
            if name.startswith("selection-") for line in open(os.path.join(folder, name))}

  # K = 30 > any class's 20 images: every image that passes both rules is kept, no other.
  assert selected(sel) == selected(tmp_path / "plain") & inside
  assert s["num_selected_unique"] == len(selected(sel)) < plain["num_selected_unique"]


# ---- bad input --------------------------------------------------------------------------------

def test_bad_inputs_stop_with_one_clear_line(source_shards, teacher_path, tmp_path):
  src, _ = source_shards
  _one_line_error(_cli("data_prep.ingest", "--images=/no/such/folder", f"--out={tmp_path}/x"),
                  "/no/such/folder")
  _one_line_error(_cli("data_prep.distill", "--recipe=d1", f"--source={tmp_path}/missing",
                       f"--teacher={teacher_path}", f"--out={tmp_path}/y"), "--source")
  _one_line_error(_cli("data_prep.distill", "--recipe=d1", f"--source={src}",
                       f"--teacher={teacher_path}", f"--out={tmp_path}/y", "--replicas=0"),
                  "--replicas")
  _one_line_error(_cli("data_prep.distill", "--recipe=d9", f"--source={src}",
                       f"--teacher={teacher_path}", f"--out={tmp_path}/y"), "d9")
  _one_line_error(_cli("data_prep.distill", "--recipe=d3", f"--source={src}",
                       f"--teacher={teacher_path}", f"--out={tmp_path}/y"), "--selection")
  # A teacher with another class count than the source.
  from mnv4_train import models
  other = str(tmp_path / "seven.keras")
  models.build("conv_s", num_classes=7, width=0.25, resolution=32).save(other)
  _one_line_error(_cli("data_prep.distill", "--recipe=d1", f"--source={src}",
                       f"--teacher={other}", f"--out={tmp_path}/y"), "7 classes", "10")
  _one_line_error(_cli("data_prep.select_d3", f"--corpus={src}", f"--classifier={teacher_path}",
                       f"--out={tmp_path}/y", f"--in_domain={src}"), "--in_domain_heldout")
  # A finished output is not overwritten by accident.
  _one_line_error(_cli("data_prep.ingest", f"--images={tmp_path}", f"--out={src}"),
                  "--overwrite")
  assert not os.path.exists(f"{tmp_path}/y") and not os.path.exists(f"{tmp_path}/y.tmp")


def test_a_teacher_loads_once_per_process_until_its_file_changes_and_states_its_classes(
    tmp_path):
  from mnv4_train import models
  path = str(tmp_path / "t.keras")
  models.build("conv_s", num_classes=7, width=0.25, resolution=32).save(path)
  first = transforms.load_teacher(path)
  assert transforms.load_teacher(path) is first  # the job's check and its RunInference share it
  # The class count from the Keras output shape equals what a forward pass gives.
  assert transforms.teacher_output_classes(first, 32) == 7
  assert int(transforms._forward_fn(first)(tf.zeros((1, 32, 32, 3))).shape[-1]) == 7
  # A teacher rewritten in place is a new model, not the cached one.
  models.build("conv_s", num_classes=5, width=0.25, resolution=32).save(path)
  second = transforms.load_teacher(path)
  assert second is not first and transforms.teacher_output_classes(second, 32) == 5
  # A model without a fixed input shape, at another resolution, still reports its classes.
  free = models.build("conv_s", num_classes=3, width=0.25, resolution=None)
  assert transforms.teacher_output_classes(free, 48) == 3
  # A SavedModel folder is never kept (a file rewritten inside it leaves the folder's time);
  # it states no Keras shapes, so its classes come from a forward pass.
  folder = str(tmp_path / "saved")
  second.export(folder, verbose=False)
  loaded = transforms.load_teacher(folder)
  assert transforms.load_teacher(folder) is not loaded
  assert transforms.teacher_output_classes(loaded, 32) == 5


def test_a_failing_job_leaves_no_output_that_looks_complete(source_shards, teacher_path,
                                                          tmp_path):
  src, manifest = source_shards
  broken = str(tmp_path / "broken_source")
  os.makedirs(broken)
  files.write_json(os.path.join(broken, files.MANIFEST), manifest)
  # The manifest promises shards that are not there: the pipeline fails while running.
  out = str(tmp_path / "d1")
  with pytest.raises(Exception):
    distill.run(["--recipe=d1", f"--source={broken}", f"--teacher={teacher_path}",
                 f"--out={out}", "--replicas=1"])
  assert not os.path.exists(out) and not os.path.exists(out + ".tmp")


def test_holdout_split_is_disjoint_stable_and_complete(digits_folder, source_shards, tmp_path):
  root, written = digits_folder
  ids = {}
  for subset in ("train", "holdout"):
    out = str(tmp_path / subset)
    m = ingest.run([f"--images={root}", f"--out={out}", "--num_shards=2",
                    "--holdout_fraction=0.25", f"--subset={subset}"])
    assert m["num_classes"] == 10 and m["dead_letter"] == len(CORRUPT_FILES)
    ids[subset] = {r["id"] for s in m["shards"]
                   for r in transforms.read_shard(os.path.join(out, s["path"]))}
  assert not ids["train"] & ids["holdout"]
  assert ids["train"] | ids["holdout"] == set(written)
  assert 0.15 < len(ids["holdout"]) / len(written) < 0.35
  assert all(ingest.in_holdout(i, 0.25) for i in ids["holdout"])
  _one_line_error(_cli("data_prep.ingest", f"--images={root}", f"--out={tmp_path}/x",
                       "--subset=train"), "--holdout_fraction")


def test_distill_recipe_overrides_reach_the_records(source_shards, teacher_path, tmp_path):
  src, _ = source_shards
  out = str(tmp_path / "d1")
  m = distill.run(["--recipe=d1", f"--source={src}", f"--teacher={teacher_path}",
                   f"--out={out}", "--replicas=1", "--crop_area_min=0.5", "--no_flip",
                   "--ra_magnitude=5", "--jpeg_quality=80"])
  recipe = m["recipe_spec"]
  assert recipe["crop_area"] == [0.5, 1.0] and not recipe["flip"] and recipe["ra_magnitude"] == 5.0
  assert recipe["jpeg_quality"] == 80
  assert pipeline.open_dataset(out).jpeg_quality == 80  # what the trainer's replay applies
  for _, r in _load_records(out):
    crop = r["params"]["crop"].numpy()
    assert crop[2] * crop[3] >= 0.5 * 32 * 32 * 0.95  # area within the sampler's rounding
    assert int(r["params"]["flip"]) == 0
    np.testing.assert_array_equal(r["params"]["ra_magnitude"].numpy(), [5.0, 5.0, 0.0])


def _labels_by_position(src, manifest):
  """Source labels as {(shard index, position): label}."""
  return {(i, pos): ex["label"]
          for i, s in enumerate(manifest["shards"])
          for pos, ex in enumerate(transforms.read_shard(os.path.join(src, s["path"])))}


def test_the_teacher_on_its_views_is_what_the_records_say(source_shards, distill_records):
  """`teacher_on_views`, combined inside the job, recomputed here from the records written and
  the source labels: D1 (full float16 logits) and D2 (mixup, top-3: against the label of the
  image with the larger share, and either image's)."""
  src, manifest = source_shards
  labels = _labels_by_position(src, manifest)
  d1 = json.load(open(os.path.join(distill_records["d1"], "manifest.json")))["teacher_on_views"]
  recs = [r for _, r in _load_records(distill_records["d1"])]
  logits = np.stack([r["teacher_logits"].numpy() for r in recs]).astype(np.float64)
  targets = np.array([labels[int(r["source_shard"]), int(r["source_index"])] for r in recs])
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  right = np.argmax(logits, 1) == targets
  assert d1["examples"] == len(recs) == 400 and d1["against"] == "label"
  assert "top1_either" not in d1
  # The job scored the teacher's float32 outputs; the records hold them in float16.
  assert abs(d1["top1"] - right.mean()) <= 2 / len(recs)
  assert abs(d1["mean_confidence"] - probs.max(1).mean()) < 2e-3
  assert d1["per_class_examples"] == np.bincount(targets, minlength=10).tolist()
  for c in range(10):
    assert abs(d1["per_class_top1"][c] - right[targets == c].mean()) <= 2 / 40
  assert 0.0 < d1["top1"] < 1.0  # the session teacher is neither always right nor always wrong

  d2 = json.load(open(os.path.join(distill_records["d2"], "manifest.json")))["teacher_on_views"]
  recs = [r for _, r in _load_records(distill_records["d2"], top_k=3)]
  top = np.array([int(r["topk_indices"].numpy()[0]) for r in recs])
  own = np.array([labels[int(r["source_shard"]), int(r["source_index"])] for r in recs])
  partner = np.array([labels[int(r["source_shard"]), int(r["partner_index"])] for r in recs])
  share = np.array([float(r["params"]["mix_ratio"]) for r in recs])
  larger = np.where(share >= 0.5, own, partner)
  assert 0 < (share < 0.5).sum() < len(recs)  # both cases occur
  assert d2["examples"] == len(recs) == 200
  assert d2["top1"] == pytest.approx((top == larger).mean(), abs=1e-12)
  assert d2["top1_either"] == pytest.approx(((top == own) | (top == partner)).mean(), abs=1e-12)
  assert d2["per_class_examples"] == np.bincount(larger, minlength=10).tolist()
  assert d2["top1_either"] >= d2["top1"]


def test_the_view_warning_compares_with_the_teachers_own_clean_accuracy(tmp_path):
  """The clean top-1 comes from --teacher_clean_top1, else the metrics.json of the run that
  exported the teacher (only when it names that teacher); the warning is one line, when the
  views fall more than VIEW_GAP_WARNING below it (either image's label for mixup)."""
  run = tmp_path / "runs" / "teacher"
  (run / "export").mkdir(parents=True)
  teacher = str(run / "export" / "student.keras")
  assert distill.clean_top1(teacher, None) == (None, None)
  (run / "metrics.json").write_text(json.dumps({"top1": 0.9, "export": teacher}))
  assert distill.clean_top1(teacher, None) == (0.9, str(run / "metrics.json"))
  assert distill.clean_top1(teacher, 0.5) == (0.5, "--teacher_clean_top1")
  (run / "metrics.json").write_text(json.dumps({"top1": 0.9, "export": "/elsewhere.keras"}))
  assert distill.clean_top1(teacher, None) == (None, None)  # another model's figures
  (run / "metrics.json").write_text("{not json")
  assert distill.clean_top1(teacher, None) == (None, None)

  views = {"top1": 0.6, "mean_confidence": 0.8, "against": "label", "examples": 10}
  line = distill.view_warning("d1", views, 0.9)
  assert line and "\n" not in line and "60.0%" in line and "90.0%" in line
  assert distill.view_warning("d1", views, 0.75) is None  # 15 points: within the gap
  assert distill.view_warning("d1", views, None) is None
  assert distill.view_warning("d1", None, 0.9) is None
  assert distill.view_warning("d2", {**views, "top1_either": 0.75}, 0.9) is None
