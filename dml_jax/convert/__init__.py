"""Checkpoint conversion: source state dicts -> Flax weight directories, strictly."""

from dml_jax.convert.errors import WeightsMismatchError
from dml_jax.convert.state_dict_reader import StateDictReader
from dml_jax.convert.weights_dir import (
                                         load_weights_into,
                                         read_weights_dir,
                                         register_load_adapter,
                                         strict_update,
                                         write_weights_dir,
)

__all__ = ["WeightsMismatchError", "StateDictReader", "load_weights_into", "read_weights_dir",
           "register_load_adapter", "strict_update", "write_weights_dir"]
