"""MobileNetV4 distillation: the Keras model family, input pipeline, distillation and training."""

import os as _os

# TensorFlow's C++ start-up lines (CPU features, no CUDA driver) are noise for our CLIs; set
# TF_CPP_MIN_LOG_LEVEL yourself to see them.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
