"""Pairwise building blocks: similarity and distance matrices, label masks. All fixed-shape and jittable."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cosine_similarity(x: jax.Array, y: jax.Array) -> jax.Array:
  """x: float [N, D], y: float [M, D], both already L2-normalised -> x @ y.T, float [N, M]."""
  return jnp.einsum("nd,md->nm", x, y, precision=jax.lax.Precision.HIGHEST)


def squared_distances(x: jax.Array, y: jax.Array) -> jax.Array:
  """max(|x_i|^2 + |y_j|^2 - 2 x_i.y_j, 0): float [N, D], [M, D] -> float [N, M].

  The Gram-matrix form that the D&C code's `pdist` and torch's `cdist` (for more than 25 rows) use; the
  clamp removes small negative values from cancellation (their gradient is then 0).
  """
  x_sq = jnp.sum(jnp.square(x), axis=-1)
  y_sq = jnp.sum(jnp.square(y), axis=-1)
  return jnp.maximum(x_sq[:, None] + y_sq[None, :] - 2.0 * cosine_similarity(x, y), 0.0)


def safe_sqrt(squared: jax.Array) -> jax.Array:
  """sqrt with gradient 0 (not inf/NaN) at 0, as torch's `cdist`; float [...] -> float [...]."""
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def euclidean_distances(x: jax.Array, y: jax.Array) -> jax.Array:
  """|x_i - y_j|: float [N, D], [M, D] -> float [N, M], with a gradient-safe square root at 0."""
  return safe_sqrt(squared_distances(x, y))


def same_label_mask(labels: jax.Array, *, exclude_diagonal: bool = True) -> jax.Array:
  """labels: int [B] -> bool [B, B], True where labels match (the diagonal excluded by default).

  With `exclude_diagonal` these are the positive pairs of PML's `get_all_pairs_indices`.
  """
  same = labels[:, None] == labels[None, :]
  if exclude_diagonal:
    same = same & ~jnp.eye(labels.shape[0], dtype=bool)
  return same


def different_label_mask(labels: jax.Array) -> jax.Array:
  """labels: int [B] -> bool [B, B], True where labels differ (the negative pairs)."""
  return labels[:, None] != labels[None, :]


def one_hot_labels(labels: jax.Array, num_classes: int) -> jax.Array:
  """labels: int [B] in [0, num_classes) -> bool [B, C] (the positive sample-to-proxy pairs)."""
  return labels[:, None] == jnp.arange(num_classes, dtype=labels.dtype)[None, :]
