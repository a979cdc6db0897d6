"""How many epochs the digits quick path's teacher and label-only student train: a validation
split's answer.

    TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 \\
        .venv/bin/python benchmarks/digits_epochs.py --workspace workspace/digits_epochs

The validation split: the 1,454 digits that `python -m mnv4_train.demo --dataset digits` trains
on (its held-out 20% is left out and never read here), copied into a folder under new names.
The quick path's own 20% id-hash hold-out of that folder (`--images`, no flips, as on digits) is
then a validation split carved from the training digits: 1,174 images to train, 280 to
validate.

For each of `--epochs` (default 30 and 15), in a workspace of its own: the quick path with
`--epochs E` (teacher, label-only student, D1 + D2 from that teacher, a student distilled E
epochs), then students distilled for digits_distill.gin's 80 epochs from the same records, one
per `--seeds` (default 0 and 1). Prints a table of validation top-1 with each training run's
seconds, and writes digits_epochs.json into the workspace. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from own_folder import run_demo  # noqa: E402  pylint: disable=wrong-import-position

DISTILL_EPOCHS = 80  # digits_distill.gin


def _run(*argv):
  """`python -m argv`, its output not shown; a failure stops the script with one line."""
  proc = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, check=False,
                        stdout=subprocess.DEVNULL)
  if proc.returncode:
    sys.exit(f"digits_epochs: {argv[0]} failed (exit status {proc.returncode}); see above")


def training_folder(root: str) -> str:
  """The digits the quick path trains on, under new names (new ids, so a new hash split), in
  `root`/training_digits: built once (`.complete`) in a staging folder of its own, which is all
  this removes; a `training_digits` it did not finish is refused, never replaced."""
  folder = os.path.join(root, "training_digits")
  if os.path.exists(os.path.join(folder, ".complete")):
    return folder
  if os.path.exists(folder):
    sys.exit(f"digits_epochs: {folder} exists and is not a folder this script finished; move "
             "it away or give another --workspace")
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  os.makedirs(root, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".training_digits-", dir=root)
  try:
    images, ids, built = (os.path.join(staging, name) for name in ("digits", "ids", "built"))
    _run("data_prep.digits", f"--out={images}")
    _run("data_prep.ingest", f"--images={images}", f"--out={ids}", "--num_shards=1",
         "--holdout_fraction=0.2", "--subset=train")
    for record in tf.data.TFRecordDataset(sorted(glob.glob(os.path.join(ids, "shard-*")))):
      example = tf.train.Example.FromString(record.numpy())
      rel = example.features.feature["image/id"].bytes_list.value[0].decode()
      label, name = os.path.split(rel)
      os.makedirs(os.path.join(built, label), exist_ok=True)
      shutil.copy(os.path.join(images, rel), os.path.join(built, label, "v" + name))
    open(os.path.join(built, ".complete"), "w").close()
    os.rename(built, folder)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return folder


def setting(root: str, folder: str, epochs: float, seeds: list[int]) -> dict:
  """One row: the quick path at `epochs`, then 80-epoch distilled students, one per seed."""
  ws = os.path.join(root, f"epochs{epochs:g}")
  report = run_demo(f"{epochs:g} epochs", ws, [f"--images={folder}", "--flip=no",
                                               f"--epochs={epochs}", "--beam_workers=1"])
  with open(os.path.join(ws, "stage_times.json")) as f:
    seconds = json.load(f)
  runs = {name: {"top1": run["top1"], "seconds": seconds.get(name)}
          for run in report["runs"] for name in [os.path.basename(run["workdir"])]}
  distilled = []
  for seed in seeds:
    workdir = os.path.join(ws, "runs", f"distill{DISTILL_EPOCHS}_seed{seed}")
    metrics = os.path.join(workdir, "metrics.json")
    if not os.path.exists(metrics):
      _run("mnv4_train.main", "--gin_file=digits_distill.gin", f"--workdir={workdir}",
           f"--gin_bindings=data.root='{ws}'", "--gin_bindings=student.resolution=32",
           f"--gin_bindings=runtime.seed={seed}")
    with open(metrics) as f:
      distilled.append({"seed": seed, "top1": json.load(f)["top1"]})
  return {"epochs": epochs, "validation_images": report["sources"]["holdout"]["images"],
          "runs": runs, f"distilled_{DISTILL_EPOCHS}": distilled}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workspace", required=True)
  parser.add_argument("--epochs", type=float, nargs="+", default=[30, 15])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  args = parser.parse_args()
  folder = training_folder(args.workspace)
  rows = [setting(args.workspace, folder, e, args.seeds) for e in args.epochs]
  with open(os.path.join(args.workspace, "digits_epochs.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print(f"validation top-1 ({rows[0]['validation_images']} images carved from the training "
        "digits); seconds of each training run")
  print(f"{'epochs':>6}  {'teacher':>14}  {'labels only':>14}  {'distilled E':>14}  "
        f"distilled {DISTILL_EPOCHS}, seeds {' / '.join(map(str, args.seeds))}")
  for row in rows:
    cells = [f"{100 * r['top1']:6.2f}% {r['seconds'] or 0:5.0f} s"
             for r in (row["runs"][k] for k in ("teacher", "student_labels", "student_distill"))]
    far = " / ".join(f"{100 * d['top1']:.2f}%" for d in row[f"distilled_{DISTILL_EPOCHS}"])
    print(f"{row['epochs']:>6g}  {cells[0]:>14}  {cells[1]:>14}  {cells[2]:>14}  {far}")


if __name__ == "__main__":
  main()
