"""Which converter module handles which backbone family; modules are imported only when used.

Every converter module exposes `from_torch(reader: StateDictReader, arch: dict) -> {flat NNX path: array}`
(keys joined with '/', as `weights_dir.path_key`), consuming the reader and ending with `reader.finish()`.
A module may also expose `from_big_vision(reader, arch)` for Google `.npz` checkpoints.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from dml_jax.convert.errors import CheckpointReadError
from dml_jax.convert.state_dict_reader import StateDictReader

CONVERTERS = {
    "vit": "dml_jax.convert.vit",
    "resnet": "dml_jax.convert.resnet",
    "bninception": "dml_jax.convert.bninception",
}
# The `layout` of a source (see dml_jax.convert.sources) -> the converter function that reads it.
_LAYOUT_FUNCTIONS = {"torch": "from_torch", "big_vision": "from_big_vision"}


def converter_module(family: str) -> ModuleType:
  if family not in CONVERTERS:
    raise KeyError(f"no weight converter for backbone family {family!r}; known families: {sorted(CONVERTERS)}")
  return importlib.import_module(CONVERTERS[family])


def convert(family: str, layout: str, reader: StateDictReader, arch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Converts `reader`'s arrays, in source `layout` ('torch' | 'big_vision'), for a `family` model with `arch`."""
  if layout not in _LAYOUT_FUNCTIONS:
    raise ValueError(f"unknown source layout {layout!r}; expected one of {sorted(_LAYOUT_FUNCTIONS)}")
  module = converter_module(family)
  fn = getattr(module, _LAYOUT_FUNCTIONS[layout], None)
  if fn is None:
    readable = sorted(layout_ for layout_, name in _LAYOUT_FUNCTIONS.items() if hasattr(module, name))
    raise CheckpointReadError(f"{reader.source}: family {family!r} cannot read {layout!r} checkpoints "
                              f"(it reads: {readable})", "pass a checkpoint of the kind this model family reads")
  flat = fn(reader, dict(arch))
  reader.finish()  # a converter that forgot to finish must not let leftovers through
  return flat
