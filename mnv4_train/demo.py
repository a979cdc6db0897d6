"""The whole pipeline on this machine: `python -m mnv4_train.demo` (the README's main command).

By default on Fashion-MNIST (real product photos; the Debian package dataset-fashion-mnist), the
paper's section 8 in miniature, in a workspace folder (WORKSPACE.md):

  1 images    sklearn's digits as an image folder: out-of-distribution images for the corpus
  2 sources   data_prep.ingest (Beam): a labelled subset ("ImageNet") split into train and
              validation by a stable id hash, the rest of the training images as an unlabelled,
              class-imbalanced corpus ("JFT") with the digits mixed in, and the official test set
  3 teacher   mnv4_train.main fashion_teacher.gin: MNv4-Conv-S on the labelled subset
  4 baseline  fashion_student.gin: MNv4-Conv-S x0.25 on labels only (also the relevance
              classifier of stage 5, as the paper's is a small supervised model)
  5 d3 select data_prep.select_d3: score the corpus, keep > 0.3 that the domain filter passes
              (--relevance), top K per class, replicate rare
  6 d1 d2 d3  data_prep.distill (Beam RunInference, 2 worker processes) with the teacher
  7 student   fashion_distill.gin: the same student distilled on D1 + D2 + D3 mixed 1:1:2
  8 export    mnv4_train.export: the distilled student as TFLite (float32), checked
  9 report    every model on the 10,000 official test images; table, report.json, report.png

`--ablation` adds the students of the paper's Table 8 (D1, D2, D3, D1+D2, D2+D3 alone) with the
same number of steps, the same student distilled online (fashion_online.gin: the teacher run on
each batch, the "patient and consistent" baseline) and a label-only control, and an ablation
table and PNG. `--dataset digits` runs the quick digits
path (D1 + D2, no corpus); `--images=PATH` runs that path on your own folder (class_name/*.jpg|png,
any number of classes; corrupt files are counted and skipped). `--images=PATH --corpus=DIR` runs
this section-8 path on your folder instead: DIR is your "JFT", a folder of unlabelled images
(subfolders one level deep allowed), from which stage 5 selects D3; the folder is split by a
stable id hash into test (`--holdout_fraction`, 0.2), validation (`--val`, 0.1) and training
images, and the distilled student's length is scaled to the training images (the main job's
2,000 steps for its 5,400).

Each stage runs as its own process, as a user would run it (forked from a process that has
imported TensorFlow, Keras and Beam once: `mnv4_train.stages`), and each stage's output is complete
or absent: Beam jobs write to a temporary folder and rename it, training runs resume from their
last checkpoint. Re-running the command skips finished stages; a stage stopped with Ctrl-C
resumes where it was.
"""

from __future__ import annotations

import json
import os
import sys
import time

from mnv4_train import cli, ownership, stages
from mnv4_train.errors import (ArgumentParser, InputPathError, UserError, exit_on_user_error,
                               run_then_exit)

PROG = "mnv4_train.demo"
# The distilled students' default length: fashion_distill.gin's schedule.train_steps (a test keeps
# the two equal); the demo always binds it, so --student_steps changes every distilled run.
DISTILL_STEPS = 2000
# Which corpus images may enter D3 on Fashion-MNIST ("paper" or "domain"; see --relevance),
# chosen on its validation split; your folders keep the rule their figures were measured with.
RELEVANCE_DEFAULT = "domain"
# The main job's labelled training images (--labelled 0.09 of 60,000), which DISTILL_STEPS is
# for: a folder with a corpus trains its distilled student DISTILL_STEPS x its own / this.
FASHION_LABELLED = 5400
MIN_FOLDER_STEPS = 100
# sklearn's digits: epochs of the teacher and of the label-only student (a folder's keep the
# recipes' 30). Chosen on a validation split carved from the training digits
# (docs/results.md): 15 epochs gave the teacher, the label-only student and the student
# distilled from that teacher the validation top-1 of 30, in two thirds of the training time.
DIGITS_LABEL_EPOCHS = 15


class StageFailed(UserError):
  """A stage's process exited non-zero (its own error line is printed above)."""


def parse_args(argv):
  parser = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", choices=["fashion_mnist", "digits"], default="fashion_mnist",
                      help="fashion_mnist: the section-8 experiment (default); digits: the quick "
                      "path on sklearn's digits")
  parser.add_argument("--images", default=None,
                      help="your own image folder (class_name/*.jpg|png): the quick path on it")
  parser.add_argument("--ablation", action="store_true",
                      help="fashion_mnist: also the students of Table 8's rows (D1, D2, D3, "
                      "D1+D2, D2+D3), the student distilled online and a label-only one, "
                      "for the same steps, and the ablation table + PNG")
  parser.add_argument("--labelled", type=float, default=0.09,
                      help="fashion_mnist: fraction of the 60,000 training images in the "
                      "labelled training subset")
  parser.add_argument("--val", type=float, default=None,
                      help="fraction carved for validation (every choice was made on it): "
                      "fashion_mnist, of the training images (default 0.02); with --images "
                      "--corpus, of your folder (default 0.1)")
  parser.add_argument("--corpus", default=None,
                      help="fashion_mnist: the corpus is the training images from the labelled "
                      "and validation fractions up to this fraction (default 1.0: all the rest); "
                      "with --images: a folder of your unlabelled images (subfolders one level "
                      "deep allowed) from which D3 is selected, as the main job does")
  parser.add_argument("--rare_classes", default="2:0.1,4:0.1,6:0.1",
                      help="fashion_mnist: CLASS:FRACTION kept in the corpus, to make it "
                      "imbalanced")
  parser.add_argument("--ood", type=int, default=180,
                      help="fashion_mnist: out-of-distribution digit images per class added to "
                      "the corpus (sklearn has about 180 per class)")
  parser.add_argument("--test", type=float, default=1.0,
                      help="fashion_mnist: fraction of the 10,000 test images to evaluate on")
  parser.add_argument("--per_class", type=int, default=None,
                      help="D3's K images per class (default: the corpus size / the number of "
                      "classes, rounded to 100, at least 100)")
  parser.add_argument("--threshold", type=float, default=0.3,
                      help="relevance score above which a corpus image may enter D3 (the "
                      "paper's 0.3)")
  parser.add_argument("--relevance", choices=["domain", "paper"], default=None,
                      help="which corpus images may enter D3: 'paper' (the relevance "
                      "classifier's top-class probability > --threshold) or 'domain' (that, "
                      "and the domain filter fitted on the training images, its threshold "
                      f"passing 98%% of the validation images; select_d3). Default: "
                      f"{RELEVANCE_DEFAULT} on fashion_mnist (chosen on its validation split), "
                      "paper with --images --corpus (as its figures were measured)")
  parser.add_argument("--student_steps", type=int, default=None,
                      help="steps of every distilled student: fashion_mnist's default "
                      f"{DISTILL_STEPS}, as fashion_distill.gin (the README's full run: 8000); "
                      f"with --images --corpus, {DISTILL_STEPS} x training images / "
                      f"{FASHION_LABELLED:,} (at least {MIN_FOLDER_STEPS})")
  parser.add_argument("--workspace", default=None,
                      help="workspace folder (default workspace/digits, or workspace/<folder "
                      "name> with --images)")
  parser.add_argument("--resolution", type=int, default=32, help="model input size")
  parser.add_argument("--epochs", type=float, default=None,
                      help="training epochs of every run (default: each recipe's own; on digits "
                      f"the teacher and the label-only student train {DIGITS_LABEL_EPOCHS})")
  parser.add_argument("--replicas", default=None,
                      help="augmented replicas of each distillation dataset: one number for all, "
                      "or D1,D2,D3 (default: 4 for digits and folders; fashion_mnist 4,4,2)")
  parser.add_argument("--holdout_fraction", type=float, default=0.2)
  parser.add_argument("--crop_area_min", type=float, default=None,
                      help="smallest inception-crop area in D1/D2/D3 (the paper: 0.08, for "
                      "224 px photos; default 0.5 for digits and folders, 1.0 for fashion_mnist: "
                      "a small crop of a 28 px garment or an 8 px digit is noise)")
  parser.add_argument("--ra_magnitude", type=float, default=None,
                      help="RandAugment magnitude of D1 and D3 (default: the recipes' 9 and 5; "
                      "fashion_mnist: 2)")
  parser.add_argument("--jpeg_quality", type=int, default=None,
                      help="JPEG round trip of D1/D2/D3's augmented images before the teacher "
                      "(the paper's step, quality 95 in the recipes; 0 leaves it out). "
                      "Default: fashion_mnist 95 (chosen on its validation split); digits and "
                      "your folders 0, as their figures were measured")
  parser.add_argument("--flip", choices=["auto", "yes", "no"], default="auto",
                      help="horizontal flips in D1/D2 (auto: not for digits, yes for --images)")
  parser.add_argument("--beam_workers", type=int, default=2,
                      help="worker processes of each local Beam job (1: in the job's own "
                      "process, which starts faster on small inputs)")
  parser.add_argument("--verbose", action="store_true",
                      help="every stage prints everything its libraries log")
  args = parser.parse_args(argv)
  _VERBOSE[:] = ["--verbose"] if args.verbose else []
  if args.images is not None and not os.path.isdir(args.images):
    parser.error(f"--images {args.images} is not a folder of class_name/ subfolders")
  if args.images is not None:
    args.dataset = "folder"
  args.section8 = args.dataset == "fashion_mnist" or args.corpus is not None
  if args.dataset == "fashion_mnist":
    try:
      args.corpus = 1.0 if args.corpus is None else float(args.corpus)
    except ValueError:
      parser.error(f"--corpus takes a fraction with --dataset fashion_mnist (a folder with "
                   f"--images), got {args.corpus!r}")
    args.val = 0.02 if args.val is None else args.val
    args.student_steps = DISTILL_STEPS if args.student_steps is None else args.student_steps
  elif args.corpus is not None:
    if args.images is None:
      parser.error("--corpus DIR goes with --images (your folder); --dataset digits has no corpus")
    if not os.path.isdir(args.corpus):
      parser.error(f"--corpus {args.corpus} is not a folder of unlabelled images")
    args.val = 0.1 if args.val is None else args.val
    if not (0 < args.val and 0 < args.holdout_fraction and args.val + args.holdout_fraction < 1):
      parser.error("--val and --holdout_fraction need 0 < each and val + holdout_fraction < 1")
  default = "4,4,2" if args.dataset == "fashion_mnist" else "4"
  try:
    reps = [int(r) for r in (args.replicas or default).split(",")]
  except ValueError:
    parser.error(f"--replicas takes N or D1,D2,D3, got {args.replicas!r}")
  if len(reps) == 1:
    reps = reps * 3
  if len(reps) != 3 or min(reps) < 1:
    parser.error(f"--replicas takes N or D1,D2,D3 (each >= 1), got {args.replicas!r}")
  args.replicas = dict(zip(("d1", "d2", "d3"), reps))
  if args.student_steps is not None and args.student_steps < 1:
    parser.error(f"--student_steps must be >= 1, got {args.student_steps}")
  if args.jpeg_quality is None:
    args.jpeg_quality = 95 if args.dataset == "fashion_mnist" else 0
  if args.relevance is None:
    args.relevance = RELEVANCE_DEFAULT if args.dataset == "fashion_mnist" else "paper"
  if not 0 <= args.jpeg_quality <= 100:
    parser.error(f"--jpeg_quality must be in [0, 100] (0: no JPEG step), got {args.jpeg_quality}")
  if args.beam_workers < 1:
    parser.error(f"--beam_workers must be >= 1, got {args.beam_workers}")
  if args.resolution < 32:
    parser.error(f"--resolution must be >= 32 (the models downsample 32x), got {args.resolution}")
  if args.dataset == "fashion_mnist" and not (
      0 < args.labelled and 0 < args.val and args.labelled + args.val < args.corpus <= 1.0):
    parser.error("--labelled, --val and --corpus need 0 < labelled, val and labelled + val < "
                 "corpus <= 1")
  if not 0 < args.test <= 1.0 or args.ood < 0:
    parser.error("--test must be in (0, 1] and --ood >= 0")
  if args.ablation and not args.section8:
    parser.error("--ablation needs a corpus for D3: --dataset fashion_mnist, or --images with "
                 "--corpus")
  if args.flip == "auto":
    args.flip = "no" if args.dataset == "digits" else "yes"
  if args.crop_area_min is None:  # chosen on the validation split (README, "The main job")
    args.crop_area_min = 1.0 if args.section8 else 0.5
  if args.ra_magnitude is None and args.section8:
    args.ra_magnitude = 2.0
  if not 0.0 < args.crop_area_min <= 1.0:
    parser.error(f"--crop_area_min must be in (0, 1], got {args.crop_area_min}")
  if args.workspace is None:
    name = (args.dataset if args.images is None
            else os.path.basename(os.path.abspath(args.images)))
    args.workspace = os.path.join("workspace", name)
  args.workspace = os.path.abspath(args.workspace)
  return args


def _log(message):
  print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _stage_times(workspace):
  """Wall seconds per stage, from workspace/stage_times.json (kept across resumed runs)."""
  path = os.path.join(workspace, "stage_times.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _record_time(workspace, key, seconds):
  """Adds a stage's wall seconds to workspace/stage_times.json."""
  times = _stage_times(workspace)
  times[key] = times.get(key, 0.0) + seconds
  path = os.path.join(workspace, "stage_times.json")
  with open(path + ".tmp", "w") as f:
    json.dump(times, f, indent=1)
  os.replace(path + ".tmp", path)




def beam_local(workers):
  """The local runner's flags: N worker processes (multi-processing), or 1: in the stage's own
  process (no worker start-up: faster for small inputs such as the tests' slivers)."""
  if workers == 1:
    return []
  return [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]

_VERBOSE: list[str] = []  # ["--verbose"] with --verbose, for the stages that take it
# The stages that take --verbose: the Beam jobs (data_prep/console.py), the trainer, the export.
_VERBOSE_STAGES = ("data_prep.ingest", "data_prep.select_d3", "data_prep.distill",
                   "mnv4_train.main", "mnv4_train.export")


def _run(stage, argv, workspace=None, key=None, done=None):
  """Runs one stage's command (`python -m` argv) as its own process, forked from a warm one
  that has imported the libraries once (`mnv4_train.stages`); its output streams to the console.

  `done()` says whether the stage's outputs are complete: a stage killed by a signal after
  that (TensorFlow has crashed, rarely, while a finished trainer's process ended) is kept,
  with a line saying so."""
  argv = argv + (_VERBOSE if argv[0] in _VERBOSE_STAGES else [])
  _log(f"{stage}: " + " ".join(argv))
  start = time.time()
  returncode = stages.run(argv[0], argv[1:])
  if returncode < 0 and done is not None and done():
    _log(f"{stage}: its process ended on signal {-returncode} after its run had finished "
         "and written everything; kept")
  elif returncode:
    raise StageFailed(f"stage {stage} failed (exit status {returncode}); fix what it "
                      "reported and run the same command again: finished stages are kept")
  _log(f"{stage}: done in {time.time() - start:.0f} s")
  if workspace:
    _record_time(workspace, key or stage, time.time() - start)


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
  binds = [f"data.root='{args.workspace}'", f"student.resolution={args.resolution}"]
  if args.epochs is not None:
    binds.append(f"schedule.epochs={args.epochs}")
  _run(stage, ["mnv4_train.main", f"--gin_file={gin_file}", f"--workdir={workdir}"]
       + [f"--gin_bindings={b}" for b in binds + list(bindings)],
       args.workspace, os.path.basename(workdir), done=lambda: _finished_run(workdir))


def _check_relevance(selection, relevance):
  """A kept D3 selection made with the other relevance rule is not reused silently."""
  from mnv4_train.data import formats  # pylint: disable=import-outside-toplevel
  if not _finished_job(selection, "manifest.json"):
    return
  made = "domain" if formats.D3Selection.read(selection, "the D3 selection").domain_filter \
      else "paper"
  if made != relevance:
    raise UserError(f"{selection} was selected with --relevance={made}, not {relevance}; run "
                    f"with --relevance={made}, or use another --workspace for "
                    f"--relevance={relevance}")


def _job(stage, folder, argv, marker="manifest.json", workspace=None, key=None):
  if _finished_job(folder, marker):
    _log(f"{stage}: finished before ({folder}), kept")
    return
  _run(stage, argv, workspace, key)


def _digits_folder(stage, folder, *flags):
  """sklearn's digits written as an image folder (data_prep.digits), once; `.complete` marks it."""
  marker = os.path.join(folder, ".complete")
  if os.path.exists(marker):
    _log(f"{stage}: finished before ({folder}), kept")
    return
  _run(stage, ["data_prep.digits", f"--out={folder}", *flags])
  open(marker, "w").close()


def measure(keras_path, resolution, batch=64, rounds=5):
  """(parameters, MACs, images/s of inference on this CPU at `batch`)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from mnv4_train.models import checkpoint, profile  # pylint: disable=import-outside-toplevel
  model = checkpoint.load_model(keras_path, what="model", saved_model=False)
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


def teacher_on_views(workspace, recipes):
  """{recipe: the distillation job's `teacher_on_views`} of the workspace's D1/D2/D3 (None where
  the job had nothing to score against, or wrote records before it was measured)."""
  from mnv4_train.data import formats  # pylint: disable=import-outside-toplevel
  return {r: formats.DistillRecords.read(os.path.join(workspace, "distill", r),
                                         f"distill/{r}").teacher_on_views for r in recipes}


def print_views(views, clean, clean_name):
  """The teacher on its views beside its clean accuracy, a line per dataset."""
  print(f"teacher on the views it labelled (clean {clean_name} top-1 {100 * clean:.2f}%):")
  for recipe, v in views.items():
    if not v:
      print(f"  {recipe.upper():<4} not measured (no labels, or records built before it was)")
      continue
    either = (f", either image's label {100 * v['top1_either']:.2f}%"
              if "top1_either" in v else "")
    print(f"  {recipe.upper():<4} top-1 {100 * v['top1']:.2f}% against the {v['against']}"
          f"{either}, mean confidence {v['mean_confidence']:.2f} ({v['examples']:,} views)")


def plot_eval(runs, workspace, views=None, clean=None):
  """Held-out top-1 over training of every run, in one PNG (workspace/report.png); with `views`
  ({recipe: teacher_on_views}), beside it the teacher's top-1 on each dataset's views against
  its clean top-1 `clean`."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  if views:
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(11, 4), width_ratios=[7, 4])
    names = [r.upper() for r in views]
    top1 = [100 * v["top1"] if v else 0.0 for v in views.values()]
    bars.bar(names, top1, color="#4477aa", label="top-1 (label of the larger share)")
    either = [100 * v["top1_either"] if v and "top1_either" in v else None
              for v in views.values()]
    for i, e in enumerate(either):
      if e is not None:
        bars.bar(names[i], e - top1[i], bottom=top1[i], color="#99bbdd",
                 label="either image's label")
    for i, v in enumerate(top1):
      bars.text(i, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    if clean is not None:
      bars.axhline(100 * clean, color="#228833", ls="--",
                   label=f"clean images {100 * clean:.1f}%")
    bars.set_ylim(0, 100)
    bars.set_ylabel("teacher top-1 on its views (%)")
    bars.set_title("the teacher on the views it labelled")
    bars.legend(loc="upper right", bbox_to_anchor=(1.0, 0.94), fontsize=7)
  else:
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
  from mnv4_train.data import formats  # pylint: disable=import-outside-toplevel
  sources = {}
  for subset in ("train", "holdout"):
    m = formats.SourceShards.read(os.path.join(args.workspace, "sources", subset),
                                  f"sources/{subset}")
    sources[subset] = {"images": m.num_examples, "classes": m.num_classes,
                       "unreadable_skipped": m.dead_letter}
  views = teacher_on_views(args.workspace, ("d1", "d2"))
  out = {"workspace": args.workspace, "resolution": args.resolution, "sources": sources,
         "runs": rows, "export": export, "teacher_on_views": views,
         "curves": plot_eval(runs, args.workspace, views, rows[0]["top1"])}
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
  print_views(views, rows[0]["top1"], "held-out")
  print(f"(images/s: batch 64 at {args.resolution} px on this CPU; held-out accuracy over "
        f"training: {out['curves']}; each run's losses: runs/*/curves.png; all of it in "
        f"{os.path.join(args.workspace, 'report.json')})")
  return out


# What the main job writes at the top of a workspace (and what benchmarks/relevance_filter.py
# adds to one): an existing folder holding anything else is not one of its workspaces, and is
# refused rather than written into.
WORKSPACE_ENTRIES = frozenset({
    "ablation.png", "distill", "export", "images", "ood_digits", "report.json", "report.png",
    "runs", "selections", "sources", "stage_times.json", ownership.OWNER,
    "relevance_filter.json", "relevance_filter.png"})


def check_workspace(workspace: str, images: str | None, corpus: str | None = None) -> None:
  """Refuses a workspace that overlaps the user's images (or corpus) or holds what this job did
  not write."""
  ownership.check_overlap(workspace, {"--images": images, "--corpus": corpus},
                          what="--workspace")
  if not os.path.exists(workspace):
    return
  if not os.path.isdir(workspace):
    raise InputPathError(f"--workspace {workspace} is a file; give a folder")
  foreign = sorted(n for n in os.listdir(workspace) if n not in WORKSPACE_ENTRIES
                   and not n.endswith(".tmp"))
  if foreign:
    raise InputPathError(f"--workspace {workspace} holds {foreign[0]!r}"
                         f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, "
                         "which this job did not write; it writes only into an empty folder or "
                         "its own workspace: choose another --workspace")


def run(argv=None) -> dict:
  args = parse_args(argv)
  check_workspace(args.workspace, args.images,
                  args.corpus if args.dataset == "folder" else None)
  try:
    os.makedirs(args.workspace, exist_ok=True)
  except OSError as e:
    raise ownership.storage_problem(e, args.workspace) or InputPathError(
        f"cannot create --workspace {args.workspace}: {e.strerror or e}") from None
  claim = ownership.claim(args.workspace, "--workspace")
  try:
    _log(f"workspace {args.workspace}")
    if args.section8:
      return run_fashion(args)
    return run_folder(args)
  finally:
    claim.release()


def run_folder(args) -> dict:
  """The quick path: digits or a user's folder; D1 + D2 from the teacher, no corpus."""
  ws = args.workspace
  beam = beam_local(args.beam_workers)
  images = args.images
  if images is None:
    images = os.path.join(ws, "images")
    _digits_folder("1/8 images", images)
  else:
    _log(f"1/8 images: your folder {images}")
  for subset in ("train", "holdout"):
    folder = os.path.join(ws, "sources", subset)
    _job(f"2/8 sources ({subset})", folder,
         ["data_prep.ingest", f"--images={images}", f"--out={folder}", "--num_shards=2",
          f"--holdout_fraction={args.holdout_fraction}", f"--subset={subset}"] + beam)
  runs = os.path.join(ws, "runs")
  labels_only = ([f"schedule.epochs={DIGITS_LABEL_EPOCHS}"]
                 if args.images is None and args.epochs is None else [])
  _train("3/8 teacher", "digits_teacher.gin", os.path.join(runs, "teacher"), args, *labels_only)
  _train("4/8 baseline", "digits_student.gin", os.path.join(runs, "student_labels"), args,
         *labels_only)
  teacher = os.path.join(runs, "teacher", "export", "student.keras")
  for recipe in ("d1", "d2"):
    folder = os.path.join(ws, "distill", recipe)
    _job(f"5/8 {recipe}", folder,
         ["data_prep.distill", f"--recipe={recipe}", f"--source={ws}/sources/train",
          f"--teacher={teacher}", f"--out={folder}", f"--replicas={args.replicas[recipe]}",
          "--replicas_per_task=1", "--batch_size=64", f"--crop_area_min={args.crop_area_min}",
          f"--jpeg_quality={args.jpeg_quality}"]
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


# ---- Fashion-MNIST: section 8 in miniature ---------------------------------------------------

# Table 8's rows: name -> mixture weights (D1:D2:D3 = 1:1:2 is the paper's winning mix).
MIXTURES = {
    "d1": {"d1": 1.0},
    "d2": {"d2": 1.0},
    "d3": {"d3": 1.0},
    "d1+d2": {"d1": 1.0, "d2": 1.0},
    "d2+d3": {"d2": 1.0, "d3": 1.0},
    "d1+d2+d3": {"d1": 1.0, "d2": 1.0, "d3": 2.0},
}
MAIN_MIXTURE = "d1+d2+d3"
LABELS_CONTROL = "labels, same steps"  # the ablation's control row
# The ablation's baseline row: the same student distilled online (fashion_online.gin), the
# teacher run on each batch of the labelled images with mixup, for the same steps.
ONLINE = "online teacher"


def _fashion_sources(args):
  ws = args.workspace
  ood = os.path.join(ws, "ood_digits")
  if args.ood:
    _digits_folder("1/9 images", ood, f"--per_class={args.ood}", "--size=28")
  lab, val = args.labelled, args.labelled + args.val
  subsets = {
      "train": ["--fashion_mnist=train", f"--hash_range=0,{lab}", "--num_shards=2"],
      "val": ["--fashion_mnist=train", f"--hash_range={lab},{val}", "--num_shards=1"],
      "corpus": ["--fashion_mnist=train", f"--hash_range={val},{args.corpus}", "--drop_labels",
                 "--num_shards=4"]
                + ([f"--class_fraction={args.rare_classes}"] if args.rare_classes else [])
                + ([f"--unlabeled_images={ood}"] if args.ood else []),
      "test": ["--fashion_mnist=test", "--num_shards=2"]
              + ([f"--hash_range=0,{args.test}"] if args.test < 1.0 else []),
  }
  for subset, flags in subsets.items():
    folder = os.path.join(ws, "sources", subset)
    _job(f"2/9 sources ({subset})", folder,
         ["data_prep.ingest", f"--out={folder}"] + flags + beam_local(args.beam_workers),
         workspace=ws,
         key=f"sources/{subset}")


def _folder_sources(args):
  """Your folder split by a stable id hash (test: the quick path's held-out images; then
  validation; the rest trains), and your corpus, unlabelled."""
  ws = args.workspace
  low, high = args.holdout_fraction, round(args.holdout_fraction + args.val, 6)
  images = [f"--images={args.images}"]
  subsets = {
      "train": images + [f"--hash_range={high},1", "--num_shards=2"],
      "val": images + [f"--hash_range={low},{high}", "--num_shards=1"],
      "corpus": [f"--unlabeled_only={args.corpus}", "--num_shards=4"],
      "test": images + [f"--hash_range=0,{low}", "--num_shards=2"],
  }
  for subset, flags in subsets.items():
    folder = os.path.join(ws, "sources", subset)
    _job(f"2/9 sources ({subset})", folder,
         ["data_prep.ingest", f"--out={folder}"] + flags + beam_local(args.beam_workers),
         workspace=ws, key=f"sources/{subset}")


def folder_student_steps(train_images: int) -> int:
  """The distilled student's length on a folder: the main job's steps per labelled image."""
  return max(MIN_FOLDER_STEPS, round(DISTILL_STEPS * train_images / FASHION_LABELLED))


def _steps_suffix(args):
  """Workdirs of runs at a non-default length are named by it, so none is reused by mistake."""
  return "" if args.student_steps == DISTILL_STEPS else f"_s{args.student_steps}"


def _distill_student(args, name):
  runs = os.path.join(args.workspace, "runs")
  weights = MIXTURES[name]
  datasets = {d: f"distill/{d}" for d in weights}
  workdir = os.path.join(runs, "student_" + name.replace("+", "_") + _steps_suffix(args))
  stage = "7/9 student" if name == MAIN_MIXTURE else "ablation"
  _train(f"{stage} ({name})", "fashion_distill.gin", workdir, args,
         f"data.datasets={datasets!r}", f"data.weights={weights!r}",
         f"schedule.train_steps={args.student_steps}")
  return workdir


def _online_student(args):
  """The "patient and consistent" baseline: the teacher online, on the student's very batch."""
  workdir = os.path.join(args.workspace, "runs", f"student_online_s{args.student_steps}")
  _train(f"ablation ({ONLINE})", "fashion_online.gin", workdir, args,
         f"schedule.train_steps={args.student_steps}")
  return workdir


def _labels_control(args):
  """The label-only student trained as long as the distilled ones: is it the schedule?"""
  workdir = os.path.join(args.workspace, "runs", f"student_labels_s{args.student_steps}")
  _train(f"ablation ({LABELS_CONTROL})", "fashion_student.gin", workdir, args,
         f"schedule.train_steps={args.student_steps}")
  return workdir


def evaluate(keras_path, shards, resolution, batch=256):
  """Top-1 of a `.keras` model on source shards (whole images resized, as training evaluates)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mnv4_train.data import pipeline  # pylint: disable=import-outside-toplevel
  from mnv4_train.models import checkpoint  # pylint: disable=import-outside-toplevel
  model = checkpoint.load_model(keras_path, what="model", saved_model=False)
  ds, _ = pipeline.eval_dataset(shards, resolution=resolution, batch_size=batch,
                                crop_fraction=1.0)
  correct = total = 0
  for b in ds:
    logits = model(b["image"], training=False)
    correct += int(np.sum(np.argmax(logits, -1) == b["label"].numpy()))
    total += int(b["label"].shape[0])
  return correct / total, total


def _selection_figures(ws):
  """The relevance filter's figures: per-class counts and out-of-distribution images kept."""
  from mnv4_train.data import formats  # pylint: disable=import-outside-toplevel
  sel = os.path.join(ws, "selections", "d3")
  m = formats.D3Selection.read(sel, "the D3 selection")
  ood_kept = ood_records = 0
  for name in sorted(os.listdir(sel)):
    if name.startswith("selection-"):
      with open(os.path.join(sel, name)) as f:
        for line in f:
          row = json.loads(line)
          if row["id"].startswith("unlabeled/"):
            ood_kept += 1
            ood_records += row["copies"]
  corpus = formats.SourceShards.read(os.path.join(ws, "sources", "corpus"), "the corpus")
  ood = os.path.join(ws, "ood_digits")  # the main job's digits, mixed into its corpus
  ood_total = corpus.source.get("unlabeled_images") and os.path.isdir(ood) and sum(
      1 for c in os.listdir(ood) if c.isdigit() for _ in os.listdir(os.path.join(ood, c)))
  if not ood_total:  # a corpus of your own: nothing in it is known to be out of distribution
    ood_kept = ood_records = 0
  return {"corpus_images": corpus.num_examples, "ood_images": ood_total or 0,
          "relevance": "domain" if m.domain_filter else "paper",
          "domain_filter": m.domain_filter,
          "threshold": m.threshold, "per_class": m.per_class,
          "above_threshold": m.num_above_threshold,
          "above_threshold_per_class": m.above_threshold_per_class,
          "kept_per_class": m.selected_unique_per_class,
          "records_per_class": m.selected_total_per_class,
          "ood_kept": ood_kept, "ood_records": ood_records}


def run_fashion(args) -> dict:
  from mnv4_train.data import formats  # pylint: disable=import-outside-toplevel
  ws = args.workspace
  beam = beam_local(args.beam_workers)
  start = time.time()
  if args.dataset == "fashion_mnist":
    _fashion_sources(args)
  else:
    _folder_sources(args)
  train = formats.SourceShards.read(os.path.join(ws, "sources", "train"), "sources/train")
  if args.student_steps is None:  # a folder's: scaled to its training images
    args.student_steps = folder_student_steps(train.num_examples)
  runs = os.path.join(ws, "runs")
  _train("3/9 teacher", "fashion_teacher.gin", os.path.join(runs, "teacher"), args)
  _train("4/9 baseline", "fashion_student.gin", os.path.join(runs, "student_labels"), args)
  teacher = os.path.join(runs, "teacher", "export", "student.keras")
  relevance = os.path.join(runs, "student_labels", "export", "student.keras")
  corpus_size = formats.SourceShards.read(os.path.join(ws, "sources", "corpus"),
                                          "the corpus").num_examples
  per_class = args.per_class or max(100, int(round(corpus_size / train.num_classes, -2)))
  selection = os.path.join(ws, "selections", "d3")
  _check_relevance(selection, args.relevance)
  domain = ([f"--in_domain={ws}/sources/train", f"--in_domain_heldout={ws}/sources/val"]
            if args.relevance == "domain" else [])
  _job("5/9 d3 select", selection,
       ["data_prep.select_d3", f"--corpus={ws}/sources/corpus", f"--classifier={relevance}",
        f"--out={selection}", f"--per_class={per_class}", f"--threshold={args.threshold}",
        "--batch_size=256"] + domain + beam, workspace=ws, key="select_d3")
  for recipe in ("d1", "d2", "d3"):
    folder = os.path.join(ws, "distill", recipe)
    source = "corpus" if recipe == "d3" else "train"
    _job(f"6/9 {recipe}", folder,
         ["data_prep.distill", f"--recipe={recipe}", f"--source={ws}/sources/{source}",
          f"--teacher={teacher}", f"--out={folder}", f"--replicas={args.replicas[recipe]}",
          "--replicas_per_task=1", "--batch_size=256", f"--crop_area_min={args.crop_area_min}",
          f"--jpeg_quality={args.jpeg_quality}"]
         + ([f"--selection={selection}"] if recipe == "d3" else [])
         + ([f"--ra_magnitude={args.ra_magnitude}"] if args.ra_magnitude and recipe != "d2"
            else [])
         + (["--no_flip"] if args.flip == "no" else []) + beam, workspace=ws, key=recipe)
  main_run = _distill_student(args, MAIN_MIXTURE)
  export_dir = os.path.join(ws, "export")
  _job("8/9 export", export_dir,
       ["mnv4_train.export", "--model=conv_s", f"--checkpoint={main_run}/export/student.keras",
        f"--out={export_dir}", "--format=tflite_float32",
        f"--representative={ws}/sources/val/shard-*.tfrecord"],
       marker="export_report.json")
  ablation = {}
  if args.ablation:
    for name in MIXTURES:
      ablation[name] = (main_run if name == MAIN_MIXTURE
                        else _distill_student(args, name))
    ablation[ONLINE] = _online_student(args)
    ablation[LABELS_CONTROL] = _labels_control(args)
  _log("9/9 report")
  return fashion_report(args, [("teacher (Conv-S)", os.path.join(runs, "teacher")),
                               ("student, labels only (Conv-S x0.25)",
                                os.path.join(runs, "student_labels")),
                               ("student, distilled D1+D2+D3 1:1:2", main_run)],
                        export_dir, ablation, time.time() - start)


def fashion_report(args, runs, export_dir, ablation, seconds):
  from mnv4_train.data import formats  # pylint: disable=import-outside-toplevel
  ws = args.workspace
  test = os.path.join(ws, "sources", "test")
  times = _stage_times(ws)
  rows = []
  for label, workdir in runs + [(f"ablation {n}", w) for n, w in ablation.items()
                                if w not in [r[1] for r in runs]]:
    with open(os.path.join(workdir, "metrics.json")) as f:
      metrics = json.load(f)
    top1, n_test = evaluate(metrics["export"], test, args.resolution)
    params, macs, speed = measure(metrics["export"], args.resolution)
    rows.append({"model": label, "workdir": workdir, "top1": top1, "test_images": n_test,
                 "train_seconds": times.get(os.path.basename(workdir)),
                 "val_top1": metrics["top1"], "params": params, "macs": macs,
                 "images_per_second": speed, "steps": metrics.get("step"),
                 "curves": os.path.join(workdir, "curves.png")})
  by_workdir = {r["workdir"]: r for r in rows}
  export = {}
  report_path = os.path.join(export_dir, "export_report.json")
  if os.path.exists(report_path):
    with open(report_path) as f:
      export = json.load(f)
  sources = {}
  for subset in ("train", "val", "corpus", "test"):
    m = formats.SourceShards.read(os.path.join(ws, "sources", subset), f"sources/{subset}")
    sources[subset] = {"images": m.num_examples, "counts_per_class": m.counts_per_class,
                       "unlabeled": m.unlabeled, "unreadable_skipped": m.dead_letter}
  selection = _selection_figures(ws)
  table8 = [{"mixture": name, "top1": by_workdir[w]["top1"], "workdir": w,
             "train_seconds": by_workdir[w]["train_seconds"]} for name, w in ablation.items()]
  views = teacher_on_views(ws, ("d1", "d2", "d3"))
  out = {"workspace": ws, "dataset": args.dataset, "resolution": args.resolution,
         "sources": sources, "selection": selection, "runs": rows, "ablation": table8,
         "teacher_on_views": views,
         "teacher_clean_top1": {"test": rows[0]["top1"], "val": rows[0]["val_top1"]},
         "export": export, "wall_seconds": seconds, "stage_seconds": times,
         "curves": plot_eval(runs, ws, views, rows[0]["top1"])}
  if table8:
    out["ablation_png"] = plot_ablation(table8, rows[0]["top1"], rows[1]["top1"], ws)
  with open(os.path.join(ws, "report.json"), "w") as f:
    json.dump(out, f, indent=1)
  print()
  fashion = args.dataset == "fashion_mnist"
  ood = (f" ({selection['ood_images']} of them out-of-distribution digits)" if fashion else "")
  print(f"{'Fashion-MNIST' if fashion else args.images}: {sources['train']['images']} labelled "
        f"training images, {sources['val']['images']} validation, corpus of "
        f"{sources['corpus']['images']} unlabelled{ood}, {sources['test']['images']} test images")
  if not fashion:
    skipped = {k: v["unreadable_skipped"] for k, v in sources.items() if v["unreadable_skipped"]}
    print(f"{sum(skipped.values())} unreadable files skipped"
          + (f" ({', '.join(f'{k} {v}' for k, v in skipped.items())}; listed in "
             "sources/*/dead_letter.jsonl)" if skipped else ""))
  ood = (f"{selection['ood_kept']} of the {selection['ood_images']} digits made it into D3; "
         if fashion else "")
  kept_out = selection["domain_filter"] and (
      f", and the domain filter, which kept out {selection['domain_filter']['outside']}")
  print(f"D3 (relevance filter: the label-only student, > {selection['threshold']}"
        f"{kept_out or ''}): "
        f"{selection['above_threshold']} of {selection['corpus_images']} corpus images pass; "
        f"{ood}kept per class {selection['kept_per_class']} -> records per class after "
        f"replication {selection['records_per_class']}")
  print(f"{'model':<38}{'test top-1':>11}{'val top-1':>10}{'params':>10}{'MACs':>11}"
        f"{'images/s':>9}")
  for r in rows:
    print(f"{r['model']:<38}{100 * r['top1']:>10.2f}%{100 * r['val_top1']:>9.2f}%"
          f"{r['params']:>10,}{r['macs'] / 1e6:>9.2f} M{r['images_per_second']:>9.0f}")
  print_views(views, rows[0]["top1"], "test")
  if table8:
    print(f"Table 8 in miniature (same student, {args.student_steps} steps each; test top-1; "
          f"'{ONLINE}': the teacher run on each mixed-up batch instead of records; "
          f"'{LABELS_CONTROL}': no teacher, labels only):")
    for t in table8:
      took = t["train_seconds"]
      print(f"  {t['mixture']:<10}{100 * t['top1']:>7.2f}%"
            + (f"   trained in {took / 60:.1f} min" if took else ""))
  what = "official test images" if fashion else "held-out images of your folder"
  print(f"(test: the {sources['test']['images']} {what}, read only here; "
        f"images/s: batch 64 at {args.resolution} px on this CPU; curves: {out['curves']}; "
        f"all of it in {os.path.join(ws, 'report.json')}; {seconds / 60:.1f} min)")
  return out


def plot_ablation(table8, teacher, labels_only, ws):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(8, 3.8))
  names = [{LABELS_CONTROL: "labels only\n(same steps)", ONLINE: "online\nteacher"}.get(
      t["mixture"], t["mixture"].upper()) for t in table8]
  values = [100 * t["top1"] for t in table8]
  ax.bar(names, values, color=[{LABELS_CONTROL: "#bbbbbb", ONLINE: "#ee7733"}.get(
      t["mixture"], "#4477aa") for t in table8])
  ax.axhline(100 * teacher, color="#228833", ls="--", label=f"teacher {100 * teacher:.2f}%")
  ax.axhline(100 * labels_only, color="#cc3311", ls=":",
             label=f"labels only {100 * labels_only:.2f}%")
  low = min(values + [100 * labels_only]) - 2
  ax.set_ylim(low, max(values + [100 * teacher]) + 1)
  for i, v in enumerate(values):
    ax.text(i, v + 0.1, f"{v:.2f}", ha="center", fontsize=8)
  ax.set_ylabel("test top-1 (%)")
  ax.set_title("distilled student by dataset mixture (Table 8 in miniature)")
  ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  path = os.path.join(ws, "ablation.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv=None):
  # Before TensorFlow loads here (the report's measurements); the stages inherit it, and each
  # quiets itself too (with --verbose, neither: the stages get --verbose).
  cli.quiet_tensorflow(cli.wants_verbose(argv))
  with exit_on_user_error(PROG):
    try:
      run(argv)
    except KeyboardInterrupt:
      print(f"{PROG}: interrupted; run the same command again to resume (finished stages are "
            "kept, training resumes from its last checkpoint)", file=sys.stderr)
      sys.exit(130)


if __name__ == "__main__":
  run_then_exit(main)
