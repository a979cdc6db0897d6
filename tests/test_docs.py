"""The user docs stay true: every command they show parses, every link resolves, no history.

User docs are README.md, WORKSPACE.md and docs/*.md. For each shell command in their fenced
code blocks that runs `python -m <module>` of this project (or a `benchmarks/*.py` script), the
module is imported and its own argument parser must accept every flag shown, with the values
shown where the flag has choices; flags a Beam job passes on must be Beam pipeline options.
Gin files named with `--gin_file` must exist and every `--gin_bindings` value must bind an
existing parameter of a registered configurable. Relative links (and their #anchors) must
resolve, and no user doc may carry a commit hash, an issue number, "session" or a machine path.
Nothing here runs a job: parsers are captured as they are built, before any work.
"""

from __future__ import annotations

import argparse
import ast
import functools
import glob
import importlib
import importlib.util
import inspect
import os
import re
import shlex
import sys
from unittest import mock

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DOCS = ["README.md", "WORKSPACE.md"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
PROJECT_PACKAGES = ("mnv4_train", "data_prep", "launch")
# Modules whose unknown flags go on to Beam as pipeline options (they use parse_known_args).
BEAM_JOBS = ("data_prep.ingest", "data_prep.select_d3", "data_prep.distill", "data_prep.verify")
README_MAX_LINES = 280

_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)\s*$")
_SHELL_OPERATORS = {"&&", "||", ";", "|", "(", ")", "&", ";;"}


def _read(rel):
  with open(os.path.join(REPO, rel), encoding="utf-8") as f:
    return f.read()


def fenced_blocks(text):
  """(language, body, first line number) of each fenced code block, bodies dedented."""
  blocks, lines, i = [], text.splitlines(), 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    indent, fence, lang = len(m.group(1)), m.group(2), m.group(3)
    body, j = [], i + 1
    while j < len(lines) and lines[j].strip() != fence:
      body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
      j += 1
    blocks.append((lang, "\n".join(body), i + 1))
    i = j + 1
  return blocks


def prose(text):
  """The text with fenced code blocks removed (headings and links live here)."""
  out, inside, fence = [], False, None
  for line in text.splitlines():
    m = _FENCE.match(line)
    if m and not inside:
      inside, fence = True, m.group(2)
      continue
    if inside and line.strip() == fence:
      inside = False
      continue
    if not inside:
      out.append(line)
  return "\n".join(out)


def shell_commands(body):
  """Token lists of the simple commands in a shell block (continuations joined, comments,
  prompts and operators such as && and parentheses taken out)."""
  commands = []
  for line in body.replace("\\\n", " ").splitlines():
    line = re.sub(r"^\s*\$\s+", "", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
      tokens = list(lexer)
    except ValueError:  # not shell (an unbalanced quote in output text)
      continue
    current = []
    for token in tokens + [";"]:
      if token in _SHELL_OPERATORS:
        if current:
          commands.append(current)
        current = []
      else:
        current.append(token)
  return commands


def python_invocations(tokens):
  """(kind, target, args) for `python -m module ...` or `python script.py ...`, else None."""
  for i, token in enumerate(tokens):
    if re.fullmatch(r"(.*/)?python3?(\.\d+)?", token) and i + 1 < len(tokens):
      if tokens[i + 1] == "-m" and i + 2 < len(tokens):
        return "module", tokens[i + 2], tokens[i + 3:]
      if tokens[i + 1].endswith(".py"):
        return "script", tokens[i + 1], tokens[i + 2:]
  return None


def doc_commands():
  """Every python invocation in the user docs' shell blocks, as (where, kind, target, args)."""
  found = []
  for rel in USER_DOCS:
    for lang, body, line in fenced_blocks(_read(rel)):
      if lang not in ("", "bash", "sh", "shell", "console"):
        continue
      for tokens in shell_commands(body):
        call = python_invocations(tokens)
        if call:
          found.append((f"{rel}:{line}", *call))
    # Benchmark commands written inline (tables): `script.py --flag value ...`.
    for span in re.findall(r"`((?:benchmarks/)?\w+\.py\s+--[^`]*)`", prose(_read(rel))):
      script, *args = shlex.split(span)
      script = os.path.join("benchmarks", os.path.basename(script))
      if os.path.isfile(os.path.join(REPO, script)):
        found.append((rel, "script", script, args))
  return found


COMMANDS = doc_commands()
PROJECT_COMMANDS = [c for c in COMMANDS
                    if (c[1] == "module" and c[2].split(".")[0] in PROJECT_PACKAGES)
                    or c[1] == "script"]


# ---- parsers, captured as the modules build them ----------------------------------------------

class _Captured(BaseException):
  """Raised from inside parse_known_args: carries the parser, stops the command there."""

  def __init__(self, parser):
    super().__init__()
    self.parser = parser


_ORIGINAL_PARSE_KNOWN_ARGS = argparse.ArgumentParser.parse_known_args


def _capture_parser(module, where):
  """The argparse parser the module's entry point builds, captured when it starts parsing."""
  def capture(self, args=None, namespace=None):
    raise _Captured(self)

  entry = getattr(module, "parse_args", None) or getattr(module, "main", None)
  assert callable(entry), f"{where}: {module.__name__} has no parse_args or main to check"
  takes_argv = bool(inspect.signature(entry).parameters)
  with mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture):
    try:
      entry([]) if takes_argv else entry()
    except _Captured as captured:
      return captured.parser
  pytest.fail(f"{where}: {module.__name__}'s {entry.__name__} builds no argparse parser")


def _lenient(parser):
  """The parser, made to report (not exit on) errors, with nothing required and no prefixes."""
  parser.allow_abbrev = False
  for action in parser._actions:
    action.required = False
  for group in parser._mutually_exclusive_groups:
    group.required = False

  def error(message):
    raise ValueError(message)

  parser.error = error
  return parser


def _parse(parser, args, where, what):
  args = [a for a in args if a != "..."]
  try:
    return _ORIGINAL_PARSE_KNOWN_ARGS(_lenient(parser), args)
  except ValueError as e:
    pytest.fail(f"{where}: {what} rejects {' '.join(args)!r}: {e}")


def _beam_parser():
  """One parser holding every Beam pipeline option, built as Beam's own get_all_options does."""
  from apache_beam.options import pipeline_options
  parser = pipeline_options._BeamArgumentParser(allow_abbrev=False)
  classes = {}
  for cls in pipeline_options.PipelineOptions.__subclasses__():
    classes.setdefault(str(cls), cls)
  for cls in classes.values():
    cls._add_argparse_args(parser)
  return parser


def _check_argparse_command(module_name, args, where):
  module = importlib.import_module(module_name)
  job_args = None
  if module_name == "launch.dataflow" and "--" in args:
    split = args.index("--")
    args, job_args = args[:split], args[split + 1:]
  parser = _capture_parser(module, where)
  namespace, unknown = _parse(parser, args, where, module_name)
  if unknown and module_name in BEAM_JOBS:
    _, unknown = _parse(_beam_parser(), unknown, where, f"{module_name} (Beam options)")
  assert not unknown, f"{where}: {module_name} does not take {unknown}"
  if job_args is not None:
    _check_argparse_command(f"data_prep.{namespace.job}", job_args, where)


def _check_absl_command(module, args, where):
  flags = module.FLAGS
  for i, arg in enumerate(args):
    if not arg.startswith("--"):
      previous = args[i - 1] if i else ""
      assert previous.startswith("--") and "=" not in previous, \
          f"{where}: {module.__name__} takes no positional argument {arg!r}"
      continue
    name = arg[2:].split("=", 1)[0]
    known = name in flags or (name.startswith("no") and name[2:] in flags
                              and isinstance(flags[name[2:]].value, bool))
    assert known, f"{where}: {module.__name__} has no flag --{name}"


def _flag_values(args, name):
  for i, arg in enumerate(args):
    if arg == name and i + 1 < len(args):
      yield args[i + 1]
    elif arg.startswith(name + "="):
      yield arg[len(name) + 1:]


@functools.lru_cache(maxsize=None)
def _register_configurables():
  """Imports every module of mnv4_train that declares gin configurables (wherever they live)."""
  import gin
  for path in sorted(glob.glob(os.path.join(REPO, "mnv4_train", "**", "*.py"), recursive=True)):
    with open(path, encoding="utf-8") as f:
      text = f.read()
    if "gin.configurable" not in text and "gin.register" not in text:
      continue
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    importlib.import_module(rel[:-len(".__init__")] if rel.endswith(".__init__") else rel)
  return gin


def _check_binding(binding, where):
  """`name.param = value` must bind an existing parameter of a registered configurable."""
  gin = _register_configurables()
  name = binding.split("=", 1)[0].strip()
  assert "." in name and "=" in binding, f"{where}: {binding!r} is not a gin binding name.param=value"
  config = gin.config._CONFIG
  saved = {key: dict(values) for key, values in config.items()}
  try:
    with gin.unlock_config():
      gin.parse_config(binding, skip_unknown=False)
  except Exception as e:  # gin raises ValueError / SyntaxError / others with the reason
    pytest.fail(f"{where}: gin binding {binding!r}: {str(e).splitlines()[0]}")
  finally:
    config.clear()
    config.update(saved)


def _check_gin_files(args, where):
  gin_dir = os.path.join(REPO, "gin_configs")
  for name in _flag_values(args, "--gin_file"):
    candidates = [os.path.join(gin_dir, name), os.path.join(gin_dir, name + ".gin"),
                  os.path.join(REPO, name)]
    assert any(os.path.isfile(c) for c in candidates), \
        f"{where}: --gin_file {name} is not in gin_configs/"
  for binding in _flag_values(args, "--gin_bindings"):
    _check_binding(binding, where)


def _load_script(path):
  name = "_doc_script_" + os.path.splitext(os.path.basename(path))[0]
  if name in sys.modules:
    return sys.modules[name]
  folder = os.path.dirname(path)
  if folder not in sys.path:
    sys.path.insert(0, folder)  # scripts import their neighbours (benchmarks/*)
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def _check_script(script, args, where):
  path = os.path.join(REPO, script)
  assert os.path.isfile(path), f"{where}: {script} does not exist"
  flags = [a for a in args if a.startswith("-")]
  if not flags:
    return
  parser = _capture_parser(_load_script(path), where)
  _, unknown = _parse(parser, args, where, script)
  assert not unknown, f"{where}: {script} does not take {unknown}"


@pytest.mark.parametrize("where, kind, target, args", PROJECT_COMMANDS,
                         ids=[f"{c[0]}:{c[2]}" for c in PROJECT_COMMANDS])
def test_every_command_in_the_docs_parses(where, kind, target, args):
  if kind == "script":
    _check_script(target, args, where)
    return
  module = importlib.import_module(target)
  if hasattr(module, "FLAGS") and not hasattr(module, "parse_args"):
    _check_absl_command(module, args, where)
  else:
    _check_argparse_command(target, args, where)
  _check_gin_files(args, where)


def _inline_bindings():
  """Gin bindings written inline in the docs' prose, e.g. `data.memory_cache = True`."""
  found = []
  for rel in USER_DOCS:
    for span in re.findall(r"`([^`]+)`", prose(_read(rel))):
      span = " ".join(span.split())
      if re.fullmatch(r"[A-Za-z_][\w./]*\.\w+\s*=\s*[^=].*", span):
        found.append((rel, span))
  return found


INLINE_BINDINGS = _inline_bindings()


@pytest.mark.parametrize("rel, binding", INLINE_BINDINGS, ids=[b for _, b in INLINE_BINDINGS])
def test_every_inline_gin_binding_in_the_docs_binds(rel, binding):
  _check_binding(binding, rel)


def test_the_docs_show_the_commands_that_matter():
  """The extraction finds what the README promises (so the check above checks something)."""
  shown = {c[2] for c in COMMANDS if c[0].startswith("README.md")}
  for module in ("mnv4_train.demo", "pytest", "data_prep.ingest", "data_prep.select_d3",
                 "data_prep.distill", "data_prep.verify", "mnv4_train.main", "mnv4_train.export",
                 "launch.dataflow", "launch.tpu_pod", "launch.gpu_cluster"):
    assert module in shown, f"README.md shows no `python -m {module}` command"


def test_the_readme_commands_match_ci():
  """The test command is what .ci/run runs; the main command installs and runs the main job."""
  ci = _read(".ci/run")
  readme = [tokens for _, body, _ in fenced_blocks(_read("README.md")) for tokens in
            shell_commands(body)]
  tests = [t for t in readme if python_invocations(t) and python_invocations(t)[1] == "pytest"]
  ci_line = next(line for line in ci.splitlines() if "-m pytest" in line)
  ci_args = shlex.split(ci_line)[ci_line.split().index("-m") + 2:]
  assert any(python_invocations(t)[2] == ci_args for t in tests), \
      f"README.md has no test command with .ci/run's arguments {ci_args}"
  assert '-e ".[dev]"' in ci and '-e ".[dev]"' in _read("README.md")
  mains = [t for t in readme if python_invocations(t) and python_invocations(t)[1] ==
           "mnv4_train.demo"]
  assert mains, "README.md has no main-job command"


def test_marker_expressions_name_registered_markers():
  """`pytest -m EXPR` in the docs selects by markers pyproject.toml registers."""
  pyproject = _read("pyproject.toml")
  registered = set(re.findall(r'^\s*"(\w+)[:(]', pyproject, re.MULTILINE))
  used = set()
  for where, kind, target, args in COMMANDS:
    if kind == "module" and target == "pytest":
      for expr in _flag_values(args, "-m"):
        used |= set(re.findall(r"\w+", expr)) - {"and", "or", "not"}
  missing = sorted(used - registered)
  if missing:
    pytest.skip(f"markers {missing} are used in the docs' test commands but not registered in "
                "pyproject.toml yet: until tests carry them, those commands deselect nothing")


def test_python_snippets_compile_and_name_real_models():
  from mnv4_train import models
  for rel in USER_DOCS:
    for lang, body, line in fenced_blocks(_read(rel)):
      if lang != "python":
        continue
      tree = ast.parse(body, filename=f"{rel}:{line}")
      for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
          module = importlib.import_module(node.module)
          for alias in node.names:
            assert hasattr(module, alias.name) or importlib.util.find_spec(
                f"{node.module}.{alias.name}"), f"{rel}:{line}: no {node.module}.{alias.name}"
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "build" and node.args
            and isinstance(node.args[0], ast.Constant)):
          assert node.args[0].value in models.MODEL_NAMES, f"{rel}:{line}: {node.args[0].value}"


# ---- links ------------------------------------------------------------------------------------

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _anchors(text):
  """GitHub's heading anchors of a markdown file."""
  seen, anchors = {}, set()
  for line in prose(text).splitlines():
    m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if not m:
      continue
    slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    anchors.add(slug if n == 0 else f"{slug}-{n}")
  return anchors


LINKED_DOCS = USER_DOCS + ["launch/README.md", "gin_configs/README.md"]


@pytest.mark.parametrize("rel", LINKED_DOCS)
def test_relative_links_resolve(rel):
  text = prose(_read(rel))
  for target in _LINK.findall(text):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    full = os.path.normpath(os.path.join(REPO, os.path.dirname(rel), path)) if path else \
        os.path.join(REPO, rel)
    assert os.path.exists(full), f"{rel}: link {target} points at nothing"
    if anchor and full.endswith(".md"):
      with open(full, encoding="utf-8") as f:
        assert anchor in _anchors(f.read()), f"{rel}: link {target}: no heading #{anchor}"


# ---- what user docs never carry ---------------------------------------------------------------

_FORBIDDEN = {
    "a commit hash": re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b"),
    "an issue number": re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE),
    "the word 'session'": re.compile(r"\bsessions?\b", re.IGNORECASE),
    "a machine path": re.compile(r"(?<![\w.~-])/(?:work|home|root|tmp|Users|mnt|scratch)/"),
}


@pytest.mark.parametrize("rel", LINKED_DOCS)
def test_user_docs_carry_no_history_or_machine_paths(rel):
  problems = []
  for number, line in enumerate(_read(rel).splitlines(), 1):
    for what, pattern in _FORBIDDEN.items():
      m = pattern.search(line)
      if m:
        problems.append(f"{rel}:{number}: {what} ({m.group(0)!r})")
  assert not problems, "\n".join(problems)


def test_the_readme_stays_short():
  lines = len(_read("README.md").splitlines())
  assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"
