"""Errors of weight conversion and loading; every one is a UserError (one `error:` line on the command line).

The loading errors live beside the loader (dml_jax/backbones/weights.py) and are re-exported here.
"""

from dml_jax.backbones.weights import WeightsMismatchError, WeightsNotFoundError
from dml_jax.errors import InvalidValueError, UserError


class CheckpointReadError(InvalidValueError):
  """A checkpoint file cannot be read (damaged, wrong kind, pickled objects)."""


class OutDirError(UserError, ValueError):
  """--out names a folder the converter must not replace."""


class HubUnavailableError(UserError, RuntimeError):
  """timm could not get pretrained weights by name (no network, not cached, unknown tag)."""


class MissingDependencyError(UserError, ImportError):
  """The conversion asked for needs an optional package (torch, timm) that is not installed."""


__all__ = ["CheckpointReadError", "HubUnavailableError", "MissingDependencyError", "OutDirError",
           "WeightsMismatchError",
           "WeightsNotFoundError"]
