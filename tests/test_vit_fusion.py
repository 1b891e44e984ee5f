"""The compiled ViT training step must not recompute the backward chain across blocks (XLA fusion check).

XLA's CPU fusion pass may duplicate cheap elementwise producers into every consumer. With jax's own
LayerNorm gradient it did so along the residual stream: each block's gradient fusion re-added the
contributions of all later blocks instead of reading the computed value, so the number of operands of
those fusions, and the bytes they read, grew with depth (quadratic cost in depth; more than a third of a
ViT-S/16 fine-tuning step on CPU). `dml_jax.backbones.vit` avoids it with a hand-written LayerNorm VJP and
flat [B*N, D] token streams. These tests compile a tiny ViT's training step (forward, backward, AdamW) at
two depths and check, on the optimised HLO, that the largest fusion (by operand count) does not grow with
depth. The last test puts back the autodiffed LayerNorm to show that the check catches the pattern.
(`cost_analysis`'s bytes accessed is no use here: on a model this small, boundary effects between depths
are larger than the recomputed bytes.) The last two tests check that the hand-written backward gives the
gradients of jax's autodiff (flax's LayerNorm) and of timm.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dml_jax.backbones import vit as vit_module

TINY = dict(img_size=32, patch_size=8, embed_dim=64, num_heads=4)  # 16 patches + cls, 4 heads of 16
DEPTHS = (2, 4)  # with the recomputation the largest fusion gains ~7 operands per block
BATCH = 4
NUM_PROMPTS = 3
# `%name = f32[...] fusion(%a, %b, ...), kind=kLoop, ...` in XLA's HLO text (operands on one line).
_FUSION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\bfusion\((.*?)\),\s*kind=")


def fusion_operand_counts(hlo_text: str) -> list[int]:
  """Operand count of every fusion instruction in an optimised HLO module's text."""
  counts = []
  for line in hlo_text.splitlines():
    m = _FUSION.match(line)
    if m:
      counts.append(len([o for o in m.group(1).split(",") if o.strip()]))
  return counts


def _compiled_train_step(depth: int, prompts: bool):
  """One Proxy-NCA-like training step of a tiny random ViT: features -> L2 -> cosine logits -> CE -> AdamW."""
  model = vit_module.VisionTransformer(depth=depth, **TINY, rngs=nnx.Rngs(0))
  graph, params = nnx.split(model, nnx.Param)
  opt = optax.adamw(1e-3, weight_decay=1e-4)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(BATCH, TINY["img_size"], TINY["img_size"], 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, size=BATCH))
  proxies = jnp.asarray(rng.normal(size=(5, TINY["embed_dim"])), jnp.float32)
  # Deep prompts as VPTSP's: per-sample in even blocks, shared in odd ones, the same count everywhere so
  # that every block adds the same work.
  bank = {i: jnp.full((BATCH, NUM_PROMPTS, TINY["embed_dim"]) if i % 2 == 0 else (NUM_PROMPTS, TINY["embed_dim"]),
                      0.1 * (i + 1)) for i in range(depth)} if prompts else None

  def loss_fn(p, pr):
    emb = nnx.merge(graph, p)(images, pr)
    emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    logits = 16.0 * emb @ (proxies / jnp.linalg.norm(proxies, axis=-1, keepdims=True)).T
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(p, pr, opt_state):
    loss, (g, g_pr) = jax.value_and_grad(loss_fn, argnums=(0, 1))(p, pr)
    updates, opt_state = opt.update((g, g_pr), opt_state, (p, pr))
    p, pr = optax.apply_updates((p, pr), updates)
    return p, pr, opt_state, loss

  return jax.jit(step).lower(params, bank, opt.init((params, bank))).compile()


def _largest_fusion(depth: int, prompts: bool) -> int:
  return max(fusion_operand_counts(_compiled_train_step(depth, prompts).as_text()))


@pytest.mark.parametrize("prompts", [False, True], ids=["full_finetune", "deep_prompts"])
def test_train_step_has_no_recomputing_fusions(prompts):
  largest = {d: _largest_fusion(d, prompts) for d in DEPTHS}
  assert largest[DEPTHS[1]] <= largest[DEPTHS[0]], f"largest fusion grows with depth: {largest} operands"


def test_check_catches_autodiffed_layer_norm(monkeypatch):
  def flax_layer_norm(dim, *, dtype, param_dtype, rngs):
    return nnx.LayerNorm(dim, epsilon=1e-6, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)

  monkeypatch.setattr(vit_module, "_layer_norm", flax_layer_norm)
  largest = {d: _largest_fusion(d, prompts=False) for d in DEPTHS}
  if largest[DEPTHS[1]] <= largest[DEPTHS[0]]:
    pytest.skip(f"this XLA ({jax.__version__}, {jax.default_backend()}) no longer recomputes the chain with "
                f"an autodiffed LayerNorm ({largest} operands)")
  assert largest[DEPTHS[1]] >= largest[DEPTHS[0]] + DEPTHS[1] - DEPTHS[0], largest  # at least 1 per block


# -- the hand-written backward gives the same gradients ------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_autodiffed_flax_layer_norm(dtype):
  rng = np.random.default_rng(0)
  # A residual-stream-like input: large common offset per token, so the two-pass variance matters.
  x = jnp.asarray(rng.normal(size=(3, 5, 48)) + 30 * rng.normal(size=(3, 5, 1)), jnp.float32).astype(dtype)
  w = jnp.asarray(rng.normal(size=(3, 5, 48)), jnp.float32)
  ours = vit_module.LayerNorm(48, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  ref = nnx.LayerNorm(48, epsilon=1e-6, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32,
                      rngs=nnx.Rngs(0))
  scale, bias = jnp.asarray(1 + 0.3 * rng.normal(size=(2, 48)), jnp.float32) - jnp.asarray([[0.0], [1.0]])
  for m in (ours, ref):  # the same non-trivial affine parameters
    m.scale[...], m.bias[...] = scale, bias

  def loss(m, x):
    return jnp.sum(m(x).astype(jnp.float32) * w)

  (l_ours, (g_ours, gx_ours)), (l_ref, (g_ref, gx_ref)) = [
      nnx.value_and_grad(loss, argnums=(0, 1))(m, x) for m in (ours, ref)]
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  assert ours(x).dtype == ref(x).dtype == dtype
  np.testing.assert_allclose(np.float32(l_ours), np.float32(l_ref), rtol=tol)
  pairs = [(gx_ours, gx_ref), (g_ours["scale"][...], g_ref["scale"][...]), (g_ours["bias"][...], g_ref["bias"][...])]
  for a, b in pairs:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= tol * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())


def test_gradients_match_timm(ref):
  """Every parameter gradient of a tiny ViT (depth 2) against timm's, through the restructured blocks."""
  from seeded import timm_vit_state_dict

  from dml_jax.convert import vit as convert_vit
  from dml_jax.convert.state_dict_reader import StateDictReader
  from dml_jax.convert.weights_dir import strict_update

  arch = dict(TINY, depth=2)
  sd = timm_vit_state_dict(0, **arch)  # every tensor perturbed: biases and LayerNorms matter
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  w = rng.normal(size=(2, TINY["embed_dim"])).astype(np.float32)

  def compute():
    import live
    import torch

    tm = live.timm_vit(sd, **arch)
    (torch.tanh(tm(live.nchw(x))) * torch.from_numpy(w)).sum().backward()
    return {k: p.grad.numpy() for k, p in tm.named_parameters()}

  def converted(tensors):
    return convert_vit.from_torch(StateDictReader(tensors, "test"), arch)

  expected = converted(dict(ref("vit_fusion/tiny_vit_gradients", compute)))
  model = nnx.eval_shape(lambda: vit_module.VisionTransformer(**arch, rngs=nnx.Rngs(0)))
  strict_update(model, converted(sd), source="test")
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(jnp.tanh(m(jnp.asarray(x))) * w)))(model)
  ours = {"/".join(str(k) for k in path): np.asarray(v) for path, v in nnx.to_flat_state(grads)}
  assert set(ours) == set(expected)
  for key, g in expected.items():
    assert np.abs(ours[key] - g).max() <= 1e-4 * max(np.abs(g).max(), 1e-3), key
