"""Proxy-NCA loss (Movshovitz-Attias et al., ICCV 2017) as PML's `ProxyNCALoss`.

The Proxy-Anchor repository's Proxy-NCA baseline is PML's `ProxyNCALoss(softmax_scale=32)` with PML's
defaults otherwise, hence the scale default here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dml_jax.losses._checks import check_proxies
from dml_jax.losses.ops import as_compute_dtype, l2_normalize
from dml_jax.losses.pairwise import one_hot_labels, squared_distances


def proxy_nca_loss(embeddings: jax.Array, labels: jax.Array, proxies: jax.Array, *, scale: float = 32.0,
                   normalize_embeddings: bool = True) -> jax.Array:
  """Proxy-NCA loss of a batch; a float32 scalar.

    L = mean_b -log softmax_c(-scale |x_b - p_c|^2)[y_b]

  with x, p L2-normalised (PML's default `LpDistance(power=2)`), the softmax over all C proxies (the
  positive proxy included in the denominator, as PML), the mean over the batch (`MeanReducer`).

  Difference from PML: PML computes the softmax probability and drops samples where it underflows to
  exactly 0 (in float32, a true-class logit more than ~87-104 below the largest one, i.e. a squared
  distance gap above ~2.7-3.2 at scale 32); this log-softmax form keeps them, which is the intended
  loss. Elsewhere the two agree.

  Args:
    embeddings: float [B, D].
    labels: int [B], values in [0, C).
    proxies: float [C, D].
    scale: the softmax scale (PML `softmax_scale`).
    normalize_embeddings: L2-normalise the embeddings here (PML does).

  Returns:
    float scalar.
  """
  check_proxies("proxy_nca_loss", embeddings, labels, proxies)
  x = as_compute_dtype(embeddings)
  if normalize_embeddings:
    x = l2_normalize(x)
  p = l2_normalize(as_compute_dtype(proxies)).astype(x.dtype)
  logits = -scale * squared_distances(x, p)  # [B, C]
  log_prob = jax.nn.log_softmax(logits, axis=1)
  true_log_prob = jnp.sum(jnp.where(one_hot_labels(labels, proxies.shape[0]), log_prob, 0.0), axis=1)
  return -jnp.mean(true_log_prob)
