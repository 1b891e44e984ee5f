"""Parity of dml_jax.losses with pytorch-metric-learning (PML 2.9) and with references written from the authors'
formulas.

JAX runs in float32, the references in float64; values and gradients (w.r.t. embeddings and the loss's
learnable parameters) must agree within 1e-5 relative to the reference's largest magnitude. Batches
include singleton classes and proxies without positives. Sampling (distance-weighted margin loss) is
tested in two parts: the loss given fixed triplets against PML, and the sampler's distribution against
a numpy implementation of the D&C code's sampler. Sharding is checked in a subprocess with 8
fake CPU devices. The torch references' results come from tests/references (`ref` fixture, tests/reference.py).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dml_jax import losses as dl
from dml_jax.losses import mining

REL_TOL = 1e-5
# Jitted once per shape: eager dispatch compiles every primitive separately, which is far slower on CPU.
_sample_triplets = jax.jit(mining.distance_weighted_sampling)
_weights = jax.jit(mining.distance_weighted_negative_weights)
_weights_without_far_positives = jax.jit(
    lambda x, labels: mining.distance_weighted_negative_weights(x, labels, sample_far_positives=False))
_sample_many = jax.jit(jax.vmap(mining.distance_weighted_sampling, in_axes=(0, None, None)))
_margin_value_and_grads = jax.jit(jax.value_and_grad(
    lambda e, b, labels, pos_counts, neg_counts, nu: dl.margin_loss_from_counts(
        e, labels, b, pos_counts, neg_counts, margin=0.2, nu=nu), argnums=(0, 1)))
MEASURED: dict[str, tuple[float, float]] = {}  # loss -> largest (abs, relative) difference (printed with -s)


def assert_close(name: str, got, ref) -> None:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (name, got.shape, ref.shape)
  diff = float(np.max(np.abs(got - ref))) if got.size else 0.0
  scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1e-6)
  key = name.split(":")[0]
  worst_abs, worst_rel = MEASURED.get(key, (0.0, 0.0))
  MEASURED[key] = (max(worst_abs, diff), max(worst_rel, diff / scale))
  assert diff <= REL_TOL * scale, f"{name}: max abs diff {diff:.3g} > {REL_TOL} x {scale:.3g}"


@pytest.fixture(scope="module", autouse=True)
def _report_measured():
  yield
  for key, (abs_diff, rel_diff) in sorted(MEASURED.items()):
    print(f"\n[test_losses] {key}: max abs difference {abs_diff:.2e}, max relative {rel_diff:.2e}")


# (batch labels, number of classes, embedding dim). Class sizes include singletons; the second and third
# leave most proxies without a positive.
def _config_labels(seed: int, class_sizes: list[int], num_classes: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  classes = rng.choice(num_classes, size=len(class_sizes), replace=False)
  labels = np.concatenate([np.full(size, c) for c, size in zip(classes, class_sizes)])
  return rng.permutation(labels).astype(np.int32)


CONFIGS = {
    "b32_c8_singletons": (_config_labels(0, [8, 6, 5, 4, 4, 3, 1, 1], 8), 8, 16),
    "b12_c40_absent": (_config_labels(1, [3, 2, 2, 2, 1, 1, 1], 40), 40, 32),
    "b60_c100_2per": (_config_labels(2, [2] * 30, 100), 100, 64),
}


def _inputs(config: str, seed: int = 0):
  labels, num_classes, dim = CONFIGS[config]
  rng = np.random.default_rng(seed + 10)
  x = (rng.normal(size=(labels.shape[0], dim)) * 2.0).astype(np.float32)  # not unit norm on purpose
  proxies = rng.normal(size=(num_classes, dim)).astype(np.float32)
  return x, labels, proxies


def _t(a, grad: bool = True):
  import torch

  return torch.tensor(np.asarray(a, np.float64), requires_grad=grad)


def _tl(labels):
  import torch

  return torch.tensor(np.asarray(labels, np.int64))


def _pml():
  """(live runs only) pytorch-metric-learning's losses, miners and distances modules."""
  from pytorch_metric_learning import distances, losses, miners

  return losses, miners, distances


def _grad(t) -> np.ndarray:
  return t.grad.detach().numpy()


def _value_and_grads(fn, *args):
  return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)


# --------------------------------------------------------------------------------------------------------
# Proxy losses

@pytest.mark.parametrize("config", list(CONFIGS))
def test_proxy_anchor_matches_pml(ref, config):
  x, labels, proxies = _inputs(config)
  num_classes, dim = proxies.shape
  value, (gx, gp) = _value_and_grads(lambda e, p: dl.proxy_anchor_loss(e, jnp.asarray(labels), p), x, proxies)

  def compute():
    import torch

    loss = _pml()[0].ProxyAnchorLoss(num_classes, dim, margin=0.1, alpha=32).double()
    loss.proxies.data = torch.tensor(proxies, dtype=torch.float64)
    xt = _t(x)
    ref_value = loss(xt, _tl(labels))
    ref_value.backward()
    return {"value": ref_value.item(), "d_embeddings": _grad(xt), "d_proxies": _grad(loss.proxies)}

  expected = ref(f"losses/proxy_anchor_pml_{config}", compute)
  assert_close(f"proxy_anchor:{config}:value", value, expected["value"])
  assert_close(f"proxy_anchor:{config}:d_embeddings", gx, expected["d_embeddings"])
  assert_close(f"proxy_anchor:{config}:d_proxies", gp, expected["d_proxies"])


def _proxy_anchor_from_spec(x, labels, proxies, num_pos: str):
  """Proxy-Anchor as the Proxy-Anchor and VPTSP papers write it, in the authors' direct exp form (torch float64)."""
  import torch

  xn = x / torch.sqrt((x**2).sum(1, keepdim=True) + 1e-12)
  pn = proxies / torch.sqrt((proxies**2).sum(1, keepdim=True) + 1e-12)
  cos = xn @ pn.T
  pos = torch.nn.functional.one_hot(labels, proxies.shape[0]).double()
  pos_sum = (pos * torch.exp(-32.0 * (cos - 0.1))).sum(0)
  neg_sum = ((1 - pos) * torch.exp(32.0 * (cos + 0.1))).sum(0)
  divisor = (pos.sum(0) > 0).sum() if num_pos == "present" else proxies.shape[0]
  return torch.log1p(pos_sum).sum() / divisor + torch.log1p(neg_sum).sum() / proxies.shape[0]


@pytest.mark.parametrize("pos_normalizer", ["present", "all"])
@pytest.mark.parametrize("config", ["b32_c8_singletons", "b12_c40_absent"])
def test_proxy_anchor_matches_spec_formula(ref, config, pos_normalizer):
  # 'all' (VPTSP's both_all mode) has no PML counterpart: the reference is the spec's formula.
  x, labels, proxies = _inputs(config, seed=1)
  value, (gx, gp) = _value_and_grads(
      lambda e, p: dl.proxy_anchor_loss(e, jnp.asarray(labels), p, pos_normalizer=pos_normalizer), x, proxies)

  def compute():
    xt, pt = _t(x), _t(proxies)
    ref_value = _proxy_anchor_from_spec(xt, _tl(labels), pt, pos_normalizer)
    ref_value.backward()
    return {"value": ref_value.item(), "d_embeddings": _grad(xt), "d_proxies": _grad(pt)}

  expected = ref(f"losses/proxy_anchor_spec_{config}_{pos_normalizer}", compute)
  assert_close(f"proxy_anchor:{config}:{pos_normalizer}:value", value, expected["value"])
  assert_close(f"proxy_anchor:{config}:{pos_normalizer}:d_embeddings", gx, expected["d_embeddings"])
  assert_close(f"proxy_anchor:{config}:{pos_normalizer}:d_proxies", gp, expected["d_proxies"])


@pytest.mark.parametrize("config", list(CONFIGS))
def test_proxy_nca_matches_pml(ref, config):
  x, labels, proxies = _inputs(config, seed=2)
  num_classes, dim = proxies.shape
  value, (gx, gp) = _value_and_grads(lambda e, p: dl.proxy_nca_loss(e, jnp.asarray(labels), p, scale=32.0),
                                     x, proxies)

  def compute():
    import torch

    loss = _pml()[0].ProxyNCALoss(num_classes, dim, softmax_scale=32).double()
    loss.proxies.data = torch.tensor(proxies, dtype=torch.float64)
    xt = _t(x)
    ref_value = loss(xt, _tl(labels))
    ref_value.backward()
    return {"value": ref_value.item(), "d_embeddings": _grad(xt), "d_proxies": _grad(loss.proxies)}

  expected = ref(f"losses/proxy_nca_pml_{config}", compute)
  assert_close(f"proxy_nca:{config}:value", value, expected["value"])
  assert_close(f"proxy_nca:{config}:d_embeddings", gx, expected["d_embeddings"])
  assert_close(f"proxy_nca:{config}:d_proxies", gp, expected["d_proxies"])


@pytest.mark.parametrize("config", list(CONFIGS))
def test_norm_softmax_matches_pml(ref, config):
  x, labels, proxies = _inputs(config, seed=3)
  num_classes, dim = proxies.shape
  value, (gx, gp) = _value_and_grads(
      lambda e, p: dl.norm_softmax_loss(e, jnp.asarray(labels), p, temperature=0.05), x, proxies)

  def compute():
    import torch

    loss = _pml()[0].NormalizedSoftmaxLoss(num_classes, dim, temperature=0.05).double()
    loss.W.data = torch.tensor(proxies.T.copy(), dtype=torch.float64)  # PML stores W as [D, C]
    xt = _t(x)
    ref_value = loss(xt, _tl(labels))
    ref_value.backward()
    return {"value": ref_value.item(), "d_embeddings": _grad(xt), "d_proxies": _grad(loss.W).T}

  expected = ref(f"losses/norm_softmax_pml_{config}", compute)
  assert_close(f"norm_softmax:{config}:value", value, expected["value"])
  assert_close(f"norm_softmax:{config}:d_embeddings", gx, expected["d_embeddings"])
  assert_close(f"norm_softmax:{config}:d_proxies", gp, expected["d_proxies"])


# --------------------------------------------------------------------------------------------------------
# Pair / triplet losses

@pytest.mark.parametrize("config", list(CONFIGS))
def test_multi_similarity_matches_pml(ref, config):
  x, labels, _ = _inputs(config, seed=4)
  value, (gx,) = _value_and_grads(lambda e: dl.multi_similarity_loss(e, jnp.asarray(labels)), x)

  def compute():
    losses, miners, _ = _pml()
    xt = _t(x)
    pairs = miners.MultiSimilarityMiner(epsilon=0.1)(xt, _tl(labels))
    ref_value = losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)(xt, _tl(labels), pairs)
    ref_value.backward()
    return {"value": ref_value.item(), "d_embeddings": _grad(xt), "num_pos_pairs": len(pairs[0]),
            "num_neg_pairs": len(pairs[2])}

  expected = ref(f"losses/multi_similarity_pml_{config}", compute)
  assert int(expected["num_pos_pairs"]) > 1 and int(expected["num_neg_pairs"]) > 1
  assert_close(f"multi_similarity:{config}:value", value, expected["value"])
  assert_close(f"multi_similarity:{config}:d_embeddings", gx, expected["d_embeddings"])


def _index_set(*columns) -> set[tuple[int, ...]]:
  return set(zip(*(np.asarray(c).tolist() for c in columns)))


def test_multi_similarity_mining_matches_pml_pairs(ref):
  x, labels, _ = _inputs("b32_c8_singletons", seed=5)
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  pos_mask, neg_mask = mining.multi_similarity_pair_masks(jnp.asarray(xn @ xn.T), jnp.asarray(labels), epsilon=0.1)

  def compute():
    a1, p, a2, n = _pml()[1].MultiSimilarityMiner(epsilon=0.1)(_t(x, grad=False), _tl(labels))
    return {"a1": a1.numpy(), "p": p.numpy(), "a2": a2.numpy(), "n": n.numpy()}

  expected = ref("losses/multi_similarity_miner_pml", compute)
  assert set(zip(*np.nonzero(np.asarray(pos_mask)))) == _index_set(expected["a1"], expected["p"])
  assert set(zip(*np.nonzero(np.asarray(neg_mask)))) == _index_set(expected["a2"], expected["n"])


def test_multi_similarity_too_few_pairs_is_zero_like_pml(ref):
  # PML's GenericPairLoss returns 0 when at most one positive and one negative pair are given.
  x, labels, _ = _inputs("b12_c40_absent", seed=6)
  same = labels[:, None] == labels[None, :]
  a, p = next((int(i), int(j)) for i, j in zip(*np.nonzero(same)) if i != j)
  n = int(np.nonzero(labels != labels[a])[0][0])
  pos_mask = np.zeros(same.shape, bool)
  neg_mask = np.zeros(same.shape, bool)
  pos_mask[a, p] = True
  neg_mask[a, n] = True
  more_neg_mask = neg_mask.copy()
  more_neg_mask[a, int(np.nonzero(labels != labels[a])[0][1])] = True  # one more pair: a real loss again
  a2, n2 = np.nonzero(more_neg_mask)

  def compute():
    import torch

    loss = _pml()[0].MultiSimilarityLoss()
    one_pair = loss(_t(x), _tl(labels), tuple(torch.tensor([v]) for v in (a, p, a, n)))
    two_pairs = loss(_t(x), _tl(labels), (torch.tensor([a]), torch.tensor([p]), torch.tensor(a2), torch.tensor(n2)))
    return {"one_pair": one_pair.item(), "two_pairs": two_pairs.item()}

  expected = ref("losses/multi_similarity_explicit_pairs_pml", compute)
  loss = jax.jit(lambda e, lab, pm, nm: dl.multi_similarity_loss(e, lab, pair_masks=(pm, nm)))
  value = loss(x, labels, pos_mask, neg_mask)
  assert float(value) == 0.0 == float(expected["one_pair"])
  value = loss(x, labels, pos_mask, more_neg_mask)
  assert_close("multi_similarity:explicit_pairs:value", value, expected["two_pairs"])


@pytest.mark.parametrize("kind", ["semihard", "hard", "all", "batch_hard"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_triplet_matches_pml(ref, config, kind):
  x, labels, _ = _inputs(config, seed=7)
  value, (gx,) = _value_and_grads(lambda e: dl.triplet_loss(e, jnp.asarray(labels), margin=0.1, mining=kind), x)

  def compute():
    losses, miners, _ = _pml()
    xt = _t(x)
    if kind == "batch_hard":
      miner = miners.BatchHardMiner()
    else:
      miner = miners.TripletMarginMiner(margin=0.1, type_of_triplets=kind)
    triplets = miner(xt, _tl(labels))
    ref_value = losses.TripletMarginLoss(margin=0.1)(xt, _tl(labels), triplets)
    ref_value.backward()
    return {"value": ref_value.item(), "d_embeddings": _grad(xt), "num_triplets": len(triplets[0])}

  expected = ref(f"losses/triplet_pml_{config}_{kind}", compute)
  assert int(expected["num_triplets"]) > 0
  assert_close(f"triplet:{config}:{kind}:value", value, expected["value"])
  assert_close(f"triplet:{config}:{kind}:d_embeddings", gx, expected["d_embeddings"])


def test_triplet_mask_matches_pml_miner(ref):
  x, labels, _ = _inputs("b32_c8_singletons", seed=8)
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  dist = np.sqrt(np.maximum(((xn[:, None] - xn[None]) ** 2).sum(-1), 0))
  kinds = ("semihard", "hard", "all", "easy")

  def compute():
    out = {}
    for kind in kinds:
      a, p, n = _pml()[1].TripletMarginMiner(margin=0.1, type_of_triplets=kind)(_t(x, grad=False), _tl(labels))
      out.update({f"{kind}/a": a.numpy(), f"{kind}/p": p.numpy(), f"{kind}/n": n.numpy()})
    return out

  expected = ref("losses/triplet_margin_miner_pml", compute)
  for kind in kinds:
    mask = mining.triplet_margin_mask(jnp.asarray(dist, jnp.float32), jnp.asarray(labels), margin=0.1, kind=kind)
    assert set(zip(*np.nonzero(np.asarray(mask)))) == _index_set(
        expected[f"{kind}/a"], expected[f"{kind}/p"], expected[f"{kind}/n"]), kind


# --------------------------------------------------------------------------------------------------------
# Margin loss: the loss on fixed triplets vs PML, the sampler vs a numpy D&C sampler

def _counts_to_triplets(pos_counts, neg_counts):
  import torch

  anchors, positives, negatives = [], [], []
  for a in range(pos_counts.shape[0]):
    pos = np.repeat(np.arange(pos_counts.shape[1]), np.asarray(pos_counts[a]).astype(int))
    neg = np.repeat(np.arange(neg_counts.shape[1]), np.asarray(neg_counts[a]).astype(int))
    assert len(pos) == len(neg)
    anchors += [a] * len(pos)
    positives += pos.tolist()
    negatives += neg.tolist()
  return tuple(torch.tensor(v, dtype=torch.long) for v in (anchors, positives, negatives))


def _fixed_triplet_counts(labels, seed: int):
  """Triplets as the D&C sampler draws them, from seeded numpy: for every anchor with a positive, k distinct
  negatives and k positives (distinct when it has k, else drawn with replacement); [B, B] count matrices."""
  rng = np.random.default_rng(seed)
  n = len(labels)
  k = _numpy_dnc_num_neg(labels)
  pos_counts, neg_counts = np.zeros((n, n), np.float32), np.zeros((n, n), np.float32)
  for a in range(n):
    positives = np.flatnonzero((labels == labels[a]) & (np.arange(n) != a))
    if not positives.size:
      continue
    np.add.at(pos_counts[a], rng.choice(positives, size=k, replace=positives.size < k), 1)
    neg_counts[a, rng.choice(np.flatnonzero(labels != labels[a]), size=k, replace=False)] = 1
  return pos_counts, neg_counts


def _unit_inputs(config: str, seed: int):
  x, labels, _ = _inputs(config, seed=seed)
  # Margin-loss inputs are unit vectors (the D&C model normalises); low-dim spread gives varied distances.
  x = x[:, :8] / np.linalg.norm(x[:, :8], axis=1, keepdims=True)
  return x.astype(np.float32), labels


@pytest.mark.parametrize("class_specific,nu", [(False, 0.0), (True, 0.0), (True, 0.05)])
@pytest.mark.parametrize("config", ["b32_c8_singletons", "b60_c100_2per"])
def test_margin_loss_on_fixed_triplets_matches_pml(ref, config, class_specific, nu):
  x, labels = _unit_inputs(config, seed=9)
  num_classes = CONFIGS[config][1]
  pos_counts, neg_counts = _fixed_triplet_counts(labels, seed=3)
  assert float(np.sum(pos_counts)) > 0
  rng = np.random.default_rng(0)
  beta = (1.2 + 0.1 * rng.normal(size=num_classes)).astype(np.float32) if class_specific else np.float32(1.2)
  value, (gx, gb) = _margin_value_and_grads(x, beta, jnp.asarray(labels), pos_counts, neg_counts, nu)

  def compute():
    import torch

    losses, _, distances = _pml()
    loss = losses.MarginLoss(margin=0.2, nu=nu, beta=1.2, learn_beta=True,
                             num_classes=num_classes if class_specific else None,
                             distance=distances.LpDistance(normalize_embeddings=False)).double()
    loss.beta.data = torch.tensor(np.atleast_1d(beta), dtype=torch.float64)
    xt = _t(x)
    ref_value = loss(xt, _tl(labels), _counts_to_triplets(pos_counts, neg_counts))
    ref_value.backward()
    return {"value": ref_value.item(), "d_embeddings": _grad(xt), "d_beta": _grad(loss.beta)}

  name = f"margin:{config}:{'class' if class_specific else 'global'}:nu={nu}"
  expected = ref(f"losses/margin_pml_{config}_{'class' if class_specific else 'global'}_nu{nu}", compute)
  assert_close(f"{name}:value", value, expected["value"])
  assert_close(f"{name}:d_embeddings", gx, expected["d_embeddings"])
  assert_close(f"{name}:d_beta", np.atleast_1d(gb), expected["d_beta"])


def _dnc_margin_loss(x, labels, beta, triplets, margin, nu):
  """D&C `MarginLoss.forward` (global beta) as the D&C code computes it, torch float64: the regulariser is
  divided by the pair count (PML adds nu * beta undivided, so PML is no reference here)."""
  import torch

  a, p, n = triplets
  d_ap = torch.sqrt(((x[p] - x[a]) ** 2).sum(1) + 1e-8)
  d_an = torch.sqrt(((x[n] - x[a]) ** 2).sum(1) + 1e-8)
  pos_loss = torch.relu(d_ap - beta + margin)
  neg_loss = torch.relu(beta - d_an + margin)
  pair_cnt = ((pos_loss > 0).double() + (neg_loss > 0).double()).sum()
  loss = (pos_loss + neg_loss).sum()
  return (loss + beta.abs().sum() * nu) / pair_cnt if pair_cnt > 0 else loss


@pytest.mark.parametrize("config", ["b32_c8_singletons", "b60_c100_2per"])
def test_margin_loss_global_beta_regulariser_matches_dnc(ref, config):
  x, labels = _unit_inputs(config, seed=10)
  pos_counts, neg_counts = _fixed_triplet_counts(labels, seed=4)
  beta = np.float32(1.1)
  value, (gx, gb) = _margin_value_and_grads(x, beta, jnp.asarray(labels), pos_counts, neg_counts, 0.1)

  def compute():
    xt, bt = _t(x), _t([beta])
    ref_value = _dnc_margin_loss(xt, _tl(labels), bt, _counts_to_triplets(pos_counts, neg_counts), 0.2, 0.1)
    ref_value.backward()
    return {"value": ref_value.item(), "d_embeddings": _grad(xt), "d_beta": _grad(bt)}

  expected = ref(f"losses/margin_dnc_{config}_global_nu0.1", compute)
  assert_close(f"margin:{config}:global:nu=0.1:value", value, expected["value"])
  assert_close(f"margin:{config}:global:nu=0.1:d_embeddings", gx, expected["d_embeddings"])
  assert_close(f"margin:{config}:global:nu=0.1:d_beta", np.atleast_1d(gb), expected["d_beta"])


def test_margin_loss_without_active_pairs_is_zero_with_finite_gradients():
  x, labels = _unit_inputs("b12_c40_absent", seed=11)
  zeros = jnp.zeros((len(labels), len(labels)))
  value, (gx, gb) = _margin_value_and_grads(x, np.float32(1.2), jnp.asarray(labels), zeros, zeros, 0.1)
  assert float(value) == 0.0
  assert np.all(np.asarray(gx) == 0) and float(gb) == 0.0


def _numpy_dnc_weights(x, labels, cutoff=0.5, nonzero_loss_cutoff=1.4, eps=1e-6):
  """D&C `DistanceWeightedSampler` weights as the D&C code computes them, float64 numpy."""
  n, d = x.shape
  prod = x @ x.T
  sq = np.maximum(np.diag(prod)[:, None] + np.diag(prod)[None, :] - 2 * prod, 0)
  dist = np.maximum(np.sqrt(np.maximum(sq, 1e-4)), cutoff)
  same = labels[:, None] == labels[None, :]
  ignore = same | (dist >= nonzero_loss_cutoff)
  with np.errstate(invalid="ignore", divide="ignore"):
    log_w = (2.0 - d) * np.log(dist) - ((d - 3) / 2) * np.log(1.0 - 0.25 * dist**2)
  log_w[ignore] = 0
  w = np.exp(log_w - log_w.max(axis=1, keepdims=True)) + 1e-9
  w[same] = 0
  w[dist > nonzero_loss_cutoff] = eps
  return w


def _numpy_dnc_num_neg(labels):
  n = len(labels)
  pos = (labels[:, None] == labels[None, :]).sum() - n
  num_neg = max(1, int(pos / n + 0.5))
  return min(num_neg, n - np.bincount(labels).max())


def _inclusion_probabilities(w_row, k):
  """P(j among k sequential draws without replacement, each proportional to w): exact enumeration."""
  support = np.nonzero(w_row > 0)[0]
  probs = np.zeros_like(w_row)
  for seq in itertools.permutations(support, k):
    p, remaining = 1.0, w_row.sum()
    for j in seq:
      p *= w_row[j] / remaining
      remaining -= w_row[j]
    probs[list(seq)] += p
  return probs


# All of batch size 8 so that one compilation serves them; k = number of negatives per anchor.
SAMPLER_LABELS = {
    "k1": np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32),  # exactly k positives
    "k2": np.array([0, 0, 0, 0, 1, 1, 2, 3], np.int32),  # a 2-subset of 3 positives; 1 positive drawn twice
    "k3": np.array([0, 0, 0, 0, 0, 1, 1, 1], np.int32),  # a 3-subset of 4; 3 draws with replacement from 2
}


@pytest.mark.parametrize("name", list(SAMPLER_LABELS))
def test_distance_weighted_sampler_distribution_matches_numpy_dnc(name):
  labels = SAMPLER_LABELS[name]
  n = len(labels)
  rng = np.random.default_rng(12)
  x = rng.normal(size=(n, 6))
  x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  ref_w = _numpy_dnc_weights(x.astype(np.float64), labels)
  got_w = _weights(jnp.asarray(x), jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(got_w), ref_w, rtol=2e-4, atol=1e-12)
  same = labels[:, None] == labels[None, :]
  fixed_w = np.asarray(_weights_without_far_positives(jnp.asarray(x), jnp.asarray(labels)))
  assert np.all(fixed_w[same] == 0)  # the opt-in fix: far same-label pairs are never drawn as negatives
  np.testing.assert_array_equal(fixed_w[~same], np.asarray(got_w)[~same])
  k = _numpy_dnc_num_neg(labels)
  assert int(mining.distance_weighted_num_negatives(jnp.asarray(labels))) == k

  num_draws = 4000
  keys = jax.random.split(jax.random.key(5), num_draws)
  pos_counts, neg_counts = map(np.asarray, _sample_many(keys, jnp.asarray(x), jnp.asarray(labels)))  # [N, B, B]

  num_pos = same.sum(1) - 1
  has_pos = num_pos > 0
  # Every anchor with a positive has k distinct negatives and k positives (counted with multiplicity).
  np.testing.assert_array_equal(neg_counts.sum(-1), np.broadcast_to(np.where(has_pos, k, 0), (num_draws, n)))
  np.testing.assert_array_equal(pos_counts.sum(-1), np.broadcast_to(np.where(has_pos, k, 0), (num_draws, n)))
  assert np.all(pos_counts[:, ~same | np.eye(n, dtype=bool)] == 0)

  def within(empirical, expected, what):
    bound = 5 * np.sqrt(np.maximum(expected * (1 - expected), 1e-4) / num_draws) + 1e-3
    assert np.all(np.abs(empirical - expected) <= bound), (what, np.abs(empirical - expected).max())

  for i in np.nonzero(has_pos)[0]:
    within(neg_counts[:, i].mean(0), _inclusion_probabilities(ref_w[i], k), f"negatives of anchor {i}")
    positives = np.nonzero(same[i] & (np.arange(n) != i))[0]
    counts = pos_counts[:, i, positives]
    if num_pos[i] >= k:  # uniform subset without replacement: each positive in with probability k / |P|
      assert counts.max() <= 1
      within(counts.mean(0), np.full(len(positives), k / num_pos[i]), f"positives of anchor {i}")
    else:  # k uniform draws with replacement: counts ~ Multinomial(k, uniform)
      within((counts == k).mean(0), np.full(len(positives), num_pos[i] ** -float(k)), f"repeats of anchor {i}")
      np.testing.assert_allclose(counts.mean(0), k / num_pos[i], atol=0.1)


def test_margin_loss_samples_then_matches_fixed_triplet_loss():
  x, labels = _unit_inputs("b32_c8_singletons", seed=13)
  key = jax.random.key(6)
  pos_counts, neg_counts = _sample_triplets(key, jnp.asarray(x), jnp.asarray(labels))
  beta = jnp.float32(1.2)
  sampled = jax.jit(lambda e: dl.margin_loss(e, jnp.asarray(labels), beta, rng=key))(x)
  fixed = jax.jit(dl.margin_loss_from_counts)(jnp.asarray(x), jnp.asarray(labels), beta, pos_counts, neg_counts)
  assert float(sampled) == pytest.approx(float(fixed), rel=1e-6)


# --------------------------------------------------------------------------------------------------------
# Registry, parameter init, errors

def test_registry_and_param_init():
  assert dl.list_losses() == sorted(["proxy_anchor", "proxy_nca", "norm_softmax", "margin", "multi_similarity",
                                     "triplet"])
  assert set(dl.LOSS_PARAMS["proxy_anchor"]) == {"proxies"} and not dl.LOSS_PARAMS["triplet"]
  assert dl.get_loss("proxy_anchor") is dl.proxy_anchor_loss and dl.get_loss_spec("margin").needs_rng
  with pytest.raises(KeyError, match="proxy_anchor"):
    dl.get_loss("proxy_ancor")
  params = dl.init_loss_params("proxy_anchor", jax.random.key(0), num_classes=100, embedding_dim=512)
  assert params["proxies"].shape == (100, 512)
  assert float(jnp.std(params["proxies"])) == pytest.approx(np.sqrt(2 / 100), rel=0.02)  # kaiming fan_out
  assert dl.init_loss_params("margin", jax.random.key(0), num_classes=5, embedding_dim=8)["beta"].shape == ()
  beta = dl.init_loss_params("margin", jax.random.key(0), num_classes=5, embedding_dim=8, class_specific_beta=True)
  np.testing.assert_array_equal(beta["beta"], np.full(5, 1.2, np.float32))
  assert dl.init_loss_params("triplet", jax.random.key(0), num_classes=5, embedding_dim=8) == {}
  # The generic calling convention (spec.fn(x, labels, **params, rng=...)) runs every registered loss in
  # the sharded test below.


def test_bad_inputs_raise_clear_errors():
  x, labels, proxies = _inputs("b32_c8_singletons")
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 8\)"):
    dl.proxy_anchor_loss(x, labels + 5, proxies)
  with pytest.raises(ValueError, match="proxies must have shape"):
    dl.proxy_nca_loss(x, labels, proxies[:, :4])
  with pytest.raises(ValueError, match="labels must have shape"):
    dl.triplet_loss(x, labels[:-1])
  with pytest.raises(ValueError, match="pos_normalizer"):
    dl.proxy_anchor_loss(x, labels, proxies, pos_normalizer="batch")
  with pytest.raises(ValueError, match="mining must be one of"):
    dl.triplet_loss(x, labels, mining="semi-hard")


# --------------------------------------------------------------------------------------------------------
# jit with the batch sharded over 8 devices (subprocess: the device count is fixed at jax import)

_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dml_jax import losses as dl
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(16), 2))[:32].astype(np.int32)
    labels[:3] = [17, 18, 19]  # singletons
    x = rng.normal(size=(32, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    worst = 0.0
    for name in dl.list_losses():
      spec = dl.get_loss_spec(name)
      params = dl.init_loss_params(name, jax.random.key(1), num_classes=20, embedding_dim=16)
      extra = {"rng": jax.random.key(2)} if spec.needs_rng else {}
      fn = jax.jit(lambda e, l, p: spec.fn(e, l, **p, **extra))
      local_value = fn(jnp.asarray(x), jnp.asarray(labels), params)
      assert len(local_value.sharding.device_set) == 1
      sharded_x = jax.device_put(x, batch)
      assert len(sharded_x.sharding.device_set) == 8
      value = fn(sharded_x, jax.device_put(labels, batch), jax.device_put(params, replicated))
      diff = abs(float(value) - float(local_value)) / max(abs(float(local_value)), 1e-6)
      worst = max(worst, diff)
      assert diff < 1e-6, (name, float(value), float(local_value))
      print(name, float(value), diff)
    print("OK", worst)
""")


def test_jit_with_batch_sharded_over_8_devices_gives_the_single_device_value():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=root)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "OK" in result.stdout
