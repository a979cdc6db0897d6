"""Runs the main job's stages (`python -m <module> <args>`) as processes forked from a warm one.

Every stage of `mnv4_train.demo` is a command of its own (a Beam job, a training run, the
export), and each of them used to start a fresh interpreter that imported TensorFlow, Keras,
Beam and the Model Garden again: about 6 CPU-seconds per stage on a 2-core machine, over a
minute of the main job's 13 stages. Here the first stage starts a fork server
(`multiprocessing`'s "forkserver") that imports those libraries once, and every stage is a child
forked from it that runs its module as `__main__`, as `python -m` would: its own process (own
pid, its own exit status, Ctrl-C and SIGTERM reach it as before), the same console, the working
directory and `sys.path` of the caller; only the imports are already done. Nothing of a stage
outlives it, and no stage sees another's state: the server itself never runs TensorFlow, it only
imports it and has AutoGraph convert the project's graph code, which is pure Python (forking a
process whose TensorFlow runtime has started is not safe).

Exit statuses are a `subprocess`'s: the code the module exits with, or -N for a signal N.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.reduction
import os
import runpy
import sys

# What the fork server imports once, in order: the heavy libraries every stage needs and the
# project's library modules (none of them defines command-line flags or runs anything at
# import). `data_prep` first: it filters Beam's import-time notice about its optional GCP clients.
# Last, `stage_warmup`: AutoGraph's conversions of the graph code (`mnv4_train.autograph_warm`,
# about 5 CPU-seconds once, instead of 3 to 5 in every training run and distillation job).
PRELOAD = ("data_prep", "tensorflow", "keras", "apache_beam", "official.vision.ops.augment",
           "mnv4_train.train", "data_prep.transforms", "mnv4_train.stage_warmup")

# How long a stage gets to finish after Ctrl-C (a trainer saves its step and exits) before it
# is killed.
INTERRUPT_GRACE_S = 60.0

_context = None


def _forkserver():
  global _context
  if _context is None:
    _context = multiprocessing.get_context("forkserver")
    _context.set_forkserver_preload(list(PRELOAD))
  return _context


class _CallersFd:
  """One of the caller's file descriptors, handed to the forked child (the fork server passes
  it over its socket): a stage writes to the console of the process that started it, wherever
  that process' stdout and stderr point now, not to those the server was started with."""

  def __init__(self, fd: int):
    self.fd = fd

  def __reduce__(self):  # pickled while the child is being started: the fd goes with it
    return _inherited_fd, (multiprocessing.reduction.DupFd(self.fd),)


def _inherited_fd(dup) -> int:
  return dup.detach()


def _stage_main(module: str, args: list[str], cwd: str, env=None, output=None):
  """In the forked child: `python -m module args` from `cwd` (first on `sys.path`, as `-m`
  puts it), in `env` (None: the server's), its stdout and stderr written to `output`: two
  files, or two of the caller's descriptors (`_CallersFd`, once inherited: ints)."""
  for fd, target in zip((1, 2), output or ()):
    opened = target if isinstance(target, int) else os.open(
        target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    if opened != fd:
      os.dup2(opened, fd)
      os.close(opened)
  if env is not None:  # what TensorFlow reads at import (TF_CPP_MIN_LOG_LEVEL) is the server's
    os.environ.clear()
    os.environ.update(env)
  os.chdir(cwd)
  if cwd not in sys.path:
    sys.path.insert(0, cwd)
  sys.argv = [module] + list(args)
  runpy.run_module(module, run_name="__main__", alter_sys=True)


def start(module: str, args: list[str], *, cwd: str | None = None, env: dict | None = None,
          output: tuple[str, str] | None = None):
  """Starts `python -m module args` as a forked child of the warm server: a started
  `multiprocessing` process (`pid`, `exitcode`, `join`, `terminate`, `kill`). `cwd` (default
  this one's), `env` (default the server's, which is this process' when it started) and
  `output`, two files for the child's stdout and stderr (default: this one's console)."""
  cwd = os.path.abspath(cwd or os.getcwd())
  sys.stdout.flush()
  sys.stderr.flush()
  output = output or (_CallersFd(1), _CallersFd(2))
  process = _forkserver().Process(target=_stage_main, args=(module, list(args), cwd),
                                  kwargs={"env": env, "output": output}, name=module)
  process.start()
  return process


def run(module: str, args: list[str]) -> int:
  """Runs `python -m module args` as a forked child of the warm server; its exit status."""
  process = start(module, args)
  try:
    process.join()
  except KeyboardInterrupt:  # Ctrl-C reached the stage too: let it save and end, then go on
    process.join(INTERRUPT_GRACE_S)
    if process.exitcode is None:
      process.kill()
      process.join()
    raise
  return process.exitcode
