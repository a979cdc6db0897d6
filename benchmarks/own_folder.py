"""Does distillation pay on your own folder? The main job's two paths on a second real dataset.

    .venv/bin/python benchmarks/own_folder.py --workspace workspace/own_folder

The dataset is built from Fashion-MNIST's official test split (10,000 real product photos the
main job never trains on): `--per_class` (300) images of each class, the first in file order,
as a labelled folder `folder/<class name>/<index>.png`, and the other images as an unlabelled
corpus in nested folders `corpus/part<k>/<index>.png` (by position, so a folder says nothing of
a class). Then the main job runs twice on the same folder, as a user would:

  quick   `python -m mnv4_train.demo --images folder`: the quick path (D1 + D2 from the
          teacher, the digits recipes)
  corpus  `... --images folder --corpus corpus`: the section-8 path (D3 selected from the
          corpus by the relevance filter, D1:D2:D3 = 1:1:2, the main job's recipes)

Both hold out the same images (a stable id hash, `--holdout_fraction` 0.2) and report every
model's top-1 on them; the corpus path also reports its validation split (0.1 of the folder),
which every choice was made on. Writes own_folder.json and own_folder.png into the workspace.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from data_prep import fashion_mnist  # noqa: E402


def build_folders(root: str, per_class: int) -> dict:
  """The labelled folder and the corpus from the official test split (once; `.complete`)."""
  marker = os.path.join(root, ".complete")
  if os.path.exists(marker):
    with open(marker) as f:
      return json.load(f)
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  images, labels = fashion_mnist.load("test")
  taken = np.zeros(len(fashion_mnist.CLASS_NAMES), int)
  counts = {"folder": 0, "corpus": 0}
  for i, (image, label) in enumerate(zip(images, labels)):
    if taken[label] < per_class:
      taken[label] += 1
      path = os.path.join(root, "folder", fashion_mnist.CLASS_NAMES[label], f"{i:05d}.png")
      counts["folder"] += 1
    else:
      path = os.path.join(root, "corpus", f"part{i // 1000}", f"{i:05d}.png")
      counts["corpus"] += 1
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path)
  with open(marker, "w") as f:
    json.dump(counts, f)
  return counts


def run_demo(name: str, ws: str, flags: list[str]) -> dict:
  start = time.time()
  print(f"[{name}] python -m mnv4_train.demo {' '.join(flags)}", flush=True)
  proc = subprocess.run([sys.executable, "-m", "mnv4_train.demo", f"--workspace={ws}", *flags],
                        cwd=REPO, check=False)
  if proc.returncode:
    sys.exit(f"own_folder: the {name} run failed (exit status {proc.returncode}); see above")
  with open(os.path.join(ws, "report.json")) as f:
    report = json.load(f)
  report["benchmark_seconds"] = time.time() - start
  return report


def plot(rows, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 3.8))
  names = ["teacher", "labels only", "distilled"]
  width = 0.38
  for k, (path_name, row) in enumerate(rows.items()):
    values = [100 * row[n] for n in names]
    xs = [i + (k - 0.5) * width for i in range(len(names))]
    ax.bar(xs, values, width,
           label=f"{path_name} (student {row['student_params'] / 1e6:.2f} M parameters)")
    for x, v in zip(xs, values):
      ax.text(x, v + 0.2, f"{v:.2f}", ha="center", fontsize=8)
  ax.set_xticks(range(len(names)), names)
  low = min(100 * r[n] for r in rows.values() for n in names) - 3
  ax.set_ylim(low, max(100 * r["teacher"] for r in rows.values()) + 6)
  ax.set_ylabel("held-out top-1 (%)")
  ax.set_title("your folder: the quick path against the path with a corpus")
  ax.legend(loc="upper right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workspace", default="workspace/own_folder")
  parser.add_argument("--per_class", type=int, default=300,
                      help="labelled images per class in the folder (the rest is the corpus)")
  parser.add_argument("--beam_workers", type=int, default=2)
  args = parser.parse_args(argv)
  if fashion_mnist.locate("test") is None:
    sys.exit(f"own_folder: Fashion-MNIST is not installed; {fashion_mnist.HOW_TO_GET}")
  ws = os.path.abspath(args.workspace)
  data = os.path.join(ws, "data")
  counts = build_folders(data, args.per_class)
  folder, corpus = os.path.join(data, "folder"), os.path.join(data, "corpus")
  beam = [f"--beam_workers={args.beam_workers}"]
  reports = {
      "quick": run_demo("quick", os.path.join(ws, "quick"), [f"--images={folder}"] + beam),
      "corpus": run_demo("corpus", os.path.join(ws, "corpus"),
                         [f"--images={folder}", f"--corpus={corpus}"] + beam),
  }
  rows = {}
  for name, report in reports.items():
    teacher, labels, distilled = report["runs"][:3]
    rows[name] = {"teacher": teacher["top1"], "labels only": labels["top1"],
                  "distilled": distilled["top1"],
                  "gain": distilled["top1"] - labels["top1"],
                  "student_params": distilled["params"],
                  "test_images": teacher.get("test_images",
                                             report["sources"].get("holdout", {}).get("images")),
                  "val": ({"teacher": teacher["val_top1"], "labels only": labels["val_top1"],
                           "distilled": distilled["val_top1"]} if "val_top1" in teacher
                          else None),
                  "minutes": report["benchmark_seconds"] / 60}
  out = {"folder_images": counts["folder"], "corpus_images": counts["corpus"], "paths": rows}
  with open(os.path.join(ws, "own_folder.json"), "w") as f:
    json.dump(out, f, indent=1)
  plot(rows, os.path.join(ws, "own_folder.png"))
  print(f"\nFashion-MNIST test split as your folder: {counts['folder']} labelled images, a corpus "
        f"of {counts['corpus']}; held-out top-1 ({rows['quick']['test_images']} images):")
  print(f"{'path':<8}{'teacher':>9}{'labels only':>13}{'distilled':>11}{'gain':>8}"
        f"{'student params':>16}{'minutes':>9}")
  for name, r in rows.items():
    print(f"{name:<8}{100 * r['teacher']:>8.2f}%{100 * r['labels only']:>12.2f}%"
          f"{100 * r['distilled']:>10.2f}%{100 * r['gain']:>+7.2f}{r['student_params']:>16,}"
          f"{r['minutes']:>9.1f}")
  val = rows["corpus"]["val"]
  print(f"corpus path on its validation split: teacher {100 * val['teacher']:.2f}%, labels only "
        f"{100 * val['labels only']:.2f}%, distilled {100 * val['distilled']:.2f}%")
  print(f"(all of it in {os.path.join(ws, 'own_folder.json')}; {os.path.join(ws, 'own_folder.png')})")


if __name__ == "__main__":
  main()
