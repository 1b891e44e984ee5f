"""Transforms against torchvision: RandomResizedCrop sampling, Resize + CenterCrop pixels, normalisation.

torchvision's results come from tests/references (`ref` fixture, tests/reference.py).
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from dml_jax.data import decode, synthetic, transforms
from dml_jax.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PretrainedCfg


def _pil(size, fmt="JPEG", mode="RGB", seed=0):
  return Image.open(io.BytesIO(synthetic.image_bytes(seed, size, fmt, mode)))


def _pixels(image) -> dict[str, np.ndarray]:
  """An image as a reference keeps it: shape and SHA-256 of its uint8 pixels (exact equality, few bytes)."""
  array = np.ascontiguousarray(np.asarray(image, np.uint8))
  return {"shape": np.asarray(array.shape), "sha256": np.asarray(hashlib.sha256(array.tobytes()).hexdigest())}


def _box_stats(boxes, width, height):
  boxes = np.asarray(boxes, np.float64)
  top, left, h, w = boxes.T
  return np.array([np.mean(h * w / (width * height)), np.mean(np.log(w / h)), np.mean(top / height),
                   np.mean(left / width), np.std(h * w / (width * height))])


def _torchvision_fallback(width, height):
  """(live) torchvision's box when no sampled box fits: an area fraction above 1 never does."""
  from torchvision import transforms as T

  return T.RandomResizedCrop.get_params(Image.new("RGB", (width, height)), scale=[2.0, 3.0], ratio=[3 / 4, 4 / 3])


@pytest.mark.parametrize("width,height", [(500, 375), (400, 40), (60, 300)])
def test_random_resized_crop_distribution_matches_torchvision(ref, width, height):
  n = 4000
  rng = np.random.default_rng(0)
  ours = [transforms.random_resized_crop_params(rng, width, height) for _ in range(n)]

  def compute():
    import torch
    from torchvision import transforms as T

    torch.manual_seed(0)
    img = Image.new("RGB", (width, height))
    boxes = [T.RandomResizedCrop.get_params(img, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3]) for _ in range(n)]
    fallback = _torchvision_fallback(width, height)
    return {"box_stats": _box_stats(boxes, width, height), "fallback": np.asarray(fallback),
            "fallback_share": np.mean([tuple(b) == tuple(fallback) for b in boxes])}

  expected = ref(f"data_transforms/random_resized_crop_{width}x{height}", compute)
  np.testing.assert_allclose(_box_stats(ours, width, height), expected["box_stats"], atol=0.025)
  # Thin images often exhaust the 10 attempts: the central fallback box must be as frequent.
  share = np.mean([tuple(b) == tuple(expected["fallback"].tolist()) for b in ours])
  assert abs(share - float(expected["fallback_share"])) < 0.02
  assert all(0 < h <= height and 0 < w <= width and t + h <= height and left + w <= width for t, left, h, w in ours)


FALLBACK_SIZES = [(500, 375), (400, 40), (60, 300), (100, 100)]


@pytest.mark.parametrize("width,height", FALLBACK_SIZES)
def test_random_resized_crop_fallback_exact(ref, width, height):
  expected = ref("data_transforms/random_resized_crop_fallback",
                 lambda: {f"{w}x{h}": np.asarray(_torchvision_fallback(w, h)) for w, h in FALLBACK_SIZES})
  # An area fraction above 1 never fits, so both end in the central fallback.
  got = transforms.random_resized_crop_params(np.random.default_rng(1), width, height, scale=(2.0, 3.0))
  assert tuple(got) == tuple(expected[f"{width}x{height}"].tolist())


# The last three sizes make the rounding visible: 199 x 300 resized to 256 gives a long side of 385.93, which
# torchvision floors (int); 227 x 229 at resize 227 is left as it is and cropped to 224 at offsets 3 / 2 and
# 5 / 2, which torchvision rounds half to even (2 and 2); 300 x 227 crops at 38.0 and 1.5 (1.5 rounds to 2).
@pytest.mark.parametrize("size,resize,crop", [((300, 200), 256, 224), ((200, 301), 256, 224), ((256, 256), 256, 224),
                                              ((90, 70), 256, 224), ((36, 50), 36, 32), ((50, 40), 32, 36),
                                              ((199, 300), 256, 224), ((227, 229), 227, 224), ((300, 227), 227, 224)])
def test_eval_transform_matches_torchvision(ref, size, resize, crop):
  def compute():
    from torchvision import transforms as T

    return _pixels(T.Compose([T.Resize(resize), T.CenterCrop(crop)])(_pil(size)))

  expected = ref(f"data_transforms/eval_{size[0]}x{size[1]}_resize{resize}_crop{crop}", compute)
  got = transforms.eval_transform(_pil(size), size=crop, resize_size=resize, fast_decode=False)
  assert got.shape == (crop, crop, 3) and got.dtype == np.uint8
  ours = _pixels(got)
  assert tuple(ours["shape"]) == tuple(expected["shape"])
  assert str(ours["sha256"]) == str(expected["sha256"]), "pixels differ from torchvision's Resize + CenterCrop"


def test_resize_floors_and_center_crop_rounds_half_to_even():
  # torchvision's formulas (transforms.functional._compute_resized_output_size: int(size * long / short);
  # center_crop: int(round((H - S) / 2.0)), Python's round) at sizes where floor, round and round-half-up differ.
  assert transforms.resized_shape(199, 300, 256) == (256, 385)  # 385.93: floored, not rounded to 386
  assert transforms.resized_shape(300, 199, 256) == (385, 256)
  assert transforms.resized_shape(203, 301, 224) == (224, 332)  # 332.14
  rows, cols = np.meshgrid(np.arange(229), np.arange(227), indexing="ij")
  grid = np.stack([rows, cols, np.zeros_like(rows)], axis=-1)  # each pixel holds its own (row, col)
  for (height, width), (top, left) in {(229, 227): (2, 2),  # 2.5 -> 2 (half to even), 1.5 -> 2 (not floored)
                                       (227, 229): (2, 2), (227, 227): (2, 2), (225, 228): (0, 2),
                                       (226, 229): (1, 2)}.items():  # 0.5 -> 0, 2.0, 1.0, 2.5 -> 2
    crop = transforms.center_crop(grid[:height, :width], 224)
    assert crop.shape == (224, 224, 3)
    assert (int(crop[0, 0, 0]), int(crop[0, 0, 1])) == (top, left), (height, width)


@pytest.mark.parametrize("seed", range(6))
def test_train_transform_matches_torchvision_resized_crop(ref, seed):
  rng = np.random.default_rng(seed)
  top, left, h, w = transforms.random_resized_crop_params(rng, 120, 90)
  flip = rng.random() < 0.5

  def compute():
    from torchvision import transforms as T
    from torchvision.transforms import functional as TF

    expected = TF.resized_crop(_pil((120, 90), seed=seed), top, left, h, w, [32, 32], T.InterpolationMode.BILINEAR)
    return {"pixels": np.asarray(TF.hflip(expected) if flip else expected)}

  expected = ref(f"data_transforms/train_resized_crop_seed{seed}", compute)["pixels"]
  got = transforms.train_transform(_pil((120, 90), seed=seed), np.random.default_rng(seed), size=32,
                                   fast_decode=False)
  np.testing.assert_array_equal(got, expected)


def test_fast_decode_drafts_and_stays_close():
  big = synthetic.image_bytes(3, (800, 600))
  img = Image.open(io.BytesIO(big))
  assert decode.draft_jpeg(img, (100, 75)) == 8.0 and img.size == (100, 75)
  # Eval: the shorter side 600 -> 64 allows 1/8 decoding; pixels stay near the full decode.
  full = transforms.eval_transform(Image.open(io.BytesIO(big)), size=56, resize_size=64, fast_decode=False)
  fast = transforms.eval_transform(Image.open(io.BytesIO(big)), size=56, resize_size=64, fast_decode=True)
  assert np.abs(full.astype(int) - fast.astype(int)).mean() < 3.0
  for seed in range(4):
    full = transforms.train_transform(Image.open(io.BytesIO(big)), np.random.default_rng(seed), size=48,
                                      fast_decode=False)
    fast = transforms.train_transform(Image.open(io.BytesIO(big)), np.random.default_rng(seed), size=48,
                                      fast_decode=True)
    assert np.abs(full.astype(int) - fast.astype(int)).mean() < 3.0


@pytest.mark.parametrize("fmt,mode", [("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "P"), ("PNG", "RGBA"), ("PNG", "LA"),
                                      ("PNG", "L"), ("PNG", "RGB")])
def test_modes_become_rgb(fmt, mode):
  data = synthetic.image_bytes(1, (20, 16), fmt, mode)
  arr = decode.load_rgb_array(data, "mem")
  assert arr.shape == (16, 20, 3) and arr.dtype == np.uint8
  np.testing.assert_array_equal(arr, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
  out = transforms.train_transform(Image.open(io.BytesIO(data)), np.random.default_rng(0), size=8)
  assert out.shape == (8, 8, 3)


def test_corrupt_image_names_its_path(tmp_path):
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(synthetic.image_bytes(0, (64, 64))[:200])
  with pytest.raises(decode.CorruptImageError, match="broken.jpg"):
    decode.load_rgb_array(str(bad), str(bad))
  assert decode.check_decodable(str(bad), str(bad)) is not None


def test_normalizer_rgb_matches_torchvision(ref):
  pixels = np.asarray(_pil((8, 6)))
  cfg = PretrainedCfg(mean=IMAGENET_MEAN, std=IMAGENET_STD)

  def compute():
    from torchvision import transforms as T

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    return {"normalized": normalize(T.ToTensor()(Image.fromarray(pixels))).permute(1, 2, 0).numpy()}

  expected = ref("data_transforms/normalize_rgb", compute)["normalized"]
  got = transforms.Normalizer(cfg)(pixels)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_normalizer_bgr_x255_for_bn_inception():
  pixels = np.asarray(_pil((8, 6)))
  cfg = PretrainedCfg(mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0), color_order="BGR", pixel_scale=255.0)
  expected = pixels[..., ::-1].astype(np.float64) - np.array([104.0, 117.0, 128.0])
  np.testing.assert_allclose(transforms.Normalizer(cfg)(pixels), expected, atol=1e-4)
  batch = np.stack([pixels, pixels[::-1]])
  np.testing.assert_allclose(transforms.Normalizer(cfg)(batch)[0], expected, atol=1e-4)


def _torchvision_autoaugment(img, policy, probs, signs):
  """(live) torchvision's AutoAugment (ImageNet policy, nearest, no fill) with its random choices given."""
  import torch
  from torchvision import transforms as T

  aa = T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)
  aa.get_params = lambda num: (policy, torch.tensor(probs, dtype=torch.float32), torch.tensor(signs))
  return aa(img)


def _aa_image():
  return Image.open(io.BytesIO(synthetic.image_bytes(5, (41, 30)))).convert("RGB")


@pytest.mark.parametrize("signs", [(0, 0), (1, 1), (0, 1)])
def test_autoaugment_equals_torchvision_for_every_sub_policy(ref, signs):
  # Probabilities 0 apply both steps of every sub-policy (the first step of sub-policy 12 has p = 0); the
  # signs flip the signed magnitudes (rotate, shear, colour, contrast, sharpness).
  policies = range(len(transforms.AUTOAUGMENT_IMAGENET_POLICY))

  def compute():
    out = {}
    for policy in policies:
      pixels = _pixels(_torchvision_autoaugment(_aa_image(), policy, [0.0, 0.0], list(signs)))
      out.update({f"{policy}/{k}": v for k, v in pixels.items()})
    return out

  expected = ref(f"data_transforms/autoaugment_signs_{signs[0]}{signs[1]}", compute)
  for policy in policies:
    ours = _pixels(transforms.autoaugment(_aa_image(), policy, np.zeros(2), np.asarray(signs)))
    assert str(ours["sha256"]) == str(expected[f"{policy}/sha256"]), f"sub-policy {policy}, signs {signs}"


AA_SKIPS = [(0, (0.5, 0.1)), (14, (0.7, 0.99)), (18, (0.61, 0.2)), (2, (0.9, 0.9))]


def test_autoaugment_skips_steps_above_their_probability(ref):
  img = lambda: Image.open(io.BytesIO(synthetic.image_bytes(6, (33, 27)))).convert("RGB")  # noqa: E731

  def compute():
    return {f"{policy}/sha256": _pixels(_torchvision_autoaugment(img(), policy, list(probs), [1, 0]))["sha256"]
            for policy, probs in AA_SKIPS}

  expected = ref("data_transforms/autoaugment_skips", compute)
  for policy, probs in AA_SKIPS:
    ours = _pixels(transforms.autoaugment(img(), policy, np.asarray(probs), np.asarray([1, 0])))
    assert str(ours["sha256"]) == str(expected[f"{policy}/sha256"]), f"sub-policy {policy}"
  assert np.array_equal(np.asarray(transforms.autoaugment(img(), 2, np.asarray([0.9, 0.9]), [1, 1])),
                        np.asarray(img()))


@pytest.mark.parametrize("seed", range(4))
def test_autoaugment_then_crop_draws_in_torchvision_order(ref, seed):
  # Compose([AutoAugment(), RandomResizedCrop(32), RandomHorizontalFlip()]): AutoAugment's choices come first
  # from the image's Generator, then the crop box, then the flip.
  rng = np.random.default_rng(seed)
  policy, probs, signs = transforms.autoaugment_params(rng)
  top, left, h, w = transforms.random_resized_crop_params(rng, 60, 45)
  flip = rng.random() < 0.5

  def compute():
    from torchvision import transforms as T
    from torchvision.transforms import functional as TF

    augmented = _torchvision_autoaugment(_pil((60, 45), seed=seed).convert("RGB"), policy, probs.tolist(),
                                         signs.tolist())
    expected = TF.resized_crop(augmented, top, left, h, w, [32, 32], T.InterpolationMode.BILINEAR)
    return _pixels(TF.hflip(expected) if flip else expected)

  expected = ref(f"data_transforms/autoaugment_then_crop_seed{seed}", compute)
  got = transforms.train_transform(_pil((60, 45), seed=seed), np.random.default_rng(seed), size=32,
                                   autoaugment_first=True)
  assert str(_pixels(got)["sha256"]) == str(expected["sha256"])
