"""Softmax attention with a hand-written backward that reads and writes each [N, N] array as few times as it can.

The numbers are those of `jax.nn.dot_product_attention` (and timm's attention) up to float32 rounding: logits
q.k / sqrt(head_dim) in float32, softmax over keys in float32, probabilities cast to the value dtype for the
second product. What differs is how often the [B, H, N, N] logits-sized arrays cross memory, which is what
attention costs on a CPU (at ViT-S/16, batch 16, each is 15 MB and a pass over it takes as long as one of the
attention matmuls):

- forward: the softmax as jax's (subtract the row maximum, exponentiate, divide by the row sum);
- backward: dlogits = P * (dP - delta) with delta = rowsum(dO * O), which equals rowsum(P * dP) (both are
  sum_d dO[n, d] O[n, d]) but is a reduction over [N, head_dim] instead of [N, N] (FlashAttention's identity);
  autodiff of the softmax reduces over [N, N];
- the scale multiplies q, not the logits, in both directions (see `_forward`).

Heads go to the front ([B, H, N, hd]) once, so every product is a plain batched matmul over B*H.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _heads_first(t: jax.Array) -> jax.Array:
  """[B, N, H, hd] <-> [B, H, N, hd]."""
  return jnp.swapaxes(t, 1, 2)


def _scale(t: jax.Array) -> jax.Array:
  """1/sqrt(head_dim) in t's dtype (t [..., head_dim])."""
  return jnp.asarray(t.shape[-1] ** -0.5, t.dtype)


def _forward(q: jax.Array, k: jax.Array, v: jax.Array):
  # The scale goes on q ([N, hd]) rather than on the logits ([N, N]), as timm's unfused attention does: XLA
  # would otherwise write the scaled logits as an array of their own, since both the row maximum and the
  # exponentials read them. For head_dim 64 the scale is a power of two and both orders give the same bits.
  qh = _heads_first(q) * _scale(q)
  kh, vh = _heads_first(k), _heads_first(v)
  probs = jax.nn.softmax(jnp.einsum("bhnd,bhmd->bhnm", qh, kh, preferred_element_type=_F32), axis=-1)
  out = jnp.einsum("bhnm,bhmd->bhnd", probs.astype(v.dtype), vh)
  return _heads_first(out), (qh, kh, vh, probs, out)


def _backward(residuals, d_out: jax.Array):
  qh, kh, vh, probs, out = residuals  # qh is the scaled q
  d_out = _heads_first(d_out)
  dv = jnp.einsum("bhnm,bhnd->bhmd", probs.astype(d_out.dtype), d_out)
  d_probs = jnp.einsum("bhnd,bhmd->bhnm", d_out, vh, preferred_element_type=_F32)
  delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1, keepdims=True)  # = rowsum(probs * d_probs)
  d_logits = (probs * (d_probs - delta)).astype(qh.dtype)
  dq = jnp.einsum("bhnm,bhmd->bhnd", d_logits, kh) * _scale(qh)
  dk = jnp.einsum("bhnm,bhnd->bhmd", d_logits, qh)
  return _heads_first(dq), _heads_first(dk), _heads_first(dv)


@jax.custom_vjp
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Per-head softmax attention without mask or bias, scale 1/sqrt(head_dim).

  Args:
    q, k, v: [B, N, H, head_dim] in the compute dtype (k and v may have another N than q).
  Returns:
    [B, N, H, head_dim] in the compute dtype; logits and softmax are float32.
  """
  return _forward(q, k, v)[0]


dot_product_attention.defvjp(_forward, _backward)
