"""`python -m tests.mixture_stream D1 SOURCE`: streams 40 batches of a D1 + source mixture and
prints their count (test_memory_cache runs it in fresh processes: the crash it guards against
came about one run in four)."""

import sys

from mnv4_train.data import pipeline

if __name__ == "__main__":
  d1 = pipeline.open_dataset(sys.argv[1], "d1")
  src = pipeline.open_dataset(sys.argv[2], "src")
  ds = pipeline.train_dataset([d1, src], resolution=32, host_batch=16, num_classes=10)
  print(sum(1 for _ in ds.take(40)))
