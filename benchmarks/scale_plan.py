"""The paper-scale plan on paper: records, storage, teacher compute, Beam and training time.

    .venv/bin/python benchmarks/scale_plan.py [--teacher_utilisation 0.35] [--top_k 10] ...

From per-record costs measured on this stack and stated accelerator figures (every one a flag,
all printed under "assumptions"), for the paper's distillation datasets (D1 500 replicas of
ImageNet, D2 1000, D3 10 replicas of 130K images x 1000 classes) and for MNv4-Conv-L's
2000-epoch distillation: records, storage (full float16 logits and top-k), the teacher's
accelerator time, the Beam job's CPU (worker-hours), the CPUs an accelerator host needs to feed
its chips, training steps and the training time on a TPU v5e slice.

Cost model (first order, no overheads beyond the stated utilisations):
  records          = images x replicas
  storage          = records x bytes per record
  teacher          = records x teacher MACs / (chips' peak MAC/s x utilisation)
  Beam CPU         = records x (augmentation + serialisation CPU per record); the augmentation
                     CPU measured at --cost_resolution scales with pixels to the teacher's size
                     (conservative: decoding the source does not grow with it)
  host CPUs        = images/s per host x CPU per image (augmentation for the teacher's hosts,
                     replay at the student's resolution for training hosts)
  training         = epochs x epoch images x 3 x student MACs (forward + backward) / (slice
                     peak x utilisation); steps = epochs x epoch images / global batch
  offline / online = the teacher's forward passes: offline once per record (D1 + D2 + D3),
                     shared by every student trained on the records; online (the teacher run
                     on each training batch, as the "patient and consistent" baseline) once per
                     example each student sees (epochs x epoch images), at the same teacher
                     MACs and utilisation. N students cost offline teacher + N x student,
                     online N x (teacher per student + student); offline wins from the N where
                     the records' teacher time falls below N students' online teacher time.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

IMAGENET_TRAIN = 1_281_167

# EfficientNet-B0's stages (Tan & Le 2019, table 1): kernel, repeats, in, out, expansion, stride;
# squeeze-excite ratio 0.25 throughout. Bigger variants scale width, depth and resolution.
_EFFICIENTNET_B0 = ((3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2),
                    (3, 3, 40, 80, 6, 2), (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2),
                    (3, 1, 192, 320, 6, 1))


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
  scaled = filters * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def efficientnet_macs(width: float, depth: float, resolution: int, classes: int = 1000) -> int:
  """Multiply-accumulates of one EfficientNet forward pass (convolutions, SE, classifier).

  Walks the architecture as Keras' and timm's builders lay it out (stem 3x3/2, MBConv stages
  with widths rounded to 8 and repeats ceil(depth x r), 1280-wide head). Gives B0 at 224 px
  0.386G, B1 at 240 0.687G, B3 at 300 1.83G, B7 at 600 37.7G: the EfficientNet paper's 0.39B,
  0.70B, 1.8B, 37B.
  """
  side = math.ceil(resolution / 2)
  channels = _round_filters(32, width)
  total = side * side * 3 * channels * 9
  for kernel, repeats, _, out, expand, stride in _EFFICIENTNET_B0:
    out = _round_filters(out, width)
    for j in range(math.ceil(depth * repeats)):
      step = stride if j == 0 else 1
      wide = channels * expand
      squeeze = max(1, int(channels * 0.25))
      after = math.ceil(side / step)
      if expand != 1:
        total += side * side * channels * wide
      total += after * after * wide * (kernel * kernel + out) + 2 * wide * squeeze
      side, channels = after, out
  head = _round_filters(1280, width)
  return total + side * side * channels * head + head * classes


@dataclasses.dataclass(frozen=True)
class Assumptions:
  """Every input of the plan; `main` makes each a flag of the same name."""
  # The datasets (paper section 8).
  imagenet_images: int = IMAGENET_TRAIN
  d1_replicas: int = 500
  d2_replicas: int = 1000
  d3_images_per_class: int = 130_000
  d3_classes: int = 1000
  d3_replicas: int = 10
  # Per-record costs measured on this stack (2-core shared machine; see README).
  record_bytes_full: int = 2481     # 1000 float16 logits + ids + parameters (records.py)
  record_bytes_topk: int = 564      # the same with --top_k 10
  top_k: int = 10
  serialize_cpu_ms: float = 0.06    # records.distill_record per record
  augment_cpu_ms: float = 6.2       # decode + crop + RandAugment + flip, per image, CPU-core ms
  cost_resolution: int = 224        # ... at this output size (500x375 JPEG sources)
  replay_cpu_ms: float = 6.2        # the trainer's replay per image at cost_resolution
  # The teacher: EfficientNet-L2 (Noisy Student) at 475 px; width 4.3, depth 5.3.
  teacher_width: float = 4.3
  teacher_depth: float = 5.3
  teacher_resolution: int = 475
  # Accelerators: TPU v5e, 197 TFLOP/s bf16 peak per chip (= 98.5 TMAC/s).
  chip_peak_tflops: float = 197.0
  teacher_utilisation: float = 0.35
  chips_per_host: int = 4           # v5e multi-host slices: 4 chips per host VM
  host_vcpus: int = 112             # vCPUs of such a host (ct5lp-hightpu-4t)
  beam_vcpus_per_worker: int = 4
  # The student run: MNv4-Conv-L distilled for 2000 epochs on a v5e-128 slice.
  student_macs_g: float = 5.9       # Conv-L at 384 px (paper table 5)
  student_resolution: int = 384
  epochs: int = 2000
  global_batch: int = 4096
  train_chips: int = 128
  train_utilisation: float = 0.15
  paper_hours: float = 2.3          # the reference: 2.3 h for 400 epochs
  paper_epochs: int = 400


@dataclasses.dataclass(frozen=True)
class DatasetRow:
  name: str
  images: int
  replicas: int
  records: int
  bytes_full: int
  bytes_topk: int
  teacher_chip_hours: float
  beam_cpu_hours: float
  beam_worker_hours: float
  host_cpus_needed: float           # per teacher host, to keep its chips busy


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
  examples: int
  steps: int
  hours: float
  images_per_second: float
  host_cpus_needed: float
  paper_hours_scaled: float         # the paper's rate, scaled to `epochs`
  paper_utilisation: float          # the utilisation that rate implies on this slice


def teacher_macs(a: Assumptions) -> int:
  return efficientnet_macs(a.teacher_width, a.teacher_depth, a.teacher_resolution)


def _scaled(cpu_ms: float, a: Assumptions, resolution: int) -> float:
  return cpu_ms * (resolution / a.cost_resolution) ** 2


def plan_datasets(a: Assumptions) -> list[DatasetRow]:
  """One row per dataset (D1, D2, D3) and their total."""
  macs = teacher_macs(a)
  chip_macs = a.chip_peak_tflops * 1e12 / 2 * a.teacher_utilisation
  record_cpu_ms = _scaled(a.augment_cpu_ms, a, a.teacher_resolution) + a.serialize_cpu_ms
  per_host = a.chips_per_host * chip_macs / macs * _scaled(a.augment_cpu_ms, a,
                                                          a.teacher_resolution) / 1000
  rows = []
  for name, images, replicas in (
      ("D1", a.imagenet_images, a.d1_replicas),
      ("D2", a.imagenet_images, a.d2_replicas),
      ("D3", a.d3_images_per_class * a.d3_classes, a.d3_replicas)):
    records = images * replicas
    cpu_hours = records * record_cpu_ms / 3.6e6
    rows.append(DatasetRow(
        name=name, images=images, replicas=replicas, records=records,
        bytes_full=records * a.record_bytes_full, bytes_topk=records * a.record_bytes_topk,
        teacher_chip_hours=records * macs / chip_macs / 3600, beam_cpu_hours=cpu_hours,
        beam_worker_hours=cpu_hours / a.beam_vcpus_per_worker, host_cpus_needed=per_host))
  total = DatasetRow("all", sum(r.images for r in rows), 0, sum(r.records for r in rows),
                     sum(r.bytes_full for r in rows), sum(r.bytes_topk for r in rows),
                     sum(r.teacher_chip_hours for r in rows),
                     sum(r.beam_cpu_hours for r in rows),
                     sum(r.beam_worker_hours for r in rows), per_host)
  return rows + [total]


def plan_training(a: Assumptions) -> TrainingPlan:
  """Conv-L's distillation: every epoch covers ImageNet's training images once."""
  examples = a.epochs * a.imagenet_images
  flops = 3 * 2 * a.student_macs_g * 1e9          # forward + backward, 2 FLOPs per MAC
  slice_flops = a.train_chips * a.chip_peak_tflops * 1e12
  seconds = examples * flops / (slice_flops * a.train_utilisation)
  rate = examples / seconds
  hosts = a.train_chips / a.chips_per_host
  paper_seconds = a.paper_hours * 3600 * a.epochs / a.paper_epochs
  return TrainingPlan(
      examples=examples, steps=math.ceil(examples / a.global_batch), hours=seconds / 3600,
      images_per_second=rate,
      host_cpus_needed=rate / hosts * _scaled(a.replay_cpu_ms, a, a.student_resolution) / 1000,
      paper_hours_scaled=paper_seconds / 3600,
      paper_utilisation=examples * flops / (slice_flops * paper_seconds))


@dataclasses.dataclass(frozen=True)
class TeacherCost:
  """Chip-hours of N students' distillation, the teacher offline (records) or online."""
  students: int
  offline_teacher_chip_hours: float    # the records' teacher, once for all N
  online_teacher_chip_hours: float     # N x the teacher on every example each student sees
  student_chip_hours: float            # N x one student's training
  offline_total: float
  online_total: float


def plan_offline_vs_online(a: Assumptions, students=(1, 2, 5, 10)) -> list[TeacherCost]:
  """The teacher's share of N students' cost, offline against online (see the module doc):
  the records' teacher chip-hours as `plan_datasets` gives them, the online teacher at the same
  chip-hours per forward pass, the student's training as `plan_training`."""
  records = plan_datasets(a)[-1]
  train = plan_training(a)
  per_student_online = train.examples * records.teacher_chip_hours / records.records
  offline = records.teacher_chip_hours
  student = train.hours * a.train_chips
  return [TeacherCost(n, offline, n * per_student_online, n * student, offline + n * student,
                      n * (per_student_online + student)) for n in students]


def teacher_forwards(a: Assumptions) -> tuple[int, int]:
  """(forward passes of the teacher offline: every record once; online: per student)."""
  return plan_datasets(a)[-1].records, plan_training(a).examples


def format_offline_vs_online(a: Assumptions) -> list[str]:
  """The offline/online table's lines (`format_plan`'s last part; benchmarks print it too)."""
  offline_fwd, online_fwd = teacher_forwards(a)
  lines = [
      f"teacher offline (records) or online (on each batch): {offline_fwd:,} teacher forwards "
      f"once, or {online_fwd:,} per student; v5e chip-hours",
      f"{'students':>9}{'teacher chip-h offline':>24}{'online':>10}{'students':>11}"
      f"{'total offline':>15}{'online':>10}{'online/offline':>16}"]
  for c in plan_offline_vs_online(a):
    lines.append(f"{c.students:>9}{c.offline_teacher_chip_hours:>24,.0f}"
                 f"{c.online_teacher_chip_hours:>10,.0f}{c.student_chip_hours:>11,.0f}"
                 f"{c.offline_total:>15,.0f}{c.online_total:>10,.0f}"
                 f"{c.online_total / c.offline_total:>16.2f}")
  lines.append(f"  offline's teacher pays for itself from {offline_fwd / online_fwd:.2f} students"
               " (records / one student's examples)")
  return lines


def _size(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
    if n < 1000:
      return f"{n:.1f} {unit}"
    n /= 1000
  return f"{n:.1f} EB"


def format_plan(a: Assumptions) -> str:
  rows = plan_datasets(a)
  train = plan_training(a)
  macs = teacher_macs(a)
  lines = ["assumptions"]
  lines += [f"  {f.name} = {getattr(a, f.name)}" for f in dataclasses.fields(a)]
  lines += [f"  -> teacher EfficientNet-L2 at {a.teacher_resolution} px: {macs / 1e9:.1f} GMACs "
            "(computed from the architecture)",
            f"  -> augmentation per record at {a.teacher_resolution} px: "
            f"{_scaled(a.augment_cpu_ms, a, a.teacher_resolution):.1f} CPU ms; replay at "
            f"{a.student_resolution} px: {_scaled(a.replay_cpu_ms, a, a.student_resolution):.1f}"
            " CPU ms", ""]
  head = (f"{'data':<5}{'images':>12}{'replicas':>9}{'records':>16}{'full':>10}"
          f"{f'top-{a.top_k}':>10}{'teacher':>12}{'on v5e-128':>11}{'Beam CPU':>12}"
          f"{'workers':>11}{'CPUs/host':>10}")
  units = (f"{'':<5}{'':>12}{'':>9}{'':>16}{'storage':>10}{'storage':>10}{'chip-h':>12}"
           f"{'hours':>11}{'core-h':>12}{'worker-h':>11}{'teacher':>10}")
  lines += [head, units]
  for r in rows:
    lines.append(
        f"{r.name:<5}{r.images:>12,}{r.replicas or '':>9}{r.records:>16,}"
        f"{_size(r.bytes_full):>10}{_size(r.bytes_topk):>10}{r.teacher_chip_hours:>12,.0f}"
        f"{r.teacher_chip_hours / a.train_chips:>11,.0f}{r.beam_cpu_hours:>12,.0f}"
        f"{r.beam_worker_hours:>11,.0f}{r.host_cpus_needed:>10.0f}")
  lines += [
      "",
      f"training: MNv4-Conv-L, {a.epochs} epochs of {a.imagenet_images:,} images at "
      f"{a.student_resolution} px, global batch {a.global_batch}, {a.train_chips} v5e chips",
      f"  examples {train.examples:,}; steps {train.steps:,}",
      f"  time {train.hours:.1f} h at {a.train_utilisation:.0%} utilisation "
      f"({train.images_per_second:,.0f} images/s)",
      f"  input CPUs per host ({a.chips_per_host} chips) to replay that: "
      f"{train.host_cpus_needed:.0f} of {a.host_vcpus}",
      f"  paper: {a.paper_hours} h for {a.paper_epochs} epochs -> {train.paper_hours_scaled:.1f}"
      f" h for {a.epochs}; that rate is {train.paper_utilisation:.1%} utilisation of this slice",
  ]
  lines += [""] + format_offline_vs_online(a)
  return "\n".join(lines)


def parse_args(argv=None) -> Assumptions:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for f in dataclasses.fields(Assumptions):
    parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
  return Assumptions(**vars(parser.parse_args(argv)))


def main(argv=None):
  print(format_plan(parse_args(argv)))


if __name__ == "__main__":
  main()
