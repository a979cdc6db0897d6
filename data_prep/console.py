"""What a person sees while a data_prep job runs: one start line, a progress line, what matters.

    14:02:11 ingest: writing /tmp/ws/sources/digits
    14:02:31 ingest: 1,204/1,797 images (67%), 61.2 images/s, ETA 0:10
    14:02:41 ingest: 1,797/1,797 images in 0:30, 59.9 images/s; images_corrupt=3 images_ok=1,794 ...
    14:02:41 ingest: 1,794 images in 10 classes, 2 shards, 3 dead letters -> /tmp/ws/sources/digits

These go to stdout; on a terminal the progress line is redrawn in place, into a pipe or a log
file it is printed every `PRINT_EVERY_S` seconds. Warnings and errors (this process's and the
workers') go to stderr as they come. `--verbose` prints everything the libraries log instead.

How, on the DirectRunner's `multi_processing` mode (worker processes that Beam starts itself):
- The workers inherit this process's stdout and stderr and print their import notices and
  harness INFO lines there. While a pipeline runs, the console points both at a pipe it reads
  (`mnv4_train.cli.NativeOutput`) and keeps it out of view; the last lines are shown if the
  pipeline fails.
- Workers forward their log records to this process through Beam's logging service; they arrive
  on Beam's `local_job_service` logger as `Worker: <LogEntry>`. The console shows those at
  WARNING and above as `worker: <message>`, and workers log at WARNING unless `--verbose`
  (`--default_sdk_harness_log_level`, set only when the command line does not).
- Progress: Beam counters reach the runner only when a bundle completes, and the DirectRunner
  reports none while it runs. `ReportProgress`, a pass-through step, logs how many elements went
  through it (every `REPORT_EVERY_S` and at the end of each bundle) on the `data_prep.progress`
  logger, which travels the same forwarding path (or stays in this process with the in-process
  runners). The job's Beam counters are printed when it finishes.

Nothing here is active unless a job runs from its command line (`files.job_main`): run from
Python (tests, notebooks), the jobs leave logging as the caller set it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import threading
import time

import apache_beam as beam

from mnv4_train.cli import NativeOutput
from mnv4_train.errors import first_line
from mnv4_train.ownership import storage_problem

PROGRESS_LOGGER = "data_prep.progress"
PROGRESS_TAG = "mnv4-progress"
WORKER_LOGS = "apache_beam.runners.portability.local_job_service"  # where worker logs arrive
REPORT_EVERY_S = 0.5  # a worker's progress messages, at most this often per bundle
PRINT_EVERY_S = 10.0  # the progress line when the console is not a terminal
VERBOSE_HELP = "print everything Beam, TensorFlow and the worker processes log"
NAMESPACE = "mnv4"  # the jobs' Beam counters (`transforms.NAMESPACE`), printed when a job ends

# Notices that are not the user's concern: Beam's optional GCP clients (the `gcp` extra, not
# needed locally), and what every DirectRunner worker says on start.
NOISE = (
    "Failed to import GCSFileSystem",
    "apitools not found",
    "No semi_persistent_directory found",
    "No session file found",
    "Discarding unparseable args",
    "Resource module is not available",
)

# The harness's report of a failed bundle: the same error again, with Beam's frames.
HARNESS_ERROR = "Error processing instruction"

_console: Console | None = None


def start(prog: str, verbose: bool) -> Console:
  """Sets up the console of a job's command line (called once, by `files.job_main`)."""
  global _console
  _console = Console(prog, verbose)
  return _console


def expect(total: int | None, unit: str) -> None:
  """Declares the work of the job's next pipeline: `total` elements (None: unknown) of `unit`."""
  if _console is not None:
    _console.expected = (total, unit)


@contextlib.contextmanager
def running(pipeline):
  """Shows progress while `pipeline` runs in this block, then its counters (when a console is on)."""
  if _console is None:
    yield
    return
  with _console.running(pipeline):
    yield


def _is_noise(message: str) -> bool:
  return any(n in message for n in NOISE)


class Console:
  """The console of one job process: a logging handler, the progress line, the capture."""

  def __init__(self, prog, verbose):
    self.name = prog.rsplit(".", 1)[-1]
    self.verbose = verbose
    # Progress and INFO on stdout, warnings and errors on stderr (a user error stays the one
    # line there); our own copies, as the capture redirects fds 1 and 2 while a pipeline runs.
    self.stream, self.errors = (open(os.dup(f.fileno()), "w", buffering=1,
                                     errors="backslashreplace")
                                for f in (sys.stdout, sys.stderr))
    self.tty = self.stream.isatty()
    self.lock = threading.RLock()
    self.progress: _Progress | None = None
    self.expected: tuple[int | None, str] = (None, "elements")
    self._drawn = False  # a progress line is on screen without its newline (terminal)
    self.worker_errors = 0
    root = logging.getLogger()
    for handler in list(root.handlers):
      root.removeHandler(handler)
    root.addHandler(_Handler(self))
    root.setLevel(logging.INFO)
    logging.getLogger(PROGRESS_LOGGER).setLevel(logging.DEBUG)
    logging.getLogger(WORKER_LOGS).setLevel(logging.DEBUG)  # progress arrives at DEBUG

  # ---- output ----

  def write(self, line: str, error=False) -> None:
    with self.lock:
      if self._drawn:
        self.stream.write("\r\033[K")
        self.stream.flush()
        self._drawn = False
      out = self.errors if error else self.stream
      out.write(line + "\n")
      out.flush()
      if self.progress is not None and self.tty and not self.verbose:
        self._draw()
        self.stream.flush()

  def _draw(self):
    self.stream.write("\r\033[K" + self._stamp(self.progress.text()))
    self._drawn = True

  @staticmethod
  def _stamp(text):
    return f"{time.strftime('%H:%M:%S')} {text}"

  def line(self, text: str, error=False) -> None:
    self.write(self._stamp(text), error)

  # ---- a pipeline run ----

  @contextlib.contextmanager
  def running(self, pipeline):
    if not self.verbose:
      from apache_beam.options.pipeline_options import WorkerOptions
      worker = pipeline.options.view_as(WorkerOptions)
      if worker.default_sdk_harness_log_level is None:
        worker.default_sdk_harness_log_level = "WARNING"
    total, unit = self.expected
    self.expected = (None, "elements")
    progress = _Progress(self.name, total, unit)
    with self.lock:
      self.progress = progress
    stop = threading.Event()
    ticker = threading.Thread(target=self._tick, args=(progress, stop), daemon=True)
    ticker.start()
    # fds 1 and 2, which the worker processes inherit, into a pipe; the last lines kept.
    capture = contextlib.nullcontext() if self.verbose else NativeOutput(fds=(1, 2), keep=200)
    try:
      with capture:
        yield
    except BaseException as e:
      self._stop(ticker, stop)
      # A worker that died without reporting an error (a crash, an import failure) said why
      # only on its own stderr. A full disk is said in one line by the job.
      tail = [l for l in getattr(capture, "tail", ()) if not _is_noise(l)
              and not l.startswith(("INFO:", "DEBUG:"))]
      if tail and not self.worker_errors and storage_problem(e, "") is None:
        self.line(f"{self.name}: the pipeline failed; the worker processes' last output:", True)
        for l in tail[-20:]:
          self.write("  " + l, True)
      raise
    self._stop(ticker, stop)
    counters = _counters(getattr(pipeline, "result", None))
    text = progress.text(final=True)
    if counters:
      text += "; " + " ".join(f"{k}={v:,}" for k, v in sorted(counters.items()))
    self.line(text)

  def _stop(self, ticker, stop):
    stop.set()
    ticker.join()
    with self.lock:
      self.progress = None
      if self._drawn:
        self.stream.write("\r\033[K")
        self._drawn = False
        self.stream.flush()

  def _tick(self, progress, stop):
    last_print, last_done = time.monotonic(), 0
    while not stop.wait(0.25 if self.tty else 1.0):
      with self.lock:
        if self.tty and not self.verbose:
          self._draw()
          self.stream.flush()
        elif (time.monotonic() - last_print >= PRINT_EVERY_S and progress.done
              and progress.done != last_done):
          last_print, last_done = time.monotonic(), progress.done
          self.stream.write(self._stamp(progress.text()) + "\n")
          self.stream.flush()


class _Progress:
  """Elements done of a total, with a rate and an ETA.

  The rate is over the reports after the first (workers take seconds to start, and the first
  report's elements took an unknown time), up to the last one: it holds still while later
  stages (grouping, writing) run.
  """

  def __init__(self, name, total, unit):
    self.name, self.total, self.unit = name, total, unit
    self.done = 0
    self.start = time.monotonic()
    self.first = None  # (time, done) at the first report
    self.last = None  # (time, done) at the latest report

  def add(self, n: int) -> None:
    self.done += n
    self.last = (time.monotonic(), self.done)
    if self.first is None:
      self.first = self.last

  def rate(self) -> float | None:
    if self.first is None or self.last[0] - self.first[0] < 1.0:
      return None
    return (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])

  def text(self, final=False) -> str:
    done, total, unit = self.done, self.total, self.unit
    out = f"{self.name}: {done:,}/{total:,} {unit}" if total else f"{self.name}: {done:,} {unit}"
    rate = self.rate()
    if final:
      elapsed = time.monotonic() - self.start
      rate = rate if rate is not None else done / max(elapsed, 1e-9)
      return f"{out} in {_clock(elapsed)}, {rate:.1f} {unit}/s"
    if total:
      out += f" ({100 * done / total:.0f}%)"
    if self.first is None:
      return out + ", starting"
    if rate is not None:
      out += f", {rate:.1f} {unit}/s"
    if total and done >= total:
      return out + ", finishing"
    if total and rate:
      out += f", ETA {_clock((total - done) / rate)}"
    return out


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _counters(result) -> dict[str, int]:
  """The job's Beam counters (namespace `mnv4`), summed over steps."""
  if result is None:
    return {}
  from apache_beam.metrics.metric import MetricsFilter
  try:
    found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
  except (NotImplementedError, AttributeError, KeyError):
    return {}
  totals = collections.Counter()
  for r in found:
    value = r.committed if r.committed is not None else r.attempted
    totals[r.key.metric.name] += int(value or 0)
  return dict(totals)


# ---- log records --------------------------------------------------------------------------------

def _worker_entry(text: str):
  """A forwarded worker LogEntry (text format) -> (level, message, trace), or None."""
  from google.protobuf import text_format
  from apache_beam.portability.api import beam_fn_api_pb2
  from apache_beam.runners.worker.log_handler import LOGENTRY_TO_LOG_LEVEL_MAP
  entry = beam_fn_api_pb2.LogEntry()
  try:
    text_format.Parse(text, entry)
  except text_format.ParseError:
    return None
  return LOGENTRY_TO_LOG_LEVEL_MAP.get(entry.severity, logging.INFO), entry.message, entry.trace


_OUR_CODE = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d, "")
                  for d in ("data_prep", "mnv4_train"))


def _ours(record) -> bool:
  """Whether this project logged it (the jobs log on the root logger, as Beam sometimes does)."""
  return record.pathname.startswith(_OUR_CODE)


class _Handler(logging.Handler):
  """Routes records: progress to the progress line, the rest to the console or nowhere."""

  def __init__(self, console):
    super().__init__()
    self.console = console

  def emit(self, record):
    try:
      self._emit(record)
    except Exception:  # a handler must not raise into the code that logged
      self.handleError(record)

  def _emit(self, record):
    console = self.console
    if record.name == PROGRESS_LOGGER:  # in-process runners: the DoFn ran here
      self._add_progress(record.getMessage())
      return
    if record.name == WORKER_LOGS and record.msg == "Worker: %s" and record.args:
      text = str(record.args[0])
      if PROGRESS_TAG in text:
        entry = _worker_entry(text)
        if entry and entry[1].startswith(PROGRESS_TAG):
          self._add_progress(entry[1])
          return
      if console.verbose:
        console.write(self._verbose(record), record.levelno >= logging.WARNING)
        return
      entry = _worker_entry(text)
      if entry is None:
        return
      level, message, _ = entry
      if level < logging.WARNING or _is_noise(message) or message.startswith(HARNESS_ERROR):
        return
      if level >= logging.ERROR:
        console.worker_errors += 1  # its traceback comes with the pipeline's exception
        message = first_line(message)
      console.line(f"{logging.getLevelName(level).lower()}: worker: {message}", True)
      return
    if console.verbose:
      console.write(self._verbose(record), record.levelno >= logging.WARNING)
      return
    message = record.getMessage()
    if _is_noise(message) or (record.levelno < logging.WARNING and not _ours(record)):
      return
    if record.exc_info and record.levelno >= logging.ERROR and not _ours(record):
      # The runner's report of a failed step: the same exception reaches the job, which says
      # it in one line (a user's fault, a damaged file, a full disk) or with its traceback.
      return
    error = record.levelno >= logging.WARNING
    if error:
      message = f"{record.levelname.lower()}: {message}"
    console.line(message, error)
    if record.exc_info and error:
      console.write(logging.Formatter().formatException(record.exc_info), True)

  def _add_progress(self, message):
    progress = self.console.progress
    if progress is not None:
      progress.add(int(message.rsplit(" ", 1)[-1]))

  @staticmethod
  def _verbose(record):
    text = f"{time.strftime('%H:%M:%S')} {record.levelname}:{record.name}: {record.getMessage()}"
    if record.exc_info:
      text += "\n" + logging.Formatter().formatException(record.exc_info)
    return text


# ---- the progress signal ------------------------------------------------------------------------

class ReportProgress(beam.PTransform):
  """Passes elements through unchanged, counting them toward the job's progress line.

  `weight(element)` is how many of the job's units an element holds (a batch of images: its
  size); default 1. Reports only on local runners: on a remote runner the progress messages
  would be log entries in its logging service.
  """

  def __init__(self, weight=None, label=None):
    super().__init__(label)
    self.weight = weight

  def expand(self, pcoll):
    from apache_beam.options.pipeline_options import StandardOptions
    runner = pcoll.pipeline.options.view_as(StandardOptions).runner
    local = runner is None or "direct" in str(runner).lower()
    return pcoll | "Count" >> beam.ParDo(_ReportProgress(self.weight, local))


class _ReportProgress(beam.DoFn):

  def __init__(self, weight, enabled):
    self.weight = weight
    self.enabled = enabled

  def setup(self):
    self.log = logging.getLogger(PROGRESS_LOGGER)
    if not self.enabled:
      return
    # In a worker process, send progress through Beam's log forwarding only (not to the
    # worker's own stderr), whatever the worker's log level.
    from apache_beam.runners.worker.log_handler import FnApiLogRecordHandler
    forward = [h for h in logging.getLogger().handlers if isinstance(h, FnApiLogRecordHandler)]
    if forward:
      self.log.handlers = forward[:1]
      self.log.propagate = False
      self.log.setLevel(logging.DEBUG)

  def start_bundle(self):
    self.pending = 0
    self.last = time.monotonic()

  def process(self, element):
    if self.enabled:
      self.pending += self.weight(element) if self.weight else 1
      if time.monotonic() - self.last >= REPORT_EVERY_S:
        self._report()
    yield element

  def finish_bundle(self):
    if self.enabled:
      self._report()

  def _report(self):
    self.last = time.monotonic()
    if self.pending:
      self.log.debug("%s %d", PROGRESS_TAG, self.pending)
      self.pending = 0
