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
imports it (forking a process whose TensorFlow runtime has started is not safe).

Exit statuses are a `subprocess`'s: the code the module exits with, or -N for a signal N.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import sys

# What the fork server imports once, in order: the heavy libraries every stage needs and the
# project's library modules (none of them defines command-line flags or runs anything at
# import). `data_prep` first: it filters Beam's import-time notice about its optional GCP clients.
PRELOAD = ("data_prep", "tensorflow", "keras", "apache_beam", "official.vision.ops.augment",
           "mnv4_train.train", "data_prep.transforms")

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


def _stage_main(module: str, args: list[str], cwd: str, path0: str):
  """In the forked child: `python -m module args` from `cwd`."""
  os.chdir(cwd)
  if path0 not in sys.path:
    sys.path.insert(0, path0)
  sys.argv = [module] + list(args)
  runpy.run_module(module, run_name="__main__", alter_sys=True)


def run(module: str, args: list[str]) -> int:
  """Runs `python -m module args` as a forked child of the warm server; its exit status."""
  cwd = os.getcwd()
  process = _forkserver().Process(target=_stage_main, args=(module, list(args), cwd, cwd),
                                  name=module)
  sys.stdout.flush()
  sys.stderr.flush()
  process.start()
  try:
    process.join()
  except KeyboardInterrupt:  # Ctrl-C reached the stage too: let it save and end, then go on
    process.join(INTERRUPT_GRACE_S)
    if process.exitcode is None:
      process.kill()
      process.join()
    raise
  return process.exitcode
