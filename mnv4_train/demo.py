"""The whole pipeline on this machine: `python -m mnv4_train.demo` (the README's main command).

On sklearn's digits (real scans that ship offline), or on your own image folder with
`--images=PATH` (class_name/*.jpg|png, any number of classes; corrupt files are counted and
skipped), in a workspace folder (WORKSPACE.md):

  1 images    the digits written out as an image folder (skipped with --images)
  2 sources   data_prep.ingest (Beam): train and held-out source shards (20% held out by id)
  3 teacher   mnv4_train.main digits_teacher.gin: MNv4-Conv-S on labels
  4 baseline  mnv4_train.main digits_student.gin: the half-width student on labels only
  5 d1, d2    data_prep.distill (Beam, DirectRunner, 2 worker processes) with the teacher
  6 student   mnv4_train.main digits_distill.gin: the student distilled on D1 + D2, mixed
  7 export    mnv4_train.export: the distilled student as TFLite (float32), checked
  8 report    a table of teacher / label-only student / distilled student: held-out
              accuracy, parameters, MACs, images/s; training curves in each run's curves.png

Each stage runs as its own process, as a user would run it, and each stage's output is complete
or absent: Beam jobs write to a temporary folder and rename it, training runs resume from their
last checkpoint. Re-running the command skips finished stages; a stage stopped with Ctrl-C
resumes where it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from mnv4_train.errors import ArgumentParser, UserError, exit_on_user_error

PROG = "mnv4_train.demo"


class StageFailed(UserError):
  """A stage's process exited non-zero (its own error line is printed above)."""


def parse_args(argv):
  parser = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  parser.add_argument("--images", default=None,
                      help="your own image folder (class_name/*.jpg|png) instead of the digits")
  parser.add_argument("--workspace", default=None,
                      help="workspace folder (default workspace/digits, or workspace/<folder "
                      "name> with --images)")
  parser.add_argument("--resolution", type=int, default=32, help="model input size")
  parser.add_argument("--epochs", type=float, default=None,
                      help="training epochs of every run (default: the gin files' 30)")
  parser.add_argument("--replicas", type=int, default=4,
                      help="augmented replicas of each distillation dataset (D1, D2)")
  parser.add_argument("--holdout_fraction", type=float, default=0.2)
  parser.add_argument("--crop_area_min", type=float, default=0.5,
                      help="smallest inception-crop area in D1/D2 (the paper: 0.08, for "
                      "224 px photos; a small crop of a 32 px digit is noise)")
  parser.add_argument("--flip", choices=["auto", "yes", "no"], default="auto",
                      help="horizontal flips in D1/D2 (auto: not for digits, yes for --images)")
  parser.add_argument("--verbose", action="store_true",
                      help="every stage prints everything its libraries log")
  args = parser.parse_args(argv)
  _VERBOSE[:] = ["--verbose"] if args.verbose else []
  if args.images is not None and not os.path.isdir(args.images):
    parser.error(f"--images {args.images} is not a folder of class_name/ subfolders")
  if args.resolution < 16 or args.replicas < 1:
    parser.error("--resolution must be >= 16 and --replicas >= 1")
  if args.flip == "auto":
    args.flip = "no" if args.images is None else "yes"
  if args.workspace is None:
    name = "digits" if args.images is None else os.path.basename(os.path.abspath(args.images))
    args.workspace = os.path.join("workspace", name)
  args.workspace = os.path.abspath(args.workspace)
  return args


def _log(message):
  print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


_VERBOSE: list[str] = []  # ["--verbose"] with --verbose, for the stages that take it
_BEAM_JOBS = ("data_prep.ingest", "data_prep.select_d3", "data_prep.distill")


def _run(stage, argv):
  """Runs one stage's command with this interpreter; its output streams to the console."""
  # TODO(i10): pass --verbose to mnv4_train.main as well once it takes the flag.
  cmd = [sys.executable, "-m"] + argv + (_VERBOSE if argv[0] in _BEAM_JOBS else [])
  _log(f"{stage}: " + " ".join(cmd[2:]))
  start = time.time()
  proc = subprocess.run(cmd, check=False)
  if proc.returncode:
    raise StageFailed(f"stage {stage} failed (exit status {proc.returncode}); fix what it "
                      "reported and run the same command again: finished stages are kept")
  _log(f"{stage}: done in {time.time() - start:.0f} s")


def _finished_job(folder, marker="manifest.json"):
  return os.path.exists(os.path.join(folder, marker))


def _finished_run(workdir):
  path = os.path.join(workdir, "metrics.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get("finished", False)


def _train(stage, gin_file, workdir, args, *bindings):
  if _finished_run(workdir):
    _log(f"{stage}: finished before ({workdir}), kept")
    return
  binds = [f"train.data_root='{args.workspace}'", f"train.resolution={args.resolution}"]
  if args.epochs is not None:
    binds.append(f"train.epochs={args.epochs}")
  _run(stage, ["mnv4_train.main", f"--gin_file={gin_file}", f"--workdir={workdir}"]
       + [f"--gin_bindings={b}" for b in binds + list(bindings)])


def _job(stage, folder, argv, marker="manifest.json"):
  if _finished_job(folder, marker):
    _log(f"{stage}: finished before ({folder}), kept")
    return
  _run(stage, argv)


def measure(keras_path, resolution, batch=64, rounds=5):
  """(parameters, MACs, images/s of inference on this CPU at `batch`)."""
  import keras  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from mnv4_train.models import profile  # pylint: disable=import-outside-toplevel
  model = keras.saving.load_model(keras_path, compile=False)
  macs = sum(c.macs for c in profile.layer_costs(model, resolution))
  x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (batch, resolution, resolution, 3)),
                  tf.float32)
  infer = tf.function(lambda t: model(t, training=False))
  infer(x)
  best = 0.0
  for _ in range(rounds):
    start = time.perf_counter()
    infer(x).numpy()
    best = max(best, batch / (time.perf_counter() - start))
  return model.count_params(), macs, best


def plot_eval(runs, workspace):
  """Held-out top-1 over training of every run, in one PNG (workspace/report.png)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4))
  for label, workdir in runs:
    with open(os.path.join(workdir, "eval.jsonl")) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    ax.plot([r["step"] for r in rows], [100 * r["top1"] for r in rows], "o-", label=label)
  ax.set_xlabel("training step")
  ax.set_ylabel("held-out top-1 (%)")
  ax.set_ylim(0, 100)
  ax.legend(loc="lower right")
  ax.set_title("teacher, label-only student, distilled student")
  fig.tight_layout()
  path = os.path.join(workspace, "report.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def report(args, runs, export_dir):
  rows = []
  for label, workdir in runs:
    with open(os.path.join(workdir, "metrics.json")) as f:
      metrics = json.load(f)
    params, macs, speed = measure(metrics["export"], args.resolution)
    rows.append({"model": label, "workdir": workdir, "top1": metrics["top1"],
                 "top5": metrics["top5"],
                 "params": params, "macs": macs, "images_per_second": speed,
                 "curves": os.path.join(workdir, "curves.png")})
  export = {}
  report_path = os.path.join(export_dir, "export_report.json")
  if os.path.exists(report_path):
    with open(report_path) as f:
      export = json.load(f)
  sources = {}
  for subset in ("train", "holdout"):
    with open(os.path.join(args.workspace, "sources", subset, "manifest.json")) as f:
      m = json.load(f)
    sources[subset] = {"images": m["num_examples"], "classes": m["num_classes"],
                       "unreadable_skipped": m["dead_letter"]}
  out = {"workspace": args.workspace, "resolution": args.resolution, "sources": sources,
         "runs": rows, "export": export, "curves": plot_eval(runs, args.workspace)}
  with open(os.path.join(args.workspace, "report.json"), "w") as f:
    json.dump(out, f, indent=1)
  print()
  skipped = sources["train"]["unreadable_skipped"]
  print(f"{sources['train']['classes']} classes: {sources['train']['images']} training and "
        f"{sources['holdout']['images']} held-out images; {skipped} unreadable files skipped "
        f"(listed in sources/*/dead_letter.jsonl)")
  print(f"{'model':<28}{'held-out top-1':>15}{'top-5':>8}{'params':>11}{'MACs':>12}"
        f"{'images/s':>10}")
  for r in rows:
    print(f"{r['model']:<28}{100 * r['top1']:>14.2f}%{100 * r['top5']:>7.1f}%"
          f"{r['params']:>11,}{r['macs'] / 1e6:>10.2f} M{r['images_per_second']:>10.0f}")
  print(f"(images/s: batch 64 at {args.resolution} px on this CPU; held-out accuracy over "
        f"training: {out['curves']}; each run's losses: runs/*/curves.png; all of it in "
        f"{os.path.join(args.workspace, 'report.json')})")
  return out


def run(argv=None) -> dict:
  args = parse_args(argv)
  ws = args.workspace
  os.makedirs(ws, exist_ok=True)
  _log(f"workspace {ws}")
  images = args.images
  if images is None:
    images = os.path.join(ws, "images")
    if not os.path.exists(os.path.join(images, ".complete")):
      _run("1/8 images", ["data_prep.digits", f"--out={images}"])
      open(os.path.join(images, ".complete"), "w").close()
    else:
      _log(f"1/8 images: finished before ({images}), kept")
  else:
    _log(f"1/8 images: your folder {images}")
  beam = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
  for subset in ("train", "holdout"):
    folder = os.path.join(ws, "sources", subset)
    _job(f"2/8 sources ({subset})", folder,
         ["data_prep.ingest", f"--images={images}", f"--out={folder}", "--num_shards=2",
          f"--holdout_fraction={args.holdout_fraction}", f"--subset={subset}"] + beam)
  runs = os.path.join(ws, "runs")
  _train("3/8 teacher", "digits_teacher.gin", os.path.join(runs, "teacher"), args)
  _train("4/8 baseline", "digits_student.gin", os.path.join(runs, "student_labels"), args)
  teacher = os.path.join(runs, "teacher", "export", "student.keras")
  for recipe in ("d1", "d2"):
    folder = os.path.join(ws, "distill", recipe)
    _job(f"5/8 {recipe}", folder,
         ["data_prep.distill", f"--recipe={recipe}", f"--source={ws}/sources/train",
          f"--teacher={teacher}", f"--out={folder}", f"--replicas={args.replicas}",
          "--replicas_per_task=1", "--batch_size=64", f"--crop_area_min={args.crop_area_min}"]
         + (["--no_flip"] if args.flip == "no" else []) + beam)
  _train("6/8 student", "digits_distill.gin", os.path.join(runs, "student_distill"), args)
  export_dir = os.path.join(ws, "export")
  _job("7/8 export", export_dir,
       ["mnv4_train.export", "--model=conv_s",
        f"--checkpoint={runs}/student_distill/export/student.keras", f"--out={export_dir}",
        "--format=tflite_float32", f"--representative={ws}/sources/holdout/shard-*.tfrecord"],
       marker="export_report.json")
  _log("8/8 report")
  return report(args, [("teacher (Conv-S)", os.path.join(runs, "teacher")),
                       ("student, labels only", os.path.join(runs, "student_labels")),
                       ("student, distilled", os.path.join(runs, "student_distill"))],
                export_dir)


def main(argv=None):
  with exit_on_user_error(PROG):
    try:
      run(argv)
    except KeyboardInterrupt:
      print(f"{PROG}: interrupted; run the same command again to resume (finished stages are "
            "kept, training resumes from its last checkpoint)", file=sys.stderr)
      sys.exit(130)


if __name__ == "__main__":
  main()
