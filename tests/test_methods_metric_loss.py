"""The baseline method: heads, initialisation, BatchNorm freezing, bf16 compute, weights errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dml_jax import backbones, methods

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
TINY_RESNET = dict(layers=(1, 1), channels=(8, 16), stem_width=8)


def method_config(backbone="vit_small_patch16_224", head="linear", overrides=None, *, bn_freeze=False,
                  compute_dtype="float32", weights="", embedding_dim=32):
  c = ml_collections.ConfigDict()
  c.method = methods.method_config("metric_loss")
  c.method.head = head
  c.method.bn_freeze = bn_freeze
  c.model = dict(backbone=backbone, weights=weights, backbone_overrides=dict(overrides or TINY_VIT),
                 embedding_dim=embedding_dim)
  c.compute_dtype = compute_dtype
  c.dataset = dict(image_size=32)
  return c


def _batch(n=8, seed=1):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.normal(size=(n, 32, 32, 3)), jnp.float32),
          "label": jnp.arange(n, dtype=jnp.int32) % 5}


def _loss(method, params, state, batch):
  return method.loss_fn(params, state, batch, jax.random.key(0), methods.StepInfo(jnp.int32(0), jnp.int32(0)))


def test_unknown_method_names_close_match():
  c = method_config()
  c.method.name = "metric_los"
  with pytest.raises(KeyError, match="metric_loss"):
    methods.build(c, num_classes=5)


def test_linear_head_init_and_proxies_follow_the_seeds():
  method = methods.build(method_config(embedding_dim=512), num_classes=100)
  params, _ = method.init(jax.random.key(0))
  kernel = np.asarray(params["model"]["head"]["kernel"])  # [D_in, E]
  assert kernel.shape == (64, 512)
  np.testing.assert_allclose(kernel.std(), np.sqrt(2 / 512), rtol=0.02)  # kaiming_normal_ fan_out
  assert not np.asarray(params["model"]["head"]["bias"]).any()
  proxies = np.asarray(params["loss"]["proxies"])
  assert proxies.shape == (100, 512)
  np.testing.assert_allclose(proxies.std(), np.sqrt(2 / 100), rtol=0.02)


def test_gap_gmp_head_and_frozen_batchnorm():
  method = methods.build(method_config("resnet50", "gap_gmp_linear", TINY_RESNET, bn_freeze=True), num_classes=5)
  params, state = method.init(jax.random.key(0))
  batch = _batch()
  loss, (_, new_state) = jax.jit(lambda p, s: _loss(method, p, s, batch))(params, state)
  assert np.isfinite(float(loss))
  # Frozen statistics: the training forward leaves them untouched.
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  batchnorm = method.param_selectors(params)["batchnorm"]  # what '@batchnorm' in a group rule names
  assert "model/backbone/bn1/scale" in batchnorm and "model/backbone/layer1/0/bn3/bias" in batchnorm
  assert not any("conv" in p for p in batchnorm)

  # The embedding is L2(Linear(GAP + GMP of the feature map)), recomputed here from the feature map.
  def feature_map(params, state, images):
    return method.model.merge(params["model"], state["model"], train=False).backbone.forward_features(images)

  fmap = np.asarray(jax.jit(feature_map)(params, state, batch["image"]))  # [B, h, w, C]
  pooled = fmap.mean(axis=(1, 2)) + fmap.max(axis=(1, 2))
  expected = pooled @ np.asarray(params["model"]["head"]["kernel"]) + np.asarray(params["model"]["head"]["bias"])
  expected /= np.sqrt((expected ** 2).sum(axis=1, keepdims=True) + 1e-12)
  emb = np.asarray(jax.jit(method.embed_fn)(params, state, batch["image"]))
  np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-5)


def test_batchnorm_statistics_update_when_not_frozen():
  method = methods.build(method_config("resnet50", "gap_gmp_linear", TINY_RESNET), num_classes=5)
  params, state = method.init(jax.random.key(0))
  batch = _batch()
  _, (_, new_state) = jax.jit(lambda p, s: _loss(method, p, s, batch))(params, state)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state))]
  assert all(changed)
  # The stem's statistics after one training forward, torch's rule from the initial (0, 1) with momentum 0.1:
  # mean = 0.1 * batch mean, var = 0.9 + 0.1 * unbiased batch variance, of the stem convolution's output.
  stem = method.model.merge(params["model"], state["model"], train=False).backbone.conv1
  y = np.asarray(stem(batch["image"]), np.float64)
  n = y.size // y.shape[-1]
  bn1 = new_state["model"]["backbone"]["bn1"]
  np.testing.assert_allclose(np.asarray(bn1["mean"]), 0.1 * y.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(bn1["var"]), 0.9 + 0.1 * y.var(axis=(0, 1, 2)) * n / (n - 1), rtol=1e-5)


def test_bfloat16_compute_keeps_float32_gradients():
  batch = _batch()
  m32 = methods.build(method_config(), num_classes=5)
  m16 = methods.build(method_config(compute_dtype="bfloat16"), num_classes=5)
  params, state = m32.init(jax.random.key(0))
  m16.init(jax.random.key(0))
  l32 = jax.jit(lambda p: _loss(m32, p, state, batch)[0])(params)
  (l16, _), grads = jax.jit(jax.value_and_grad(lambda p: _loss(m16, p, state, batch), has_aux=True))(params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert abs(float(l16) - float(l32)) < 0.05 * abs(float(l32))
  assert jax.jit(m16.embed_fn)(params, state, batch["image"]).dtype == jnp.float32


def test_weights_that_do_not_fit_stop_with_the_key_list(tmp_path):
  from flax import nnx

  from dml_jax.convert.errors import WeightsMismatchError
  from dml_jax.convert.weights_dir import write_weights_dir

  source = backbones.create("vit_small_patch16_224", **TINY_VIT)  # depth 2
  flat = {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(source, nnx.Param))}
  write_weights_dir(tmp_path / "w", model_name="vit_small_patch16_224", family="vit", arch=TINY_VIT, flat=flat,
                    pretrained_cfg=source.pretrained_cfg, source="test", dropped_keys=[])
  method = methods.build(method_config(weights=str(tmp_path / "w"), overrides={**TINY_VIT, "depth": 3}),
                         num_classes=5)
  with pytest.raises(WeightsMismatchError, match="blocks/2"):
    method.init(jax.random.key(0))
  # The matching architecture loads, and the loaded values are the ones the method trains from.
  method = methods.build(method_config(weights=str(tmp_path / "w")), num_classes=5)
  params, _ = method.init(jax.random.key(0))
  np.testing.assert_array_equal(params["model"]["backbone"]["pos_embed"], flat["pos_embed"])


def test_auto_compute_dtype_is_float32_on_cpu_and_accepted_by_the_config_check():
  # 'auto' (the VPTSP recipes: the authors trained with fp16 autocast) is bfloat16 on GPU/TPU only.
  from dml_jax.methods import modeling
  from dml_jax.train import config as config_lib

  assert jax.default_backend() == "cpu" and modeling.compute_dtype("auto") is None
  assert modeling.compute_dtype("bfloat16") == jnp.bfloat16
  c = config_lib.default_config()
  c.method = methods.method_config("metric_loss")
  c.compute_dtype = "auto"
  config_lib.check_config(c, num_devices=1)
  c.compute_dtype = "float16"
  with pytest.raises(config_lib.InvalidValueError, match="compute_dtype"):
    config_lib.check_config(c, num_devices=1)
