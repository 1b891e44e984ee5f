"""DADA (Ren et al., AAAI 2024): data-augmented domain adaptation between samples and proxies.

As the official code does (`Noahsark/DADA`; docs/methods/dada.md):

Network ("double" ResNet-50), images [B, S, S, 3] -> x [B, E] (not normalised):
  ResNet-50 feature map -> global max pool + global average pool, summed (2048) -> Linear(2048 -> E) with
  torch's default init (kernel and bias ~ U(+-1/sqrt(2048))) -> LayerNorm without affine (eps 1e-5).
  `bn_freeze=True` ('resnet50_frozen_layernorm_double', CUB / Cars): BatchNorm statistics frozen for the
  whole run, BN scale and bias still train. `bn_freeze=False` ('resnet50_layernorm_double', SOP /
  In-Shop): batch statistics, running statistics updated (momentum 0.1) by every forward in training mode.
  Evaluation: the eval-mode forward, L2-normalised.

Three players, three optimizer groups (config.optim.groups):
  network         'model/...' (backbone group with start_epoch = warm-up, the embedding layer in 'base')
  proxies         'loss/proxies' [C, E], init N(0, 1) / 8
  discriminators  'discriminators/domain/...' (U: Linear(E -> fd_fc1_dim) -> BN -> ReLU -> Linear(-> 3)
                  [-> BN(3) if fd2_bn]) and 'discriminators/category/...' (D_c: Linear(E -> fc_fc1_dim) -> BN
                  -> ReLU -> Dropout(0.5) -> Linear(-> fc_fc2_dim) -> BN -> ReLU -> Dropout(0.5) -> Linear(-> C)
                  [-> BN(C) if fc2_bn]); torch's default inits, BN eps 1e-5, momentum 0.1.

Feature-space augmentation of a batch (x [B, E] raw, labels y [B], proxies W [C, E]):
  intra-class mixup (`pos_class_mix`): for every label with two or more samples, a = its first batch index,
    p = its next one; rows m1*x_a + (1 - m1)*x_p (label y_a) are appended in ascending label order, their
    proxies m2*W[y_a] + (1 - m2)*W[y_p] (the same proxy twice: the code draws m2 all the same), with
    m1, m2 ~ Beta(2, 2). Result x' [B', E], y' [B'], per-sample proxies P' = W[y'] (mixed rows included).
  sample -> proxy mixup: x_mix = (1 - m)*x' + m*P' on the RAW vectors, one m ~ Beta(mix_alpha, mix_beta)
    for the whole batch, drawn separately for U and for D_c in every sub-step.
  Mixing is float32: the weights are float32 scalars, w1*a + w2*b.
  Before a discriminator, inputs are L2-normalised (`normal`).

Losses, n() = L2 normalisation, CE = mean cross-entropy:
  L_dom = CE(U(n x'), 0) + CE(U(n x_mix), 1) + CE(U(n P'), 2)       three calls: three BN batch statistics
  L_cls = 2 CE(D_c(n x'), y'),  L_nwd = d_discrepancy_ratio * (|softmax D_c(n x')|_* - |softmax D_c(n x_mix')|_*) / B'
  L_PA  = mean_j log(1 + sum_{i: y'_i = y'_j} exp(-pos_alpha (n(x'_i).n(P'_j) - pos_delta)))     (B' columns)
        + mean_c log(1 + sum_{i: y'_i != c} exp(neg_alpha (n(x'_i).n(W_c) - neg_delta)))        (all C)
  discriminator step: L_D = (1 - r) L_dom + r (L_cls - L_nwd)                       r = d_dis_ratio
  generator step:     L_G = oproxy_ratio L_PA + dis_gamma (r (L_cls + L_nwd) - (1 - r) L_dom)

One iteration (phases of the one jitted update, dml_jax/methods/base.py):
  prepare          the network in training mode, without gradient: x (running BN statistics update once
                   when they are not frozen)
  'discriminator'  `d_step` times: fresh draws, minimise L_D over the discriminators (the proxies enter as
                   constants: the code computes their gradients and discards them)
  'generator'      `g_step` times, from epoch `d_warmup` on: the network again in training mode (a second
                   running-statistics update), fresh draws, minimise L_G over every group but the
                   discriminators (which see their updated parameters).
Every discriminator call runs its BatchNorm in training mode on the rows it is given (samples, mixtures and
proxies each with their own statistics; running statistics updated in call order: U 3x, D_c 2x per sub-step),
and D_c's dropout is active in every call, the generator step's included (the code never sets the criterion
to eval mode).

Randomness: every sub-step's Beta draws and dropout masks come from the phase key through `sample_draws`
(`DADAMethod.draws`), as one `Draws`; tests replace `draws` to replay the authors' numpy / torch draws.

Rows: B' varies with the batch (a class sampled twice by the with-replacement sampler gets one mixed row),
so the augmented batch has the fixed shape [B + B // 2, E] with a row mask; masked rows take part in no
statistic, no mean and no discrepancy.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from dml_jax.errors import InvalidValueError, unknown_name
from dml_jax.losses.ops import l2_normalize, masked_logsumexp
from dml_jax.methods import modeling
from dml_jax.methods.base import Method, Phase, StepInfo
from dml_jax.methods.metric_loss import pooled_feature_dim

DISCREPANCIES = ("nwd", "l1")
CLASS_MIX_BETA = (2.0, 2.0)  # the code's `_class_mixup`: np.random.beta(2.0, 2.0)
_BN_EPS, _BN_MOMENTUM, _LN_EPS = 1e-5, 0.1, 1e-5  # torch defaults


def config() -> ml_collections.ConfigDict:
  """config.method.* of 'dada' (the official parameters.py defaults; names as the code's options)."""
  return ml_collections.ConfigDict(dict(
      name="dada",
      bn_freeze=True,  # arch 'resnet50_frozen_layernorm_double'; False: 'resnet50_layernorm_double'
      proxy_init_scale=0.125,  # proxies ~ N(0, 1) * scale
      # feature-space augmentation
      pos_class_mix=False,  # append one intra-class mixture per label with a positive pair
      mix_alpha=0.5, mix_beta=0.5,  # Beta(a, b) of the sample -> proxy mixup
      shift_scale=1.0,  # s: x_mix = (1 - m s) x + m s P (s > 0); the code's default 1
      normal=True,  # L2-normalise the discriminators' inputs
      # discriminators
      fd_fc1_dim=512, fd2_bn=False,  # U: hidden width, BatchNorm on its 3 logits
      fc_fc1_dim=512, fc_fc2_dim=128, fc2_bn=False,  # D_c: hidden widths, BatchNorm on its C logits
      dropout=0.5,  # D_c's two dropout layers
      # alternation
      d_step=3, g_step=1,  # discriminator / generator sub-steps per iteration
      d_warmup=1,  # epochs without a generator step
      discriminator_group="discriminators",  # config.optim group of U and D_c; the generator trains the rest
      # loss weights
      oproxy_ratio=0.0075,  # rho, weight of the proxy loss in L_G
      d_dis_ratio=0.01,  # r: category vs domain discriminator
      d_discrepancy_ratio=0.5,
      dis_gamma=1.0,
      dis_mode="nwd",  # 'nwd' nuclear-norm discrepancy, 'l1' mean |softmax difference|
      loss=ml_collections.ConfigDict(dict(pos_alpha=32.0, neg_alpha=32.0, pos_delta=0.1, neg_delta=-0.1)),
      # Opt-in departures from the code (defaults = the code):
      generator_dropout=True,  # False: D_c without dropout in the generator step (the code keeps it on)
      proxy_pair_mix=True,  # False: mixed rows take W[y_a] itself (the code mixes W[y_a] with W[y_p] = W[y_a])
      mix_unit_vectors=False,  # True: mix L2-normalised samples and proxies (the code mixes raw vectors,
                               # whose norms differ ~8x at the start)
  ))


# -- randomness -----------------------------------------------------------------------------------------


class Draws(NamedTuple):
  """The random numbers of one sub-step (one call of the authors' criterion).

  Mixing weights are float32 [2] pairs (w_first, w_second), applied as w_first * a + w_second * b:
    class_samples  intra-class mixup of samples, (m1, 1 - m1) on (x_a, x_p), m1 ~ Beta(2, 2)
    class_proxies  the same for their proxies, (m2, 1 - m2) on (W[y_a], W[y_p])
    domain_mix     U's sample -> proxy mixup, (1 - m s, m s) on (x', P'), m ~ Beta(mix_alpha, mix_beta)
    category_mix   D_c's, an independent m
  category_keep: D_c's dropout keep masks, ((samples call: bool [N, fc_fc1_dim], [N, fc_fc2_dim]),
    (mixtures call: same)), N = B + B // 2 rows of the augmented batch.
  The code draws the four weights from numpy's global stream in this order (class_samples, class_proxies,
  domain_mix, category_mix) and the masks from torch's.
  """

  class_samples: jax.Array
  class_proxies: jax.Array
  domain_mix: jax.Array
  category_mix: jax.Array
  category_keep: tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def sample_draws(rng: jax.Array, num_rows: int, opts: dict) -> Draws:
  """Fresh `Draws` from a JAX key: the four Beta samples in one vectorised call (one rejection loop to
  compile instead of four), float32; 1 - m in float32 equals the code's float64 1 - m cast to float32 for
  m >= 0.5 and is correctly rounded otherwise."""
  beta_key, keep_key = jax.random.split(rng)
  a = jnp.asarray([CLASS_MIX_BETA[0]] * 2 + [opts["mix_alpha"]] * 2, jnp.float32)
  b = jnp.asarray([CLASS_MIX_BETA[1]] * 2 + [opts["mix_beta"]] * 2, jnp.float32)
  m = jax.random.beta(beta_key, a, b)  # class samples, class proxies, U's mix, D_c's mix
  ms = m[2:] * opts["shift_scale"]
  keep_p = 1.0 - opts["dropout"]
  widths = (opts["fc_fc1_dim"], opts["fc_fc2_dim"])
  keep = tuple(tuple(jax.random.bernoulli(k, keep_p, (num_rows, w)) for k, w in zip(jax.random.split(key), widths))
               for key in jax.random.split(keep_key))
  return Draws(jnp.stack([m[0], 1.0 - m[0]]), jnp.stack([m[1], 1.0 - m[1]]), jnp.stack([1.0 - ms[0], ms[0]]),
               jnp.stack([1.0 - ms[1], ms[1]]), keep)


# -- feature-space augmentation -------------------------------------------------------------------------


class Augmented(NamedTuple):
  """The batch with its intra-class mixtures: rows [N] = B samples, then up to B // 2 mixed rows.

  x: float32 [N, E] raw features; labels: int32 [N]; proxies: float32 [N, E] per-sample proxies P' (raw);
  valid: bool [N] (False on unused mixture slots); count: float32 [] = B' (valid rows).
  """

  x: jax.Array
  labels: jax.Array
  proxies: jax.Array
  valid: jax.Array
  count: jax.Array


def positive_pairs(labels: jax.Array, num_slots: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The code's pair choice: per label with >= 2 samples, (its first batch index, its next one), ordered by
  label value. labels int [B] -> anchors int32 [num_slots], partners int32 [num_slots], valid bool [num_slots].
  """
  b = labels.shape[0]
  idx = jnp.arange(b)
  same = labels[:, None] == labels[None, :]
  is_first = ~jnp.any(same & (idx[None, :] < idx[:, None]), axis=1)
  later = same & (idx[None, :] > idx[:, None])
  candidate = is_first & jnp.any(later, axis=1)
  partner = jnp.argmax(later, axis=1)  # the first later index of the same label
  # One candidate per label: sorting their labels gives the code's np.unique order; the rest go last.
  order = jnp.argsort(jnp.where(candidate, labels, jnp.iinfo(jnp.int32).max), stable=True)[:num_slots]
  return order.astype(jnp.int32), partner[order].astype(jnp.int32), candidate[order]


def mix(weights: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """weights[0] * a + weights[1] * b in float32 (the code's scalar-times-tensor arithmetic)."""
  return weights[0] * a + weights[1] * b


def augment(x: jax.Array, labels: jax.Array, proxies: jax.Array, draws: Draws, *, pos_class_mix: bool,
            proxy_pair_mix: bool = True) -> Augmented:
  """x float32 [B, E], labels int [B], proxies float32 [C, E] -> the augmented batch (see `Augmented`)."""
  labels = labels.astype(jnp.int32)
  sample_proxies = proxies[labels]
  b = x.shape[0]
  if not pos_class_mix:
    return Augmented(x, labels, sample_proxies, jnp.ones((b,), bool), jnp.float32(b))
  anchors, partners, valid_pairs = positive_pairs(labels, b // 2)
  mixed = mix(draws.class_samples, x[anchors], x[partners])
  pair_labels = labels[anchors]
  if proxy_pair_mix:  # W[y_a] and W[y_p] are the same proxy: the code mixes it with itself
    mixed_proxies = mix(draws.class_proxies, proxies[pair_labels], proxies[labels[partners]])
  else:
    mixed_proxies = proxies[pair_labels]
  valid = jnp.concatenate([jnp.ones((b,), bool), valid_pairs])
  return Augmented(jnp.concatenate([x, mixed]), jnp.concatenate([labels, pair_labels]),
                   jnp.concatenate([sample_proxies, mixed_proxies]), valid, jnp.sum(valid).astype(jnp.float32))


def normalize(x: jax.Array) -> jax.Array:
  """torch F.normalize over the last axis: x / max(|x|, 1e-12)."""
  return l2_normalize(x, clamp_norm=True)


# -- discriminators (pure functions on parameter dicts) --------------------------------------------------


def _uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def init_linear(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
  """torch nn.Linear's default init: kernel [in, out] and bias [out] ~ U(+-1 / sqrt(in))."""
  kernel_key, bias_key = jax.random.split(key)
  bound = 1.0 / math.sqrt(fan_in)
  return {"kernel": _uniform(kernel_key, (fan_in, fan_out), bound), "bias": _uniform(bias_key, (fan_out,), bound)}


def _bn(n: int) -> tuple[dict, dict]:
  return ({"scale": jnp.ones((n,), jnp.float32), "bias": jnp.zeros((n,), jnp.float32)},
          {"mean": jnp.zeros((n,), jnp.float32), "var": jnp.ones((n,), jnp.float32)})


def init_discriminators(key: jax.Array, *, embedding_dim: int, num_classes: int, opts: dict) -> tuple[dict, dict]:
  """(params, BatchNorm running statistics) of U ('domain') and D_c ('category'); a BN layer the forward
  never uses (fd2_bn / fc2_bn off) is left out, as it never trains in the code."""
  keys = jax.random.split(key, 5)
  params, stats = {"domain": {}, "category": {}}, {"domain": {}, "category": {}}
  u, su = params["domain"], stats["domain"]
  u["fc1"] = init_linear(keys[0], embedding_dim, opts["fd_fc1_dim"])
  u["bn1"], su["bn1"] = _bn(opts["fd_fc1_dim"])
  u["fc2"] = init_linear(keys[1], opts["fd_fc1_dim"], 3)
  if opts["fd2_bn"]:
    u["bn2"], su["bn2"] = _bn(3)
  c, sc = params["category"], stats["category"]
  c["fc1"] = init_linear(keys[2], embedding_dim, opts["fc_fc1_dim"])
  c["bn1"], sc["bn1"] = _bn(opts["fc_fc1_dim"])
  c["fc2"] = init_linear(keys[3], opts["fc_fc1_dim"], opts["fc_fc2_dim"])
  c["bn2"], sc["bn2"] = _bn(opts["fc_fc2_dim"])
  c["fc3"] = init_linear(keys[4], opts["fc_fc2_dim"], num_classes)
  if opts["fc2_bn"]:
    c["bn3"], sc["bn3"] = _bn(num_classes)
  return params, stats


def linear(p: dict, x: jax.Array) -> jax.Array:
  return x @ p["kernel"] + p["bias"]


def batch_norm_train(p: dict, stats: dict, x: jax.Array, valid: jax.Array, count: jax.Array) -> tuple[jax.Array, dict]:
  """torch BatchNorm1d in training mode over the valid rows of x float32 [N, F]: normalise with the batch
  mean and biased variance; running mean/var <- 0.9 old + 0.1 batch (the variance unbiased, n / (n - 1)).
  Invalid rows are normalised too (their values are never used) but enter no statistic."""
  w = valid[:, None].astype(x.dtype)
  mean = jnp.sum(x * w, axis=0) / count
  var = jnp.sum(jnp.square((x - mean) * w), axis=0) / count  # two passes, as torch
  y = (x - mean) * jax.lax.rsqrt(var + _BN_EPS) * p["scale"] + p["bias"]
  m = _BN_MOMENTUM
  new = {"mean": (1.0 - m) * stats["mean"] + m * mean,
         "var": (1.0 - m) * stats["var"] + m * var * (count / (count - 1.0))}
  return y, jax.lax.stop_gradient(new)


def domain_discriminator(p: dict, stats: dict, x: jax.Array, valid: jax.Array,
                         count: jax.Array) -> tuple[jax.Array, dict]:
  """U: x float32 [N, E] -> logits [N, 3] and its new BN statistics (this call's batch)."""
  new = dict(stats)
  h, new["bn1"] = batch_norm_train(p["bn1"], stats["bn1"], linear(p["fc1"], x), valid, count)
  out = linear(p["fc2"], jax.nn.relu(h))
  if "bn2" in p:
    out, new["bn2"] = batch_norm_train(p["bn2"], stats["bn2"], out, valid, count)
  return out, new


def category_discriminator(p: dict, stats: dict, x: jax.Array, valid: jax.Array, count: jax.Array,
                           keep: tuple[jax.Array, jax.Array] | None, dropout: float) -> tuple[jax.Array, dict]:
  """D_c: x float32 [N, E] -> logits [N, C]. keep: the two dropout keep masks (None: no dropout)."""

  def drop(h, mask):  # torch nn.Dropout in training mode: inverted scaling
    return h if mask is None else jnp.where(mask, h / (1.0 - dropout), 0.0)

  masks = (None, None) if keep is None else keep
  new = dict(stats)
  h, new["bn1"] = batch_norm_train(p["bn1"], stats["bn1"], linear(p["fc1"], x), valid, count)
  h = drop(jax.nn.relu(h), masks[0])
  h, new["bn2"] = batch_norm_train(p["bn2"], stats["bn2"], linear(p["fc2"], h), valid, count)
  h = drop(jax.nn.relu(h), masks[1])
  out = linear(p["fc3"], h)
  if "bn3" in p:
    out, new["bn3"] = batch_norm_train(p["bn3"], stats["bn3"], out, valid, count)
  return out, new


# -- loss terms -----------------------------------------------------------------------------------------


def masked_mean(values: jax.Array, valid: jax.Array, count: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(valid, values, 0.0)) / count


def cross_entropy(logits: jax.Array, labels: jax.Array, valid: jax.Array, count: jax.Array) -> jax.Array:
  """torch CrossEntropyLoss (mean) over the valid rows."""
  return masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), valid, count)


def discrepancy(source_logits: jax.Array, target_logits: jax.Array, valid: jax.Array, count: jax.Array,
                mode: str) -> jax.Array:
  """'nwd': (|softmax(s)|_* - |softmax(t)|_*) / B' (nuclear norms; masked rows are zero rows, which add no
  singular value); 'l1': mean |softmax(s) - softmax(t)| over the valid rows and all classes."""
  ps = jnp.where(valid[:, None], jax.nn.softmax(source_logits, axis=-1), 0.0)
  pt = jnp.where(valid[:, None], jax.nn.softmax(target_logits, axis=-1), 0.0)
  if mode == "nwd":
    return (jnp.linalg.norm(ps, "nuc") - jnp.linalg.norm(pt, "nuc")) / count
  return jnp.sum(jnp.abs(ps - pt)) / (count * ps.shape[-1])


def proxy_loss(aug: Augmented, proxies: jax.Array, *, pos_alpha: float, neg_alpha: float, pos_delta: float,
               neg_delta: float) -> jax.Array:
  """The code's Proxy-Anchor variant (`compute_proxyloss`, proxy_dim 0), float32 scalar.

  Positive term: sample i against the per-sample proxy copies P'_j [N, N], mask y'_i = y'_j (diagonal
  included), log(1 + sum_i exp(-pos_alpha (s - pos_delta))) per column j, averaged over the B' columns.
  Negative term: samples against all C proxies, mask y'_i != c, log(1 + sum_i exp(neg_alpha (s - neg_delta)))
  per proxy, averaged over C (a proxy without negatives gives 0).
  """
  x = normalize(aug.x)
  pos_sims = x @ normalize(aug.proxies).T
  pos_mask = (aug.labels[:, None] == aug.labels[None, :]) & aug.valid[:, None] & aug.valid[None, :]
  pos = masked_logsumexp(-pos_alpha * (pos_sims - pos_delta), pos_mask, axis=0)
  sims = x @ normalize(proxies).T
  neg_mask = (aug.labels[:, None] != jnp.arange(proxies.shape[0])[None, :]) & aug.valid[:, None]
  neg = masked_logsumexp(neg_alpha * (sims - neg_delta), neg_mask, axis=0)
  return masked_mean(pos, aug.valid, aug.count) + jnp.mean(neg)


class AdversarialTerms(NamedTuple):
  """L_dom, L_cls (= 2 CE) and L_nwd (= d_discrepancy_ratio * discrepancy), float32 scalars."""

  domain: jax.Array
  category: jax.Array
  discrepancy: jax.Array


def adversarial_terms(params: dict, stats: dict, aug: Augmented, draws: Draws, opts: dict, *,
                      dropout: bool) -> tuple[AdversarialTerms, dict]:
  """The code's `compute_unit_discriminator` then `compute_dis_discriminator`: U's three calls, D_c's two,
  BN statistics threaded through in that order. Returns the terms and the discriminators' new statistics."""
  if opts["mix_unit_vectors"]:
    x_raw, p_raw = normalize(aug.x), normalize(aug.proxies)
  else:
    x_raw, p_raw = aug.x, aug.proxies
  prep = normalize if opts["normal"] else (lambda v: v)
  x_in, p_in = prep(aug.x), prep(aug.proxies)
  n, valid, count = aug.x.shape[0], aug.valid, aug.count

  u, u_stats = params["domain"], stats["domain"]
  total = jnp.zeros((), jnp.float32)
  mix_in = prep(mix(draws.domain_mix, x_raw, p_raw))
  for domain, inputs in enumerate((x_in, mix_in, p_in)):  # samples 0, mixtures 1, proxies 2
    logits, u_stats = domain_discriminator(u, u_stats, inputs, valid, count)
    total = total + cross_entropy(logits, jnp.full((n,), domain, jnp.int32), valid, count)

  c, c_stats = params["category"], stats["category"]
  keep = draws.category_keep if dropout else (None, None)
  mix_in = prep(mix(draws.category_mix, x_raw, p_raw))
  source, c_stats = category_discriminator(c, c_stats, x_in, valid, count, keep[0], opts["dropout"])
  target, c_stats = category_discriminator(c, c_stats, mix_in, valid, count, keep[1], opts["dropout"])
  category = 2.0 * cross_entropy(source, aug.labels, valid, count)
  disc = opts["d_discrepancy_ratio"] * discrepancy(source, target, valid, count, opts["dis_mode"])
  return AdversarialTerms(total, category, disc), {"domain": u_stats, "category": c_stats}


# -- the network ----------------------------------------------------------------------------------------


def _torch_linear_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class DoubleEmbedding(nnx.Module):
  """Backbone feature map -> GMP + GAP (summed) -> Linear -> LayerNorm without affine: [B, S, S, 3] -> [B, E]."""

  def __init__(self, backbone: nnx.Module, in_features: int, embedding_dim: int, *, rngs: nnx.Rngs):
    self.backbone = backbone
    init = _torch_linear_init(in_features)
    self.embedding = nnx.Linear(in_features, embedding_dim, kernel_init=init, bias_init=init, rngs=rngs)
    self.layer_norm = nnx.LayerNorm(embedding_dim, epsilon=_LN_EPS, use_scale=False, use_bias=False,
                                    use_fast_variance=False, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    fmap = self.backbone.forward_features(images)  # [B, h, w, C]
    pooled = jnp.max(fmap, axis=(1, 2)) + jnp.mean(fmap, axis=(1, 2))
    return self.layer_norm(self.embedding(pooled.astype(self.embedding.kernel.dtype)))


_DISC_KEYS = ("fd_fc1_dim", "fd2_bn", "fc_fc1_dim", "fc_fc2_dim", "fc2_bn")


# Inits as one compiled call each (eagerly every parameter shape would compile on its own).
@functools.partial(jax.jit, static_argnums=(1, 2))
def _proxies_init(key: jax.Array, shape: tuple[int, int], scale: float) -> jax.Array:
  return scale * jax.random.normal(key, shape, jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _discriminators_init(key: jax.Array, embedding_dim: int, num_classes: int, opts: tuple) -> tuple[dict, dict]:
  return init_discriminators(key, embedding_dim=embedding_dim, num_classes=num_classes, opts=dict(opts))


def _check_options(o: dict, num_classes: int) -> None:
  if o["dis_mode"] not in DISCREPANCIES:
    raise unknown_name("discrepancy (config.method.dis_mode)", o["dis_mode"], DISCREPANCIES, cls=InvalidValueError)
  if not 0.0 <= o["dropout"] < 1.0:
    raise InvalidValueError(f"config.method.dropout must lie in [0, 1), got {o['dropout']}")
  if not 0.0 < o["shift_scale"] <= 1.0:
    # The code also accepts (-1, 0], a shift towards the proxies, which no released config uses.
    raise InvalidValueError(f"config.method.shift_scale must lie in (0, 1], got {o['shift_scale']}")
  for key in ("mix_alpha", "mix_beta"):
    if not o[key] > 0:
      raise InvalidValueError(f"config.method.{key} must be > 0 (a Beta parameter), got {o[key]}")
  if o["d_step"] < 1 or o["g_step"] < 1:
    raise InvalidValueError(f"config.method.d_step and g_step must be >= 1, got {o['d_step']} and {o['g_step']}")
  if num_classes < 2:
    raise InvalidValueError(f"dada needs at least 2 training classes, got {num_classes}")


class DADAMethod(Method):
  """DADA behind the Method interface; see the module docstring."""

  name = "dada"

  def __init__(self, config: Any, *, num_classes: int):
    self.config = config
    self.opts = config.method.to_dict()
    self.num_classes = int(num_classes)
    _check_options(self.opts, self.num_classes)
    self.loss_hparams = dict(self.opts["loss"])
    self.embedding_dim = int(config.model.embedding_dim)
    self.compute_dtype = modeling.compute_dtype(config.compute_dtype)
    self.discriminator_group = self.opts["discriminator_group"]
    names = {"base"}
    for i, (_, spec) in enumerate(config.optim.groups or ()):
      spec = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
      names.add(spec.get("name", f"group{i}"))  # optim's default name of an unnamed rule
    if self.discriminator_group not in names:
      raise InvalidValueError(f"config.optim.groups names no group {self.discriminator_group!r} "
                              f"(config.method.discriminator_group)",
                              "add a rule ('discriminators/.*', dict(name='discriminators', lr=...)): the "
                              "discriminators need their own optimizer")
    self.generator_groups = tuple(sorted(names - {self.discriminator_group}))
    self.model: modeling.SplitModel | None = None
    self._batchnorm: set[str] = set()
    self.draws = self.sample_draws  # tests replace this to replay given draws

  # -- model ------------------------------------------------------------------------------------------

  def init(self, rng: jax.Array) -> tuple[dict, dict]:
    backbone_rng, head_rng, proxy_rng, disc_rng = jax.random.split(rng, 4)
    m = self.config.model
    backbone = modeling.build_backbone(m, backbone_rng, self.config.dataset.image_size)
    self.pretrained_cfg = backbone.pretrained_cfg
    in_features = pooled_feature_dim(backbone, "gap_gmp_linear", int(self.config.dataset.image_size), m.backbone)
    net = DoubleEmbedding(backbone, in_features, self.embedding_dim, rngs=nnx.Rngs(head_rng))
    self._batchnorm = modeling.batchnorm_affine_paths(net, "model")
    modeling.set_batchnorm_frozen(net, bool(self.opts["bn_freeze"]))
    self.model = modeling.SplitModel(net)
    proxies = _proxies_init(proxy_rng, (self.num_classes, self.embedding_dim), self.opts["proxy_init_scale"])
    disc, disc_stats = _discriminators_init(disc_rng, self.embedding_dim, self.num_classes,
                                            tuple(sorted((k, self.opts[k]) for k in _DISC_KEYS)))
    params = {"model": self.model.params, "loss": {"proxies": proxies}, "discriminators": disc}
    return params, {"model": self.model.other, "discriminators": disc_stats}

  def param_selectors(self, params: dict) -> dict[str, set[str]]:
    del params
    return {"batchnorm": set(self._batchnorm)}

  def forward(self, model_params: Any, model_state: Any, images: jax.Array, *, train: bool) -> tuple[jax.Array, Any]:
    """The network: images [B, S, S, 3] -> raw features float32 [B, E] and the new BN statistics."""
    if self.model is None:
      raise RuntimeError("call method.init(rng) before using the method")
    dtype = self.compute_dtype
    net = self.model.merge(modeling.cast_floating(model_params, dtype), modeling.cast_floating(model_state, dtype),
                           train=train)
    x = net(images if dtype is None else images.astype(dtype))
    new_state = self.model.other_of(net)
    if dtype is not None:  # statistics go back to their stored dtype
      new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, model_state)
    return x.astype(jnp.float32), new_state

  def sample_draws(self, rng: jax.Array, num_rows: int) -> Draws:
    return sample_draws(rng, num_rows, self.opts)

  def _augmented(self, x: jax.Array, labels: jax.Array, proxies: jax.Array, draws: Draws) -> Augmented:
    return augment(x, labels, proxies, draws, pos_class_mix=self.opts["pos_class_mix"],
                   proxy_pair_mix=self.opts["proxy_pair_mix"])

  def _rows(self, batch_size: int) -> int:
    return batch_size + (batch_size // 2 if self.opts["pos_class_mix"] else 0)

  # -- Method interface -----------------------------------------------------------------------------

  def prepare(self, params: dict, method_state: dict, batch: dict, rng: jax.Array,
              info: StepInfo) -> tuple[Any, dict]:
    """The code's `with torch.no_grad(): model(x)` in training mode, once per iteration."""
    del rng, info
    x, model_state = self.forward(params["model"], method_state["model"], batch["image"], train=True)
    return {"features": x}, {**method_state, "model": model_state}

  def discriminator_loss(self, params: dict, method_state: dict, batch: dict, rng: jax.Array,
                         info: StepInfo) -> tuple[jax.Array, tuple[dict, dict]]:
    """L_D on the prepared (no-grad) features; differentiated w.r.t. the discriminators only."""
    x = info.prepared["features"]
    draws = self.draws(rng, self._rows(x.shape[0]))
    aug = self._augmented(x, batch["label"], params["loss"]["proxies"], draws)
    terms, disc_stats = adversarial_terms(params["discriminators"], method_state["discriminators"], aug, draws,
                                          self.opts, dropout=True)
    r = self.opts["d_dis_ratio"]
    loss = (1.0 - r) * terms.domain + r * (terms.category - terms.discrepancy)
    metrics = {"d_domain": terms.domain, "d_category": terms.category, "d_discrepancy": terms.discrepancy}
    return loss, (metrics, {**method_state, "discriminators": disc_stats})

  def generator_loss(self, params: dict, method_state: dict, batch: dict, rng: jax.Array,
                     info: StepInfo) -> tuple[jax.Array, tuple[dict, dict]]:
    """L_G: the network forward again (training mode), proxy loss and the adversarial terms."""
    del info
    x, model_state = self.forward(params["model"], method_state["model"], batch["image"], train=True)
    draws = self.draws(rng, self._rows(x.shape[0]))
    proxies = params["loss"]["proxies"]
    aug = self._augmented(x, batch["label"], proxies, draws)
    pa = proxy_loss(aug, proxies, **self.loss_hparams)
    terms, disc_stats = adversarial_terms(params["discriminators"], method_state["discriminators"], aug, draws,
                                          self.opts, dropout=self.opts["generator_dropout"])
    r = self.opts["d_dis_ratio"]
    adversarial = r * (terms.category + terms.discrepancy) - (1.0 - r) * terms.domain
    loss = self.opts["oproxy_ratio"] * pa + self.opts["dis_gamma"] * adversarial
    metrics = {"proxy_loss": pa, "g_domain": terms.domain, "g_category": terms.category,
               "g_discrepancy": terms.discrepancy, "mixed_rows": aug.count - x.shape[0]}
    return loss, (metrics, {**method_state, "model": model_state, "discriminators": disc_stats})

  def objectives(self) -> dict:
    return {"discriminator": self.discriminator_loss, "generator": self.generator_loss}

  def phases(self, epoch: int) -> tuple[Phase, ...]:
    d = Phase("discriminator", groups=(self.discriminator_group,), repeats=int(self.opts["d_step"]))
    if epoch < self.opts["d_warmup"]:
      return (d,)  # the code's d_warmup: the discriminators alone
    return d, Phase("generator", groups=self.generator_groups, repeats=int(self.opts["g_step"]))

  def embed_fn(self, params: dict, method_state: dict, images: jax.Array) -> jax.Array:
    x, _ = self.forward(params["model"], method_state["model"], images, train=False)
    return normalize(x)


def build(config: Any, num_classes: int) -> DADAMethod:
  return DADAMethod(config, num_classes=num_classes)
