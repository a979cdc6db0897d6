"""Every recipe gives the run it gave before the settings were grouped (`mnv4_train.train`).

The golden, tests/fixtures/recipe_settings.json, was written by
tests/fixtures/make_recipe_golden.py with the code of before (64 flat `train.X` arguments), in
those names; `train.RENAMED` maps them to the bindings of now. A recipe changed on purpose
changes its entry there by hand.
"""

import json
import os

import numpy as np

from tests.conftest import run_cli
from tests.fixtures.run_recipes import logged_rows, substitute

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
with open(os.path.join(FIXTURES, "recipe_settings.json")) as _f:
  GOLDEN = json.load(_f)


def _binding(old, value):
  from mnv4_train import train
  return f"{train.RENAMED[old]}={value!r}"


def test_every_recipe_resolves_to_its_recorded_settings():
  """Each gin_configs/*.gin, parsed as `mnv4_train.main` parses it and made into the groups by
  gin as `train` makes them, holds exactly the 63 values it resolved to before."""
  import gin
  from mnv4_train import main, train
  assert sorted(train.RENAMED) == sorted(next(iter(GOLDEN["recipes"].values()))["settings"])
  assert set(GOLDEN["recipes"]) <= set(main.available_gin_files())
  try:
    for name, recorded in GOLDEN["recipes"].items():
      gin.clear_config()
      main.parse_gin([name], [_binding(k, v) for k, v in recorded["placeholders"].items()])
      config = train.Config.make("/unused")
      got = {}
      for old, new in train.RENAMED.items():
        group, field = new.split(".")
        got[old] = getattr(getattr(config, group), field)
      assert json.loads(json.dumps(got)) == recorded["settings"], name
  finally:
    gin.clear_config()


RTOL = 1e-5
# The online run's teacher is the session fixture `teacher_path`, trained in the test process
# with threaded kernels: its weights differ in the last bits from the ones the golden saw, which
# moves the kd loss by ~1e-6 from step 1. Adam turns such differences into different updates
# within a few steps (measured: <= 1.7e-6 relative up to step 3, 4e-3 at step 4, another
# teacher agreement at step 5), so that run is compared over its first 3 steps: its loss terms,
# temperature and weights from step 1, the optimizer on steps 2-3, the mixture switch at step 3.
# The supervised run, which has no teacher, is compared over every step (it is bit-exact).
COMPARED_STEPS = {"smoke_online": 3}


def _assert_rows_equal(got, want, what):
  assert [r["step"] for r in got] == [r["step"] for r in want], what
  for g, w in zip(got, want):
    assert sorted(g) == sorted(w), what
    for key, expected in w.items():
      if isinstance(expected, float):
        np.testing.assert_allclose(g[key], expected, rtol=RTOL, atol=0,
                                   err_msg=f"{what} step {w['step']} {key}")
      elif isinstance(expected, dict):
        assert sorted(g[key]) == sorted(expected), what
        np.testing.assert_allclose([g[key][k] for k in sorted(expected)],
                                   [expected[k] for k in sorted(expected)], rtol=RTOL, atol=0,
                                   err_msg=f"{what} step {w['step']} {key}")
      else:
        assert g[key] == expected, (what, w["step"], key)


def test_recorded_runs_train_to_the_same_losses(source_shards, teacher_path, distill_records,
                                                tmp_path):
  """Two 6-step runs of smoke.gin, deterministic (every augmentation, optimizer and evaluation
  setting off its default; an online teacher with both loss terms and a mixture schedule),
  bound by their new names: every history and evaluation row as recorded before, to 1e-5
  (the online run's first 3 steps: COMPARED_STEPS)."""
  paths = {"source": source_shards[0], "teacher": teacher_path, **distill_records}
  runs = GOLDEN["runs"]
  jobs = [{"gin_file": run["gin_file"], "workdir": str(tmp_path / name),
           "bindings": [_binding(k, substitute(v, paths)) for k, v in run["bindings"].items()]}
          for name, run in runs.items()]
  with open(tmp_path / "runs.json", "w") as f:
    json.dump(jobs, f)
  proc = run_cli("tests.fixtures.run_recipes", str(tmp_path / "runs.json"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name, run in runs.items():
    last = COMPARED_STEPS.get(name, run["bindings"]["train_steps"])
    for log in ("history", "eval"):
      got = logged_rows(str(tmp_path / name / f"{log}.jsonl"))
      assert [r["step"] for r in got] == [r["step"] for r in run[log]], (name, log)
      _assert_rows_equal([r for r in got if r["step"] <= last],
                         [r for r in run[log] if r["step"] <= last], name)
