"""The training run's settings: one home, eight groups of gin configurables.

Each group is a frozen dataclass that gin makes from its bindings (`data.datasets = {...}`,
`schedule.train_steps = 100`), each setting documented once, where it is declared. `GROUPS`
holds them in order (data, augment, student, loss, schedule, optimizer, cadence, runtime);
`Config` is one run's instance of each; `RENAMED` maps the flat `train.X` names of before the
groups to their bindings now. This module imports gin and nothing heavy, so a bad binding is
reported before TensorFlow loads; `mnv4_train.train` runs what these settings say.
"""

from __future__ import annotations

import dataclasses

import gin

__all__ = ["Config", "GROUPS", "RENAMED", "renamed", "TEACHERS", "DataConfig", "AugmentConfig",
           "StudentConfig", "LossConfig", "ScheduleConfig", "OptimizerConfig", "CadenceConfig",
           "RuntimeConfig"]

# What the student learns from (`loss.teacher`).
TEACHERS = ("records", "online", "none")

GROUPS = {}  # gin name -> group class, in `Config`'s order


def _group(name: str):
  """Registers the class as the frozen dataclass and gin configurable `name`."""
  def register(cls):
    cls = gin.configurable(name)(dataclasses.dataclass(frozen=True)(cls))
    GROUPS[name] = cls
    return cls
  return register


def _formerly(old: str, default):
  """A setting whose flat name before the groups was `train.<old>` (`RENAMED`)."""
  return dataclasses.field(default=default, metadata={"formerly": old})


@_group("data")
class DataConfig:
  """What the student reads: the training datasets and their mixture, the held-out set, and
  how the input is read."""
  # name -> folder: distillation records (`data_prep.distill`, replayed as recorded) or source
  # shards (`data_prep.ingest`, augmented online as `augment` says).
  datasets: dict = gin.REQUIRED
  # The mixture: weights by dataset name (default: equal), or
  weights: dict | None = None
  # [(start_step, {name: weight}), ...], the weights from each start step on (instead of
  # `weights`, not with them).
  weight_schedule: list | None = None
  # A folder (or bucket path) that relative `datasets` and `eval_data` paths are in.
  root: str | None = _formerly("data_root", None)
  # Held-out source shards for top-1/top-5 (evaluated every `cadence.eval_every` steps and at
  # the end), center-cropped to `eval_crop` of the image, `eval_batch_size` at a time.
  eval_data: str | None = None
  eval_crop: float = 0.875
  eval_batch_size: int = 256
  # A fresh random order of each data file's records every epoch.
  shuffle: bool = True
  # Data files read at once (interleaved one element each).
  cycle_length: int = 16
  # How hosts split the input: "files" (each host its own share of every dataset's files),
  # "data" (every host reads all of them and keeps its share of the batches) or "auto" (files
  # when every dataset has a file per host).
  shard_policy: str = "auto"
  # tf.data's deterministic order (a seeded run repeats).
  deterministic: bool = True
  # Hold the run's datasets in memory as pixels (source images decoded whole, at most a flip;
  # distillation records replayed once) and gather whole batches, as `fit` on arrays does;
  # small data only (`pipeline.memory_cache_problem`). Its order (and a source recipe's
  # flips) are its own, not the streaming input's. True: held, or the run stops with one line
  # saying why it cannot be; 'auto': held when it can be, else streamed (a line says why).
  memory_cache: bool | str = False


@_group("augment")
class AugmentConfig:
  """The online augmentation of source-shard datasets; distillation records are replayed as
  recorded, so nothing here changes them. The supervised recipes set these together (their
  yamls' RandAugment and mixup_and_cutmix blocks); a distillation recipe never does."""
  # An inception crop of at least this fraction of the image's area (1.0: the whole image).
  crop_area_min: float = 0.08
  # A random horizontal flip.
  flip: bool = True
  # RandAugment as the Model Garden's `RandAugment`: `layers` ops per image (num_layers; 0:
  # none) at `magnitude`, `translate_const` and `cutout_const` in pixels at any resolution (as
  # it applies them), each op applied with `prob_to_apply` (None: always), `exclude_ops` never
  # drawn (e.g. ['Cutout']). Defaults: its `common.RandAugment` config's.
  layers: int = _formerly("augment_layers", 2)
  magnitude: float = _formerly("augment_magnitude", 9.0)
  translate_const: float = _formerly("augment_translate_const", 10.0)
  cutout_const: float = _formerly("augment_cutout_const", 40.0)
  prob_to_apply: float | None = _formerly("augment_prob_to_apply", None)
  exclude_ops: tuple = _formerly("augment_exclude_ops", ())
  # Batch mixup / cutmix, the Model Garden's `MixupAndCutmix` (alpha, cutmix_alpha, prob,
  # switch_prob, label_smoothing) on each batch, off while both alphas are 0; its soft labels
  # take the label term's place. For label-only runs and the online teacher, which then sees
  # the mixed batch (`loss.teacher` "none" or "online"; stored logits belong to unmixed pixels).
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_prob: float = 1.0
  mix_switch_prob: float = 0.5
  mix_label_smoothing: float = 0.1


@_group("student")
class StudentConfig:
  """The model that learns."""
  # The MNv4 variant (`models.MODEL_NAMES`), e.g. "conv_s".
  model: str = gin.REQUIRED
  # Keyword arguments of `models.build`: width, dropout, drop_path_rate, bn_momentum, ...
  options: dict | None = _formerly("model_options", None)
  # Classes (default: the data's).
  num_classes: int | None = None
  # Input size (default: the records' resolution, else the variant's canonical one).
  resolution: int | None = None


@_group("loss")
class LossConfig:
  """What the student learns from: the teacher and the loss terms (`mnv4_train.kd`)."""
  # "records" (the logits stored with the distillation records), "online" (`teacher_model`
  # runs on each batch) or "none" (labels only: set `label_weight`).
  teacher: str = "records"
  # The online teacher, a `.keras` file (a relative path is under `data.root`, as the datasets).
  # It sees exactly the student's batch, batch mixup/cutmix included ("consistent" views).
  teacher_model: str | None = None
  # The distillation term: KL(teacher || student) at `temperature`, times `distill_weight`.
  temperature: float = 1.0
  distill_weight: float = 1.0
  # The label term: cross-entropy with `label_smoothing`, times `label_weight`.
  label_weight: float = 0.0
  label_smoothing: float = 0.0


@_group("schedule")
class ScheduleConfig:
  """The run's length and its learning rate: linear warmup, then cosine decay."""
  # Images per step, over all replicas and hosts.
  global_batch_size: int = 256
  # The length: `epochs`, or `train_steps` (which wins when both are set). An epoch is
  # `examples_per_epoch` images (default: one pass over the first dataset's source images).
  epochs: float | None = None
  train_steps: int | None = None
  examples_per_epoch: int | None = None
  # The peak learning rate, reached after the warmup.
  learning_rate: float = 0.004
  # The warmup in steps, or in epochs (converted as `epochs` is; when set it replaces
  # `warmup_steps`).
  warmup_steps: int = 1560
  warmup_epochs: float | None = None
  # Where the cosine decay ends.
  end_learning_rate: float = 0.0


@_group("optimizer")
class OptimizerConfig:
  """AdamW (decoupled weight decay on kernels only: not on norms, biases or layer scales), an
  optional extra L2 loss and a weight EMA."""
  # AdamW's decoupled weight decay, its moment decays and its epsilon.
  weight_decay: float = 0.1
  beta_1: float = 0.9
  beta_2: float = 0.999
  epsilon: float = 1e-7
  # Clip the gradients' global norm to this (None: no clipping).
  clipnorm: float | None = None
  # An extra 0.5 * l2 * |w|^2 loss on kernels, not depthwise ones (the Model Garden's Conv-S).
  l2_regularization: float = 0.0
  # Keep an exponential moving average of the weights with this decay (evaluated and
  # exported; None: none).
  ema_decay: float | None = None
  # The average follows the weights exactly until this optimizer step, and averages from there
  # on (the Model Garden's `ExponentialMovingAverage(start_step=...)`); None: at the end of the
  # warmup, as its MNv4 recipes set it.
  ema_start_step: int | None = None


@_group("cadence")
class CadenceConfig:
  """When the run logs, checkpoints, evaluates and stops (`mnv4_train.training.cadence`)."""
  # Steps per compiled loop (one host round trip).
  steps_per_loop: int = 100
  # Steps between history.jsonl lines, checkpoints and evaluations (None: only the final one).
  log_every: int = 100
  checkpoint_every: int = 1000
  eval_every: int | None = None
  # Checkpoints kept.
  keep_checkpoints: int = 3
  # Stop (checkpointed) after this many steps of this invocation, as a preemption would; the
  # schedule still spans the whole run.
  stop_after_steps: int | None = None


@_group("runtime")
class RuntimeConfig:
  """Where and how the steps run: devices, precision, seeds."""
  # "cpu", "gpu", "multiworker" or "tpu"; `tpu` and `cpu_replicas`: see `make_strategy`.
  distribution: str = "cpu"
  tpu: str = "local"
  cpu_replicas: int = 1
  # None, "mixed_bfloat16", "mixed_float16" or "auto" (bf16 on TPU, float16 on GPU, float32
  # on CPU).
  mixed_precision: str | None = "auto"
  # Seeds the student's initial weights, the input's order and the online augmentation.
  seed: int = 0
  # TensorFlow's deterministic kernels (bit-equal reruns; slower).
  op_determinism: bool = False


@dataclasses.dataclass(frozen=True)
class Config:
  """One run's settings: its workdir and one instance of each group (`GROUPS`, this order)."""
  workdir: str
  data: DataConfig
  augment: AugmentConfig
  student: StudentConfig
  loss: LossConfig
  schedule: ScheduleConfig
  optimizer: OptimizerConfig
  cadence: CadenceConfig
  runtime: RuntimeConfig

  @classmethod
  def make(cls, workdir: str, **groups) -> Config:
    """The groups given by name; gin makes the others from their bindings."""
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
      raise TypeError(f"no settings group {unknown}; the groups are {list(GROUPS)}")
    return cls(workdir, **{name: group() if groups.get(name) is None else groups[name]
                            for name, group in GROUPS.items()})


# The flat `train.X` names of before the groups -> their bindings now, e.g. "data_root" ->
# "data.root" (`mnv4_train.main` names them when a gin file or binding uses an old one).
RENAMED = {field.metadata.get("formerly", field.name): f"{name}.{field.name}"
           for name, group in GROUPS.items() for field in dataclasses.fields(group)}


def renamed(names) -> str:
  """One line naming the binding now of each old flat `train.X` name in `names`."""
  each = "; ".join(f"train.{n} is now {RENAMED[n]}" if n in RENAMED else
                   f"train.{n} is no setting" for n in dict.fromkeys(names))
  return (f"{each} (the settings are in groups now: {', '.join(GROUPS)}; see "
          "mnv4_train/config.py)")

