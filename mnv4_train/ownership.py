"""What a command may write and remove: outputs that never overlap their inputs, staging folders
marked as ours, and one writer per output.

Every command that writes a folder (the Beam jobs, `export`, the trainer's workdir) goes
through here before any work:

- `check_overlap(out, inputs)`: `--out` must not equal, contain or lie inside any input (local
  paths compared after resolving symlinks and `..`; `gs://` and other URLs by prefix).
- `Claim`: a small JSON file (`OWNER`) that says who is writing (host, pid, the process's start
  time, the command) and doubles as the lock. It is written whole under a private name and
  hard-linked into place (O_EXCL where links are unavailable), so of two processes only one
  gets it and nobody reads it half-written; the other stops with one line naming the holder.
  A claim whose process is gone (same host, pid not running, or running with another start
  time) is stale: it is taken over, with a line saying so. A claim from another host cannot be
  checked from here and is never taken over silently: the user is told how to release it.
- The same file marks a staging folder as this project's: a `<out>.tmp` without it was not
  made by us and is never removed.

On `gs://` there is no O_EXCL: the claim is written after checking that none exists, so two
jobs started within the same second could both pass; the docs (WORKSPACE.md) say how users are
protected there (unique Dataflow job names per output, the claim check, and staging + commit).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
import uuid

from mnv4_train.errors import ConfigError, UserError

OWNER = ".mnv4-owner.json"  # in a staging folder or a workdir: who writes it (the lock)

log = logging.getLogger(__name__)


class _LazyTF:
  """`tf`, imported on first use (the main job's own process never needs TensorFlow)."""

  def __getattr__(self, name):
    import tensorflow  # pylint: disable=import-outside-toplevel
    return getattr(tensorflow, name)


tf = _LazyTF()


class OutputBusyError(UserError):
  """Another process is writing the same output."""


class OverlapError(ConfigError):
  """An output path that overlaps an input."""


def is_url(path: str) -> bool:
  return "://" in path


def canonical(path: str) -> str:
  """A path as compared for overlap: symlinks and `..` resolved locally; URLs normalised."""
  if is_url(path):
    scheme, rest = path.split("://", 1)
    parts = [p for p in rest.split("/") if p not in ("", ".")]
    return f"{scheme}://" + "/".join(parts)
  return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _within(child: str, parent: str) -> bool:
  """Whether canonical `child` is `parent` or lies inside it."""
  if child == parent:
    return True
  sep = "/" if is_url(parent) else os.sep
  return child.startswith(parent.rstrip(sep) + sep)


def check_overlap(out: str, inputs: dict, what: str = "--out") -> None:
  """Refuses an `out` (and its `<out>.tmp`) that equals, contains or lies inside an input.

  `inputs` maps a flag (for the message) to a path, a glob or None. A glob's fixed prefix (the
  folder before its first wildcard) is what is compared.
  """
  targets = [canonical(out), canonical(out.rstrip("/") + ".tmp")]
  given = [out, out.rstrip("/") + ".tmp"]
  for flag, path in inputs.items():
    if not path:
      continue
    fixed = _glob_prefix(str(path))
    if not fixed:
      continue
    c = canonical(fixed)
    for t, shown, name in zip(targets, given, (what, f"{what}.tmp")):
      if _within(t, c) or _within(c, t):
        how = ("is" if t == c else "lies inside" if _within(t, c) else "contains")
        if shown.rstrip("/") != t:
          shown = f"{shown} ({t})"
        raise OverlapError(f"{name} {shown} {how} the input {flag} {path}; writing there would "
                           f"destroy it, choose an {what} outside every input")


def _glob_prefix(path: str) -> str:
  """The part of a path before its first glob character, cut back to a whole folder name."""
  for i, ch in enumerate(path):
    if ch in "*?[":
      head = path[:i]
      return head if head.endswith("/") else os.path.dirname(head)
  return path


# ---- who we are ---------------------------------------------------------------------------------

def _process_start(pid: int) -> str | None:
  """The start time of a local process (clock ticks since boot), or None where unknown."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      stat = f.read()
    return stat.rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def me(command: str | None = None) -> dict:
  pid = os.getpid()
  return {"host": socket.gethostname(), "pid": pid, "process_start": _process_start(pid),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "command": command or " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:500]}


def describe(owner: dict) -> str:
  return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} since "
          f"{owner.get('started', '?')}")


def alive(owner: dict) -> bool | None:
  """Whether the claim's process still runs: True/False on this host, None elsewhere."""
  if owner.get("host") != socket.gethostname():
    return None
  pid = owner.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, someone else's
  start = owner.get("process_start")
  return start is None or _process_start(pid) in (None, start)


def read_owner(folder: str) -> dict | None:
  """The claim in `folder`, {} for one that cannot be read (being written, damaged), or None."""
  path = os.path.join(folder, OWNER)
  if not is_url(path):
    try:
      with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    except FileNotFoundError:
      return None
    except OSError:
      return {}
  else:
    try:
      with tf.io.gfile.GFile(path) as f:
        text = f.read()
    except tf.errors.NotFoundError:
      return None
    except (tf.errors.OpError, OSError):
      return {}
  try:
    owner = json.loads(text)
  except ValueError:
    return {}
  return owner if isinstance(owner, dict) else {}


# ---- claims -------------------------------------------------------------------------------------

class Claim:
  """This process's claim on `folder` (a staging folder or a workdir): the lock and the mark."""

  def __init__(self, folder: str, owner: dict):
    self.folder = folder.rstrip("/")
    self.path = os.path.join(self.folder, OWNER)
    self.owner = owner

  def release(self) -> None:
    """Removes the claim file if it is still ours."""
    current = read_owner(self.folder)
    if current and current.get("pid") == self.owner["pid"] and (
        current.get("host") == self.owner["host"]):
      _remove(self.path)


def _remove(path: str) -> None:
  """Removes a claim file; one already gone is fine."""
  try:
    if is_url(path):
      tf.io.gfile.remove(path)
    else:
      os.remove(path)
  except FileNotFoundError:
    pass
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ != "NotFoundError":
      raise


def _write_exclusive(path: str, owner: dict) -> bool:
  """Creates `path` holding `owner` only if it does not exist; whether it did."""
  text = json.dumps(owner, indent=1, sort_keys=True) + "\n"
  if is_url(path):
    if tf.io.gfile.exists(path):
      return False
    with tf.io.gfile.GFile(path, "w") as f:
      f.write(text)
    return True
  # Written whole under a private name, then linked into place: link() fails if the name
  # exists, and a reader never sees a half-written claim.
  # The draft is created exclusively ("x"), so the only file ever removed here is the one
  # this call created.
  draft = f"{path}.{uuid.uuid4().hex}.draft"
  try:
    with open(draft, "x", encoding="utf-8") as f:
      f.write(text)
  except OSError:
    pass  # the name is taken, or the folder refuses it: O_EXCL below
  else:
    try:
      os.link(draft, path)
      return True
    except FileExistsError:
      return False
    except OSError:
      pass  # a file system without hard links: O_EXCL below
    finally:
      try:
        os.remove(draft)
      except OSError:
        pass
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(text)
  return True


def claim(folder: str, what: str, *, command: str | None = None, take_stale=True,
          on_stale=None) -> Claim:
  """Claims `folder` (which must exist) for this process, or one line naming the holder.

  A stale claim (its process gone, on this host) is taken over: `on_stale(old_owner)` runs
  first (a staging folder clears itself there), and a line says so.
  """
  owner = me(command)
  path = os.path.join(folder.rstrip("/"), OWNER)
  for _ in range(3):
    if _write_exclusive(path, owner):
      return Claim(folder, owner)
    held = read_owner(folder)
    if held is None:
      continue  # released meanwhile: try again
    if held == {}:
      # A claim being written this instant, or a damaged one: never guessed at.
      raise OutputBusyError(f"{what} {folder} has an unreadable claim {path}; if no job writes "
                            "there, remove that file and run again")
    state = alive(held)
    if state is None:
      raise OutputBusyError(f"{what} {folder} is being written by {describe(held)} (another "
                            f"host); wait for it, or if that job is gone remove {path}")
    if state:
      raise OutputBusyError(f"{what} {folder} is being written by {describe(held)}; wait for "
                            "it to finish or choose another output")
    if not take_stale:
      raise OutputBusyError(f"{what} {folder} holds the claim of a job that is gone "
                            f"({describe(held)}); remove {path} and run again")
    log.warning("%s %s: taking over from a job that is gone (%s)", what, folder, describe(held))
    if on_stale is not None:
      on_stale(held)
    _remove(path)
  raise OutputBusyError(f"{what} {folder}: could not claim it (another process keeps taking "
                        "it); make sure one job writes it at a time")


NO_SPACE = ("No space left on device", "ENOSPC", "Disk quota exceeded")


def storage_problem(error: BaseException, where: str) -> UserError | None:
  """A full disk (or quota) anywhere in `error`'s text or causes, as one line; else None."""
  seen, e = 0, error
  while e is not None and seen < 20:
    text = str(e)
    if any(n in text for n in NO_SPACE) or getattr(e, "errno", None) in (28, 122):
      return StorageError(f"no space left on the device of {where}; free some space (or "
                          "choose another location) and run the same command again")
    e, seen = e.__cause__ or e.__context__, seen + 1
  return None


class StorageError(UserError):
  """The output's storage is full."""


