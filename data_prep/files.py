"""Output plumbing shared by the Beam jobs: staged runs, TFRecord files, manifests, CLI wrapper.

Every job writes into `<out>.tmp/` and `commit()` moves it to `<out>/` only after the pipeline
finished, with `manifest.json` moved last: a folder with a manifest is complete, anything else
is not. A job removes only what it made: `--out` may not overlap an input, an existing `--out`
is replaced only when it is a finished output of the same kind (with `--overwrite`), and the
staging folder carries this project's claim file (`mnv4_train.ownership`), which is also the
lock that keeps a second job off the same output. Paths go through `tf.io.gfile`, so local
folders and `gs://` buckets work alike.
"""

from __future__ import annotations

import json
import os
import time

import tensorflow as tf

from data_prep import console
from mnv4_train import ownership
from mnv4_train.data import formats
from mnv4_train.errors import InputPathError, UserError, exit_on_user_error, first_line

MANIFEST = formats.MANIFEST
# A job creates `<out>.tmp` and writes its claim a moment later; a second job that finds the
# folder without a claim waits this long for one before calling the folder someone else's.
CLAIM_GRACE_S = 3.0


class OutputExistsError(UserError):
  """The output folder is already complete."""


def check_out(out: str, overwrite: bool, kind: type[formats.Manifest], inputs: dict) -> None:
  """Refuses, before any work, an `--out` this job must not write (one line each).

  `out` must not overlap an input (`ownership.check_overlap`); if it exists it must be an empty
  folder or a finished output of `kind` (replaced only with `overwrite`); nothing else is ever
  replaced.
  """
  ownership.check_overlap(out, inputs)
  if not tf.io.gfile.exists(out):
    return
  if not tf.io.gfile.isdir(out):
    raise InputPathError(f"--out {out} is a file; give a folder (it is never replaced)")
  if tf.io.gfile.exists(os.path.join(out, MANIFEST)):
    try:
      formats.read(out, "--out", kind)
    except InputPathError:
      raise InputPathError(f"--out {out} holds another kind of output than {kind.WRITER} "
                           "writes (or a damaged one); it is never replaced: choose another "
                           "--out") from None
    if not overwrite:
      raise OutputExistsError(f"{out} already holds a finished output; pass --overwrite to "
                              "rebuild it or choose another --out")
    return
  if tf.io.gfile.listdir(out):
    raise InputPathError(f"--out {out} exists and is not a finished output of {kind.WRITER} "
                         f"(no {MANIFEST}); it is never replaced: choose another --out or move "
                         "it away")


def staging_dir(out: str, what: str = "--out") -> tuple[str, ownership.Claim]:
  """Creates and claims `<out>.tmp`; returns it with the claim (one line if another job holds
  it, or if it exists and was not made by this project). A staging folder left by a job that
  is gone is emptied and taken over."""
  out = out.rstrip("/")
  tmp = out + ".tmp"
  if tf.io.gfile.exists(tmp):
    if not tf.io.gfile.isdir(tmp) or not _claimed_soon(tmp):
      raise InputPathError(f"{tmp} exists and was not made by this project (no "
                           f"{ownership.OWNER}); it is never removed: move it away or choose "
                           "another --out")
  try:
    tf.io.gfile.makedirs(tmp)
  except (tf.errors.OpError, OSError) as e:
    raise InputPathError(f"cannot create {tmp}: {first_line(e)}; check --out and its "
                         "permissions") from None

  def clear(_):
    for name in tf.io.gfile.listdir(tmp):
      if name.rstrip("/") != ownership.OWNER:
        path = os.path.join(tmp, name.rstrip("/"))
        (tf.io.gfile.rmtree if tf.io.gfile.isdir(path) else tf.io.gfile.remove)(path)

  claim = ownership.claim(tmp, what, on_stale=clear)
  return tmp, claim


def _claimed_soon(tmp: str) -> bool:
  """Whether the staging folder `tmp` holds (or within CLAIM_GRACE_S gets) a claim: a job
  that has just created it writes its claim right after."""
  deadline = time.monotonic() + CLAIM_GRACE_S
  while True:
    if ownership.read_owner(tmp) is not None:
      return True
    if time.monotonic() >= deadline or not tf.io.gfile.exists(tmp):
      return ownership.read_owner(tmp) is not None
    time.sleep(0.1)


def commit(tmp: str, out: str, kind: type[formats.Manifest]) -> None:
  """Moves a finished staging folder to `out`, manifest last (atomic rename when local).

  An existing `out` is removed only if it still is what `check_out` allowed: an empty folder or
  a finished output of `kind`.
  """
  out = out.rstrip("/")
  if tf.io.gfile.exists(out):
    if tf.io.gfile.exists(os.path.join(out, MANIFEST)):
      formats.read(out, "--out", kind)  # still ours to replace
      tf.io.gfile.rmtree(out)
    elif tf.io.gfile.listdir(out):
      raise InputPathError(f"--out {out} was filled by something else while the job ran; "
                           f"nothing was replaced, the finished output is in {tmp}")
    elif "://" not in out:
      os.rmdir(out)  # refuses, rather than removes, a folder filled since the check above
    else:
      tf.io.gfile.rmtree(out)
  if "://" not in out:
    os.replace(tmp, out)
  else:
    files = sorted(tf.io.gfile.walk(tmp))
    manifest = None
    for folder, _, names in files:
      for name in names:
        src = os.path.join(folder, name)
        dst = os.path.join(out, os.path.relpath(src, tmp))
        if folder.rstrip("/") == tmp and name in (MANIFEST, ownership.OWNER):
          if name == MANIFEST:
            manifest = (src, dst)
          continue
        tf.io.gfile.makedirs(os.path.dirname(dst))
        tf.io.gfile.rename(src, dst, overwrite=True)
    if manifest:
      tf.io.gfile.rename(*manifest, overwrite=True)
  owner = os.path.join(out, ownership.OWNER)
  if tf.io.gfile.exists(owner):
    tf.io.gfile.remove(owner)
  if "://" in out and tf.io.gfile.exists(tmp):
    tf.io.gfile.rmtree(tmp)


def run_staged(*, out: str, overwrite: bool, pipeline, build, manifest: type[formats.Manifest],
               inputs: dict | None = None):
  """Runs `build(pipeline, tmp)` into `<out>.tmp`, commits it to `out`, returns the manifest
  (`manifest`, the format's typed record) the pipeline wrote.

  Before any work: `check_out` (no overlap with `inputs`, a flag -> path map; only a finished
  output of the same kind is replaced, with `overwrite`) and the claim on `<out>.tmp` (one
  writer). A pipeline that fails leaves nothing behind: the staging folder is removed; one
  killed leaves a claimed `<out>.tmp` (never a finished-looking `out`) that the next run takes
  over.
  """
  check_out(out, overwrite, manifest, inputs or {})
  tmp, claim = staging_dir(out)
  try:
    with console.running(pipeline), pipeline:
      build(pipeline, tmp)
  except BaseException as e:
    _remove_quietly(tmp)
    problem = ownership.storage_problem(e, f"{out}.tmp")
    if problem is not None:
      raise problem from None
    raise
  if not tf.io.gfile.exists(os.path.join(tmp, MANIFEST)):
    tf.io.gfile.rmtree(tmp)
    raise InputPathError(f"the job finished without writing its {MANIFEST} (the output "
                         "storage lost it?); nothing was committed, run it again")
  try:
    commit(tmp, out, manifest)
  except (tf.errors.OpError, OSError) as e:
    problem = ownership.storage_problem(e, out)
    if problem is not None:
      raise problem from None
    raise
  del claim  # moved with the folder and removed from it by commit
  return manifest.read(out, "--out")


def _remove_quietly(folder):
  try:
    tf.io.gfile.rmtree(folder)
  except (tf.errors.OpError, OSError):
    pass


def job_main(prog: str, run, argv) -> None:
  """A job's command line: a console for people (`console.py`; everything with --verbose), and
  user mistakes as one line with exit status 2."""
  console.start(prog, verbose="--verbose" in argv)
  with exit_on_user_error(prog):
    run(argv)


def write_tfrecords(path: str, records) -> int:
  """Writes serialized records to one TFRecord file; returns how many."""
  n = 0
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)
      n += 1
  return n


def read_tfrecords(path: str):
  """Yields the serialized records of one TFRecord file, in order."""
  for record in tf.data.TFRecordDataset(path):
    yield record.numpy()


def write_json(path: str, obj) -> None:
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def shard_name(prefix: str, index: int, count: int) -> str:
  return f"{prefix}-{index:05d}-of-{count:05d}.tfrecord"


def make_pipeline(beam_args):
  """A Beam pipeline for the job's standard Beam flags (--runner, --direct_num_workers, ...).

  Left to itself, Beam's DirectRunner first tries its Prism runner, which downloads a binary at
  run time (and, offline, fails and falls back). Locally we go straight to what it falls back
  to, the FnApiRunner, with the same options (--direct_num_workers, --direct_running_mode), so
  a local job fetches nothing. Any other --runner (DataflowRunner, ...) is used as given.
  """
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.options import pipeline_options  # pylint: disable=import-outside-toplevel
  options = pipeline_options.PipelineOptions(beam_args)
  runner = options.view_as(pipeline_options.StandardOptions).runner
  if runner not in (None, "DirectRunner", "direct"):
    return beam.Pipeline(options=options)
  # pylint: disable=import-outside-toplevel
  from apache_beam.portability.api import beam_provision_api_pb2
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  from apache_beam.runners.portability.portable_runner import JobServiceHandle
  encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
  info = fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
  return beam.Pipeline(runner=fn_runner.FnApiRunner(provision_info=info), options=options)
