"""What the command lines share around TensorFlow's native output: its C++ logging quieted for
people, and the chatter of native calls kept off the console.

Only command lines do this; importing the package as a library leaves TensorFlow's logging as
the caller set it. Standard library only, so a command can call `quiet_tensorflow` before it
imports anything that loads TensorFlow: `python -m mnv4_train.export` runs the package's
`__init__` and then the module's top level, and TensorFlow reads `TF_CPP_MIN_LOG_LEVEL` once,
when it loads. A command whose module imports TensorFlow at its top (the Beam jobs) calls it
first thing there, under `if __name__ == "__main__"`; one that imports TensorFlow on use calls
it at the start of `main`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import sys
import threading

from mnv4_train.errors import UserError

LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"
# TensorFlow's start-up lines (CPU features, oneDNN, no CUDA driver, cuInit) are INFO, WARNING
# and ERROR lines: 3 leaves the fatal ones.
QUIET_LEVEL = "3"


def wants_verbose(argv=None) -> bool:
  """Whether a command line (default `sys.argv[1:]`) asks for `--verbose` (absl's
  `--verbose=true` too; `--noverbose` and `--verbose=false` do not)."""
  for arg in sys.argv[1:] if argv is None else argv:
    if arg == "--":
      break
    if arg == "--verbose":
      return True
    if arg.startswith("--verbose="):
      return arg.split("=", 1)[1].lower() not in ("false", "0", "no", "")
  return False


def quiet_tensorflow(verbose: bool | None = None) -> None:
  """Sets `TF_CPP_MIN_LOG_LEVEL` to 3 for this command (and the processes it starts), unless
  the user set it or passed `--verbose` (`verbose`; None: read `sys.argv`). Call it before
  TensorFlow is imported: later it has no effect."""
  if verbose is None:
    verbose = wants_verbose()
  if not verbose:
    os.environ.setdefault(LOG_LEVEL, QUIET_LEVEL)


class NativeOutput:
  """Points file descriptors (`fds`, default 2: stderr) at a pipe while the block runs; what
  native code, child processes and Python write there is read line by line by a thread.

  It keeps the last `keep` lines (`tail`) and passes each line to `on_line(capture, line)`, which
  may re-emit it with `capture.emit` (to the real stderr). Used around calls whose C++ logs
  are noise for a person (`chatter_filter`) and, in `data_prep/console.py`, around a Beam
  pipeline whose worker processes inherit the descriptors.
  """

  def __init__(self, fds=(2,), keep=200, on_line=None):
    self.fds = tuple(fds)
    self.tail = collections.deque(maxlen=keep)
    self.on_line = on_line
    self.saved: dict[int, int] = {}
    self._lock = threading.Lock()

  def __enter__(self):
    sys.stdout.flush()
    sys.stderr.flush()
    self.saved = {fd: os.dup(fd) for fd in self.fds}
    read, write = os.pipe()
    for fd in self.fds:
      os.dup2(write, fd)
    os.close(write)
    self.reader = threading.Thread(target=self._read, args=(read,), daemon=True)
    self.reader.start()
    return self

  def _read(self, fd):
    with open(fd, "rb") as pipe:
      for raw in pipe:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        self.tail.append(line)
        if self.on_line is not None:
          try:
            self.on_line(self, line)
          except Exception:  # pylint: disable=broad-except  # a filter must not stop the reader
            pass

  def emit(self, line: str, fd: int = 2) -> None:
    """Writes `line` to the descriptor `fd` as it was before the block (stderr by default)."""
    target = self.saved.get(fd, fd)
    with self._lock:
      os.write(target, (line + "\n").encode("utf-8", "backslashreplace"))

  def __exit__(self, *exc):
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, saved in self.saved.items():
      os.dup2(saved, fd)
    # Ends when the last writer holding the pipe is gone (with Beam: its worker processes).
    self.reader.join(timeout=5)
    for saved in self.saved.values():
      os.close(saved)
    self.saved = {}
    return False


# What a real problem looks like on a native stderr: absl/glog ERROR and FATAL lines
# (`E0000 00:00:...`, TensorFlow's `2026-01-01 12:00:00.0: E tensorflow/...`), TFLite's
# `ERROR:`, a failed check, and Python's own errors.
_ERROR_LINE = re.compile(r"^(?:[EF]\d{4} |\S+ \S+: [EF] |(?:ERROR|FATAL)\b|Traceback |"
                         r"\w*(?:Error|Exception)\b[:(])|Check failed")


def looks_like_error(line: str) -> bool:
  return bool(_ERROR_LINE.search(line))


def chatter_filter(verbose: bool = False, keep_on_error: int = 20):
  """A context manager that keeps native stderr chatter (TensorFlow's converter, LiteRT's
  interpreter: "Created TensorFlow Lite XNNPACK delegate", "Ignored output_format") off the
  console, passing through the lines that look like errors. If the block raises, the last
  `keep_on_error` other lines follow them, for the diagnosis. With `verbose` it does nothing.
  """
  if verbose:
    return contextlib.nullcontext()
  return _ChatterFilter(keep_on_error)


class _ChatterFilter(NativeOutput):

  def __init__(self, keep_on_error):
    super().__init__(fds=(2,), keep=keep_on_error, on_line=self._line)
    self.dropped = collections.deque(maxlen=keep_on_error)

  @staticmethod
  def _line(capture, line):
    if looks_like_error(line):
      capture.emit(line)
    elif line.strip():
      capture.dropped.append(line)

  def __exit__(self, exc_type, *rest):
    super().__exit__(exc_type, *rest)
    if exc_type is not None and issubclass(exc_type, Exception) and not issubclass(
        exc_type, UserError) and self.dropped:  # a bug or a library's failure: show the context
      print("the native log lines before the error:", file=sys.stderr)
      for line in self.dropped:
        print("  " + line, file=sys.stderr)
    return False
