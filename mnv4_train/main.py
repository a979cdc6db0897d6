"""Training entry point: `python -m mnv4_train.main --gin_file=conv_l_distill.gin --workdir=DIR`.

Gin files are found by name in `gin_configs/` (or given as paths); `--gin_bindings` override
them, e.g. `--gin_bindings="runtime.distribution='tpu'"`. Everything a run needs is a setting of
one of `mnv4_train.config`'s groups (`GROUPS`: data, augment, student, loss, schedule,
optimizer, cadence, runtime); the workdir is the only flag it takes from here (it is not a gin
binding, so nothing binds it twice). A run in a workdir that holds checkpoints resumes. An old
flat `train.X` binding stops with one line naming its new name (`mnv4_train.config.RENAMED`).

The console shows what a user wants by default: a start line (model, data, steps), a progress
line per log interval (step/total, loss, examples/s, ETA), evaluations, warnings, errors and a
final line. `--verbose` brings back the libraries' INFO logs (TensorFlow, absl).

SIGTERM (a preemption: a spot VM, a TPU maintenance event) or SIGINT (Ctrl-C) during training
stops the run after the step it is in, saves a checkpoint there and ends with one line,
`mnv4_train.main: stopped at step N, saved; run the same command to continue`, and exit status
143 (SIGTERM) or 130 (SIGINT); a second signal ends the process at once, unsaved. A data file
found missing or damaged ends it with one `error:` line naming the file, its dataset and the
command that rebuilds it (exit status 2).
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging

from mnv4_train.cli import quiet_tensorflow
from mnv4_train.errors import (ConfigError, Preempted, exit_on_user_error, first_line,
                               run_then_exit)

PROG = "mnv4_train.main"


def _gin_dir() -> str:
  """The recipes' folder, the package `gin_configs`: found in a checkout and a wheel alike."""
  try:
    return str(importlib.resources.files("gin_configs"))
  except ModuleNotFoundError:  # an editable install made before gin_configs was a package
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "gin_configs")


GIN_DIR = _gin_dir()

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "gin file: a name in gin_configs/ or a path")
flags.DEFINE_multi_string("gin_bindings", [], "gin binding, e.g. \"schedule.train_steps=100\"")
flags.DEFINE_string("workdir", None, "run folder (local or gs://); resumes if it holds a run")
flags.DEFINE_bool("verbose", False, "also print the libraries' INFO logs (TensorFlow, absl)")


def available_gin_files() -> list[str]:
  if not os.path.isdir(GIN_DIR):
    return []
  return sorted(f for f in os.listdir(GIN_DIR) if f.endswith(".gin"))


def resolve_gin_file(name: str) -> str:
  """A path as given, else a file of that name in gin_configs/ (".gin" may be left off)."""
  if os.path.isfile(name):
    return name
  for candidate in (name, name + ".gin"):
    path = os.path.join(GIN_DIR, candidate)
    if os.path.isfile(path):
      return path
  raise ConfigError(f"unknown gin file {name!r}; available in {GIN_DIR}: "
                    f"{', '.join(available_gin_files()) or 'none'}")


def parse_gin(gin_files, bindings, finalize=True):
  """Parses the files and bindings; a bad one is a ConfigError naming it (an old flat
  `train.X` binding one naming the new names). `finalize`: lock the configuration (gin refuses
  configurables registered after that, so a caller that imports more of them, as `run` does
  with the trainer's libraries, finalizes itself with `finalize_gin`)."""
  import gin  # pylint: disable=import-outside-toplevel
  # Registers the configurables without loading TensorFlow: a bad binding fails in a second.
  from mnv4_train import config  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  paths = [resolve_gin_file(f) for f in gin_files]
  gin.add_config_file_search_path(GIN_DIR)
  for path in paths:
    gin.add_config_file_search_path(os.path.dirname(os.path.abspath(path)))
  for path in paths:
    try:
      gin.parse_config_file(path)
    except Exception as e:  # gin raises several types for a bad file
      where = _IN_FILE.findall(str(e))  # the includes gin was in, innermost first
      path = where[0] if where else path
      raise ConfigError(f"gin file {path}: {_renamed(e, path=path) or first_line(e)}") from None
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except Exception as e:
      old = _renamed(e, text="\n".join(bindings))
      if old:
        raise ConfigError(f"--gin_bindings: {old}") from None
      raise ConfigError(f"bad gin binding {binding!r}: {first_line(e)}; bindings look like "
                        "\"schedule.train_steps=100\"") from None
  if finalize:
    finalize_gin()


def finalize_gin():
  """Locks gin's configuration; a %gin.REQUIRED macro left unset is a ConfigError."""
  import gin  # pylint: disable=import-outside-toplevel
  try:
    gin.finalize()
  except ValueError as e:
    raise ConfigError(f"{first_line(e)}; set it with --gin_bindings") from None


_OLD_BINDING = re.compile(r"^\s*train\.(\w+)\s*=", re.MULTILINE)
_IN_FILE = re.compile(r'In file "([^"]+)", line \d+')


def _renamed(error, *, text=None, path=None) -> str | None:
  """For gin's error on an old flat `train.X` binding, one line naming the new binding of each
  one in `text` (or the file at `path`); None for any other error."""
  from mnv4_train import config  # pylint: disable=import-outside-toplevel
  if not str(error).startswith("No configurable matching 'train'"):
    return None
  if path is not None:
    try:
      with open(path) as f:
        text = f.read()
    except OSError:
      text = str(error)
  names = _OLD_BINDING.findall(text or "")
  if not names:
    return None
  return config.renamed(names)


class _GinProbeFilter(logging.Filter):
  """Drops gin's file-lookup probes: its "Path not found" for an `include` is no error.

  gin tries each search path in turn and logs an ERROR for every one that lacks the file (the
  working directory comes first), then finds it in gin_configs/; a file found nowhere is a
  ConfigError of its own.
  """

  def filter(self, record):
    return not record.pathname.endswith(os.path.join("gin", "resource_reader.py"))


class _DeprecationNoticeFilter(logging.Filter):
  """Drops TensorFlow's deprecation notices about its own and the Model Garden's calls (e.g.
  `map_fn(dtype=...)` in `MixupAndCutmix`): a note for their authors, not for a user."""

  def filter(self, record):
    return not record.pathname.endswith(os.path.join("util", "deprecation.py"))


def configure_logging(verbose: bool) -> None:
  """Plain console lines from the trainer; the libraries' INFO logs only when `verbose`."""
  logging.getLogger().addFilter(_GinProbeFilter())
  ours = logging.getLogger("mnv4_train")
  ours.setLevel(logging.INFO)
  if verbose:
    absl_logging.set_verbosity(absl_logging.INFO)
    logging.getLogger().setLevel(logging.INFO)
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("tensorflow").addFilter(_DeprecationNoticeFilter())
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(message)s"))
  ours.addHandler(handler)
  ours.propagate = False


def run(gin_files, bindings, workdir) -> dict:
  if not gin_files:
    raise ConfigError(f"give --gin_file (one of: {', '.join(available_gin_files())})")
  if not workdir:
    raise ConfigError("give --workdir, the run folder")
  parse_gin(gin_files, bindings, finalize=False)
  from mnv4_train import config  # pylint: disable=import-outside-toplevel
  try:
    settings = config.Config.make(workdir)  # a setting left unset fails here, before TensorFlow
  except RuntimeError as e:
    if "Required bindings" in str(e) or "gin.REQUIRED" in str(e):
      raise ConfigError(f"{first_line(e)}; add them to the gin file or --gin_bindings") from None
    raise
  from mnv4_train import train  # pylint: disable=import-outside-toplevel
  finalize_gin()  # after the trainer's libraries have registered their own configurables
  try:
    return train.train(workdir, **{name: getattr(settings, name) for name in config.GROUPS})
  except RuntimeError as e:
    _raise_if_storage_problem(e, workdir)
    raise
  except Exception as e:  # pylint: disable=broad-except
    _raise_if_storage_problem(e, workdir)  # a full disk anywhere in the run's writes
    raise


def _raise_if_storage_problem(error, workdir):
  """A full disk or quota becomes one line (StorageError); anything else is left as it is."""
  from mnv4_train import ownership  # pylint: disable=import-outside-toplevel
  problem = ownership.storage_problem(error, workdir)
  if problem is not None:
    raise problem from None


def main(argv):
  if len(argv) > 1:
    print(f"{PROG}: error: unexpected arguments {argv[1:]} (see --help)", file=sys.stderr)
    sys.exit(2)
  quiet_tensorflow(FLAGS.verbose)  # TensorFlow is not loaded yet (`run` imports it)
  configure_logging(FLAGS.verbose)
  with exit_on_user_error(PROG):
    try:
      result = run(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.workdir)
    except KeyboardInterrupt:  # before training started (after it, SIGINT is a stop)
      print(f"{PROG}: interrupted; the same command resumes from the last checkpoint",
            file=sys.stderr)
      sys.exit(130)
    except Preempted as e:
      peer = "" if e.signum else " (another worker was stopped)"
      print(f"{PROG}: stopped at step {e.step}{peer}, saved; run the same command to continue",
            file=sys.stderr)
      sys.exit(e.exit_code)
    summary = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in result.items())
    print(f"{PROG}: {summary}")


if __name__ == "__main__":
  run_then_exit(app.run, main)
