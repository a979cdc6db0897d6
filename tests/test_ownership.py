"""Nothing lost: outputs that never overlap their inputs, staging folders marked as ours, one
writer per output, jobs killed mid-way, full disks. Real jobs on real images throughout."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from data_prep import ingest
from mnv4_train import ownership
from mnv4_train.errors import UserError
from tests.conftest import WarmProcess, run_cli



def snapshot(root):
  """Every path under `root` (links not followed) with its content's digest or link target."""
  out = {}
  for folder, dirs, names in os.walk(root):
    for name in dirs + names:
      path = os.path.join(folder, name)
      rel = os.path.relpath(path, root)
      if os.path.islink(path):
        out[rel] = "link:" + os.readlink(path)
      elif os.path.isdir(path):
        out[rel] = "dir"
      else:
        with open(path, "rb") as f:
          out[rel] = hashlib.sha1(f.read()).hexdigest()
  return out


def _cli(module, *argv, timeout=300):
  return run_cli(module, *argv, timeout=timeout)


@pytest.fixture
def site(digits_folder, tmp_path):
  """A user's folder: `images/` (a copy of the digits), a notes file beside it, and an unrelated
  folder of the user's own files."""
  images = tmp_path / "images"
  shutil.copytree(digits_folder[0], images)
  (tmp_path / "notes.txt").write_text("the user's own file\n")
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "a.txt").write_text("keep me\n")
  os.symlink(images, tmp_path / "link")
  (tmp_path / "a_file").write_text("not a folder\n")
  return tmp_path


def _other_kind(site):
  """A finished output of another kind (distillation records' manifest) at site/records."""
  folder = site / "records"
  folder.mkdir()
  (folder / "manifest.json").write_text(json.dumps({"format": "mnv4-distill-records/1"}))
  return folder


CASES = {
    # case: (--out relative to the site, extra flags, words the one line must hold)
    "out is the image folder": ("images", [], ["is the input --images"]),
    "out is the image folder's parent": (".", [], ["contains the input --images"]),
    "out is a symlink to the image folder": ("link", [], ["is the input --images"]),
    "out lies inside the image folder": ("images/3", [], ["lies inside the input --images"]),
    "out is a folder of unrelated files": ("mine", [], ["not a finished output"]),
    "out is a folder of unrelated files, --overwrite": ("mine", ["--overwrite"],
                                                        ["not a finished output"]),
    "out is a file": ("a_file", ["--overwrite"], ["is a file"]),
    "out holds another kind of output, --overwrite": ("records", ["--overwrite"],
                                                      ["another kind of output"]),
    "out.tmp exists and is not ours": ("fresh", [], ["fresh.tmp exists and was not made by"]),
    "out.tmp is the image folder": ("im", [], ["--out.tmp", "is the input"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_out_that_overlaps_an_input_or_is_not_ours_is_refused_and_nothing_is_lost(site,
                                                                                        case):
  rel, flags, words = CASES[case]
  if case.startswith("out holds another kind"):
    _other_kind(site)
  if case == "out.tmp exists and is not ours":
    (site / "fresh.tmp").mkdir()
    (site / "fresh.tmp" / "draft.txt").write_text("the user's\n")
  if case == "out.tmp is the image folder":
    os.rename(site / "images", site / "im.tmp")
    os.remove(site / "link")
    images = site / "im.tmp"
  else:
    images = site / "images"
  before = snapshot(site)
  with pytest.raises(UserError) as e:
    ingest.run([f"--images={images}", f"--out={site / rel}", "--num_shards=2", *flags])
  message = str(e.value)
  assert "\n" not in message and all(w in message for w in words), message
  assert snapshot(site) == before  # nothing written, nothing removed, nothing moved


@pytest.mark.e2e
def test_the_cli_says_it_in_one_line_with_exit_status_2(site):
  before = snapshot(site)
  proc = _cli("data_prep.ingest", f"--images={site / 'images'}", f"--out={site}")
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0 and "contains the input --images" in proc.stderr
  assert "Traceback" not in proc.stderr + proc.stdout
  assert snapshot(site) == before


def test_overwrite_replaces_only_a_finished_output_of_the_same_kind(site):
  out = str(site / "sources")
  first = ingest.run([f"--images={site / 'images'}", f"--out={out}", "--num_shards=2"])
  built = snapshot(out)
  with pytest.raises(UserError, match="already holds a finished output"):
    ingest.run([f"--images={site / 'images'}", f"--out={out}", "--num_shards=2"])
  again = ingest.run([f"--images={site / 'images'}", f"--out={out}", "--num_shards=2",
                      "--overwrite"])
  assert again == first and snapshot(out) == built  # the same bytes, nothing of ours left over
  assert not os.path.exists(out + ".tmp") and ownership.OWNER not in os.listdir(out)
  # sizes are recorded, relative paths only
  for shard in first["shards"]:
    assert os.path.getsize(os.path.join(out, shard["path"])) == shard["bytes"]
  # an empty folder made beforehand is fine (nothing in it to lose)
  empty = site / "empty"
  empty.mkdir()
  ingest.run([f"--images={site / 'images'}", f"--out={empty}", "--num_shards=2"])
  assert snapshot(empty) == built


@pytest.mark.e2e
def test_two_jobs_on_one_out_one_writes_the_other_stops_naming_the_holder(site):
  out = site / "sources"
  argv = [f"--images={site / 'images'}", f"--out={out}", "--num_shards=2"]
  procs = [WarmProcess("data_prep.ingest", *argv) for _ in range(2)]
  results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
  codes = sorted(code for code, _ in results)
  assert codes == [0, 2], results
  [(_, loser)] = [r for r in results if r[0] == 2]
  assert loser.strip().count("\n") == 0, loser
  # Started together: the loser meets the winner's claim (or, if the winner was already done,
  # its finished output); either way it names why and removes nothing.
  assert ("is being written by pid" in loser and socket.gethostname() in loser) or (
      "already holds a finished output" in loser), loser
  assert json.loads((out / "manifest.json").read_text())["num_examples"] > 0
  assert not os.path.exists(f"{out}.tmp")


def test_a_claim_of_a_live_process_stops_a_second_writer(tmp_path):
  folder = tmp_path / "x.tmp"
  folder.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    owner = {"host": socket.gethostname(), "pid": holder.pid, "started": "then",
             "process_start": ownership._process_start(holder.pid)}  # pylint: disable=protected-access
    (folder / ownership.OWNER).write_text(json.dumps(owner))
    with pytest.raises(ownership.OutputBusyError, match=f"pid {holder.pid} on host"):
      ownership.claim(str(folder), "--out")
    # the same pid number reused by another process (other start time) is stale
    (folder / ownership.OWNER).write_text(json.dumps({**owner, "process_start": "1"}))
    ownership.claim(str(folder), "--out").release()
    # another host's claim cannot be checked from here: never taken over
    (folder / ownership.OWNER).write_text(json.dumps({**owner, "host": "elsewhere"}))
    with pytest.raises(ownership.OutputBusyError, match="another host.*remove"):
      ownership.claim(str(folder), "--out")
  finally:
    holder.kill()
    holder.wait()


def test_a_staging_folder_claimed_a_moment_after_it_appears_is_a_busy_job_not_a_stranger(
    tmp_path):
  # A job creates <out>.tmp and writes its claim right after; a second job arriving between
  # the two must see the first job's claim, not call the folder someone else's.
  from data_prep import files  # pylint: disable=import-outside-toplevel
  out = str(tmp_path / "out")
  os.mkdir(out + ".tmp")
  claims = []
  writer = threading.Timer(0.5, lambda: claims.append(ownership.claim(out + ".tmp", "--out")))
  writer.start()
  try:
    with pytest.raises(ownership.OutputBusyError, match=f"pid {os.getpid()} on host"):
      files.staging_dir(out)
  finally:
    writer.join()
  assert claims and os.path.exists(os.path.join(out + ".tmp", ownership.OWNER))
  assert os.listdir(out + ".tmp") == [ownership.OWNER]  # no draft left beside the claim
  # A folder that stays without a claim is still refused as not ours, and kept.
  os.mkdir(tmp_path / "other.tmp")
  started = time.monotonic()
  with pytest.raises(UserError, match="other.tmp exists and was not made by this project"):
    files.staging_dir(str(tmp_path / "other"))
  assert time.monotonic() - started >= files.CLAIM_GRACE_S
  assert os.path.isdir(tmp_path / "other.tmp")


def test_a_claim_never_writes_into_or_removes_a_file_it_did_not_create(tmp_path, monkeypatch):
  # The claim is drafted under a private name; should that name already exist, the file there
  # is left as it is (the claim falls back to O_EXCL), and only the claim is added.
  folder = tmp_path / "x.tmp"
  folder.mkdir()
  fixed = uuid.UUID(int=7)
  monkeypatch.setattr(uuid, "uuid4", lambda: fixed)
  draft = folder / f"{ownership.OWNER}.{fixed.hex}.draft"
  draft.write_text("someone else's\n")
  claim = ownership.claim(str(folder), "--out")
  assert draft.read_text() == "someone else's\n"
  assert ownership.read_owner(str(folder))["pid"] == os.getpid()
  claim.release()
  assert sorted(os.listdir(folder)) == [draft.name]
  draft.unlink()
  ownership.claim(str(folder), "--out").release()  # the usual way: its draft is gone after
  assert os.listdir(folder) == []


def _wait_for(path, proc, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None and not os.path.exists(path):
    time.sleep(0.01)
  assert proc.poll() is None, "the job ended before it could be killed"
  assert os.path.exists(path)


@pytest.mark.slow
def test_an_ingest_killed_mid_way_leaves_nothing_finished_and_the_rerun_takes_over(
    digits_folder, source_shards, tmp_path, caplog):
  out = str(tmp_path / "sources")
  proc = WarmProcess("data_prep.ingest", f"--images={digits_folder[0]}", f"--out={out}",
                     "--num_shards=2")
  _wait_for(os.path.join(out + ".tmp", ownership.OWNER), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(out)  # nothing looks finished
  assert ownership.read_owner(out + ".tmp")["pid"] == proc.pid
  with caplog.at_level("WARNING"):
    ingest.run([f"--images={digits_folder[0]}", f"--out={out}", "--num_shards=2"])
  assert any("taking over from a job that is gone" in r.getMessage() and str(proc.pid) in
             r.getMessage() for r in caplog.records)
  assert snapshot(out) == snapshot(source_shards[0])  # byte-identical to an undisturbed run
  assert not os.path.exists(out + ".tmp")


@pytest.mark.slow
def test_a_distill_job_stopped_by_sigterm_mid_way_reruns_to_the_same_bytes(
    source_shards, teacher_path, distill_records, tmp_path):
  from data_prep import distill
  out = str(tmp_path / "d2")
  flags = ["--recipe=d2", f"--source={source_shards[0]}", f"--teacher={teacher_path}",
           f"--out={out}", "--replicas=1", "--top_k=3", "--batch_size=32", "--jpeg_quality=0"]
  proc = WarmProcess("data_prep.distill", *flags)
  _wait_for(os.path.join(out + ".tmp", ownership.OWNER), proc)
  time.sleep(1.0)  # into the pipeline
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=60) != 0
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  distill.run(flags)
  ours, theirs = snapshot(out), snapshot(distill_records["d2"])
  assert {k: v for k, v in ours.items() if k != "manifest.json"} == {
      k: v for k, v in theirs.items() if k != "manifest.json"}
  mine = json.loads(open(os.path.join(out, "manifest.json")).read())
  ref = json.loads(open(os.path.join(distill_records["d2"], "manifest.json")).read())
  # the manifest names its source relative to its own folder; all else is the same
  assert os.path.normpath(os.path.join(out, mine.pop("source"))) == source_shards[0]
  ref.pop("source")
  assert mine == ref


# ---- full disks ---------------------------------------------------------------------------------

@contextlib.contextmanager
def small_disk(path, size):
  """A tmpfs of `size` mounted at `path` (needs root, which CI has)."""
  os.makedirs(path, exist_ok=True)
  subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


@needs_root
@pytest.mark.e2e
def test_a_beam_job_on_a_full_disk_says_so_in_one_line_and_leaves_nothing(digits_folder,
                                                                          tmp_path):
  with small_disk(tmp_path / "disk", "24k") as disk:
    proc = _cli("data_prep.ingest", f"--images={digits_folder[0]}", f"--out={disk}/sources",
                "--num_shards=2")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no space left" in proc.stderr, proc.stderr
    assert os.listdir(disk) == []  # no half-written output, no staging folder


@needs_root
def test_an_export_to_a_full_disk_says_so_in_one_line_and_leaves_nothing(teacher_path,
                                                                         tmp_path):
  with small_disk(tmp_path / "disk", "64k") as disk:
    proc = _cli("mnv4_train.export", "--model=conv_s", f"--checkpoint={teacher_path}",
                f"--out={disk}/export", "--format=tflite_float32")
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "no space left" in lines[0], proc.stderr
    assert os.listdir(disk) == []


@needs_root
def test_a_checkpoint_on_a_full_disk_is_one_line_keeps_the_last_one_and_resumes(source_shards,
                                                                                tmp_path):
  """A 7 MB disk holds the tiny student's step-2 checkpoint (5 MB) but not its step-4 one."""
  with small_disk(tmp_path / "disk", "7m") as disk:
    workdir = os.path.join(disk, "run")
    args = ["mnv4_train.main", "--gin_file=smoke.gin", f"--workdir={workdir}",
            f"--gin_bindings=data.datasets={{'digits': '{source_shards[0]}'}}",
            "--gin_bindings=schedule.train_steps=4", "--gin_bindings=cadence.checkpoint_every=2",
            "--gin_bindings=loss.teacher='none'", "--gin_bindings=loss.label_weight=1.0",
            "--gin_bindings=loss.distill_weight=0.0"]
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if "error" in l.lower() or "Trace" in l]
    assert len(errors) == 1 and "no space left on the device of" in errors[0], errors
    ckpts = os.path.join(workdir, "checkpoints")
    assert sorted(n for n in os.listdir(ckpts) if n.startswith("ckpt-")) == [
        "ckpt-2.data-00000-of-00001", "ckpt-2.index"]  # step 4's half-written save is gone
    assert not os.path.exists(os.path.join(workdir, "metrics.json"))
    assert not os.path.exists(os.path.join(workdir, ownership.OWNER))
    # Space freed (the disk grown), the same command continues from step 2 and finishes.
    subprocess.run(["mount", "-o", "remount,size=32m", str(disk)], check=True)
    again = _cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "ckpt-2" in again.stderr, again.stderr
    assert json.load(open(os.path.join(workdir, "metrics.json")))["step"] == 4


def test_export_refuses_an_out_that_is_not_a_finished_export(teacher_path, tmp_path, capsys):
  from mnv4_train import export
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "a.txt").write_text("keep\n")
  shutil.copy(teacher_path, tmp_path / "t.keras")
  before = snapshot(tmp_path)
  for out, flags, words in ((mine, ["--overwrite"], "is not a finished export"),
                            (tmp_path, [], "contains the input --checkpoint")):
    with pytest.raises(SystemExit) as e:
      export.main(["--model=conv_s", f"--checkpoint={tmp_path / 't.keras'}", f"--out={out}",
                   "--format=tflite_float32", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and words in err, err
    assert snapshot(tmp_path) == before


def test_the_main_job_refuses_a_workspace_that_is_not_its_own(site):
  from mnv4_train import demo
  before = snapshot(site)
  for workspace, words in ((site, "contains the input --images"),
                           (site / "images" / "ws", "lies inside the input --images"),
                           (site / "mine", "holds 'a.txt', which this job did not write")):
    with pytest.raises(UserError) as e:
      demo.run([f"--images={site / 'images'}", f"--workspace={workspace}"])
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert snapshot(site) == before
  # What the relevance benchmark adds to a main-job workspace keeps it the main job's.
  ws = site / "ws"
  ws.mkdir()
  for name in ("report.json", "relevance_filter.json", "relevance_filter.png"):
    (ws / name).write_text("{}")
  demo.check_workspace(str(ws), str(site / "images"))


def test_a_second_trainer_on_a_workdir_stops_at_once_naming_the_first(distill_records,
                                                                      tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    owner = {**ownership.me("mnv4_train.main ..."), "pid": holder.pid,
             "process_start": ownership._process_start(holder.pid)}  # pylint: disable=protected-access
    (workdir / ownership.OWNER).write_text(json.dumps(owner))
    data = f"data.datasets={{'d1': '{distill_records['d1']}'}}"
    proc = run_cli("mnv4_train.main", "--gin_file=smoke.gin", f"--workdir={workdir}",
                   f"--gin_bindings={data}", "--gin_bindings=schedule.train_steps=2",
                   timeout=300)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and f"being written by pid {holder.pid} on host" in lines[0], lines
    assert sorted(os.listdir(workdir)) == [ownership.OWNER]  # it wrote nothing
    # a workdir inside a dataset would write into it: refused too
    inside = os.path.join(distill_records["d1"], "run")
    proc = run_cli("mnv4_train.main", "--gin_file=smoke.gin", f"--workdir={inside}",
                   f"--gin_bindings={data}", timeout=300)
    assert proc.returncode == 2 and "lies inside the input data.datasets['d1']" in proc.stderr
    assert not os.path.exists(inside)
  finally:
    holder.kill()
    holder.wait()
