"""Seconds a main-job stage takes when forked from the stages' server, with and without the
server's AutoGraph warm-up (`mnv4_train/autograph_warm.py`).

    .venv/bin/python benchmarks/stage_start.py [--runs 3] [--images 200]

Data: `--images` of sklearn's digits at 32 px, ingested and distilled into D1 records with a
random-weight teacher (`trainer_vs_fit.digits_data`). Nothing is downloaded.

The stage: `python -m mnv4_train.main --gin_file=smoke.gin` (3 steps of Conv-S x0.25 distilled
from D1, an evaluation, a checkpoint and the export), forked from a fork server
(`mnv4_train.stages.start`), in a new workdir each run. Two rows, each in a process of its own
(a process has one fork server): the anchor, a server that imports the libraries only (`PRELOAD`
without `mnv4_train.stage_warmup`), and the server as the main job starts it, which also has
AutoGraph convert the graph code. Figures: the first stage's seconds (it waits for the server to
start), then the median over `--runs` stages after it, and the ratio anchor / warm (> 1: the
warm-up saves time). One thread per TensorFlow pool unless the environment says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def row(warm: bool, d1: str, source: str, runs: int, work: str) -> list[float]:
  """Seconds of 1 + `runs` smoke stages forked from a new server, in this process."""
  from mnv4_train import stages  # pylint: disable=import-outside-toplevel
  if not warm:
    stages.PRELOAD = tuple(m for m in stages.PRELOAD if m != "mnv4_train.stage_warmup")
  seconds = []
  for i in range(runs + 1):
    workdir = os.path.join(work, f"{'warm' if warm else 'cold'}{i}")
    args = ["--gin_file=smoke.gin", f"--workdir={workdir}",
            f"--gin_bindings=data.datasets={{'d1': '{d1}'}}",
            f"--gin_bindings=data.eval_data='{source}'"]
    start = time.time()
    process = stages.start("mnv4_train.main", args, output=(workdir + ".out", workdir + ".err"))
    process.join()
    if process.exitcode:
      sys.exit(f"the stage failed ({process.exitcode}): see {workdir}.err")
    seconds.append(time.time() - start)
  return seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--images", type=int, default=200)
  parser.add_argument("--row", choices=["cold", "warm"], help=argparse.SUPPRESS)
  parser.add_argument("--data", nargs=2, help=argparse.SUPPRESS)
  parser.add_argument("--work", help=argparse.SUPPRESS)
  args = parser.parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if args.row:  # one row, in its own process
    print(json.dumps(row(args.row == "warm", args.data[1], args.data[0], args.runs, args.work)))
    return
  for pool in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ.setdefault(pool, "1")
  work = tempfile.mkdtemp(prefix="stage_start-")
  import trainer_vs_fit  # pylint: disable=import-outside-toplevel
  print(f"building {args.images} digits' source shards and D1 records in {work} ...")
  source, d1 = trainer_vs_fit.digits_data(work, args.images, 32)
  results = {}
  for name in ("cold", "warm"):
    out = subprocess.run([sys.executable, __file__, f"--row={name}", "--data", source, d1,
                          f"--work={work}", f"--runs={args.runs}"], check=True,
                         capture_output=True, text=True).stdout
    results[name] = json.loads(out.strip().splitlines()[-1])
  for name, label in (("cold", "server imports only (anchor)"),
                      ("warm", "server with the AutoGraph warm-up")):
    first, rest = results[name][0], statistics.median(results[name][1:])
    print(f"{label:36s} first stage {first:5.1f} s, then median {rest:5.1f} s")
  ratio = statistics.median(results["cold"][1:]) / statistics.median(results["warm"][1:])
  print(f"stage seconds, anchor / warm: {ratio:.2f}x")


if __name__ == "__main__":
  main()
