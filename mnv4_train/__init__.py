"""MobileNetV4 distillation: the Keras model family, input pipeline, distillation and training.

Importing the package leaves TensorFlow's logging as the caller set it; the command lines quiet
its C++ start-up lines themselves (`mnv4_train.cli.quiet_tensorflow`; `--verbose` keeps them).
"""

__version__ = "0.1.0"
