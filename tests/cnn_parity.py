"""Helpers shared by the CNN backbone parity tests: torch references with realistic random BN state."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from dml_jax.convert import strict_update
from dml_jax.convert.weights_dir import LOADED, path_key


def randomize_batchnorm(model: torch.nn.Module, calibration_nchw: torch.Tensor, seed: int, forward=None) -> None:
  """Gives every BatchNorm2d of `model` distinct, realistic statistics and affine parameters.

  Fresh BN layers hold mean 0 / var 1 / weight 1 / bias 0, under which swapped or mis-mapped BN
  tensors go unnoticed. Statistics are first measured on `calibration_nchw` (so activations stay O(1)
  through the depth and an absolute tolerance means something), then perturbed per channel.
  `forward` (default: the model itself) runs the calibration batch.
  """
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  gen = torch.Generator().manual_seed(seed)
  momenta = [m.momentum for m in bns]
  with torch.no_grad():
    for m in bns:  # before calibrating, so that the statistics downstream see these affine outputs
      m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
      m.bias.copy_(0.4 * torch.rand(m.num_features, generator=gen) - 0.2)
      m.momentum = 1.0  # running stats := this batch's statistics
    model.train()
    (forward or model)(calibration_nchw)
    for m, momentum in zip(bns, momenta):
      m.momentum = momentum
      m.running_mean.add_(0.2 * m.running_var.sqrt() * torch.randn(m.num_features, generator=gen))
      m.running_var.mul_(0.7 + 0.6 * torch.rand(m.num_features, generator=gen))
  model.eval()


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


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def torch_running_stats(model: torch.nn.Module, paths) -> dict[str, np.ndarray]:
  """{'layer1/0/bn1/mean': running_mean of torch module layer1.0.bn1, ...} for NNX BatchStat paths."""
  names = {"mean": "running_mean", "var": "running_var"}
  out = {}
  for path in paths:
    module, _, leaf = path.rpartition("/")
    out[path] = getattr(model.get_submodule(module.replace("/", ".")), names[leaf]).detach().numpy().copy()
  return out


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().permute(0, 2, 3, 1).numpy()


def flat_state(model: nnx.Module, kind=LOADED) -> dict[str, np.ndarray]:
  return {path_key(k): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, kind))}


@nnx.jit
def forward_features(model: nnx.Module, x):
  return model.forward_features(x)


@nnx.jit
def forward_pooled(model: nnx.Module, x):
  return model(x)
