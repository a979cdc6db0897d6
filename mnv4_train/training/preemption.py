"""Stopping on SIGTERM (a preemption) or SIGINT (Ctrl-C) at a step boundary, every worker alike.

A spot VM or a TPU maintenance event sends SIGTERM and allows ~30 s. `StopSignals` turns SIGTERM
and SIGINT into a request to stop: the compiled loop (`Trainer`) ends after the step it is in,
the trainer saves student, optimizer and input position at the step reached
(`Checkpointer.save`) and the process exits 143 (SIGTERM) or 130 (SIGINT) without the finished
run's export and metrics (`mnv4_train.errors.Preempted`).

How a signal reaches a running loop. `Trainer.train_loop` runs `steps_per_loop` steps (500 in
the ImageNet recipes) in one `tf.function` call, and Python runs a signal handler only when the
main thread is back in Python, i.e. after that call: measured here, a handler ran 4.2 s after
SIGTERM, when a 572-step call ended. So the signal is taken off `signal.set_wakeup_fd` (written
by the C-level handler the moment the signal arrives) by a watcher thread, which sets the
`tf.Variable` flag `StopSignals.flag` (0.3 ms after the signal, measured); the loop reads the
flag at every step.

How the workers agree on the step. Each replica adds its host's flag to the step's statistics
vector, which the loop all-reduces every step anyway (`Trainer._packed_step`): every worker sees
the same sum after the same step and leaves the loop there, so all of them save the same step
and none waits in a collective for a worker that left. Evaluation does the same per batch. The
Python loop never decides alone on a local flag. A worker that was not signalled stops too and
exits 143: the run was preempted.

Why not `tf.distribute.experimental.PreemptionCheckpointHandler` (TF 2.20, measured and read):
  * it checks for the signal only between its `run` calls, from a Python-level SIGTERM handler,
    and saves after the call that follows the signal: with a 313-step call it saved and exited
    5.6 s after SIGTERM, the rest of the running call and one more whole call; with
    steps_per_loop=500 that is up to 1000 steps, past a 30 s grace period;
  * on Google Cloud TPU VMs and CPU VMs (its `detect_platform`: GCE_TPU, GCE_CPU) it is a
    no-op: `run` calls the function and no SIGTERM handler is installed; on GCE GPU VMs it polls
    the metadata server's host maintenance event with a one-hour grace period, not SIGTERM;
  * it does not handle SIGINT;
  * it writes its own `checkpointed_runs` variable into the model checkpoint, numbers
    checkpoints by its save counter (ckpt-1, ...) rather than by step, and restores the latest
    checkpoint itself when constructed (ours restores model and input position together).

A second signal while a stop is under way ends the process at once (exit 128 + signal), with
the last complete checkpoint as it was. A signal after `train` entered `StopSignals` (right
after the strategy is made) but before the first compiled call has run a step is handled the
same way: the first call runs one step and stops, after its tracing (on a TPU, its
compilation): here a 2-replica CPU run signalled 25 s into its first call exited 6 s later; a
compilation longer than the grace period is cut short by the platform's SIGKILL, and the next
run resumes from the last checkpoint, as after any kill. Before that (reading manifests,
making the strategy) nothing has been trained: SIGTERM ends the process as it would anyway, and
SIGINT is `mnv4_train.main`'s KeyboardInterrupt line.

Checked here on CPU: one device, MirroredStrategy (cpu_replicas), MultiWorkerMirroredStrategy
with two local workers (a SIGTERM to worker 1 inside a 2000-step loop stopped both at step
245, 0.8 s after the signal). Not run on a TPU: the flag goes to `strategy.run` as a host
tensor, as the batch slices do.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import tensorflow as tf

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
  """While entered (in the main thread): SIGTERM and SIGINT request a stop.

  `flag` (a boolean tf.Variable) is set as soon as a signal arrives, from a watcher thread;
  `signum` is the first signal received (None: none yet). Leaving restores the previous
  handlers. Entered from another thread (Python takes signals in the main thread only) it
  installs nothing and only holds the flag.
  """

  def __init__(self, prog: str = "mnv4_train.main"):
    self.prog = prog
    self.flag = tf.Variable(False, trainable=False, name="stop_requested")
    self.signum: int | None = None
    self.received_at: float | None = None
    self._lock = threading.Lock()
    self._count = 0
    self._installed = False

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    self._read, self._write = socket.socketpair()
    self._write.setblocking(False)
    self._old_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
    self._old = {s: signal.signal(s, self._python_handler) for s in SIGNALS}
    self._installed = True
    self._watcher = threading.Thread(target=self._watch, name="stop-signals", daemon=True)
    self._watcher.start()
    return self

  def __exit__(self, *exc):
    if not self._installed:
      return False
    for s, old in self._old.items():
      signal.signal(s, old)
    signal.set_wakeup_fd(self._old_fd)
    self._installed = False
    self._write.close()  # ends the watcher's recv
    self._watcher.join(timeout=5)
    self._read.close()
    return False

  def _python_handler(self, signum, frame):
    """Python's handler (it runs in the main thread between compiled calls); the watcher has
    already seen the signal through the wakeup fd, so there is nothing left to do here."""
    del signum, frame

  def _watch(self):
    while True:
      try:
        data = self._read.recv(64)
      except OSError:
        return
      if not data:
        return
      for signum in data:
        if signum in SIGNALS:
          self._received(signum)

  def _received(self, signum: int):
    with self._lock:
      self._count += 1
      if self._count == 1:
        self.signum = signum
        self.received_at = time.monotonic()
        self.flag.assign(True)
        return
    # A second signal: the user (or the platform) wants the process gone now.
    print(f"{self.prog}: stopped at once on a second signal ({signal.Signals(signum).name}), "
          "without saving; run the same command to continue from the last checkpoint",
          file=sys.stderr, flush=True)
    os._exit(128 + signum)
