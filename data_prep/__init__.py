"""Apache Beam jobs that build the source shards and the offline distillation datasets.

One module per job (`ingest`, `select_d3`, `distill`), shared transforms in `transforms`, output
plumbing in `files`; see WORKSPACE.md for the data flow. `data_prep` imports `mnv4_train`'s
record and augmentation modules, never the reverse. Importing it leaves TensorFlow's logging as
the caller set it: each job's command line quiets it (`mnv4_train.cli.quiet_tensorflow`).
"""

import logging as _logging


class _OptionalGcpNotice(_logging.Filter):
  """Beam warns on import that its GCS and BigQuery clients are absent: they come with the
  `gcp` extra (`pip install -e ".[gcp]"`), which local runs do not need."""

  def filter(self, record):
    message = str(record.msg)
    return not message.startswith(("Failed to import GCSFileSystem", "apitools not found"))


for _name in ("apache_beam.io.filesystems", ""):
  _logging.getLogger(_name).addFilter(_OptionalGcpNotice())
