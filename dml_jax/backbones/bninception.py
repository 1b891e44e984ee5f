"""BN-Inception (Inception v2, Caffe port) in the layout of `pretrainedmodels.bninception`, Flax NNX, NHWC.

The trunk of the Proxy-Anchor / Proxy-ISA code bases (docs/methods/metric_loss.md). Facts it keeps:
  * every conv has a bias *and* a BatchNorm (eps 1e-5), then ReLU. The torch code feeds the pre-ReLU BN
    outputs onward, but its ReLUs are in-place, so those tensors are already rectified:
    conv -> BN -> ReLU everywhere is the same network;
  * 3x3/2 max pools round the output size up (torch `ceil_mode=True`): 224 -> 112 -> 56 -> 28 -> 14 -> 7;
  * pool branches are 3x3/1 average pools with padding 1 that always divide by 9 (count_include_pad),
    except 3c and 4e (3x3/2 max pool, no projection) and 5b (3x3/1 max pool with padding 1);
  * inputs are BGR in [0, 255] minus (104, 117, 128), std 1 (see `PRETRAINED_CFG`).

Parameter paths are the torch module names: `conv1_7x7_s2/{kernel,bias}`,
`conv1_7x7_s2_bn/{scale,bias,mean,var}`, `inception_3a_1x1/...`, `inception_3a_double_3x3_2_bn/...`.

BatchNorm momentum: pretrainedmodels builds `nn.BatchNorm2d` with torch's default momentum 0.1 (the
default here); the Proxy-Anchor / Proxy-ISA `bn_inception.py` builds it with torch momentum 0.9
(running <- 0.1 * running + 0.9 * batch): pass `bn_momentum=0.9` to reproduce their unfrozen-BN runs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dml_jax.backbones.batchnorm import BatchNorm
from dml_jax.backbones.registry import register
from dml_jax.preprocessing import PretrainedCfg

# pretrainedmodels' `pretrained_settings['bninception']['imagenet']`; resize 256 -> crop 224 as in the
# DML code bases.
PRETRAINED_CFG = PretrainedCfg(mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0), input_size=224, crop_pct=0.875,
                               interpolation="bilinear", color_order="BGR", pixel_scale=255.0)

NUM_FEATURES = 1024


class _Block(NamedTuple):
  """One inception module. Branch widths of 0 mean the branch does not exist."""

  name: str
  in_channels: int
  out_1x1: int
  reduce_3x3: int
  out_3x3: int
  reduce_double: int
  out_double: int
  pool: str  # 'avg' (3x3/1 pad 1, /9), 'max_s1' (3x3/1 pad 1), 'max_s2' (3x3/2 ceil, no projection)
  pool_proj: int
  stride: int  # stride of the 3x3 and second double-3x3 convs


_BLOCKS = (
    _Block("3a", 192, 64, 64, 64, 64, 96, "avg", 32, 1),
    _Block("3b", 256, 64, 64, 96, 64, 96, "avg", 64, 1),
    _Block("3c", 320, 0, 128, 160, 64, 96, "max_s2", 0, 2),
    _Block("4a", 576, 224, 64, 96, 96, 128, "avg", 128, 1),
    _Block("4b", 576, 192, 96, 128, 96, 128, "avg", 128, 1),
    _Block("4c", 576, 160, 128, 160, 128, 160, "avg", 128, 1),
    _Block("4d", 608, 96, 128, 192, 160, 192, "avg", 128, 1),
    _Block("4e", 608, 0, 128, 192, 192, 256, "max_s2", 0, 2),
    _Block("5a", 1056, 352, 192, 320, 160, 224, "avg", 128, 1),
    _Block("5b", 1024, 352, 192, 320, 192, 224, "max_s1", 128, 1),
)


def max_pool_ceil(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """torch `MaxPool2d(window, stride, padding, ceil_mode=True)` on NHWC x.

  Output size ceil((L + 2p - k) / s) + 1, minus one when the last window would start in the right
  padding; the extra right padding this needs is -inf, so it never wins the max.
  """
  pads = []
  for size in x.shape[1:3]:
    out = math.ceil((size + 2 * padding - window) / stride) + 1
    if (out - 1) * stride >= size + padding:
      out -= 1
    extra = max((out - 1) * stride + window - (size + 2 * padding), 0)
    pads.append((padding, padding + extra))
  return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=tuple(pads))


class BNInception(nnx.Module):
  """BN-Inception trunk; calling it on [B, 224, 224, 3] gives global-average-pooled features [B, 1024].

  Args:
    bn_momentum: torch-convention BN momentum (weight of the new batch statistic); 0.1 as in
      pretrainedmodels, 0.9 in the Proxy-Anchor / Proxy-ISA code.
    use_running_average: start with frozen BN statistics (torch eval mode) instead of batch statistics.
  """

  def __init__(self, *, bn_momentum: float = 0.1, use_running_average: bool = False, rngs: nnx.Rngs):
    def conv_bn(name: str, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
      pad = kernel_size // 2
      # Weights come from a converted checkpoint; flax's default init only serves fresh test models.
      setattr(self, name, nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), strides=(stride, stride),
                                   padding=((pad, pad), (pad, pad)), use_bias=True, rngs=rngs))
      setattr(self, name + "_bn", BatchNorm(out_channels, momentum=bn_momentum))

    conv_bn("conv1_7x7_s2", 3, 64, 7, 2)
    conv_bn("conv2_3x3_reduce", 64, 64, 1, 1)
    conv_bn("conv2_3x3", 64, 192, 3, 1)
    for b in _BLOCKS:
      p = f"inception_{b.name}_"
      if b.out_1x1:
        conv_bn(p + "1x1", b.in_channels, b.out_1x1, 1, 1)
      conv_bn(p + "3x3_reduce", b.in_channels, b.reduce_3x3, 1, 1)
      conv_bn(p + "3x3", b.reduce_3x3, b.out_3x3, 3, b.stride)
      conv_bn(p + "double_3x3_reduce", b.in_channels, b.reduce_double, 1, 1)
      conv_bn(p + "double_3x3_1", b.reduce_double, b.out_double, 3, 1)
      conv_bn(p + "double_3x3_2", b.out_double, b.out_double, 3, b.stride)
      if b.pool_proj:
        conv_bn(p + "pool_proj", b.in_channels, b.pool_proj, 1, 1)
    self.num_features = NUM_FEATURES
    if use_running_average:
      self.set_attributes(BatchNorm, use_running_average=True)

  def _unit(self, name: str, x: jax.Array) -> jax.Array:
    return jax.nn.relu(getattr(self, name + "_bn")(getattr(self, name)(x)))

  def _inception(self, b: _Block, x: jax.Array) -> jax.Array:
    p = f"inception_{b.name}_"
    branches = []
    if b.out_1x1:
      branches.append(self._unit(p + "1x1", x))
    branches.append(self._unit(p + "3x3", self._unit(p + "3x3_reduce", x)))
    double = self._unit(p + "double_3x3_reduce", x)
    branches.append(self._unit(p + "double_3x3_2", self._unit(p + "double_3x3_1", double)))
    if b.pool == "avg":
      pooled = nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)
    elif b.pool == "max_s1":
      pooled = max_pool_ceil(x, 3, 1, padding=1)
    else:
      pooled = max_pool_ceil(x, 3, 2)
    branches.append(self._unit(p + "pool_proj", pooled) if b.pool_proj else pooled)
    return jnp.concatenate(branches, axis=-1)

  def forward_features(self, x: jax.Array) -> jax.Array:
    """x: float32 BGR [B, H, W, 3], normalised per PRETRAINED_CFG -> [B, h, w, 1024] (7x7 for 224)."""
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"BNInception expects NHWC images [B, H, W, 3], got shape {x.shape}")
    x = max_pool_ceil(self._unit("conv1_7x7_s2", x), 3, 2)
    x = self._unit("conv2_3x3", self._unit("conv2_3x3_reduce", x))
    x = max_pool_ceil(x, 3, 2)
    for b in _BLOCKS:
      x = self._inception(b, x)
    return x

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float32 BGR [B, H, W, 3] -> global-average-pooled features float32 [B, 1024].

    pretrainedmodels pools with a fixed 7x7 window (`global_pool`), the same as this mean at 224.
    """
    return jnp.mean(self.forward_features(x), axis=(1, 2))


register("bn_inception", "bninception", BNInception, PRETRAINED_CFG)
