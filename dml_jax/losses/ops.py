"""Numerical building blocks shared by the losses: L2 normalisation, masked log-sum-exp, dtype policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def as_compute_dtype(x: jax.Array) -> jax.Array:
  """Upcasts half precision to float32 (float64 stays float64): logits and exponents are never bf16/fp16."""
  return jnp.asarray(x).astype(jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))


def l2_normalize(x, axis: int = -1, eps: float = 1e-12, *, clamp_norm: bool = False):
  """The one L2 normalisation of the project, in the two forms the seed codes use.

  clamp_norm False: x / sqrt(sum(x^2) + eps), the Proxy-Anchor code's `l2_norm` (eps inside the square
    root), which also keeps the gradient finite at x = 0.
  clamp_norm True: x / max(|x|, eps), torch's F.normalize (VPTSP, PML, the evaluation of every seed).
  Both agree to ~eps / |x|^2 on non-zero rows.

  A jax array gives a jax array (jittable, differentiable); a numpy array gives float32 numpy with the
  norms accumulated in float64 (host-side evaluation of large embedding sets).
  """
  if isinstance(x, np.ndarray):
    x = np.asarray(x, np.float32)
    sq = np.sum(np.square(x, dtype=np.float64), axis=axis, keepdims=True)
    scale = 1.0 / np.maximum(np.sqrt(sq), eps) if clamp_norm else 1.0 / np.sqrt(sq + eps)
    return (x * scale).astype(np.float32)
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  if clamp_norm:
    return x / jnp.maximum(jnp.sqrt(sq), eps)
  return x * jax.lax.rsqrt(sq + eps)


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
