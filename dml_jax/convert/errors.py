"""The one error every strict-loading path raises (defined beside the loader, dml_jax/backbones/weights.py)."""

from dml_jax.backbones.weights import WeightsMismatchError

__all__ = ["WeightsMismatchError"]
