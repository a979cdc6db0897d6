"""Damaged training data stop the trainer with one line: the file, its dataset, the command that
rebuilds it; and nothing is saved after it.

Every case damages a copy of the session's data (records d1 and their source shards) in
tmp_path. The command line is run twice over the damage (once caught before training, once
during a resumed run, whose checkpoints must stay as they were); the other kinds of damage go
through the same reading functions in this process.
"""

import hashlib
import json
import os
import re
import shutil
import struct

import pytest

from mnv4_train.data import formats, pipeline
from mnv4_train.errors import DataError, FormatError
from tests.conftest import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = "r0000/shard-00000-of-00002.tfrecord"  # a d1 record file (105 records)
SHARD = "shard-00001-of-00002.tfrecord"          # a source shard


def _edit_manifest(folder, edit):
  path = os.path.join(folder, formats.MANIFEST)
  with open(path) as f:
    manifest = json.load(f)
  edit(manifest)
  with open(path, "w") as f:
    json.dump(manifest, f)


def _with_sizes(key):
  """A manifest edit: every listed file's `bytes` as on disk (what data_prep writes)."""
  def edit(manifest, folder):
    for f in manifest[key]:
      f["bytes"] = os.path.getsize(os.path.join(folder, f["path"]))
  return edit


@pytest.fixture
def data(tmp_path, source_shards, distill_records):
  """Copies of the d1 records and their source shards, the records naming their source
  relatively (as data_prep writes them), every file's size in the manifests."""
  src, d1 = str(tmp_path / "sources" / "digits"), str(tmp_path / "distill" / "d1")
  shutil.copytree(source_shards[0], src)
  shutil.copytree(distill_records["d1"], d1)
  _edit_manifest(src, lambda m: _with_sizes("shards")(m, src))

  def records(m):
    m["source"] = "../../sources/digits"
    _with_sizes("files")(m, d1)
  _edit_manifest(d1, records)
  return {"src": src, "d1": d1}


def _whole_records(path):
  """How many whole records a TFRecord file holds, from its framing alone (each record: an
  8-byte length, a 4-byte CRC, the data, a 4-byte CRC)."""
  with open(path, "rb") as f:
    data = f.read()
  n = offset = 0
  while offset + 12 <= len(data):
    length, = struct.unpack("<Q", data[offset:offset + 8])
    offset += 12 + length + 4
    if offset > len(data):
      break
    n += 1
  return n


def _count(folder, key, rel):
  with open(os.path.join(folder, formats.MANIFEST)) as f:
    return next(f["count"] for f in json.load(f)[key] if f["path"] == rel)


def _truncate(path, fraction=2 / 3):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:int(len(data) * fraction)])


def _flip_a_byte(path):
  with open(path, "rb") as f:
    data = bytearray(f.read())
  data[len(data) // 2] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))


def _set_file(folder, key, rel, **fields):
  def edit(manifest):
    for f in manifest[key]:
      if f["path"] == rel:
        f.update(fields)
  _edit_manifest(folder, edit)


def _first_batch(folder, name="d1", memory_cache=False):
  """Opens a dataset as the trainer does and reads one batch; the DataError it stops with."""
  info = pipeline.open_dataset(folder, name)
  with pytest.raises(DataError) as e:
    pipeline.check_files(info)
    with pipeline.naming_bad_files([info]):
      opts = pipeline.StreamOptions(
          memory_cache=memory_cache,
          supervised_recipe=pipeline.augment.Recipe("plain", crop_area=(1.0, 1.0)))
      ds = pipeline.train_dataset([info], resolution=32, host_batch=8, num_classes=10,
                                  options=opts)
      next(iter(ds))
  message = str(e.value)
  assert "\n" not in message
  return message


def _main(workdir, *bindings):
  return run_cli("mnv4_train.main", "--gin_file=smoke.gin", f"--workdir={workdir}",
                 *[f"--gin_bindings={b}" for b in bindings])


def _snapshot(folder):
  """Every file under `folder` with a hash of its bytes."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _error_line(proc):
  """The one error line of a failed run: its last stderr line, no traceback, no other error."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  errors = [line for line in lines if "error" in line.lower()]
  assert errors == [lines[-1]] and lines[-1].startswith("mnv4_train.main: error: "), lines
  return lines[-1]


@pytest.mark.slow
def test_a_damaged_record_file_stops_the_run_with_one_line_and_keeps_its_checkpoints(data,
                                                                                   tmp_path):
  work = str(tmp_path / "run")
  bindings = [f"data.datasets={{'d1': '{data['d1']}'}}", "cadence.checkpoint_every=1"]
  good = _main(work, *bindings, "cadence.stop_after_steps=2")
  assert good.returncode == 0, good.stderr[-3000:]
  checkpoints = os.path.join(work, "checkpoints")
  saved = _snapshot(checkpoints)
  assert "ckpt-2.index" in saved and "data-host0/ckpt-2.index" in saved
  record = os.path.join(data["d1"], RECORD)
  size, count = os.path.getsize(record), _count(data["d1"], "files", RECORD)
  _truncate(record)
  whole = _whole_records(record)
  assert 0 < whole < count

  # A manifest from before sizes were recorded: found when the resumed run reads the file (its
  # input position is restored by reading it again), and nothing is saved.
  _set_file(data["d1"], "files", RECORD, bytes=None)
  line = _error_line(_main(work, *bindings))
  assert line == (f"mnv4_train.main: error: dataset 'd1': record file {record} is truncated: it "
                  f"holds {whole} whole records, its manifest lists {count}; rebuild dataset "
                  f"'d1' ({data['d1']}) with data_prep.distill")
  assert _snapshot(checkpoints) == saved
  assert not os.path.exists(os.path.join(work, "metrics.json"))

  # With its size in the manifest the run stops before it builds anything: one line only.
  _set_file(data["d1"], "files", RECORD, bytes=size)
  proc = _main(work, *bindings)
  line = _error_line(proc)
  assert proc.stderr.strip() == line
  assert line == (f"mnv4_train.main: error: dataset 'd1': record file {record} is "
                  f"{os.path.getsize(record)} bytes but its manifest says {size} (truncated or "
                  f"overwritten); rebuild dataset 'd1' ({data['d1']}) with data_prep.distill")
  assert _snapshot(checkpoints) == saved


def test_every_kind_of_damage_names_the_file_its_dataset_and_the_rebuild_command(data,
                                                                                tmp_path):
  d1, src = data["d1"], data["src"]
  record, shard = os.path.join(d1, RECORD), os.path.join(src, SHARD)
  count, shard_count = _count(d1, "files", RECORD), _count(src, "shards", SHARD)
  distill = f"rebuild dataset 'd1' ({d1}) with data_prep.distill"
  ingest = (f"rebuild its source shards ({src}) with data_prep.ingest, then dataset 'd1' from "
            "them with data_prep.distill")

  # The records' relative `source` is resolved against their folder, not the working directory.
  info = pipeline.open_dataset(d1, "d1")
  assert info.source_path == src and {p.source_shard for p in info.pairs} == {
      os.path.join(src, s) for s in ("shard-00000-of-00002.tfrecord", SHARD)}
  pipeline.check_files(info)  # the copies are whole

  # A byte flipped in a record file: the size is right, its CRC is not (read time), streamed
  # and in the memory cache alike.
  pristine = open(record, "rb").read()
  _flip_a_byte(record)
  for memory_cache in (False, True):
    message = _first_batch(d1, memory_cache=memory_cache)
    assert message.startswith(f"dataset 'd1': record file {record} is corrupt after "), message
    assert f"of its {count} records (corrupted record at " in message, message
    assert message.endswith(distill), message
  with open(record, "wb") as f:
    f.write(pristine)

  # A record count other than the manifest's, both ways (the file is whole: same size).
  _set_file(d1, "files", RECORD, count=count - 5)
  assert _first_batch(d1) == (f"dataset 'd1': record file {record} holds {count} records, more "
                              f"than the {count - 5} its manifest lists (not the file the "
                              f"manifest lists); {distill}")
  _set_file(d1, "files", RECORD, count=count + 5)
  assert _first_batch(d1) == (f"dataset 'd1': record file {record} is truncated: it holds "
                              f"{count} whole records, its manifest lists {count + 5}; {distill}")
  _set_file(d1, "files", RECORD, count=count)

  # A source shard deleted before the run (the first check), or after the run opened the
  # dataset (its read: the file is looked for, not retried forever).
  opened = pipeline.open_dataset(d1, "d1")
  moved = shutil.move(shard, str(tmp_path / "away.tfrecord"))
  assert _first_batch(d1) == f"dataset 'd1': source shard {shard} is missing; {ingest}"
  with pytest.raises(DataError) as e, pipeline.naming_bad_files([opened]):
    next(iter(pipeline.train_dataset([opened], resolution=32, host_batch=8, num_classes=10)))
  assert str(e.value) == f"dataset 'd1': source shard {shard} is missing; {ingest}"
  shutil.move(moved, shard)

  # Source shards trained on directly, and the eval data: their rebuild is data_prep.ingest.
  _truncate(shard)
  whole = _whole_records(shard)
  _set_file(src, "shards", SHARD, bytes=None)
  truncated = (f"source shard {shard} is truncated: it holds {whole} whole records, its "
               f"manifest lists {shard_count}")
  assert _first_batch(src, "digits") == (f"dataset 'digits': {truncated}; rebuild dataset "
                                         f"'digits' ({src}) with data_prep.ingest")
  eval_ds, eval_info = pipeline.eval_dataset(src, resolution=32, batch_size=50)
  with pytest.raises(DataError) as e, pipeline.naming_bad_files([eval_info]):
    for _ in eval_ds:
      pass
  assert str(e.value) == (f"the eval data: {truncated}; rebuild the eval data ({src}) with "
                          "data_prep.ingest")
  _set_file(src, "shards", SHARD, bytes=os.path.getsize(shard) + 1)
  with pytest.raises(DataError, match=re.escape(
      f"the eval data: source shard {shard} is {os.path.getsize(shard)} bytes but its manifest "
      f"says {os.path.getsize(shard) + 1} (truncated or overwritten)")):
    pipeline.eval_dataset(src, resolution=32, batch_size=50)

  # A manifest listing a file outside its folder is refused before anything is read.
  _set_file(d1, "files", RECORD, path="../../elsewhere.tfrecord")
  with pytest.raises(FormatError, match=r"^dataset 'd1' .*'\.\./\.\./elsewhere\.tfrecord'"):
    pipeline.open_dataset(d1, "d1")
