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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISTILL_EPOCHS = 80  # digits_distill.gin


def _run(*argv):
  subprocess.run([sys.executable, "-m", *argv], cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def training_folder(root: str) -> str:
  """The digits the quick path trains on, under new names (new ids, so a new hash split)."""
  folder = os.path.join(root, "training_digits")
  if os.path.exists(os.path.join(folder, ".complete")):
    return folder
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  images, ids = os.path.join(root, "digits"), os.path.join(root, "training_ids")
  for path in (images, ids, folder):
    shutil.rmtree(path, ignore_errors=True)
  _run("data_prep.digits", f"--out={images}")
  _run("data_prep.ingest", f"--images={images}", f"--out={ids}", "--num_shards=1",
       "--holdout_fraction=0.2", "--subset=train")
  for record in tf.data.TFRecordDataset(sorted(glob.glob(os.path.join(ids, "shard-*")))):
    example = tf.train.Example.FromString(record.numpy())
    rel = example.features.feature["image/id"].bytes_list.value[0].decode()
    label, name = os.path.split(rel)
    os.makedirs(os.path.join(folder, label), exist_ok=True)
    shutil.copy(os.path.join(images, rel), os.path.join(folder, label, "v" + name))
  open(os.path.join(folder, ".complete"), "w").close()
  return folder


def _metrics(workdir: str) -> dict:
  with open(os.path.join(workdir, "metrics.json")) as f:
    return json.load(f)


def setting(root: str, folder: str, epochs: float, seeds: list[int]) -> dict:
  """One row: the quick path at `epochs`, then 80-epoch distilled students, one per seed."""
  ws = os.path.join(root, f"epochs{epochs:g}")
  _run("mnv4_train.demo", f"--images={folder}", "--flip=no", f"--workspace={ws}",
       f"--epochs={epochs}", "--beam_workers=1")
  with open(os.path.join(ws, "stage_times.json")) as f:
    seconds = json.load(f)
  runs = {name: {"top1": _metrics(os.path.join(ws, "runs", name))["top1"],
                 "seconds": seconds.get(name)}
          for name in ("teacher", "student_labels", "student_distill")}
  distilled = []
  for seed in seeds:
    workdir = os.path.join(ws, "runs", f"distill{DISTILL_EPOCHS}_seed{seed}")
    if not os.path.exists(os.path.join(workdir, "metrics.json")):
      _run("mnv4_train.main", "--gin_file=digits_distill.gin", f"--workdir={workdir}",
           f"--gin_bindings=data.root='{ws}'", "--gin_bindings=student.resolution=32",
           f"--gin_bindings=runtime.seed={seed}")
    m = _metrics(workdir)
    distilled.append({"seed": seed, "top1": m["top1"], "seconds": m.get("seconds")})
  return {"epochs": epochs, "validation_images": _metrics(
      os.path.join(ws, "runs", "teacher"))["examples"], "runs": runs,
          f"distilled_{DISTILL_EPOCHS}": distilled}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workspace", required=True)
  parser.add_argument("--epochs", type=float, nargs="+", default=[30, 15])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  args = parser.parse_args()
  os.makedirs(args.workspace, exist_ok=True)
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
