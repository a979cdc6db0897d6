"""The project's import graph has no cycles, and importing the library leaves TensorFlow's
logging alone (only the command lines quiet it)."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("data_prep", "mnv4_train", "launch", "benchmarks")
# TensorFlow's C++ start-up lines (TF_CPP_MIN_LOG_LEVEL governs them).
TF_CHATTER = ("cudart_stub", "cuda_platform", "oneDNN custom operations", "cpu_feature_guard",
              "cuInit")


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every .py under the project's packages."""
  found = {}
  for package in PACKAGES:
    for folder, _, names in os.walk(os.path.join(ROOT, package)):
      for name in names:
        if not name.endswith(".py"):
          continue
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        found[".".join(parts)] = path
  return found


def import_graph() -> dict[str, set[str]]:
  """Module -> the project modules it imports anywhere in its file (functions included).

  `from pkg import name` counts as importing `pkg.name` when that is a module, else `pkg`; in
  a folder of scripts (benchmarks/, no `__init__.py`) `import x` may also be the sibling `x.py`.
  The packages a dotted import passes through are not counted: a package's `__init__` that
  imports its submodules, which import siblings through it, is the usual pattern, not a cycle.
  """
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    folder = os.path.dirname(path)
    script_dir = ("" if os.path.exists(os.path.join(folder, "__init__.py"))
                  else name.rsplit(".", 1)[0])
    edges = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parent = name.split(".")[:len(name.split(".")) - node.level + is_package]
          base = ".".join(parent + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                   for a in node.names]
      else:
        continue
      if script_dir:  # a script's folder is on sys.path: `import x` may be its sibling x.py
        targets += [f"{script_dir}.{t}" for t in targets]
      edges.update(t for t in targets if t in modules and t != name)
    graph[name] = edges
  return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), each sorted."""
  index, low, on_stack, stack, cycles = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return cycles


def test_the_project_modules_import_each_other_without_cycles():
  graph = import_graph()
  assert "data_prep.console" in graph and "mnv4_train.export" in graph  # the walk found them
  assert find_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _clean_env():
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def test_importing_the_library_leaves_tensorflow_logging_alone():
  code = ("import os, mnv4_train, data_prep, mnv4_train.export, mnv4_train.cli\n"
          "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_clean_env(), cwd=ROOT, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "None"


@pytest.mark.e2e
def test_a_command_line_loading_tensorflow_prints_no_tensorflow_chatter():
  # data_prep.ingest imports TensorFlow and Beam before it reads its flags (--out is missing).
  result = subprocess.run([sys.executable, "-m", "data_prep.ingest", "--images=x"],
                          capture_output=True, text=True, env=_clean_env(), cwd=ROOT, timeout=300)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "--out" in lines[0], result.stderr
  assert not any(c in result.stderr for c in TF_CHATTER), result.stderr


def test_the_settings_parse_without_loading_tensorflow():
  """A recipe is parsed, and a bad binding refused, before TensorFlow loads (seconds, not the
  import's ten): the settings groups live in `mnv4_train.config`, which imports gin only."""
  script = (
      "import sys\n"
      "from mnv4_train import main\n"
      "from mnv4_train.errors import ConfigError\n"
      "main.parse_gin(['digits_distill'], ['schedule.train_steps=5'])\n"
      "import gin\n"
      "print(gin.query_parameter('schedule.train_steps'), gin.query_parameter('data.eval_data'))\n"
      "gin.clear_config()\n"
      "try:\n"
      "  main.parse_gin(['smoke'], ['schedule.no_such_arg=1'])\n"
      "except ConfigError as e:\n"
      "  print(str(e).split(':')[0])\n"
      "print(sorted(m for m in ('tensorflow', 'keras', 'apache_beam') if m in sys.modules))\n")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                       check=True).stdout.splitlines()
  assert out == ["5 sources/holdout", "bad gin binding 'schedule.no_such_arg=1'", "[]"], out
