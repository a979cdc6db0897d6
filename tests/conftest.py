"""Shared fixtures: real digits images, their source shards and a small trained teacher."""

import contextlib
import fcntl
import json
import os

# As our CLIs do (mnv4_train/__init__.py); set first, because importing jax sets it to 1 and
# the CLI subprocesses the tests start inherit this environment.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Each xdist worker's TensorFlow, and every command it starts, takes its share of the cores for
# both of its thread pools (an op's own threads, and ops run side by side): two workers with
# pools of every core each oversubscribe the machine. Measured on 2 cores, the README's test
# command: 17:54 with the default pools, 16:49 with one intra-op thread per worker (and the
# committed teacher), 15:13 and 17:10 (two runs of the same code) with both pools at one.
# Set before TensorFlow starts; a value in the environment wins.
_THREADS = str(max(1, len(os.sched_getaffinity(0))
                   // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", _THREADS)
os.environ.setdefault("TF_NUM_INTEROP_THREADS", _THREADS)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from data_prep.digits import write_digits_folder  # noqa: E402

CORRUPT_FILES = {
    "3/broken.jpg": b"\xff\xd8\xff\xe0 this is not really a jpeg",
    "5/truncated.png": b"\x89PNG\r\n\x1a\n\x00\x00",
    "7/notes.txt": b"not an image at all",
}


# Fixtures that run a Beam job or train a model: a test that asks for one is end to end.
# test_export's `trained` fits a model, its `exported` converts it to every format.
E2E_FIXTURES = frozenset({"source_shards", "teacher_path", "distill_records", "trained",
                          "exported"})


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Marks the end-to-end tests `e2e`, then orders the collection for the xdist workers.

  `e2e` (deselect with `-m "not e2e"` for the fast tier): marked `slow` or `e2e` in the test
  files, or asking for a fixture that runs a Beam job or a training run (E2E_FIXTURES).
  """
  for item in items:
    if item.get_closest_marker("slow") or E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.e2e)
  _order_for_workers(items)


def _order_for_workers(items):
  """Starts each xdist worker with its share of the long end-to-end tests.

  The `worksteal` scheduler hands its k workers consecutive chunks of this order (the first
  floor(n/k) tests, then a share of the rest, ...), then lets an idle worker take queued tests
  from another's tail. The `lead(i)` tests (minutes each) go to the head of chunk i (the last chunk when
  i >= k);
  everything else keeps its order, so a file's tests (and its fixtures) mostly stay on one
  worker.
  """
  workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
  leads = [[] for _ in range(workers)]
  rest = []
  for item in items:
    mark = item.get_closest_marker("lead")
    (leads[min(mark.args[0], workers - 1)] if mark else rest).append(item)
  if workers < 2 or not any(leads):
    return
  ordered, left = [], len(items)
  for worker in range(workers):
    size = left // (workers - worker)  # what the scheduler sends this chunk's worker
    take = max(0, size - len(leads[worker]))
    ordered += leads[worker] + rest[:take]
    rest = rest[take:]
    left -= size
  items[:] = ordered + rest


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The environment of a command that runs Keras on JAX: XLA's backend (LLVM) optimisation off,
# the same computation compiled in about two thirds of the time (these tests check results, not
# the speed of the compiled code).
JAX_ENV = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_backend_optimization_level=0"}


def run_cli(module, *args, cwd=REPO, env=None, timeout=600):
  """`python -m module args` to its end, its output captured (a `subprocess.CompletedProcess`).

  The child is forked from the warm server of `mnv4_train.stages` (TensorFlow, Keras and Beam
  imported once), as the main job runs its stages: its own process, exit status (-N for a
  signal), working folder and environment, without the ~6 CPU-seconds of imports each time.
  What a command prints while TensorFlow loads is the one thing it cannot show: the tests of
  that start a fresh interpreter (test_imports, the console tests)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  process = WarmProcess(module, *args, cwd=cwd, env=env)
  try:
    out, err = process.communicate(timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    process.communicate()
    raise
  return subprocess.CompletedProcess([module, *args], process.returncode, out, err)


class WarmProcess:
  """`python -m module args` started in the background, forked from the warm server as
  `run_cli` runs one: the part of `subprocess.Popen` the tests use (`pid`, `poll`, `wait`,
  `send_signal`, `kill`, `communicate` -> (stdout, the stderr not read yet), `returncode`, and
  `stderr`, an iterator over the lines the child writes, as they come)."""

  def __init__(self, module, *args, cwd=REPO, env=None):
    import tempfile  # pylint: disable=import-outside-toplevel
    from mnv4_train import stages  # pylint: disable=import-outside-toplevel
    self._dir = tempfile.mkdtemp(prefix="cli-")
    self._paths = (os.path.join(self._dir, "stdout"), os.path.join(self._dir, "stderr"))
    for path in self._paths:  # there before the child opens them: readable from the start
      open(path, "w").close()
    self._err = open(self._paths[1], encoding="utf-8", errors="replace")
    self._partial = ""
    self.args = [module, *map(str, args)]
    self._process = stages.start(module, self.args[1:], cwd=str(cwd),
                                 env=dict(os.environ if env is None else env),
                                 output=self._paths)
    self.pid = self._process.pid
    self.stderr = self._lines()

  @property
  def returncode(self):
    return self._process.exitcode

  def poll(self):
    return self._process.exitcode

  def wait(self, timeout=None):
    import subprocess  # pylint: disable=import-outside-toplevel
    self._process.join(timeout)
    if self._process.exitcode is None:
      raise subprocess.TimeoutExpired(self.args, timeout)
    return self._process.exitcode

  def send_signal(self, signum):
    if self._process.exitcode is None:
      os.kill(self.pid, signum)

  def kill(self):
    self._process.kill()
    self._process.join()

  def _lines(self):
    import time  # pylint: disable=import-outside-toplevel
    while True:
      self._partial += self._err.readline()
      if self._partial.endswith("\n"):
        line, self._partial = self._partial, ""
        yield line
      elif self.poll() is not None:
        self._partial += self._err.read()
        if not self._partial:
          return
        line, _, self._partial = self._partial.partition("\n")
        yield line + "\n"
      else:
        time.sleep(0.01)

  def communicate(self, timeout=None):
    """Waits for the end; (stdout, the stderr not read through `stderr` yet)."""
    import shutil  # pylint: disable=import-outside-toplevel
    self.wait(timeout)
    with open(self._paths[0], encoding="utf-8", errors="replace") as f:
      out = f.read()
    err, self._partial = self._partial + self._err.read(), ""
    self._err.close()
    shutil.rmtree(self._dir, ignore_errors=True)
    return out, err


@contextlib.contextmanager
def built_once(tmp_path_factory, name):
  """A folder that the test run builds once, shared by its xdist workers.

  Yields (folder, None) when it is already built (by this or another worker), else
  (folder, done): build into `folder`, then call `done()`. The first worker to ask builds it
  under a lock while the others wait, instead of each building its own copy.
  """
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # the run's folder, above each worker's own
  folder = base / f"shared-{name}"
  with open(base / f"shared-{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    marker = base / f"shared-{name}.built"
    if marker.exists():
      yield folder, None
      return
    if folder.exists():  # a build that failed in another worker: start again
      import shutil  # pylint: disable=import-outside-toplevel
      shutil.rmtree(folder)
    folder.mkdir()
    yield folder, marker.touch


def write_test_digits(root):
  """Writes the tests' digits folder into `root`: 200 real digit images (20 per class, 32 px
  PNG) plus CORRUPT_FILES; {relative path: label} of the good images."""
  written = write_digits_folder(root, per_class=20)
  for rel, data in CORRUPT_FILES.items():
    with open(os.path.join(root, rel), "wb") as f:
      f.write(data)
  return written


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
  """200 real digit images (20 per class, 32 px PNG) plus three corrupt files."""
  with built_once(tmp_path_factory, "digits") as (root, done):
    if done:
      written = write_test_digits(str(root))
      (root.parent / "shared-digits.json").write_text(json.dumps(written))
      done()
    written = json.loads((root.parent / "shared-digits.json").read_text())
  return str(root), written


@pytest.fixture(scope="session")
def source_shards(digits_folder, tmp_path_factory):
  from data_prep import ingest
  with built_once(tmp_path_factory, "sources") as (root, done):
    out = str(root / "digits")
    if done:
      ingest.run([f"--images={digits_folder[0]}", f"--out={out}", "--num_shards=2"])
      done()
  with open(os.path.join(out, "manifest.json")) as f:
    return out, json.load(f)


def load_source_arrays(folder, resolution=32):
  """All images of a source shards folder, center-cropped, with labels and ids."""
  from mnv4_train.data import augment, records
  ds = tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(os.path.join(folder, "shard-*"))))
  xs, ys, ids = [], [], []
  for ex in ds.map(records.parse_source):
    xs.append(augment.center_crop(augment.decode(ex["image/encoded"]), resolution, 1.0).numpy())
    ys.append(int(ex["image/label"]))
    ids.append(ex["image/id"].numpy().decode())
  return np.stack(xs), np.array(ys), ids


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory):
  """A tiny MNv4-Conv-S trained on the digits shards, as a .keras file: the committed weights
  of tests/fixtures/make_teacher.py (the same teacher in every run, on every CPU)."""
  from tests.fixtures import make_teacher
  with built_once(tmp_path_factory, "teacher") as (root, done):
    path = str(root / "teacher.keras")
    if done:
      model = make_teacher.build()
      model.load_weights(make_teacher.WEIGHTS)
      model.save(path)
      done()
  return path


@pytest.fixture(scope="session")
def distill_records(source_shards, teacher_path, tmp_path_factory):
  """D1 (2 replicas, full logits) and D2 (1 replica, top-3 logits) built by the Beam job.

  D1 has the recipes' JPEG round trip; D2 is built without it, so that a mixture of the two
  replays two JPEG settings."""
  from data_prep import distill
  with built_once(tmp_path_factory, "distill") as (root, done):
    d1, d2 = str(root / "d1"), str(root / "d2")
    if done:
      src = source_shards[0]
      distill.run(["--recipe=d1", f"--source={src}", f"--teacher={teacher_path}",
                   f"--out={d1}", "--replicas=2", "--batch_size=32"])
      distill.run(["--recipe=d2", f"--source={src}", f"--teacher={teacher_path}",
                   f"--out={d2}", "--replicas=1", "--top_k=3", "--batch_size=32",
                   "--jpeg_quality=0"])
      done()
  return {"d1": d1, "d2": d2}
