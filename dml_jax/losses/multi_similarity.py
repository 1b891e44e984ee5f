"""Multi-Similarity loss (Wang et al., CVPR 2019) with its pair miner, as PML's `MultiSimilarityLoss` +
`MultiSimilarityMiner`, the Proxy-Anchor repository's MS baseline (alpha 2, beta 50, base 0.5, eps 0.1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dml_jax.losses._checks import check_embeddings_labels
from dml_jax.losses.mining import multi_similarity_pair_masks
from dml_jax.losses.ops import as_compute_dtype, l2_normalize, masked_logsumexp
from dml_jax.losses.pairwise import cosine_similarity


def multi_similarity_loss(embeddings: jax.Array, labels: jax.Array, *, alpha: float = 2.0, beta: float = 50.0,
                          base: float = 0.5, epsilon: float = 0.1,
                          pair_masks: tuple[jax.Array, jax.Array] | None = None,
                          normalize_embeddings: bool = True) -> jax.Array:
  """Multi-Similarity loss of a batch; a float32 scalar.

  With s = cosine similarity, P_a / N_a the mined positive / negative pairs of anchor a:

    l_a = 1/alpha log(1 + sum_{p in P_a} exp(-alpha (s_ap - base)))
        + 1/beta  log(1 + sum_{n in N_a} exp( beta (s_an - base)))
    L   = mean over all B anchors of l_a (empty sets contribute 0)

  PML quirk kept for parity: when at most one positive and at most one negative pair are mined in the
  whole batch, the loss is 0 (`GenericPairLoss` treats such index tuples as empty).

  Args:
    embeddings: float [B, D].
    labels: int [B].
    alpha, beta, base: the MS scales and similarity offset.
    epsilon: margin of the pair miner (`mining.multi_similarity_pair_masks`).
    pair_masks: optional (pos_mask, neg_mask) bool [B, B] to use instead of mining (e.g. all pairs).
    normalize_embeddings: L2-normalise here (PML's `CosineSimilarity` does).

  Returns:
    float scalar.
  """
  check_embeddings_labels("multi_similarity_loss", embeddings, labels)
  x = as_compute_dtype(embeddings)
  if normalize_embeddings:
    x = l2_normalize(x)
  sim = cosine_similarity(x, x)
  if pair_masks is None:
    pos_mask, neg_mask = multi_similarity_pair_masks(jax.lax.stop_gradient(sim), labels, epsilon=epsilon)
  else:
    pos_mask, neg_mask = pair_masks
    n = labels.shape[0]
    if pos_mask.shape != (n, n) or neg_mask.shape != (n, n):
      raise ValueError(f"multi_similarity_loss: pair_masks must be two bool [{n}, {n}] masks, "
                       f"got {pos_mask.shape} and {neg_mask.shape}")
    pos_mask, neg_mask = pos_mask.astype(bool), neg_mask.astype(bool)
  pos_terms = masked_logsumexp(-alpha * (sim - base), pos_mask, axis=1) / alpha
  neg_terms = masked_logsumexp(beta * (sim - base), neg_mask, axis=1) / beta
  loss = jnp.mean(pos_terms + neg_terms)
  too_few_pairs = (jnp.sum(pos_mask) <= 1) & (jnp.sum(neg_mask) <= 1)
  return jnp.where(too_few_pairs, 0.0, loss)
