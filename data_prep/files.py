"""Output plumbing shared by the Beam jobs: staged runs, TFRecord files, manifests, CLI wrapper.

Every job writes into `<out>.tmp/` and `commit()` moves it to `<out>/` only after the pipeline
finished, with `manifest.json` moved last: a folder with a manifest is complete, anything else
is not. Paths go through `tf.io.gfile`, so local folders and `gs://` buckets work alike.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from data_prep import console
from mnv4_train.data import formats
from mnv4_train.errors import InputPathError, UserError, exit_on_user_error

MANIFEST = formats.MANIFEST


class OutputExistsError(UserError):
  """The output folder is already complete."""


def staging_dir(out: str, overwrite: bool) -> str:
  """Checks `out` can be written and returns a fresh `<out>.tmp` folder to write into."""
  out = out.rstrip("/")
  if tf.io.gfile.exists(os.path.join(out, MANIFEST)) and not overwrite:
    raise OutputExistsError(f"{out} already holds a finished output; pass --overwrite to "
                            "rebuild it or choose another --out")
  tmp = out + ".tmp"
  if tf.io.gfile.exists(tmp):
    tf.io.gfile.rmtree(tmp)  # a previous run that did not finish
  try:
    tf.io.gfile.makedirs(tmp)
  except (tf.errors.OpError, OSError) as e:
    raise InputPathError(f"cannot create {tmp}: {e}; check --out and its permissions") from None
  return tmp


def commit(tmp: str, out: str) -> None:
  """Moves a finished staging folder to `out`, manifest last (atomic rename when local)."""
  out = out.rstrip("/")
  if tf.io.gfile.exists(out):
    tf.io.gfile.rmtree(out)
  if "://" not in out:
    os.replace(tmp, out)
    return
  files = sorted(tf.io.gfile.walk(tmp))
  manifest = None
  for folder, _, names in files:
    for name in names:
      src = os.path.join(folder, name)
      dst = os.path.join(out, os.path.relpath(src, tmp))
      if name == MANIFEST and folder.rstrip("/") == tmp:
        manifest = (src, dst)
        continue
      tf.io.gfile.makedirs(os.path.dirname(dst))
      tf.io.gfile.rename(src, dst, overwrite=True)
  if manifest:
    tf.io.gfile.rename(*manifest, overwrite=True)
  tf.io.gfile.rmtree(tmp)


def run_staged(*, out: str, overwrite: bool, pipeline, build, manifest: type[formats.Manifest]):
  """Runs `build(pipeline, tmp)` into `<out>.tmp`, commits it to `out`, returns the manifest
  (`manifest`, the format's typed record) the pipeline wrote.

  A pipeline that fails leaves nothing behind: the staging folder is removed.
  """
  tmp = staging_dir(out, overwrite)
  try:
    with console.running(pipeline), pipeline:
      build(pipeline, tmp)
  except BaseException:
    tf.io.gfile.rmtree(tmp)
    raise
  commit(tmp, out)
  return manifest.read(out, "--out")


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
