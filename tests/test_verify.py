"""data_prep.verify: clean outputs verify clean, each kind of damage is reported naming its file.

Everything runs on copies of the session fixtures (real shards, selection and records built by
the Beam jobs), laid out as a workspace so the manifests' relative paths resolve.
"""

import json
import os
import shutil

import pytest
import tensorflow as tf

from data_prep import files, select_d3, verify
from mnv4_train.data import formats, records
from mnv4_train.errors import FormatError, InputPathError
from tests.conftest import WarmProcess

pytestmark = pytest.mark.slow


def _copy_workspace(root, source_shards, distill_records, *recipes):
  """Copies the fixture source (and recipes) to root/sources/digits and root/distill/<recipe>,
  each records manifest naming its source relative to itself, as distill writes it."""
  src = os.path.join(root, "sources", "digits")
  shutil.copytree(source_shards[0], src)
  out = {"source": src}
  for recipe in recipes:
    folder = os.path.join(root, "distill", recipe)
    shutil.copytree(distill_records[recipe], folder)
    _edit_manifest(folder, lambda m: m.update(source="../../sources/digits"))
    out[recipe] = folder
  return out


def _edit_manifest(folder, change):
  path = os.path.join(folder, formats.MANIFEST)
  with open(path) as f:
    obj = json.load(f)
  change(obj)
  with open(path, "w") as f:
    json.dump(obj, f)
  return obj


def _file_entry(obj, rel):
  key = "files" if "files" in obj else "shards"
  return next(f for f in obj[key] if f["path"] == rel)


def _problems(report, rel):
  return [line for line in report.shown if line.startswith(rel + ": ")]


def test_clean_outputs_verify_clean_with_their_counts(source_shards, teacher_path,
                                                      distill_records, tmp_path):
  ws = _copy_workspace(str(tmp_path), source_shards, distill_records, "d1", "d2")
  report = verify.run([ws["source"]])
  assert report.clean and report.shown == [], report.lines()
  assert report.format == "mnv4-source-shards/1" and report.writer == "data_prep.ingest"
  assert report.files == 3  # two shards and the dead letters
  assert report.records == report.manifest_records == source_shards[1]["num_examples"] == 200
  assert report.lines() == [f"verify: {ws['source']} holds mnv4-source-shards/1 "
                            "(data_prep.ingest): 3 files, 200 records checked; no problems"]
  for recipe, files_made in (("d1", 4), ("d2", 2)):
    report = verify.run([ws[recipe]])
    manifest = formats.DistillRecords.read(ws[recipe], "--x")
    assert report.clean, report.lines()
    assert report.files == files_made + 1
    assert report.records == manifest.num_records == 200 * manifest.replicas

  # A D3 selection of the copied source, scored by the fixture teacher.
  sel = str(tmp_path / "selections" / "d3")
  made = select_d3.run([f"--corpus={ws['source']}", f"--classifier={teacher_path}",
                        f"--out={sel}", "--per_class=30", "--threshold=0.3"])
  report = verify.run([sel])
  assert report.clean, report.lines()
  assert report.format == "mnv4-d3-selection/1"
  assert report.records == made["num_selected_unique"] > 0

  # A selected row whose id is not the corpus's at that position, and one past the shard.
  path = os.path.join(sel, "selection-00000-of-00001.jsonl")
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  rows[2]["id"] = "9/not-in-the-corpus.png"
  rows[4]["source_index"] = 5000
  with open(path, "w") as f:
    f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
  report = verify.run([sel])
  lines = _problems(report, "selection-00000-of-00001.jsonl")
  assert report.problems == 2 and len(lines) == 2, report.lines()
  assert "row 2 names '9/not-in-the-corpus.png' at position" in lines[0]
  assert "which holds" in lines[0]
  assert f"row 4 names position 5000 of source shard {rows[4]['source_shard']}" in lines[1]


def test_each_kind_of_damage_is_reported_naming_its_file(source_shards, distill_records,
                                                         tmp_path):
  d1 = _copy_workspace(str(tmp_path), source_shards, distill_records, "d1")["d1"]
  a, b, c, d = (f"r000{r}/shard-0000{s}-of-00002.tfrecord" for r in (0, 1) for s in (0, 1))
  # a: truncated halfway through.
  with open(os.path.join(d1, a), "rb") as f:
    data = f.read()
  with open(os.path.join(d1, a), "wb") as f:
    f.write(data[:len(data) // 2])
  # b: one byte flipped inside record 0's data (same size: only the CRC can tell).
  with open(os.path.join(d1, b), "r+b") as f:
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 0x01]))
  # c: deleted.
  os.remove(os.path.join(d1, c))
  # d: rewritten with records.py's writer: record 3 names an id the source does not hold at
  # its position, the last record a position past the end of its source shard; and the
  # manifest's count for it (and its total) changed.
  path = os.path.join(d1, d)
  originals = list(files.read_tfrecords(path))
  n = len(originals)

  def rewritten(serialized, **changes):
    ex = records.parse_distill(tf.constant(serialized))
    fields = dict(example_id=ex["id"].numpy(), source_shard=1,
                  source_index=int(ex["source_index"]),
                  recipe="d1", replica=1, copy=0,
                  params={k: v.numpy() for k, v in ex["params"].items()},
                  logits=ex["teacher_logits"].numpy())
    return records.distill_record(**{**fields, **changes})

  damaged = list(originals)
  damaged[3] = rewritten(originals[3], example_id="0/no-such-image.png")
  damaged[-1] = rewritten(originals[-1], source_index=n + 500)
  files.write_tfrecords(path, damaged)

  def change(m):
    entry = _file_entry(m, d)
    entry["bytes"] = os.path.getsize(path)
    entry["count"] += 1
    m["num_records"] += 1

  _edit_manifest(d1, change)
  # e: a record file the manifest does not list.
  shutil.copy(os.path.join(d1, b), os.path.join(d1, "r0001", "stray.tfrecord"))

  report = verify.run([d1])
  assert not report.clean
  assert _problems(report, a) == [
      f"{a}: is {len(data) // 2:,} bytes, the manifest records {len(data):,}: it was cut off "
      "or changed after it was written",
      next(line for line in report.shown if line.startswith(a) and "it is truncated" in line)]
  assert _problems(report, b) == [f"{b}: record 0 (byte 0) fails its data checksum: its bytes "
                                  "are corrupt"]
  assert _problems(report, c) == [f"{c}: missing (the manifest lists it with 105 records)"]
  on_d = _problems(report, d)
  assert f"{d}: holds {n} records, the manifest lists {n + 1}" in on_d
  assert any("record 3 names '0/no-such-image.png' at position" in line and
             "which holds" in line for line in on_d), on_d
  assert (f"{d}: record {n - 1} names source position {n + 500}; source shard 1 holds {n} "
          "examples") in on_d
  assert _problems(report, "r0001/stray.tfrecord") == [
      "r0001/stray.tfrecord: a record file the manifest does not list (left from another run?)"]
  assert (f"{d}: the manifest lists {n + 1} records, source shard 1 has {n} examples and no "
          "record was set aside") in on_d  # the manifest against its source, before reading
  assert report.problems == len(report.shown) == 9, report.lines()
  assert report.records < report.manifest_records
  lines = report.lines()
  assert lines[0].startswith(f"verify: {d1} holds mnv4-distill-records/1 (data_prep.distill): "
                             "6 files, ") and lines[0].endswith("; 9 problems:")
  assert lines[-1].startswith("verify: rebuild it with: python -m data_prep.distill "
                              "--recipe=d1 --source=") and "--overwrite" in lines[-1]


def test_source_shards_class_counts_and_a_damaged_manifest(source_shards, tmp_path):
  src = _copy_workspace(str(tmp_path), source_shards, {})["source"]
  # Two classes' counts swapped: the sums still agree, only reading every record tells.
  obj = _edit_manifest(src, lambda m: m["counts_per_class"].__setitem__(
      slice(0, 2), [m["counts_per_class"][0] + 1, m["counts_per_class"][1] - 1]))
  report = verify.run([src])
  assert report.shown == [
      f"manifest.json: the shards hold {obj['counts_per_class'][0] - 1} images of class 0, the "
      f"manifest counts {obj['counts_per_class'][0]}",
      f"manifest.json: the shards hold {obj['counts_per_class'][1] + 1} images of class 1, the "
      f"manifest counts {obj['counts_per_class'][1]}"], report.lines()
  # A known format with a value of the wrong type: a problem of the folder (exit 1) ...
  _edit_manifest(src, lambda m: m.update(num_examples="200"))
  report = verify.run([src])
  assert report.problems == 1 and report.files == 0
  assert report.shown[0].startswith("manifest.json: ") and "'num_examples' is the string" in (
      report.shown[0])
  # ... while a folder that is no output, or of a format verify does not know, is a user error.
  with pytest.raises(InputPathError, match="is not a finished output"):
    verify.run([str(tmp_path / "nothing")])
  _edit_manifest(src, lambda m: m.update(format="mnv4-source-shards/9"))
  with pytest.raises(FormatError, match="this reader needs mnv4-source-shards/1 or "):
    verify.run([src])


def test_the_command_line_exit_codes_and_output(source_shards, distill_records, tmp_path):
  ws = _copy_workspace(str(tmp_path), source_shards, distill_records, "d2")
  os.remove(os.path.join(ws["d2"], "r0000", "shard-00001-of-00002.tfrecord"))
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  damaged = WarmProcess("data_prep.verify", ws["d2"], env=env)
  missing = WarmProcess("data_prep.verify", tmp_path / "nothing", env=env)
  out, err = damaged.communicate(timeout=300)
  assert damaged.returncode == 1, err[-2000:]
  assert "Traceback" not in out + err, err[-2000:]
  assert (f"verify: {ws['d2']} holds mnv4-distill-records/1 (data_prep.distill): 3 files, "
          "105 records checked (the manifest lists 200); 1 problem:") in out
  assert ("  r0000/shard-00001-of-00002.tfrecord: missing (the manifest lists it with 95 "
          "records)") in out.splitlines()
  assert "verify: rebuild it with: python -m data_prep.distill --recipe=d2" in out
  out, err = missing.communicate(timeout=300)
  assert missing.returncode == 2 and "Traceback" not in err
  assert err.strip().splitlines() == [
      f"data_prep.verify: error: dataset {tmp_path / 'nothing'} is not a finished output (no "
      "manifest.json); run the stage that builds it first"]
