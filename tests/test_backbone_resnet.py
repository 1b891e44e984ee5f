"""ResNet (dml_jax.backbones.resnet) against timm and torchvision, through dml_jax.convert.resnet.

timm's outputs come from tests/references (`ref` fixture); the weights are seeded numpy (tests/seeded.py)
with BatchNorm statistics calibrated by timm. ResNet-50 at 224 is compared live only (`parity`, `slow`):
its feature maps would make large reference files; the tiny ResNet covers the same code in the default run.
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
from dml_jax.backbones.resnet import PRETRAINED_CFGS, ResNet
from dml_jax.convert import StateDictReader, WeightsMismatchError, strict_update
from dml_jax.convert.resnet import from_torch
from dml_jax.preprocessing import PretrainedCfg

RESNET50 = dict(layers=(3, 4, 6, 3), channels=(64, 128, 256, 512), stem_width=64)
# timm's 7x7 stem is always 64 wide; only the stage widths shrink.
TINY = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=64)
ATOL = 1e-4


def _images(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _convert(state_dict, arch):
  reader = StateDictReader(state_dict, "test state dict")
  flat = from_torch(reader, arch)
  reader.finish()
  return flat, reader


def _flax_model(state_dict, arch, flat=None):
  """A frozen-statistics ResNet holding `state_dict` (or the already converted `flat`)."""
  flat = _convert(state_dict, arch)[0] if flat is None else flat
  model = load_abstract(lambda: ResNet(**arch, use_running_average=True, rngs=nnx.Rngs(0)), flat)
  assert batch_stats_frozen(model)
  return model


def _timm_features(model, x):
  import torch

  with torch.no_grad():
    fmap = model.forward_features(live.nchw(x))
    return live.nhwc(fmap), model.forward_head(fmap, pre_logits=True).numpy()


def _timm_tiny_module():
  from timm.models.resnet import Bottleneck
  from timm.models.resnet import ResNet as TimmResNet

  return TimmResNet(block=Bottleneck, layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), num_classes=10)


def _tiny_layout(ref) -> dict[str, np.ndarray]:
  return ref("resnet/tiny_layout", lambda: live.layout(_timm_tiny_module()))


def _tiny_state_dict(ref, seed: int) -> dict[str, np.ndarray]:
  return calibrated_state_dict(ref, f"resnet/tiny_seed{seed}_bn_stats", _timm_tiny_module, _tiny_layout(ref), seed,
                               _images((4, 64, 64, 3), seed + 1))


def _tiny_timm_features(ref, name: str, state_dict, x) -> dict[str, np.ndarray]:
  """timm's feature map and pooled features of the tiny ResNet holding `state_dict` (reference `name`)."""
  def compute():
    fmap, pooled = _timm_features(live.load(_timm_tiny_module(), state_dict), x)
    return {"fmap": fmap, "pooled": pooled}

  return ref(name, compute)


def _live_resnet50(module, seed: int):
  """(live) `module` with seeded weights and calibrated BN statistics, and its numpy state dict."""
  state_dict = cnn_state_dict(live.layout(module), seed)
  live.load(module, state_dict)
  state_dict.update(live.calibrated_batchnorm_stats(module, _images((2, 224, 224, 3), seed + 1), seed + 2))
  return live.load(module, state_dict), state_dict


@pytest.fixture(scope="module")
def resnet50_pair():
  import timm

  reference, state_dict = _live_resnet50(timm.create_model("resnet50", pretrained=False), seed=0)
  return reference, _flax_model(state_dict, RESNET50)


@pytest.mark.parity
@pytest.mark.slow
def test_resnet50_matches_timm_at_224(resnet50_pair):
  import torch

  reference, model = resnet50_pair
  x = _images((2, 224, 224, 3), 3)
  fmap_ref, pooled_ref = _timm_features(reference, x)
  fmap = np.asarray(forward_features(model, jnp.asarray(x)))
  pooled = fmap.mean(axis=(1, 2))  # one ResNet-50 compile per file; `__call__` is the same mean (tiny tests)
  assert fmap.shape == (2, 7, 7, 2048)
  # fp32 rounding grows with the activations' scale (pooled features reach ~25 here): relative bound.
  assert np.abs(pooled - pooled_ref).max() < ATOL * max(1.0, np.abs(pooled_ref).max())
  assert np.abs(fmap - fmap_ref).max() < ATOL * max(1.0, np.abs(fmap_ref).max())
  # Both fp32 forwards sit equally close to a float64 torch forward: the remaining difference is
  # summation order, not a layout error.
  reference64 = copy.deepcopy(reference).double()
  with torch.no_grad():
    fmap64 = live.nhwc(reference64.forward_features(live.nchw(x).double()))
  assert np.abs(fmap - fmap64).max() <= 2 * np.abs(fmap_ref - fmap64).max() + 1e-6


@pytest.mark.parity
@pytest.mark.slow
def test_torchvision_resnet50_has_the_same_layout(resnet50_pair):
  import torch
  import torchvision

  timm_reference, model = resnet50_pair
  reference, state_dict = _live_resnet50(torchvision.models.resnet50(weights=None), seed=4)
  assert set(reference.state_dict()) == set(timm_reference.state_dict())
  x = _images((2, 224, 224, 3), 7)
  with torch.no_grad():
    reference.fc = torch.nn.Identity()
    pooled_ref = reference(live.nchw(x)).numpy()
  timm_flat = flat_state(model)
  strict_update(model, _convert(state_dict, RESNET50)[0], "torchvision resnet50")
  try:  # same structure and shapes: reuses the compiled forward
    pooled = np.asarray(forward_features(model, jnp.asarray(x))).mean(axis=(1, 2))
  finally:
    strict_update(model, timm_flat, "timm resnet50")
  assert np.abs(pooled - pooled_ref).max() < ATOL * max(1.0, np.abs(pooled_ref).max())


@pytest.mark.parametrize("height,width", [(57, 70)])  # odd sizes; the padding test runs 64x48
def test_tiny_resnet_matches_timm(ref, height, width):
  state_dict = _tiny_state_dict(ref, seed=10)
  model = _flax_model(state_dict, TINY)
  x = _images((2, height, width, 3), 11)
  expected = _tiny_timm_features(ref, f"resnet/tiny_seed10_{height}x{width}", state_dict, x)
  fmap_ref, pooled_ref = expected["fmap"], expected["pooled"]
  fmap = np.asarray(forward_features(model, jnp.asarray(x)))
  assert fmap.shape == fmap_ref.shape == (2, -(-height // 32), -(-width // 32), 256)
  np.testing.assert_allclose(fmap, fmap_ref, rtol=0, atol=ATOL)
  np.testing.assert_allclose(np.asarray(forward_pooled(model, jnp.asarray(x))), pooled_ref, rtol=0, atol=ATOL)


def test_wrong_padding_or_bn_mapping_is_caught(ref):
  state_dict = _tiny_state_dict(ref, seed=20)
  x = _images((2, 64, 48, 3), 21)
  pooled_ref = _tiny_timm_features(ref, "resnet/tiny_seed20_64x48", state_dict, x)["pooled"]

  def error(model):  # NaN (a negative variance) counts as infinitely wrong
    return np.nan_to_num(np.abs(np.asarray(forward_pooled(model, jnp.asarray(x))) - pooled_ref).max(), nan=np.inf)

  model = _flax_model(state_dict, TINY)
  assert error(model) < ATOL
  # flax 'SAME' pads (2, 3) for the 7x7/2 stem and (0, 1) for 3x3/2 convs on even inputs.
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Conv) and node.kernel_size[0] > 1:
      node.padding = "SAME"
  assert error(model) > 100 * ATOL

  flat, _ = _convert(state_dict, TINY)
  for a, b in (("scale", "bias"), ("mean", "var")):
    swapped = dict(flat)
    for key in flat:
      if key.endswith(f"/{a}"):
        stem = key[: -len(a)]
        swapped[stem + a], swapped[stem + b] = flat[stem + b], flat[stem + a]
    model = _flax_model(None, TINY, flat=swapped)
    assert error(model) > 100 * ATOL, f"swapping BN {a} and {b} went unnoticed"


def test_frozen_statistics_give_eval_output_and_stay_put(ref):
  state_dict = _tiny_state_dict(ref, seed=30)
  model = _flax_model(state_dict, TINY)
  assert batch_stats_frozen(model)
  before = flat_state(model, nnx.BatchStat)
  x = _images((3, 40, 40, 3), 31)
  expected = _tiny_timm_features(ref, "resnet/tiny_seed30_40x40", state_dict, x)["pooled"]
  np.testing.assert_allclose(np.asarray(forward_pooled(model, jnp.asarray(x))), expected, rtol=0, atol=ATOL)
  after = flat_state(model, nnx.BatchStat)
  assert all(np.array_equal(before[k], after[k]) for k in before)


def test_batch_statistics_mode_matches_torch_train_mode(ref):
  state_dict = _tiny_state_dict(ref, seed=40)
  model = _flax_model(state_dict, TINY)
  set_batch_stats_frozen(model, False)
  assert not batch_stats_frozen(model)
  inputs = [_images((4, 48, 40, 3), 41 + step) for step in range(2)]

  def compute():
    reference = live.load(_timm_tiny_module(), state_dict)
    reference.train()
    out = {f"pooled_{step}": _timm_features(reference, x)[1] for step, x in enumerate(inputs)}
    return {**out, **{f"stats/{k}": v for k, v in running_stats(reference).items()}}

  expected = ref("resnet/tiny_seed40_train_mode", compute)
  bn1_mean, bn1_var = np.asarray(model.bn1.mean[...]), np.asarray(model.bn1.var[...])
  for step, x in enumerate(inputs):
    if step == 0:  # torch's rule by hand on the stem BN: unbiased batch variance, momentum 0.1
      stem = np.asarray(model.conv1(jnp.asarray(x))).reshape(-1, 64)
      bn1_mean = 0.9 * bn1_mean + 0.1 * stem.mean(0)
      bn1_var = 0.9 * bn1_var + 0.1 * stem.var(0, ddof=1)
    out = np.asarray(forward_pooled(model, jnp.asarray(x)))
    np.testing.assert_allclose(out, expected[f"pooled_{step}"], rtol=0, atol=ATOL)
    if step == 0:
      np.testing.assert_allclose(np.asarray(model.bn1.mean[...]), bn1_mean, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(np.asarray(model.bn1.var[...]), bn1_var, rtol=1e-5, atol=1e-6)
  stats = flat_state(model, nnx.BatchStat)
  expected_stats = {k[len("stats/"):]: v for k, v in expected.items() if k.startswith("stats/")}
  assert len(stats) == len(expected_stats)  # mean and var of every torch BatchNorm2d
  for key, value in stats.items():
    np.testing.assert_allclose(value, expected_stats[torch_stat_key(key)], rtol=1e-5, atol=1e-5, err_msg=key)


def test_mode_switches_reach_every_batchnorm():
  model = nnx.eval_shape(lambda: ResNet(**TINY, rngs=nnx.Rngs(0)))
  bns = [node for _, node in nnx.iter_graph(model) if isinstance(node, BatchNorm)]
  assert len(bns) == 1 + 4 * 4  # stem + 3 per block + downsample per stage
  assert not batch_stats_frozen(model)
  model.eval()
  assert batch_stats_frozen(model)
  model.train()
  assert not batch_stats_frozen(model)
  view = nnx.view(model, only=BatchNorm, use_running_average=True)
  assert batch_stats_frozen(view) and not batch_stats_frozen(model)
  assert batch_stats_frozen(nnx.eval_shape(lambda: ResNet(**TINY, use_running_average=True, rngs=nnx.Rngs(0))))


def test_converter_reports_every_bad_key(ref):
  state_dict = cnn_state_dict(_tiny_layout(ref), seed=50)
  _, reader = _convert(state_dict, TINY)
  assert sorted(reader.dropped) == sorted(["fc.weight", "fc.bias"] +
                                          [k for k in state_dict if k.endswith("num_batches_tracked")])
  broken = dict(state_dict)
  del broken["layer2.0.downsample.1.running_var"]
  broken["layer2.0.conv4.weight"] = np.zeros((1,), np.float32)
  reader = StateDictReader(broken, "broken.pth")
  from_torch(reader, TINY)
  with pytest.raises(WeightsMismatchError, match="broken.pth") as info:
    reader.finish()
  assert info.value.missing == ["layer2.0.downsample.1.running_var"]
  assert info.value.unexpected == ["layer2.0.conv4.weight"]
  # A checkpoint of another depth names the blocks it has in excess.
  reader = StateDictReader(state_dict, "tiny.pth")
  from_torch(reader, dict(TINY, layers=(2, 1, 1, 1)))
  with pytest.raises(WeightsMismatchError, match=r"layer1\.1\.conv1\.weight"):
    reader.finish()


def test_registered_variant_and_pretrained_cfgs(ref):
  entry = get_entry("resnet50.tv_in1k")
  assert entry.family == "resnet" and dict(entry.arch) == RESNET50
  assert entry.pretrained_cfg == PRETRAINED_CFGS["a1_in1k"]  # timm's default tag
  assert nnx.eval_shape(lambda: entry.build(rngs=nnx.Rngs(0), **entry.arch)).num_features == 2048

  def compute():
    import timm

    out = {}
    for tag in PRETRAINED_CFGS:
      cfg = timm.models.get_pretrained_cfg(f"resnet50.{tag}")
      out.update({f"{tag}/mean": np.asarray(cfg.mean), f"{tag}/std": np.asarray(cfg.std),
                  f"{tag}/crop_pct": np.asarray(cfg.crop_pct), f"{tag}/interpolation": np.asarray(cfg.interpolation),
                  f"{tag}/input_size": np.asarray(cfg.input_size[-1])})
    return out

  expected = ref("resnet/resnet50_pretrained_cfgs", compute)
  for tag, cfg in PRETRAINED_CFGS.items():
    assert f"{tag}/mean" in expected, f"no timm reference for tag {tag!r}: regenerate the reference"
    assert cfg.mean == tuple(expected[f"{tag}/mean"]) and cfg.std == tuple(expected[f"{tag}/std"])
    assert cfg.crop_pct == float(expected[f"{tag}/crop_pct"])
    assert cfg.interpolation == str(expected[f"{tag}/interpolation"])
    assert cfg.input_size == int(expected[f"{tag}/input_size"])


@pytest.mark.parametrize("kind", [pytest.param(".pth", marks=pytest.mark.parity), ".safetensors"])
def test_convert_cli_writes_what_from_torch_gives(ref, tmp_path, capsys, kind):
  import convert_timm_weights as cli
  from dml_jax.backbones import create
  from dml_jax.convert.weights_dir import read_weights_dir

  state_dict = _tiny_state_dict(ref, seed=60)
  checkpoint = tmp_path / f"tiny_resnet{kind}"
  if kind == ".pth":
    import torch

    torch.save(live.tensors(state_dict), checkpoint)
  else:
    save_file(state_dict, str(checkpoint))
  out = tmp_path / "weights"
  arch_args = ["--arch", "layers=[1,1,1,1]", "channels=[8,16,32,64]"]
  assert cli.main(["--model", "resnet50.tv_in1k", "--checkpoint", str(checkpoint), "--out", str(out)] + arch_args) == 0
  assert "fc.weight" in capsys.readouterr().out  # the summary lists the dropped classifier

  meta, flat = read_weights_dir(out)
  assert (meta["model"], meta["family"]) == ("resnet50", "resnet")
  assert PretrainedCfg.from_json(meta["pretrained_cfg"]) == PRETRAINED_CFGS["tv_in1k"]
  expected, _ = _convert(state_dict, TINY)
  assert flat.keys() == expected.keys() and all(np.array_equal(flat[k], expected[k]) for k in flat)

  model = create("resnet50.tv_in1k", weights=str(out), layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
  assert model.pretrained_cfg == PRETRAINED_CFGS["tv_in1k"]
  set_batch_stats_frozen(model, True)
  x = _images((2, 57, 70, 3), 61)
  pooled_ref = _tiny_timm_features(ref, "resnet/tiny_seed60_57x70", state_dict, x)["pooled"]
  np.testing.assert_allclose(np.asarray(forward_pooled(model, jnp.asarray(x))), pooled_ref, rtol=0, atol=ATOL)
