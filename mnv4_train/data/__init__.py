"""Data: record formats, replayable augmentation and the tf.data input pipeline."""
