"""The stage outputs' manifests (mnv4_train.data.formats): round trips, kind and version checks."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from data_prep import distill, select_d3
from mnv4_train.data import formats, pipeline
from mnv4_train.errors import FormatError, InputPathError, UserError, first_line

SHARDS = (formats.FileCount("shard-00000-of-00002.tfrecord", 3),
          formats.FileCount("shard-00001-of-00002.tfrecord", 0))

EXAMPLES = {
    formats.SourceShards: formats.SourceShards(
        source={"kind": "image_folder", "path": "/data/digits", "subset": "all",
                "holdout_fraction": 0.0},
        num_examples=3, num_classes=2, class_names=["a", "b"], counts_per_class=[2, 1],
        unlabeled=0, shards=SHARDS, dead_letter=1),
    formats.D3Selection: formats.D3Selection(
        corpus="/ws/sources/corpus", classifier="relevance.keras", threshold=0.3, per_class=4,
        resolution=32, num_classes=2, source_shards=SHARDS, num_files=1,
        selected_unique_per_class=[2, 0], selected_total_per_class=[4, 0],
        num_selected_unique=2, num_selected_total=4, empty_classes=[1],
        num_above_threshold=2),
    formats.DistillRecords: formats.DistillRecords(
        recipe="d1", recipe_settings={"name": "d1", "crop_area": [0.5, 1.0], "flip": False},
        replicas=2, replica_offset=0, source="/ws/sources/train", selection=None,
        teacher="teacher.keras", resolution=32, teacher_input="minus_one_to_one",
        teacher_outputs="logits", top_k=0, num_classes=2, num_source_shards=2,
        files=(formats.FileCount("r0000/shard-00000-of-00002.tfrecord", 3),),
        num_records=3, dead_letter=0),
}
KINDS = list(EXAMPLES)


def _write_raw(folder, obj):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, formats.MANIFEST), "w") as f:
    json.dump(obj, f)
  return str(folder)


def _write(manifest, folder):
  os.makedirs(folder, exist_ok=True)
  manifest.write(str(folder))
  return str(folder)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_round_trip(kind, tmp_path):
  manifest = EXAMPLES[kind]
  manifest.write(str(tmp_path))
  with open(tmp_path / formats.MANIFEST) as f:
    on_disk = json.load(f)
  assert on_disk["format"] == f"{kind.KIND}/{kind.VERSION}"
  assert on_disk == manifest.to_json()
  assert kind.read(str(tmp_path), "--x") == manifest


def test_the_json_keys_are_what_the_jobs_wrote_before_the_typed_records(tmp_path):
  # Written by the jobs before formats.py existed: existing workspaces must still read.
  old = {"format": "mnv4-distill-records/1", "recipe": "d2",
         "recipe_spec": {"name": "d2", "mixup": True}, "replicas": 4, "replica_offset": 0,
         "source": "/ws/sources/train", "selection": None, "teacher": "t.keras",
         "resolution": 32, "teacher_input": "minus_one_to_one", "teacher_outputs": "logits",
         "top_k": 0, "num_classes": 10, "num_source_shards": 1,
         "files": [{"path": "r0000/shard-00000-of-00001.tfrecord", "count": 7}],
         "num_records": 7, "dead_letter": 0}
  m = formats.DistillRecords.read(_write_raw(tmp_path, old), "--x")
  assert m.recipe_settings == {"name": "d2", "mixup": True}
  assert m.files == (formats.FileCount("r0000/shard-00000-of-00001.tfrecord", 7),)
  assert m.to_json() == old


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_another_kind_is_refused_in_one_line(kind, tmp_path):
  for other in KINDS:
    if other is kind:
      continue
    folder = tmp_path / other.KIND
    _write(EXAMPLES[other], folder)
    with pytest.raises(FormatError) as e:
      kind.read(str(folder), "--input")
    assert str(e.value) == (
        f"--input {folder} is a {other.KIND}/1 manifest; this reader needs {kind.KIND}/1, "
        f"rebuild it with {kind.WRITER}")


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_another_version_is_refused_in_one_line(kind, tmp_path):
  newer = {**EXAMPLES[kind].to_json(), "format": f"{kind.KIND}/2"}
  folder = _write_raw(tmp_path / "newer", newer)
  with pytest.raises(FormatError) as e:
    kind.read(folder, "--input")
  assert str(e.value) == (f"--input {folder} is a {kind.KIND}/2 manifest; this reader needs "
                          f"{kind.KIND}/1, rebuild it with {kind.WRITER}")
  unversioned = {k: v for k, v in EXAMPLES[kind].to_json().items() if k != "format"}
  folder = _write_raw(tmp_path / "old", unversioned)
  with pytest.raises(FormatError, match="is an unversioned manifest; this reader needs"):
    kind.read(folder, "--input")


def test_missing_key_missing_manifest_and_broken_json_are_one_line_errors(tmp_path):
  obj = EXAMPLES[formats.SourceShards].to_json()
  del obj["shards"]
  folder = _write_raw(tmp_path / "a", obj)
  with pytest.raises(FormatError, match="without 'shards'; rebuild it with data_prep.ingest"):
    formats.SourceShards.read(folder, "--source")
  with pytest.raises(InputPathError, match="is not a finished output"):
    formats.SourceShards.read(str(tmp_path / "nothing"), "--source")
  os.makedirs(tmp_path / "b")
  (tmp_path / "b" / formats.MANIFEST).write_text("[1, 2")
  with pytest.raises(FormatError, match="not a JSON object"):
    formats.SourceShards.read(str(tmp_path / "b"), "--source")


def test_the_readers_name_what_they_need(tmp_path):
  selection = str(tmp_path / "d3")
  _write(EXAMPLES[formats.D3Selection], selection)
  # The trainer takes records or source shards, not a selection.
  with pytest.raises(FormatError) as e:
    pipeline.open_dataset(selection, "d3")
  assert str(e.value) == (
      f"dataset 'd3' {selection} is a mnv4-d3-selection/1 manifest; this reader needs "
      "mnv4-distill-records/1 or mnv4-source-shards/1, rebuild it with data_prep.distill or "
      "data_prep.ingest")
  # The jobs read their inputs before loading any model.
  with pytest.raises(FormatError, match="--source .* needs mnv4-source-shards/1"):
    distill.run(["--recipe=d1", f"--source={selection}", "--teacher=absent.keras",
                 f"--out={tmp_path}/out"])
  with pytest.raises(FormatError, match="--corpus .* needs mnv4-source-shards/1"):
    select_d3.run([f"--corpus={selection}", "--classifier=absent.keras",
                   f"--out={tmp_path}/out"])


def test_the_trainer_reads_source_shards_as_pairs_without_record_files(tmp_path):
  folder = str(tmp_path / "src")
  _write(EXAMPLES[formats.SourceShards], folder)
  info = pipeline.open_dataset(folder, "src")
  assert info.kind == "source" and info.num_examples == 3 and info.num_classes == 2
  assert info.pairs == (pipeline.ShardPair(os.path.join(folder, SHARDS[0].path), 3),)
  assert info.pairs[0].record_file is None


def test_first_line_never_fails_on_an_empty_message():
  assert first_line(ValueError("")) == "ValueError"
  assert first_line(UserError("\n  first\nsecond")) == "first"
  assert first_line("", "fallback") == "fallback"


@pytest.mark.parametrize("body, code, out, err", [
    ("print('done', end=''); return 0", 0, "done", ""),
    ("print('half', end=''); sys.exit(3)", 3, "half", ""),
    ("sys.exit('bad thing')", 1, "", "bad thing"),
    ("return None", 0, "", ""),
])
def test_commands_end_through_exit_now_with_their_status_and_output(body, code, out, err):
  """`run_then_exit` (every command's __main__) keeps the status and flushes buffered output,
  and skips interpreter teardown: an atexit hook never runs."""
  script = textwrap.dedent(f"""
      import atexit, sys
      from mnv4_train.errors import run_then_exit
      atexit.register(lambda: print("TEARDOWN", file=sys.stderr))
      def main():
        {body}
      run_then_exit(main)
      print("not reached")
      """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        check=False)
  assert proc.returncode == code, proc.stderr
  assert proc.stdout == out
  assert proc.stderr.strip() == err
