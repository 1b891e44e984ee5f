"""Miners as fixed-shape masks (never index lists): triplet, batch-hard, multi-similarity, distance-weighted.

Every miner here only selects; it carries no gradient (the callers apply `stop_gradient` to its inputs).
A triplet selection is a bool mask [B, B, B] indexed (anchor, positive, negative); a pair selection is
a bool mask [B, B] indexed (anchor, other); the distance-weighted sampler returns multiplicities
[B, B] because the D&C code may repeat a positive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dml_jax.losses.ops import as_compute_dtype
from dml_jax.losses.pairwise import different_label_mask, same_label_mask, squared_distances

TRIPLET_KINDS = ("all", "hard", "semihard", "easy")


def triplet_margin_mask(distances: jax.Array, labels: jax.Array, *, margin: float, kind: str) -> jax.Array:
  """Triplets selected by PML's `TripletMarginMiner(margin, type_of_triplets=kind)` on a distance matrix.

  With m = d(a, n) - d(a, p) over all valid triplets (p != a same label, n other label):
    'all': m <= margin; 'hard': m <= margin and m <= 0; 'semihard': 0 < m <= margin; 'easy': m > margin.

  Args:
    distances: float [B, B], a distance (smaller = closer), e.g. Euclidean on normalised embeddings.
    labels: int [B].
    margin: the miner's margin.
    kind: one of TRIPLET_KINDS.

  Returns:
    bool [B, B, B], True at selected (anchor, positive, negative).
  """
  if kind not in TRIPLET_KINDS:
    raise ValueError(f"triplet mining kind must be one of {TRIPLET_KINDS}, got {kind!r}")
  valid = same_label_mask(labels)[:, :, None] & different_label_mask(labels)[:, None, :]
  triplet_margin = distances[:, None, :] - distances[:, :, None]  # d(a, n) - d(a, p), [a, p, n]
  if kind == "easy":
    keep = triplet_margin > margin
  else:
    keep = triplet_margin <= margin
    if kind == "hard":
      keep &= triplet_margin <= 0
    elif kind == "semihard":
      keep &= triplet_margin > 0
  return valid & keep


def batch_hard_triplet_mask(distances: jax.Array, labels: jax.Array) -> jax.Array:
  """One triplet per anchor: its farthest positive and its closest negative (PML `BatchHardMiner`).

  Anchors without a positive or without a negative get no triplet.

  Args:
    distances: float [B, B] (smaller = closer).
    labels: int [B].

  Returns:
    bool [B, B, B], at most one True per anchor.
  """
  pos = same_label_mask(labels)
  neg = different_label_mask(labels)
  hardest_pos = jnp.argmax(jnp.where(pos, distances, -jnp.inf), axis=1)
  hardest_neg = jnp.argmin(jnp.where(neg, distances, jnp.inf), axis=1)
  keep = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
  n = labels.shape[0]
  pos_onehot = jax.nn.one_hot(hardest_pos, n, dtype=bool)
  neg_onehot = jax.nn.one_hot(hardest_neg, n, dtype=bool)
  return keep[:, None, None] & pos_onehot[:, :, None] & neg_onehot[:, None, :]


def multi_similarity_pair_masks(similarities: jax.Array, labels: jax.Array, *,
                                epsilon: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """Pair mining of the Multi-Similarity loss (PML `MultiSimilarityMiner`, Wang et al. 2019).

  A positive pair (a, p) is kept when s(a, p) - epsilon < max_n s(a, n); a negative pair (a, n) when
  s(a, n) + epsilon > min_p s(a, p). An anchor without negatives keeps no positive, one without
  positives keeps no negative.

  Args:
    similarities: float [B, B] (larger = closer), e.g. cosine.
    labels: int [B].
    epsilon: the mining margin.

  Returns:
    (pos_mask, neg_mask): bool [B, B] each.
  """
  pos = same_label_mask(labels)
  neg = different_label_mask(labels)
  hardest_neg_sim = jnp.max(jnp.where(neg, similarities, -jnp.inf), axis=1, keepdims=True)
  hardest_pos_sim = jnp.min(jnp.where(pos, similarities, jnp.inf), axis=1, keepdims=True)
  pos_mask = pos & (similarities - epsilon < hardest_neg_sim)
  neg_mask = neg & (similarities + epsilon > hardest_pos_sim)
  return pos_mask, neg_mask


def distance_weighted_negative_weights(embeddings: jax.Array, labels: jax.Array, *, cutoff: float = 0.5,
                                       nonzero_loss_cutoff: float = 1.4, far_weight: float = 1e-6,
                                       sample_far_positives: bool = True) -> jax.Array:
  """Unnormalised negative-sampling weights of D&C's `DistanceWeightedSampler` (Wu et al. 2017).

  Row i is proportional to the probability of drawing j as a negative for anchor i:
    D   = max(sqrt(max(|x_i - x_j|^2, 1e-4)), cutoff)
    lw  = (2 - d) log D - ((d - 3) / 2) log(1 - D^2 / 4)      (1 / q(D), q = distance density on S^{d-1})
    lw  = 0 where same label (incl. i = j) or D >= nonzero_loss_cutoff
    w   = exp(lw - max_j lw) + 1e-9        (the row max includes those zeros, as in the code)
    w   = 0 where same label (incl. i = j);  w = far_weight where D > nonzero_loss_cutoff

  Args:
    embeddings: float [B, d], the (normalised) embeddings the loss sees; d enters the formula.
    labels: int [B].
    cutoff: lower clamp of the distance ("to avoid high variance").
    nonzero_loss_cutoff: negatives farther than this give zero margin loss (= beta + margin).
    far_weight: the D&C `eps` given to pairs beyond `nonzero_loss_cutoff`.
    sample_far_positives: the D&C code sets the far weight after zeroing same-label pairs, so a
      same-label pair farther than `nonzero_loss_cutoff` gets `far_weight` and can be drawn as a
      "negative" (True, faithful). False keeps every same-label pair at weight 0.

  Returns:
    float [B, B], non-negative.
  """
  x = as_compute_dtype(jax.lax.stop_gradient(embeddings))
  d = x.shape[1]
  dist = jnp.maximum(jnp.sqrt(jnp.maximum(squared_distances(x, x), 1e-4)), cutoff)
  same = labels[:, None] == labels[None, :]  # includes i = j
  ignore = same | (dist >= nonzero_loss_cutoff)
  # Evaluate the log only where it is used (it is -inf/NaN at D >= 2).
  safe_dist = jnp.where(ignore, 1.0, dist)
  log_w = (2.0 - d) * jnp.log(safe_dist) - ((d - 3.0) / 2.0) * jnp.log(1.0 - 0.25 * jnp.square(safe_dist))
  log_w = jnp.where(ignore, 0.0, log_w)
  w = jnp.exp(log_w - jnp.max(log_w, axis=1, keepdims=True)) + 1e-9
  w = jnp.where(same, 0.0, w)
  far = dist > nonzero_loss_cutoff
  if not sample_far_positives:
    far &= ~same
  return jnp.where(far, far_weight, w)


def distance_weighted_num_negatives(labels: jax.Array) -> jax.Array:
  """Negatives per anchor in D&C's sampler: round(#positive pairs / B), at least 1, at most B - largest class.

  labels: int [B] -> int32 scalar (a traced value under jit; 0 only if the batch has a single class).
  """
  n = labels.shape[0]
  same = labels[:, None] == labels[None, :]
  num_pos_pairs = jnp.sum(same) - n
  num_neg = jnp.floor(num_pos_pairs.astype(jnp.float32) / n + 0.5).astype(jnp.int32)  # int(x + 0.5)
  num_neg = jnp.maximum(num_neg, 1)
  largest_class = jnp.max(jnp.sum(same, axis=1))
  return jnp.minimum(num_neg, n - largest_class).astype(jnp.int32)


def _top_k_by_rank(scores: jax.Array, k: jax.Array) -> jax.Array:
  """bool [B, N]: True at the k largest scores of each row; k may be traced (fixed output shape)."""
  order = jnp.argsort(-scores, axis=1)
  rank = jnp.argsort(order, axis=1)
  return rank < k


def distance_weighted_sampling(key: jax.Array, embeddings: jax.Array, labels: jax.Array, *,
                               cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4, far_weight: float = 1e-6,
                               sample_far_positives: bool = True) -> tuple[jax.Array, jax.Array]:
  """D&C's distance-weighted triplet sampling, as multiplicity masks (docs/methods/metric_loss.md).

  For every anchor i: draw k = `distance_weighted_num_negatives(labels)` distinct negatives with
  probability proportional to `distance_weighted_negative_weights` (sequential draws without
  replacement, as torch.multinomial; done here with Gumbel top-k). If i has at least one positive, take
  k positives: all of them if it has exactly k, a uniform subset without replacement if more, k uniform
  draws with replacement if fewer; the triplets are (i, p_t, n_t), t = 1..k. Anchors without a positive
  get no triplet. A margin loss is a sum of separate positive and negative terms, so the pairing of p_t
  with n_t does not matter and the triplets are fully described by the two multiplicity masks.

  Args:
    key: a jax.random key.
    embeddings: float [B, d] (no gradient flows through the sampling).
    labels: int [B].
    cutoff, nonzero_loss_cutoff, far_weight, sample_far_positives: see
      `distance_weighted_negative_weights`.

  Returns:
    (pos_counts, neg_counts): float32 [B, B]. pos_counts[i, j] = how many of i's triplets use j as the
    positive; neg_counts[i, j] in {0, 1} = whether j is one of i's negatives. Both rows sum to k for
    anchors with a positive and to 0 otherwise.
  """
  n = labels.shape[0]
  num_neg = distance_weighted_num_negatives(labels)
  weights = distance_weighted_negative_weights(
      embeddings, labels, cutoff=cutoff, nonzero_loss_cutoff=nonzero_loss_cutoff, far_weight=far_weight,
      sample_far_positives=sample_far_positives)
  # One uniform draw serves all three choices below (random-op compilation is the slow part on CPU).
  dtype = weights.dtype
  uniform = jax.random.uniform(key, (3, n, n), dtype, minval=jnp.finfo(dtype).tiny, maxval=1.0)
  gumbel = -jnp.log(-jnp.log(uniform[:2]))
  # Gumbel top-k over log-weights = sequential sampling without replacement (Plackett-Luce).
  log_w = jnp.where(weights > 0, jnp.log(jnp.where(weights > 0, weights, 1.0)), -jnp.inf)
  negatives = _top_k_by_rank(log_w + gumbel[0], num_neg)

  pos = same_label_mask(labels)
  num_pos = jnp.sum(pos, axis=1)
  has_pos = num_pos > 0
  # At least k positives: a uniform k-subset (all of them when there are exactly k).
  subset = _top_k_by_rank(jnp.where(pos, gumbel[1], -jnp.inf), num_neg) & pos
  # Fewer than k positives: k uniform draws with replacement. Draw t of anchor i takes i's
  # floor(u * |P_i|)-th positive; n draws are made (k < n) and the first k counted.
  pick = jnp.minimum(jnp.floor(uniform[2] * num_pos[None, :]), jnp.maximum(num_pos - 1, 0)[None, :])
  positives_first = jnp.argsort(~pos, axis=1, stable=True)  # [i, r]: i's positive columns, ascending
  drawn = jnp.take_along_axis(positives_first, pick.T.astype(jnp.int32), axis=1)  # [i, t]
  counted = jnp.broadcast_to((jnp.arange(n) < num_neg)[None, :], (n, n)).astype(jnp.float32)
  with_replacement = jnp.zeros((n, n), jnp.float32).at[jnp.arange(n)[:, None], drawn].add(counted)
  pos_counts = jnp.where((num_pos >= num_neg)[:, None], subset.astype(jnp.float32), with_replacement)
  pos_counts = jnp.where(has_pos[:, None], pos_counts, 0.0)
  neg_counts = jnp.where(has_pos[:, None] & negatives, 1.0, 0.0)
  return pos_counts, neg_counts
