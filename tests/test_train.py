"""Training: the loss against NumPy, the replayed input, mixing, resume, multi-worker, errors."""

import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from mnv4_train import models
from mnv4_train.data import pipeline
from mnv4_train.kd import Distiller, kd_loss, label_loss, topk_to_dense
from tests.conftest import JAX_ENV, WarmProcess, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the loss ---------------------------------------------------------------------------------

def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kd(student, teacher, t):
  log_p = _np_log_softmax(teacher / t)
  log_q = _np_log_softmax(student / t)
  return (np.exp(log_p) * (log_p - log_q)).sum(-1) * t * t


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_equals_numpy_for_full_and_topk_logits(temperature):
  rng = np.random.default_rng(int(temperature))
  student = rng.normal(0, 3, (16, 50)).astype("float32")
  teacher = rng.normal(0, 3, (16, 50)).astype("float32")
  got = kd_loss(student, teacher, temperature).numpy()
  np.testing.assert_allclose(got, _np_kd(student.astype("float64"), teacher.astype("float64"),
                                         temperature), rtol=2e-5, atol=1e-6)
  assert np.all(got >= 0)
  np.testing.assert_allclose(kd_loss(teacher, teacher, temperature).numpy(), 0, atol=1e-5)

  # Top-k records: the teacher's distribution is over its k classes only (renormalised), and
  # the student's log-probabilities are over all classes.
  k = 5
  idx = np.argsort(-teacher, -1)[:, :k]
  vals = np.take_along_axis(teacher, idx, -1)
  dense = topk_to_dense(idx, vals, 50)
  assert np.isneginf(dense.numpy()).sum() == 16 * (50 - k)
  got = kd_loss(student, dense, temperature).numpy()
  p = np.exp(_np_log_softmax(vals.astype("float64") / temperature))
  log_q = np.take_along_axis(_np_log_softmax(student.astype("float64") / temperature), idx, -1)
  want = (p * (np.log(p) - log_q)).sum(-1) * temperature ** 2
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  # The pipeline builds the same dense form from records.
  ex = {"topk_indices": tf.constant(idx[0], tf.int32), "topk_values": tf.constant(vals[0])}
  np.testing.assert_array_equal(pipeline._dense_teacher(ex, 50).numpy(), dense.numpy()[0])  # pylint: disable=protected-access


def test_label_loss_with_smoothing_equals_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 2, (8, 10)).astype("float32")
  labels = rng.integers(0, 10, 8)
  targets = np.eye(10)[labels] * 0.9 + 0.01
  want = -(targets * _np_log_softmax(logits.astype("float64"))).sum(-1)
  np.testing.assert_allclose(label_loss(logits, labels, 10, 0.1).numpy(), want, rtol=1e-5)


def test_gradients_reach_every_student_weight_and_no_teacher_weight():
  student = models.build("conv_s", num_classes=10, width=0.25, resolution=32)
  teacher = models.build("conv_s", num_classes=10, width=0.25, resolution=32)
  distiller = Distiller(student, teacher, temperature=2.0, label_weight=0.5)
  x = tf.random.uniform([4, 32, 32, 3], -1, 1)
  y = {"label": tf.constant([1, 2, 3, 4])}
  with tf.GradientTape() as tape:
    loss = distiller.compute_loss(x, y, distiller(x, training=True))
  variables = student.trainable_variables + teacher.trainable_variables
  grads = tape.gradient(loss, student.trainable_variables + teacher.weights)
  assert not teacher.trainable_variables and len(variables) == len(student.trainable_variables)
  assert all(g is not None for g in grads[:len(student.trainable_variables)])
  assert all(g is None for g in grads[len(student.trainable_variables):])


@pytest.mark.e2e
def test_distiller_fits_with_keras_on_the_jax_backend(tmp_path):
  """The loss and wrapper are keras.ops only: `fit` runs on JAX and the loss falls."""
  script = tmp_path / "jax_fit.py"
  script.write_text(
      "import os\nos.environ['KERAS_BACKEND'] = 'jax'\n"
      "import numpy as np, keras\n"
      "from mnv4_train import models\nfrom mnv4_train.kd import Distiller\n"
      "keras.utils.set_random_seed(0)\n"
      "s = models.build('conv_s', num_classes=4, width=0.25, resolution=32, bn_momentum=0.9)\n"
      "d = Distiller(s, temperature=2.0, label_weight=0.5)\n"
      "rng = np.random.default_rng(0)\n"
      "labels = np.arange(32) % 4\n"
      "patterns = rng.uniform(-1, 1, (4, 32, 32, 3))\n"
      "x = (patterns[labels] + rng.normal(0, 0.3, (32, 32, 32, 3))).astype('float32')\n"
      "y = {'label': labels, 'teacher': (4.0 * np.eye(4)[labels]).astype('float32')}\n"
      "d.compile(optimizer=keras.optimizers.Adam(3e-3))\n"
      "h = d.fit(x, y, batch_size=8, epochs=8, verbose=0).history['loss']\n"
      "print(keras.backend.backend(), h[0], h[-1])\n")
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO,
                       check=True, env={**os.environ, **JAX_ENV}).stdout.split()
  assert out[0] == "jax"
  assert float(out[2]) < 0.7 * float(out[1])


def test_soft_label_loss_equals_numpy_and_one_hot_targets_give_the_label_loss():
  from mnv4_train.kd import soft_label_loss
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 6)).astype("float32")
  targets = rng.dirichlet(np.ones(6), size=4).astype("float32")
  want = -(targets * _np_log_softmax(logits)).sum(-1)
  np.testing.assert_allclose(soft_label_loss(logits, targets), want, rtol=1e-5)
  labels = np.array([0, 5, 2, 2])
  np.testing.assert_allclose(soft_label_loss(logits, np.eye(6, dtype="float32")[labels]),
                             label_loss(logits, labels, 6), rtol=1e-5)
  # The Distiller takes a mixed batch's `targets` over its `label`.
  student = models.build("conv_s", num_classes=6, width=0.25)
  distiller = Distiller(student, distill_weight=0.0, label_weight=1.0, label_smoothing=0.1)
  y = {"label": labels, "targets": targets}
  got = distiller.per_example_losses(None, y, logits)["ce"]
  np.testing.assert_allclose(got, want, rtol=1e-5)


# ---- the input pipeline -----------------------------------------------------------------------

def test_replayed_pixels_give_the_teachers_stored_logits(distill_records, teacher_path):
  """Trainer input (D1 full logits + D2 top-3, mixed): the teacher on the replayed pixels.

  D1 went through the JPEG round trip before the teacher and D2 did not: each element is
  replayed with its own dataset's quality."""
  specs = [pipeline.open_dataset(distill_records["d1"], "d1"),
           pipeline.open_dataset(distill_records["d2"], "d2")]
  assert [s.jpeg_quality for s in specs] == [pipeline.augment.JPEG_QUALITY, 0]
  ds = pipeline.train_dataset(specs, resolution=32, host_batch=50, num_classes=10,
                              weights={"d1": 0.5, "d2": 0.5})
  teacher = keras.saving.load_model(teacher_path)
  seen = {0: 0, 1: 0}
  for batch in ds.take(4):
    recomputed = teacher.predict(batch["image"], verbose=0)
    stored = batch["teacher"].numpy()
    for got, want, which in zip(recomputed, stored, batch["dataset"].numpy()):
      seen[int(which)] += 1
      kept = np.isfinite(want)
      assert kept.sum() == (10 if which == 0 else 3)
      # float16 storage (relative 2^-11) plus the teacher's own float noise.
      np.testing.assert_allclose(want[kept], got[kept], rtol=1e-3, atol=1e-3)
      if which == 1:  # top-k: the stored classes are the teacher's top 3
        assert set(np.flatnonzero(kept)) == set(np.argsort(-got)[:3])
  assert seen[0] > 40 and seen[1] > 40


def test_mixing_follows_weights_and_a_schedule_switches_on_time(source_shards):
  src = source_shards[0]
  specs = [pipeline.open_dataset(src, "a"), pipeline.open_dataset(src, "b")]
  opts = pipeline.StreamOptions(supervised_recipe=pipeline.augment.Recipe("plain"))
  ds = pipeline.train_dataset(specs, resolution=16, host_batch=100, num_classes=10,
                              weights={"a": 0.3, "b": 0.7}, options=opts)
  which = np.concatenate([b["dataset"].numpy() for b in ds.take(40)])
  share = np.mean(which == 0)
  # 4000 draws: the binomial standard deviation is 0.007.
  assert abs(share - 0.3) < 0.03, share

  ds = pipeline.train_dataset(specs, resolution=16, host_batch=100, num_classes=10,
                              schedule=[(0, {"a": 1.0}), (10, {"a": 0.2, "b": 0.8})],
                              options=opts)
  steps = [b["dataset"].numpy() for b in ds.take(40)]
  assert all(np.all(s == 0) for s in steps[:10])  # step 0..9: only a
  after = np.concatenate(steps[10:])
  assert abs(np.mean(after == 0) - 0.2) < 0.03


def test_the_stream_is_a_function_of_the_seed(source_shards):
  spec = pipeline.open_dataset(source_shards[0], "a")

  def labels(seed):
    ds = pipeline.train_dataset([spec], resolution=16, host_batch=50, num_classes=10,
                                options=pipeline.StreamOptions(seed=seed))
    return np.concatenate([b["label"].numpy() for b in ds.take(6)])
  first = labels(0)
  np.testing.assert_array_equal(first, labels(0))
  assert not np.array_equal(first, labels(1))
  # Two epochs of 200 images in 300 draws: each image at most twice, all of epoch 1 present.
  assert len(first) == 300


def test_batch_mixup_cutmix_gives_soft_targets_that_the_loss_takes(source_shards):
  """The Model Garden's MixupAndCutmix on each batch: mixed images, soft targets."""
  from official.vision.ops import augment as mg
  spec = pipeline.open_dataset(source_shards[0], "a")
  opts = pipeline.StreamOptions(supervised_recipe=pipeline.augment.Recipe("plain"))
  tf.random.set_seed(1)
  mixer = mg.MixupAndCutmix(num_classes=10, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0,
                            switch_prob=0.5, label_smoothing=0.1)
  plain = pipeline.train_dataset([spec], resolution=16, host_batch=16, num_classes=10,
                                 options=opts)
  mixed = pipeline.train_dataset([spec], resolution=16, host_batch=16, num_classes=10,
                                 options=opts, batch_mix=mixer)
  for a, b in zip(plain.take(3), mixed.take(3)):
    targets = b["targets"].numpy()
    assert targets.shape == (16, 10)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(a["label"], b["label"])  # labels kept for statistics
    assert not np.allclose(a["image"], b["image"])         # the pixels were mixed
    # Soft: every row mixes two labels (its own and the reversed batch's), beyond smoothing.
    big = (targets > 0.1 / 10 + 1e-6).sum(-1)
    assert np.all(big[b["label"].numpy() != b["label"].numpy()[::-1]] == 2)
    # Its own label keeps the largest share or the partner's does: both are there.
    own = targets[np.arange(16), b["label"].numpy()]
    partner = targets[np.arange(16), b["label"].numpy()[::-1]]
    assert np.all(own + partner > 0.9 - 1e-5)
  # The loss takes the soft targets: cross-entropy against them, not against the labels.
  student = models.build("conv_s", num_classes=10, width=0.25)
  distiller = Distiller(student, distill_weight=0.0, label_weight=1.0)
  logits = np.random.default_rng(0).normal(size=(16, 10)).astype("float32")
  soft = distiller.per_example_losses(b["image"], b, logits)["ce"].numpy()
  np.testing.assert_allclose(soft, -(targets * _np_log_softmax(logits)).sum(-1), rtol=1e-5)
  assert not np.allclose(soft, label_loss(logits, b["label"], 10).numpy())


# ---- EMA under float16 loss scaling -----------------------------------------------------------

@pytest.fixture
def keep_dtype_policy():
  """`train` sets Keras' global dtype policy (mixed precision); put it back afterwards."""
  policy = keras.mixed_precision.dtype_policy()
  yield
  keras.mixed_precision.set_dtype_policy(policy)


def _top1_top5(model, eval_ds):
  hits, total = np.zeros(2), 0
  for batch in eval_ds:
    logits = model(batch["image"], training=False)
    labels = batch["label"]
    hits += [np.sum(tf.math.in_top_k(labels, logits, k)) for k in (1, 5)]
    total += int(labels.shape[0])
  return tuple(hits / total)


def test_ema_weights_are_evaluated_and_exported_under_float16_loss_scaling(
    source_shards, distill_records, tmp_path, keep_dtype_policy):
  """mixed_float16 (what distribution='gpu' picks) wraps AdamW in a LossScaleOptimizer, whose
  own use_ema is False: evaluation and export must still use the inner optimizer's averages.

  The loss scale starts high (2^15): the first steps overflow and are skipped, so the optimizer
  counts fewer iterations than the loop ran steps; the run stops half-way and resumes.
  """
  from mnv4_train import train as train_lib
  work = str(tmp_path / "run")
  lr, steps = 0.01, 10
  groups = dict(
      data=train_lib.DataConfig(datasets={"d1": distill_records["d1"]},
                                eval_data=source_shards[0], eval_batch_size=50, eval_crop=1.0),
      # BatchNorm's moving statistics are the last batch's: eval-mode outputs then depend on
      # the weights after 10 steps (with a slower momentum every image gets the same class).
      student=train_lib.StudentConfig(model="conv_s", resolution=32,
                                      options={"width": 0.25, "bn_momentum": 0.0}),
      schedule=train_lib.ScheduleConfig(train_steps=steps, global_batch_size=8, warmup_steps=0,
                                        learning_rate=lr),
      optimizer=train_lib.OptimizerConfig(weight_decay=0.0, ema_decay=0.5),
      runtime=train_lib.RuntimeConfig(mixed_precision="mixed_float16"))
  cadence = train_lib.CadenceConfig(steps_per_loop=2, log_every=2, checkpoint_every=steps)
  half = train_lib.train(work, cadence=dataclasses.replace(cadence, stop_after_steps=4),
                         **groups)
  assert not half["finished"] and half["step"] == 4
  result = train_lib.train(work, cadence=cadence, **groups)
  assert result["finished"] and result["step"] == steps
  assert [h["step"] for h in _history(work)] == [2, 4, 6, 8, 10]
  assert keras.mixed_precision.dtype_policy().name == "mixed_float16"
  # The run's final state, from its checkpoint: raw weights and the inner optimizer's averages.
  config = train_lib.Config.make(work, cadence=cadence, **groups)
  student = models.build("conv_s", num_classes=10, width=0.25, bn_momentum=0.0, resolution=32)
  optimizer = train_lib.build_optimizer(config, student, steps, "mixed_float16")
  assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) and not optimizer.use_ema
  tf.train.Checkpoint(model=student, optimizer=optimizer).restore(
      os.path.join(work, "checkpoints", f"ckpt-{steps}")).assert_existing_objects_matched()
  inner = optimizer.inner_optimizer
  assert 0 < int(inner.iterations) < steps  # some steps applied, some skipped
  averages = [v.numpy() for v in inner._model_variables_moving_average]  # pylint: disable=protected-access
  raw = [v.numpy() for v in student.trainable_variables]
  exported = keras.saving.load_model(result["export"])
  assert len(exported.trainable_variables) == len(averages)
  moved = 0
  for got, avg, now in zip(exported.trainable_variables, averages, raw):
    np.testing.assert_array_equal(got.numpy(), avg)
    # The averages follow the weights (not left at their zero start): within the few Adam
    # steps (each at most ~lr per weight) of them, and behind them.
    assert np.max(np.abs(avg - now)) <= steps * lr * 1.5
    moved += int(not np.array_equal(avg, now))
  assert moved > 0.9 * len(averages)
  # Evaluation used the averages too: the run's top-1 is the exported model's, not the raw one's.
  eval_ds, _ = pipeline.eval_dataset(source_shards[0], resolution=32, batch_size=50,
                                     crop_fraction=1.0)
  ema, now = _top1_top5(exported, eval_ds), _top1_top5(student, eval_ds)
  assert ema != now  # the check below can tell the two apart
  assert (result["top1"], result["top5"]) == pytest.approx(ema)


# ---- runs through the CLI ---------------------------------------------------------------------

def _main(workdir, *bindings, gin_file="smoke.gin", env=None, check=True, flags=(),
          fresh=False):
  """`python -m mnv4_train.main` (forked warm, `run_cli`; `fresh`: a new interpreter, for what
  the command prints while TensorFlow loads)."""
  args = [f"--gin_file={gin_file}", f"--workdir={workdir}", *flags] + [
      f"--gin_bindings={b}" for b in bindings]
  if fresh:
    proc = subprocess.run([sys.executable, "-m", "mnv4_train.main", *args], capture_output=True,
                          text=True, cwd=REPO, env=env)
  else:
    proc = run_cli("mnv4_train.main", *args, env=env)
  if check and proc.returncode:
    raise AssertionError(proc.stderr[-3000:])
  return proc


def _history(workdir):
  with open(os.path.join(workdir, "history.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_smoke_run_trains_evaluates_exports_and_draws_curves(source_shards, distill_records,
                                                            tmp_path):
  work = str(tmp_path / "run")
  proc = _main(work, f"data.datasets={{'d1': '{distill_records['d1']}'}}",
               f"data.eval_data='{source_shards[0]}'")
  assert "top1" in proc.stdout
  metrics = json.load(open(os.path.join(work, "metrics.json")))
  assert metrics["finished"] and metrics["step"] == 3 and metrics["examples"] == 200
  assert [h["step"] for h in _history(work)] == [1, 2, 3]
  student = keras.saving.load_model(metrics["export"])
  assert student.output_shape == (None, 10)
  with open(os.path.join(work, "curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "student.model = 'conv_s'" in open(os.path.join(work, "operative_config.gin")).read()
  # Finished runs are not trained again: the same command returns at once.
  again = _main(work, f"data.datasets={{'d1': '{distill_records['d1']}'}}")
  assert "step 3" in again.stdout and len(_history(work)) == 3


def test_a_label_only_run_with_mixup_warmup_epochs_and_ema_trains_and_resumes(source_shards,
                                                                             tmp_path):
  work = str(tmp_path / "mix")
  bindings = [f"data.datasets={{'a': '{source_shards[0]}'}}", "loss.teacher='none'",
              "loss.distill_weight=0.0", "loss.label_weight=1.0", "augment.mixup_alpha=0.8",
              "augment.cutmix_alpha=1.0", "augment.mix_prob=1.0", "schedule.warmup_epochs=0.08",
              "optimizer.ema_decay=0.9", "augment.exclude_ops=['Cutout']",
              "augment.prob_to_apply=0.5"]
  first = _main(work, *bindings, "cadence.stop_after_steps=2", "cadence.checkpoint_every=2")
  # The Model Garden's mixer calls map_fn(dtype=...): TensorFlow's notice is not the user's.
  assert "deprecated" not in first.stderr and "Instructions for updating" not in first.stderr
  _main(work, *bindings)
  metrics = json.load(open(os.path.join(work, "metrics.json")))
  assert metrics["finished"] and metrics["step"] == 3
  assert all(np.isfinite(h["loss"]) for h in _history(work))
  # warmup_epochs 0.08 of 200 images at batch 8: 2 steps; the lr peaks at step 2.
  rates = [h["learning_rate"] for h in _history(work)]
  assert rates[0] < rates[1] and rates[1] == pytest.approx(0.001, rel=1e-3)
  # Mixup is for label-only runs: with a teacher it stops with one line.
  proc = _main(str(tmp_path / "bad"), *bindings[:1], "augment.mixup_alpha=0.8", check=False)
  assert proc.returncode == 2 and "label-only" in proc.stderr


# Library chatter the default console must not show# Library chatter the default console must not show: gin's include probes, absl-formatted
# INFO lines (TensorFlow's, absl's, ours in --verbose) and Python's default format.
CHATTER = re.compile(r"resource_reader|Path not found|^I\d{4} |^INFO:|functional_saver",
                     re.MULTILINE)


def test_the_console_shows_progress_and_no_library_chatter(source_shards, tmp_path):
  # digits_student.gin includes digits_base.gin: gin's include lookup is what printed
  # "E... resource_reader.py: Path not found: digits_base.gin" before.
  bindings = [f"data.datasets={{'digits': '{source_shards[0]}'}}",
              f"data.eval_data='{source_shards[0]}'", "schedule.train_steps=2",
              "schedule.global_batch_size=16", "cadence.log_every=1", "cadence.steps_per_loop=1",
              "cadence.checkpoint_every=2", "cadence.eval_every=1",
              "student.options={'width': 0.25, 'bn_momentum': 0.9}"]
  proc = _main(tmp_path / "quiet", *bindings, gin_file="digits_student.gin", fresh=True)
  assert not CHATTER.search(proc.stderr + proc.stdout), proc.stderr
  lines = proc.stderr.splitlines()
  assert lines[0] == "conv_s: 10 classes at 32px, 2 steps of 16 (1 replicas on 1 hosts), " \
      "datasets digits (source)", lines
  progress = [line for line in lines if line.startswith("step ")]
  assert len(progress) == 2, lines
  for line, head in zip(progress, ["step 1/2 (50%): loss ", "step 2/2 (100%): loss "]):
    assert line.startswith(head), line
    assert re.search(r", \d+\.\d examples/s, ETA (\d+h)?(\d+m)?\d+[sm]$", line), line
  assert progress[1].endswith("ETA 0s")
  assert [line.split(":")[0] for line in lines if line.startswith("eval")] == [
      "eval at step 1", "eval at step 2"]
  assert len(lines) == 5, lines  # start, two progress lines, two evaluations: nothing else
  assert proc.stdout.startswith("mnv4_train.main: step 2, train_steps 2, finished True")

  # --verbose brings the libraries' INFO lines back (the absl format, ours among them).
  loud = _main(tmp_path / "loud", *bindings[:2], "schedule.train_steps=1",
               "schedule.global_batch_size=16", gin_file="digits_student.gin", flags=["--verbose"],
               fresh=True)
  assert re.search(r"^I\d{4} .*\] step 1/1 \(100%\)", loud.stderr, re.MULTILINE), loud.stderr
  assert re.search(r"^I\d{4} .*(functional_saver|checkpoint)", loud.stderr, re.MULTILINE)


def test_the_gin_files_ship_in_the_wheel_and_are_found_installed(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for name in ("setup.cfg", "pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), src / name)
  for package in ("mnv4_train", "data_prep", "gin_configs"):
    shutil.copytree(os.path.join(REPO, package), src / package,
                    ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(tmp_path / "dist"), str(src)], check=True,
                 capture_output=True)
  wheel, = glob.glob(str(tmp_path / "dist" / "*.whl"))
  names = zipfile.ZipFile(wheel).namelist()
  shipped = sorted(n.split("/")[1] for n in names if n.startswith("gin_configs/"))
  expected = sorted(f for f in os.listdir(os.path.join(REPO, "gin_configs"))
                    if f.endswith(".gin")) + ["__init__.py"]
  assert shipped == sorted(expected)
  # Unpacked, a wheel is its installed layout: from there (and not from this checkout, the
  # working directory being elsewhere) main finds the recipes and resolves their includes.
  site = tmp_path / "site"
  zipfile.ZipFile(wheel).extractall(site)
  script = ("import gin\nfrom mnv4_train import main\nprint(main.GIN_DIR)\n"
            "main.parse_gin(['digits_distill'], [])\n"
            "print(gin.query_parameter('data.eval_data'))\n")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site)), check=True)
  gin_dir, eval_data = out.stdout.split()
  assert gin_dir == str(site / "gin_configs")
  assert eval_data == "sources/holdout"  # set in digits_base.gin, which it includes


def _start(workdir, *bindings, env=None):
  """A training run in the background (forked warm, `WarmProcess`), its stderr readable as
  text."""
  return WarmProcess("mnv4_train.main", "--gin_file=smoke.gin", f"--workdir={workdir}",
                     *[f"--gin_bindings={b}" for b in bindings], env=env)


def _wait_for_start_line(proc):
  """Reads `proc`'s stderr up to the run's start line (logged once the signals are taken)."""
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if line.startswith("conv_s: "):
      return seen
  raise AssertionError("the run ended before it started training: " + "".join(seen)[-3000:])


def _wait_for_history(proc, workdir, lines):
  hist = os.path.join(workdir, "history.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(hist) and len(open(hist).read().splitlines()) >= lines:
      return
    time.sleep(0.02)
  raise AssertionError(f"the run ended (or hung) before it logged {lines} steps")


def _signal_and_wait(proc, signum):
  """Sends `signum`; (exit status, stderr from then on, seconds from the signal to the exit)."""
  sent = time.monotonic()
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=120)
  return proc.returncode, err, time.monotonic() - sent


STOPPED = re.compile(r"^mnv4_train\.main: stopped at step (\d+)( \(another worker was stopped\))?, "
                     r"saved; run the same command to continue$", re.MULTILINE)


def _stopped_at(code, err, seconds, signum, workdir):
  """The checks of a run stopped by `signum`: its exit status, one line and no traceback, a
  prompt exit, a checkpoint (model and input position) at the step it names, which is the
  last step logged, and no finished-run outputs. The step."""
  assert code == 128 + signum, err[-3000:]
  assert "Traceback" not in err and "error:" not in err, err[-3000:]
  lines = STOPPED.findall(err)
  assert len(lines) == 1 and err.rstrip().endswith("saved; run the same command to continue"), err
  assert seconds < 30, seconds  # a preemption allows ~30 s
  step = int(lines[0][0])
  assert os.path.exists(os.path.join(workdir, "checkpoints", f"ckpt-{step}.index"))
  assert os.path.exists(os.path.join(workdir, "checkpoints", "data-host0", f"ckpt-{step}.index"))
  assert _history(workdir)[-1]["step"] == step
  assert not os.path.exists(os.path.join(workdir, "metrics.json"))
  assert not os.path.exists(os.path.join(workdir, "export"))
  return step


def _assert_same_run(rows, straight):
  """`rows` (a history that may log several steps in one row) read as the per-step `straight`
  run: each row's loss and mixture are the means over the steps since the row before it."""
  by_step = {h["step"]: h for h in straight}
  steps = [h["step"] for h in rows]
  assert steps == sorted(set(steps)) and steps[-1] == straight[-1]["step"], steps
  previous = 0
  for row in rows:
    span = [by_step[s] for s in range(previous + 1, row["step"] + 1)]
    np.testing.assert_allclose(row["loss"], np.mean([h["loss"] for h in span]), rtol=1e-5)
    np.testing.assert_allclose(row["mixture"]["d1"], np.mean([h["mixture"]["d1"] for h in span]))
    previous = row["step"]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_at_the_same_step_and_data(distill_records, tmp_path):
  """One run, stopped three ways and resumed each time, against the same run uninterrupted:

  SIGTERM (a preemption) in a loop of 24 compiled steps (steps_per_loop=24: the loop must end
  early, at the step it is in, not after 24), SIGINT (Ctrl-C) between and during one-step
  loops, then SIGKILL (no chance to save: the resume goes back to the last checkpoint).
  """
  data = f"data.datasets={{'d1': '{distill_records['d1']}', 'd2': '{distill_records['d2']}'}}"
  common = [data, "schedule.train_steps=24", "cadence.checkpoint_every=6",
            "runtime.op_determinism=True"]
  straight = str(tmp_path / "straight")
  _main(straight, *common)
  stopped = str(tmp_path / "stopped")

  # SIGTERM once the run has started (its signal handling is on): the 24-step loop stops early.
  proc = _start(stopped, *common, "cadence.steps_per_loop=24", "cadence.log_every=24",
                "cadence.checkpoint_every=24")
  _wait_for_start_line(proc)
  first = _stopped_at(*_signal_and_wait(proc, signal.SIGTERM), signal.SIGTERM, stopped)
  assert 1 <= first < 24

  # SIGINT after a few more steps (one per compiled loop here, with the smoke recipe's cadence).
  proc = _start(stopped, *common)
  _wait_for_history(proc, stopped, 8)
  second = _stopped_at(*_signal_and_wait(proc, signal.SIGINT), signal.SIGINT, stopped)
  assert first < second < 24

  # SIGKILL: nothing saved at the kill; the resume goes back to the last checkpoint.
  proc = _start(stopped, *common)
  _wait_for_history(proc, stopped, 15)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  logged = len(_history(stopped))
  assert 15 <= logged < 24
  _main(stopped, *common)
  a, b = _history(straight), _history(stopped)
  assert [h["step"] for h in a] == list(range(1, 25))
  # The first stop logged steps 1..first in one row (a 24-step loop's partial interval).
  assert [h["step"] for h in b] == [first] + list(range(first + 1, 25))
  _assert_same_run(b, a)


def _free_ports(n):
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(("localhost", 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


def _start_workers(workdir, bindings, count=2):
  """`count` workers of one MultiWorkerMirroredStrategy run, on free local ports."""
  cluster = {"worker": [f"localhost:{p}" for p in _free_ports(count)]}
  return [_start(workdir, *bindings, "runtime.distribution='multiworker'",
                 env=dict(os.environ, TF_CONFIG=json.dumps(
                     {"cluster": cluster, "task": {"type": "worker", "index": index}})))
          for index in range(count)]


def _finish_workers(procs, timeout=240):
  """Each worker's (exit status, stderr), never leaving one behind."""
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, err) for p, (_, err) in zip(procs, outs)]


@pytest.mark.slow
def test_two_workers_train_like_one_worker_with_two_replicas(distill_records, tmp_path):
  """Two workers against one process with two replicas, the workers preempted on the way: a
  SIGTERM to worker 1 alone stops both after the same step, both save it, and the resumed
  workers finish with the one process's losses."""
  common = [f"data.datasets={{'d1': '{distill_records['d1']}'}}", "schedule.train_steps=6",
            "schedule.global_batch_size=16", "data.shard_policy='data'",
            "runtime.op_determinism=True"]
  one = str(tmp_path / "one")
  _main(one, *common, "runtime.cpu_replicas=2")
  two = str(tmp_path / "two")
  procs = _start_workers(two, common)
  _wait_for_start_line(procs[1])  # worker 1 takes signals from here on
  procs[1].send_signal(signal.SIGTERM)
  (code0, err0), (code1, err1) = _finish_workers(procs)
  assert code0 == code1 == 143, (err0[-2000:], err1[-2000:])
  assert "Traceback" not in err0 + err1
  (step0, peer0), = STOPPED.findall(err0)
  (step1, peer1), = STOPPED.findall(err1)
  assert step0 == step1 and peer0 and not peer1  # worker 0 stopped for worker 1's signal
  step = int(step0)
  assert 1 <= step < 6
  for part in ("", "data-host0/", "data-host1/"):
    assert os.path.exists(os.path.join(two, "checkpoints", f"{part}ckpt-{step}.index")), part
  assert not os.path.exists(os.path.join(two, "metrics.json"))
  outs = _finish_workers(_start_workers(two, common))
  assert all(code == 0 for code, _ in outs), [err[-2000:] for _, err in outs]
  a, b = _history(one), _history(two)
  assert [h["step"] for h in a] == [h["step"] for h in b] == list(range(1, 7))
  np.testing.assert_allclose([h["loss"] for h in b], [h["loss"] for h in a], rtol=1e-4)
  run = json.load(open(os.path.join(two, "run.json")))
  assert run["hosts"] == 2 and run["replicas"] == 2


def _one_line_error(proc, *needles):
  """A non-zero exit with exactly one error line (progress log lines may come before it)."""
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
  assert len(lines) == 1, proc.stderr[-2000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


def test_bad_inputs_stop_with_one_clear_line(source_shards, distill_records, tmp_path):
  data = f"data.datasets={{'d1': '{distill_records['d1']}'}}"
  _one_line_error(_main(tmp_path / "a", data, gin_file="nope.gin", check=False),
                  "unknown gin file 'nope.gin'", "smoke.gin")
  _one_line_error(_main(tmp_path / "b", data, "schedule.no_such_arg=1", check=False),
                  "bad gin binding")
  # The flat names of before the groups: one line with every old name's new one, from a
  # binding or a gin file (its includes too).
  _one_line_error(_main(tmp_path / "b", data, "train.train_steps=2", "train.no_such_arg=1",
                        check=False),
                  "--gin_bindings: train.train_steps is now schedule.train_steps; "
                  "train.no_such_arg is no setting (the settings are in groups now: data, "
                  "augment, student, loss, schedule, optimizer, cadence, runtime; see "
                  "mnv4_train/config.py)")
  old = tmp_path / "old.gin"
  (tmp_path / "old_base.gin").write_text("train.data_root = None\ntrain.model_options = {}\n")
  old.write_text("include 'old_base.gin'\n")
  _one_line_error(_main(tmp_path / "b", data, gin_file=str(old), check=False),
                  f"gin file {tmp_path / 'old_base.gin'}: train.data_root is now data.root; "
                  "train.model_options is now student.options")
  _one_line_error(_main(tmp_path / "c", "student.model='conv_s'", check=False),
                  "datasets")
  # A workdir that cannot be written: read-only for a normal user; a path under a regular file
  # even for root (this machine's tests run as root, which writes anywhere).
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  if not os.access(locked, os.W_OK):
    _one_line_error(_main(locked / "run", data, check=False), "not writable")
  (tmp_path / "afile").write_text("x")
  _one_line_error(_main(tmp_path / "afile" / "run", data, check=False), "not writable")
  _one_line_error(_main(tmp_path / "d", data, "student.num_classes=7", check=False),
                  "'d1'", "10 classes", "7")
  # A NaN loss: stop, keep the last good checkpoint. Two good steps (checkpointed), then the
  # same run resumed with an absurd learning rate.
  nan = str(tmp_path / "nan")
  _main(nan, data, "schedule.train_steps=6", "cadence.checkpoint_every=2",
        "cadence.stop_after_steps=2")
  proc = _main(nan, data, "schedule.train_steps=6", "cadence.checkpoint_every=2",
               "schedule.learning_rate=1e30", "schedule.warmup_steps=0", check=False)
  line = _one_line_error(proc, "the loss became", "last good checkpoint")
  assert line.endswith("check the teacher logits") and "ckpt-2" in line
  kept = sorted(f for f in os.listdir(os.path.join(nan, "checkpoints")) if f.endswith(".index"))
  assert kept == ["ckpt-2.index"]


def test_recipes_regularise_as_the_paper_and_the_model_garden():
  """Distillation: dropout only (Appendix H), per-variant warmup; supervised: the yamls'."""
  import gin
  from mnv4_train import main, train  # noqa: F401  registers the groups

  def query(name, *keys):
    gin.clear_config()
    gin.add_config_file_search_path(main.GIN_DIR)
    gin.parse_config_file(main.resolve_gin_file(name))
    return {k: gin.query_parameter(k) for k in keys}
  warmup = {"conv_s": 5.0, "conv_m": 5.0, "conv_l": 20.0, "hybrid_m": 20.0, "hybrid_l": 20.0}
  for model, epochs in warmup.items():
    got = query(f"{model}_distill.gin", "student.options", "schedule.warmup_epochs",
                "schedule.epochs", "optimizer.ema_start_step")
    assert set(got["student.options"]) - {"bn_momentum", "bn_epsilon"} == {"dropout"}, model
    assert got["schedule.warmup_epochs"] == epochs and got["schedule.epochs"] == 2000
    assert got["optimizer.ema_start_step"] is None  # the warmup's end
  yamls = {  # imagenet_mobilenetv4_*_tpu.yaml + common.py defaults
      "conv_s": (9.0, 20.0, 20.0, 0.5, 0.0), "conv_m": (15.0, 10.0, 20.0, 0.7, 0.0),
      "conv_l": (15.0, 10.0, 40.0, None, 0.2), "hybrid_m": (15.0, 10.0, 20.0, 0.7, 0.0),
      "hybrid_l": (15.0, 10.0, 40.0, None, 0.3)}
  keys = ("augment.magnitude", "augment.translate_const", "augment.cutout_const",
          "augment.prob_to_apply")
  for model, want in yamls.items():
    got = query(f"{model}_imagenet.gin", *keys, "augment.exclude_ops")
    assert tuple(got[k] for k in keys) == want[:4], model
    assert list(got["augment.exclude_ops"]) == ["Cutout"]
    gin.clear_config()
    gin.add_config_file_search_path(main.GIN_DIR)
    gin.parse_config_file(main.resolve_gin_file(f"{model}_imagenet.gin"))
    try:
      mix = gin.query_parameter("augment.mix_prob")
    except ValueError:
      mix = 0.0
    assert mix == want[4], model
  gin.clear_config()


def test_every_gin_file_parses_and_sets_a_known_model():
  import gin
  from mnv4_train import main, train  # noqa: F401  registers the groups
  names = main.available_gin_files()
  for required in ("conv_s_distill.gin", "conv_m_distill.gin", "conv_l_distill.gin",
                   "hybrid_m_distill.gin", "hybrid_l_distill.gin", "smoke.gin"):
    assert required in names
  for name in names:
    gin.clear_config()
    gin.add_config_file_search_path(main.GIN_DIR)
    gin.parse_config_file(main.resolve_gin_file(name))
    if name.endswith("_base.gin"):  # included by the others
      continue
    model = gin.query_parameter("student.model")
    assert model in models.MODEL_NAMES, (name, model)
    if name.endswith("_distill.gin") and not name.startswith("digits"):
      assert gin.query_parameter("loss.teacher") == "records"
      assert set(gin.query_parameter("data.datasets")) == {"d1", "d2", "d3"}
      if not name.startswith("fashion"):  # the local Fashion-MNIST job trains at 32x32
        assert gin.query_parameter("student.resolution") == models.canonical_resolution(model)
  gin.clear_config()
