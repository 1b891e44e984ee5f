"""Initialisers of the losses' learnable parameters: init(key, num_classes, embedding_dim, **options) -> array."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kaiming_normal_fan_out_proxies(key: jax.Array, num_classes: int, embedding_dim: int, *,
                                   dtype=jnp.float32) -> jax.Array:
  """Proxies float [C, D] ~ N(0, 2 / C): torch `kaiming_normal_(P, mode='fan_out')` on a (C, D) tensor.

  The Proxy-Anchor / Proxy-ISA / DFML proxy init (docs/methods/metric_loss.md), also PML's ProxyAnchorLoss
  default. The loss normalises the proxies, but their raw scale sets the size of Adam's steps.
  """
  return jnp.sqrt(2.0 / num_classes).astype(dtype) * jax.random.normal(key, (num_classes, embedding_dim), dtype)


def standard_normal_proxies(key: jax.Array, num_classes: int, embedding_dim: int, *,
                            dtype=jnp.float32) -> jax.Array:
  """Proxies / class weights float [C, D] ~ N(0, 1): PML's default `torch.nn.init.normal_` for
  `ProxyNCALoss` and `NormalizedSoftmaxLoss` (used as is by the Proxy-Anchor repo's Proxy-NCA baseline)."""
  return jax.random.normal(key, (num_classes, embedding_dim), dtype)


def margin_beta(key: jax.Array, num_classes: int, embedding_dim: int, *, beta: float = 1.2,
                class_specific_beta: bool = False, dtype=jnp.float32) -> jax.Array:
  """Margin-loss boundary: float [] (global, the D&C reference runs) or float [C] (`class_specific_beta`),
  all equal to `beta` (1.2). `key` and `embedding_dim` are unused (uniform initialiser signature)."""
  del key, embedding_dim
  if class_specific_beta:
    return jnp.full((num_classes,), beta, dtype)
  return jnp.asarray(beta, dtype)
