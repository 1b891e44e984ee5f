"""Shared mapping for torch CNN state dicts whose module names equal our NNX attribute paths.

Our ResNet and BN-Inception name every submodule as the torch model does, so a flat NNX path
determines its torch key: `layer1/0/conv1/kernel` <- `layer1.0.conv1.weight`,
`conv1_7x7_s2/bias` <- `conv1_7x7_s2.bias`, `layer1/0/bn1/mean` <- `layer1.0.bn1.running_mean`.
The converters walk the *model's* paths (from an abstract model, no weights allocated) and `take`
each torch key, so every parameter the model needs is asked for exactly once.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from dml_jax.convert.state_dict_reader import StateDictReader
from dml_jax.convert.weights_dir import model_shapes

# NNX variable name (last path element) -> torch tensor name, per layer kind.
_CONV_NAMES = {"kernel": "weight", "bias": "bias"}
_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def abstract_shapes(module_cls: Callable[..., nnx.Module], arch: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """{flat NNX path: shape} of `module_cls(**arch, rngs=...)`, traced without allocating weights.

  Cached per (class, arch): tracing a whole backbone takes seconds.
  """
  return dict(_abstract_shapes(module_cls, json.dumps(dict(arch), sort_keys=True)))


@functools.lru_cache(maxsize=16)
def _abstract_shapes(module_cls, arch_json: str) -> dict[str, tuple[int, ...]]:
  arch = json.loads(arch_json)
  return model_shapes(nnx.eval_shape(lambda: module_cls(**arch, rngs=nnx.Rngs(0))))


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """torch conv weight OIHW [O, I, kh, kw] -> flax kernel HWIO [kh, kw, I, O].

  Arrays that are not 4-D pass through unchanged, so the strict loader reports them as mis-shaped.
  """
  if weight.ndim != 4:
    return weight
  return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


def take_all(reader: StateDictReader, shapes: dict[str, tuple[int, ...]], *,
             squeeze_bn: bool = False) -> dict[str, np.ndarray]:
  """Takes the torch tensor of every NNX path in `shapes`; returns {path: array in flax layout}.

  Paths whose parent module holds `kernel` are convolutions, the others BatchNorms. With `squeeze_bn`,
  BN tensors stored with leading singleton dims ([1, C], as in Cadene's BN-Inception checkpoint) are
  accepted and flattened to [C]. Keys missing from the checkpoint are recorded by the reader (reported
  at `reader.finish()`) and left out of the result.
  """
  modules: dict[str, set[str]] = {}
  for path in shapes:
    module, _, leaf = path.rpartition("/")
    modules.setdefault(module, set()).add(leaf)
  out: dict[str, np.ndarray] = {}
  for module, leaves in modules.items():
    is_conv = "kernel" in leaves
    names = _CONV_NAMES if is_conv else _BN_NAMES
    unknown = sorted(leaves - set(names))
    if unknown:
      raise ValueError(f"no torch name for NNX variables {unknown} of module {module!r}")
    for leaf in sorted(leaves):
      value = reader.take(f"{module.replace('/', '.')}.{names[leaf]}")
      if value is None:
        continue
      path = f"{module}/{leaf}"
      if leaf == "kernel":
        value = conv_kernel(value)
      elif squeeze_bn and not is_conv and value.ndim > 1 and all(d == 1 for d in value.shape[:-1]):
        value = value.reshape(value.shape[-1])
      out[path] = value
  return out
