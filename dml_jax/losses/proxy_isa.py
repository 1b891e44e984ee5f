"""Proxy-ISA loss (Li et al., MMAsia 2022): Proxy-Anchor with per-pair weights in the exponent, as the authors'
code computes it (`rioyokotalab/ProxyISA`, `code/losses.py`, class `ProxyISA`; docs/methods/proxy_isa.md).

Per class c the loss reads a count n_c (samples seen, outliers excluded) and a learned similarity S_c; the
method (dml_jax/methods/proxy_isa.py) keeps both and the memory S is computed from. With beta = (V - 1) / V:

  E_c   = (1 - beta^n_c) / (1 - beta)                               effective number, in [0, V)
  wb_c  = 1 / (1 + log(1 + E_c))
  w_c   = 1 + (1 + e^-tau) (wb_c - 1) / (1 + exp(V - tau - E_c))    class weight, 1 until E nears V
  O_c   = S_c - ((1 + k (1 - S_c)) wb_c + lambda)                   outlier threshold

and per pair (s = cos(x_b, p_c), x_b as given, p_c L2-normalised), as a constant without gradient:

  positive (y_b = c), filter on:  M = w_c  if s > S_c;  1 + w_c  if O_c <= s <= S_c;  w_c  if s < O_c
  positive, filter off:           M = 1
  negative (y_b != c), always:    M = 1 / max(1, E_c)  if s < O_c,  else 1

  L = sum_c log(1 + sum_{b: y_b = c}  exp(alpha (delta - s) M)) / W+
    + sum_c log(1 + sum_{b: y_b != c} exp(alpha (s + delta) M)) / W-

with W+ = sum over the classes of the batch of the mean positive M of that class (|P+| with the filter off)
and W- = sum over the classes with a negative of their mean negative M (C for a batch of two classes or
more while all M are 1). With every M = 1 this is Proxy-Anchor.

Precision, as the code runs it: E (and everything derived from it) is float64, computed from the integer n
with Python's float arithmetic; S is stored in float64 but always holds a float32 value (the code computes
it in float32); the comparisons cast the float64 thresholds to float32 (`cos` is float32); the weights
w, 1 + w and 1 / max(1, E) are float32 (`1 + w` as 1 + float32(w) in float32, `1 / E` as 1 / float32(E)).
Here the quantities that depend on n alone are tabulated once on the host in double precision
(`count_tables`); O, the one that mixes E with the learned S, is evaluated on the device in float64 under a
local `jax.enable_x64` (the rest of the program stays 32-bit), so every threshold is the float32 rounding of
the code's float64 value (tests/test_proxy_isa.py checks this bit for bit against torch float64).

The code's `torch.exp(-self.tau)` raises a TypeError (tau is a Python float); e^-tau is computed here as the
evident intent, in double precision.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dml_jax.errors import InvalidValueError
from dml_jax.losses._checks import check_proxies
from dml_jax.losses.ops import l2_normalize, masked_logsumexp
from dml_jax.losses.pairwise import cosine_similarity, one_hot_labels


class CountTables(NamedTuple):
  """Per-count quantities for n = 0 .. N, N = `saturation` (from there on E no longer changes in float64).

  effective_number: float64 [N + 1], E(n).  base_weight: float64 [N + 1], wb(n).
  weight: float32 [N + 1], float32(w).  informative_weight: float32 [N + 1], 1 + float32(w) in float32.
  negative_weight: float32 [N + 1], 1 / float32(E) in float32 where E > 1, else 1.
  """

  effective_number: np.ndarray
  base_weight: np.ndarray
  weight: np.ndarray
  informative_weight: np.ndarray
  negative_weight: np.ndarray

  @property
  def saturation(self) -> int:
    return len(self.effective_number) - 1


def effective_number(count: float, volume: float) -> float:
  """E(n) = (1 - beta^n) / (1 - beta), beta = (V - 1) / V, in Python floats exactly as the code updates it."""
  beta = (volume - 1.0) / volume
  return (1.0 - beta ** float(count)) / (1.0 - beta)


def count_tables(volume: float = 100.0, tau: float = 1.5) -> CountTables:
  """The n-dependent class quantities of the code, in float64 (numpy, as torch's float64 tensors), up to the
  count beyond which E is constant (1 - beta^n rounds to 1; about 3,600 for V = 100)."""
  if not volume > 1.0:
    raise InvalidValueError(f"proxy_isa: the volume V must be > 1 (beta = (V - 1) / V), got {volume}",
                            "e.g. --config.method.volume=100")
  beta = (volume - 1.0) / volume
  values = [0.0]
  while 1.0 - beta ** float(len(values) - 1) != 1.0:
    values.append(effective_number(len(values), volume))
  e = np.asarray(values, np.float64)
  base = 1.0 / (1.0 + np.log(1.0 + e))
  # The code's order of operations: ((1 + e^-tau) * (wb - 1)) / (1 + exp((V - tau) - E)) + 1.
  weight = (1.0 + math.exp(-tau)) * (base - 1.0) / (1.0 + np.exp((volume - tau) - e)) + 1.0
  weight32 = weight.astype(np.float32)
  e32 = e.astype(np.float32)
  negative = np.where(e > 1.0, np.float32(1.0) / np.where(e > 1.0, e32, np.float32(1.0)), np.float32(1.0))
  return CountTables(effective_number=e, base_weight=base, weight=weight32,
                     informative_weight=(np.float32(1.0) + weight32).astype(np.float32),
                     negative_weight=negative.astype(np.float32))


class ClassWeights(NamedTuple):
  """The float32 per-class quantities one loss evaluation reads, each float32 [C]: S, O, w, 1 + w and
  1 / max(1, E) (see the module docstring)."""

  similarity: jax.Array
  threshold: jax.Array
  weight: jax.Array
  informative_weight: jax.Array
  negative_weight: jax.Array


def class_weights(counts: jax.Array, similarity: jax.Array, tables: CountTables, *, eta_scale: float,
                  eta_margin: float) -> ClassWeights:
  """counts int32 [C] (n), similarity float32 [C] (S, float32 values) -> ClassWeights; jittable.

  O = S - ((1 + k (1 - S)) wb + lambda) runs in float64 (a local x64 scope) in the code's order of
  operations, then rounds to float32 as the code's comparisons do.
  """
  index = jnp.minimum(counts, tables.saturation)
  with jax.enable_x64(True):
    s = similarity.astype(jnp.float64)
    base = jnp.asarray(tables.base_weight, jnp.float64)[index]
    threshold = (s - ((1.0 + eta_scale * (1.0 - s)) * base + eta_margin)).astype(jnp.float32)
  return ClassWeights(similarity=similarity.astype(jnp.float32), threshold=threshold,
                      weight=jnp.asarray(tables.weight)[index],
                      informative_weight=jnp.asarray(tables.informative_weight)[index],
                      negative_weight=jnp.asarray(tables.negative_weight)[index])


class ProxyISAAux(NamedTuple):
  """By-products of one loss evaluation (no gradient).

  outlier: bool [B], samples whose positive similarity lies below their class's threshold (filter on only).
  positive_similarity: float32 [B], s[b, y_b].  present: bool [C], classes of the batch.
  pos_weight_sum, neg_weight_sum: float32 [], W+ and W-.
  """

  outlier: jax.Array
  positive_similarity: jax.Array
  present: jax.Array
  pos_weight_sum: jax.Array
  neg_weight_sum: jax.Array


def pair_weights(cos: jax.Array, positive: jax.Array, weights: ClassWeights, *, filter_on: bool) -> jax.Array:
  """M: cos float32 [B, C], positive bool [B, C] -> float32 [B, C] (see the module docstring)."""
  below = cos < weights.threshold[None, :]
  if filter_on:
    pos = jnp.where(cos > weights.similarity[None, :], weights.weight[None, :], weights.informative_weight[None, :])
    pos = jnp.where(below, weights.weight[None, :], pos)
  else:
    pos = jnp.ones_like(cos)
  neg = jnp.where(below, weights.negative_weight[None, :], 1.0)
  return jnp.where(positive, pos, neg)


def proxy_isa_loss(embeddings: jax.Array, labels: jax.Array, proxies: jax.Array, weights: ClassWeights, *,
                   alpha: float = 32.0, margin: float = 0.1, filter_on: bool = False
                   ) -> tuple[jax.Array, ProxyISAAux]:
  """The Proxy-ISA loss of a batch and its by-products.

  Args:
    embeddings: float32 [B, D], used as given (the model's output is already L2-normalised; the code does
      not normalise again).
    labels: int [B], values in [0, C).
    proxies: float32 [C, D], L2-normalised here (x / sqrt(sum(x^2) + 1e-12)).
    weights: ClassWeights of the state before this step.
    alpha, margin: the exponent's scale and delta (32 and 0.1; the code never passes its CLI values).
    filter_on: the positive re-weighting and outlier filtering (from the epoch after the memory starts).

  Returns:
    (float32 [], ProxyISAAux). The pair weights and normalisers are constants: the gradient reaches the
    embeddings and proxies through s only.
  """
  check_proxies("proxy_isa_loss", embeddings, labels, proxies)
  x = embeddings.astype(jnp.float32)
  cos = cosine_similarity(x, l2_normalize(proxies.astype(jnp.float32)))  # [B, C]
  num_classes = proxies.shape[0]
  positive = one_hot_labels(labels, num_classes)
  negative = ~positive
  m = jax.lax.stop_gradient(pair_weights(jax.lax.stop_gradient(cos), positive, weights, filter_on=filter_on))
  pos_count = jnp.sum(positive, axis=0)
  neg_count = jnp.sum(negative, axis=0)
  present = pos_count > 0
  pos_mean = jnp.sum(jnp.where(positive, m, 0.0), axis=0) / jnp.maximum(pos_count, 1).astype(jnp.float32)
  neg_mean = jnp.sum(jnp.where(negative, m, 0.0), axis=0) / jnp.maximum(neg_count, 1).astype(jnp.float32)
  pos_weight_sum = jnp.sum(jnp.where(present, pos_mean, 0.0))
  neg_weight_sum = jnp.sum(jnp.where(neg_count > 0, neg_mean, 0.0))
  # log(1 + sum exp(.)) as a masked log-sum-exp with an extra 0 logit; the code's direct exp form is safe in
  # float32 too (exponents stay below 32 * 1.1 * 2), and the two agree to rounding.
  pos_term = jnp.sum(masked_logsumexp(alpha * (margin - cos) * m, positive, axis=0))
  neg_term = jnp.sum(masked_logsumexp(alpha * (cos + margin) * m, negative, axis=0))
  loss = pos_term / pos_weight_sum + neg_term / neg_weight_sum
  positive_similarity = jnp.sum(jnp.where(positive, cos, 0.0), axis=1)
  below = jnp.any(positive & (cos < weights.threshold[None, :]), axis=1)
  outlier = jax.lax.stop_gradient(below) if filter_on else jnp.zeros_like(below)
  aux = ProxyISAAux(outlier=outlier, positive_similarity=jax.lax.stop_gradient(positive_similarity),
                    present=present, pos_weight_sum=pos_weight_sum, neg_weight_sum=neg_weight_sum)
  return loss, aux
