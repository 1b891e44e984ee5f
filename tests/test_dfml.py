"""DFML without torch: golden numbers recorded from the authors' own code, the straight-through router, the
detach points of the matching terms, evaluation on the full stream, loading rules.

tests/data/dfml_authors_3edb993.npz holds what the official code (`wangck20/DFML` at commit 3edb993, its
vendored timm 0.6.2.dev0, run on CPU with torch 2.14) computes for `dfml_inputs.reference_inputs(0)`: the
README's `convert.py` applied to the plain state dict, the model loaded with strict=False and the routers
set to the inputs' kernels, one train-mode forward and train.py's objective and backward. Its only change
was the crash fix in deit.py's distilled `forward_features` (unpack the four values a block returns and
return the eight `forward` expects); train.py's `range(12)` ran over the tiny model's two blocks, keeping
the `/ 12`. Stored: the loss and its terms, m1 and m2, the router and proxy gradients and the norm of every
parameter's gradient.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dfml_inputs import (
  CLASSES,
  DEPTH,
  GROUPS,
  LABELS,
  TINY_DEIT,
  authors_names,
  build,
  reference_inputs,
  tiny_config,
  write_plain_weights,
)

from dml_jax import methods
from dml_jax import pytree as tree_lib
from dml_jax.backbones import factorized_vit

GOLDEN = pathlib.Path(__file__).parent / "data" / "dfml_authors_3edb993.npz"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  inputs = reference_inputs(0)
  weights = write_plain_weights(inputs["state_dict"], tmp_path_factory.mktemp("deit"))
  method, params = build(inputs, weights)
  images, labels = jnp.asarray(inputs["images"]), jnp.asarray(inputs["labels"])

  # One compiled reverse pass for the objective and each of its parts (rows of a Jacobian).
  objectives = ("loss", "attn_distance", "mlp_distance", "pa_full", "pa_routed")

  def parts(p):
    terms = method.loss_terms(p, images, labels)
    return jnp.stack([jnp.sum(terms[k]) for k in objectives]), terms

  jacobian, terms = jax.device_get(jax.jit(jax.jacrev(parts, has_aux=True))(params))
  jacobian = tree_lib.flatten(jacobian)

  def grads(key="loss"):
    """(terms, {path: gradient of the objective part `key`})."""
    return terms, {p: g[objectives.index(key)] for p, g in jacobian.items()}

  return dict(inputs=inputs, weights=weights, method=method, params=params, grads=grads)


def _rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()))


def test_golden_numbers_of_the_authors_code(tiny):
  golden = np.load(GOLDEN)
  terms, grads = tiny["grads"]()
  for key in ("loss", "pa_full", "pa_routed", "attn_distance", "mlp_distance"):
    assert _rel_err(terms[key], golden[key]) < 1e-5, (key, terms[key], golden[key])
  assert _rel_err(0.1 * terms["distill_embedding"], golden["weighted_embedding_distill"]) < 1e-5
  assert _rel_err(terms["embedding_full"], golden["m1"]) < 1e-5
  assert _rel_err(terms["embedding_routed"], golden["m2"]) < 1e-5
  ours = authors_names(grads)
  for key in golden.files:
    if key.startswith("grad/"):
      assert _rel_err(ours[key[len("grad/"):]], golden[key]) < 1e-5, key
  norms = {name: np.linalg.norm(ours[name].astype(np.float64)) for name in golden["gradnorm_names"]}
  for name, norm in zip(golden["gradnorm_names"], golden["gradnorms"]):
    assert abs(norms[name] - norm) <= 1e-5 * max(1.0, norm), (name, norms[name], norm)


def test_straight_through_is_one_hot_forward_and_softmax_backward():
  logits = jnp.asarray(np.random.RandomState(0).randn(5, GROUPS), jnp.float32)
  weights = factorized_vit.straight_through_top1(logits)
  np.testing.assert_allclose(weights, jax.nn.one_hot(jnp.argmax(logits, -1), GROUPS), atol=1e-7)
  cotangent = jnp.asarray(np.random.RandomState(1).randn(5, GROUPS), jnp.float32)
  through_st = jax.grad(lambda x: jnp.sum(factorized_vit.straight_through_top1(x) * cotangent))(logits)
  through_softmax = jax.grad(lambda x: jnp.sum(jax.nn.softmax(x) * cotangent))(logits)
  np.testing.assert_allclose(through_st, through_softmax, atol=1e-7)
  assert np.abs(through_st).max() > 1e-3  # the gradient is not cut


def test_safe_norm_is_exact_and_has_zero_gradient_at_zero():
  x = jnp.asarray([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_array_equal(factorized_vit.safe_norm(x), [5.0, 0.0])
  grad = jax.grad(lambda v: jnp.sum(factorized_vit.safe_norm(v)))(x)
  np.testing.assert_allclose(grad, [[0.6, 0.8], [0.0, 0.0]])


def test_gradient_paths_follow_the_codes_detach_points(tiny):
  """Attention matching terms reach only the attention routers; MLP matching terms reach every parameter but
  the final norm; the full-stream Proxy-Anchor term never reaches a router."""
  paths = set(tree_lib.flatten(tiny["params"]))
  routers = {p for p in paths if factorized_vit.GATE_PATH.fullmatch(p.removeprefix("model/backbone/"))}
  assert routers == tiny["method"].param_selectors(tiny["params"])["routers"] and len(routers) == 2 * DEPTH

  def reached(keys):
    return {p for p, g in tiny["grads"](keys)[1].items() if np.any(g != 0)}

  assert reached("attn_distance") == {p for p in routers if "/attn/gate/" in p}
  model = {p for p in paths if p.startswith("model/")}
  assert reached("mlp_distance") == model - {"model/backbone/norm/scale", "model/backbone/norm/bias"}
  full_stream = reached("pa_full")
  assert not full_stream & routers and "loss/proxies" in full_stream
  assert reached("pa_routed") >= routers


def test_evaluation_runs_the_full_stream_only(tiny):
  method, params, inputs = tiny["method"], tiny["params"], tiny["inputs"]
  images = jnp.asarray(inputs["images"])
  terms, _ = tiny["grads"]()
  emb = jax.jit(method.embed_fn)(params, {}, images)
  np.testing.assert_allclose(emb, terms["embedding_full"], atol=1e-6)
  # Other routers, same evaluation embedding.
  flat = tree_lib.flatten(params)
  for p in method.param_selectors(params)["routers"]:
    flat[p] = -flat[p]
  other = tree_lib.nest(flat, tree_lib.key_index(params))
  np.testing.assert_array_equal(jax.jit(method.embed_fn)(other, {}, images), emb)


def test_random_init_layout_and_router_init():
  method = methods.build(tiny_config(), num_classes=CLASSES)
  params, state = method.init(jax.random.key(0))
  flat = tree_lib.flatten(params)
  assert state == {}
  d, g = 48, GROUPS
  expected = {"model/backbone/blocks/0/attn/qkv/kernel": (g, d, 3 * d // g), "model/backbone/blocks/0/attn/qkv/bias":
              (g, 3 * d // g), "model/backbone/blocks/0/attn/proj/kernel": (g, d // g, d),
              "model/backbone/blocks/0/attn/proj/bias": (g, d), "model/backbone/blocks/0/attn/gate/kernel": (d, g),
              "model/backbone/blocks/0/mlp/fc1/kernel": (g, d, 4 * d // g), "model/backbone/blocks/0/mlp/fc2/kernel":
              (g, 4 * d // g, d), "model/backbone/blocks/0/gate/kernel": (d, g), "model/backbone/dist_token": (1, 1, d),
              "loss/proxies": (CLASSES, d)}
  assert {k: flat[k].shape for k in expected} == expected
  assert method.embedding_dim == d
  # Routers ~ N(0, 0.02^2) (timm's trunc_normal_ with absolute bounds +-2 truncates nothing), proxies N(0, 2/C).
  big = factorized_vit.init_router_params(jax.random.key(1), 12, 384, 3)
  values = np.concatenate([v.ravel() for v in big.values()])
  assert abs(values.std() - 0.02) < 1e-3 and np.abs(values).max() > 3 * 0.02
  assert abs(np.std(flat["loss/proxies"]) - np.sqrt(2 / CLASSES)) < 0.25 * np.sqrt(2 / CLASSES)


def test_weights_must_be_a_plain_vit_directory_of_the_same_model(tmp_path):
  inputs = reference_inputs(0)
  weights = write_plain_weights(inputs["state_dict"], tmp_path / "deit")
  with pytest.raises(ValueError, match="plain 'vit_small_patch16_224'"):
    factorized_vit.create("vit_small_patch16_224", weights=weights, img_size=32, patch_size=8, depth=2, embed_dim=48,
                          num_heads=6)
  with pytest.raises(ValueError, match="divisible"):
    factorized_vit.FactorizedVisionTransformer(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=4,
                                               rngs=__import__("flax").nnx.Rngs(0))
  with pytest.raises(ValueError, match="embedding_dim"):
    c = tiny_config(weights)
    c.model.embedding_dim = 64
    methods.build(c, num_classes=CLASSES).init(jax.random.key(0))


def test_bfloat16_compute_keeps_float32_parameters_and_gradients(tiny):
  c = tiny_config(tiny["weights"])
  c.compute_dtype = "bfloat16"
  method = methods.build(c, num_classes=CLASSES)
  method.init(jax.random.key(0))
  images, labels = jnp.asarray(tiny["inputs"]["images"]), jnp.asarray(tiny["inputs"]["labels"])
  def loss(p):
    terms = method.loss_terms(p, images, labels)
    return terms["loss"], terms

  (loss, terms), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(tiny["params"])
  assert np.isfinite(float(loss)) and terms["embedding_full"].dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  reference, _ = tiny["grads"]()
  assert abs(float(terms["pa_full"]) - float(reference["pa_full"])) < 0.05 * abs(float(reference["pa_full"]))


def test_the_routed_stream_gathers_nothing(tiny):
  """Every sub-block is computed densely and selected by the one-hot weights: the step (forward and backward)
  contains no gather or dynamic slice, so no per-token copy of sub-block weights can exist."""
  method, params, inputs = tiny["method"], tiny["params"], tiny["inputs"]
  images, labels = jnp.asarray(inputs["images"]), jnp.asarray(inputs["labels"])
  text = str(jax.make_jaxpr(jax.grad(lambda p: method.loss_terms(p, images, labels)["loss"]))(params))
  assert "dot_general" in text
  for primitive in ("gather", "dynamic_slice", "scatter"):
    assert f" {primitive}[" not in text and f"= {primitive}" not in text, primitive


def test_the_training_step_does_not_recompute_across_blocks():
  """The factorized blocks keep vit.py's flat token stream and LayerNorm, so XLA's CPU fusion pass does not
  rebuild the residual-stream gradient in every block (tests/test_vit_fusion.py): the largest fusion of the
  compiled DFML step (forward, backward, AdamW) is the same at depth 2 and 4."""
  import optax
  from test_vit_fusion import fusion_operand_counts

  largest = {}
  for depth in (2, 4):
    method = methods.build(tiny_config("", {**TINY_DEIT, "depth": depth}), num_classes=CLASSES)
    params, _ = method.init(jax.random.key(0))
    images = jnp.asarray(np.random.RandomState(0).randn(len(LABELS), 32, 32, 3), jnp.float32)
    opt = optax.adamw(1e-3, weight_decay=1e-4)

    def step(p, opt_state, method=method, images=images, opt=opt):
      loss, grads = jax.value_and_grad(lambda q: method.loss_terms(q, images, jnp.asarray(LABELS))["loss"])(p)
      updates, opt_state = opt.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state, loss

    compiled = jax.jit(step).lower(params, opt.init(params)).compile()
    largest[depth] = max(fusion_operand_counts(compiled.as_text()))
  assert largest[4] <= largest[2], largest
