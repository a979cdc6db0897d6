"""Readers that never crash: manifests and record files of random and mutated bytes (hypothesis).

A reader given a damaged manifest raises one UserError (FormatError / InputPathError) with a
one-line message, and nothing else; `data_prep.verify`'s per-file check given a damaged record
file reports a problem and never raises or hangs (every example runs under a deadline).
"""

import json
import os
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from data_prep import files, verify
from mnv4_train.data import augment, formats, records
from mnv4_train.errors import FormatError, UserError, first_line

FAST = settings(max_examples=80, deadline=3000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
KINDS = (formats.SourceShards, formats.D3Selection, formats.DistillRecords)

SHARDS = (formats.FileCount("shard-00000-of-00002.tfrecord", 3, 1200),
          formats.FileCount("shard-00001-of-00002.tfrecord", 0, 0))
VALID = {
    formats.SourceShards: formats.SourceShards(
        source={"kind": "image_folder", "path": "/data/digits", "subset": "all",
                "holdout_fraction": 0.0},
        num_examples=3, num_classes=2, class_names=["a", "b"], counts_per_class=[2, 1],
        unlabeled=0, shards=SHARDS, dead_letter=1),
    formats.D3Selection: formats.D3Selection(
        corpus="../sources/corpus", classifier="relevance.keras", threshold=0.3, per_class=4,
        resolution=32, num_classes=2, source_shards=SHARDS, num_files=1,
        selected_unique_per_class=[2, 0], selected_total_per_class=[4, 0],
        num_selected_unique=2, num_selected_total=4, empty_classes=[1],
        num_above_threshold=2, above_threshold_per_class=[2, 0]),
    formats.DistillRecords: formats.DistillRecords(
        recipe="d1", recipe_settings={"name": "d1", "crop_area": [0.5, 1.0], "flip": False},
        replicas=2, replica_offset=0, source="../sources/train", selection=None,
        teacher="teacher.keras", resolution=32, teacher_input="minus_one_to_one",
        teacher_outputs="logits", top_k=0, num_classes=2, num_source_shards=2,
        files=(formats.FileCount("r0000/shard-00000-of-00002.tfrecord", 3, 900),),
        num_records=3, dead_letter=0),
}

# JSON values a damaged or hand-edited manifest may hold where another type belongs.
BAD_PATHS = ["../../x", "/etc/passwd", "a/../../b", "", ".", "r0000/../../../etc/passwd",
             "gs://bucket/x", "a\x00b", "C:\\..\\x", "r0000//x", "./shard"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63 - 2, max_value=2**80),
    st.integers(max_value=-1), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), 1e308, -0.0, "12", "", "nan", "3.5"]),
    st.text(max_size=20), st.sampled_from(BAD_PATHS))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def _write_manifest(folder, data: bytes):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, formats.MANIFEST), "wb") as f:
    f.write(data)


def _assert_one_line_user_error(call):
  """`call()` either returns or raises a UserError whose message is one line."""
  try:
    return call()
  except UserError as e:
    message = str(e)
    assert message and "\n" not in message and first_line(e) == message.strip(), message
    return e


def _read_all_ways(folder):
  """Every reader of a manifest (and verify's planning) on `folder`: only UserErrors."""
  for kind in KINDS:
    out = _assert_one_line_user_error(lambda kind=kind: kind.read(folder, "--input"))
    if isinstance(out, formats.Manifest):
      _check_parsed(out, folder)
  _assert_one_line_user_error(lambda: formats.read(folder, "--input", *KINDS))
  _assert_one_line_user_error(lambda: verify.plan(folder))


def _check_parsed(manifest, folder):
  """A manifest that reads has the types its fields promise, and files inside its folder."""
  for f in manifest.__dataclass_fields__.values():
    value = getattr(manifest, f.name)
    if f.metadata.get("files"):
      for item in value:
        assert isinstance(item.path, str) and isinstance(item.count, int)
        assert 0 <= item.count < 2**63
        path = formats.inside(folder, item.path, "--input")
        assert os.path.commonpath([folder, path]) == folder and path != folder


@FAST
@given(data=st.binary(max_size=600))
@example(data=b"")
@example(data=b"[" * 100_000)  # deeper than the JSON parser's recursion limit
@example(data=b"{\"format\": 1" + b"0" * 5000 + b"}")  # more digits than int() takes
@example(data=b"\xff\xfe{}")  # not UTF-8
@example(data=b"NaN")
def test_manifests_of_random_bytes_are_one_line_errors(data):
  with tempfile.TemporaryDirectory() as folder:
    _write_manifest(folder, data)
    _read_all_ways(folder)


@FAST
@given(obj=st.dictionaries(st.text(max_size=12), JSON, max_size=6),
       kind=st.sampled_from(KINDS))
def test_random_json_objects_with_a_valid_format_are_one_line_errors(obj, kind):
  with tempfile.TemporaryDirectory() as folder:
    _write_manifest(folder, json.dumps({**obj, "format": kind.format()}).encode())
    _read_all_ways(folder)


def _mutations(kind):
  """One change to a valid manifest of `kind`: drop a key, give it another JSON value, or damage
  one entry of a files list."""
  valid = VALID[kind].to_json()
  keys = sorted(valid)
  files_keys = [k for k in keys if isinstance(valid[k], list) and valid[k]
                and isinstance(valid[k][0], dict)]
  drop = st.tuples(st.just("drop"), st.sampled_from(keys), st.none())
  retype = st.tuples(st.just("set"), st.sampled_from(keys), JSON)
  entry = st.tuples(st.just("entry"), st.sampled_from(files_keys),
                    st.tuples(st.sampled_from(["path", "count", "bytes", "whole"]),
                              st.one_of(JSON, st.sampled_from(BAD_PATHS))))
  return st.lists(st.one_of(drop, retype, entry), min_size=1, max_size=3)


def _mutate(obj, changes):
  obj = json.loads(json.dumps(obj))
  for action, key, value in changes:
    if action == "drop":
      obj.pop(key, None)
    elif action == "set":
      obj[key] = value
    elif isinstance(obj.get(key), list) and obj[key] and isinstance(obj[key][0], dict):
      field, new = value
      if field == "whole":
        obj[key][0] = new
      else:
        obj[key][0][field] = new
  return obj


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_mutated_valid_manifests_read_or_are_one_line_errors(kind):
  valid = VALID[kind].to_json()

  @FAST
  @given(changes=_mutations(kind))
  def check(changes):
    with tempfile.TemporaryDirectory() as folder:
      _write_manifest(folder, json.dumps(_mutate(valid, changes)).encode())
      _read_all_ways(folder)

  check()


@pytest.mark.parametrize("path", BAD_PATHS)
def test_a_listed_file_outside_the_folder_is_refused_on_reading(path, tmp_path):
  obj = VALID[formats.SourceShards].to_json()
  obj["shards"][0]["path"] = path
  _write_manifest(str(tmp_path), json.dumps(obj).encode())
  with pytest.raises(FormatError) as e:
    formats.SourceShards.read(str(tmp_path), "--source")
  assert "'shards'" in str(e.value) and "not a relative path inside the folder" in str(e.value)


@pytest.mark.parametrize("key, value, says", [
    ("num_examples", "3", "'num_examples' is the string '3', not a whole number >= 0"),
    ("num_examples", None, "'num_examples' is null"),
    ("num_examples", -1, "is the number -1"),
    ("num_examples", 2**64, "that fits in 64 bits"),
    ("num_examples", True, "is true"),
    ("class_names", {"a": 1}, "'class_names' is an object, not a list"),
    ("counts_per_class", [1, "2"], "holds an item that is the string '2' (item 1)"),
    ("source", [], "'source' is a list, not an object"),
    ("shards", {"path": "x"}, "'shards' is an object, not a list of {path, count} objects"),
    ("shards", [{"path": "shard-0.tfrecord", "count": 1.5}], "a count that is the number 1.5"),
])
def test_wrong_json_types_name_the_key_and_what_it_holds(key, value, says, tmp_path):
  obj = VALID[formats.SourceShards].to_json()
  obj[key] = value
  _write_manifest(str(tmp_path), json.dumps(obj).encode())
  with pytest.raises(FormatError) as e:
    formats.SourceShards.read(str(tmp_path), "--source")
  assert says in str(e.value) and "rebuild it with data_prep.ingest" in str(e.value)
  obj = VALID[formats.D3Selection].to_json()
  obj["threshold"] = float("nan")
  _write_manifest(str(tmp_path), json.dumps(obj).encode())
  with pytest.raises(FormatError, match="'threshold' is the number nan, not a finite number"):
    formats.D3Selection.read(str(tmp_path), "--selection")


def test_a_manifest_that_is_a_folder_is_one_line(tmp_path):
  os.makedirs(tmp_path / formats.MANIFEST)
  with pytest.raises(UserError) as e:
    formats.SourceShards.read(str(tmp_path), "--source")
  assert "\n" not in str(e.value) and "cannot be read" in str(e.value)


@FAST
@given(rel=st.one_of(st.text(max_size=30), st.sampled_from(BAD_PATHS), JSON))
def test_inside_returns_a_path_in_the_folder_or_refuses(rel):
  folder = "/ws/sources/x"
  try:
    path = formats.inside(folder, rel, "--source")
  except FormatError as e:
    assert "\n" not in str(e)
    return
  assert os.path.commonpath([folder, path]) == folder and path != folder
  assert ".." not in path.split("/")


# ---- record files -----------------------------------------------------------------------------

_PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                     "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201e2a1d4"
                     "4e0000000049454e44ae426082")


def _source_file(folder):
  """A valid source shard (shard 0 of 1) of three examples, and its task."""
  ids = sorted(f"c/{i}.png" for i in range(3))
  payloads = [records.source_example(i, _PNG, 0, 1, 1, "png") for i in ids]
  path = os.path.join(folder, files.shard_name("shard", 0, 1))
  files.write_tfrecords(path, payloads)
  return {"kind": "source", "rel": os.path.basename(path), "path": path, "count": 3,
          "bytes": os.path.getsize(path), "shard": 0, "num_shards": 1, "num_classes": 2,
          "hashed": True}


def _record_file(folder):
  """A valid d1 record file (replica 0, shard 0, 3 records of 4 classes), and its task."""
  params = {name: np.zeros(shape, dtype.as_numpy_dtype)
            for name, (shape, dtype) in augment.PARAM_SPEC.items()}
  payloads = [records.distill_record(example_id=f"c/{i}.png", source_shard=0, source_index=i,
                                     recipe="d1", replica=0, copy=0, params=params,
                                     logits=np.arange(4, dtype=np.float32) + i)
              for i in range(3)]
  os.makedirs(os.path.join(folder, "r0000"), exist_ok=True)
  path = os.path.join(folder, "r0000", files.shard_name("shard", 0, 1))
  files.write_tfrecords(path, payloads)
  return {"kind": "distill", "rel": "r0000/" + os.path.basename(path), "path": path,
          "count": 3, "bytes": os.path.getsize(path), "replica": 0, "shard": 0,
          "source_count": 3, "recipe": "d1", "mixup": False, "top_k": 0, "num_classes": 4,
          "d3": False, "complete": True}


def _selection_file(folder):
  rows = [{"class": 0, "rank": r, "id": f"c/{r}.png", "score": 0.9 - r / 10, "copies": 2,
           "source_shard": 0, "source_index": r} for r in range(2)]
  path = os.path.join(folder, "selection-00000-of-00001.jsonl")
  with open(path, "w") as f:
    f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
  return {"kind": "selection", "rel": os.path.basename(path), "path": path, "count": 2,
          "classes": {0: (2, 4)}, "threshold": 0.3, "shard_counts": [3]}


MAKERS = {"source": _source_file, "distill": _record_file, "selection": _selection_file}


def _damage(data: bytes, how, where: int, value: bytes) -> bytes:
  if how == "truncate":
    return data[:where % max(len(data), 1)]
  if how == "flip":
    i = where % len(data)
    return data[:i] + bytes([data[i] ^ (value[0] if value and value[0] else 0xFF)]) + data[i + 1:]
  if how == "append":
    return data + (value or b"\x00")
  if how == "zero":
    return b""
  if how == "random":
    return value
  raise AssertionError(how)


DAMAGE = st.tuples(st.sampled_from(["truncate", "flip", "append", "zero", "random"]),
                   st.integers(min_value=0, max_value=10**6), st.binary(max_size=300))


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_damaged_record_files_are_reported_not_raised(kind, tmp_path):
  task = MAKERS[kind](str(tmp_path))
  with open(task["path"], "rb") as f:
    original = f.read()
  assert not verify.check_file(task).finish()  # the undamaged file is clean

  @FAST
  @given(damage=DAMAGE)
  def check(damage):
    data = _damage(original, *damage)
    with open(task["path"], "wb") as f:
      f.write(data)
    result = verify.check_file(task)  # must not raise
    lines = result.finish()
    assert all(line.startswith(task["rel"] + ": ") and "\n" not in line for line, _ in lines)
    if data != original and kind != "selection":
      # TFRecords: a CRC, the framing, the size or the count catches every change. (A flipped
      # digit in a JSON row can still be a valid row: selections only must not raise.)
      assert lines, damage
    if kind == "selection" and damage[0] in ("truncate", "zero") and data != original:
      assert lines, damage

  check()


def _huge_length_header(length: int) -> bytes:
  """A TFRecord header claiming `length` bytes, with a valid length CRC, then a few bytes."""
  head = struct.pack("<Q", length)
  return head + struct.pack("<I", verify.masked_crc(head)) + b"x" * 100


@pytest.mark.parametrize("length", [2**31 - 1, 2**40, 2**63, 2**64 - 1])
def test_a_huge_length_field_is_truncation_not_an_allocation(length, tmp_path):
  task = _record_file(str(tmp_path))
  with open(task["path"], "wb") as f:
    f.write(_huge_length_header(length))
  task["bytes"] = None
  lines = verify.check_file(task).finish()
  assert len(lines) == 1 and "it is truncated" in lines[0][0], lines
  assert f"needs {length + 4:,} more bytes but the file has 100 left" in lines[0][0]


@pytest.mark.parametrize("kind", ["source", "distill"])
def test_tensorflows_reader_terminates_on_damaged_files_and_verify_agrees(kind, tmp_path):
  """TensorFlow's TFRecord readers (the trainer's) end on a damaged file, with DataLossError,
  and every file they refuse is one verify reports.

  Not fed here: a header with a *valid* length CRC claiming a huge length, which crashes
  TensorFlow 2.20's readers (SIGSEGV, tf.data and tf_record_iterator alike; found while writing
  these tests); verify frames records itself and never hands TF a file (see
  test_a_huge_length_field_is_truncation_not_an_allocation). Random damage cannot forge that
  CRC, so these examples are safe in this process."""
  import tensorflow as tf
  task = MAKERS[kind](str(tmp_path))
  with open(task["path"], "rb") as f:
    original = f.read()

  @FAST
  @given(damage=DAMAGE)
  def check(damage):
    data = _damage(original, *damage)
    with open(task["path"], "wb") as f:
      f.write(data)
    try:
      read = len(list(tf.data.TFRecordDataset(task["path"])))
      refused = False
    except tf.errors.DataLossError:
      refused = True
    lines = verify.check_file(task).finish()
    if refused or read != task["count"]:
      assert lines, damage

  check()
