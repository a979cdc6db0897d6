"""Apache Beam jobs that build the source shards and the offline distillation datasets.

One module per job, shared transforms in their own module; see WORKSPACE.md for the data flow.
`data_prep` may import `mnv4_train`'s record and augmentation modules, never the reverse.
"""
