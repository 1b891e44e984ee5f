"""Margin loss with distance-weighted sampling (Wu et al., ICCV 2017) as in the Divide & Conquer code
(`metriclearning/loss/margin_loss.py`, `metriclearning/sampler/triplets.py`; docs/methods/metric_loss.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dml_jax.losses._checks import check_embeddings_labels, check_label_range
from dml_jax.losses.mining import distance_weighted_sampling
from dml_jax.losses.ops import as_compute_dtype, l2_normalize
from dml_jax.losses.pairwise import squared_distances


def margin_loss_from_counts(embeddings: jax.Array, labels: jax.Array, beta: jax.Array, pos_counts: jax.Array,
                            neg_counts: jax.Array, *, margin: float = 0.2, nu: float = 0.0,
                            normalize_embeddings: bool = False) -> jax.Array:
  """The deterministic part of the margin loss, for triplets given as multiplicity masks; a scalar.

  Over the triplets (a, p, n) described by the masks (`distance_weighted_sampling`'s output):

    d(a, b)  = sqrt(|x_a - x_b|^2 + 1e-8)
    l_pos    = relu(d(a, p) - beta_a + margin),   l_neg = relu(beta_a - d(a, n) + margin)
    cnt      = #{l_pos > 0} + #{l_neg > 0}
    L        = (sum(l_pos + l_neg) + R) / cnt   if cnt > 0, else sum(l_pos + l_neg) (= 0, R dropped)

  with beta_a = beta[y_a] for a class-specific beta [C] or beta for a global scalar, and the D&C
  regulariser R = nu * sum_triplets |beta_{y_a}| (class-specific) or nu * |beta| (global).
  PML's `MarginLoss` agrees for nu = 0, and for class-specific betas > 0 with any nu; for a global beta
  with nu > 0 PML adds nu * beta undivided instead.

  Args:
    embeddings: float [B, D]; the D&C model outputs unit vectors and the loss does not re-normalise.
    labels: int [B].
    beta: float [] (global boundary) or float [C] (one per training class), learnable.
    pos_counts: float [B, B], pos_counts[a, p] = number of triplets of anchor a with positive p.
    neg_counts: float [B, B], neg_counts[a, n] = number of triplets of anchor a with negative n.
    margin: alpha in the D&C code (0.2).
    nu: weight of the L1 regulariser on beta (0 in the D&C reference runs).
    normalize_embeddings: L2-normalise first (off: D&C feeds normalised embeddings).

  Returns:
    float scalar.
  """
  check_embeddings_labels("margin_loss", embeddings, labels)
  beta = jnp.asarray(beta)
  n = labels.shape[0]
  for name, counts in (("pos_counts", pos_counts), ("neg_counts", neg_counts)):
    if counts.shape != (n, n):
      raise ValueError(f"margin_loss: {name} must have shape [batch, batch] = [{n}, {n}], got {counts.shape}")
  if beta.ndim > 1:
    raise ValueError(f"margin_loss: beta must be a scalar (global) or [num_classes], got shape {beta.shape}")
  class_specific = beta.ndim == 1
  if class_specific:
    check_label_range("margin_loss", labels, beta.shape[0], "class-specific betas")
  x = as_compute_dtype(embeddings)
  if normalize_embeddings:
    x = l2_normalize(x)
  beta = as_compute_dtype(beta).astype(x.dtype)
  dist = jnp.sqrt(squared_distances(x, x) + 1e-8)  # [a, b]
  beta_anchor = beta[labels] if class_specific else jnp.broadcast_to(beta, (n,))
  pos_losses = jax.nn.relu(dist - beta_anchor[:, None] + margin)
  neg_losses = jax.nn.relu(beta_anchor[:, None] - dist + margin)
  pos_counts = pos_counts.astype(x.dtype)
  neg_counts = neg_counts.astype(x.dtype)
  total = jnp.sum(pos_counts * pos_losses) + jnp.sum(neg_counts * neg_losses)
  active = jnp.sum(pos_counts * (pos_losses > 0)) + jnp.sum(neg_counts * (neg_losses > 0))
  if class_specific:
    triplets_per_anchor = jnp.sum(pos_counts, axis=1)
    regulariser = nu * jnp.sum(triplets_per_anchor * jnp.abs(beta_anchor))
  else:
    regulariser = nu * jnp.abs(beta)
  return jnp.where(active > 0, (total + regulariser) / jnp.maximum(active, 1.0), total)


def margin_loss(embeddings: jax.Array, labels: jax.Array, beta: jax.Array, *, rng: jax.Array,
                margin: float = 0.2, nu: float = 0.0, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4,
                far_weight: float = 1e-6, sample_far_positives: bool = True,
                normalize_embeddings: bool = False) -> jax.Array:
  """Margin loss on triplets drawn by D&C's distance-weighted sampler; a float32 scalar.

  Samples with `mining.distance_weighted_sampling(rng, embeddings, labels, ...)` (no gradient), then
  returns `margin_loss_from_counts`. See those two for the formulas.

  Args:
    embeddings: float [B, D], unit vectors (D enters the sampling density).
    labels: int [B].
    beta: float [] or [C] (see `margin_loss_from_counts`); D&C reference runs: global 1.2, not trained.
    rng: jax.random key for the sampling.
    margin, nu, normalize_embeddings: see `margin_loss_from_counts`.
    cutoff, nonzero_loss_cutoff, far_weight, sample_far_positives: see
      `mining.distance_weighted_negative_weights`; nonzero_loss_cutoff should be beta + margin (1.4).

  Returns:
    float scalar.
  """
  check_embeddings_labels("margin_loss", embeddings, labels)
  x = as_compute_dtype(embeddings)
  if normalize_embeddings:
    x = l2_normalize(x)
  pos_counts, neg_counts = distance_weighted_sampling(
      rng, jax.lax.stop_gradient(x), labels, cutoff=cutoff, nonzero_loss_cutoff=nonzero_loss_cutoff,
      far_weight=far_weight, sample_far_positives=sample_far_positives)
  return margin_loss_from_counts(x, labels, beta, pos_counts, neg_counts, margin=margin, nu=nu,
                                 normalize_embeddings=False)
