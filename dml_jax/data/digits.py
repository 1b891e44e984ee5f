"""The embedded demo dataset: scikit-learn's 1,797 handwritten digits as a CUB-style folder tree.

`ensure_digits_tree(root)` writes `<root>/digits/images/<NNN.digit_K>/digit_K_<i>.png` once (32x32
grayscale PNGs upscaled from the 8x8 originals, no download); the `digits` dataset reads it with the
cub200 reader's rule: the first half of the classes (digits 0-4) train, the rest (5-9) test.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from dml_jax.errors import UserFileExistsError

DIR_NAME = "digits"
_DONE_MARKER = "COMPLETE"
_NUM_IMAGES = 1797


def default_root() -> str:
  """~/.cache/dml_jax (or $DML_JAX_CACHE_DIR, or $XDG_CACHE_HOME/dml_jax)."""
  if os.environ.get("DML_JAX_CACHE_DIR"):
    return os.environ["DML_JAX_CACHE_DIR"]
  return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dml_jax")


def ensure_digits_tree(root: str | None = None, *, image_size: int = 32) -> str:
  """Writes the digits tree under `root` unless it is already complete; returns `<root>/digits`.

  Written into a temporary sibling folder and renamed, so an interrupted run never leaves a partial
  tree that later reads would accept.
  """
  from sklearn.datasets import load_digits  # bundled with scikit-learn, never downloaded

  root = os.path.abspath(os.path.expanduser(root or default_root()))
  target = os.path.join(root, DIR_NAME)
  if os.path.isfile(os.path.join(target, _DONE_MARKER)):
    return target
  if os.path.exists(target):
    raise UserFileExistsError(f"{target} exists but is not a complete digits tree (no {_DONE_MARKER} file)",
                              "remove it to have it written again")
  os.makedirs(root, exist_ok=True)
  digits = load_digits()
  tmp = tempfile.mkdtemp(prefix=".digits-", dir=root)
  try:
    images_dir = os.path.join(tmp, "images")
    counts = np.zeros(10, np.int64)
    for image, digit in zip(digits.images, digits.target):
      folder = os.path.join(images_dir, f"{digit + 1:03d}.digit_{digit}")
      if counts[digit] == 0:
        os.makedirs(folder)
      # 8x8 values 0..16 -> 0..255 grayscale, bilinear upscaling; grayscale exercises the RGB conversion.
      pixels = np.clip(np.round(image * (255.0 / 16.0)), 0, 255).astype(np.uint8)
      big = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.BILINEAR)
      big.save(os.path.join(folder, f"digit_{digit}_{counts[digit]:04d}.png"), compress_level=1)
      counts[digit] += 1
    with open(os.path.join(tmp, _DONE_MARKER), "w") as f:
      f.write(f"{int(counts.sum())} images from sklearn.datasets.load_digits, {image_size}x{image_size}\n")
    try:
      os.replace(tmp, target)
    except OSError:
      # Another process finished first: keep its tree.
      if not os.path.isfile(os.path.join(target, _DONE_MARKER)):
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return target
