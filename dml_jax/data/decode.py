"""Opening stored images with PIL: lazy open, JPEG draft decoding, conversion to RGB.

Every image a reader yields goes through here, so grayscale, CMYK, palette, RGBA and PNG images all
come out as RGB, as the seeds' `PIL.Image.open(path).convert('RGB')` does.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from dml_jax.data.errors import CorruptImageError

# A path on disk, or the encoded bytes of one image (prepared shards, tfds records).
ImageSource = str | os.PathLike | bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_image_file(name: str) -> bool:
  # '._*' files are macOS AppleDouble metadata that tar archives of CUB carry; the seeds skip them.
  return not name.startswith("._") and name.lower().endswith(IMAGE_EXTENSIONS)


def open_image(source: ImageSource, ref: str) -> Image.Image:
  """Opens an image lazily (header only); pixels are decoded on the first access.

  Raises CorruptImageError naming `ref` when the header cannot be parsed.
  """
  try:
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
  except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError ...
    raise CorruptImageError(ref, e) from e


def draft_jpeg(img: Image.Image, min_size: tuple[int, int]) -> float:
  """Lets libjpeg decode at 1/2, 1/4 or 1/8 scale while keeping the image at least `min_size` (w, h).

  Returns the factor that divides original coordinates (1.0 when nothing changed). Only JPEGs can
  be drafted; other formats return 1.0.
  """
  if img.format != "JPEG":
    return 1.0
  width = img.size[0]
  result = img.draft("RGB", (max(1, int(min_size[0])), max(1, int(min_size[1]))))
  if result is None:
    return 1.0
  return width / result[1][2]


def to_rgb(img: Image.Image, ref: str) -> Image.Image:
  """Decodes the pixels and converts any mode (L, P, CMYK, RGBA, I;16 ...) to RGB."""
  try:
    if img.mode != "RGB":
      return img.convert("RGB")
    img.load()
    return img
  except Exception as e:
    raise CorruptImageError(ref, e) from e


def load_rgb_array(source: ImageSource, ref: str) -> np.ndarray:
  """Full-size decode: uint8 [H, W, 3]."""
  with open_image(source, ref) as img:
    return np.asarray(to_rgb(img, ref))


def check_decodable(source: ImageSource, ref: str) -> str | None:
  """Decodes an image cheaply (JPEG at 1/8 scale) and returns the error text, or None if readable.

  libjpeg still reads every entropy-coded byte at 1/8 scale, so truncated files are caught.
  """
  try:
    with open_image(source, ref) as img:
      draft_jpeg(img, (1, 1))
      to_rgb(img, ref)
    return None
  except CorruptImageError as e:
    return str(e.__cause__ or e)
