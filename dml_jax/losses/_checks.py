"""Static shape checks (and value checks on concrete, non-traced labels) with messages naming the loss."""

from __future__ import annotations

import jax
import numpy as np


def check_embeddings_labels(loss: str, embeddings: jax.Array, labels: jax.Array) -> None:
  """embeddings must be float [B, D] and labels integer [B]."""
  if embeddings.ndim != 2:
    raise ValueError(f"{loss}: embeddings must have shape [batch, dim], got {embeddings.shape}")
  if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
    raise ValueError(f"{loss}: labels must have shape [batch] = [{embeddings.shape[0]}], got {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{loss}: labels must be integers, got dtype {labels.dtype}")


def check_proxies(loss: str, embeddings: jax.Array, labels: jax.Array, proxies: jax.Array) -> None:
  """proxies must be float [C, D] with the embeddings' D; concrete labels must lie in [0, C)."""
  check_embeddings_labels(loss, embeddings, labels)
  if proxies.ndim != 2 or proxies.shape[1] != embeddings.shape[1]:
    raise ValueError(f"{loss}: proxies must have shape [num_classes, {embeddings.shape[1]}] "
                     f"(the embedding dim), got {proxies.shape}")
  check_label_range(loss, labels, proxies.shape[0], "proxies")


def check_label_range(loss: str, labels: jax.Array, num_classes: int, what: str) -> None:
  """Out-of-range labels would silently select no proxy / beta, so refuse them when they are concrete."""
  try:
    if not getattr(labels, "is_fully_addressable", True):
      return  # a multi-host global array: no process sees all values
    values = np.asarray(labels)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return  # under jit the values are unknown; the data pipeline guarantees the range
  if values.size and (values.min() < 0 or values.max() >= num_classes):
    raise ValueError(f"{loss}: labels must lie in [0, {num_classes}) (the number of {what}), "
                     f"got values in [{values.min()}, {values.max()}]")
