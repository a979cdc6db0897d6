"""Verify: read a dataset folder whole and check it against its manifest (writes nothing).

    python -m data_prep.verify DIR [--verbose] [standard Beam options: --runner=DataflowRunner
        --temp_location=gs://... | --direct_num_workers=2 --direct_running_mode=multi_processing]

DIR is a finished stage output; its manifest says which kind it is:
  source shards         (mnv4-source-shards, data_prep.ingest)
  a D3 selection        (mnv4-d3-selection, data_prep.select_d3)
  distillation records  (mnv4-distill-records, data_prep.distill)

What it checks, one Beam element per file (so a large folder is checked on Dataflow as it
was built), plus a few checks of the manifest itself:
  - every file the manifest lists exists, with the size it records (where it does), and no
    record file it does not list lies in the folder;
  - every TFRecord's framing and both CRCs (length and data), read by this module's own framing
    reader: a length field larger than what is left of the file is reported as truncation
    before anything is allocated (TensorFlow's readers crash on such a header);
  - every record parses in its layout (`mnv4_train/data/records.py`), and its fields agree with
    the manifest and the file it is in (recipe, replica, shard, class count, logits size, sort
    order); source shards: ids sorted, unique and in the shard their hash names;
  - per-file counts and the totals (per class too) against the manifest;
  - every id refers to an existing source example: a distillation record's source (and mixup
    partner) position and id match the source shard it replays, a D3 record's copy is one the
    selection asks for; a selection row's `source_shard`/`source_index`/`id` match the corpus.

It prints a summary (kind, files, records checked, problems), each problem as one line
(`file: what is wrong`; at most 5 per file plus what ended a file's reading and its count, then
one line with the rest's number; the first 20 in file order, then "... and N more") and the
command that rebuilds the folder. Exit status: 0 clean, 1 problems found (a damaged manifest
of a known format included), 2 a user error (no manifest, a format this command does not know,
a bad flag). The summary travels back from the workers in one small JSON file under
--temp_location (on the local runners, a temporary folder), removed once read; nothing is
written into DIR.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import math
import os
import re
import struct
import sys
import tempfile
import uuid

if __name__ == "__main__":  # the command line: TensorFlow's C++ start-up lines are noise
  from mnv4_train.cli import quiet_tensorflow  # first: the imports below load TensorFlow
  quiet_tensorflow()  # (not with --verbose)

import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from crcmod.predefined import mkPredefinedCrcFun  # noqa: E402
from google.protobuf.message import DecodeError  # noqa: E402

from data_prep import console, files, select_d3, transforms  # noqa: E402
from mnv4_train.data import augment, formats, records  # noqa: E402
from mnv4_train.errors import (  # noqa: E402
    ArgumentParser, ConfigError, FormatError, UserError, first_line, run_then_exit)

MANIFEST = formats.MANIFEST
KINDS = (formats.SourceShards, formats.D3Selection, formats.DistillRecords)
MAX_SHOWN = 20  # problem lines printed; the rest are counted
MAX_PER_FILE = 5  # problem lines kept per file (the rest of a file's: one line with their count)
MAX_RECORD_BYTES = 2**31  # no record of ours comes near; a protobuf cannot be larger
REFS, LABELS = "refs", "labels"
SHARD_NAME = re.compile(r"shard-(\d{5})-of-(\d{5})\.tfrecord")
RECORD_FILE = re.compile(r"r(\d{4,})/(shard-\d{5}-of-\d{5}\.tfrecord)")
WHAT = "dataset"
DATA_CRC = "fails its data checksum: its bytes are corrupt"


def parse_args(argv):
  parser = ArgumentParser(prog="data_prep.verify", description=__doc__.split("\n")[0])
  parser.add_argument("dir", help="a stage output folder (source shards, a D3 selection or "
                      "distillation records; local or gs://)")
  parser.add_argument("--verbose", action="store_true", help=console.VERBOSE_HELP)
  return parser.parse_known_args(argv)


# ---- TFRecord framing ---------------------------------------------------------------------------

_crc32c = mkPredefinedCrcFun("crc-32c")


def masked_crc(data: bytes) -> int:
  """TFRecord's masked CRC-32C of `data`."""
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frames(read, size: int):
  """The records of a TFRecord stream of `size` bytes: yields (index, payload, problem).

  `payload` is the record's bytes, or None with a `problem`: a data CRC that fails (the framing
  still holds: reading goes on, and the record counts as one), or a damaged header (length CRC)
  or a length that runs past the end of the stream, which ends the stream (index is then the
  number of records framed before it). A length is checked against what is left before
  anything is read or allocated.
  """
  offset, index = 0, 0
  while offset < size:
    header = read(12)
    if len(header) < 12:
      yield index, None, (f"the file ends inside the header of record {index} (byte "
                          f"{offset:,}): it is truncated")
      return
    length, length_crc = struct.unpack("<QI", header)
    if masked_crc(header[:8]) != length_crc:
      yield index, None, (f"record {index} (byte {offset:,}) has a damaged header (its length "
                          "checksum does not match): the bytes are corrupt; nothing after it "
                          "can be read")
      return
    left = size - offset - 12
    if length > min(left - 4, MAX_RECORD_BYTES):
      yield index, None, (f"record {index} (byte {offset:,}) needs {length + 4:,} more bytes but "
                          f"the file has {max(left, 0):,} left: it is truncated")
      return
    body = read(length + 4)
    if len(body) < length + 4:
      yield index, None, (f"record {index} (byte {offset:,}) is cut off: the file ended while "
                          "it was read (truncated, or changed during the check)")
      return
    data = body[:length]
    if masked_crc(data) != struct.unpack("<I", body[length:])[0]:
      yield index, None, f"record {index} (byte {offset:,}) {DATA_CRC}"
    else:
      yield index, data, None
    offset += 16 + length
    index += 1


# ---- one file's result ------------------------------------------------------------------------

class FileResult:
  """What checking one file found: records, problem lines ((text, weight)), and for the
  later steps label counts (source shards) and id references (into source shards)."""

  def __init__(self, rel: str):
    self.rel = rel
    self.records = 0
    self.lines: list[tuple[str, int]] = []
    self.extra = 0  # problems past MAX_PER_FILE
    self.labels: collections.Counter = collections.Counter()
    self.refs: dict = {}  # source shard -> payload (see _add_ref)

  @property
  def problems(self) -> int:
    return len(self.lines) + self.extra

  def problem(self, text: str, keep: bool = False) -> None:
    """Notes a problem; past MAX_PER_FILE lines only counted, unless `keep` (what ended the
    reading of a file, its count)."""
    if keep or len(self.lines) < MAX_PER_FILE:
      self.lines.append((f"{self.rel}: {text}", 1))
    else:
      self.extra += 1

  def finish(self) -> list[tuple[str, int]]:
    out = list(self.lines)
    if self.extra:
      out.append((f"{self.rel}: {self.extra:,} more problem{'s' if self.extra != 1 else ''} "
                  "in this file", self.extra))
    return out


def _refs(result: FileResult, shard: int, **extra) -> dict:
  """The references of `result` into one source shard: {position: (id, record)} plus extras."""
  if shard not in result.refs:
    result.refs[shard] = {"rel": result.rel, "ids": {}, **extra}
  return result.refs[shard]


def _add_ref(result, payload, position, example_id, record):
  """Notes that `record` names `example_id` at `position`; a second, different id for the
  same position in one file is a problem here (the source shard holds only one)."""
  known = payload["ids"].get(position)
  if known is None:
    payload["ids"][position] = (example_id, record)
  elif known[0] != example_id:
    result.problem(f"record {record} names {_q(example_id)} at source position {position}, "
                   f"record {known[1]} names {_q(known[0])} there")


# ---- reading ----------------------------------------------------------------------------------

def _stat(task, result: FileResult):
  """The file's size, or None (a problem noted) when it is missing or unreadable."""
  try:
    stat = tf.io.gfile.stat(task["path"])
  except tf.errors.NotFoundError:
    expect = task.get("count")
    result.problem("missing" + (f" (the manifest lists it with {expect:,} records)"
                                if expect is not None else ""))
    return None
  except tf.errors.OpError as e:
    result.problem(f"cannot be read: {_op_text(e)}")
    return None
  if stat.is_directory:
    result.problem("is a folder, not a file")
    return None
  expected = task.get("bytes")
  if expected is not None and stat.length != expected:
    result.problem(f"is {stat.length:,} bytes, the manifest records {expected:,}: it was cut "
                   "off or changed after it was written")
  return stat.length


def _op_text(error) -> str:
  text = getattr(error, "message", None) or str(error) or type(error).__name__
  return " ".join(text.split())[:200]


def _read_tfrecords(task, result: FileResult, on_record) -> bool:
  """Frames the file's records and calls on_record(index, payload) for each readable one;
  counts records. False when the file could not be read to its end."""
  size = _stat(task, result)
  if size is None:
    return False
  whole = True
  try:
    with tf.io.gfile.GFile(task["path"], "rb") as f:
      for index, payload, problem in tfrecord_frames(f.read, size):
        if problem and not problem.endswith(DATA_CRC):
          result.problem(problem, keep=True)
          whole = False  # the stream ends here
          break
        if problem:
          result.problem(problem)
        result.records += 1
        if payload is not None:
          on_record(index, payload)
  except (tf.errors.OpError, OSError) as e:
    result.problem(f"cannot be read: {_op_text(e)}")
    return False
  return whole


def _example(payload: bytes):
  """A tf.train.Example's features, or None when the bytes are not one."""
  try:
    return tf.train.Example.FromString(payload).features.feature
  except DecodeError:
    return None


class _Bad(Exception):
  """A record field that is absent, of another type or size than its layout."""


def _one(feature, name, kind, size=1):
  """The values of feature `name` when it holds `size` values of `kind` (bytes_list,
  int64_list, float_list); a single value when size is 1."""
  if name not in feature:
    raise _Bad(f"has no '{name}'")
  holder = feature[name]
  if holder.WhichOneof("kind") != kind:
    raise _Bad(f"has '{name}' as {holder.WhichOneof('kind') or 'an empty feature'}, not {kind}")
  values = getattr(holder, kind).value
  if len(values) != size:
    raise _Bad(f"has {len(values)} values in '{name}', not {size}")
  return values[0] if size == 1 else list(values)


def _text(value: bytes) -> str:
  return value.decode("utf-8", "surrogateescape")


def _q(text: str) -> str:
  """An id or name as it reads in a problem line: quoted, at most 60 characters."""
  return repr(text[:60] + "..." if len(text) > 60 else text)


def _optional(feature, name, kind, default):
  """A feature the source layout lets older shards omit (records.SOURCE_FEATURES' defaults)."""
  return _one(feature, name, kind) if name in feature else default


# ---- source shards ----------------------------------------------------------------------------

def _check_source_shard(task, result: FileResult) -> None:
  num_classes, shard, num_shards = task["num_classes"], task["shard"], task["num_shards"]
  state = {"last": None}

  def on_record(index, payload):
    f = _example(payload)
    if f is None:
      result.problem(f"record {index} is not a tf.train.Example")
      return
    try:
      example_id = _text(_one(f, "image/id", "bytes_list"))
      encoded = _one(f, "image/encoded", "bytes_list")
      fmt = _text(_optional(f, "image/format", "bytes_list", b""))
      label = _optional(f, "image/label", "int64_list", -1)
      height = _optional(f, "image/height", "int64_list", None)
      width = _optional(f, "image/width", "int64_list", None)
      original = _text(_optional(f, "image/original_format", "bytes_list", b""))
    except _Bad as e:
      result.problem(f"record {index} {e}")
      return
    problem, named = None, _q(example_id)
    found = records.image_format(encoded)
    if not example_id:
      problem = "has an empty id"
    elif fmt and fmt not in ("jpeg", "png", "gif", "bmp"):
      problem = f"({named}) has image/format {_q(fmt)}, not jpeg, png, gif or bmp"
    elif found not in ("jpeg", "png", "gif", "bmp") or (fmt and found != fmt):
      problem = f"({named}) holds {found or 'no image'} bytes, its image/format says {fmt}"
    elif not (-1 <= label < num_classes if num_classes else label == -1):
      problem = (f"({named}) has label {label}, outside [-1, {num_classes}) (the manifest's "
                 f"{num_classes} classes)")
    elif (height is not None and height < 1) or (width is not None and width < 1):
      problem = f"({named}) is {height}x{width} pixels"
    elif original not in ("", "webp"):
      problem = f"({named}) has image/original_format {_q(original)}"
    elif state["last"] is not None and example_id <= state["last"]:
      problem = f"({named}) is not after {_q(state['last'])}: ids must be unique and sorted"
    elif task["hashed"] and transforms.stable_hash(example_id) % num_shards != shard:
      problem = (f"({named}) belongs in shard "
                 f"{transforms.stable_hash(example_id) % num_shards}, not {shard}")
    state["last"] = max(state["last"] or example_id, example_id)
    if problem:
      result.problem(f"record {index} {problem}")
    result.labels[label] += 1

  whole = _read_tfrecords(task, result, on_record)
  _check_count(task, result, whole)


def _check_count(task, result, whole):
  expected = task.get("count")
  if whole and expected is not None and result.records != expected:
    result.problem(f"holds {result.records:,} records, the manifest lists {expected:,}",
                   keep=True)


# ---- a D3 selection ---------------------------------------------------------------------------

_ROW = {"class": int, "rank": int, "id": str, "score": float, "copies": int,
        "source_shard": int, "source_index": int}


def _read_lines(task, result):
  size = _stat(task, result)
  if size is None:
    return None
  try:
    with tf.io.gfile.GFile(task["path"], "rb") as f:
      data = f.read()
  except (tf.errors.OpError, OSError) as e:
    result.problem(f"cannot be read: {_op_text(e)}")
    return None
  if not data:
    return []
  if not data.endswith(b"\n"):
    result.problem("does not end with a newline: it is truncated")
  return data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n")


def _row(line: bytes):
  """A selection row as a dict, or the reason it is not one."""
  try:
    row = json.loads(line.decode("utf-8"))
  except (ValueError, RecursionError):
    return None, "is not JSON"
  if not isinstance(row, dict):
    return None, "is not a JSON object"
  for key, kind in _ROW.items():
    value = row.get(key)
    ok = (isinstance(value, (int, float)) and math.isfinite(value) if kind is float
          else isinstance(value, kind))
    if isinstance(value, bool) or not ok:
      return None, f"has {key} {str(value)[:30]!r}, not a {kind.__name__}"
  return row, None


def _check_selection_file(task, result: FileResult) -> None:
  lines = _read_lines(task, result)
  if lines is None:
    return
  classes = {int(c): v for c, v in task["classes"].items()}
  shard_counts = task["shard_counts"]
  seen = collections.defaultdict(lambda: [0, 0, None])  # class -> [rows, copies, last score]
  last_key = None
  for index, line in enumerate(lines):
    result.records += 1
    row, why = _row(line)
    if row is None:
      result.problem(f"row {index} {why}")
      continue
    cls, rank = row["class"], row["rank"]
    shard, position = row["source_shard"], row["source_index"]
    key = (cls, rank)
    problem = None
    if cls not in classes:
      problem = (f"has class {cls}, which the manifest puts in another file or selects "
                 "nothing of")
    elif last_key is not None and key <= last_key:
      problem = (f"(class {cls}, rank {rank}) is not after (class {last_key[0]}, rank "
                 f"{last_key[1]})")
    elif rank != seen[cls][0]:
      problem = f"has rank {rank} in class {cls}, expected {seen[cls][0]}"
    elif not task["threshold"] - 1e-6 <= row["score"] <= 1.0 + 1e-6:
      problem = f"has score {row['score']}, outside ({task['threshold']}, 1]"
    elif seen[cls][2] is not None and row["score"] > seen[cls][2]:
      problem = f"has score {row['score']} above the previous rank's {seen[cls][2]}"
    elif row["copies"] < 1:
      problem = f"has {row['copies']} copies"
    elif not 0 <= shard < len(shard_counts):
      problem = f"names source shard {shard}; the corpus has {len(shard_counts)}"
    elif not 0 <= position < shard_counts[shard]:
      problem = (f"names position {position} of source shard {shard}, which holds "
                 f"{shard_counts[shard]:,} examples")
    if problem:
      result.problem(f"row {index} {problem}")
    last_key = key if last_key is None or key > last_key else last_key
    if cls in classes:
      seen[cls][0] += 1
      seen[cls][1] += row["copies"]
      seen[cls][2] = row["score"]
    if 0 <= shard < len(shard_counts) and 0 <= position < shard_counts[shard]:
      payload = _refs(result, shard, kind="selection")
      if position in payload["ids"]:
        result.problem(f"row {index} selects source shard {shard} position {position} again "
                       f"(row {payload['ids'][position][1]})")
      else:
        _add_ref(result, payload, position, row["id"], index)
  for cls, (unique, total) in sorted(classes.items()):
    rows, copies, _ = seen.get(cls, (0, 0, None))
    if rows != unique or copies != total:
      result.problem(f"class {cls} has {rows:,} rows and {copies:,} copies, the manifest "
                     f"selects {unique:,} images and {total:,} copies")


# ---- distillation records ---------------------------------------------------------------------

_HEAD = (("id", "bytes_list"), ("partner_id", "bytes_list"), ("source_shard", "int64_list"),
         ("source_index", "int64_list"), ("partner_index", "int64_list"),
         ("recipe", "bytes_list"), ("replica", "int64_list"), ("copy", "int64_list"),
         ("num_classes", "int64_list"))
_PARAMS = tuple((f"aug/{name}", "int64_list" if dtype == tf.int32 else "float_list",
                 int(np.prod(shape)) if shape else 1)
                for name, (shape, dtype) in augment.PARAM_SPEC.items())


def _teacher_problem(f, task) -> str | None:
  num_classes, top_k = task["num_classes"], task["top_k"]
  if top_k:
    k = min(top_k, num_classes)
    indices = _one(f, "topk/indices", "bytes_list")
    values = _one(f, "topk/values", "bytes_list")
    if len(indices) != 4 * k or len(values) != 2 * k:
      return (f"has {len(indices)} bytes of top-k indices and {len(values)} of values, not "
              f"{4 * k} and {2 * k} (k={k})")
    idx = np.frombuffer(indices, "<i4")
    val = np.frombuffer(values, "<f2").astype(np.float32)
    if idx.min(initial=0) < 0 or idx.max(initial=0) >= num_classes or len(set(idx)) != k:
      return f"has top-k indices outside [0, {num_classes}) or repeated"
    if not np.all(np.isfinite(val)):
      return "has non-finite top-k values"
    if np.any(np.diff(val) > 0):
      return "has top-k values out of order (they are stored largest first)"
    return None
  logits = _one(f, "logits", "bytes_list")
  if len(logits) != 2 * num_classes:
    return f"has {len(logits)} bytes of logits, not {2 * num_classes} ({num_classes} float16)"
  if not np.all(np.isfinite(np.frombuffer(logits, "<f2"))):
    return "has non-finite logits"
  return None


def _check_record_file(task, result: FileResult) -> None:
  shard, count = task["shard"], task["source_count"]
  state = {"last": None}

  def on_record(index, payload):
    f = _example(payload)
    if f is None:
      result.problem(f"record {index} is not a tf.train.Example")
      return
    try:
      head = {name: _one(f, name, kind) for name, kind in _HEAD}
      for name, kind, size in _PARAMS:
        _one(f, name, kind, size)
      problem = _teacher_problem(f, task)
    except _Bad as e:
      result.problem(f"record {index} {e}")
      return
    example_id, partner_id = _text(head["id"]), _text(head["partner_id"])
    position, copy, partner = head["source_index"], head["copy"], head["partner_index"]
    key = (position, copy)
    if problem:
      pass
    elif _text(head["recipe"]) != task["recipe"]:
      problem = (f"is of recipe {_q(_text(head['recipe']))}, the manifest's is "
                 f"{_q(task['recipe'])}")
    elif head["replica"] != task["replica"]:
      problem = f"is of replica {head['replica']}, in the folder of replica {task['replica']}"
    elif head["source_shard"] != shard:
      problem = f"names source shard {head['source_shard']}, in the file of shard {shard}"
    elif head["num_classes"] != task["num_classes"]:
      problem = f"has {head['num_classes']} classes, the manifest {task['num_classes']}"
    elif copy < 0 or (copy and not task["d3"]):
      problem = f"has copy {copy} (only D3 records have copies > 0)"
    elif position < 0 or (count is not None and position >= count):
      problem = (f"names source position {position}; source shard {shard} holds "
                 f"{count:,} examples" if count is not None else f"names position {position}")
    elif task["mixup"] and (partner < 0 or (count is not None and partner >= count)
                            or not partner_id):
      problem = f"has mixup partner {_q(partner_id)} at position {partner}"
    elif not task["mixup"] and (partner != -1 or partner_id):
      problem = (f"has a mixup partner ({_q(partner_id)} at {partner}); recipe "
                 f"{task['recipe']} has none")
    elif state["last"] is not None and key <= state["last"]:
      problem = (f"(position {position}, copy {copy}) is not after (position "
                 f"{state['last'][0]}, copy {state['last'][1]}): records are unique and sorted")
    if problem:
      result.problem(f"record {index} {problem}")
      return
    state["last"] = key
    payload = _refs(result, shard, kind="distill", copies=[] if task["d3"] else None,
                    d3=task["d3"], complete=task["complete"])
    _add_ref(result, payload, position, example_id, index)
    if task["mixup"]:
      _add_ref(result, payload, partner, partner_id, index)
    if task["d3"]:
      payload["copies"].append((position, copy, index))

  whole = _read_tfrecords(task, result, on_record)
  _check_count(task, result, whole)


# ---- dead letters -----------------------------------------------------------------------------

def _check_dead_letters(task, result: FileResult) -> None:
  if not tf.io.gfile.exists(task["path"]) and not task["count"]:
    return  # nothing set aside; older jobs wrote no file then
  lines = _read_lines(task, result)
  if lines is None:
    return
  for index, line in enumerate(lines):
    try:
      row = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
      row = None
    if not isinstance(row, dict) or "id" not in row:
      result.problem(f"line {index} is not a dead letter (a JSON object with an id)")
  if len(lines) != task["count"]:  # not records: the summary counts records only
    result.problem(f"holds {len(lines):,} dead letters, the manifest counts {task['count']:,}")


CHECKS = {"source": _check_source_shard, "selection": _check_selection_file,
          "distill": _check_record_file, "dead_letter": _check_dead_letters}


def check_file(task: dict) -> FileResult:
  """Checks one file as its task says (see `plan`); never raises for what the file holds."""
  result = FileResult(task["rel"])
  if task.get("unlisted"):
    result.problem("a record file the manifest does not list (left from another run?)")
    return result
  CHECKS[task["kind"]](task, result)
  return result


# ---- references into source shards ------------------------------------------------------------

def read_source_ids(task: dict):
  """A source shard's ids by position, or (None, why) when it cannot be read whole."""
  result = FileResult(task["rel"])
  ids = []

  def on_record(index, payload):
    f = _example(payload)
    try:
      if f is None:
        raise _Bad("is not a tf.train.Example")
      ids.append(_text(_one(f, "image/id", "bytes_list")))
    except _Bad as e:
      result.problem(f"record {index} {e}")

  whole = _read_tfrecords(task, result, on_record)
  if result.lines or not whole:
    why = result.lines[0][0].split(": ", 1)[-1] if result.lines else "cannot be read whole"
    return None, why
  return ids, None


def check_references(element, names: dict) -> list[tuple[str, int]]:
  """(shard, {ids, refs, selected}) -> problem lines for the references into that shard."""
  shard, grouped = element
  refs = list(grouped.get("refs", ()))
  read = list(grouped.get("ids", ()))
  if not refs or not read:
    return []
  label = names.get(shard, f"source shard {shard}")
  ids, why = read[0]
  if ids is None:
    return [(f"{label}: {why}; the ids of {len(refs):,} files that refer to it were not "
             "checked", 1)]
  selected = dict(grouped.get("selected", ()))
  out = []
  owners: dict = {}
  for payload in sorted(refs, key=lambda r: r["rel"]):
    result = FileResult(payload["rel"])
    for position, (example_id, record) in sorted(payload["ids"].items()):
      what = "row" if payload["kind"] == "selection" else "record"
      if position >= len(ids):
        result.problem(f"{what} {record} names position {position} of {label}, which holds "
                       f"{len(ids):,} examples")
      elif ids[position] != example_id:
        result.problem(f"{what} {record} names {_q(example_id)} at position {position} of "
                       f"{label}, which holds {_q(ids[position])} there")
      if payload["kind"] == "selection":
        if position in owners:
          result.problem(f"row {record} selects position {position} of {label}, which "
                         f"{owners[position]} selects too")
        owners.setdefault(position, f"{payload['rel']} row {record}")
    if payload.get("d3") and payload.get("selection_known"):
      made = collections.defaultdict(set)  # position -> copies recorded
      for position, copy, record in payload["copies"]:
        made[position].add(copy)
        if position not in selected:
          result.problem(f"record {record} is of position {position} of {label}, which the "
                         "selection does not hold")
        elif copy >= selected[position]:
          result.problem(f"record {record} is copy {copy} of position {position}; the "
                         f"selection asks for {selected[position]} copies")
      if payload.get("complete"):
        _missing_copies(result, selected, made, label)
    out.extend(result.finish())
  return out


def _missing_copies(result, selected, made, label):
  """Selected (position, copy) pairs with no record (counted, never enumerated: a damaged
  selection may ask for any number of copies)."""
  missing, first = 0, None
  for position in sorted(selected):
    have = made.get(position, set())
    short = selected[position] - sum(1 for c in have if 0 <= c < selected[position])
    if short > 0:
      missing += short
      if first is None:
        first = (position, next(c for c in itertools.count() if c not in have))
  if missing:
    result.problem(f"has no record for {missing:,} selected copies of {label} (first: "
                   f"position {first[0]}, copy {first[1]})")


def read_selection_rows(task: dict):
  """A selection file's rows as (source shard, (position, copies)); damage is a problem line."""
  result = FileResult(task["rel"])
  lines = _read_lines(task, result)
  rows = []
  for index, line in enumerate(lines or ()):
    row, why = _row(line)
    if row is None:
      result.problem(f"row {index} {why}")
    else:
      rows.append((row["source_shard"], (row["source_index"], row["copies"])))
  return rows, [(f"the selection's {text}", n) for text, n in result.finish()]


# ---- the plan: what to check ------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
  """What verifying a folder involves, read from its manifests (no record is read here)."""
  folder: str
  format: str = "a damaged manifest"
  writer: str = ""
  rebuild: str = ""
  problems: list = dataclasses.field(default_factory=list)  # manifest-level lines
  tasks: list = dataclasses.field(default_factory=list)  # one per file to check
  source_reads: list = dataclasses.field(default_factory=list)  # source shards to read ids of
  selection_reads: list = dataclasses.field(default_factory=list)  # distill d3: selection files
  source_names: dict = dataclasses.field(default_factory=dict)  # shard index -> label
  records: int = 0  # what the manifest lists
  class_counts: list | None = None  # source shards: per class, then unlabeled last

  def problem(self, text: str) -> None:
    self.problems.append(text)


def plan(folder: str, list_folder: bool = True) -> Plan:
  """Reads `folder`'s manifest (and those it refers to) into a `Plan`.

  A missing manifest, or one of a format this command does not know, is a UserError (exit 2);
  a manifest of a known format that is damaged is a problem of the plan, with nothing else to
  check. `list_folder` also lists the folder for record files the manifest does not name.
  """
  folder = folder.rstrip("/") or "/"
  out = Plan(folder)
  try:
    obj = formats.load_json(folder, WHAT)
  except FormatError as e:  # exists, but is not a JSON object
    out.problem(f"{MANIFEST}: {first_line(e)}")
    return out
  kind = next((k for k in KINDS if obj.get("format") == k.format()), None)
  if kind is None:
    formats.read(folder, WHAT, *KINDS)  # raises its one line: another kind or version
  out.format, out.writer = kind.format(), kind.WRITER
  out.rebuild = f"python -m {kind.WRITER} ... --out={folder} --overwrite"
  try:
    manifest = kind.from_json(obj, f"{WHAT} {folder}")
  except FormatError as e:
    out.problem(f"{MANIFEST}: {first_line(e)}")
    return out
  {formats.SourceShards: _plan_sources, formats.D3Selection: _plan_selection,
   formats.DistillRecords: _plan_distill}[kind](out, manifest)
  if list_folder:
    _unlisted(out)
  return out


def _path(folder, rel):
  return formats.inside(folder, rel, WHAT)


def _file_task(out: Plan, kind: str, f: formats.FileCount, **extra) -> dict:
  return {"kind": kind, "rel": f.path, "path": _path(out.folder, f.path), "count": f.count,
          "bytes": f.bytes, **extra}


def _dead_letter_task(out: Plan, count: int) -> None:
  out.tasks.append({"kind": "dead_letter", "rel": "dead_letter.jsonl",
                    "path": _path(out.folder, "dead_letter.jsonl"), "count": count})


def _unlisted(out: Plan) -> None:
  """Record files in the folder that no task covers."""
  known = {t["rel"] for t in out.tasks}
  try:
    walked = list(tf.io.gfile.walk(out.folder))
  except tf.errors.OpError:
    return
  for root, _, names in walked:
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), out.folder).replace(os.sep, "/")
      record_like = name.endswith(".tfrecord") or (name.startswith("selection-")
                                                   and name.endswith(".jsonl"))
      if record_like and rel not in known:
        out.tasks.append({"kind": "unlisted", "rel": rel, "unlisted": True,
                          "path": os.path.join(root, name)})


def _sum_problem(out, what, listed, total_name, total):
  if listed != total:
    out.problem(f"{MANIFEST}: its {what} add up to {listed:,}, its {total_name} is {total:,}")


def _plan_sources(out: Plan, m: formats.SourceShards) -> None:
  n = len(m.shards)
  out.records = m.num_examples
  out.rebuild = _ingest_command(m, out.folder)
  _sum_problem(out, "shards' counts", sum(s.count for s in m.shards), "num_examples",
               m.num_examples)
  if len(m.class_names) != m.num_classes or len(m.counts_per_class) != m.num_classes:
    out.problem(f"{MANIFEST}: it has {m.num_classes} classes but {len(m.class_names)} class "
                f"names and {len(m.counts_per_class)} per-class counts")
  else:
    out.class_counts = list(m.counts_per_class) + [m.unlabeled]
  _sum_problem(out, "per-class counts and unlabeled images",
               sum(m.counts_per_class) + m.unlabeled, "num_examples", m.num_examples)
  for i, s in enumerate(m.shards):
    hashed = s.path == files.shard_name("shard", i, n)
    if not hashed:
      out.problem(f"{MANIFEST}: shard {i} is named {s.path!r}, not "
                  f"{files.shard_name('shard', i, n)!r}")
    out.tasks.append(_file_task(out, "source", s, shard=i, num_shards=n,
                                num_classes=m.num_classes, hashed=hashed))
  _dead_letter_task(out, m.dead_letter)


def _ingest_command(m, folder):
  src = m.source if isinstance(m.source, dict) else {}
  flag = {"image_folder": ("--images", "path"), "tfrecords": ("--tfrecords", "glob"),
          "tfds": ("--tfds", "name"), "fashion_mnist": ("--fashion_mnist", "split"),
          "none": ("--unlabeled_only", "unlabeled_images")}.get(str(src.get("kind")))
  parts = ["python -m data_prep.ingest"]
  parts.append(f"{flag[0]}={src.get(flag[1])}" if flag else "--<source flags>")
  if src.get("kind") == "tfds":
    parts.append(f"--split={src.get('split')}")
  if src.get("holdout_fraction"):
    parts += [f"--holdout_fraction={src['holdout_fraction']}", f"--subset={src.get('subset')}"]
  if isinstance(src.get("hash_range"), list):
    parts.append("--hash_range=" + ",".join(str(v) for v in src["hash_range"]))
  if isinstance(src.get("class_fraction"), dict):
    parts.append("--class_fraction=" + ",".join(f"{k}:{v}"
                                                for k, v in src["class_fraction"].items()))
  if src.get("labels_dropped"):
    parts.append("--drop_labels")
  if src.get("unlabeled_images") and src.get("kind") != "none":
    parts.append(f"--unlabeled_images={src['unlabeled_images']}")
  parts += [f"--num_shards={len(m.shards)}", f"--out={folder}", "--overwrite"]
  return " ".join(parts)


def _read_kind(kind, folder, label):
  """A manifest another one refers to, or (None, why)."""
  try:
    return kind.read(folder, label), None
  except UserError as e:
    return None, first_line(e)


def _plan_selection(out: Plan, m: formats.D3Selection) -> None:
  out.records = m.num_selected_unique
  corpus_folder = formats.resolve(out.folder, m.corpus)
  if not tf.io.gfile.exists(os.path.join(corpus_folder, MANIFEST)) and tf.io.gfile.exists(
      os.path.join(m.corpus, MANIFEST)):
    corpus_folder = m.corpus  # an older manifest: the corpus as given on select_d3's command line
  out.rebuild = (f"python -m data_prep.select_d3 --corpus={corpus_folder} "
                 f"--classifier={m.classifier} --threshold={m.threshold} "
                 f"--per_class={m.per_class} --resolution={m.resolution} --out={out.folder} "
                 "--overwrite")
  c = m.num_classes
  unique, total = list(m.selected_unique_per_class), list(m.selected_total_per_class)
  if len(unique) != c or len(total) != c:
    out.problem(f"{MANIFEST}: it has {c:,} classes but {len(unique):,} and {len(total):,} "
                "per-class counts")
    return
  if m.num_files != _num_files(c):
    out.problem(f"{MANIFEST}: it names {m.num_files:,} selection files, select_d3 writes "
                f"{_num_files(c)} for {c:,} classes")
    return
  _sum_problem(out, "per-class selections", sum(unique), "num_selected_unique",
               m.num_selected_unique)
  _sum_problem(out, "per-class copies", sum(total), "num_selected_total", m.num_selected_total)
  if sorted(m.empty_classes) != [k for k in range(c) if not unique[k]]:
    out.problem(f"{MANIFEST}: its empty_classes are not the classes it selects nothing of")
  for k in range(c):
    n = unique[k]
    low, high = ((m.per_class // n) * n, -(-m.per_class // n) * n) if n else (0, 0)
    if n > m.per_class or not low <= total[k] <= high:
      out.problem(f"{MANIFEST}: class {k} selects {n:,} images in {total[k]:,} copies, which "
                  f"replication to {m.per_class:,} per class cannot give")
  corpus, why = _read_kind(formats.SourceShards, corpus_folder, "its corpus")
  shard_counts = [s.count for s in m.source_shards]
  if corpus is None:
    out.problem(f"{MANIFEST}: {why}; the selected ids were not checked")
  elif [(s.path, s.count) for s in corpus.shards] != [(s.path, s.count) for s in m.source_shards]:
    out.problem(f"{MANIFEST}: its source_shards are not the shards of its corpus "
                f"{corpus_folder} (rebuilt since?); the selected ids were not checked")
    corpus = None
  if corpus is not None:
    for i, s in enumerate(corpus.shards):
      if s.count:
        out.source_reads.append({"shard": i, "rel": s.path, "path": _path(corpus_folder, s.path),
                                 "count": s.count, "bytes": s.bytes})
        out.source_names[i] = f"corpus shard {s.path}"
  for i in range(m.num_files):
    rel = f"selection-{i:05d}-of-{m.num_files:05d}.jsonl"
    classes = {k: (unique[k], total[k]) for k in range(i, c, m.num_files) if unique[k]}
    if not classes and not tf.io.gfile.exists(_path(out.folder, rel)):
      continue  # no class of this file selected anything: the job writes no file
    out.tasks.append({"kind": "selection", "rel": rel, "path": _path(out.folder, rel),
                      "count": sum(u for u, _ in classes.values()), "classes": classes,
                      "threshold": m.threshold, "shard_counts": shard_counts})


def _num_files(num_classes: int) -> int:
  """How many selection files select_d3 writes for `num_classes` classes."""
  return max(1, math.ceil(num_classes / select_d3.CLASSES_PER_FILE))


def _plan_distill(out: Plan, m: formats.DistillRecords) -> None:
  out.records = m.num_records
  source_folder = m.source_folder(out.folder)
  selection_folder = m.selection_folder(out.folder)
  out.rebuild = _distill_command(m, out.folder, source_folder, selection_folder)
  _sum_problem(out, "files' counts", sum(f.count for f in m.files), "num_records", m.num_records)
  recipe = augment.RECIPES.get(m.recipe)
  settings = m.recipe_settings
  mixup = bool(settings.get("mixup", recipe.mixup if recipe else False))
  d3 = m.selection is not None
  if recipe is None:
    out.problem(f"{MANIFEST}: its recipe {m.recipe!r} is none of {sorted(augment.RECIPES)}")
  if (m.recipe == "d3") != d3:
    out.problem(f"{MANIFEST}: recipe {m.recipe} " + ("needs a selection" if not d3 else
                                                      "has a selection (only d3 has one)"))
  source, why = _read_kind(formats.SourceShards, source_folder, "its source shards")
  if source is None:
    out.problem(f"{MANIFEST}: {why}; the records' source ids were not checked")
  elif len(source.shards) != m.num_source_shards:
    out.problem(f"{MANIFEST}: it was built from {m.num_source_shards} source shards, its source "
                f"{source_folder} has {len(source.shards)}")
  n = m.num_source_shards
  selection_known = False
  if d3 and source is not None:
    selection, why = _read_kind(formats.D3Selection, selection_folder, "its selection")
    if selection is None:
      out.problem(f"{MANIFEST}: {why}; the records' copies were not checked")
    elif ([(s.path, s.count) for s in selection.source_shards]
          != [(s.path, s.count) for s in source.shards]):
      out.problem(f"{MANIFEST}: its selection {selection_folder} was made from other source "
                  "shards than its source; the records' copies were not checked")
    elif selection.num_files != _num_files(selection.num_classes):
      out.problem(f"{MANIFEST}: its selection {selection_folder} names {selection.num_files:,} "
                  "files, not what select_d3 writes; the records' copies were not checked")
    else:
      selection_known = True
      for i in range(selection.num_files):
        rel = f"selection-{i:05d}-of-{selection.num_files:05d}.jsonl"
        path = _path(selection_folder, rel)
        if tf.io.gfile.exists(path):
          out.selection_reads.append({"kind": "selection", "rel": rel, "path": path})
  complete = m.dead_letter == 0
  seen, used = set(), set()
  for f in m.files:
    match = RECORD_FILE.fullmatch(f.path)
    shard = int(SHARD_NAME.fullmatch(match.group(2)).group(1)) if match else None
    problem = None
    if not match or shard >= n or match.group(2) != files.shard_name("shard", shard, n):
      problem = f"is not named r<replica>/shard-XXXXX-of-{n:05d}.tfrecord"
    elif not m.replica_offset <= int(match.group(1)) < m.replica_offset + m.replicas:
      problem = (f"is of replica {int(match.group(1))}, outside the manifest's "
                 f"{m.replica_offset}..{m.replica_offset + m.replicas - 1}")
    elif f.path in seen:
      problem = "is listed twice in the manifest"
    if problem:
      out.problem(f"{f.path}: {problem}")
      continue
    seen.add(f.path)
    count = (source.shards[shard].count if source is not None and shard < len(source.shards)
             else None)
    if count is not None and complete and not d3 and f.count != count:
      out.problem(f"{f.path}: the manifest lists {f.count:,} records, source shard {shard} has "
                  f"{count:,} examples and no record was set aside")
    used.add(shard)
    out.tasks.append(_file_task(
        out, "distill", f, replica=int(match.group(1)), shard=shard, source_count=count,
        recipe=m.recipe, mixup=mixup, top_k=m.top_k, num_classes=m.num_classes, d3=d3,
        complete=complete))
  if source is not None and complete and not d3:
    nonempty = [i for i, s in enumerate(source.shards) if s.count]
    expected = m.replicas * len(nonempty)
    if expected > len(seen) + MAX_SHOWN:  # not worth listing one by one (nor a huge count)
      out.problem(f"{MANIFEST}: it lists {len(seen):,} record files; {m.replicas:,} replicas of "
                  f"{len(nonempty):,} non-empty source shards make {expected:,}")
    else:
      for replica in range(m.replica_offset, m.replica_offset + m.replicas):
        for i in nonempty:
          rel = f"r{replica:04d}/{files.shard_name('shard', i, n)}"
          if rel not in seen:
            out.problem(f"{rel}: the manifest lists no such file, though source shard {i} has "
                        f"{source.shards[i].count:,} examples and no record was set aside")
  if source is not None:
    for i in sorted(used):
      if i < len(source.shards):
        s = source.shards[i]
        out.source_reads.append({"shard": i, "rel": s.path, "path": _path(source_folder, s.path),
                                 "count": s.count, "bytes": s.bytes})
        out.source_names[i] = f"source shard {s.path}"
  for task in out.tasks:
    task["selection_known"] = selection_known
  _dead_letter_task(out, m.dead_letter)


def _distill_command(m, folder, source_folder, selection_folder):
  parts = [f"python -m data_prep.distill --recipe={m.recipe} --source={source_folder}",
           f"--teacher={m.teacher}", f"--replicas={m.replicas}",
           f"--replica_offset={m.replica_offset}"]
  if selection_folder:
    parts.append(f"--selection={selection_folder}")
  if m.top_k:
    parts.append(f"--top_k={m.top_k}")
  for flag, value, default in (("teacher_input", m.teacher_input, "minus_one_to_one"),
                               ("teacher_outputs", m.teacher_outputs, "logits")):
    if value != default:
      parts.append(f"--{flag}={value}")
  recipe = augment.RECIPES.get(m.recipe)
  s = m.recipe_settings
  if recipe is not None:
    if s.get("jpeg_quality", recipe.jpeg_quality) != recipe.jpeg_quality:
      parts.append(f"--jpeg_quality={s['jpeg_quality']}")
    if s.get("flip", True) is False and recipe.flip:
      parts.append("--no_flip")
    if s.get("ra_magnitude", recipe.ra_magnitude) != recipe.ra_magnitude:
      parts.append(f"--ra_magnitude={s['ra_magnitude']}")
    area = s.get("crop_area")
    if isinstance(area, list) and area and area[0] != recipe.crop_area[0]:
      parts.append(f"--crop_area_min={area[0]}")
  parts += [f"--out={folder}", "--overwrite"]
  return " ".join(parts)


# ---- the Beam job -----------------------------------------------------------------------------

def _counter(name):
  return beam.metrics.Metrics.counter(transforms.NAMESPACE, name)


class CheckFile(beam.DoFn):
  """A file's task -> its result {rel, records, problems: [(line, weight)]}; label counts and
  references into source shards as tagged outputs."""

  def __init__(self):
    self.files = _counter("files_checked")
    self.records = _counter("records_checked")
    self.problems = _counter("problems")

  def process(self, task):
    result = check_file(task)
    self.files.inc()
    self.records.inc(result.records)
    lines = result.finish()
    self.problems.inc(sum(n for _, n in lines))
    if task["kind"] == "source":
      # Class counts are compared only when every shard read cleanly (else the shard's own
      # problem says it all).
      if lines:
        yield beam.pvalue.TaggedOutput(LABELS, ("damaged", 1))
      else:
        for label, n in result.labels.items():
          yield beam.pvalue.TaggedOutput(LABELS, (label, n))
    for shard, payload in result.refs.items():
      payload["selection_known"] = task.get("selection_known", False)
      yield beam.pvalue.TaggedOutput(REFS, (shard, payload))
    yield {"rel": result.rel, "records": result.records, "problems": lines}


class ReadSourceIds(beam.DoFn):

  def process(self, task):
    yield task["shard"], read_source_ids(task)


class CheckReferences(beam.DoFn):

  def __init__(self, names):
    self.names = names
    self.problems = _counter("problems")

  def process(self, element):
    lines = check_references(element, self.names)
    self.problems.inc(sum(n for _, n in lines))
    yield from lines


class ReadSelectionRows(beam.DoFn):

  def __init__(self):
    self.problems = _counter("problems")

  def process(self, task):
    rows, lines = read_selection_rows(task)
    for line in lines:
      self.problems.inc(line[1])
      yield beam.pvalue.TaggedOutput("problems", line)
    yield from rows


def compare_labels(found, expected):
  """Summed (label, count) pairs against the manifest's per-class counts (unlabeled last)."""
  counts = dict(found)
  if counts.get("damaged"):
    return []
  out = []
  for label, want in enumerate(expected):
    key = -1 if label == len(expected) - 1 else label
    got = counts.pop(key, 0)
    if got != want:
      what = "unlabeled images" if key == -1 else f"images of class {key}"
      out.append((f"{MANIFEST}: the shards hold {got:,} {what}, the manifest counts {want:,}", 1))
  return out


def _natural(text: str) -> tuple:
  parts = re.split(r"(\d+)", text)
  return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def _sort_key(line):
  """(text, weight) lines in file order, numbers by value (record 9 before record 10), a
  file's "N more problems" line (weight > 1) after its others."""
  text, weight = line
  rel, _, rest = text.partition(": ")
  return _natural(rel), weight > 1, _natural(rest)


def _write_summary(_, path, shown, problems, stats):
  files_done, records = stats
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(json.dumps({"shown": [list(line) for line in shown], "problems": problems,
                        "files": files_done, "records": records}))


def build_pipeline(p, the_plan: Plan, summary_path: str) -> None:
  folder = the_plan.folder
  seed = p | "Dataset" >> beam.Create([folder])
  tasks = (seed
           | "ListFiles" >> beam.FlatMap(lambda f: plan(f).tasks)
           | "Spread" >> beam.Reshuffle())
  checked = tasks | "CheckFile" >> beam.ParDo(CheckFile()).with_outputs(REFS, LABELS,
                                                                         main="files")
  done = checked.files | "Progress" >> console.ReportProgress()
  lines = [done | "FileProblems" >> beam.FlatMap(lambda r: r["problems"])]
  stats = (done
           | "FileStats" >> beam.Map(lambda r: (1, r["records"]))
           | "SumStats" >> beam.CombineGlobally(_sum_pairs))
  if the_plan.source_reads:
    ids = (seed
           | "ListSources" >> beam.FlatMap(lambda f: plan(f, list_folder=False).source_reads)
           | "SpreadSources" >> beam.Reshuffle()
           | "ReadIds" >> beam.ParDo(ReadSourceIds()))
    groups = {"refs": checked[REFS], "ids": ids}
    if the_plan.selection_reads:
      rows = (seed
              | "ListSelection" >> beam.FlatMap(
                  lambda f: plan(f, list_folder=False).selection_reads)
              | "ReadSelection" >> beam.ParDo(ReadSelectionRows()).with_outputs(
                  "problems", main="rows"))
      groups["selected"] = rows.rows
      lines.append(rows.problems)
    lines.append(groups
                 | "JoinSources" >> beam.CoGroupByKey()
                 | "CheckIds" >> beam.ParDo(CheckReferences(the_plan.source_names)))
  if the_plan.class_counts is not None:
    lines.append(checked[LABELS]
                 | "SumLabels" >> beam.CombinePerKey(sum)
                 | "AllLabels" >> beam.combiners.ToList()
                 | "CompareLabels" >> beam.FlatMap(compare_labels, the_plan.class_counts))
  everything = lines | "AllProblems" >> beam.Flatten()
  shown = everything | "FirstProblems" >> beam.combiners.Top.Of(MAX_SHOWN, key=_sort_key,
                                                                reverse=True)
  total = (everything
           | "Weights" >> beam.Map(lambda line: line[1])
           | "CountProblems" >> beam.CombineGlobally(sum))
  _ = (p
       | "Summary" >> beam.Create([None])
       | "WriteSummary" >> beam.Map(_write_summary, summary_path, beam.pvalue.AsSingleton(shown),
                                    beam.pvalue.AsSingleton(total),
                                    beam.pvalue.AsSingleton(stats)))


def _sum_pairs(pairs):
  files_done = records = 0
  for a, b in pairs:
    files_done += a
    records += b
  return files_done, records


@dataclasses.dataclass
class Report:
  """What `run` found: the kind, what was read and the problems."""
  folder: str
  format: str
  writer: str
  rebuild: str
  files: int
  records: int
  manifest_records: int
  problems: int
  shown: list

  @property
  def clean(self) -> bool:
    return self.problems == 0

  def lines(self) -> list[str]:
    writer = f" ({self.writer})" if self.writer else ""
    head = (f"verify: {self.folder} holds {self.format}{writer}: {self.files:,} files, "
            f"{self.records:,} records checked")
    if self.records != self.manifest_records:
      head += f" (the manifest lists {self.manifest_records:,})"
    if self.clean:
      return [head + "; no problems"]
    out = [head + f"; {self.problems:,} problem{'s' if self.problems != 1 else ''}:"]
    out += [f"  {line}" for line in self.shown]
    if self.problems > len(self.shown):
      out.append(f"  ... and {self.problems - len(self.shown):,} more")
    out.append(f"verify: rebuild it with: {self.rebuild}" if self.rebuild else
               "verify: rebuild it with the stage that wrote it")
    return out


def _summary_location(pipeline) -> tuple[str, str | None]:
  """Where the workers leave the summary: (file, local folder to remove after, or None)."""
  from apache_beam.options.pipeline_options import GoogleCloudOptions, StandardOptions
  name = f"mnv4-verify-{uuid.uuid4().hex}.json"
  temp = pipeline.options.view_as(GoogleCloudOptions).temp_location
  if temp:
    return os.path.join(temp, name), None
  runner = pipeline.options.view_as(StandardOptions).runner
  if runner is not None and not any(k in str(runner).lower() for k in ("direct", "prism")):
    raise ConfigError(f"--runner={runner} needs --temp_location: the summary comes back from "
                      "the workers through a small file there")
  local = tempfile.mkdtemp(prefix="mnv4-verify-")
  return os.path.join(local, name), local


def run(argv=None, pipeline=None) -> Report:
  """Verifies DIR (argv as on the command line); returns the `Report`. `pipeline`: a
  TestPipeline."""
  args, beam_args = parse_args(argv)
  the_plan = plan(args.dir)
  folder = the_plan.folder
  shown = [(text, 1) for text in the_plan.problems]
  files_done = records = 0
  problems = len(shown)
  if the_plan.tasks:
    logging.info("verify: checking %s (%s, %d files)", folder, the_plan.format,
                 len(the_plan.tasks))
    console.expect(len(the_plan.tasks), "files")
    pipeline = pipeline or files.make_pipeline(beam_args)
    summary, local = _summary_location(pipeline)
    try:
      with console.running(pipeline), pipeline:
        build_pipeline(pipeline, the_plan, summary)
      with tf.io.gfile.GFile(summary) as f:
        found = json.load(f)
    finally:
      if local:
        tf.io.gfile.rmtree(local)
      elif tf.io.gfile.exists(summary):
        tf.io.gfile.remove(summary)
    shown += [(text, weight) for text, weight in found["shown"]]
    problems += found["problems"]
    files_done, records = found["files"], found["records"]
  shown = sorted(shown, key=_sort_key)[:MAX_SHOWN]
  return Report(folder=folder, format=the_plan.format, writer=the_plan.writer,
                rebuild=the_plan.rebuild, files=files_done, records=records,
                manifest_records=the_plan.records, problems=problems,
                shown=[text for text, _ in shown])


def main(argv) -> int:
  """The command line: prints the report; exit status 0 clean, 1 problems (2: job_main)."""
  report = run(argv)
  sys.stdout.flush()
  for line in report.lines():
    print(line, flush=True)
  return 0 if report.clean else 1


def _cli(argv):
  sys.exit(main(argv))


if __name__ == "__main__":
  run_then_exit(files.job_main, "data_prep.verify", _cli, sys.argv[1:])
