"""How images must be prepared for a set of weights (timm's `pretrained_cfg`): shared by backbones and data."""

from __future__ import annotations

import dataclasses
from typing import Any

_COLOR_ORDERS = ("RGB", "BGR")
_INTERPOLATIONS = ("bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class PretrainedCfg:
  """How images must be prepared for one set of weights.

  A pixel in [0, 1] RGB becomes `(reorder(pixel) * pixel_scale - mean) / std`, where `reorder` swaps to
  BGR when `color_order == 'BGR'`. timm models use pixel_scale 1; pretrainedmodels' BN-Inception was
  trained on BGR in [0, 255] with mean (104, 117, 128) and std 1.
  """

  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  input_size: int = 224
  crop_pct: float = 0.875
  interpolation: str = "bicubic"
  color_order: str = "RGB"
  pixel_scale: float = 1.0

  def __post_init__(self):
    if self.color_order not in _COLOR_ORDERS:
      raise ValueError(f"color_order must be one of {_COLOR_ORDERS}, got {self.color_order!r}")
    if self.interpolation not in _INTERPOLATIONS:
      raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}")
    if len(self.mean) != 3 or len(self.std) != 3:
      raise ValueError(f"mean and std need 3 channels, got {self.mean!r} / {self.std!r}")

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> PretrainedCfg:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown pretrained_cfg keys {unknown}; expected a subset of {sorted(known)}")
    d = dict(d)
    d["mean"] = tuple(d["mean"])
    d["std"] = tuple(d["std"])
    return cls(**d)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
