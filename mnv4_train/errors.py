"""User-facing errors: one exception type per kind of user mistake.

Entry points catch `UserError` and print it as one line with the fix, exiting non-zero
(`exit_on_user_error`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys


class UserError(Exception):
  """A mistake the user can fix: the message names it and says how."""


class ConfigError(UserError):
  """A bad model name, option, flag or gin binding."""


class InputPathError(UserError):
  """A missing or unreadable input path."""


def first_line(error: BaseException, limit: int | None = None) -> str:
  """The first non-blank line of an exception's message, else its type name (never empty).

  `str(e).splitlines()[0]` raises IndexError on an exception with an empty message; this does
  not. `limit` cuts the line to at most that many characters.
  """
  line = (str(error).strip().splitlines() or [type(error).__name__])[0].strip()
  return line[:limit] if limit else line


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
