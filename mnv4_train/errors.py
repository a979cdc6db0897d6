"""User-facing errors: one exception type per kind of user mistake.

Entry points catch `UserError` and print it as one line with the fix, exiting non-zero
(`exit_on_user_error`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys


def first_line(text, default: str = "", *, limit: int | None = None) -> str:
  """The first non-blank line of `text` (an exception or a string), else `default`.

  With no `default`, an exception with an empty message gives its type name, so an error line
  is never empty. `str(e).splitlines()[0]` raises IndexError on an empty message; this never
  does. `limit` cuts the result to at most that many characters.
  """
  line = next((l.strip() for l in str(text).strip().splitlines() if l.strip()), "")
  if not line:
    line = default or (type(text).__name__ if isinstance(text, BaseException) else "")
  return line[:limit] if limit else line


class UserError(Exception):
  """A mistake the user can fix: the message names it and says how."""


class ConfigError(UserError):
  """A bad model name, option, flag or gin binding."""


class InputPathError(UserError):
  """A missing or unreadable input path."""


class FormatError(InputPathError):
  """A stage output of another format, or another version of it, than the reader needs."""


class DataError(InputPathError):
  """A stage output's file that is missing, damaged or disagrees with its manifest: the message
  names the file, the dataset and the command that rebuilds it."""


class Preempted(Exception):
  """Training stopped on SIGTERM or SIGINT at a step boundary, saved at `step`.

  Not a UserError: the run is fine and the same command continues it. `signum` is the signal
  this process received (None when another worker's signal stopped the run); `exit_code` is
  what the process should end with (128 + the signal, as a shell reports a signal's death;
  143 when another worker was the one signalled: a preemption of the run).
  """

  def __init__(self, step: int, signum: int | None, *, saved: bool = True):
    self.step = step
    self.signum = signum
    self.saved = saved
    self.exit_code = 128 + (signum or 15)
    super().__init__(f"stopped at step {step}")


@contextlib.contextmanager
def exit_on_user_error(prog: str):
  """Turns a UserError raised inside the block into `prog: error: ...` and exit status 2."""
  try:
    yield
  except UserError as e:
    # One line: gin appends the configurable's name on lines of its own.
    print(f"{prog}: error: {first_line(e)}", file=sys.stderr)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
  """argparse, but a bad flag is one line (`prog: error: ...; see --help`) and exit status 2."""

  def error(self, message):
    print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def exit_now(code=0):
  """Ends the process with `code` (as `sys.exit` reads it) once output is flushed, skipping
  the interpreter's teardown.

  Every entry point ends here after its files are written and closed. A finished trainer has
  (rarely) died on SIGSEGV at its end, with tf.data's threads still alive; skipping the
  teardown takes that step out of play, though the crash was seen again after this change, so
  it is not the only place (the main job also keeps a stage that crashed after finishing, see
  `mnv4_train.demo._run`). Interpreter teardown only frees memory: nothing of ours waits on it.
  """
  if code is None:
    code = 0
  elif not isinstance(code, int):
    print(code, file=sys.stderr)
    code = 1
  logging.shutdown()
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # a closed pipe: nothing more can reach it anyway
      pass
  os._exit(code)


def run_then_exit(fn, *args):
  """A command's `__main__`: runs `fn(*args)` and ends with its status through `exit_now`
  (a returned int or a `sys.exit`). A bug's traceback still goes through Python's own path."""
  try:
    code = fn(*args)
  except SystemExit as e:
    code = e.code
  exit_now(code)
