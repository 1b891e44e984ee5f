"""Helpers shared by the CNN backbone parity tests: seeded weights with realistic BatchNorm statistics."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import live
import numpy as np
from flax import nnx
from seeded import cnn_state_dict

from dml_jax.convert import strict_update
from dml_jax.convert.weights_dir import LOADED, path_key


def calibrated_state_dict(ref, name: str, build: Callable, layout: dict[str, np.ndarray], seed: int,
                          calibration_nhwc: np.ndarray, forward: str | None = None) -> dict[str, np.ndarray]:
  """`cnn_state_dict(layout, seed)` with every BatchNorm's running statistics measured by the torch model on
  `calibration_nhwc` (reference `name`; see live.calibrated_batchnorm_stats).

  Fresh statistics would let swapped or mis-mapped BN tensors go unnoticed, and calibrated ones keep the
  activations O(1) through the depth, so that an absolute tolerance means something. `build()` makes the
  torch model (live runs only); `forward` names its method that runs the calibration batch.
  """
  state_dict = cnn_state_dict(layout, seed)

  def compute():
    model = live.load(build(), state_dict)
    return live.calibrated_batchnorm_stats(model, calibration_nhwc, seed=seed + 1,
                                           forward=getattr(model, forward) if forward else None)

  stats = ref(name, compute)
  assert set(stats) <= set(state_dict), sorted(set(stats) - set(state_dict))
  return {**state_dict, **stats}


def load_abstract(build, flat: dict[str, np.ndarray], source: str = "test state dict") -> nnx.Module:
  """`build()`'s model holding `flat`, without running its random initialisers.

  Eager initialisation compiles one XLA computation per distinct kernel shape (about a minute for
  ResNet-50 on a busy 2-core machine); the shapes alone are enough when every weight is loaded anyway.
  The abstract variables get placeholder zeros, then `strict_update` checks and loads `flat`.
  """
  model = nnx.eval_shape(build)
  state = nnx.to_flat_state(nnx.state(model, LOADED))
  for _, var in state:
    var.set_value(jnp.asarray(np.zeros(var.shape, var.dtype)))
  nnx.update(model, nnx.from_flat_state(state))
  strict_update(model, flat, source)
  return model


def flat_state(model: nnx.Module, kind=LOADED) -> dict[str, np.ndarray]:
  return {path_key(k): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, kind))}


@nnx.jit
def forward_features(model: nnx.Module, x):
  return model.forward_features(x)


@nnx.jit
def forward_pooled(model: nnx.Module, x):
  return model(x)


def torch_stat_key(path: str) -> str:
  """The torch state-dict key of an NNX BatchStat path: 'layer1/0/bn1/mean' -> 'layer1.0.bn1.running_mean'."""
  module, _, leaf = path.rpartition("/")
  return f"{module.replace('/', '.')}.running_{leaf}"


def running_stats(model) -> dict[str, np.ndarray]:
  """(live runs only) {torch key: running statistic} of every BatchNorm2d of a torch model."""
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
          if k.endswith(("running_mean", "running_var"))}
