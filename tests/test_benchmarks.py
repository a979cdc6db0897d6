"""The scale planner's arithmetic (benchmarks/scale_plan.py): quantities that follow from inputs."""

import math
import os

import pytest

from benchmarks import scale_plan


@pytest.mark.parametrize("width, depth, resolution, paper_gmacs", [
    (1.0, 1.0, 224, 0.39), (1.0, 1.1, 240, 0.70), (1.2, 1.4, 300, 1.8), (2.0, 3.1, 600, 37.0)])
def test_efficientnet_macs_match_the_papers_table(width, depth, resolution, paper_gmacs):
  macs = scale_plan.efficientnet_macs(width, depth, resolution)
  assert macs / 1e9 == pytest.approx(paper_gmacs, rel=0.03)


def test_dataset_rows_follow_from_the_inputs():
  a = scale_plan.Assumptions(imagenet_images=1000, d1_replicas=3, d2_replicas=5,
                             d3_images_per_class=7, d3_classes=11, d3_replicas=2,
                             record_bytes_full=2000, record_bytes_topk=500,
                             augment_cpu_ms=4.0, serialize_cpu_ms=1.0, cost_resolution=100,
                             teacher_resolution=200, beam_vcpus_per_worker=8,
                             chip_peak_tflops=2.0, teacher_utilisation=0.5, chips_per_host=4)
  d1, d2, d3, total = scale_plan.plan_datasets(a)
  assert [r.records for r in (d1, d2, d3)] == [3000, 5000, 7 * 11 * 2]
  assert total.records == 3000 + 5000 + 154
  for r in (d1, d2, d3, total):
    assert r.bytes_full == r.records * 2000 and r.bytes_topk == r.records * 500
    # augmentation scales with pixels (4 ms at 100 px -> 16 ms at 200 px) + serialisation
    assert r.beam_cpu_hours == pytest.approx(r.records * 17.0 / 3.6e6)
    assert r.beam_worker_hours == pytest.approx(r.beam_cpu_hours / 8)
  macs = scale_plan.teacher_macs(a)
  chip_macs = 2e12 / 2 * 0.5
  assert d1.teacher_chip_hours == pytest.approx(3000 * macs / chip_macs / 3600)
  # CPUs that keep 4 chips fed: their images/s x 16 ms each
  assert d1.host_cpus_needed == pytest.approx(4 * chip_macs / macs * 0.016)


def test_training_plan_follows_from_the_inputs():
  a = scale_plan.Assumptions(imagenet_images=1000, epochs=10, global_batch=300,
                             student_macs_g=1.0, train_chips=8, chips_per_host=4,
                             chip_peak_tflops=1.0, train_utilisation=0.5, replay_cpu_ms=2.0,
                             cost_resolution=100, student_resolution=100, paper_hours=1.0,
                             paper_epochs=5)
  t = scale_plan.plan_training(a)
  assert t.examples == 10_000 and t.steps == math.ceil(10_000 / 300)
  seconds = 10_000 * 6e9 / (8e12 * 0.5)   # 3 x forward, 2 FLOPs per MAC
  assert t.hours == pytest.approx(seconds / 3600)
  assert t.host_cpus_needed == pytest.approx(10_000 / seconds / 2 * 0.002)
  assert t.paper_hours_scaled == pytest.approx(2.0)
  assert t.paper_utilisation == pytest.approx(seconds * 0.5 / 7200)


def test_every_assumption_is_a_flag_and_printed(capsys):
  scale_plan.main(["--d1_replicas=2", "--teacher_utilisation=0.5"])
  out = capsys.readouterr().out
  assert "d1_replicas = 2" in out and "teacher_utilisation = 0.5" in out
  for f in scale_plan.dataclasses.fields(scale_plan.Assumptions):
    assert f"  {f.name} = " in out
  assert "D1" in out and "training: MNv4-Conv-L" in out


# ---- benchmarks/trainer_vs_fit.py: its settings and table (never a timing) --------------------

def test_trainer_vs_fit_takes_the_recipes_settings_with_the_flags_put_in(tmp_path):
  import argparse

  import gin

  from benchmarks import trainer_vs_fit as bench
  args = argparse.Namespace(batch=32, resolution=48, warmup=3, rounds=2, lead_in=1, steps=5,
                            distribution="cpu", mixed_precision="mixed_bfloat16")
  labels = bench.recipe_config(bench.LABELS_GIN, str(tmp_path / "a"), width=0.5,
                               overrides=bench.trainer_overrides(args, {"digits": "/src"}))
  distill = bench.recipe_config(bench.DISTILL_GIN, str(tmp_path / "b"), width=0.5,
                                overrides=bench.trainer_overrides(args, {"d1": "/d1"}))
  for c in (labels, distill):
    # the recipes' model options with the width replaced, their optimizer and cadence kept
    assert c.student.model == "conv_s"
    assert c.student.options == {"width": 0.5, "bn_momentum": 0.9}
    assert (c.schedule.learning_rate, c.optimizer.weight_decay) == (0.003, 0.05)
    assert c.schedule.warmup_steps == 60
    assert (c.cadence.steps_per_loop, c.cadence.log_every) == (22, 66)
    assert (c.schedule.global_batch_size, c.student.resolution, c.schedule.train_steps,
            c.schedule.epochs) == (32, 48, 15, None)
    assert c.data.eval_data is None and c.cadence.eval_every is None and c.data.root is None
    assert c.data.weights is None and c.runtime.mixed_precision == "mixed_bfloat16"
  assert labels.data.datasets == {"digits": "/src"} and labels.loss.teacher == "none"
  assert labels.loss.label_weight == 1.0 and labels.loss.distill_weight == 0.0
  assert distill.data.datasets == {"d1": "/d1"} and distill.loss.teacher == "records"
  assert distill.loss.distill_weight == 1.0 and distill.loss.label_weight == 0.0
  assert labels.workdir == str(tmp_path / "a")
  # The digits recipes ship with the memory cache where it fits; the streaming rows set it off.
  assert labels.data.memory_cache == distill.data.memory_cache == "auto"
  cached = bench.cached(labels, str(tmp_path / "c"))
  assert cached.data.memory_cache and cached.workdir == str(tmp_path / "c")
  assert gin.config_str() == ""  # gin is left cleared


def test_trainer_vs_fit_ratios_and_round_orders():
  from benchmarks import trainer_vs_fit as bench
  Round = bench.Round
  results = {"fit": [Round(100, 50), Round(120, 60), Round(80, 40)],
             "ours": [Round(90, 30), Round(60, 20), Round(150, 45)]}
  fit, ours = bench.summarise(results, "fit")
  assert (fit.best, fit.median, fit.cpu_median) == (120, 100, 50)
  assert fit.ratio_best is None and fit.ratio_median is None
  assert (ours.best, ours.median, ours.cpu_median) == (150, 90, 30)
  assert ours.ratio_best == pytest.approx(150 / 120) and ours.ratio_median == pytest.approx(0.9)
  text = bench.table([fit, ours])
  assert "1.25" in text and "0.90" in text
  assert bench.round_orders(["a", "b", "c"], 3) == [["a", "b", "c"], ["c", "b", "a"],
                                                     ["a", "b", "c"]]


def test_relevance_filter_scores_rank_in_distribution_images_first():
  """The Mahalanobis score: points of the training clusters score above points far from every
  class mean; the digits' halves are a stable, even split by id."""
  import numpy as np
  from benchmarks import relevance_filter
  rng = np.random.default_rng(0)
  means = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
  labels = rng.integers(0, 2, 400)
  features = means[labels] + rng.normal(size=(400, 3))
  fitted = relevance_filter.Mahalanobis(features, labels)
  near = means[rng.integers(0, 2, 50)] + 0.5 * rng.normal(size=(50, 3))
  far = np.array([[5.0, 8.0, -8.0]]) + rng.normal(size=(50, 3))
  assert fitted.score(near).min() > fitted.score(far).max()
  # Nearest neighbours: the k-th neighbour's similarity, highest for points among the bank's.
  bank = relevance_filter.NearestNeighbours(features, ks=(1, 5))
  scores = bank.scores(np.concatenate([features[:3], far[:3]]))
  assert np.allclose(scores["knn1"][:3], 1.0, atol=1e-5)  # each is its own nearest neighbour
  assert np.all(scores["knn5"] <= scores["knn1"] + 1e-6)
  assert scores["knn5"][:3].min() > scores["knn5"][3:].max()
  direction = np.array([[0.0, 1.0, 0.0]])  # along the second axis: the training points' cosine
  sims = (features / np.linalg.norm(features, axis=1, keepdims=True)) @ direction[0]
  assert np.isclose(bank.scores(direction)["knn5"][0], np.sort(sims)[-5], atol=1e-5)
  ids = [f"unlabeled/{i}.png" for i in range(1000)]
  halves = [relevance_filter.half(i) for i in ids]
  assert halves == [relevance_filter.half(i) for i in ids] and 400 < sum(halves) < 600


def test_the_relevance_benchmarks_domain_rows_keep_the_labelled_kind_and_drop_the_other():
  """Images of the labelled kind (a bright centre) pass the domain rows' thresholds, images of
  another kind (a bright border) do not; '+ the paper's rule' keeps only what both pass."""
  import numpy as np
  from benchmarks import relevance_filter
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:32, :32]
  centre = (np.hypot(yy - 15.5, xx - 15.5) < 9)[..., None].astype(np.float32)

  def images(n, mask):
    return np.clip(mask * 1.6 - 0.8 + 0.3 * rng.normal(size=(n, 32, 32, 3)), -1, 1).astype(
        np.float32)

  train, val = images(200, centre), images(200, centre)
  corpus = np.concatenate([images(200, centre), images(100, 1 - centre)])
  ids = [f"c/{i}" for i in range(300)]
  ood = np.arange(300) >= 200
  halves = np.arange(300) % 2
  paper = (np.ones(200, bool), np.arange(300) % 3 != 0)
  rows = relevance_filter.domain_rows(train, [f"t/{i}" for i in range(200)], val,
                                      [f"v/{i}" for i in range(200)], corpus, ids, ood, halves,
                                      paper, (0.95,))
  alone, both = rows
  assert alone["val_kept"] == pytest.approx(0.95, abs=0.01)
  assert alone["id_kept_corpus"] >= 0.85 and alone["ood_kept_half_b"] <= 0.1
  assert both["id_kept_corpus"] <= alone["id_kept_corpus"] * 0.7  # a third fail the rule


@pytest.mark.e2e
def test_own_folder_builds_a_labelled_folder_and_a_disjoint_nested_corpus(tmp_path):
  from benchmarks import own_folder
  from data_prep import fashion_mnist
  assert fashion_mnist.locate("test"), fashion_mnist.HOW_TO_GET
  counts = own_folder.build_folders(str(tmp_path), per_class=3)
  assert counts == {"folder": 30, "corpus": 9970}
  classes = sorted(os.listdir(tmp_path / "folder"))
  assert classes == sorted(fashion_mnist.CLASS_NAMES)
  _, labels = fashion_mnist.load("test")
  labelled = set()
  for name in classes:
    for f in os.listdir(tmp_path / "folder" / name):
      index = int(f.split(".")[0])
      assert fashion_mnist.CLASS_NAMES[labels[index]] == name
      labelled.add(index)
  corpus = {int(f.split(".")[0]) for part in os.listdir(tmp_path / "corpus")
            for f in os.listdir(tmp_path / "corpus" / part)}
  assert len(labelled) == 30 and len(corpus) == 9970 and not labelled & corpus
  assert own_folder.build_folders(str(tmp_path), per_class=3) == counts  # built once


def test_digits_epochs_removes_only_its_own_staging_folder(tmp_path, monkeypatch):
  """A `training_digits` it did not finish is refused and kept; a build that fails leaves the
  workspace as it found it (its staging folder gone, a user's files untouched)."""
  import sys
  from benchmarks import digits_epochs
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  (tmp_path / "training_digits").mkdir()
  (tmp_path / "training_digits" / "theirs.png").write_bytes(b"keep")
  with pytest.raises(SystemExit) as stop:
    digits_epochs.training_folder(str(tmp_path))
  assert "training_digits exists and is not a folder this script finished" in str(stop.value)
  assert (tmp_path / "training_digits" / "theirs.png").read_bytes() == b"keep"
  (tmp_path / "training_digits" / "theirs.png").unlink()
  (tmp_path / "training_digits").rmdir()

  def fail_after_writing(module, *args):  # the first command writes, then fails
    out = next(a.split("=", 1)[1] for a in args if a.startswith("--out="))
    os.makedirs(out)
    open(os.path.join(out, "half.png"), "w").close()
    sys.exit(f"digits_epochs: {module} failed (exit status 1); see above")
  monkeypatch.setattr(digits_epochs, "_run", fail_after_writing)
  with pytest.raises(SystemExit):
    digits_epochs.training_folder(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["mine"]
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_offline_against_online_teacher_cost_follows_from_the_inputs():
  a = scale_plan.Assumptions(imagenet_images=1000, d1_replicas=3, d2_replicas=5,
                             d3_images_per_class=7, d3_classes=11, d3_replicas=2, epochs=4,
                             chip_peak_tflops=2.0, teacher_utilisation=0.5, train_chips=8)
  offline, online = scale_plan.teacher_forwards(a)
  assert offline == 3000 + 5000 + 154 and online == 4 * 1000
  hour = scale_plan.teacher_macs(a) / (2e12 / 2 * 0.5) / 3600  # one forward, in chip-hours
  student = scale_plan.plan_training(a).hours * 8
  rows = scale_plan.plan_offline_vs_online(a, students=(1, 3))
  for row, n in zip(rows, (1, 3)):
    assert row.offline_teacher_chip_hours == pytest.approx(offline * hour)  # once, for all n
    assert row.online_teacher_chip_hours == pytest.approx(n * online * hour)
    assert row.offline_total == pytest.approx(offline * hour + n * student)
    assert row.online_total == pytest.approx(n * (online * hour + student))
  # 8,154 records against 4,000 examples per student: offline pays from the third student.
  assert rows[0].online_total < rows[0].offline_total
  assert rows[1].online_total > rows[1].offline_total


def test_offline_against_online_times_the_same_student_three_ways(source_shards, teacher_path,
                                                                  distill_records, capsys,
                                                                  tmp_path, monkeypatch):
  """The benchmark's three rows train (the online one with batch mixup and the teacher on each
  batch) and its table reports each with the teacher's share and the ratio; it removes its own
  temporary folder and nothing beside it."""
  import tempfile
  from benchmarks import offline_vs_online
  temp = tmp_path / "temp"
  temp.mkdir()
  (temp / "someone_elses.txt").write_text("keep")
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  results = offline_vs_online.main([
      "--records", f"d1={distill_records['d1']}", f"d2={distill_records['d2']}",
      "--source", source_shards[0], "--teacher", teacher_path, "--steps=1", "--warmup=1",
      "--lead_in=1", "--rounds=1", "--batch=4"])
  out = capsys.readouterr().out
  assert list(results) == [offline_vs_online.OFFLINE, offline_vs_online.ONLINE,
                           offline_vs_online.NO_TEACHER]
  for row in results.values():
    assert row["best"] >= row["median"] > 0 and row["cpu_per_step"] > 0
  assert "the teacher's share of the online step's CPU" in out and "offline / online" in out
  assert "teacher chip-h offline" in out  # the planner's paper-scale table follows
  # Its folder is gone (AutoGraph leaves its generated sources in the temp folder: not ours).
  assert not [f for f in os.listdir(temp) if f.startswith("offline_vs_online_")]
  assert (temp / "someone_elses.txt").read_text() == "keep"
  with pytest.raises(SystemExit) as stop:
    offline_vs_online.parse_args(["--rounds=0"])
  assert stop.value.code == 2 and "--rounds must be >= 1" in capsys.readouterr().err
