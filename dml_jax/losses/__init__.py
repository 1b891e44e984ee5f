"""Metric-learning losses as pure, jittable functions with fixed shapes.

Every loss takes the *global* batch (embeddings float [B, D], labels int [B]) and returns a scalar, so
under `jax.jit` with a batch sharded over devices it computes the same value as on one device. Mining
and sampling produce masks, never index lists. Learnable loss parameters (proxies, margin beta) are
explicit arguments; `LOSS_PARAMS` / `init_loss_params` say which a loss needs and how to initialise them.

Config names: 'proxy_anchor', 'proxy_nca', 'norm_softmax', 'margin', 'multi_similarity', 'triplet'.
"""

from dml_jax.losses.margin import margin_loss, margin_loss_from_counts
from dml_jax.losses.multi_similarity import multi_similarity_loss
from dml_jax.losses.norm_softmax import norm_softmax_loss
from dml_jax.losses.proxy_anchor import proxy_anchor_loss
from dml_jax.losses.proxy_nca import proxy_nca_loss
from dml_jax.losses.registry import LOSS_PARAMS, LossSpec, get_loss, get_loss_spec, init_loss_params, list_losses
from dml_jax.losses.triplet import triplet_loss

__all__ = [
    "LOSS_PARAMS", "LossSpec", "get_loss", "get_loss_spec", "init_loss_params", "list_losses",
    "margin_loss", "margin_loss_from_counts", "multi_similarity_loss", "norm_softmax_loss",
    "proxy_anchor_loss", "proxy_nca_loss", "triplet_loss",
]
