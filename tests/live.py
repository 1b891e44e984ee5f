"""Torch-side helpers for the `compute` functions of parity references (tests/reference.py).

torch and timm are imported inside the functions, so test modules can import this one in the default run,
where neither is installed; only a live computation calls them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np


def tensors(state_dict: Mapping[str, np.ndarray]) -> dict:
  import torch

  return {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}


def load(model, state_dict: Mapping[str, np.ndarray]):
  """`model` holding exactly `state_dict` (strict: a layout mistake in tests/seeded.py stops here), eval mode."""
  model.load_state_dict(tensors(state_dict), strict=True)
  return model.eval()


def timm_vit(state_dict: Mapping[str, np.ndarray], *, distilled: bool = False, num_classes: int = 0, **arch):
  from timm.models.deit import VisionTransformerDistilled
  from timm.models.vision_transformer import VisionTransformer

  cls = VisionTransformerDistilled if distilled else VisionTransformer
  return load(cls(**arch, num_classes=num_classes), state_dict)


def nchw(x: np.ndarray):
  import torch

  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t) -> np.ndarray:
  return t.detach().permute(0, 2, 3, 1).numpy()


def timm_tokens(model, x: np.ndarray) -> np.ndarray:
  import torch

  with torch.no_grad():
    return model.forward_features(nchw(x)).numpy()


def timm_pooled(model, x: np.ndarray) -> np.ndarray:
  import torch

  with torch.no_grad():
    return model.forward_head(model.forward_features(nchw(x)), pre_logits=True).numpy()


def layout(model) -> dict[str, np.ndarray]:
  """{state-dict key: shape} of a torch model: the layout reference that tests/seeded.cnn_state_dict fills."""
  return {k: np.asarray(tuple(v.shape), np.int64) for k, v in model.state_dict().items()}


def calibrated_batchnorm_stats(model, calibration_nhwc: np.ndarray, seed: int,
                               forward: Callable | None = None) -> dict[str, np.ndarray]:
  """Realistic running statistics for every BatchNorm2d of `model` (which holds its other weights already).

  Fresh statistics (mean 0, var 1) would let swapped or mis-mapped BN tensors go unnoticed, and leave the
  activations' scale to drift through the depth. So each layer's statistics are measured on the
  calibration batch (train mode, momentum 1; downstream layers see the normalised outputs of upstream
  ones), then perturbed per channel by seeded numpy. `forward` (default: the model) runs the batch.
  """
  import torch

  bns = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
  momenta = {name: m.momentum for name, m in bns.items()}
  with torch.no_grad():
    for m in bns.values():
      m.momentum = 1.0  # running stats := this batch's statistics
    model.train()
    (forward or model)(nchw(calibration_nhwc))
  model.eval()
  rng = np.random.default_rng(seed)
  out = {}
  for name, m in bns.items():
    m.momentum = momenta[name]
    mean, var = m.running_mean.numpy().astype(np.float64), m.running_var.numpy().astype(np.float64)
    out[f"{name}.running_mean"] = (mean + 0.2 * np.sqrt(var) * rng.standard_normal(mean.shape)).astype(np.float32)
    out[f"{name}.running_var"] = (var * (0.7 + 0.6 * rng.random(var.shape))).astype(np.float32)
  return out


def running_stats(model, paths) -> dict[str, np.ndarray]:
  """{'layer1/0/bn1/mean': running_mean of torch module layer1.0.bn1, ...} for NNX BatchStat paths."""
  names = {"mean": "running_mean", "var": "running_var"}
  out = {}
  for path in paths:
    module, _, leaf = path.rpartition("/")
    out[path] = getattr(model.get_submodule(module.replace("/", ".")), names[leaf]).detach().numpy().copy()
  return out
