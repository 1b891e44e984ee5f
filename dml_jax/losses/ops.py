"""Numerical building blocks shared by the losses: L2 normalisation, masked log-sum-exp, dtype policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def as_compute_dtype(x: jax.Array) -> jax.Array:
  """Upcasts half precision to float32 (float64 stays float64): logits and exponents are never bf16/fp16."""
  return jnp.asarray(x).astype(jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / sqrt(sum(x^2) + eps) along `axis`.

  The Proxy-Anchor code's `l2_norm` (eps inside the square root), which also keeps the gradient finite
  at x = 0. PML's `F.normalize` divides by max(|x|, 1e-12) instead; both agree to ~eps / |x|^2.
  """
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + eps)


def masked_logsumexp(logits: jax.Array, mask: jax.Array, axis: int, *, add_one: bool = True) -> jax.Array:
  """log(1 + sum_{mask} exp(logits)) (or without the 1) along `axis`; 0 where the mask is empty.

  Args:
    logits: float [..., N, ...].
    mask: bool, broadcastable to `logits`; False entries do not contribute (and get zero gradient).
    axis: the reduced axis.
    add_one: include an extra logit 0, i.e. log(1 + sum exp) = softplus(logsumexp) (PML's
      `lmu.logsumexp(..., add_one=True)`).

  Returns:
    float, `logits` with `axis` removed. Rows whose mask is all False give 0 (as PML and the
    Proxy-Anchor code, where an empty sum gives log(1 + 0) = 0), also without `add_one`.
  """
  mask = jnp.broadcast_to(mask, logits.shape)
  masked = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(masked, axis=axis, keepdims=True)
  if add_one:
    row_max = jnp.maximum(row_max, 0.0)
  # The shift only stabilises; it carries no gradient. Empty rows have max -inf: shift by 0 instead.
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  summed = jnp.sum(jnp.where(mask, jnp.exp(masked - row_max), 0.0), axis=axis, keepdims=True)
  if add_one:
    summed = summed + jnp.exp(-row_max)
  any_kept = jnp.any(mask, axis=axis, keepdims=True)
  out = jnp.where(any_kept, jnp.log(jnp.where(any_kept, summed, 1.0)) + row_max, 0.0)
  return jnp.squeeze(out, axis=axis)
