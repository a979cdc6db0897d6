"""MobileNetV4 distillation: the Keras model family, input pipeline, distillation and training."""

import os as _os

# TensorFlow's C++ start-up lines (CPU features, no CUDA driver) are noise for our CLIs; set
# TF_CPP_MIN_LOG_LEVEL yourself (or pass --verbose to mnv4_train.main) to see them.
TF_LOG_LEVEL_DEFAULTED = "TF_CPP_MIN_LOG_LEVEL" not in _os.environ
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
