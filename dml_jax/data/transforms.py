"""Image transforms of the seeds, in numpy/PIL, deterministic given a numpy Generator.

train: RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3), bilinear) + horizontal flip (p=0.5),
       torchvision's sampling (10 attempts, then a central crop at the clamped aspect ratio).
eval:  Resize(resize_size) of the shorter side (bilinear) + CenterCrop(size), torchvision's rounding.
Both return uint8 [S, S, 3]; `Normalizer` maps uint8 batches to the backbone's float32 input.

Fast decoding: a JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale whenever the crop (train) or
the resized image (eval) still has at least the output size there. This changes pixels slightly
against a full decode + PIL antialiased resize, so eval turns it off by default (pixel parity with
torchvision); train turns it on (the crop randomness dwarfs the difference).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from dml_jax.preprocessing import PretrainedCfg
from dml_jax.data import decode

_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def _resample(interpolation: str) -> int:
  if interpolation not in _INTERPOLATION:
    raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}")
  return _INTERPOLATION[interpolation]


def random_resized_crop_params(rng: np.random.Generator, width: int, height: int,
                               scale: tuple[float, float] = (0.08, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision RandomResizedCrop.get_params: returns (top, left, crop_height, crop_width).

  Up to 10 draws of an area fraction ~ U(scale) and a log-uniform aspect ratio; the first box that
  fits is placed uniformly. Otherwise the whole image, cropped centrally to the nearest allowed ratio.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def train_transform(img: Image.Image, rng: np.random.Generator, *, size: int = 224,
                    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    flip: bool = True, interpolation: str = "bilinear", fast_decode: bool = True,
                    ref: str = "<image>") -> np.ndarray:
  """RandomResizedCrop + RandomHorizontalFlip on a lazily opened image -> uint8 [size, size, 3].

  The crop box is drawn on the full-resolution size (read from the header), then the JPEG is drafted
  so that the box keeps at least `size` pixels per side.
  """
  width, height = img.size
  top, left, h, w = random_resized_crop_params(rng, width, height, scale, ratio)
  do_flip = flip and rng.random() < 0.5
  factor = 1.0
  if fast_decode:
    factor = decode.draft_jpeg(img, (math.ceil(width * size / w), math.ceil(height * size / h)))
  rgb = decode.to_rgb(img, ref)
  resample = _resample(interpolation)
  if factor == 1.0:
    # crop then resize, as torchvision's resized_crop on PIL images (the resize sees only the crop).
    out = rgb.crop((left, top, left + w, top + h)).resize((size, size), resample)
  else:
    box = (left / factor, top / factor, (left + w) / factor, (top + h) / factor)
    out = rgb.resize((size, size), resample, box=box)
  if do_flip:
    out = out.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(out)


def resized_shape(width: int, height: int, shorter: int) -> tuple[int, int]:
  """torchvision Resize(int): the shorter side becomes `shorter`, the longer int(shorter * long / short)."""
  if width <= height:
    return shorter, int(shorter * height / width)
  return int(shorter * width / height), shorter


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
  """torchvision CenterCrop: offsets int(round((H - S) / 2)); zero padding when the image is smaller."""
  h, w = arr.shape[:2]
  if h < size or w < size:
    # torchvision pads (S - w) // 2 on the left/top and the rest on the right/bottom, then crops.
    pad_t, pad_l = max(size - h, 0) // 2, max(size - w, 0) // 2
    padded = np.zeros((max(h, size), max(w, size), 3), arr.dtype)
    padded[pad_t:pad_t + h, pad_l:pad_l + w] = arr
    arr, (h, w) = padded, padded.shape[:2]
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return arr[top:top + size, left:left + size]


def eval_transform(img: Image.Image, *, size: int = 224, resize_size: int = 256, interpolation: str = "bilinear",
                   fast_decode: bool = False, ref: str = "<image>") -> np.ndarray:
  """Resize(resize_size) + CenterCrop(size) on a lazily opened image -> uint8 [size, size, 3]."""
  new_w, new_h = resized_shape(*img.size, resize_size)
  if fast_decode:
    decode.draft_jpeg(img, (new_w, new_h))
  rgb = decode.to_rgb(img, ref)
  if rgb.size != (new_w, new_h):  # torchvision returns the image unchanged when it has the size already
    rgb = rgb.resize((new_w, new_h), _resample(interpolation))
  return center_crop(np.asarray(rgb), size)


class Normalizer:
  """uint8 RGB [..., 3] -> float32 backbone input, from a PretrainedCfg.

  x = (reorder(pixel / 255) * pixel_scale - mean) / std, where reorder swaps to BGR for color_order
  'BGR' (BN-Inception: BGR x 255 minus (104, 117, 128), std 1), mean and std in that channel order.
  """

  def __init__(self, cfg: PretrainedCfg):
    self.bgr = cfg.color_order == "BGR"
    std = np.asarray(cfg.std, np.float32)
    self._scale = (np.float32(cfg.pixel_scale) / np.float32(255.0) / std).astype(np.float32)
    self._offset = (np.asarray(cfg.mean, np.float32) / std).astype(np.float32)

  def __call__(self, pixels: np.ndarray) -> np.ndarray:
    if self.bgr:
      pixels = pixels[..., ::-1]
    out = np.empty(pixels.shape, np.float32)
    np.multiply(pixels, self._scale, out=out)  # one pass uint8 -> float32, no intermediate copy
    out -= self._offset
    return out
