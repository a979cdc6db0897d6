"""The launch scripts: the exact commands their dry runs print, their refusals, and real runs
against stand-ins (a fake `gcloud` on PATH, fake worker interpreters)."""

import configparser
import json
import os
import re
import shlex
import stat
import subprocess
import sys

import pytest

from launch import common, dataflow, gpu_cluster, tpu_pod

PY = sys.executable
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def _commands(out: str) -> list[list[str]]:
  """The `$ ...` lines of a run, each split as a shell would."""
  lines = out.strip().splitlines()
  assert all(line.startswith(("$ ", "# ")) for line in lines), out
  return [shlex.split(line[2:]) for line in lines if line.startswith("$ ")]


def _run_main(main, argv, capsys):
  """Runs a script's main in-process; returns (exit status, stdout, stderr)."""
  try:
    code = main(argv)
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def _one_line_error(code, err, prog, *needles):
  assert code == 2
  assert "Traceback" not in err, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
  for needle in needles:
    assert needle in lines[0], lines[0]


def _setup_cfg():
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(common.ROOT, "setup.cfg"))
  return cfg


# ---- TPU pod slice ------------------------------------------------------------------------------

TPU_ARGS = ["--name", "t1", "--zone", "us-central2-b", "--gin_file", "conv_l_distill.gin",
            "--workdir", "gs://b/run"]


def test_tpu_pod_dry_run_prints_every_step_and_deletes_last(capsys):
  code, out, _ = _run_main(tpu_pod.main, [*TPU_ARGS, "--accelerator_type", "v4-32", "--project",
                                          "p", "--gin_bindings", "schedule.train_steps=10",
                                          "--dry_run"], capsys)
  assert code == 0
  archive_cmd, create, copy, install, train, delete = _commands(out)
  where = ["--zone=us-central2-b", "--project=p"]
  archive = archive_cmd[-2].removeprefix("--output=")
  assert archive_cmd == ["git", "-C", common.ROOT, "archive", "--format=tar.gz",
                         "--prefix=mnv4-distill/", f"--output={archive}", "HEAD"]
  assert create == [*GCLOUD_TPU, "create", "t1", *where, "--accelerator-type=v4-32",
                    "--version=tpu-vm-tf-2.20.0-pod-pjrt"]
  assert copy == [*GCLOUD_TPU, "scp", archive, "t1:mnv4-distill.tar.gz", *where, "--worker=all"]
  assert install[:-1] == [*GCLOUD_TPU, "ssh", "t1", *where, "--worker=all", "--command"]
  assert "pip install -q -e ./mnv4-distill" in install[-1]
  # a pod is driven from worker 0, which finds the other hosts by the TPU's name
  assert train[:-1] == [*GCLOUD_TPU, "ssh", "t1", *where, "--worker=0", "--command"]
  assert shlex.split(train[-1]) == [
      "cd", "mnv4-distill", "&&", "TPU_LOAD_LIBRARY=0", "python3", "-m", "mnv4_train.main",
      "--gin_file=conv_l_distill.gin", "--workdir=gs://b/run",
      '--gin_bindings=runtime.distribution="tpu"', '--gin_bindings=runtime.tpu="t1"',
      "--gin_bindings=schedule.train_steps=10"]
  assert delete == [*GCLOUD_TPU, "delete", "t1", *where, "--quiet"]


def test_tpu_runtime_default_is_setup_cfg_tensorflow():
  pins = _setup_cfg()["options"]["install_requires"]
  assert f"tensorflow=={tpu_pod.TF_VERSION}" in pins.split()


def test_tpu_single_host_runs_locally_with_the_pjrt_plugin(capsys):
  code, out, _ = _run_main(tpu_pod.main, [*TPU_ARGS, "--accelerator_type", "v5litepod-8",
                                          "--spot", "--dry_run"], capsys)
  assert code == 0
  _, create, *_, train, _ = _commands(out)
  assert create[-2:] == ["--version=tpu-vm-tf-2.20.0-pjrt", "--spot"]
  remote = shlex.split(train[-1])
  assert remote[3:5] == ["NEXT_PLUGGABLE_DEVICE_USE_C_API=true",
                         "TF_PLUGGABLE_DEVICE_LIBRARY_PATH=/lib/libtpu.so"]
  assert '--gin_bindings=runtime.tpu="local"' in remote


def test_tpu_keep_skips_the_delete_and_says_how(capsys):
  code, out, _ = _run_main(tpu_pod.main, [*TPU_ARGS, "--accelerator_type", "v4-32", "--keep",
                                          "--runtime_version", "tpu-vm-tf-2.20.0-pod-pjrt-x",
                                          "--dry_run"], capsys)
  assert code == 0
  commands = _commands(out)
  assert [c[4] for c in commands[1:]] == ["create", "scp", "ssh", "ssh"]
  assert "--version=tpu-vm-tf-2.20.0-pod-pjrt-x" in commands[1]
  assert out.strip().splitlines()[-1].startswith("# kept TPU t1; delete it with: gcloud")


@pytest.mark.parametrize("argv, needles", [
    (["--accelerator_type", "v4-32", "--workdir", "/tmp/run"], ["--workdir /tmp/run", "gs://"]),
    (["--accelerator_type", "tpu32"], ["--accelerator_type tpu32"]),
    (["--accelerator_type", "v4-32", "--gin_bindings", "runtime.tpu='x'"], ["runtime.tpu"]),
])
def test_tpu_user_mistakes_are_one_line(argv, needles, capsys):
  code, out, err = _run_main(tpu_pod.main, [*TPU_ARGS, *argv, "--dry_run"], capsys)
  _one_line_error(code, err, "launch.tpu_pod", *needles)
  assert out == ""


def _fake_gcloud(tmp_path, fail_on: str):
  """A `gcloud` that logs its arguments and fails when they contain `fail_on`."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  script = bin_dir / "gcloud"
  script.write_text("#!/bin/sh\n"
                    f'echo "$*" >> {tmp_path / "gcloud.log"}\n'
                    f'case "$*" in *{fail_on}*) echo "remote failure" >&2; exit 7;; esac\n')
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
         "TMPDIR": str(tmp_path)}
  return env, tmp_path / "gcloud.log"


@pytest.mark.skipif(not os.path.exists(os.path.join(common.ROOT, ".git")),
                    reason="ships a git commit: needs a git checkout")
@pytest.mark.parametrize("fail_on, code", [("--worker=0", 2), ("no-such-step", 0)])
def test_tpu_real_run_deletes_the_slice_also_when_training_fails(tmp_path, fail_on, code):
  env, log = _fake_gcloud(tmp_path, fail_on)
  result = subprocess.run([PY, "-m", "launch.tpu_pod", *TPU_ARGS, "--accelerator_type", "v4-32"],
                          capture_output=True, text=True, env=env, cwd=common.ROOT, timeout=60)
  assert result.returncode == code, result.stderr
  steps = [line.split()[3] for line in log.read_text().splitlines()]  # after "compute tpus tpu-vm"
  assert steps == ["create", "scp", "ssh", "ssh", "delete"]
  assert (tmp_path / "mnv4-distill-t1.tar.gz").stat().st_size > 0  # the real git archive
  if code:
    assert result.stderr.strip().splitlines()[-1].startswith(
        "launch.tpu_pod: error: cannot train on the TPU: exit status 7 from: gcloud")


# ---- Dataflow -----------------------------------------------------------------------------------

DF_ARGS = ["--project", "p", "--region", "us-central1", "--temp_location", "gs://b/tmp",
           "--dry_run"]
DISTILL_FLAGS = ["--recipe", "d1", "--source", "gs://b/ws/sources/in", "--teacher",
                 "gs://b/ws/teachers/t.keras", "--out=gs://b/ws/distill/d1", "--replicas", "10"]


def test_dataflow_gpu_job_runs_in_the_container_with_accelerators(capsys):
  code, out, _ = _run_main(dataflow.main, ["distill", *DF_ARGS, "--sdk_container_image", "IMG",
                                           "--gpu_type", "nvidia-tesla-t4", "--gpus", "2",
                                           "--", *DISTILL_FLAGS], capsys)
  assert code == 0
  [job] = _commands(out)
  options = ["--runner=DataflowRunner", "--project=p", "--region=us-central1",
             "--temp_location=gs://b/tmp", "--sdk_container_image=IMG",
             "--dataflow_service_options=worker_accelerator=type:nvidia-tesla-t4;count:2;"
             "install-nvidia-driver", "--experiments=use_runner_v2",
             f"--job_name={dataflow.job_name('distill', DISTILL_FLAGS)}"]
  assert job == [PY, "-m", "data_prep.distill", *DISTILL_FLAGS, *options]

  # Beam reads the options as meant
  from apache_beam.options import pipeline_options as po
  parsed = po.PipelineOptions(options)
  assert parsed.view_as(po.StandardOptions).runner == "DataflowRunner"
  assert parsed.view_as(po.GoogleCloudOptions).dataflow_service_options == [
      "worker_accelerator=type:nvidia-tesla-t4;count:2;install-nvidia-driver"]
  assert parsed.view_as(po.WorkerOptions).sdk_container_image == "IMG"
  assert parsed.view_as(po.DebugOptions).experiments == ["use_runner_v2"]


def test_dataflow_without_container_ships_a_wheel_of_this_checkout(capsys):
  flags = ["--images", "gs://b/raw", "--out", "gs://b/ws/sources/in", "--num_workers=4"]
  code, out, _ = _run_main(dataflow.main, ["ingest", *DF_ARGS, "--", *flags], capsys)
  assert code == 0
  build, job = _commands(out)
  dist = os.path.join(common.ROOT, "dist")
  assert build == [PY, "-m", "pip", "wheel", "--no-deps", "-q", f"--wheel-dir={dist}",
                   common.ROOT]
  meta = _setup_cfg()["metadata"]
  wheel = f"{meta['name'].replace('-', '_')}-{meta['version']}-py3-none-any.whl"
  assert job == [PY, "-m", "data_prep.ingest", *flags, "--runner=DataflowRunner", "--project=p",
                 "--region=us-central1", "--temp_location=gs://b/tmp",
                 f"--extra_package={os.path.join(dist, wheel)}",
                 f"--job_name={dataflow.job_name('ingest', flags)}"]


def test_dataflow_names_the_job_after_its_output_so_two_cannot_run_at_once(capsys):
  a = dataflow.job_name("distill", ["--out", "gs://b/ws/distill/d1"])
  assert a == dataflow.job_name("distill", ["--out=gs://b/ws/distill/d1/"])  # same output
  assert a != dataflow.job_name("distill", ["--out", "gs://b/ws/distill/d2"])
  assert a != dataflow.job_name("select_d3", ["--out", "gs://b/ws/distill/d1"])
  # Dataflow's rule for names: lowercase letters, digits and hyphens, a letter first.
  assert re.fullmatch(r"[a-z][-a-z0-9]*[a-z0-9]", a) and len(a) <= 63
  code, out, _ = _run_main(dataflow.main, ["distill", *DF_ARGS, "--", *DISTILL_FLAGS,
                                           "--job_name=mine"], capsys)
  assert code == 0
  [job] = _commands(out)[-1:]
  assert [f for f in job if f.startswith("--job_name")] == ["--job_name=mine"]


@pytest.mark.parametrize("argv, needles", [
    (["distill", *DF_ARGS, "--gpu_type", "nvidia-l4", "--", *DISTILL_FLAGS],
     ["--sdk_container_image", "CUDA"]),
    (["dedupe", *DF_ARGS, "--", *DISTILL_FLAGS], ["invalid choice: 'dedupe'", "distill"]),
    (["ingest", *DF_ARGS, "--sdk_container_image", "IMG", "--gpu_type", "nvidia-tesla-t4", "--",
      "--images", "gs://b/raw", "--out", "gs://b/o"], ["ingest runs no model"]),
    (["ingest", *DF_ARGS, "--", "--images", "gs://b/raw", "--out", "/tmp/o"],
     ["--out /tmp/o", "gs://"]),
    (["distill", *DF_ARGS, "--", *DISTILL_FLAGS, "--runner=DirectRunner"], ["--runner"]),
    (["distill", "--project", "p", "--region", "r", "--temp_location", "/tmp/t", "--dry_run",
      "--", *DISTILL_FLAGS], ["--temp_location /tmp/t"]),
])
def test_dataflow_user_mistakes_are_one_line(argv, needles, capsys):
  code, out, err = _run_main(dataflow.main, argv, capsys)
  _one_line_error(code, err, "launch.dataflow", *needles)
  assert out == ""


# ---- multi-host GPU cluster ---------------------------------------------------------------------

GPU_ARGS = ["--gin_file", "conv_m_distill.gin", "--workdir", "gs://b/run",
            "--gin_bindings", "schedule.train_steps=5"]


def _tf_config(assignment: str) -> dict:
  name, _, value = assignment.partition("=")
  assert name == "TF_CONFIG"
  return json.loads(value)


def test_gpu_cluster_gives_each_worker_its_tf_config(capsys):
  code, out, _ = _run_main(gpu_cluster.main, ["--hosts", "h1,h2,h3:2300", *GPU_ARGS,
                                              "--dry_run"], capsys)
  assert code == 0
  commands = _commands(out)
  assert len(commands) == 3
  for i, command in enumerate(commands):
    assert _tf_config(command[0]) == {"cluster": {"worker": ["h1:2222", "h2:2222", "h3:2300"]},
                                      "task": {"type": "worker", "index": i}}
    assert command[1:] == [PY, "-m", "mnv4_train.main", "--gin_file=conv_m_distill.gin",
                           "--workdir=gs://b/run",
                           '--gin_bindings=runtime.distribution="multiworker"',
                           "--gin_bindings=schedule.train_steps=5"]
  assert out.splitlines()[0].startswith("$ TF_CONFIG='{\"cluster\":{\"worker\":[\"h1:2222\"")


def test_gpu_cluster_over_ssh_runs_each_worker_on_its_host(capsys):
  code, out, _ = _run_main(gpu_cluster.main, ["--hosts", "gpu-a,gpu-b", "--port", "3000",
                                              *GPU_ARGS, "--ssh", "--remote_dir",
                                              "~/mnv4-distill", "--dry_run"], capsys)
  assert code == 0
  for i, (host, command) in enumerate(zip(["gpu-a", "gpu-b"], _commands(out))):
    assert command[:5] == ["ssh", "-tt", "-o", "BatchMode=yes", host]
    remote = shlex.split(command[5])
    assert remote[:3] == ["cd", "mnv4-distill", "&&"]
    assert _tf_config(remote[3])["task"]["index"] == i
    assert _tf_config(remote[3])["cluster"]["worker"] == ["gpu-a:3000", "gpu-b:3000"]
    assert remote[4:7] == ["python3", "-m", "mnv4_train.main"]


def _fake_python(tmp_path, failing_index=None):
  """A stand-in interpreter: prints its TF_CONFIG task index, fails for one index."""
  script = tmp_path / "fake_python"
  fail = (f'case "$TF_CONFIG" in *\'"index":{failing_index}}}\'*) echo "worker down"; exit 3;; '
          "esac\n" if failing_index is not None else "")
  script.write_text("#!/bin/sh\n"
                    'echo "started $TF_CONFIG"\n'
                    f"{fail}"
                    "sleep 0.2\n"
                    'echo "args $*"\n')
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  return str(script)


def test_gpu_cluster_runs_workers_locally_with_prefixed_output(tmp_path, capsys):
  code, out, _ = _run_main(gpu_cluster.main, ["--hosts", "localhost:5001,localhost:5002",
                                              *GPU_ARGS, "--python", _fake_python(tmp_path)],
                           capsys)
  assert code == 0
  for i in range(2):
    started = [l for l in out.splitlines() if l.startswith(f"[worker {i}] started ")]
    assert len(started) == 1
    assert _tf_config("TF_CONFIG=" + started[0].split("started ", 1)[1])["task"]["index"] == i
    assert (f'[worker {i}] args -m mnv4_train.main --gin_file=conv_m_distill.gin '
            f'--workdir=gs://b/run --gin_bindings=runtime.distribution="multiworker" '
            f'--gin_bindings=schedule.train_steps=5') in out.splitlines()


def test_gpu_cluster_fails_when_one_worker_fails(tmp_path, capsys):
  code, out, err = _run_main(gpu_cluster.main, ["--hosts", "localhost:5001,localhost:5002",
                                                *GPU_ARGS, "--python",
                                                _fake_python(tmp_path, failing_index=1)],
                             capsys)
  _one_line_error(code, err, "launch.gpu_cluster", "worker 1 failed with exit status 3")
  assert "[worker 1] worker down" in out.splitlines()


@pytest.mark.parametrize("argv, needles", [
    (["--hosts", "localhost,localhost"], ["localhost:2222", "host:port"]),
    (["--hosts", "h1,h2:x"], ["'h2:x'"]),
    (["--hosts", "h1", "--gin_bindings", "runtime.distribution='gpu'"], ["runtime.distribution"]),
])
def test_gpu_cluster_user_mistakes_are_one_line(argv, needles, capsys):
  code, out, err = _run_main(gpu_cluster.main, [*argv, *GPU_ARGS, "--dry_run"], capsys)
  _one_line_error(code, err, "launch.gpu_cluster", *needles)
  assert out == ""


# ---- entry points -------------------------------------------------------------------------------

@pytest.mark.parametrize("module, argv", [
    ("launch.tpu_pod", [*TPU_ARGS, "--accelerator_type", "v4-32", "--dry_run"]),
    ("launch.dataflow", ["distill", *DF_ARGS, "--", *DISTILL_FLAGS]),
    ("launch.gpu_cluster", ["--hosts", "h1,h2", *GPU_ARGS, "--dry_run"]),
])
def test_entry_points_dry_run_as_modules(module, argv):
  result = subprocess.run([PY, "-m", module, *argv], capture_output=True, text=True,
                          cwd=common.ROOT, timeout=60)
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""
  assert all(re.match(r"[$#] ", line) for line in result.stdout.splitlines())
