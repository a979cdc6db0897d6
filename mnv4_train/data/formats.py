"""The stage outputs' manifests: one typed record per on-disk format, the only code that knows
their keys, kinds and versions.

Every stage writes a folder whose `manifest.json`, written last, marks it finished and names its
format as `<kind>/<version>`:

  format                   written by            record
  mnv4-source-shards/1     data_prep.ingest      SourceShards    (sharded source TFRecords)
  mnv4-d3-selection/1      data_prep.select_d3   D3Selection     (selection-*.jsonl rows)
  mnv4-distill-records/1   data_prep.distill     DistillRecords  (r<replica>/shard-* records)

Writers build the record and call `write(folder)`; readers call `Kind.read(folder, what)` (or
`read(folder, what, KindA, KindB)` where several kinds are accepted), which checks kind and
version and refuses anything else in one line: what the folder holds, what the reader needs and
the command that rebuilds it. The JSON keys are the field names (`json_key` where they differ);
unknown keys are ignored. The layouts of the records inside the files are in `records.py`.
Bump a VERSION whenever a reader could misread an older output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from typing import ClassVar, Optional

import tensorflow as tf

from mnv4_train.errors import FormatError, InputPathError

MANIFEST = "manifest.json"  # written last by every stage: its presence marks a finished output


@dataclasses.dataclass(frozen=True)
class FileCount:
  """One output file (path relative to the output folder), the records it holds and its size
  in bytes (None in manifests written before sizes were recorded)."""
  path: str
  count: int
  bytes: Optional[int] = None


def inside(folder: str, rel, what: str) -> str:
  """`folder`/`rel` for a path a manifest lists as one of its own files; one FormatError when
  `rel` is not a relative path that stays inside `folder` (absolute, `..`, empty)."""
  text = rel if isinstance(rel, str) else ""
  parts = text.replace("\\", "/").split("/")
  if (not text or text.startswith("/") or "://" in text or "\x00" in text
      or any(p in ("", ".", "..") for p in parts)):
    raise FormatError(f"{what} {folder} lists the file {rel!r}, which is not a path inside its "
                      "folder; the manifest is damaged, rebuild the output")
  return os.path.join(folder.rstrip("/"), *parts)


def relative_to(folder: str, target: str) -> str:
  """How a manifest in `folder` names another stage output `target`: relative to `folder`
  when both are on the same filesystem (a workspace moves as a whole), else as given."""
  if "://" in folder or "://" in target:
    fs = lambda p: p.split("://", 1)[0] + "://" + p.split("://", 1)[1].split("/", 1)[0]
    if "://" in folder and "://" in target and fs(folder) == fs(target):
      head = fs(folder)
      return os.path.relpath(target[len(head):] or "/", folder[len(head):] or "/")
    return target
  return os.path.relpath(os.path.abspath(target), os.path.abspath(folder))


def resolve(folder: str, ref: str) -> str:
  """The stage output a manifest in `folder` names as `ref` (relative to `folder`, or an
  absolute path / URL as older manifests wrote it)."""
  if "://" in ref or os.path.isabs(ref):
    return ref
  if "://" in folder:
    head, rest = folder.split("://", 1)
    bucket, _, path = rest.partition("/")
    return f"{head}://{bucket}/" + os.path.normpath(os.path.join("/" + path, ref)).lstrip("/")
  return os.path.normpath(os.path.join(folder, ref))


def _files(key=None):
  """A field holding a list of {path, count}."""
  return dataclasses.field(metadata={"files": True, **({"json_key": key} if key else {})})


def _json_key(key):
  """A field stored under another JSON key than its name."""
  return dataclasses.field(metadata={"json_key": key})


@dataclasses.dataclass(frozen=True)
class Manifest:
  """Base of the typed manifests: (de)serialisation and the kind/version check."""
  KIND: ClassVar[str] = ""
  VERSION: ClassVar[int] = 0
  WRITER: ClassVar[str] = ""  # the command that builds this format

  @classmethod
  def format(cls) -> str:
    return f"{cls.KIND}/{cls.VERSION}"

  def to_json(self) -> dict:
    """The manifest as written to disk (plain JSON types: what `json.load` gives back)."""
    out = {"format": self.format()}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if value is None and f.default is None:
        continue  # a field added later, not recorded: absent, as in the manifests of before
      if f.metadata.get("files"):
        value = [{k: x for k, x in dataclasses.asdict(v).items() if x is not None}
                 for v in value]  # a size not recorded (older manifests) stays absent
      out[f.metadata.get("json_key", f.name)] = value
    return json.loads(json.dumps(out))

  @classmethod
  def from_json(cls, obj: dict, where: str):
    """The record of a manifest already known to be of this format; a missing key, or a value
    of the wrong JSON type (a string for a count, a list for an object, null, a negative or
    huge number, a listed file outside the folder), is one FormatError naming the key."""
    if not isinstance(obj, dict):
      raise FormatError(f"{where} is a {cls.format()} manifest that is not a JSON object; "
                        f"rebuild it with {cls.WRITER}")
    kwargs = {}
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
      key = f.metadata.get("json_key", f.name)
      if key not in obj and f.default is not dataclasses.MISSING:
        kwargs[f.name] = f.default  # a field added later, optional within this version
        continue
      if key not in obj:
        raise FormatError(f"{where} is a {cls.format()} manifest without '{key}'; rebuild it "
                          f"with {cls.WRITER}")
      value = obj[key]

      def bad(what_it_is, needs, key=key):
        return FormatError(f"{where} is a {cls.format()} manifest whose '{key}' {what_it_is}, "
                           f"not {needs}; the manifest is damaged, rebuild it with {cls.WRITER}")

      if f.metadata.get("files"):
        value = _file_counts(value, bad)
      else:
        value = _checked(value, hints[f.name], _LIST_ITEMS.get(f.name), bad)
      kwargs[f.name] = value
    return cls(**kwargs)

  def write(self, folder: str) -> None:
    with tf.io.gfile.GFile(os.path.join(folder, MANIFEST), "w") as f:
      f.write(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")

  @classmethod
  def read(cls, folder: str, what: str):
    """This format's manifest in `folder`, or one clear error naming `what` (a flag, a dataset)."""
    return read(folder, what, cls)


def load_json(folder: str, what: str) -> dict:
  """The raw manifest of a finished stage output, or one clear error naming `what`."""
  path = os.path.join(folder.rstrip("/"), MANIFEST)
  try:
    found = tf.io.gfile.exists(path)
  except (tf.errors.OpError, OSError, ValueError, TypeError) as e:
    raise InputPathError(f"{what} {folder} cannot be read ({_op_text(e)}); check the path and "
                         "its permissions") from None
  if not found:
    raise InputPathError(f"{what} {folder} is not a finished output (no {MANIFEST}); "
                         "run the stage that builds it first")
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read()
  except (tf.errors.OpError, OSError) as e:
    raise InputPathError(f"{what} {folder} has a {MANIFEST} that cannot be read "
                         f"({_op_text(e)}); check its permissions, or rebuild it") from None
  try:
    # Bytes that are not UTF-8, invalid JSON, numbers of over 4,300 digits (ValueError) and
    # nesting deeper than the parser's recursion limit (RecursionError) are all damage.
    obj = json.loads(data.decode("utf-8"))
  except (ValueError, RecursionError):
    obj = None
  if not isinstance(obj, dict):
    raise FormatError(f"{what} {folder} has a {MANIFEST} that is not a JSON object; rebuild it "
                      "with the stage that wrote it")
  return obj


def read(folder: str, what: str, *kinds: type[Manifest]) -> Manifest:
  """The manifest in `folder` as the one of `kinds` whose kind and version it has."""
  obj = load_json(folder, what)
  found = obj.get("format")
  for kind in kinds:
    if isinstance(found, str) and found == kind.format():
      return kind.from_json(obj, f"{what} {folder}")
  if isinstance(found, str) and found:
    text = found[:100]
    found = f"a {text if text.isprintable() else repr(text)}"  # one line, whatever it holds
  else:
    found = "an unversioned"
  needs = " or ".join(k.format() for k in kinds)
  writers = " or ".join(k.WRITER for k in kinds)
  raise FormatError(f"{what} {folder} is {found} manifest; this reader needs {needs}, rebuild it "
                    f"with {writers}")


# ---- the checks behind from_json ---------------------------------------------------------------

INT64_MAX = 2**63 - 1  # the counts end up in TensorFlow int64 tensors

# The element type of each list field (every other list may hold anything JSON).
_LIST_ITEMS = {
    "class_names": str,
    "counts_per_class": int,
    "selected_unique_per_class": int,
    "selected_total_per_class": int,
    "empty_classes": int,
    "above_threshold_per_class": int,
}


def _field_types(cls) -> dict:
  """The resolved annotation of each field (the module's annotations are strings)."""
  return typing.get_type_hints(cls)


def _op_text(error) -> str:
  text = getattr(error, "message", None) or str(error) or type(error).__name__
  return " ".join(text.split())[:200]


def _describe(value) -> str:
  """How a JSON value reads in an error: `is the string '12'`, `is null`, `is a list`."""
  if value is None:
    return "is null"
  if isinstance(value, bool):
    return f"is {str(value).lower()}"
  if isinstance(value, (int, float)):
    text = repr(value)
    return f"is the number {text if len(text) <= 30 else text[:20] + '...'}"
  if isinstance(value, str):
    return f"is the string {value[:40]!r}{'...' if len(value) > 40 else ''}"
  if isinstance(value, list):
    return "is a list"
  if isinstance(value, dict):
    return "is an object"
  return f"is a {type(value).__name__}"


_NEEDS = {int: "a whole number >= 0", float: "a finite number", str: "a string",
          dict: "an object", list: "a list"}


def _checked(value, hint, items, bad):
  """`value` if it is a JSON value of type `hint` (Optional[X]: X or null), else bad(...)."""
  if typing.get_origin(hint) is typing.Union:  # Optional[X]
    if value is None:
      return None
    hint = next(a for a in typing.get_args(hint) if a is not type(None))
  if hint is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise bad(_describe(value), _NEEDS[int])
    if not 0 <= value <= INT64_MAX:
      raise bad(_describe(value), _NEEDS[int] + " that fits in 64 bits")
    return value
  if hint is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise bad(_describe(value), _NEEDS[float])
    if not math.isfinite(value):
      raise bad(_describe(value), _NEEDS[float])
    return value
  if hint in (str, dict, list) and not isinstance(value, hint):
    raise bad(_describe(value), _NEEDS[hint])
  if hint is list and items is not None:
    for i, item in enumerate(value):
      try:
        _checked(item, items, None, bad)
      except FormatError:
        raise bad(f"holds an item that {_describe(item)} (item {i})",
                  f"a list of {'strings' if items is str else 'whole numbers >= 0'}") from None
  return value


def _file_counts(value, bad) -> tuple:
  """A files field ([{path, count, bytes?}, ...]) as FileCounts; every path a relative one that
  stays inside the manifest's folder (`inside`)."""
  needs = "a list of {path, count} objects"
  if not isinstance(value, list):
    raise bad(_describe(value), needs)
  out = []
  for i, item in enumerate(value):
    if not isinstance(item, dict):
      raise bad(f"holds an item that {_describe(item)} (item {i})", needs)
    path, count, size = item.get("path"), item.get("count"), item.get("bytes")
    if not isinstance(path, str):
      raise bad(f"holds a path that {_describe(path)} (item {i})", needs)
    try:
      inside("/", path, "")
    except FormatError:
      raise bad(f"lists the file {path[:100]!r} (item {i})",
                "a relative path inside the folder") from None
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= INT64_MAX:
      raise bad(f"holds a count that {_describe(count)} (item {i})", "a whole number >= 0")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)
                             or not 0 <= size <= INT64_MAX):
      raise bad(f"holds a size in bytes that {_describe(size)} (item {i})",
                "a whole number >= 0 or null")
    out.append(FileCount(path, count, size))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class SourceShards(Manifest):
  """Source shards: `shard-XXXXX-of-YYYYY.tfrecord` of source Examples (`records.py`)."""
  KIND: ClassVar[str] = "mnv4-source-shards"
  VERSION: ClassVar[int] = 1
  WRITER: ClassVar[str] = "data_prep.ingest"

  source: dict                       # where the images came from (kind, path/name/glob, subset)
  num_examples: int
  num_classes: int
  class_names: list
  counts_per_class: list
  unlabeled: int                     # images with label -1
  shards: tuple = _files()           # FileCount per shard, every shard listed (empty ones too)
  dead_letter: int                   # images set aside in dead_letter.jsonl


@dataclasses.dataclass(frozen=True)
class D3Selection(Manifest):
  """The class-balanced D3 selection: `selection-*.jsonl` rows of (class, rank, id, copies...)."""
  KIND: ClassVar[str] = "mnv4-d3-selection"
  VERSION: ClassVar[int] = 1
  WRITER: ClassVar[str] = "data_prep.select_d3"

  corpus: str
  classifier: str
  threshold: float
  per_class: int
  resolution: int
  num_classes: int
  source_shards: tuple = _files()    # the corpus's shards, to check a --source against
  num_files: int
  selected_unique_per_class: list
  selected_total_per_class: list
  num_selected_unique: int
  num_selected_total: int
  empty_classes: list
  num_above_threshold: int
  above_threshold_per_class: Optional[list] = None  # before the top-K cap (older: absent)
  domain_filter: Optional[dict] = None  # the domain filter's settings and figures, if used


@dataclasses.dataclass(frozen=True)
class DistillRecords(Manifest):
  """Distillation records: `r<replica>/shard-*` files beside the source shards they replay."""
  KIND: ClassVar[str] = "mnv4-distill-records"
  VERSION: ClassVar[int] = 1
  WRITER: ClassVar[str] = "data_prep.distill"

  recipe: str                        # the recipe's name (d1, d2, d3)
  recipe_settings: dict = _json_key("recipe_spec")  # augment.Recipe as built (overrides in)
  replicas: int
  replica_offset: int
  source: str                        # the source shards folder, relative to this folder
  selection: Optional[str]           # the D3 selection folder (relative), recipe d3 only
  teacher: str
  resolution: int                    # the teacher's input size
  teacher_input: str
  teacher_outputs: str
  top_k: int                         # 0: full logits
  num_classes: int
  num_source_shards: int
  files: tuple = _files()            # FileCount per record file, sorted by path
  num_records: int
  dead_letter: int
  # The teacher on the views it labelled (data_prep.distill.ViewAccuracy: examples, against,
  # top1, mean_confidence, per_class_top1, per_class_examples, top1_either for mixup); None when
  # there was nothing to score against, absent in records built before it was measured.
  teacher_on_views: Optional[dict] = None

  def source_folder(self, folder: str) -> str:
    """The source shards folder these records (in `folder`) replay."""
    return resolve(folder, self.source)

  def selection_folder(self, folder: str) -> str | None:
    return resolve(folder, self.selection) if self.selection else None
