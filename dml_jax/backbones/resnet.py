"""ResNet-50 in the torchvision / timm layout (bottleneck v1.5), Flax NNX, NHWC.

Architecture (timm `resnet50` = torchvision `resnet50`):
  stem: 7x7/2 conv (pad 3) -> BN -> ReLU -> 3x3/2 max pool (pad 1)
  layer1..4: bottleneck blocks 1x1 -> 3x3 (carries the stride) -> 1x1 (x4 expansion), each conv followed
  by BN, ReLU after the residual sum; the first block of a stage has a 1x1 conv + BN shortcut
  (`downsample`) when its stride or width changes.
Paddings are explicit and symmetric as in torch: flax 'SAME' pads (0, 1) for stride 2 on even inputs,
which shifts every stride-2 layer by a pixel.

Parameter paths mirror the torch state dict: `conv1/kernel`, `bn1/{scale,bias,mean,var}`,
`layer1/0/conv1/kernel`, `layer1/0/bn1/...`, `layer1/0/downsample/0/kernel` (conv),
`layer1/0/downsample/1/...` (BN). BN statistics are `nnx.BatchStat`; see `batchnorm.py` for the
batch-statistics / frozen-statistics switch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dml_jax.backbones.batchnorm import BatchNorm
from dml_jax.backbones.registry import register
from dml_jax.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PretrainedCfg

EXPANSION = 4

# torchvision and timm initialise ResNet convs with kaiming_normal_(mode='fan_out', nonlinearity='relu').
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

# Per-weight preprocessing (timm's pretrained_cfg of `resnet50.<tag>`, timm 1.0.31). a1_in1k is timm's
# default; tv_in1k is torchvision's IMAGENET1K_V1, the weights the DML papers start from.
PRETRAINED_CFGS: dict[str, PretrainedCfg] = {
    "a1_in1k": PretrainedCfg(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.95, interpolation="bicubic"),
    "tv_in1k": PretrainedCfg(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875, interpolation="bilinear"),
}


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
  pad = kernel_size // 2
  return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=_CONV_INIT, rngs=rngs)


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (stride) -> 1x1 bottleneck with an optional 1x1 conv + BN shortcut."""

  def __init__(self, in_channels: int, width: int, stride: int, *, bn_momentum: float, rngs: nnx.Rngs):
    out_channels = width * EXPANSION
    self.conv1 = _conv(in_channels, width, 1, 1, rngs)
    self.bn1 = BatchNorm(width, momentum=bn_momentum)
    self.conv2 = _conv(width, width, 3, stride, rngs)
    self.bn2 = BatchNorm(width, momentum=bn_momentum)
    self.conv3 = _conv(width, out_channels, 1, 1, rngs)
    self.bn3 = BatchNorm(out_channels, momentum=bn_momentum)
    if stride != 1 or in_channels != out_channels:
      self.downsample = nnx.List([_conv(in_channels, out_channels, 1, stride, rngs),
                                  BatchNorm(out_channels, momentum=bn_momentum)])
    else:
      self.downsample = None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float32 [B, H, W, C_in] -> [B, H / stride, W / stride, 4 * width]."""
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
    out = y + shortcut
    # relu written as a product with its mask: XLA's CPU fusion pass treats max(out, 0) of a sum as cheap
    # enough to copy into every consumer and recomputed the whole stage's residual stream inside each
    # transposed weight-gradient fusion (docs/benchmarks.md, train step); the product is computed once.
    # Same values and the same gradient as relu.
    return out * (out > 0).astype(out.dtype)


class ResNet(nnx.Module):
  """Bottleneck ResNet; `ResNet()` is ResNet-50.

  Args:
    layers: blocks per stage (ResNet-50: 3, 4, 6, 3).
    channels: bottleneck width per stage; a stage outputs 4x this (ResNet-50: 64, 128, 256, 512).
    stem_width: channels of the 7x7 stem conv (timm fixes it at 64 for this stem).
    bn_momentum: torch-convention BN momentum (weight of the new batch statistic), torch default 0.1.
    use_running_average: start with frozen BN statistics (torch eval mode) instead of batch statistics.

  Calling the module on float32 images [B, H, W, 3], normalised as `pretrained_cfg` says, returns the
  global-average-pooled features [B, 4 * channels[-1]] (timm `forward_head(..., pre_logits=True)`).
  """

  def __init__(self, *, layers: Sequence[int] = (3, 4, 6, 3), channels: Sequence[int] = (64, 128, 256, 512),
               stem_width: int = 64, bn_momentum: float = 0.1, use_running_average: bool = False,
               rngs: nnx.Rngs):
    if len(layers) != len(channels) or not layers:
      raise ValueError(f"ResNet needs one block count per stage width, got layers={layers} channels={channels}")
    self.conv1 = nnx.Conv(3, stem_width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                          kernel_init=_CONV_INIT, rngs=rngs)
    self.bn1 = BatchNorm(stem_width, momentum=bn_momentum)
    in_channels = stem_width
    for stage, (num_blocks, width) in enumerate(zip(layers, channels)):
      blocks = []
      for block in range(num_blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        blocks.append(Bottleneck(in_channels, width, stride, bn_momentum=bn_momentum, rngs=rngs))
        in_channels = width * EXPANSION
      setattr(self, f"layer{stage + 1}", nnx.List(blocks))
    self.num_stages = len(layers)
    self.num_features = in_channels
    if use_running_average:
      self.set_attributes(BatchNorm, use_running_average=True)

  def forward_features(self, x: jax.Array) -> jax.Array:
    """x: float32 [B, H, W, 3] -> feature map float32 [B, ceil(H / 32), ceil(W / 32), num_features]."""
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"ResNet expects NHWC images [B, H, W, 3], got shape {x.shape}")
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in range(self.num_stages):
      for block in getattr(self, f"layer{stage + 1}"):
        x = block(x)
    return x

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float32 [B, H, W, 3] -> global-average-pooled features float32 [B, num_features]."""
    return jnp.mean(self.forward_features(x), axis=(1, 2))


register("resnet50", "resnet", ResNet, PRETRAINED_CFGS["a1_in1k"], pretrained_tags=PRETRAINED_CFGS,
         layers=(3, 4, 6, 3), channels=(64, 128, 256, 512), stem_width=64)
