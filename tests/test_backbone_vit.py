"""Flax ViT / DeiT against timm: features, tokens, deep prompts, position-embedding resampling, dtypes, errors.

timm's outputs come from tests/references (`ref` fixture, tests/reference.py); the weights are seeded numpy
arrays (tests/seeded.py) that the live run loads into timm's models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import live
import numpy as np
import pytest
from flax import nnx
from seeded import timm_vit_state_dict

from dml_jax.backbones import create, get_entry
from dml_jax.backbones import vit as vit_module
from dml_jax.backbones.registry import get_pretrained_cfg
from dml_jax.convert import vit as convert_vit
from dml_jax.convert.state_dict_reader import StateDictReader
from dml_jax.convert.weights_dir import model_shapes, strict_update, write_weights_dir

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4)
ATOL = 1e-4  # fp32 parity bound of the issue; the real differences are ~1e-6


def _kind(distilled: bool) -> str:
  return "deit" if distilled else "vit"


def _tiny_sd(distilled: bool = False) -> dict[str, np.ndarray]:
  return timm_vit_state_dict(0, **TINY, num_classes=10, distilled=distilled)


def _timm_tiny(distilled: bool = False):
  """(live runs only) timm's model of the tiny size holding `_tiny_sd`."""
  return live.timm_vit(_tiny_sd(distilled), distilled=distilled, num_classes=10, **TINY)


def _flat_from(sd: dict[str, np.ndarray], arch) -> dict[str, np.ndarray]:
  return convert_vit.from_torch(StateDictReader(sd, "test"), arch)


def _flax_with(flat: dict[str, np.ndarray], name: str, arch: dict, **extra):
  # Shapes only, then the weights: a random init would cost one XLA compile per parameter shape.
  model = nnx.eval_shape(lambda: create(name, **arch, **extra))
  strict_update(model, flat, source="test")
  return model


def _flax_from(sd, name: str, arch: dict, **extra):
  return _flax_with(_flat_from(sd, {**get_entry(name).arch, **arch}), name, arch, **extra)


# One XLA compile per (architecture, input shapes, prompt layout), shared by every test: eager mode would
# compile each op separately, which is slower on a loaded 2-core machine.
_features = nnx.jit(lambda model, x, prompts=None: model.forward_features(x, prompts))
_pooled = nnx.jit(lambda model, x, prompts=None: model(x, prompts))


def _images(b: int = 2, size: int = 32, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randn(b, size, size, 3).astype(np.float32)


def _max_diff(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _timm_forward(ref, distilled: bool = False) -> dict[str, np.ndarray]:
  """timm's tokens and pooled features of the tiny model on `_images()`."""
  def compute():
    tm = _timm_tiny(distilled)
    return {"tokens": live.timm_tokens(tm, _images()), "pooled": live.timm_pooled(tm, _images())}

  return ref(f"vit/tiny_{_kind(distilled)}_forward", compute)


@pytest.mark.parametrize("name,distilled", [("vit_small_patch16_224", False),
                                            ("deit_small_distilled_patch16_224", True)])
def test_tiny_features_and_tokens_match_timm(ref, name, distilled):
  expected = _timm_forward(ref, distilled)
  fm = _flax_from(_tiny_sd(distilled), name, TINY)
  x = _images()
  tokens = _features(fm, jnp.asarray(x))
  assert tokens.shape == (2, (2 if distilled else 1) + 16, 64)
  assert _max_diff(tokens, expected["tokens"]) < ATOL
  assert _max_diff(_pooled(fm, jnp.asarray(x)), expected["pooled"]) < ATOL
  assert _max_diff(fm.pool(tokens), expected["pooled"]) < ATOL


def test_parameter_paths_follow_timm_and_biases_are_separate():
  shapes = model_shapes(nnx.eval_shape(lambda: create("deit_small_distilled_patch16_224", **TINY)))
  for key, shape in {"patch_embed/proj/kernel": (8, 8, 3, 64), "patch_embed/proj/bias": (64,),
                     "cls_token": (1, 1, 64), "dist_token": (1, 1, 64), "pos_embed": (1, 18, 64),
                     "blocks/1/norm1/scale": (64,), "blocks/1/norm1/bias": (64,),
                     "blocks/0/attn/qkv/kernel": (64, 192), "blocks/0/attn/qkv/bias": (192,),
                     "blocks/0/attn/proj/kernel": (64, 64), "blocks/0/mlp/fc1/kernel": (64, 256),
                     "blocks/0/mlp/fc2/bias": (64,), "norm/scale": (64,), "norm/bias": (64,)}.items():
    assert shapes[key] == shape, key
  assert len(shapes) == 4 + 1 + 2 * 12 + 2  # patch (2), tokens + pos (3), 12 per block, final norm


def test_parity_bound_catches_approximate_gelu(ref, monkeypatch):
  fm = _flax_from(_tiny_sd(), "vit_small_patch16_224", TINY)
  x = _images()
  expected = _timm_forward(ref)["pooled"]
  assert _max_diff(_pooled(fm, jnp.asarray(x)), expected) < ATOL
  monkeypatch.setattr(vit_module, "gelu", lambda h: jax.nn.gelu(h, approximate=True))
  patched = nnx.jit(lambda m, images: m(images))  # a new function, so it traces the patched GELU
  assert _max_diff(patched(fm, jnp.asarray(x)), expected) > 3 * ATOL  # ~5e-4 here; ~1e-6 with the exact form


@pytest.mark.parametrize("mistake", ["swap_layernorm_scale_bias", "untransposed_proj", "qkv_rows_as_kv_q"])
def test_parity_bound_catches_conversion_mistakes(ref, mistake):
  flat = _flat_from(_tiny_sd(), TINY)
  if mistake == "swap_layernorm_scale_bias":
    norm = "blocks/0/norm1"
    flat[f"{norm}/scale"], flat[f"{norm}/bias"] = flat[f"{norm}/bias"], flat[f"{norm}/scale"]
  elif mistake == "untransposed_proj":  # square, so only the numbers can tell
    flat["blocks/1/attn/proj/kernel"] = flat["blocks/1/attn/proj/kernel"].T.copy()
  else:  # a [k; v; q] ordering of the fused rows
    flat["blocks/0/attn/qkv/kernel"] = np.roll(flat["blocks/0/attn/qkv/kernel"], 64, axis=1)
  fm = _flax_with(flat, "vit_small_patch16_224", TINY)
  assert _max_diff(_pooled(fm, jnp.asarray(_images())), _timm_forward(ref)["pooled"]) > 10 * ATOL


def _timm_deep_prompts(tm, x: np.ndarray, prompts: dict[int, np.ndarray], in_front: bool) -> np.ndarray:
  """VPT-deep written against timm's blocks: prompts after the prefix (VPT) or in front of cls (VPTSP code)."""
  import torch

  k = tm.num_prefix_tokens
  with torch.no_grad():
    t = tm._pos_embed(tm.patch_embed(live.nchw(x)))
    for i, blk in enumerate(tm.blocks):
      if i not in prompts:
        t = blk(t)
        continue
      p = torch.from_numpy(prompts[i])
      p = p.expand(t.shape[0], -1, -1) if p.ndim == 2 else p
      n = p.shape[1]
      if in_front:
        t = blk(torch.cat([p, t], dim=1))[:, n:]
      else:
        t = blk(torch.cat([t[:, :k], p, t[:, k:]], dim=1))
        t = torch.cat([t[:, :k], t[:, k + n:]], dim=1)
    return tm.norm(t).numpy()


@pytest.mark.parametrize("distilled", [False, True])
def test_deep_prompts_match_a_timm_reference(ref, distilled):
  name = "deit_small_distilled_patch16_224" if distilled else "vit_small_patch16_224"
  fm = _flax_from(_tiny_sd(distilled), name, TINY)
  x = _images()
  rng = np.random.RandomState(1)
  # Block 0: 3 per-sample prompts; block 1: 2 shared prompts (a different count per layer, as VPTSP's decay).
  prompts = {0: rng.randn(2, 3, 64).astype(np.float32), 1: rng.randn(2, 64).astype(np.float32)}

  def compute():
    tm = _timm_tiny(distilled)
    return {"after_prefix": _timm_deep_prompts(tm, x, prompts, in_front=False),
            "in_front": _timm_deep_prompts(tm, x, prompts, in_front=True)}

  expected = ref(f"vit/tiny_{_kind(distilled)}_deep_prompts", compute)
  tokens = _features(fm, jnp.asarray(x), {i: jnp.asarray(p) for i, p in prompts.items()})
  assert tokens.shape == expected["after_prefix"].shape
  assert _max_diff(tokens, expected["after_prefix"]) < ATOL
  # The VPTSP code's placement in front of cls gives the same tokens (no position embedding on prompts).
  assert _max_diff(tokens, expected["in_front"]) < ATOL
  assert _max_diff(tokens, _features(fm, jnp.asarray(x))) > 1e-2  # the prompts did act


RESAMPLE_CASES = [(14, 4, 1), (4, 6, 1), (14, 24, 2), (7, 5, 1)]


def test_resample_function_matches_timm(ref):
  rng = np.random.RandomState(0)
  inputs = [rng.randn(1, prefix + old * old, 16).astype(np.float32) for old, _, prefix in RESAMPLE_CASES]

  def compute():
    import torch
    from timm.layers import resample_abs_pos_embed

    return {f"{old}_{new}_{prefix}": resample_abs_pos_embed(torch.from_numpy(pe), new_size=[new, new],
                                                            num_prefix_tokens=prefix).numpy()
            for (old, new, prefix), pe in zip(RESAMPLE_CASES, inputs)}

  expected = ref("vit/resample_abs_pos_embed", compute)
  for (old, new, prefix), pe in zip(RESAMPLE_CASES, inputs):
    reference = expected[f"{old}_{new}_{prefix}"]
    ours = vit_module.resample_abs_pos_embed(pe, new, prefix)
    assert ours.shape == reference.shape
    assert _max_diff(ours, reference) < 1e-5, (old, new)


@pytest.mark.parametrize("distilled,new_size", [(False, 48), (False, 24), (True, 40)])
def test_create_with_other_img_size_resamples_like_timm(ref, tmp_path, distilled, new_size):
  name = "deit_small_distilled_patch16_224" if distilled else "vit_small_patch16_224"
  arch = {**get_entry(name).arch, **TINY}
  flat = _flat_from(_tiny_sd(distilled), arch)
  write_weights_dir(tmp_path / "w", model_name=name, family="vit", arch=arch, flat=flat,
                    pretrained_cfg=get_entry(name).pretrained_cfg, source="test", dropped_keys=[])
  x = _images(size=new_size)

  def compute():
    # timm's own path: a model for the new size loading the same state dict through its checkpoint filter.
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    tm = _timm_tiny(distilled)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    tm_new = cls(**{**TINY, "img_size": new_size}, num_classes=10).eval()
    tm_new.load_state_dict(checkpoint_filter_fn(tm.state_dict(), tm_new))
    return {"pos_embed_shape": np.asarray(tm_new.pos_embed.shape), "pooled": live.timm_pooled(tm_new, x)}

  expected = ref(f"vit/tiny_{_kind(distilled)}_resampled_to_{new_size}", compute)
  fm = create(name, weights=str(tmp_path / "w"), **{**TINY, "img_size": new_size})
  assert fm.pos_embed[...].shape == tuple(expected["pos_embed_shape"])
  assert _max_diff(_pooled(fm, jnp.asarray(x)), expected["pooled"]) < ATOL


def test_bfloat16_compute_keeps_float32_params(ref):
  fm = _flax_from(_tiny_sd(), "vit_small_patch16_224", TINY, dtype="bfloat16")
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(fm, nnx.Param)))
  out = _pooled(fm, jnp.asarray(_images()))
  assert out.dtype == jnp.bfloat16
  expected = _timm_forward(ref)["pooled"]
  assert _max_diff(out, expected) / np.abs(expected).max() < 5e-2


def test_bad_inputs_name_the_problem():
  fm = _flax_from(_tiny_sd(), "vit_small_patch16_224", TINY)
  with pytest.raises(ValueError, match=r"expected images \[B, 32, 32, C\]"):
    _pooled(fm, jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="not a block index"):
    _pooled(fm, jnp.zeros((1, 32, 32, 3)), {2: jnp.zeros((1, 64))})
  with pytest.raises(ValueError, match=r"prompts for block 0 have shape"):
    _pooled(fm, jnp.zeros((1, 32, 32, 3)), {0: jnp.zeros((1, 32))})
  with pytest.raises(ValueError, match="not a multiple of patch_size"):
    nnx.eval_shape(lambda: create("vit_small_patch16_224", **{**TINY, "img_size": 30}))
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    nnx.eval_shape(lambda: create("vit_small_patch16_224", **{**TINY, "num_heads": 5}))


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch16_224", "deit_small_distilled_patch16_224"])
def test_variants_and_tags_carry_timms_pretrained_cfgs(ref, name):
  entry = get_entry(name)
  tags = list(entry.pretrained_tags)

  def compute():
    import timm
    from timm.models.deit import VisionTransformerDistilled

    out = {"default_tag": np.asarray(timm.models.get_pretrained_cfg(name).tag)}  # timm's weights for the bare name
    for tag in {*tags, str(out["default_tag"])}:
      cfg = timm.models.get_pretrained_cfg(f"{name}.{tag}")
      out.update({f"{tag}/mean": np.asarray(cfg.mean), f"{tag}/std": np.asarray(cfg.std),
                  f"{tag}/input_size": np.asarray(cfg.input_size[-1]), f"{tag}/crop_pct": np.asarray(cfg.crop_pct),
                  f"{tag}/interpolation": np.asarray(cfg.interpolation)})
    tm = timm.create_model(name, pretrained=False, num_classes=0, device="meta")  # shapes only, no init
    out["arch"] = np.asarray([tm.embed_dim, len(tm.blocks), tm.blocks[0].attn.num_heads, tm.patch_embed.patch_size[0],
                              tm.patch_embed.img_size[0]])
    out["distilled"] = np.asarray(isinstance(tm, VisionTransformerDistilled))
    return out

  expected = ref(f"vit/{name}_pretrained_cfgs", compute)
  default_tag = str(expected["default_tag"])
  pairs = [(default_tag, get_pretrained_cfg(name))] + [(tag, get_pretrained_cfg(f"{name}.{tag}")) for tag in tags]
  for tag, ours in pairs:
    assert f"{tag}/mean" in expected, f"no timm reference for tag {tag!r}: regenerate the reference"
    assert ours.mean == pytest.approx(tuple(expected[f"{tag}/mean"])), tag
    assert ours.std == pytest.approx(tuple(expected[f"{tag}/std"])), tag
    assert (ours.input_size, ours.crop_pct, ours.interpolation) == (int(expected[f"{tag}/input_size"]),
                                                                     float(expected[f"{tag}/crop_pct"]),
                                                                     str(expected[f"{tag}/interpolation"])), tag
  # architecture as timm's named model
  arch = entry.arch
  assert [arch["embed_dim"], arch["depth"], arch["num_heads"], arch["patch_size"], arch["img_size"]] == list(
      expected["arch"])
  assert arch.get("distilled", False) == bool(expected["distilled"])
  with pytest.raises(KeyError, match="known tags"):
    get_pretrained_cfg(f"{name}.no_such_tag")


def _layer_norm_reference(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, dy: np.ndarray, eps: float = 1e-6):
  """torch's LayerNorm written out in float64: y, and dx, d_scale, d_bias of sum(y * dy)."""
  x, scale, bias, dy = (np.asarray(a, np.float64) for a in (x, scale, bias, dy))
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)  # the biased variance of the centred values
  rstd = 1.0 / np.sqrt(var + eps)
  xhat = (x - mean) * rstd
  g = dy * scale
  dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
  return xhat * scale + bias, dx, (dy * xhat).reshape(-1, x.shape[-1]).sum(0), dy.reshape(-1, x.shape[-1]).sum(0)


def test_layer_norm_keeps_its_digits_at_large_activations():
  # Tokens whose mean is hundreds of times their spread (large residual streams): the one-pass variance
  # E[x^2] - E[x]^2 cancels catastrophically in float32 (up to 4 % off here), while the two-pass form torch
  # uses stays within ~2e-7; at unit-scale inputs the two agree to ~1e-7, which is why the parity tests above
  # cannot tell them apart.
  rng = np.random.default_rng(0)
  d = 96
  spread, offset = rng.uniform(0.5, 2.0, (3, 5, 1)), rng.uniform(200.0, 500.0, (3, 5, 1))
  x = (rng.standard_normal((3, 5, d)) * spread + offset).astype(np.float32)
  scale = (1.0 + 0.3 * rng.standard_normal(d)).astype(np.float32)
  bias = (0.1 * rng.standard_normal(d)).astype(np.float32)
  dy = rng.standard_normal(x.shape).astype(np.float32)
  norm = vit_module.LayerNorm(d, dtype=None, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  norm.scale[...], norm.bias[...] = jnp.asarray(scale), jnp.asarray(bias)
  y, vjp = jax.vjp(lambda v, s, b: vit_module._layer_norm_fn(v, s, b, 1e-6), jnp.asarray(x), norm.scale[...],
                   norm.bias[...])
  want_y, want_dx, want_ds, want_db = _layer_norm_reference(x, scale, bias, dy)
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want_y, atol=2e-4)
  np.testing.assert_allclose(np.asarray(y), want_y, atol=2e-4)
  dx, ds, db = vjp(jnp.asarray(dy))
  np.testing.assert_allclose(np.asarray(dx), want_dx, atol=2e-4 * np.abs(want_dx).max())
  np.testing.assert_allclose(np.asarray(ds), want_ds, atol=2e-4 * np.abs(want_ds).max())
  np.testing.assert_allclose(np.asarray(db), want_db, atol=1e-5 * np.abs(want_db).max())


@pytest.mark.parametrize("distilled", [False, True])
def test_every_parameter_gradient_matches_timm(ref, distilled):
  """Full fine-tuning gradients: d(sum(pooled * probe)) for every parameter (through the converter, which is
  linear, so timm's gradients convert as its weights do) and for the images."""
  name = "deit_small_distilled_patch16_224" if distilled else "vit_small_patch16_224"
  x = _images()
  probe = np.random.RandomState(1).randn(2, TINY["embed_dim"]).astype(np.float32)

  def compute():
    import torch

    tm = _timm_tiny(distilled)
    images = live.nchw(x).requires_grad_(True)
    pooled = tm.forward_head(tm.forward_features(images), pre_logits=True)
    (pooled * torch.from_numpy(probe)).sum().backward()
    grads = {k: p.grad.numpy().copy() for k, p in tm.named_parameters() if not k.startswith("head")}
    return {**{f"grad/{k}": v for k, v in grads.items()},
            "grad_images": images.grad.numpy().transpose(0, 2, 3, 1).copy()}

  expected = ref(f"vit/tiny_{_kind(distilled)}_gradients", compute)
  timm_grads = {k[len("grad/"):]: v for k, v in expected.items() if k.startswith("grad/")}
  # Shapes of the head-less model: the converter needs a complete state dict, zeros where timm has none.
  sd = {k: np.zeros_like(v) for k, v in _tiny_sd(distilled).items() if not k.startswith("head")}
  sd.update(timm_grads)
  expected_flat = _flat_from(sd, {**get_entry(name).arch, **TINY})

  model = _flax_from(_tiny_sd(distilled), name, TINY)
  graphdef, params = nnx.split(model)

  def loss(params, images):
    return jnp.sum(nnx.merge(graphdef, params)(images) * probe)

  grads, grad_images = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))
  ours = {"/".join(str(p) for p in path): np.asarray(v) for path, v in nnx.to_flat_state(grads)}
  assert sorted(ours) == sorted(expected_flat)
  for key, g in ours.items():
    scale = float(np.abs(expected_flat[key]).max()) or 1.0
    np.testing.assert_allclose(g, expected_flat[key], rtol=0, atol=1e-5 * scale, err_msg=key)
  np.testing.assert_allclose(grad_images, expected["grad_images"], rtol=0,
                             atol=1e-5 * float(np.abs(expected["grad_images"]).max()))
