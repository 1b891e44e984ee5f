"""Triplet margin loss with semi-hard / hard / batch-hard mining, as PML's `TripletMarginLoss` with
`TripletMarginMiner` (or `BatchHardMiner`). The Proxy-Anchor repository's triplet baseline is
semi-hard mining with margin 0.1 for both miner and loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dml_jax.losses._checks import check_embeddings_labels
from dml_jax.losses.mining import TRIPLET_KINDS, batch_hard_triplet_mask, triplet_margin_mask
from dml_jax.losses.ops import as_compute_dtype, l2_normalize
from dml_jax.losses.pairwise import euclidean_distances

MINING = TRIPLET_KINDS + ("batch_hard",)


def triplet_loss(embeddings: jax.Array, labels: jax.Array, *, margin: float = 0.1, mining: str = "semihard",
                 miner_margin: float | None = None, triplet_mask: jax.Array | None = None,
                 normalize_embeddings: bool = True) -> jax.Array:
  """Triplet margin loss averaged over the selected triplets with a non-zero loss; a float32 scalar.

    l_apn = relu(d(a, p) - d(a, n) + margin),  d = Euclidean distance of L2-normalised embeddings
    L     = mean of l_apn over selected triplets with l_apn > 0, 0 if there is none (`AvgNonZeroReducer`)

  Args:
    embeddings: float [B, D].
    labels: int [B].
    margin: the loss margin.
    mining: 'semihard' | 'hard' | 'all' | 'easy' (`mining.triplet_margin_mask`, PML `TripletMarginMiner`),
      or 'batch_hard' (`mining.batch_hard_triplet_mask`, PML `BatchHardMiner`).
    miner_margin: the miner's margin; None = `margin`.
    triplet_mask: optional bool [B, B, B] (anchor, positive, negative) used instead of mining.
    normalize_embeddings: L2-normalise here (PML's `LpDistance` does by default).

  Returns:
    float scalar.
  """
  check_embeddings_labels("triplet_loss", embeddings, labels)
  x = as_compute_dtype(embeddings)
  if normalize_embeddings:
    x = l2_normalize(x)
  dist = euclidean_distances(x, x)
  n = labels.shape[0]
  if triplet_mask is None:
    if mining not in MINING:
      raise ValueError(f"triplet_loss: mining must be one of {MINING}, got {mining!r}")
    mine_dist = jax.lax.stop_gradient(dist)
    if mining == "batch_hard":
      triplet_mask = batch_hard_triplet_mask(mine_dist, labels)
    else:
      triplet_mask = triplet_margin_mask(mine_dist, labels, margin=margin if miner_margin is None else miner_margin,
                                         kind=mining)
  elif triplet_mask.shape != (n, n, n):
    raise ValueError(f"triplet_loss: triplet_mask must have shape [{n}, {n}, {n}], got {triplet_mask.shape}")
  losses = jax.nn.relu(dist[:, :, None] - dist[:, None, :] + margin)  # [a, p, n]
  nonzero = triplet_mask.astype(bool) & (losses > 0)
  count = jnp.sum(nonzero)
  return jnp.sum(jnp.where(nonzero, losses, 0.0)) / jnp.maximum(count, 1).astype(x.dtype)
