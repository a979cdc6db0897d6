"""The Beam jobs' console: real 2-worker DirectRunner jobs, run as a user runs them."""

import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from data_prep import console
from data_prep.digits import write_digits_folder

BEAM_2_WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]

# What the DirectRunner's workers and Beam's optional GCP imports print when left alone.
CHATTER = ["sdk_worker", "Pipeline_options", "gcp_oauth_scopes", "Failed to import GCSFileSystem",
           "apitools not found", "Resource module is not available", "semi_persistent_directory",
           "Worker: severity", "Discarding unparseable args", "INFO:", "WARNING:", "Traceback"]


def _run(args, cwd):
  env = dict(os.environ)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # The worker processes import data_prep too: the checkout under test comes first.
  env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                        cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def digits_100(tmp_path_factory):
  root = tmp_path_factory.mktemp("digits100")
  write_digits_folder(str(root), limit=99)
  (root / "4" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  return str(root)


@pytest.mark.e2e
def test_a_two_worker_ingest_prints_progress_and_counters_not_harness_chatter(digits_100,
                                                                               tmp_path):
  out = tmp_path / "sources"
  result = _run(["-m", "data_prep.ingest", f"--images={digits_100}", f"--out={out}"]
                + BEAM_2_WORKERS, tmp_path)
  text = result.stdout + result.stderr
  assert result.returncode == 0, text
  assert result.stderr == ""  # no warning or error on a clean run
  for needle in CHATTER:
    assert needle not in text, (needle, text)
  lines = result.stdout.strip().splitlines()
  assert len(lines) <= 8, text
  assert re.search(r"^\d\d:\d\d:\d\d ingest: writing ", lines[0]), text
  # Every image was counted in the worker processes and reached this process's progress line.
  final = [l for l in lines if "ingest: 100/100 images in " in l]
  assert len(final) == 1, text
  assert re.search(r"[\d.]+ images/s; .*images_corrupt=1 images_ok=99 ", final[0]), final
  assert lines[-1].endswith(f"ingest: 99 images in 10 classes, 1 shards, 1 dead letters -> {out}")


@pytest.mark.e2e
def test_verbose_brings_the_library_logs_back(digits_100, tmp_path):
  result = _run(["-m", "data_prep.ingest", f"--images={digits_100}", f"--out={tmp_path / 's'}",
                 "--verbose"] + BEAM_2_WORKERS, tmp_path)
  text = result.stdout + result.stderr
  assert result.returncode == 0, text
  assert "INFO:apache_beam.runners.worker.sdk_worker" in text
  assert "Worker: severity: INFO" in text  # what the workers forward
  assert len(text.splitlines()) > 40
  assert "ingest: 100/100 images in " in text  # progress still counts


@pytest.mark.e2e
def test_worker_warnings_and_errors_reach_the_console_once(tmp_path):
  script = tmp_path / "job.py"
  script.write_text(textwrap.dedent("""
      import logging, sys
      from data_prep import console, files
      import apache_beam as beam
      from apache_beam.options.pipeline_options import PipelineOptions
      from mnv4_train.data import formats

      def check(x):
        if x == 3:
          logging.getLogger("user.code").warning("element %d looks odd", x)
        if x == 7:
          raise ValueError("element 7 is bad")
        return x

      def run(argv):
        console.expect(20, "things")
        files.run_staged(out=sys.argv[1], overwrite=False,
                         pipeline=beam.Pipeline(options=PipelineOptions(argv)),
                         build=lambda p, tmp: (p | beam.Create(range(20))
                                               | console.ReportProgress()
                                               | beam.Map(check)),
                         manifest=formats.SourceShards)

      files.job_main("data_prep.check", run, sys.argv[2:])
      """))
  result = _run([str(script), str(tmp_path / "out")] + BEAM_2_WORKERS, tmp_path)
  text = result.stdout + result.stderr
  assert result.returncode == 1, text
  assert result.stderr.count("warning: worker: element 3 looks odd") == 1, text
  assert result.stderr.count(
      "error: worker: element 7 is bad [while running 'Map(check)']") == 1, text
  assert text.rstrip().endswith("ValueError: element 7 is bad [while running 'Map(check)']")
  # (The traceback itself runs through Beam's sdk_worker frames.)
  for needle in ["Python sdk harness", "Pipeline_options", "Failed to import GCSFileSystem",
                 "INFO:", "Error processing instruction", "Worker: severity"]:
    assert needle not in text, (needle, text)
  assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_progress_line_has_rate_and_eta():
  progress = console._Progress("distill d1", 100, "records")
  assert progress.text() == "distill d1: 0/100 records (0%), starting"
  progress.add(10)
  assert progress.text() == "distill d1: 10/100 records (10%)"  # no rate from one report
  time.sleep(1.1)
  progress.add(10)
  text = progress.text()
  match = re.fullmatch(r"distill d1: 20/100 records \(20%\), ([\d.]+) records/s, ETA 0:(\d\d)",
                       text)
  assert match, text
  rate, eta = float(match.group(1)), int(match.group(2))
  assert 5 < rate < 10 and abs(eta - 80 / rate) <= 1
  time.sleep(0.2)
  assert progress.text() == text  # the rate holds still between reports
  progress.add(80)
  assert progress.text().endswith("records/s, finishing")
  assert re.fullmatch(r"distill d1: 100/100 records in 0:0\d, [\d.]+ records/s",
                      progress.text(final=True))
  unknown = console._Progress("ingest", None, "images")
  unknown.add(5)
  assert unknown.text(final=True).startswith("ingest: 5 images in 0:00, ")


@pytest.mark.e2e
def test_the_main_job_passes_verbose_to_its_beam_jobs(capfd, tmp_path):
  from mnv4_train import demo
  demo.parse_args(["--verbose", f"--workspace={tmp_path}"])
  missing = tmp_path / "no_images"
  with pytest.raises(demo.StageFailed):
    demo._run("2/8 sources", ["data_prep.ingest", f"--images={missing}", f"--out={tmp_path}/o"])
  captured = capfd.readouterr()
  assert f"2/8 sources: data_prep.ingest --images={missing} --out={tmp_path}/o --verbose" in (
      captured.out), captured.out
  assert f"data_prep.ingest: error: --images {missing} is not a folder" in captured.err
  demo.parse_args([f"--workspace={tmp_path}"])
  assert demo._VERBOSE == []


def test_native_chatter_is_kept_off_stderr_but_errors_pass(capfd):
  """`mnv4_train.cli.chatter_filter` (around the export's converter and LiteRT), at the fd level
  where C++ writes: chatter dropped, error lines through; after a failure, the context too."""
  from mnv4_train import cli
  chatter = [b"WARNING: All log messages before absl::InitializeLog() is called are written\n",
             b"W0000 00:00:1.0    7311 tf_tfl_flatbuffer_helpers.cc:364] Ignored output_format.\n",
             b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"]
  error = b"E0000 00:00:1.0    7311 converter.cc:1] the real trouble\n"
  with cli.chatter_filter():
    for line in chatter + [error]:
      os.write(2, line)
  assert capfd.readouterr().err == error.decode()
  with pytest.raises(RuntimeError), cli.chatter_filter():
    os.write(2, chatter[1])
    raise RuntimeError("a bug")
  assert "Ignored output_format" in capfd.readouterr().err  # the context of a failure
  with cli.chatter_filter(verbose=True):
    os.write(2, chatter[2])
  assert capfd.readouterr().err == chatter[2].decode()
