"""Offline against online distillation: the same student, batch and steps, the teacher's logits
replayed from records or the teacher run on each batch.

    .venv/bin/python benchmarks/offline_vs_online.py [--workspace workspace/fashion_mnist]
        [--steps 100] [--warmup 50] [--lead_in 25] [--rounds 3]

Data: the main job's workspace (`python -m mnv4_train.demo` builds it): its D1, D2 and D3
records, its labelled training images (sources/train) and its teacher
(runs/teacher/export/student.keras); or any of them given by `--records`, `--source`,
`--teacher`. Nothing is downloaded.

Three rows, each the trainer's own plan, build and compiled loop (`trainer_vs_fit.TrainerRow`),
the recipes' settings read with gin, the same student (the recipes' Conv-S x0.25) at the same
batch (`--batch`, the recipes' 128) on the CPU:
  - offline: `fashion_distill.gin`, D1 + D2 + D3 mixed 1:1:2, each record's augmentation
    replayed and its stored logits read (the paper's way);
  - online: `fashion_online.gin`, the labelled images with the online crop, flip and batch mixup,
    the teacher run on each batch (the "patient and consistent" baseline);
  - online input, no teacher: the online row's input, student and optimizer with the label term
    on the mixup targets instead of the teacher; what the online row spends beyond it is the
    teacher's share.

Timing as `trainer_vs_fit.py`: one untimed call of `--warmup` steps (tracing, tf.data start),
then `--rounds` rounds of `--lead_in` untimed and `--steps` timed steps, the rows' order
alternating round by round. Figures: steps/s (best and median round), CPU-seconds per step
(median; process CPU time, every thread), the teacher's share of the online step's CPU, and the
ratio offline / online (> 1: offline is faster). Then the scale planner's comparison at paper
scale (`scale_plan.py`'s assumptions and flags' defaults): the teacher's chip-hours offline
(every record once) and online (every example of every student), for 1 to 10 students.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import scale_plan  # noqa: E402
from benchmarks import trainer_vs_fit as tvf  # noqa: E402

OFFLINE, ONLINE, NO_TEACHER = "offline: D1+D2+D3 records", "online: teacher on each batch", \
    "online input, no teacher"


def row_configs(args, work: str) -> dict:
  """The three rows' settings (`train.Config`), each in its own workdir under `work`."""
  length = args.warmup + args.rounds * (args.lead_in + args.steps)
  common = {"data.root": None, "data.eval_data": None, "cadence.eval_every": None,
            "schedule.global_batch_size": args.batch, "schedule.train_steps": length,
            "schedule.epochs": None, "runtime.distribution": "cpu",
            "student.resolution": args.resolution}
  records = dict(item.split("=", 1) for item in args.records)
  offline = tvf.recipe_config(
      "fashion_distill.gin", os.path.join(work, "offline"), width=args.width,
      overrides={**common, "data.datasets": records,
                 "data.weights": {k: v for k, v in {"d1": 1.0, "d2": 1.0, "d3": 2.0}.items()
                                  if k in records} or None})
  online_data = {**common, "data.datasets": {"train": args.source},
                 "loss.teacher_model": args.teacher}
  online = tvf.recipe_config("fashion_online.gin", os.path.join(work, "online"),
                             width=args.width, overrides=online_data)
  bare = tvf.recipe_config(
      "fashion_online.gin", os.path.join(work, "no_teacher"), width=args.width,
      overrides={**online_data, "loss.teacher": "none", "loss.distill_weight": 0.0,
                 "loss.label_weight": 1.0, "loss.teacher_model": None})
  return {OFFLINE: offline, ONLINE: online, NO_TEACHER: bare}


def summary(rounds: list[tvf.Clock], steps: int) -> dict:
  rates = [steps / c.wall for c in rounds]
  return {"best": max(rates), "median": statistics.median(rates),
          "cpu_per_step": statistics.median(c.cpu / steps for c in rounds)}


def table(results: dict) -> str:
  off, on, bare = results[OFFLINE], results[ONLINE], results[NO_TEACHER]
  lines = [f"{'row':<32}{'steps/s best':>13}{'median':>8}{'CPU-s/step':>12}"]
  for name, s in results.items():
    lines.append(f"{name:<32}{s['best']:>13.2f}{s['median']:>8.2f}{s['cpu_per_step']:>12.3f}")
  share = 1 - bare["cpu_per_step"] / on["cpu_per_step"]
  lines += ["", f"the teacher's share of the online step's CPU: {share:.0%}",
            f"offline / online steps/s: {off['best'] / on['best']:.2f} (best), "
            f"{off['median'] / on['median']:.2f} (median); CPU-s per step online / offline: "
            f"{on['cpu_per_step'] / off['cpu_per_step']:.2f}"]
  return "\n".join(lines)


def paper_scale(a: scale_plan.Assumptions) -> str:
  teacher = scale_plan.teacher_macs(a)
  return "\n".join([f"paper scale ({os.path.basename(scale_plan.__file__)}'s assumptions): "
                    f"teacher {teacher / 1e9:.0f} GMACs, {teacher / (a.student_macs_g * 1e9):.0f}x"
                    " the student's"] + scale_plan.format_offline_vs_online(a))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workspace", default=os.path.join(REPO, "workspace", "fashion_mnist"),
                      help="the main job's workspace (python -m mnv4_train.demo)")
  parser.add_argument("--records", nargs="+", default=None,
                      help="name=folder of distillation records (default: the workspace's "
                      "d1, d2, d3)")
  parser.add_argument("--source", default=None, help="source shards (default: sources/train)")
  parser.add_argument("--teacher", default=None,
                      help=".keras teacher (default: runs/teacher/export/student.keras)")
  parser.add_argument("--steps", type=int, default=100, help="timed steps per round")
  parser.add_argument("--warmup", type=int, default=50)
  parser.add_argument("--lead_in", type=int, default=25)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--resolution", type=int, default=32)
  parser.add_argument("--width", type=float, default=0.25)
  args = parser.parse_args(argv)
  for flag in ("steps", "warmup", "lead_in", "rounds", "batch", "resolution"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag} must be >= 1")
  ws = args.workspace
  args.records = args.records or [f"{d}={os.path.join(ws, 'distill', d)}"
                                  for d in ("d1", "d2", "d3")]
  args.source = args.source or os.path.join(ws, "sources", "train")
  args.teacher = args.teacher or os.path.join(ws, "runs", "teacher", "export", "student.keras")
  missing = [p for p in [r.split("=", 1)[-1] for r in args.records] + [args.source, args.teacher]
             if not os.path.exists(p)]
  if missing:
    parser.error(f"{missing[0]} does not exist: run `python -m mnv4_train.demo` first (it "
                 "builds the workspace) or pass --records/--source/--teacher")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  work = tempfile.mkdtemp(prefix="offline_vs_online_")
  try:
    rows = {name: tvf.TrainerRow(config) for name, config in row_configs(args, work).items()}
    params = {name: row.params() for name, row in rows.items()}
    if len(set(params.values())) != 1:
      raise SystemExit(f"the rows' students differ: {params}")
    for row in rows.values():
      row.steps(args.warmup)
    clocks = {name: [] for name in rows}
    for order in tvf.round_orders(list(rows), args.rounds):
      for name in order:
        clocks[name].append(rows[name].round(args.lead_in, args.steps))
    for row in rows.values():
      row.close()
  finally:
    shutil.rmtree(work, ignore_errors=True)
  results = {name: summary(c, args.steps) for name, c in clocks.items()}
  teacher = tvf.keras.saving.load_model(args.teacher, compile=False).count_params()
  print(f"student: Conv-S x{args.width}, {params[OFFLINE]:,} parameters; teacher "
        f"{teacher:,} ({teacher / params[OFFLINE]:.1f}x); batch {args.batch} at "
        f"{args.resolution} px on the CPU; {args.rounds} rounds of {args.steps} timed steps")
  print(table(results))
  print()
  print(paper_scale(scale_plan.Assumptions()))
  return results


if __name__ == "__main__":
  main()
