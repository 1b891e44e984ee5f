"""Methods: one module per paper, behind the interface of `base.Method` (see dml_jax/methods/base.py).

Every method module defines `config()` (the defaults of `config.method.*`) and `build(config,
num_classes) -> Method`, and is listed in `METHODS` below. The trainer builds the method named by
`config.method.name`; config files start from `method_config(name)`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from dml_jax.errors import unknown_name
from dml_jax.methods.base import HostBatch, HostState, Method, Phase, StepInfo

# Registry name -> module. Modules are imported on first use, so `import dml_jax.methods` stays light.
METHODS: dict[str, str] = {
    "dada": "dml_jax.methods.dada",
    "dfml": "dml_jax.methods.dfml",
    "divide_and_conquer": "dml_jax.methods.divide_and_conquer",
    "metric_loss": "dml_jax.methods.metric_loss",
    "proxy_isa": "dml_jax.methods.proxy_isa",
    "vptsp": "dml_jax.methods.vptsp",
}


def list_methods() -> list[str]:
  return sorted(METHODS)


def _module(name: Any) -> ModuleType:
  if name not in METHODS:
    raise unknown_name("method", str(name), METHODS, hint="set --config.method.name (and start the method section "
                       "from dml_jax.methods.method_config(NAME))")
  return importlib.import_module(METHODS[name])


def method_config(name: str) -> Any:
  """The defaults of `config.method.*` for method `name` (an ml_collections ConfigDict)."""
  config = _module(name).config()
  if config.name != name:
    raise AssertionError(f"{METHODS[name]}.config() names the method {config.name!r}, expected {name!r}")
  return config


def build(config: Any, *, num_classes: int) -> Method:
  """The method named by `config.method.name`, for `num_classes` training classes."""
  return _module(config.method.name).build(config, num_classes)


__all__ = ["METHODS", "HostBatch", "HostState", "Method", "Phase", "StepInfo", "build", "list_methods",
           "method_config"]
