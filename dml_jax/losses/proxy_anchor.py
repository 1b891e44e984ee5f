"""Proxy-Anchor loss (Kim et al., CVPR 2020), as in the authors' code (`code/losses.py`, `Proxy_Anchor`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dml_jax.losses._checks import check_proxies
from dml_jax.losses.ops import as_compute_dtype, l2_normalize, masked_logsumexp
from dml_jax.losses.pairwise import cosine_similarity, one_hot_labels

POS_NORMALIZERS = ("present", "all")


def proxy_anchor_loss(embeddings: jax.Array, labels: jax.Array, proxies: jax.Array, *, alpha: float = 32.0,
                      margin: float = 0.1, pos_normalizer: str = "present",
                      normalize_embeddings: bool = True) -> jax.Array:
  """Proxy-Anchor loss of a batch; a float32 scalar.

  With s = cos(x_b, p_c) (embeddings and proxies L2-normalised here), pos[b, c] = [y_b = c]:

    L = 1/N+ sum_{c in P+} log(1 + sum_{b: y_b = c}  exp(-alpha (s[b, c] - margin)))
      + 1/C  sum_{c = 1..C} log(1 + sum_{b: y_b != c} exp( alpha (s[b, c] + margin)))

  P+ = proxies with at least one positive in the batch. Evaluated as a masked log-sum-exp with an
  extra 0 logit (softplus form), equal to the direct exp form of the authors' code.

  Args:
    embeddings: float [B, D].
    labels: int [B], values in [0, C).
    proxies: float [C, D], one per training class.
    alpha: scale (32 in all seed repos).
    margin: delta (0.1).
    pos_normalizer: N+ for the positive term. 'present' = |P+| (Proxy-Anchor, Proxy-ISA, DFML code,
      and PML's ProxyAnchorLoss); 'all' = C, as VPTSP's `both_all` mode (docs/methods/vptsp.md), where
      classes absent from the batch count in the mean.
    normalize_embeddings: L2-normalise the embeddings here (the Proxy-Anchor code does, even though its
      models already output unit vectors; on unit inputs this changes neither value nor the gradient
      that reaches the model's parameters).

  Returns:
    float scalar (float32, or float64 for float64 inputs).
  """
  check_proxies("proxy_anchor_loss", embeddings, labels, proxies)
  if pos_normalizer not in POS_NORMALIZERS:
    raise ValueError(f"proxy_anchor_loss: pos_normalizer must be one of {POS_NORMALIZERS}, got {pos_normalizer!r}")
  x = as_compute_dtype(embeddings)
  if normalize_embeddings:
    x = l2_normalize(x)
  p = l2_normalize(as_compute_dtype(proxies)).astype(x.dtype)
  num_classes = proxies.shape[0]
  cos = cosine_similarity(x, p)  # [B, C]
  pos = one_hot_labels(labels, num_classes)
  pos_terms = masked_logsumexp(-alpha * (cos - margin), pos, axis=0)  # [C]
  neg_terms = masked_logsumexp(alpha * (cos + margin), ~pos, axis=0)  # [C]
  if pos_normalizer == "present":
    # The authors divide by len(with_pos_proxies); it is >= 1 for any non-empty batch with valid labels.
    num_pos = jnp.maximum(jnp.sum(jnp.any(pos, axis=0)), 1).astype(x.dtype)
  else:
    num_pos = num_classes
  return jnp.sum(pos_terms) / num_pos + jnp.sum(neg_terms) / num_classes
