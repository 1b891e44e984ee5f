"""Flax ViT / DeiT against timm: features, tokens, deep prompts, position-embedding resampling, dtypes, errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from timm.layers import resample_abs_pos_embed as timm_resample  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402
from timm.models.vision_transformer import checkpoint_filter_fn  # noqa: E402

from dml_jax.backbones import create, get_entry  # noqa: E402
from dml_jax.backbones import vit as vit_module  # noqa: E402
from dml_jax.backbones.registry import get_pretrained_cfg  # noqa: E402
from dml_jax.convert import vit as convert_vit  # noqa: E402
from dml_jax.convert.state_dict_reader import StateDictReader  # noqa: E402
from dml_jax.convert.weights_dir import model_shapes, strict_update, write_weights_dir  # noqa: E402

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4)
ATOL = 1e-4  # fp32 parity bound of the issue; the real differences are ~1e-6


def _timm_tiny(distilled: bool = False, seed: int = 0, **overrides):
  torch.manual_seed(seed)
  cls = VisionTransformerDistilled if distilled else TimmViT
  model = cls(**{**TINY, **overrides}, num_classes=10).eval()
  with torch.no_grad():
    # timm's init leaves biases at 0 and LayerNorms at (1, 0): a perturbation makes every tensor distinct, so
    # a swapped or misplaced one shows; its size puts the MLP pre-activations in the range of pretrained ViTs.
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  return model


def _numpy_sd(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _flat_from(tm, arch) -> dict[str, np.ndarray]:
  return convert_vit.from_torch(StateDictReader(_numpy_sd(tm), "test"), arch)


def _flax_with(flat: dict[str, np.ndarray], name: str, arch: dict, **extra):
  # Shapes only, then the weights: a random init would cost one XLA compile per parameter shape.
  model = nnx.eval_shape(lambda: create(name, **arch, **extra))
  strict_update(model, flat, source="test")
  return model


def _flax_from(tm, name: str, arch: dict, **extra):
  return _flax_with(_flat_from(tm, {**get_entry(name).arch, **arch}), name, arch, **extra)


# One XLA compile per (architecture, input shapes, prompt layout), shared by every test: eager mode would
# compile each op separately, which is slower on a loaded 2-core machine.
_features = nnx.jit(lambda model, x, prompts=None: model.forward_features(x, prompts))
_pooled = nnx.jit(lambda model, x, prompts=None: model(x, prompts))


def _images(b: int = 2, size: int = 32, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randn(b, size, size, 3).astype(np.float32)


def _timm_pooled(tm, x: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return tm.forward_head(tm.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2)), pre_logits=True).numpy()


def _timm_tokens(tm, x: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return tm.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def _max_diff(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.mark.parametrize("name,distilled", [("vit_small_patch16_224", False),
                                            ("deit_small_distilled_patch16_224", True)])
def test_tiny_features_and_tokens_match_timm(name, distilled):
  tm = _timm_tiny(distilled)
  fm = _flax_from(tm, name, TINY)
  x = _images()
  tokens = _features(fm, jnp.asarray(x))
  assert tokens.shape == (2, (2 if distilled else 1) + 16, 64)
  assert _max_diff(tokens, _timm_tokens(tm, x)) < ATOL
  assert _max_diff(_pooled(fm, jnp.asarray(x)), _timm_pooled(tm, x)) < ATOL
  assert _max_diff(fm.pool(tokens), _timm_pooled(tm, x)) < ATOL


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


def test_parity_bound_catches_approximate_gelu(monkeypatch):
  tm = _timm_tiny()
  fm = _flax_from(tm, "vit_small_patch16_224", TINY)
  x = _images()
  ref = _timm_pooled(tm, x)
  assert _max_diff(_pooled(fm, jnp.asarray(x)), ref) < ATOL
  monkeypatch.setattr(vit_module, "gelu", lambda h: jax.nn.gelu(h, approximate=True))
  patched = nnx.jit(lambda m, images: m(images))  # a new function, so it traces the patched GELU
  assert _max_diff(patched(fm, jnp.asarray(x)), ref) > 3 * ATOL  # 5.5e-4 here; ~1e-6 with the exact form


@pytest.mark.parametrize("mistake", ["swap_layernorm_scale_bias", "untransposed_proj", "qkv_rows_as_kv_q"])
def test_parity_bound_catches_conversion_mistakes(mistake):
  tm = _timm_tiny()
  flat = _flat_from(tm, TINY)
  if mistake == "swap_layernorm_scale_bias":
    norm = "blocks/0/norm1"
    flat[f"{norm}/scale"], flat[f"{norm}/bias"] = flat[f"{norm}/bias"], flat[f"{norm}/scale"]
  elif mistake == "untransposed_proj":  # square, so only the numbers can tell
    flat["blocks/1/attn/proj/kernel"] = flat["blocks/1/attn/proj/kernel"].T.copy()
  else:  # a [k; v; q] ordering of the fused rows
    flat["blocks/0/attn/qkv/kernel"] = np.roll(flat["blocks/0/attn/qkv/kernel"], 64, axis=1)
  fm = _flax_with(flat, "vit_small_patch16_224", TINY)
  x = _images()
  assert _max_diff(_pooled(fm, jnp.asarray(x)), _timm_pooled(tm, x)) > 10 * ATOL


def _timm_deep_prompts(tm, x: np.ndarray, prompts: dict[int, torch.Tensor], in_front: bool) -> np.ndarray:
  """VPT-deep written against timm's blocks: prompts after the prefix (VPT) or in front of cls (VPTSP code)."""
  k = tm.num_prefix_tokens
  with torch.no_grad():
    t = tm._pos_embed(tm.patch_embed(torch.from_numpy(x).permute(0, 3, 1, 2)))
    for i, blk in enumerate(tm.blocks):
      if i not in prompts:
        t = blk(t)
        continue
      p = prompts[i].expand(t.shape[0], -1, -1) if prompts[i].ndim == 2 else prompts[i]
      n = p.shape[1]
      if in_front:
        t = blk(torch.cat([p, t], dim=1))[:, n:]
      else:
        t = blk(torch.cat([t[:, :k], p, t[:, k:]], dim=1))
        t = torch.cat([t[:, :k], t[:, k + n:]], dim=1)
    return tm.norm(t).numpy()


@pytest.mark.parametrize("distilled", [False, True])
def test_deep_prompts_match_a_timm_reference(distilled):
  name = "deit_small_distilled_patch16_224" if distilled else "vit_small_patch16_224"
  tm = _timm_tiny(distilled)
  fm = _flax_from(tm, name, TINY)
  x = _images()
  rng = np.random.RandomState(1)
  # Block 0: 3 per-sample prompts; block 1: 2 shared prompts (a different count per layer, as VPTSP's decay).
  prompts = {0: rng.randn(2, 3, 64).astype(np.float32), 1: rng.randn(2, 64).astype(np.float32)}
  torch_prompts = {i: torch.from_numpy(p) for i, p in prompts.items()}
  tokens = _features(fm, jnp.asarray(x), {i: jnp.asarray(p) for i, p in prompts.items()})
  ref = _timm_deep_prompts(tm, x, torch_prompts, in_front=False)
  assert tokens.shape == ref.shape
  assert _max_diff(tokens, ref) < ATOL
  # The VPTSP code's placement in front of cls gives the same tokens (no position embedding on prompts).
  assert _max_diff(tokens, _timm_deep_prompts(tm, x, torch_prompts, in_front=True)) < ATOL
  assert _max_diff(tokens, _features(fm, jnp.asarray(x))) > 1e-2  # the prompts did act


def test_resample_function_matches_timm():
  rng = np.random.RandomState(0)
  for old, new, prefix in [(14, 4, 1), (4, 6, 1), (14, 24, 2), (7, 5, 1)]:
    pe = rng.randn(1, prefix + old * old, 16).astype(np.float32)
    ref = timm_resample(torch.from_numpy(pe), new_size=[new, new], num_prefix_tokens=prefix).numpy()
    ours = vit_module.resample_abs_pos_embed(pe, new, prefix)
    assert ours.shape == ref.shape
    assert _max_diff(ours, ref) < 1e-5, (old, new)


@pytest.mark.parametrize("distilled,new_size", [(False, 48), (False, 24), (True, 40)])
def test_create_with_other_img_size_resamples_like_timm(tmp_path, distilled, new_size):
  name = "deit_small_distilled_patch16_224" if distilled else "vit_small_patch16_224"
  tm = _timm_tiny(distilled)
  arch = {**get_entry(name).arch, **TINY}
  write_weights_dir(tmp_path / "w", model_name=name, family="vit", arch=arch, flat=_flat_from(tm, arch),
                    pretrained_cfg=get_entry(name).pretrained_cfg, source="test", dropped_keys=[])
  # timm's own path: a model for the new size loading the same state dict through its checkpoint filter.
  cls = VisionTransformerDistilled if distilled else TimmViT
  tm_new = cls(**{**TINY, "img_size": new_size}, num_classes=10).eval()
  tm_new.load_state_dict(checkpoint_filter_fn(tm.state_dict(), tm_new))
  fm = create(name, weights=str(tmp_path / "w"), **{**TINY, "img_size": new_size})
  x = _images(size=new_size)
  assert fm.pos_embed[...].shape == tuple(tm_new.pos_embed.shape)
  assert _max_diff(_pooled(fm, jnp.asarray(x)), _timm_pooled(tm_new, x)) < ATOL


def test_bfloat16_compute_keeps_float32_params():
  tm = _timm_tiny()
  fm = _flax_from(tm, "vit_small_patch16_224", TINY, dtype="bfloat16")
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(fm, nnx.Param)))
  x = _images()
  out = _pooled(fm, jnp.asarray(x))
  assert out.dtype == jnp.bfloat16
  ref = _timm_pooled(tm, x)
  assert _max_diff(out, ref) / np.abs(ref).max() < 5e-2


def test_bad_inputs_name_the_problem():
  fm = _flax_from(_timm_tiny(), "vit_small_patch16_224", TINY)
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
def test_variants_and_tags_carry_timms_pretrained_cfgs(name):
  from timm.models import get_pretrained_cfg as timm_cfg

  entry = get_entry(name)
  tagged = [f"{name}.{tag}" for tag in entry.pretrained_tags]
  default_tag = timm.models.get_pretrained_cfg(name).tag  # timm's default weights for the bare name
  pairs = [(f"{name}.{default_tag}", get_pretrained_cfg(name))] + [(n, get_pretrained_cfg(n)) for n in tagged]
  for full, ours in pairs:
    ref = timm_cfg(full)
    assert ours.mean == pytest.approx(ref.mean) and ours.std == pytest.approx(ref.std), full
    assert (ours.input_size, ours.crop_pct, ours.interpolation) == (ref.input_size[-1], ref.crop_pct,
                                                                     ref.interpolation), full
  # architecture as timm's named model
  tm = timm.create_model(name, pretrained=False, num_classes=0, device="meta")  # shapes only, no init
  arch = entry.arch
  assert (arch["embed_dim"], arch["depth"], arch["num_heads"], arch["patch_size"], arch["img_size"]) == (
      tm.embed_dim, len(tm.blocks), tm.blocks[0].attn.num_heads, tm.patch_embed.patch_size[0],
      tm.patch_embed.img_size[0])
  assert arch.get("distilled", False) == isinstance(tm, VisionTransformerDistilled)
  with pytest.raises(KeyError, match="known tags"):
    get_pretrained_cfg(f"{name}.no_such_tag")
