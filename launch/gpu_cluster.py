"""Train on several GPU hosts with MultiWorkerMirroredStrategy: one trainer and TF_CONFIG per host.

    python -m launch.gpu_cluster --hosts h1,h2[:PORT],... [--port 2222] \\
        --gin_file conv_l_distill.gin --workdir gs://BUCKET/runs/x [--gin_bindings B]... \\
        [--ssh] [--remote_dir DIR] [--python PY] [--dry_run]

Worker i runs `python -m mnv4_train.main --gin_file=... --workdir=...
--gin_bindings=runtime.distribution="multiworker"` with
`TF_CONFIG={"cluster":{"worker":["h1:2222",...]},"task":{"type":"worker","index":i}}`; worker
0 is the chief. A host given as `host:port` keeps its own port (two workers on one machine
need two ports: `--hosts localhost:2222,localhost:2223`).

With `--ssh` each command runs on its host through `ssh -tt HOST` (the project installed there,
in `--remote_dir` if given, relative to the home directory or absolute; `--python` defaults to
python3); without it every worker runs on this machine (`--python` defaults to this
interpreter), which is how a loopback cluster is tested. The workers run at once, every output line prefixed with `[worker i]`; when one fails the
others are stopped and the launch fails. Every worker writes to the same `--workdir`, which
must be shared storage (gs://, or a shared filesystem) when the hosts differ.
"""

from __future__ import annotations

import json
import shlex
import sys

from launch.common import Command, Runner, gin_bindings_flags
from mnv4_train.errors import ArgumentParser, ConfigError, exit_on_user_error

PROG = "launch.gpu_cluster"


def parse_args(argv):
  parser = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  parser.add_argument("--hosts", required=True,
                      help="comma-separated worker hosts, each optionally host:port")
  parser.add_argument("--port", type=int, default=2222, help="port of hosts given without one")
  parser.add_argument("--gin_file", required=True, help="a gin file in gin_configs/, by name")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="extra gin binding (repeatable)")
  parser.add_argument("--workdir", required=True, help="checkpoints and logs, shared by workers")
  parser.add_argument("--ssh", action="store_true", help="run each worker on its host via ssh")
  parser.add_argument("--remote_dir", default=None, help="with --ssh: cd here before running")
  parser.add_argument("--python", default=None,
                      help="interpreter (default: python3 with --ssh, else this one)")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  return parser.parse_args(argv)


def cluster(hosts: str, port: int) -> list[str]:
  """`host:port` of every worker, in order."""
  workers = []
  for host in (h.strip() for h in hosts.split(",")):
    name, _, own_port = host.partition(":")
    if not name or (own_port and not own_port.isdigit()):
      raise ConfigError(f"--hosts entry {host!r} is not host or host:port")
    workers.append(f"{name}:{own_port or port}")
  if len(set(workers)) != len(workers):
    raise ConfigError(f"--hosts names a worker address twice ({','.join(workers)}); give "
                      "workers on one host different ports (host:port)")
  return workers


def tf_config(workers: list[str], index: int) -> str:
  return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}},
                    separators=(",", ":"))


def plan(args) -> list[Command]:
  """One command per worker, in worker order."""
  workers = cluster(args.hosts, args.port)
  python = args.python or ("python3" if args.ssh else sys.executable)
  bindings = gin_bindings_flags({"runtime.distribution": "multiworker"}, args.gin_bindings, PROG)
  commands = []
  for i, worker in enumerate(workers):
    trainer = Command([python, "-m", "mnv4_train.main", f"--gin_file={args.gin_file}",
                       f"--workdir={args.workdir}", *bindings], f"run worker {i}",
                      {"TF_CONFIG": tf_config(workers, i)})
    if args.ssh:
      remote = trainer.line()
      if args.remote_dir:  # ssh starts in the home directory: "~/x" is "x"
        remote_dir = args.remote_dir[2:] if args.remote_dir.startswith("~/") else args.remote_dir
        remote = f"cd {shlex.quote(remote_dir)} && {remote}"
      host = worker.rsplit(":", 1)[0]
      # -tt: the remote worker gets a terminal, so stopping this ssh (a failed peer, Ctrl-C)
      # stops it too instead of leaving it holding the GPUs and the port.
      trainer = Command(["ssh", "-tt", "-o", "BatchMode=yes", host, remote], f"run worker {i}")
    commands.append(trainer)
  return commands


def main(argv=None) -> int:
  args = parse_args(argv)
  with exit_on_user_error(PROG):
    commands = plan(args)
    Runner(args.dry_run).run_parallel(commands, [f"worker {i}" for i in range(len(commands))])
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
