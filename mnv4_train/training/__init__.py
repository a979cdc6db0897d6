"""The parts of the training loop behind `mnv4_train.train.train`, each testable on its own.

  strategy.py       the tf.distribute strategy and this process's place in it
  trainer.py        the compiled train/eval steps (`Trainer`) and EMA weights for a block
  stats.py          per-step statistics as named sums, and the history row they make
  cadence.py        when to stop the compiled loop, log, evaluate and checkpoint
  checkpointer.py   student + optimizer + each host's input iterator, saved and restored
  metric_writer.py  history.jsonl, eval.jsonl, TensorBoard, curves.png and the console lines
"""
