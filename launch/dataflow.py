"""Run a data_prep Beam job on Dataflow, with GPU workers for the teacher when asked.

    python -m launch.dataflow JOB --project P --region R --temp_location gs://B/tmp \\
        [--sdk_container_image IMAGE] [--gpu_type nvidia-tesla-t4 [--gpus 1]] [--dry_run] \\
        -- JOB_FLAGS [EXTRA_BEAM_OPTIONS]

JOB is `ingest`, `select_d3` or `distill`; everything after `--` goes to `python -m
data_prep.JOB` unchanged, followed by the DataflowRunner options this script adds. Further Beam
options (`--machine_type`, `--max_num_workers`, `--job_name`, ...) go after `--` too. Paths the
workers read or write (`--out`, `--source`, `--teacher`, ...) must be gs:// paths.

One writer per output: unless `--job_name` is given, the job is named after its `--out`
(`mnv4-<job>-<hash of --out>`), and Dataflow refuses a second active job of the same name in a
region, so two launches on the same output cannot run at once.

The workers need this project. Two ways to ship it:
  - `--sdk_container_image IMAGE`: an image built from `launch/Dockerfile.dataflow` (Beam's SDK
    image with this project and TensorFlow with CUDA installed); nothing is staged. GPU workers
    need it: Dataflow installs the NVIDIA driver on the host, the CUDA libraries come from the
    image.
  - otherwise this checkout is built into a wheel (`pip wheel --no-deps`, into dist/) and staged
    with `--extra_package`; every worker pip-installs it, with its pinned dependencies, when it
    starts (minutes per worker; the default worker image is Beam's SDK image for the local
    Python and Beam versions).

GPU workers (`--gpu_type`, for the jobs that run a model: select_d3's classifier and distill's
teacher) add `--dataflow_service_options=worker_accelerator=type:T;count:N;install-nvidia-driver`
and Runner v2. T4 GPUs attach to the default N1 workers; L4 needs `--machine_type=g2-standard-4`
(or larger) after `--`, A100 an a2 machine type.
"""

from __future__ import annotations

import configparser
import hashlib
import importlib.util
import os
import re
import sys

from launch.common import ROOT, Command, Runner
from mnv4_train.errors import ArgumentParser, ConfigError, UserError, exit_on_user_error

PROG = "launch.dataflow"
# job -> whether it runs a model (and so can use GPU workers)
JOBS = {"ingest": False, "select_d3": True, "distill": True}
# Flags of the jobs that name a path the workers read or write.
PATH_FLAGS = ("--out", "--images", "--tfrecords", "--tfds_dir", "--tfds_data_dir",
              "--tfds_manual_dir", "--corpus", "--classifier", "--source", "--teacher",
              "--selection")
# Pipeline options this script sets; the job flags must not set them again.
OWN_OPTIONS = ("--runner", "--project", "--region", "--temp_location", "--sdk_container_image",
               "--extra_package", "--extra_packages")


def parse_args(argv):
  argv = list(sys.argv[1:] if argv is None else argv)
  split = argv.index("--") if "--" in argv else len(argv)
  parser = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  parser.add_argument("job", choices=sorted(JOBS), help="the data_prep job to run")
  parser.add_argument("--project", required=True, help="GCP project")
  parser.add_argument("--region", required=True, help="Dataflow region, e.g. us-central1")
  parser.add_argument("--temp_location", required=True, help="gs:// folder for Dataflow's files")
  parser.add_argument("--sdk_container_image", default=None,
                      help="worker image built from launch/Dockerfile.dataflow (needed for GPUs)")
  parser.add_argument("--gpu_type", default=None,
                      help="GPU per worker for select_d3 / distill, e.g. nvidia-tesla-t4")
  parser.add_argument("--gpus", type=int, default=1, help="GPUs per worker (with --gpu_type)")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  args = parser.parse_args(argv[:split])
  args.job_flags = argv[split + 1:]
  return args


def _flag_values(flags: list[str], name: str):
  for i, flag in enumerate(flags):
    if flag == name and i + 1 < len(flags):
      yield flags[i + 1]
    elif flag.startswith(name + "="):
      yield flag[len(name) + 1:]


def job_name(job: str, job_flags: list[str]) -> str:
  """The Dataflow job name of a job writing `--out`: the same for the same output, so Dataflow
  itself refuses a second active job on it (it allows one active job per name and region)."""
  out = next(_flag_values(job_flags, "--out"), "").rstrip("/")
  digest = hashlib.sha1(out.encode()).hexdigest()[:12]
  return f"mnv4-{job.replace('_', '-')}-{digest}"


def wheel_name() -> str:
  """The file `pip wheel` makes of this checkout (a pure-Python wheel named by setup.cfg)."""
  meta = configparser.ConfigParser()
  meta.read(os.path.join(ROOT, "setup.cfg"))
  name = re.sub(r"[-_.]+", "_", meta["metadata"]["name"])
  return f"{name}-{meta['metadata']['version']}-py3-none-any.whl"


def plan(args) -> list[Command]:
  """The commands of a launch: maybe building the wheel, then the job itself."""
  for name in OWN_OPTIONS:
    if any(flag == name or flag.startswith(name + "=") for flag in args.job_flags):
      raise ConfigError(f"{PROG} sets {name} itself; drop it from the job flags after --")
  paths = [("--temp_location", args.temp_location)]
  paths += [(name, value) for name in PATH_FLAGS for value in _flag_values(args.job_flags, name)]
  for name, value in paths:
    if not value.startswith("gs://"):
      raise ConfigError(f"{name} {value} is not a gs:// path; Dataflow workers cannot reach "
                        "local files")
  options = ["--runner=DataflowRunner", f"--project={args.project}", f"--region={args.region}",
             f"--temp_location={args.temp_location}"]
  commands = []
  if args.sdk_container_image:
    options += [f"--sdk_container_image={args.sdk_container_image}"]
  else:
    wheel_dir = os.path.join(ROOT, "dist")
    commands.append(Command([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                             f"--wheel-dir={wheel_dir}", ROOT], "build the project's wheel"))
    options += [f"--extra_package={os.path.join(wheel_dir, wheel_name())}"]
  if args.gpu_type:
    if not JOBS[args.job]:
      raise ConfigError(f"{args.job} runs no model; drop --gpu_type")
    if args.gpus < 1:
      raise ConfigError(f"--gpus must be >= 1, got {args.gpus}")
    if not args.sdk_container_image:
      raise ConfigError("GPU workers need --sdk_container_image (an image with CUDA, built from "
                        "launch/Dockerfile.dataflow; see launch/README.md)")
    options += [f"--dataflow_service_options=worker_accelerator=type:{args.gpu_type};"
                f"count:{args.gpus};install-nvidia-driver"]
  if args.gpu_type or args.sdk_container_image:
    options += ["--experiments=use_runner_v2"]  # custom containers and GPUs need Runner v2
  if not any(f == "--job_name" or f.startswith("--job_name=") for f in args.job_flags):
    options += [f"--job_name={job_name(args.job, args.job_flags)}"]
  commands.append(Command([sys.executable, "-m", f"data_prep.{args.job}", *args.job_flags,
                           *options], f"run data_prep.{args.job} on Dataflow"))
  return commands


def main(argv=None) -> int:
  args = parse_args(argv)
  with exit_on_user_error(PROG):
    commands = plan(args)
    if not args.dry_run and importlib.util.find_spec("apitools") is None:
      raise UserError("the DataflowRunner needs the gcp extra in this environment: "
                      "pip install -e \".[gcp]\"")
    runner = Runner(args.dry_run)
    for command in commands:
      runner.run(command)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
