"""AutoGraph's conversions of the project's graph code, done once in the stages' fork server.

Every `tf.function` and tf.data map a stage builds goes through AutoGraph, which rewrites each
Python function the graph calls (the trainer's loop, the distillation loss, the records' parsing,
the augmentation ops of `mnv4_train.data.augment` and of the Model Garden) into graph code: it
reads the function's source, transforms its syntax tree and loads the result as a new module.
That costs 3 to 5 CPU-seconds in every training run and every distillation job. AutoGraph caches
a conversion by the function's code object and its conversion options, so a process forked after
the conversion finds it done: `mnv4_train.stages` calls `warm()` in its fork server.

`warm()` converts the graph functions named in GRAPH_FUNCTIONS and every function of FOLLOWED
modules they call by name, with the options a graph converts them with (a function's nested
functions and lambdas are converted with it). It is pure Python, source in and source out:
TensorFlow's runtime does not start, so forking after it stays safe. A converted function is
the same whoever converts it; one this misses, or that cannot be converted, is converted by the
stage itself, as before.
"""

from __future__ import annotations

import importlib
import inspect
import types

# The functions a stage's graphs call: the train and eval steps, the input pipelines' map
# functions, the records' parsers, the augmentations and the teacher's inference in the Beam jobs.
# "module:qualified name"; `<locals>` reaches a function defined inside another.
GRAPH_FUNCTIONS = (
    "mnv4_train.training.trainer:Trainer._packed_step",
    "mnv4_train.training.trainer:Trainer._slice",
    "mnv4_train.training.trainer:Trainer._stop_value",
    "mnv4_train.training.trainer:Trainer.replica_step",
    "mnv4_train.training.trainer:Trainer.replica_eval",
    "mnv4_train.training.stats:dataset_key",
    "mnv4_train.kd:Distiller.per_example_losses",
    "mnv4_train.kd:Distiller.teacher_logits",
    "mnv4_train.kd:kd_loss",
    "mnv4_train.data.records:parse_source",
    "mnv4_train.data.records:parse_distill",
    "mnv4_train.data.records:distill_features",
    "mnv4_train.data.pipeline:replay",
    "mnv4_train.data.pipeline:mix_batch",
    "mnv4_train.data.pipeline:_read_checked",
    "mnv4_train.data.pipeline:_read_whole",
    "mnv4_train.data.pipeline:_source_table",
    "mnv4_train.data.pipeline:_permuted",
    "mnv4_train.data.pipeline:_pair_seed",
    "mnv4_train.data.pipeline:_glob_literal",
    "mnv4_train.data.pipeline:_checked_records.<locals>.<lambda>",
    "mnv4_train.data.pipeline:_stream.<locals>.pick",
    "mnv4_train.data.pipeline:_stream.<locals>.distill_pair",
    "mnv4_train.data.pipeline:_stream.<locals>.source_pair",
    "mnv4_train.data.pipeline:_streamed.<locals>.<lambda>",
    "mnv4_train.data.pipeline:eval_dataset.<locals>.prepare",
    "mnv4_train.data.augment:apply",
    "mnv4_train.data.augment:sample",
    "mnv4_train.data.augment:Recipe.randaugment",
    "mnv4_train.data.augment:Recipe.ra_constants",
)
# Modules whose functions the graph functions call by name are converted with them.
FOLLOWED = ("official.vision.ops.augment", "mnv4_train.data.augment", "mnv4_train.data.pipeline",
            "mnv4_train.data.records", "mnv4_train.kd")
# What a stage hands to `tf.function` itself (the trainer's loops, the Beam jobs' teacher
# inference): AutoGraph converts those with `user_requested=True`, a cache entry of their own
# (what they call, above: False). A `<lambda>` is the first one defined in its function.
ENTRY_POINTS = ("mnv4_train.training.trainer:Trainer._train_loop_fn",
                "mnv4_train.training.trainer:Trainer._eval_batch",
                "data_prep.transforms:_forward_fn.<locals>.<lambda>")


def resolve(name: str):
  """The function "module:qualified.name" names (a nested one as a function over its code object,
  its closure empty cells: a conversion does not read them). LookupError if there is none."""
  module_name, qualname = name.split(":")
  value = importlib.import_module(module_name)
  parts = qualname.split(".")
  while parts:
    part = parts.pop(0)
    if part == "<locals>":
      code = value.__code__
      inner = next((c for c in code.co_consts
                    if isinstance(c, types.CodeType) and c.co_name == parts[0]), None)
      if inner is None:
        raise LookupError(f"{name}: no {parts[0]} inside {code.co_name}")
      parts.pop(0)
      value = types.FunctionType(inner, value.__globals__, inner.co_name, None,
                                 tuple(types.CellType() for _ in inner.co_freevars) or None)
    else:
      value = vars(value).get(part) if isinstance(value, (type, types.ModuleType)) else None
      if value is None:
        raise LookupError(f"{name}: no {part}")
      value = getattr(value, "__func__", value)  # staticmethod / classmethod
  if not inspect.isfunction(value):
    raise LookupError(f"{name} is not a function")
  return value


def _called(fn, followed):
  """The functions of `followed` modules that `fn` (or a function inside it) names: `name(...)`
  for a function imported into its module, `module.name(...)` for one of a followed module."""
  codes, names = [fn.__code__], set()
  while codes:
    code = codes.pop()
    names.update(code.co_names)
    codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
  modules = [v for v in map(fn.__globals__.get, names)
             if isinstance(v, types.ModuleType) and v.__name__ in followed]
  for name in names:
    for value in [fn.__globals__.get(name)] + [vars(m).get(name) for m in modules]:
      if inspect.isfunction(value) and value.__module__ in followed:
        yield value


def program_context(user_requested: bool = False):
  """AutoGraph's conversion context (its options are its cache key) for a function a graph
  calls (`user_requested=False`) or one handed to `tf.function` itself (True)."""
  # pylint: disable=import-outside-toplevel
  from tensorflow.python.autograph.core import converter
  options = converter.ConversionOptions(recursive=True, user_requested=user_requested,
                                        optional_features=None)
  return converter.ProgramContext(options=options)


def warm(names=GRAPH_FUNCTIONS, followed=FOLLOWED, entry_points=ENTRY_POINTS) -> int:
  """Converts `names` and what they call in `followed` modules into AutoGraph's cache; how many
  functions it converted."""
  # pylint: disable=import-outside-toplevel,protected-access
  from tensorflow.python.autograph.impl import api

  def convert(fn, user_requested=False):
    try:
      api._TRANSPILER.transform(fn, program_context(user_requested))
      return 1
    except Exception:  # pylint: disable=broad-except
      return 0  # the stage converts it, or runs it unconverted, as it always did

  # (function, user_requested); what a function calls by name is converted as graph-called.
  todo, seen, done, followed = [], set(), 0, set(followed)
  for group, user_requested in ((names, False), (entry_points, True)):
    for name in group:
      try:
        todo.append((resolve(name), user_requested))
      except (ImportError, LookupError):
        continue
  while todo:
    fn, user_requested = todo.pop()
    if (fn.__code__, user_requested) in seen:
      continue
    seen.add((fn.__code__, user_requested))
    done += convert(fn, user_requested)  # with the functions and lambdas defined inside it
    todo += [(called, False) for called in _called(fn, followed)]
  return done
