"""`python -m tests.crash_after_done PATH [--done]`: a stage that dies on SIGSEGV, after writing
PATH when --done (its outputs complete) or before (for tests/test_demo.py)."""

import os
import signal
import sys

if __name__ == "__main__":
  if "--done" in sys.argv:
    with open(sys.argv[1], "w") as f:
      f.write("{}")
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGSEGV)
