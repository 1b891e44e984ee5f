"""NormSoftmax loss (Zhai & Wu, BMVC 2019, "Classification is a strong baseline") as PML's
`NormalizedSoftmaxLoss`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dml_jax.losses._checks import check_proxies
from dml_jax.losses.ops import as_compute_dtype, l2_normalize
from dml_jax.losses.pairwise import cosine_similarity, one_hot_labels


def norm_softmax_loss(embeddings: jax.Array, labels: jax.Array, proxies: jax.Array, *,
                      temperature: float = 0.05, normalize_embeddings: bool = True) -> jax.Array:
  """Normalised-softmax (cosine classifier) cross-entropy of a batch; a float32 scalar.

    L = mean_b -log softmax_c(cos(x_b, w_c) / temperature)[y_b]

  Args:
    embeddings: float [B, D].
    labels: int [B], values in [0, C).
    proxies: float [C, D], the class weights (PML stores the transpose, W [D, C]), L2-normalised here.
    temperature: divides the cosine logits (PML default 0.05).
    normalize_embeddings: L2-normalise the embeddings here (PML's `DotProductSimilarity` does by default).

  Returns:
    float scalar.
  """
  check_proxies("norm_softmax_loss", embeddings, labels, proxies)
  x = as_compute_dtype(embeddings)
  if normalize_embeddings:
    x = l2_normalize(x)
  w = l2_normalize(as_compute_dtype(proxies)).astype(x.dtype)
  log_prob = jax.nn.log_softmax(cosine_similarity(x, w) / temperature, axis=1)
  true_log_prob = jnp.sum(jnp.where(one_hot_labels(labels, proxies.shape[0]), log_prob, 0.0), axis=1)
  return -jnp.mean(true_log_prob)
