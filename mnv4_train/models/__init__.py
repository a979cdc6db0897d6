"""The Keras MobileNetV4 family: specs as tables, blocks as layers, a builder by name."""

from mnv4_train.models.builder import build, canonical_resolution
from mnv4_train.models.specs import MODEL_NAMES, VARIANTS, get_spec

__all__ = ["build", "canonical_resolution", "get_spec", "MODEL_NAMES", "VARIANTS"]
