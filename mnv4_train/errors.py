"""User-facing errors: one exception type per kind of user mistake.

Entry points catch `UserError` and print it as one line with the fix, exiting non-zero
(`exit_on_user_error`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
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
