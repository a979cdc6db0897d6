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
import os
from typing import ClassVar, Optional

import tensorflow as tf

from mnv4_train.errors import FormatError, InputPathError

MANIFEST = "manifest.json"  # written last by every stage: its presence marks a finished output


@dataclasses.dataclass(frozen=True)
class FileCount:
  """One output file (path relative to the output folder) and the records it holds."""
  path: str
  count: int


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
      if f.metadata.get("files"):
        value = [dataclasses.asdict(v) for v in value]
      out[f.metadata.get("json_key", f.name)] = value
    return json.loads(json.dumps(out))

  @classmethod
  def from_json(cls, obj: dict, where: str):
    """The record of a manifest already known to be of this format; a missing key is refused."""
    kwargs = {}
    for f in dataclasses.fields(cls):
      key = f.metadata.get("json_key", f.name)
      if key not in obj and f.default is not dataclasses.MISSING:
        kwargs[f.name] = f.default  # a field added later, optional within this version
        continue
      if key not in obj:
        raise FormatError(f"{where} is a {cls.format()} manifest without '{key}'; rebuild it "
                          f"with {cls.WRITER}")
      value = obj[key]
      if f.metadata.get("files"):
        value = tuple(FileCount(str(v["path"]), int(v["count"])) for v in value)
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
  if not tf.io.gfile.exists(path):
    raise InputPathError(f"{what} {folder} is not a finished output (no {MANIFEST}); "
                         "run the stage that builds it first")
  with tf.io.gfile.GFile(path) as f:
    try:
      obj = json.load(f)
    except ValueError:
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
    if found == kind.format():
      return kind.from_json(obj, f"{what} {folder}")
  found = f"a {found}" if isinstance(found, str) and found else "an unversioned"
  needs = " or ".join(k.format() for k in kinds)
  writers = " or ".join(k.WRITER for k in kinds)
  raise FormatError(f"{what} {folder} is {found} manifest; this reader needs {needs}, rebuild it "
                    f"with {writers}")


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
  source: str                        # the source shards folder (absolute when local)
  selection: Optional[str]           # the D3 selection folder, recipe d3 only
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
