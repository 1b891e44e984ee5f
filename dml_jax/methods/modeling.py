"""Pieces every method builds its model from: the backbone, the NNX <-> pure-dict bridge, dtypes, BatchNorm.

The trainer sees parameters and state as pure nested dicts keyed by name (what the config's group regexes
match and what checkpoints hold); a method's objectives rebuild the NNX module from those dicts while
tracing. `SplitModel` is the one way to do that: the module is split once, and `merge` puts dicts back
into its graph definition by key (flax's pure-dict merge), so a step costs no Python work per parameter.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dml_jax import backbones


def compute_dtype(name: str | None) -> Any:
  """config.compute_dtype -> a dtype to cast to, or None for float32 (no casts).

  'auto' is bfloat16 on a GPU or TPU and float32 on a CPU: the recipes whose authors trained with fp16 autocast
  (VPTSP-G) use it, so they run in reduced precision where it pays and stay exact where parity is tested
  (bf16 matmuls on a CPU are emulated and slower than float32).
  """
  if name == "auto":
    name = "bfloat16" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "float32"
  if name in (None, "", "float32"):
    return None
  if name != "bfloat16":
    raise ValueError(f"config.compute_dtype must be 'float32', 'bfloat16' or 'auto', got {name!r}")
  return jnp.dtype(name)


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Casts the floating leaves of `tree` to `dtype` (None: unchanged); integer leaves stay as they are."""
  if dtype is None:
    return tree
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class SplitModel:
  """An NNX module split once into its graph definitions and pure-dict states.

  Attributes:
    params: {name: ...} pure dict of the nnx.Param leaves (what receives gradients).
    other: {name: ...} pure dict of everything else (BatchNorm statistics, RNG counters).

  `merge(params, other, train=...)` rebuilds the module (train graph: as configured at construction, e.g.
  BatchNorm frozen; eval graph: `module.eval()`, i.e. running statistics and no dropout). `other_of`
  reads the non-parameter state back out after a forward pass, with the structure of `other`.
  """

  def __init__(self, module: nnx.Module):
    self.train_graph, params, other = nnx.split(module, nnx.Param, ...)
    module.eval()
    self.eval_graph = nnx.split(module, nnx.Param, ...)[0]
    module.train()
    self.params = nnx.to_pure_dict(params)
    self.other = nnx.to_pure_dict(other)

  def merge(self, params: Any, other: Any, *, train: bool) -> nnx.Module:
    return nnx.merge(self.train_graph if train else self.eval_graph, params, other)

  @staticmethod
  def other_of(module: nnx.Module) -> Any:
    return nnx.to_pure_dict(nnx.split(module, nnx.Param, ...)[2])


# Random inits run as one compiled call (eagerly, every parameter shape compiles on its own), cached so
# that a method built again with the same shapes (tests, a second run in one process) reuses it.
@functools.cache
def _random_backbone_fn(name: str, overrides: tuple):
  return nnx.jit(lambda key: backbones.create(name, rngs=nnx.Rngs(key), **dict(overrides)))


def build_backbone(model_config: Any, rng: jax.Array, image_size: int | None = None) -> nnx.Module:
  """The backbone of `config.model`: `weights` (a converted directory, loaded strictly) or random init.

  model_config: backbone (registry name, 'name.tag' selects that tag's preprocessing), weights ('' =
  random init from `rng`), backbone_overrides (architecture keyword arguments).
  image_size: config.dataset.image_size; a ViT is built for it unless backbone_overrides sets img_size
    (converted position embeddings are resampled on load).
  The module's `pretrained_cfg` holds the preprocessing of the loaded weights.
  """
  overrides = dict(model_config.backbone_overrides)
  if image_size is not None and "img_size" in backbones.get_entry(model_config.backbone).arch:
    overrides.setdefault("img_size", int(image_size))
  if model_config.weights:
    return backbones.create(model_config.backbone, weights=model_config.weights, **overrides)
  model = _random_backbone_fn(model_config.backbone, tuple(sorted(overrides.items())))(rng)
  # A tagged name ('vit_base_patch16_224.augreg_in21k') names that weight's preprocessing.
  model.pretrained_cfg = backbones.registry.get_pretrained_cfg(model_config.backbone)
  return model


def set_batchnorm_frozen(module: nnx.Module, frozen: bool) -> None:
  """BatchNorm layers use (and never update) their running statistics when `frozen` (torch `bn.eval()`)."""
  from dml_jax.backbones.batchnorm import BatchNorm  # the CNN backbones' torch-semantics BN
  module.set_attributes(BatchNorm, use_running_average=frozen, raise_if_not_found=False)
  module.set_attributes(nnx.BatchNorm, use_running_average=frozen, raise_if_not_found=False)


def batchnorm_affine_paths(module: nnx.Module, prefix: str) -> set[str]:
  """'/'-joined paths (under `prefix`) of every BatchNorm scale and bias in `module`."""
  from dml_jax.backbones.batchnorm import BatchNorm
  paths = set()
  for path, node in nnx.iter_graph(module):
    if isinstance(node, (BatchNorm, nnx.BatchNorm)):
      base = "/".join([prefix] + [str(p) for p in path])
      for name in ("scale", "bias"):
        if isinstance(getattr(node, name, None), nnx.Param):
          paths.add(f"{base}/{name}")
  return paths
