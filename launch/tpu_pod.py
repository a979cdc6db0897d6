"""Train on a Cloud TPU VM slice: create it, ship this checkout, run the trainer, delete it.

    python -m launch.tpu_pod --name N --zone Z --accelerator_type v4-32 \\
        --gin_file conv_l_distill.gin --workdir gs://BUCKET/runs/x [--gin_bindings B]... \\
        [--project P] [--runtime_version V] [--spot] [--keep] [--ref HEAD] [--dry_run]

Steps, each printed as `$ command` (all of them, and nothing else, with `--dry_run`):
  1. `git archive` the commit `--ref` (default HEAD) of this checkout: what runs on the slice is
     exactly a commit, gin_configs/ included; uncommitted changes are not shipped.
  2. `gcloud compute tpus tpu-vm create` the slice.
  3. copy the archive to every worker and `pip install -e` it there (the project's pinned
     dependencies; the runtime image's TensorFlow is the version setup.cfg pins, so pip keeps it).
  4. run `python3 -m mnv4_train.main` from the unpacked checkout; its output streams back
     through ssh.
  5. delete the slice, also when a step failed or was interrupted; `--keep` keeps it.

How TensorFlow runs on a slice (the Cloud TPU TensorFlow runtimes):
  - one host (v2-8, v3-8, v4-8, v5litepod-8 and smaller; the number after the dash is at most
    8): runtime `tpu-vm-tf-2.20.0-pjrt`; the trainer runs on that host with
    `runtime.tpu="local"` and the PJRT device plugin (`TF_PLUGGABLE_DEVICE_LIBRARY_PATH`).
  - several hosts (v4-32, ...): runtime `tpu-vm-tf-2.20.0-pod-pjrt`, which starts a TensorFlow
    server on every host. TensorFlow drives a pod from one client: the trainer runs on worker
    0 only, with `runtime.tpu="<name>"` (TPUClusterResolver finds the pod's hosts by name) and
    `TPU_LOAD_LIBRARY=0` (the client leaves the local chips to that host's server). The input
    pipeline is placed on every host's CPU by TPUStrategy; the other hosts get the project
    installed too, so any of them can be logged into and used alike.
`--workdir` must be a gs:// path: the TPU hosts read and write checkpoints there.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

from launch.common import ROOT, Command, Runner, gin_bindings_flags
from mnv4_train.errors import ArgumentParser, ConfigError, exit_on_user_error

PROG = "launch.tpu_pod"
TF_VERSION = "2.20.0"  # the TensorFlow that setup.cfg pins; the runtime image must match it
REMOTE_DIR = "mnv4-distill"
# A chip count at most this (cores for v2/v3/v4/v5p, chips for v5e/v6e) fits on one host.
ONE_HOST_MAX = 8


def parse_args(argv):
  parser = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  parser.add_argument("--name", required=True, help="TPU name (created, then deleted)")
  parser.add_argument("--zone", required=True, help="e.g. us-central2-b")
  parser.add_argument("--accelerator_type", required=True, help="e.g. v4-32, v5litepod-16")
  parser.add_argument("--runtime_version", default=None,
                      help=f"TPU software version (default: tpu-vm-tf-{TF_VERSION}-pod-pjrt for "
                           f"several hosts, tpu-vm-tf-{TF_VERSION}-pjrt for one)")
  parser.add_argument("--gin_file", required=True, help="a gin file in gin_configs/, by name")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="extra gin binding (repeatable)")
  parser.add_argument("--workdir", required=True, help="gs:// folder for checkpoints and logs")
  parser.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
  parser.add_argument("--spot", action="store_true", help="create a Spot slice")
  parser.add_argument("--keep", action="store_true", help="do not delete the slice at the end")
  parser.add_argument("--ref", default="HEAD", help="commit of this checkout to ship")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  return parser.parse_args(argv)


def num_hosts(accelerator_type: str) -> int:
  match = re.fullmatch(r"v[0-9a-z]+-([0-9]+)", accelerator_type)
  if not match:
    raise ConfigError(f"--accelerator_type {accelerator_type} is not a TPU type like v4-32 "
                      "or v5litepod-16")
  return max(1, -(-int(match.group(1)) // ONE_HOST_MAX))


def plan(args) -> dict[str, Command]:
  """Every command of a launch, by step: archive, create, copy, install, train, delete."""
  if not args.workdir.startswith("gs://"):
    raise ConfigError(f"--workdir {args.workdir} must be a gs:// path: the TPU hosts write "
                      "checkpoints there")
  pod = num_hosts(args.accelerator_type) > 1
  runtime = args.runtime_version or f"tpu-vm-tf-{TF_VERSION}-{'pod-' if pod else ''}pjrt"
  where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
  tpu_vm = ["gcloud", "compute", "tpus", "tpu-vm"]
  archive = os.path.join(tempfile.gettempdir(), f"{REMOTE_DIR}-{args.name}.tar.gz")
  remote_archive = f"{REMOTE_DIR}.tar.gz"

  if pod:
    env = {"TPU_LOAD_LIBRARY": "0"}
    bindings = {"runtime.distribution": "tpu", "runtime.tpu": args.name}
  else:
    env = {"NEXT_PLUGGABLE_DEVICE_USE_C_API": "true",
           "TF_PLUGGABLE_DEVICE_LIBRARY_PATH": "/lib/libtpu.so"}
    bindings = {"runtime.distribution": "tpu", "runtime.tpu": "local"}
  trainer = Command(["python3", "-m", "mnv4_train.main", f"--gin_file={args.gin_file}",
                     f"--workdir={args.workdir}",
                     *gin_bindings_flags(bindings, args.gin_bindings, PROG)], "train", env)
  install = (f"rm -rf {REMOTE_DIR} && tar -xzf {remote_archive} && "
             f"python3 -m pip install -q -e ./{REMOTE_DIR}")
  return {
      "archive": Command(["git", "-C", ROOT, "archive", "--format=tar.gz",
                          f"--prefix={REMOTE_DIR}/", f"--output={archive}", args.ref],
                         f"archive {args.ref} of this checkout"),
      "create": Command([*tpu_vm, "create", args.name, *where,
                         f"--accelerator-type={args.accelerator_type}", f"--version={runtime}",
                         *(["--spot"] if args.spot else [])], f"create TPU {args.name}"),
      "copy": Command([*tpu_vm, "scp", archive, f"{args.name}:{remote_archive}", *where,
                       "--worker=all"], "copy the checkout to the TPU workers"),
      "install": Command([*tpu_vm, "ssh", args.name, *where, "--worker=all",
                          "--command", install], "install the project on the TPU workers"),
      "train": Command([*tpu_vm, "ssh", args.name, *where, "--worker=0",
                        "--command", f"cd {REMOTE_DIR} && {trainer.line()}"],
                       "train on the TPU"),
      "delete": Command([*tpu_vm, "delete", args.name, *where, "--quiet"],
                        f"delete TPU {args.name}"),
  }


def launch(args, runner: Runner) -> None:
  steps = plan(args)
  runner.run(steps["archive"])
  runner.run(steps["create"])
  try:
    for step in ("copy", "install", "train"):
      runner.run(steps[step])
  finally:
    if args.keep:
      runner.note(f"kept TPU {args.name}; delete it with: {steps['delete'].line()}")
    else:
      runner.run(steps["delete"])


def main(argv=None) -> int:
  args = parse_args(argv)
  with exit_on_user_error(PROG):
    launch(args, Runner(args.dry_run))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
