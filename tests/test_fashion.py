"""Fashion-MNIST: the IDX reader, ingest's subset flags, and the section-8 main job's plumbing."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from data_prep import fashion_mnist, ingest
from data_prep.digits import write_digits_folder
from mnv4_train.data import records
from tests.conftest import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_idx(path, array):
  """An IDX file of unsigned bytes, gzipped, as the official files are."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory):
  """Fashion-MNIST-format files holding 300 train / 50 test images with known pixels."""
  root = tmp_path_factory.mktemp("idx")
  rng = np.random.default_rng(0)
  for split, n in (("train", 300), ("t10k", 50)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 10
    _write_idx(str(root / f"{split}-images-idx3-ubyte.gz"), images)
    _write_idx(str(root / f"{split}-labels-idx1-ubyte.gz"), labels)
  return str(root)


def _read_shards(folder):
  out = {}
  for path in sorted(tf.io.gfile.glob(os.path.join(folder, "shard-*"))):
    for ex in tf.data.TFRecordDataset(path).map(records.parse_source):
      out[ex["image/id"].numpy().decode()] = (ex["image/encoded"].numpy(),
                                              int(ex["image/label"]))
  return out


def test_idx_reader_round_trip_and_bad_files(idx_folder, tmp_path):
  images, labels = fashion_mnist.load("train", idx_folder)
  assert images.shape == (300, 28, 28) and images.dtype == np.uint8
  assert list(labels[:12]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
  bad = tmp_path / "bad.gz"
  with gzip.open(bad, "wb") as f:
    f.write(bytes([0, 0, 0x08, 1]) + (5).to_bytes(4, "big") + b"\x01\x02")  # says 5, holds 2
  with pytest.raises(fashion_mnist.IdxError, match="header says 5"):
    fashion_mnist.read_idx(str(bad))
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    fashion_mnist.load("train", str(tmp_path / "nowhere"))


def test_ingest_fashion_subsets_are_disjoint_and_cover_the_split(idx_folder, tmp_path):
  parts = {"a": "0,0.2", "b": "0.2,0.5", "c": "0.5,1"}
  seen = {}
  for name, bounds in parts.items():
    m = ingest.run([f"--fashion_mnist=train", f"--fashion_mnist_dir={idx_folder}",
                    f"--hash_range={bounds}", f"--out={tmp_path / name}", "--num_shards=2"])
    assert m["class_names"] == list(fashion_mnist.CLASS_NAMES)
    assert m["source"]["hash_range"] == [float(v) for v in bounds.split(",")]
    seen[name] = _read_shards(str(tmp_path / name))
    assert m["num_examples"] == len(seen[name]) > 0
  ids = [set(v) for v in seen.values()]
  assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
  assert len(ids[0] | ids[1] | ids[2]) == 300
  # Pixels and labels survive exactly (lossless grayscale PNG; label = index % 10 here).
  images, labels = fashion_mnist.load("train", idx_folder)
  for example_id, (encoded, label) in list(seen["a"].items())[:20]:
    index = int(example_id.rsplit("/", 1)[1])
    assert label == labels[index]
    decoded = tf.io.decode_png(encoded).numpy()[:, :, 0]
    np.testing.assert_array_equal(decoded, images[index])


def test_ingest_corpus_withholds_labels_thins_classes_and_adds_ood(idx_folder, tmp_path):
  ood = str(tmp_path / "ood")
  written = write_digits_folder(ood, per_class=2, size=28)
  m = ingest.run(["--fashion_mnist=train", f"--fashion_mnist_dir={idx_folder}",
                  "--class_fraction=2:0.0,4:0.5", "--drop_labels", f"--unlabeled_images={ood}",
                  f"--out={tmp_path / 'corpus'}"])
  ex = _read_shards(str(tmp_path / "corpus"))
  assert all(label == -1 for _, label in ex.values())
  assert m["unlabeled"] == m["num_examples"] == len(ex)
  fashion_ids = [i for i in ex if i.startswith("fashion-mnist/")]
  ood_ids = [i for i in ex if i.startswith("unlabeled/ood/")]
  assert len(ood_ids) == len(written) == 20
  by_class = np.bincount([int(i.rsplit("/", 1)[1]) % 10 for i in fashion_ids], minlength=10)
  assert by_class[2] == 0 and 0 < by_class[4] < 30 and by_class[0] == 30
  assert m["source"]["labels_dropped"] and m["source"]["class_fraction"] == {"2": 0.0, "4": 0.5}
  # A corpus of unlabelled images only (no labelled source at all).
  only = ingest.run([f"--unlabeled_only={ood}", f"--out={tmp_path / 'only'}"])
  assert only["num_examples"] == only["unlabeled"] == 20 and only["num_classes"] == 0
  assert sorted(_read_shards(str(tmp_path / "only"))) == sorted(ood_ids)


@pytest.mark.e2e
def test_missing_fashion_mnist_is_one_line_with_how_to_get_it(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "data_prep.ingest", "--fashion_mnist=train",
                         f"--fashion_mnist_dir={tmp_path}", f"--out={tmp_path / 'out'}"],
                        capture_output=True, text=True, cwd=REPO)
  lines = [line for line in proc.stderr.splitlines() if line.strip()
           and "GCSFileSystem" not in line and "apitools" not in line]
  assert proc.returncode == 2, proc.stderr
  assert len(lines) == 1 and "apt-get install dataset-fashion-mnist" in lines[0], lines
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.lead(1)
def test_fashion_main_job_plumbing_on_a_tiny_subset(tmp_path):
  """The whole section-8 path (ingest, select_d3, D1/D2/D3, 1:1:2, report) on a sliver.

  Needs the real files (apt-get install dataset-fashion-mnist; .ci/run installs it). The
  distillation gain itself is shown by the full-size runs in the README, not here.
  """
  assert fashion_mnist.locate("train") and fashion_mnist.locate("test"), fashion_mnist.HOW_TO_GET
  ws = str(tmp_path / "ws")
  args = [f"--workspace={ws}", "--labelled=0.01", "--val=0.004", "--corpus=0.03", "--ood=3",
          "--test=0.02", "--epochs=1", "--student_steps=12", "--replicas=1", "--per_class=12",
          "--threshold=0.1",  # a 1-epoch relevance classifier is barely confident
          "--beam_workers=1"]  # in-process Beam jobs: no worker start-up on a sliver
  proc = run_cli("mnv4_train.demo", *args, timeout=1800)  # forked warm; its stages as a user's
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.load(open(os.path.join(ws, "report.json")))
  names = [r["model"] for r in report["runs"]]
  assert any("teacher" in n for n in names) and any("labels only" in n for n in names)
  assert any("distilled" in n for n in names)
  assert all(0.0 <= r["top1"] <= 1.0 and r["test_images"] == report["sources"]["test"]["images"]
             for r in report["runs"])
  src = report["sources"]
  assert src["corpus"]["unlabeled"] == src["corpus"]["images"] > 30  # labels withheld
  assert sum(src["train"]["counts_per_class"]) == src["train"]["images"]
  sel = report["selection"]
  assert sel["ood_images"] == 30 and 0 <= sel["ood_kept"] <= sel["above_threshold"]
  # The main job's default relevance rule: the paper's and the domain filter, its threshold
  # set on the validation images.
  assert sel["relevance"] == "domain"
  assert sel["domain_filter"]["heldout_images"] == src["val"]["images"]
  assert sel["domain_filter"]["outside"] + sel["above_threshold"] <= sel["corpus_images"]
  for kept, total in zip(sel["kept_per_class"], sel["records_per_class"]):
    assert kept <= 12 and (kept == 0) == (total == 0)
  # D3's records are one per selected copy, built from the corpus.
  d3 = json.load(open(os.path.join(ws, "distill", "d3", "manifest.json")))
  assert d3["num_records"] == sum(sel["records_per_class"])
  # The distilled student drew D1:D2:D3 at about 1:1:2.
  hist = [json.loads(line) for line in open(os.path.join(report["runs"][2]["workdir"],
                                                         "history.jsonl"))]
  drawn = {k: sum(h["mixture"][k] for h in hist) for k in ("d1", "d2", "d3")}
  total = sum(drawn.values())
  assert abs(drawn["d3"] / total - 0.5) < 0.08 and abs(drawn["d1"] / total - 0.25) < 0.08, drawn
  # The teacher on the views it labelled: D1 and D2 against the labels, D3 (an unlabelled
  # corpus) against the class its selection gave each image; beside the clean test top-1.
  views = report["teacher_on_views"]
  assert views["d1"]["against"] == views["d2"]["against"] == "label"
  assert views["d3"]["against"] == "selection class" and "top1_either" in views["d2"]
  assert views["d3"]["examples"] == d3["num_records"]
  assert report["teacher_clean_top1"]["test"] == report["runs"][0]["top1"]
  assert "teacher on the views it labelled" in proc.stdout
  assert "distilled" in proc.stdout and "test top-1" in proc.stdout
  assert open(report["curves"], "rb").read(4) == b"\x89PNG"
  assert os.path.exists(os.path.join(ws, "export", "model_float32.tflite"))


def test_local_beam_jobs_skip_the_prism_download():
  """The default runner would try to fetch Beam's Prism binary at run time; ours never does."""
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  from data_prep import files
  local = files.make_pipeline(["--direct_num_workers=2",
                               "--direct_running_mode=multi_processing"])
  assert isinstance(local.runner, fn_runner.FnApiRunner)
  assert isinstance(files.make_pipeline(["--runner=DirectRunner"]).runner, fn_runner.FnApiRunner)
  other = files.make_pipeline(["--runner=BundleBasedDirectRunner"])
  assert not isinstance(other.runner, fn_runner.FnApiRunner)


def test_the_demo_binds_the_distillation_recipes_own_length():
  """--student_steps defaults to fashion_distill.gin's train_steps; other lengths get their own
  workdirs (a finished 2000-step run is never taken for an 8000-step one)."""
  import re
  from mnv4_train import demo
  gin_text = open(os.path.join(REPO, "gin_configs", "fashion_distill.gin")).read()
  assert int(re.search(r"^schedule\.train_steps = (\d+)", gin_text, re.M).group(1)) == \
      demo.DISTILL_STEPS
  default = demo.parse_args(["--workspace=/tmp/ws"])
  longer = demo.parse_args(["--workspace=/tmp/ws", "--student_steps=8000"])
  assert demo._steps_suffix(default) == "" and demo._steps_suffix(longer) == "_s8000"
