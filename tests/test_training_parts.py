"""The trainer's parts on their own: cadence, named sums, metric writer, checkpointer, gin."""

import dataclasses
import inspect
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from mnv4_train import train
from mnv4_train.errors import ConfigError, InputPathError
from mnv4_train.training import stats
from mnv4_train.training.cadence import Cadence
from mnv4_train.training.checkpointer import Checkpointer
from mnv4_train.training.metric_writer import MetricWriter, format_duration, progress_line


# ---- cadence ----------------------------------------------------------------------------------

def _stops(cadence, step=0):
  stops = []
  while step < cadence.stop_at:
    step = cadence.next_stop(step)
    stops.append(step)
  return stops


def test_cadence_stops_at_every_boundary_and_acts_on_time():
  c = Cadence(train_steps=20, stop_at=20, steps_per_loop=7, log_every=5, checkpoint_every=8,
              eval_every=10)
  assert _stops(c) == [5, 7, 8, 10, 14, 15, 16, 20]
  assert [s for s in range(1, 21) if c.log(s)] == [5, 10, 15, 20]
  assert [s for s in range(1, 21) if c.checkpoint(s)] == [8, 16, 20]
  # The end of the run evaluates in `finish`, not as a periodic evaluation.
  assert [s for s in range(1, 21) if c.evaluate(s)] == [10]


def test_cadence_of_a_stopped_invocation_logs_and_checkpoints_where_it_stops():
  c = Cadence(train_steps=100, stop_at=13, steps_per_loop=100, log_every=10,
              checkpoint_every=50)
  assert _stops(c, step=4) == [10, 13]
  assert c.log(13) and c.checkpoint(13) and not c.checkpoint(10)
  assert not any(c.evaluate(s) for s in range(1, 101))  # no eval data: never


def test_cadence_refuses_a_zero_interval():
  with pytest.raises(ConfigError, match="cadence.log_every must be >= 1"):
    Cadence(train_steps=10, stop_at=10, log_every=0)


# ---- statistics -------------------------------------------------------------------------------

def test_sums_add_up_by_name_and_make_the_history_row():
  sums = stats.Sums(["d1", "d2"])
  assert sums.names == ("loss", "kd", "ce", "correct", "agree", "examples",
                        "examples/d1", "examples/d2")
  sums.add({"loss": 6.0, "kd": 4.0, "ce": 2.0, "correct": 3.0, "agree": 2.0, "examples": 4.0,
            "examples/d1": 1.0, "examples/d2": 3.0})
  sums.add({"loss": np.float32(2.0), "examples": 4.0, "examples/d1": 4.0})
  row = sums.row(7, has_teacher=True, learning_rate=0.5, examples_per_second=10.0)
  assert row == {"step": 7, "loss": 1.0, "kd": 0.5, "ce": 0.25, "accuracy": 0.375,
                 "agreement": 0.25, "learning_rate": 0.5, "examples_per_second": 10.0,
                 "mixture": {"d1": 0.625, "d2": 0.375}}
  assert list(row) == ["step", "loss", "kd", "ce", "accuracy", "agreement", "learning_rate",
                       "examples_per_second", "mixture"]  # history.jsonl's column order
  assert sums.row(7, has_teacher=False, learning_rate=0.5,
                  examples_per_second=1.0)["agreement"] is None
  with pytest.raises(KeyError, match="unknown statistic 'examples/d3'"):
    sums.add({"examples/d3": 1.0})
  sums.reset()
  assert sums["loss"] == 0.0 and sums.mean("loss") == 0.0  # an empty interval divides by 1


# ---- metric writer ----------------------------------------------------------------------------

def _row(step, loss, mixture=None):
  return {"step": step, "loss": loss, "kd": loss, "ce": 0.0, "accuracy": 0.5,
          "agreement": 0.75, "learning_rate": 1e-3, "examples_per_second": 64.0,
          "mixture": mixture or {"d1": 1.0}}


def test_progress_line_has_step_rate_and_eta():
  line = progress_line(_row(250, 1.5, {"d1": 0.4, "d2": 0.6}), train_steps=1000,
                       global_batch=32)
  # 750 steps of 32 examples at 64 examples/s: 375 s.
  assert line == ("step 250/1000 (25%): loss 1.5000, train top-1 0.500, teacher agreement "
                  "0.750, lr 1.00e-03, mix d1 0.40 d2 0.60, 64.0 examples/s, ETA 6m15s")
  assert [format_duration(s) for s in (0, 59.4, 61, 3600, 7322)] == [
      "0s", "59s", "1m01s", "1h00m", "2h02m"]


def test_metric_writer_writes_history_eval_tensorboard_and_curves(tmp_path, caplog):
  work = str(tmp_path)
  writer = MetricWriter(work, chief=True, train_steps=4, global_batch=8)
  writer.start(0)
  with caplog.at_level("INFO", logger="mnv4_train"):
    for step, loss in [(1, 2.0), (2, 1.5), (3, 1.0), (4, 0.5)]:
      writer.train(_row(step, loss))
    writer.eval({"top1": 0.25, "top5": 0.5, "examples": 10, "step": 4})
  writer.close()
  history = train.read_jsonl(os.path.join(work, "history.jsonl"))
  assert [h["step"] for h in history] == [1, 2, 3, 4] and history[3]["loss"] == 0.5
  assert train.read_jsonl(os.path.join(work, "eval.jsonl")) == [
      {"top1": 0.25, "top5": 0.5, "examples": 10, "step": 4}]
  assert any(m.startswith("step 4/4 (100%)") and "ETA 0s" in m for m in caplog.messages)
  assert "eval at step 4: top-1 0.2500 top-5 0.5000 (10 images)" in caplog.messages
  with open(os.path.join(work, "curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  events = tf.io.gfile.glob(os.path.join(work, "tensorboard", "events.out.tfevents.*"))
  tags = {v.tag for e in tf.compat.v1.train.summary_iterator(events[0]) for v in e.summary.value}
  assert {"train/loss", "train/teacher_agreement", "mixture/d1", "eval/top1"} <= tags

  # A run resumed from step 2 drops what came after its checkpoint.
  again = MetricWriter(work, chief=True, train_steps=4, global_batch=8)
  again.start(2)
  assert [h["step"] for h in train.read_jsonl(os.path.join(work, "history.jsonl"))] == [1, 2]
  assert train.read_jsonl(os.path.join(work, "eval.jsonl")) == []


def test_a_non_chief_metric_writer_writes_no_file(tmp_path):
  writer = MetricWriter(str(tmp_path), chief=False, train_steps=2, global_batch=8)
  writer.start(0)
  writer.train(_row(1, 1.0))
  writer.eval({"top1": 0.25, "top5": 0.5, "examples": 10, "step": 1})
  writer.close()
  assert os.listdir(tmp_path) == []


# ---- checkpointer -----------------------------------------------------------------------------

def _model_and_optimizer():
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
  optimizer = keras.optimizers.SGD(0.1)
  optimizer.build(model.trainable_variables)
  return model, optimizer


def test_checkpointer_restores_weights_optimizer_and_input_position(tmp_path):
  model, optimizer = _model_and_optimizer()
  iterator = iter(tf.data.Dataset.range(100))
  ckpt = Checkpointer(str(tmp_path), model=model, optimizer=optimizer, iterator=iterator)
  assert ckpt.restore() == 0 and ckpt.latest() is None
  for _ in range(5):
    next(iterator)
  optimizer.iterations.assign(5)
  model.layers[0].kernel.assign(np.full((3, 2), 7.0))
  ckpt.save(5)
  assert ckpt.latest().endswith("ckpt-5")

  model2, optimizer2 = _model_and_optimizer()
  iterator2 = iter(tf.data.Dataset.range(100))
  again = Checkpointer(str(tmp_path), model=model2, optimizer=optimizer2, iterator=iterator2)
  assert again.restore() == 5
  assert int(next(iterator2)) == 5
  np.testing.assert_array_equal(model2.layers[0].kernel.numpy(), np.full((3, 2), 7.0))

  # Another host layout has no input position for this host: one clear error.
  model3, optimizer3 = _model_and_optimizer()
  other = Checkpointer(str(tmp_path), model=model3, optimizer=optimizer3,
                       iterator=iter(tf.data.Dataset.range(100)), host=1)
  with pytest.raises(InputPathError, match="no input position for host 1"):
    other.restore()


# ---- the gin surface --------------------------------------------------------------------------

# Every setting with its default, by binding name, as users' gin files and --gin_bindings know
# them: a rename or a changed default breaks their runs.
GIN_SURFACE = {
    "data.datasets": "REQUIRED", "data.weights": None, "data.weight_schedule": None,
    "data.root": None, "data.eval_data": None, "data.eval_crop": 0.875,
    "data.eval_batch_size": 256, "data.shuffle": True, "data.cycle_length": 16,
    "data.shard_policy": "auto", "data.deterministic": True, "data.memory_cache": False,
    "augment.crop_area_min": 0.08, "augment.flip": True, "augment.layers": 2,
    "augment.magnitude": 9.0, "augment.translate_const": 10.0, "augment.cutout_const": 40.0,
    "augment.prob_to_apply": None, "augment.exclude_ops": (), "augment.mixup_alpha": 0.0,
    "augment.cutmix_alpha": 0.0, "augment.mix_prob": 1.0, "augment.mix_switch_prob": 0.5,
    "augment.mix_label_smoothing": 0.1,
    "student.model": "REQUIRED", "student.options": None, "student.num_classes": None,
    "student.resolution": None,
    "loss.teacher": "records", "loss.teacher_model": None, "loss.temperature": 1.0,
    "loss.distill_weight": 1.0, "loss.label_weight": 0.0, "loss.label_smoothing": 0.0,
    "schedule.global_batch_size": 256, "schedule.epochs": None, "schedule.train_steps": None,
    "schedule.examples_per_epoch": None, "schedule.learning_rate": 0.004,
    "schedule.warmup_steps": 1560, "schedule.warmup_epochs": None,
    "schedule.end_learning_rate": 0.0,
    "optimizer.weight_decay": 0.1, "optimizer.beta_1": 0.9, "optimizer.beta_2": 0.999,
    "optimizer.epsilon": 1e-7, "optimizer.clipnorm": None, "optimizer.l2_regularization": 0.0,
    "optimizer.ema_decay": None, "optimizer.ema_start_step": None,
    "cadence.steps_per_loop": 100, "cadence.log_every": 100, "cadence.checkpoint_every": 1000,
    "cadence.eval_every": None, "cadence.keep_checkpoints": 3, "cadence.stop_after_steps": None,
    "runtime.distribution": "cpu", "runtime.tpu": "local", "runtime.cpu_replicas": 1,
    "runtime.mixed_precision": "auto", "runtime.seed": 0, "runtime.op_determinism": False,
}


def test_the_settings_keep_every_binding_and_default():
  import gin
  got = {f"{name}.{field.name}": "REQUIRED" if field.default is gin.REQUIRED else field.default
         for name, group in train.GROUPS.items() for field in dataclasses.fields(group)}
  assert got == GIN_SURFACE
  # `train` takes the workdir and the groups, which `Config` carries into the parts.
  assert list(inspect.signature(train.train).parameters) == ["workdir", *train.GROUPS]
  assert [f.name for f in dataclasses.fields(train.Config)] == ["workdir", *train.GROUPS]
  # Each old flat `train.X` name has one new binding, and every setting one old name.
  assert len(train.RENAMED) == len(GIN_SURFACE)
  assert sorted(train.RENAMED.values()) == sorted(GIN_SURFACE)
  assert train.RENAMED["data_root"] == "data.root"
  assert train.RENAMED["augment_layers"] == "augment.layers"
  # Gin makes each group from its bindings; a group given to `train` is taken as it is.
  gin.clear_config()
  try:
    gin.parse_config("schedule.train_steps = 7\ndata.datasets = {'a': '/a'}\n"
                     "student.model = 'conv_s'")
    config = train.Config.make("/w", cadence=train.CadenceConfig(log_every=3))
    assert config.schedule.train_steps == 7 and config.data.datasets == {"a": "/a"}
    assert config.cadence.log_every == 3 and config.schedule.learning_rate == 0.004
    with pytest.raises(TypeError, match="no settings group"):
      train.Config.make("/w", schedul=train.ScheduleConfig())
  finally:
    gin.clear_config()


# ---- optimizer: EMA start, extra L2 -----------------------------------------------------------

def test_ema_follows_the_weights_until_its_start_step_then_averages():
  """The Model Garden's ExponentialMovingAverage(start_step=3, dynamic_decay=False)."""
  var = keras.Variable(np.zeros(2, "float32"))
  opt = train.AdamW(learning_rate=0.1, weight_decay=0.0, use_ema=True, ema_momentum=0.9,
                    ema_start_step=3)
  opt.build([var])
  average = opt._model_variables_moving_average[0]  # pylint: disable=protected-access
  expected = None
  for step in range(1, 7):
    opt.apply_gradients([(tf.constant([1.0, -1.0]), var)])
    weights = var.numpy()
    if step < 3:  # decay 0 while the step count is below start_step: a copy of the weights
      np.testing.assert_allclose(average.numpy(), weights, rtol=1e-6)
      expected = weights
    else:         # from start_step on: average_decay
      expected = 0.9 * expected + 0.1 * weights
      np.testing.assert_allclose(average.numpy(), expected, rtol=1e-5)
      assert not np.allclose(average.numpy(), weights)
  # start_step 0 is Keras' own EMA (a copy on the first update only).
  var2 = keras.Variable(np.zeros(2, "float32"))
  ref = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.0, use_ema=True,
                               ema_momentum=0.9)
  ours = train.AdamW(learning_rate=0.1, weight_decay=0.0, use_ema=True, ema_momentum=0.9)
  var3 = keras.Variable(np.zeros(2, "float32"))
  ref.build([var2])
  ours.build([var3])
  for _ in range(4):
    ref.apply_gradients([(tf.constant([1.0, -1.0]), var2)])
    ours.apply_gradients([(tf.constant([1.0, -1.0]), var3)])
  np.testing.assert_allclose(ours._model_variables_moving_average[0].numpy(),  # pylint: disable=protected-access
                             ref._model_variables_moving_average[0].numpy(), rtol=1e-6)  # pylint: disable=protected-access


def test_extra_l2_skips_depthwise_kernels():
  from mnv4_train import models
  from mnv4_train.training.trainer import l2_variables
  student = models.build("conv_s", num_classes=4, width=0.25)
  depthwise = [l.kernel for l in student._flatten_layers()  # pylint: disable=protected-access
               if isinstance(l, keras.layers.DepthwiseConv2D)]
  assert depthwise
  covered = l2_variables(student)
  assert not {id(v) for v in covered} & {id(v) for v in depthwise}
  kernels = [v for v in student.trainable_variables if len(v.shape) > 1]
  assert len(covered) == len(kernels) - len(depthwise)
  assert any(v is student.get_layer("logits").kernel for v in covered)


def test_warmup_epochs_become_steps_and_the_ema_starts_at_the_warmup_end(source_shards,
                                                                         tmp_path):
  def plan(**schedule):
    return train.plan_run(train.Config.make(
        str(tmp_path), data=train.DataConfig(datasets={"a": source_shards[0]}),
        student=train.StudentConfig(model="conv_s"),
        loss=train.LossConfig(teacher="none", label_weight=1.0),
        schedule=train.ScheduleConfig(global_batch_size=8, epochs=10.0, **schedule)))
  got = plan(warmup_epochs=0.5)
  assert got.train_steps == 250 and got.warmup_steps == 13  # ceil(0.5 * 200 / 8)
  assert got.ema_start_step == 13
  got = train.plan_run(dataclasses.replace(
      got.config, schedule=dataclasses.replace(got.config.schedule, warmup_epochs=None,
                                               warmup_steps=7),
      optimizer=train.OptimizerConfig(ema_start_step=4)))
  assert got.warmup_steps == 7 and got.ema_start_step == 4


def test_the_online_teacher_file_is_found_under_data_root_like_the_datasets(source_shards,
                                                                            teacher_path,
                                                                            tmp_path):
  """fashion_online.gin names its teacher inside the workspace, as the datasets are named."""
  root = os.path.commonpath([source_shards[0], teacher_path])
  plan = train.plan_run(train.Config.make(
      str(tmp_path), data=train.DataConfig(root=root, datasets={
          "a": os.path.relpath(source_shards[0], root)}),
      student=train.StudentConfig(model="conv_s"),
      loss=train.LossConfig(teacher="online",
                            teacher_model=os.path.relpath(teacher_path, root)),
      schedule=train.ScheduleConfig(global_batch_size=8, train_steps=1)))
  assert plan.teacher_model == os.path.join(root, os.path.relpath(teacher_path, root))
  assert train.load_teacher(plan.teacher_model, plan.num_classes).output_shape == (None, 10)
  # Batch mixup goes with the online teacher (it sees the mixed pixels), not stored logits.
  with pytest.raises(ConfigError, match="stored logits"):
    train.plan_run(dataclasses.replace(plan.config, loss=train.LossConfig(teacher="records"),
                                       augment=train.AugmentConfig(mixup_alpha=1.0)))
