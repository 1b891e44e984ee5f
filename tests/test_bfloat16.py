"""config.compute_dtype = 'bfloat16': the forward and backward pass of a tiny ViT and ResNet agree with float32
within the tolerances below, and parameters, optimizer state and BatchNorm statistics stay float32.

bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 %). Measured on CPU (16 images, random init,
Proxy-Anchor), with the tolerances asserted here (about 2-3x the measurement):

  backbone                          loss (rel.)  embeddings (min row cosine)  gradients (rel. L2 error, cosine)
  ViT (depth 2, width 64)           0.15 %       0.99997                       2.6 %, 0.9997
  ResNet, BatchNorm frozen          0.05 %       0.99998                       11 %,  0.994
  ResNet, BatchNorm in train mode   0.3 %        0.99998                       29 %,  0.956

  asserted                          1 %          0.9995                        ViT 8 %, 0.998; ResNet frozen
                                                                               25 %, 0.98; train mode 60 %, 0.85

The gradients of a ResNet whose BatchNorm normalises with the batch's own statistics are the least accurate:
the backward pass through batch statistics subtracts the batch means of the incoming gradients, a cancellation
that turns bfloat16's rounding of the activations into a larger relative error, most of all in the first
layers of a network this narrow (8 channels) at random init. The loss and the embeddings agree as closely as
with frozen statistics. Mixed precision is a speed option for accelerators (benchmarks/gpu_suite.py measures
it); the recipes' numbers are float32's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from method_configs import TINY_CONFIGS
from test_methods_contract import _first_step
from test_methods_metric_loss import TINY_RESNET, TINY_VIT, _loss, method_config

from dml_jax import methods
from dml_jax.train import loop

CASES = {  # name: (backbone, head, overrides, bn_freeze, gradient relative error, gradient cosine)
    "vit": ("vit_small_patch16_224", "linear", TINY_VIT, False, 0.08, 0.998),
    "resnet_frozen_bn": ("resnet50", "gap_gmp_linear", TINY_RESNET, True, 0.25, 0.98),
    "resnet_train_bn": ("resnet50", "gap_gmp_linear", TINY_RESNET, False, 0.60, 0.85),
}
LOSS_RTOL = 0.01
EMBEDDING_COSINE = 0.9995


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("case", sorted(CASES))
def test_bfloat16_forward_and_backward_agree_with_float32(case):
  backbone, head, overrides, bn_freeze, grad_error, grad_cosine = CASES[case]
  m32, m16 = (methods.build(method_config(backbone, head, overrides, bn_freeze=bn_freeze, compute_dtype=dtype),
                            num_classes=5) for dtype in ("float32", "bfloat16"))
  params, state = m32.init(jax.random.key(0))
  m16.init(jax.random.key(0))
  rng = np.random.default_rng(1)
  batch = {"image": jnp.asarray(rng.normal(size=(16, 32, 32, 3)), jnp.float32),
           "label": jnp.arange(16, dtype=jnp.int32) % 5}
  (l32, _), g32 = jax.jit(jax.value_and_grad(lambda p: _loss(m32, p, state, batch), has_aux=True))(params)
  (l16, aux16), g16 = jax.jit(jax.value_and_grad(lambda p: _loss(m16, p, state, batch), has_aux=True))(params)

  assert l16.dtype == jnp.float32
  assert abs(float(l16) - float(l32)) <= LOSS_RTOL * abs(float(l32)), (float(l16), float(l32))
  # Gradients: float32 leaves (the casts' transposes bring them back), close to float32's as a whole.
  assert {x.dtype for x in jax.tree.leaves(g16)} == {jnp.dtype(jnp.float32)}
  a, b = _flat(g32), _flat(g16)
  error, cosine = np.linalg.norm(b - a) / np.linalg.norm(a), a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  assert error <= grad_error and cosine >= grad_cosine, (error, cosine)
  # BatchNorm statistics updated in train mode stay float32.
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(aux16[1]) if jnp.issubdtype(x.dtype, jnp.floating))
  # Evaluation embeddings: float32, unit rows, the same directions.
  e32 = np.asarray(jax.jit(m32.embed_fn)(params, state, batch["image"]))
  e16 = np.asarray(jax.jit(m16.embed_fn)(params, state, batch["image"]))
  assert e16.dtype == np.float32
  assert np.min(np.sum(e32 * e16, axis=1)) >= EMBEDDING_COSINE


def test_a_bfloat16_train_step_keeps_parameters_and_optimizer_state_float32(tmp_path):
  config = TINY_CONFIGS["metric_loss"]()  # the tiny ResNet, BatchNorm in train mode
  config.compute_dtype = "bfloat16"
  trainer = loop.Trainer(config, tmp_path / "run")
  try:
    initial, _, state, metrics = _first_step(trainer)
  finally:
    trainer.close()
  assert np.isfinite(float(metrics["loss"]))
  for part in ("params", "opt_state", "method_state"):
    floating = [x for x in jax.tree.leaves(state[part]) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floating and {x.dtype for x in floating} == {jnp.dtype(jnp.float32)}, part
  # The step moved the parameters by float32 updates: relative changes below bfloat16's resolution (2^-9) are
  # kept, not rounded away.
  before = np.concatenate([np.ravel(x) for x in jax.tree.leaves(initial["params"])])
  after = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(state["params"])])
  moved = (before != after) & (before != 0)
  assert np.any(np.abs(after - before)[moved] < 2.0 ** -9 * np.abs(before[moved]))
