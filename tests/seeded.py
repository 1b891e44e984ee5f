"""Model weights from seeded numpy, in the state-dict layout of timm / torchvision / pretrainedmodels.

Parity tests build the same arrays in the default run (to convert them for dml_jax) and in the live run (to
load them into the torch model with `load_state_dict(strict=True)`, which also checks the layout), so the
committed references only hold the libraries' outputs. No torch here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def timm_vit_state_dict(seed: int, *, img_size: int, patch_size: int, depth: int, embed_dim: int, num_heads: int,
                        num_classes: int = 0, distilled: bool = False, scale: float = 0.1, mlp_ratio: int = 4,
                        in_chans: int = 3) -> dict[str, np.ndarray]:
  """timm VisionTransformer(Distilled) weights: every tensor N(0, scale^2), LayerNorm weights 1 + N(0, scale^2).

  Non-zero biases and LayerNorm affines make every tensor distinct, so a swapped or misplaced one shows;
  scale 0.1 puts a tiny ViT's MLP pre-activations in the range of pretrained ViTs.
  """
  del num_heads  # no tensor's shape depends on it
  rng = np.random.default_rng(seed)
  d, hidden, tokens = embed_dim, embed_dim * mlp_ratio, (img_size // patch_size) ** 2
  shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d)}
  if distilled:
    shapes["dist_token"] = (1, 1, d)
  shapes["pos_embed"] = (1, tokens + (2 if distilled else 1), d)
  shapes["patch_embed.proj.weight"] = (d, in_chans, patch_size, patch_size)
  shapes["patch_embed.proj.bias"] = (d,)
  for i in range(depth):
    b = f"blocks.{i}."
    shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                   b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                   b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (hidden, d),
                   b + "mlp.fc1.bias": (hidden,), b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,)})
  shapes.update({"norm.weight": (d,), "norm.bias": (d,)})
  heads = (["head"] + (["head_dist"] if distilled else [])) if num_classes else []
  for head in heads:
    shapes.update({f"{head}.weight": (num_classes, d), f"{head}.bias": (num_classes,)})
  out = {}
  for key, shape in shapes.items():
    value = scale * rng.standard_normal(shape)
    if "norm" in key and key.endswith(".weight"):
      value += 1.0
    out[key] = value.astype(np.float32)
  return out


def layout_of(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{key: shape as an int64 array}: what a layout reference stores of a torch model's state dict."""
  return {k: np.asarray(np.shape(v), np.int64) for k, v in state_dict.items()}


def cnn_state_dict(layout: Mapping[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
  """Weights for a CNN state-dict layout ({key: shape}, e.g. a layout reference).

  Convolutions and linears He-normal (activations keep their scale through the depth), their biases
  uniform in +-1/sqrt(fan_in); BatchNorm weights in [0.5, 1.5), biases in [-0.2, 0.2); running statistics
  mean 0, variance 1 (tests replace them by statistics calibrated on images); counters 0.
  """
  rng = np.random.default_rng(seed)
  shapes = {k: tuple(int(n) for n in v) for k, v in layout.items()}
  batchnorms = {k.rsplit(".", 1)[0] for k in shapes if k.endswith(".running_mean")}
  out = {}
  for key, shape in shapes.items():
    module, leaf = key.rsplit(".", 1)
    if leaf == "num_batches_tracked":
      out[key] = np.zeros(shape, np.int64)
      continue
    if module in batchnorms:
      value = {"weight": lambda: 0.5 + rng.random(shape), "bias": lambda: 0.4 * rng.random(shape) - 0.2,
               "running_mean": lambda: np.zeros(shape), "running_var": lambda: np.ones(shape)}[leaf]()
    elif leaf == "weight":
      fan_in = int(np.prod(shape[1:]))
      value = np.sqrt(2.0 / fan_in) * rng.standard_normal(shape)
    else:
      fan_in = int(np.prod(shapes[f"{module}.weight"][1:])) if f"{module}.weight" in shapes else shape[0]
      value = rng.uniform(-1, 1, shape) / np.sqrt(fan_in)
    out[key] = value.astype(np.float32)
  return out
