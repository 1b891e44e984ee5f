"""dml_jax.backbones.attention against jax.nn.dot_product_attention: values and all three input gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dml_jax.backbones import attention


def _inputs(b, n, m, h, hd, spread, dtype=jnp.float32):
  kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(kq, (b, n, h, hd)) * spread
  k = jax.random.normal(kk, (b, m, h, hd)) * spread
  v = jax.random.normal(kv, (b, m, h, hd))
  probe = jax.random.normal(kg, (b, n, h, hd))  # a random cotangent for the output
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), probe.astype(dtype)


def _value_and_grads(fn, q, k, v, probe):
  def loss(q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * probe.astype(jnp.float32))
  return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("n, m, spread", [(197, 197, 1.0), (5, 9, 1.0), (17, 17, 6.0)])
def test_matches_jax_attention_and_its_gradients(n, m, spread):
  # spread 6 gives logits in the hundreds: the softmax must subtract its row maximum. Two float32 computations
  # of a logit differ by about |logit| * 6e-8, and a probability by as much relatively, hence the bound.
  q, k, v, probe = _inputs(2, n, m, 3, 16, spread)
  out, grads = jax.jit(lambda *a: _value_and_grads(attention.dot_product_attention, *a))(q, k, v, probe)
  ref_out, ref_grads = _value_and_grads(jax.nn.dot_product_attention, q, k, v, probe)
  logit_bound = float(jnp.max(jnp.abs(jnp.einsum("bnhd,bmhd->bhnm", q, k)))) / 4
  tol = 2e-6 * max(logit_bound, 5.0)
  assert out.shape == ref_out.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref_out, rtol=0, atol=tol * float(jnp.max(jnp.abs(v))))
  for name, g, r in zip("qkv", grads, ref_grads):
    assert np.all(np.isfinite(g)), name
    np.testing.assert_allclose(g, r, rtol=0, atol=tol * float(jnp.max(jnp.abs(r))), err_msg=f"d{name}")


def test_bfloat16_inputs_give_bfloat16_outputs_near_float32():
  q, k, v, probe = _inputs(2, 33, 33, 2, 8, 1.0, jnp.bfloat16)
  out, grads = _value_and_grads(attention.dot_product_attention, q, k, v, probe)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  f32 = [t.astype(jnp.float32) for t in (q, k, v, probe)]
  ref_out, ref_grads = _value_and_grads(jax.nn.dot_product_attention, *f32)
  np.testing.assert_allclose(out.astype(jnp.float32), ref_out, atol=3e-2)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g.astype(jnp.float32), r, atol=3e-2 * float(jnp.max(jnp.abs(r))))
