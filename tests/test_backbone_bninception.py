"""BN-Inception (dml_jax.backbones.bninception) against pretrainedmodels, through dml_jax.convert.bninception.

pretrainedmodels' outputs come from tests/references (`ref` fixture); the weights are seeded numpy
(tests/seeded.py) in the layout of `pretrainedmodels.bninception()` (a layout reference), with BatchNorm
statistics calibrated by the torch model. The 224-pixel comparison is live only (`parity`, `slow`): its
feature maps would make large reference files; the 96-pixel train-mode test runs the same net by default.
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import live
import numpy as np
import pytest
from cnn_parity import (
  calibrated_state_dict,
  flat_state,
  forward_features,
  forward_pooled,
  load_abstract,
  running_stats,
  torch_stat_key,
)
from flax import nnx
from safetensors.numpy import save_file
from seeded import cnn_state_dict

from dml_jax.backbones import get_entry
from dml_jax.backbones.batchnorm import BatchNorm, batch_stats_frozen, set_batch_stats_frozen
from dml_jax.backbones.bninception import BNInception, max_pool_ceil
from dml_jax.convert import StateDictReader, WeightsMismatchError, strict_update
from dml_jax.convert.bninception import from_torch

ATOL = 1e-4


def _images(shape, seed):
  # Roughly the scale of BGR [0, 255] pixels minus (104, 117, 128).
  return 50.0 * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _convert(state_dict, source="test state dict"):
  reader = StateDictReader(state_dict, source)
  flat = from_torch(reader, {})
  reader.finish()
  return flat, reader


def _flax_model(flat, **arch):
  return load_abstract(lambda: BNInception(**arch, use_running_average=True, rngs=nnx.Rngs(0)), flat)


def _torch_bninception():
  import pretrainedmodels

  return pretrainedmodels.bninception(num_classes=1000, pretrained=None)


def _layout(ref) -> dict[str, np.ndarray]:
  return ref("bninception/layout", lambda: live.layout(_torch_bninception()))


def _calibrated(ref, seed: int, calibration_size: int) -> dict[str, np.ndarray]:
  return calibrated_state_dict(ref, f"bninception/seed{seed}_bn_stats_{calibration_size}px", _torch_bninception,
                               _layout(ref), seed, _images((2, calibration_size, calibration_size, 3), seed + 1),
                               forward="features")


def _cadene_form(state_dict):
  """As bn_inception-52deb4733.pth stores it: BN tensors [1, C], no num_batches_tracked."""
  return {k: (v[None] if "_bn." in k else v) for k, v in state_dict.items() if "num_batches_tracked" not in k}


@pytest.fixture(scope="module")
def pair_224():
  reference = _torch_bninception()
  state_dict = cnn_state_dict(live.layout(reference), seed=0)
  live.load(reference, state_dict)
  state_dict.update(live.calibrated_batchnorm_stats(reference, _images((2, 224, 224, 3), 1), seed=2,
                                                    forward=reference.features))
  live.load(reference, state_dict)
  flat, _ = _convert(state_dict)
  return reference, flat, _flax_model(flat)


def _pooled_224(reference, x):
  import torch

  with torch.no_grad():
    return reference.global_pool(reference.features(live.nchw(x))).flatten(1).numpy()


@pytest.mark.parity
@pytest.mark.slow
def test_bninception_matches_pretrainedmodels_at_224(pair_224):
  import torch

  reference, _, model = pair_224
  x = _images((2, 224, 224, 3), 3)
  with torch.no_grad():
    fmap_ref = reference.features(live.nchw(x))
    pooled_ref = reference.global_pool(fmap_ref).flatten(1).numpy()
  fmap_ref = live.nhwc(fmap_ref)
  fmap = np.asarray(forward_features(model, jnp.asarray(x)))
  pooled = fmap.mean(axis=(1, 2))  # one compile of the net here; the train-mode test runs `__call__`
  assert fmap.shape == (2, 7, 7, 1024)
  assert np.abs(pooled - pooled_ref).max() < ATOL
  # fp32 rounding grows through 30 conv-BN layers: bound the map relative to its scale, and check that
  # both fp32 forwards sit equally close to a float64 torch forward.
  assert np.abs(fmap - fmap_ref).max() < ATOL * max(1.0, np.abs(fmap_ref).max())
  with torch.no_grad():
    fmap64 = live.nhwc(copy.deepcopy(reference).double().features(live.nchw(x).double()))
  assert np.abs(fmap - fmap64).max() <= 2 * np.abs(fmap_ref - fmap64).max() + 1e-6


@pytest.mark.parity
@pytest.mark.slow
def test_swapped_parameters_would_be_caught(pair_224):
  reference, flat, model = pair_224
  x = _images((2, 224, 224, 3), 4)
  pooled_ref = _pooled_224(reference, x)
  try:
    for a, b in (("_bn/scale", "_bn/bias"), ("/bias", "_bn/bias")):  # BN affine; conv bias vs BN bias
      swapped = dict(flat)
      for key in flat:
        if key.endswith(a) and key[: -len(a)] + b in flat:
          stem = key[: -len(a)]
          swapped[stem + a], swapped[stem + b] = flat[stem + b], flat[stem + a]
      assert swapped.keys() == flat.keys()
      strict_update(model, swapped, f"swapped {a} / {b}")  # same structure: reuses the compiled forward
      error = np.abs(np.asarray(forward_features(model, jnp.asarray(x))).mean(axis=(1, 2)) - pooled_ref).max()
      assert error > 100 * ATOL, f"swapping {a} and {b} went unnoticed"
  finally:
    strict_update(model, flat, "test state dict")


POOL_CASES = [(112, 3, 2, 0), (55, 3, 2, 0), (7, 3, 1, 1), (6, 3, 2, 1), (14, 3, 2, 0), (3, 3, 2, 0), (5, 3, 3, 1)]


def _pool_input(size):
  return np.random.default_rng(size).standard_normal((2, size, size + 1, 4)).astype(np.float32)


@pytest.mark.parametrize("size,window,stride,padding", POOL_CASES)
def test_max_pool_ceil_matches_torch(ref, size, window, stride, padding):
  def compute():
    import torch

    return {"_".join(map(str, case)): live.nhwc(torch.nn.MaxPool2d(case[1], stride=case[2], padding=case[3],
                                                                     ceil_mode=True)(live.nchw(_pool_input(case[0]))))
            for case in POOL_CASES}

  expected = ref("bninception/max_pool_ceil", compute)[f"{size}_{window}_{stride}_{padding}"]
  got = np.asarray(max_pool_ceil(jnp.asarray(_pool_input(size)), window, stride, padding))
  assert got.shape == expected.shape
  np.testing.assert_array_equal(got, expected)


def test_cadene_checkpoint_forms_convert_alike(ref):
  state_dict = cnn_state_dict(_layout(ref), seed=10)
  flat, reader = _convert(state_dict)
  assert sorted(reader.dropped) == sorted(["last_linear.weight", "last_linear.bias"] +
                                          [k for k in state_dict if k.endswith("num_batches_tracked")])
  cadene = _cadene_form(state_dict)
  assert cadene["conv1_7x7_s2_bn.running_var"].shape == (1, 64)
  flat_cadene, _ = _convert(cadene, "bn_inception-52deb4733.pth")
  assert flat_cadene.keys() == flat.keys()
  assert all(np.array_equal(flat_cadene[k], flat[k]) for k in flat)
  assert flat["conv1_7x7_s2/kernel"].shape == (7, 7, 3, 64)
  np.testing.assert_array_equal(flat["conv1_7x7_s2/kernel"][2, 5, 1],
                                state_dict["conv1_7x7_s2.weight"][:, 1, 2, 5])
  broken = dict(cadene)
  del broken["inception_4e_double_3x3_2.bias"]
  broken["inception_4e_pool_proj.weight"] = np.zeros((1,), np.float32)  # 4e has no pool projection
  reader = StateDictReader(broken, "broken.pth")
  from_torch(reader, {})
  with pytest.raises(WeightsMismatchError, match="broken.pth") as info:
    reader.finish()
  assert info.value.missing == ["inception_4e_double_3x3_2.bias"]
  assert info.value.unexpected == ["inception_4e_pool_proj.weight"]


def test_batch_statistics_mode_matches_torch_train_mode(ref):
  """Proxy-Anchor's BN-Inception: torch momentum 0.9; 96 px exercises every ceil-mode pool (96 -> 3)."""
  state_dict = _calibrated(ref, seed=20, calibration_size=96)
  model = _flax_model(_convert(state_dict)[0], bn_momentum=0.9)
  set_batch_stats_frozen(model, False)
  x = _images((2, 96, 96, 3), 21)

  def compute():
    import torch

    reference = live.load(_torch_bninception(), state_dict)
    for module in reference.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.momentum = 0.9
    reference.train()
    with torch.no_grad():
      fmap_ref = reference.features(live.nchw(x))
    return {"fmap_shape": np.asarray(fmap_ref.shape), "pooled": fmap_ref.mean(dim=(2, 3)).numpy(),
            **{f"stats/{k}": v for k, v in running_stats(reference).items()}}

  reference = ref("bninception/seed20_train_mode_96px", compute)
  assert tuple(reference["fmap_shape"]) == (2, 1024, 3, 3)  # floor-mode pools would give 2x2
  expected = reference["pooled"]
  out = np.asarray(forward_pooled(model, jnp.asarray(x)))
  np.testing.assert_allclose(out, expected, rtol=0, atol=ATOL * max(1.0, np.abs(expected).max()))
  # Every layer's running statistics follow its batch statistics, so all intermediate maps match too.
  stats = flat_state(model, nnx.BatchStat)
  expected_stats = {k[len("stats/"):]: v for k, v in reference.items() if k.startswith("stats/")}
  assert len(stats) == len(expected_stats)  # mean and var of every torch BatchNorm2d
  for key, value in stats.items():
    np.testing.assert_allclose(value, expected_stats[torch_stat_key(key)], rtol=1e-4, atol=1e-4, err_msg=key)


def test_layout_mode_switch_and_registered_variant(ref):
  model = nnx.eval_shape(lambda: BNInception(rngs=nnx.Rngs(0)))
  bns = [node for _, node in nnx.iter_graph(model) if isinstance(node, BatchNorm)]
  assert len(bns) == sum(k.endswith(".running_mean") for k in _layout(ref))  # one per torch BatchNorm2d
  assert not batch_stats_frozen(model)
  model.eval()
  assert batch_stats_frozen(model)

  def compute():
    import pretrainedmodels

    settings = pretrainedmodels.pretrained_settings["bninception"]["imagenet"]
    return {k: np.asarray(settings[k]) for k in ("input_space", "input_range", "mean", "std", "input_size")}

  settings = ref("bninception/pretrained_settings", compute)
  entry = get_entry("bn_inception")
  assert entry.family == "bninception"
  cfg = entry.pretrained_cfg
  assert cfg.color_order == str(settings["input_space"]) == "BGR"
  assert cfg.pixel_scale == settings["input_range"][1]
  assert cfg.mean == tuple(settings["mean"]) and cfg.std == tuple(settings["std"])
  assert cfg.input_size == settings["input_size"][-1]


@pytest.mark.parametrize("kind", [pytest.param(".pth", marks=pytest.mark.parity), ".safetensors"])
def test_convert_cli_reads_cadenes_checkpoint_form(ref, tmp_path, capsys, kind):
  import convert_timm_weights as cli
  from dml_jax.backbones import create
  from dml_jax.convert.weights_dir import read_weights_dir

  state_dict = cnn_state_dict(_layout(ref), seed=30)
  checkpoint = tmp_path / f"bn_inception-52deb4733{kind}"
  if kind == ".pth":
    import torch

    torch.save(live.tensors(_cadene_form(state_dict)), checkpoint)
  else:
    save_file(_cadene_form(state_dict), str(checkpoint))
  out = tmp_path / "weights"
  assert cli.main(["--model", "bn_inception", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
  assert "last_linear.weight" in capsys.readouterr().out

  meta, flat = read_weights_dir(out)
  assert (meta["model"], meta["family"]) == ("bn_inception", "bninception")
  assert meta["pretrained_cfg"]["color_order"] == "BGR" and meta["pretrained_cfg"]["pixel_scale"] == 255.0
  expected, _ = _convert(state_dict)
  assert flat.keys() == expected.keys() and all(np.array_equal(flat[k], expected[k]) for k in flat)
  # The loaded model holds exactly these arrays; the 224 parity test runs the same arrays through the net.
  model = create("bn_inception", weights=str(out))
  loaded = flat_state(model)
  assert loaded.keys() == flat.keys() and all(np.array_equal(loaded[k], flat[k]) for k in flat)
