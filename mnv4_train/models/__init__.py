"""The Keras MobileNetV4 family: specs as tables, blocks as layers, a builder by name.

The builder (Keras, so TensorFlow) is imported on first use of `build` or
`canonical_resolution`: the specs and the command lines' flag checks need neither, and a command
line quiets TensorFlow's logging before it loads (`mnv4_train.cli`).
"""

from mnv4_train.models.specs import MODEL_NAMES, VARIANTS, get_spec

__all__ = ["build", "canonical_resolution", "get_spec", "MODEL_NAMES", "VARIANTS"]
_FROM_BUILDER = ("build", "canonical_resolution")


def __getattr__(name):
  if name in _FROM_BUILDER:
    from mnv4_train.models import builder  # pylint: disable=import-outside-toplevel
    return getattr(builder, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_FROM_BUILDER))
