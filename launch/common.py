"""What the launch scripts share: commands as argv lists, printed shell-quoted, run or not.

Each script builds its plan as `Command`s. The `Runner` prints every command as one line
`$ ...` that pastes into a shell as is; with `--dry_run` that is all it does, otherwise it runs
the command and a failure stops the script with one line naming it and exit status 2, as every
user-facing error in the project does (`mnv4_train.errors`). Other lines a script prints to
stdout start with `#`, so the whole output stays a valid shell script.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import threading
import time

from mnv4_train.errors import ConfigError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CommandFailed(UserError):
  """A launched command exited non-zero (or could not start)."""


@dataclasses.dataclass
class Command:
  """One program run: argv, extra environment variables, a few words on what it does."""
  argv: list[str]
  what: str
  env: dict[str, str] = dataclasses.field(default_factory=dict)

  def line(self) -> str:
    """The command as one shell line, environment assignments first."""
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
                    + [shlex.join(self.argv)])


def gin_bindings_flags(own: dict[str, str], user: list[str], prog: str) -> list[str]:
  """`--gin_bindings=` flags: the launcher's bindings (string values), then the user's.

  A user binding of a parameter the launcher sets is refused: two bindings of one parameter
  would leave the outcome to their order.
  """
  for binding in user:
    name = binding.split("=", 1)[0].strip()
    if name in own:
      raise ConfigError(f"{prog} binds {name} itself; drop --gin_bindings={binding}")
  return ([f'--gin_bindings={k}="{v}"' for k, v in own.items()]
          + [f"--gin_bindings={b}" for b in user])


class Runner:
  """Prints each command as `$ line`; runs it unless `dry_run`."""

  def __init__(self, dry_run: bool, cwd: str = ROOT):
    self.dry_run = dry_run
    self.cwd = cwd

  def note(self, text: str) -> None:
    print(f"# {text}", flush=True)

  def _env(self, cmd: Command):
    return {**os.environ, **cmd.env} if cmd.env else None

  def run(self, cmd: Command) -> None:
    print(f"$ {cmd.line()}", flush=True)
    if self.dry_run:
      return
    try:
      code = subprocess.run(cmd.argv, env=self._env(cmd), cwd=self.cwd).returncode
    except FileNotFoundError:
      raise CommandFailed(f"cannot {cmd.what}: {cmd.argv[0]} is not on PATH") from None
    if code:
      raise CommandFailed(f"cannot {cmd.what}: exit status {code} from: {cmd.line()}")

  def run_parallel(self, cmds: list[Command], labels: list[str]) -> None:
    """Runs the commands at once, each output line prefixed with `[label] `.

    When one fails the others are terminated (a multi-worker job cannot go on without it)
    and the first failure is reported.
    """
    for cmd in cmds:
      print(f"$ {cmd.line()}", flush=True)
    if self.dry_run:
      return
    lock = threading.Lock()

    def copy(stream, label):
      for line in stream:  # text mode reads \r\n (a remote terminal's) and \r as line ends
        line = line.rstrip("\n")
        with lock:
          print(f"[{label}] {line}", flush=True)

    procs, threads, stopped = [], [], []
    try:
      for cmd, label in zip(cmds, labels):
        try:
          proc = subprocess.Popen(cmd.argv, env=self._env(cmd), cwd=self.cwd,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, errors="replace",
                                  start_new_session=True)
        except FileNotFoundError:
          raise CommandFailed(f"cannot {cmd.what}: {cmd.argv[0]} is not on PATH") from None
        procs.append(proc)
        threads.append(threading.Thread(target=copy, args=(proc.stdout, label), daemon=True))
        threads[-1].start()
      failed = None
      while failed is None and any(p.poll() is None for p in procs):
        failed = next((i for i, p in enumerate(procs) if p.poll()), None)
        time.sleep(0.05)
      if failed is None:
        failed = next((i for i, p in enumerate(procs) if p.returncode), None)
    finally:
      stopped = [p for p in procs if p.poll() is None]
      for p in stopped:  # each worker's whole process group: it may have started children
        try:
          os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:  # it ended meanwhile
          pass
      for p in procs:
        p.wait()
      for t in threads:
        t.join()
    if failed is not None:
      others = f" (stopped {len(stopped)} still running)" if stopped else ""
      raise CommandFailed(f"{labels[failed]} failed with exit status "
                          f"{procs[failed].returncode}{others}: {cmds[failed].line()}")
