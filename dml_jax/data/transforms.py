"""Image transforms of the seeds, in numpy/PIL, deterministic given a numpy Generator.

train: RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3), bilinear) + horizontal flip (p=0.5),
       torchvision's sampling (10 attempts, then a central crop at the clamped aspect ratio);
       optionally AutoAugment (ImageNet policy, as torchvision applies it to PIL images) on the full
       image first (DADA's Cars196 recipe: AutoAugment -> RandomResizedCrop -> flip).
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
from PIL import Image, ImageEnhance, ImageOps

from dml_jax.data import decode
from dml_jax.preprocessing import PretrainedCfg

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


# AutoAugment's ImageNet policy (Cubuk et al., CVPR 2019) in torchvision's listing: 25 sub-policies of two
# steps (operation, probability, magnitude bin of 10; None for operations without a magnitude).
AUTOAUGMENT_IMAGENET_POLICY = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)
_MAGNITUDE_BINS = 10


def _linspace_float32(start: float, end: float, steps: int) -> list[float]:
  """torch.linspace in float32 (forward from the start for the first half, back from the end after), so
  that the magnitudes are the very float32 values torchvision uses (plain rounding differs by an ulp)."""
  start32, end32 = np.float32(start), np.float32(end)
  step = (end32 - start32) / np.float32(steps - 1)
  return [float(start32 + step * np.float32(i)) if i < steps // 2 else float(end32 - step * np.float32(steps - 1 - i))
          for i in range(steps)]


# operation -> (magnitude of each bin, whether a random sign applies)
_AUTOAUGMENT_MAGNITUDES = {
    "ShearX": (_linspace_float32(0.0, 0.3, _MAGNITUDE_BINS), True),
    "Rotate": (_linspace_float32(0.0, 30.0, _MAGNITUDE_BINS), True),
    "Color": (_linspace_float32(0.0, 0.9, _MAGNITUDE_BINS), True),
    "Contrast": (_linspace_float32(0.0, 0.9, _MAGNITUDE_BINS), True),
    "Sharpness": (_linspace_float32(0.0, 0.9, _MAGNITUDE_BINS), True),
    "Posterize": ([8 - int(round(i / ((_MAGNITUDE_BINS - 1) / 4))) for i in range(_MAGNITUDE_BINS)], False),
    "Solarize": (_linspace_float32(255.0, 0.0, _MAGNITUDE_BINS), False),
}


def _autoaugment_op(img: Image.Image, op: str, magnitude: float) -> Image.Image:
  """One AutoAugment operation on an RGB PIL image; geometric ones use nearest neighbours and fill black."""
  fill = (0,) * len(img.getbands())
  if op == "ShearX":
    # A shear of angle atan(magnitude) about the top-left corner; the angle round trip through degrees
    # reproduces torchvision's affine matrix to the last bit.
    shear = math.tan(math.radians(math.degrees(math.atan(magnitude))))
    return img.transform(img.size, Image.AFFINE, (1.0, shear, 0.0, 0.0, 1.0, 0.0), Image.NEAREST, fillcolor=fill)
  if op == "Rotate":
    return img.rotate(magnitude, Image.NEAREST, expand=False, fillcolor=fill)
  if op == "Color":
    return ImageEnhance.Color(img).enhance(1.0 + magnitude)
  if op == "Contrast":
    return ImageEnhance.Contrast(img).enhance(1.0 + magnitude)
  if op == "Sharpness":
    return ImageEnhance.Sharpness(img).enhance(1.0 + magnitude)
  if op == "Posterize":
    return ImageOps.posterize(img, int(magnitude))
  if op == "Solarize":
    return ImageOps.solarize(img, magnitude)
  if op == "AutoContrast":
    return ImageOps.autocontrast(img)
  if op == "Equalize":
    return ImageOps.equalize(img)
  if op == "Invert":
    return ImageOps.invert(img)
  raise ValueError(f"unknown AutoAugment operation {op!r}")


def autoaugment_params(rng: np.random.Generator) -> tuple[int, np.ndarray, np.ndarray]:
  """torchvision AutoAugment.get_params' draws: (sub-policy index, probabilities float [2], signs int [2])."""
  policy = int(rng.integers(len(AUTOAUGMENT_IMAGENET_POLICY)))
  return policy, rng.random(2), rng.integers(0, 2, size=2)


def autoaugment(img: Image.Image, policy: int, probs, signs) -> Image.Image:
  """Sub-policy `policy` of the ImageNet policy: step i applies when probs[i] <= its probability, with the
  bin's magnitude negated when the operation is signed and signs[i] == 0 (torchvision's rule)."""
  for i, (op, probability, bin_index) in enumerate(AUTOAUGMENT_IMAGENET_POLICY[policy]):
    if probs[i] <= probability:
      magnitude = 0.0
      if bin_index is not None:
        values, signed = _AUTOAUGMENT_MAGNITUDES[op]
        magnitude = values[bin_index]
        if signed and signs[i] == 0:
          magnitude = -magnitude
      img = _autoaugment_op(img, op, magnitude)
  return img


def train_transform(img: Image.Image, rng: np.random.Generator, *, size: int = 224,
                    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    flip: bool = True, interpolation: str = "bilinear", fast_decode: bool = True,
                    autoaugment_first: bool = False, ref: str = "<image>") -> np.ndarray:
  """[AutoAugment] + RandomResizedCrop + RandomHorizontalFlip on a lazily opened image -> uint8 [size, size, 3].

  The crop box is drawn on the full-resolution size (read from the header), then the JPEG is drafted
  so that the box keeps at least `size` pixels per side. With `autoaugment_first` (ImageNet policy, drawn
  before the crop, as torchvision's Compose([AutoAugment(), RandomResizedCrop, flip]) draws), the whole
  image is decoded: AutoAugment's histogram operations see every pixel.
  """
  if autoaugment_first:
    augmented = autoaugment(decode.to_rgb(img, ref), *autoaugment_params(rng))
    return train_transform(augmented, rng, size=size, scale=scale, ratio=ratio, flip=flip,
                           interpolation=interpolation, fast_decode=False, ref=ref)
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
