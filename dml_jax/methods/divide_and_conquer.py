"""Divide & Conquer (Sanakoyeu et al., TPAMI 2021): hierarchical re-clustering and one learned mask per cluster.

As the authors' code (`CompVis/metric-learning-divide-and-conquer-improved`) trains it; docs/methods/
divide_and_conquer.md describes the recipe and every place where this port defines what the code leaves open.

Model, images float32 [B, S, S, 3]:
  ResNet trunk (BatchNorm with frozen running statistics, trainable scale and bias) -> global average pool
  f [B, F] -> dropout p (training only) -> Linear F -> E (torch's default init, W and b ~ U(+-1/sqrt(F)))
  -> z [B, E].
  Training, cluster c, before the full-embedding epoch: e = l2(l2(z * relu(mask_c))) (the code normalises in
  the model and again in its train step). From that epoch on: e = l2(l2(z)), no mask.
  Evaluation: l2(z), unmasked. Clustering features ('penultimate'): l2(f), eval mode.
  l2(x) = x / max(|x|, 1e-12) (torch F.normalize).

Loss per batch (every batch holds the images of one cluster):
  margin loss with distance-weighted sampling (losses.margin_loss: beta fixed, alpha, cutoffs; the code's
  quirks) + lambda * mean over ordered pairs i != j < K of cos(relu(mask_i), relu(mask_j)), the overlap
  regulariser over ALL current masks whichever cluster the batch came from (0 for K = 1; dropped from the
  full-embedding epoch on). cos(a, b) = a.b / (max(|a|, 1e-8) max(|b|, 1e-8)) as torch's cosine similarity.

Division schedule ('top_bot'), `on_epoch_start` at every epoch e with e % mod_epoch == 0:
  1. features of the whole training set (eval transforms), k-means with the current K (faiss or the JAX
     k-means; niter 100, nredo 1, seed 1234 + trial, up to 30 trials until every cluster holds >= 2 classes
     with >= 2 images; the last trial is kept if none passes). K = 1 needs no k-means (one cluster).
  2. from the second clustering on: Hungarian relabelling to the previous assignment (scipy); by default
     with the code's inverse-permutation quirk.
  3. e > 0 and K < K_final: every cluster c is split by 2-means (same trials and check) into 2c and 2c + 1,
     K <- 2K; mask c is copied into masks 2c and 2c + 1 ('learn') or split into the two halves of its
     block of ones ('fixed'), and the masks' optimizer state restarts (the code re-creates that group).
  4. supervised cleanup: a class with exactly one image in a cluster loses that image to cluster -1 (not
     trained on until the next clustering).
Batches (`train_sampler`): per cluster, the code's adaptive class-balanced sampler; an epoch is rounds of one
batch per cluster in id order, rounds = the longest cluster's batches per pass (shorter clusters start new
passes); see `AdaptiveBalancedBatches` and `ClusterRoundRobinSampler`.

Masks are one parameter 'model/masks' [K_final, E], allocated up front: rows >= K are placeholders that the
next split overwrites (they never enter the loss, the regulariser or the embedding). This keeps one compiled
step for the whole run; docs/methods/divide_and_conquer.md explains why it is the code's behaviour exactly.

Parameter paths: 'model/backbone/...' (timm names), 'model/embedding/{kernel,bias}', 'model/masks'. The
recipe's groups (configs/dnc_*.py) give the backbone `lr_cycle` (its alternate-epoch freeze), the masks their
x100 rate and a `stop_epoch` at the full-embedding epoch ('fixed': frozen); Adam with coupled L2 everywhere.
method_state: 'model' (BatchNorm statistics), 'clusters' int32 [N] (cluster of every training record, -1 =
unused; [0] before the first clustering), 'num_clusters' int32 [] (current K).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.optimize
from flax import nnx

from dml_jax import losses
from dml_jax.errors import InvalidValueError
from dml_jax.eval import kmeans as kmeans_lib
from dml_jax.losses.ops import l2_normalize
from dml_jax.methods import modeling
from dml_jax.methods.base import Method, StepInfo

VARIANTS = ("learn", "fixed")
SMALL_CLASS_ACTIONS = ("sample_other", "duplicate")
SMALL_CLUSTER_ACTIONS = ("skip", "error")
CLUSTERING_FEATURES = ("penultimate", "embedding")
MASKED, FULL = "masked", "full"  # step variants
_COSINE_EPS = 1e-8  # torch.nn.CosineSimilarity(eps=1e-8) in the code's regulariser


def config() -> ml_collections.ConfigDict:
  """config.method.* of 'divide_and_conquer' (the reference command's values; batch and images per class come
  from config.data.batch_size / samples_per_class)."""
  return ml_collections.ConfigDict(dict(
      name="divide_and_conquer",
      variant="learn",  # 'learn': real-valued masks; 'fixed': binary contiguous blocks (mask lr and wd 0)
      num_clusters=32,  # K_final, reached by doubling from 1; a power of two
      mod_epoch=2,  # division frequency: re-cluster every mod_epoch epochs
      force_full_embedding_epoch=80,  # from this epoch on: no mask, no regulariser
      masking_lambda=0.01,  # weight of the mask-overlap regulariser
      mask_relu=True,  # masks act through ReLU (the regulariser always takes ReLU'd masks)
      features_dropout=0.01,  # dropout on the pooled features, training only
      margin=0.2,  # alpha of the margin loss
      beta=1.2,  # its boundary, fixed (not trained by the reference command)
      sampling_cutoff=0.5,  # distance-weighted sampling: distances clipped below at this value
      nonzero_loss_cutoff=1.4,  # ... and negatives beyond it get a tiny weight (= beta + margin)
      clustering=ml_collections.ConfigDict(dict(
          features="penultimate",  # 'penultimate' (pooled backbone features) or 'embedding' (unmasked, E-d)
          backend="auto",  # k-means: 'faiss' | 'jax' | 'auto' (faiss on CPU or with faiss-gpu, else JAX)
          niter=100,
          trials=30,  # k-means runs (seed + trial) until every cluster holds >= 2 classes of >= 2 images
          seed=1234,
          # The code maps labels through the inverse of the optimal Hungarian permutation (a bug whenever that
          # permutation is not its own inverse); False applies the intended matching.
          reassign_inverse_bug=True,
          supervised=True,  # drop single-image classes from each cluster (to cluster -1)
      )),
      sampler=ml_collections.ConfigDict(dict(
          # A class with fewer images than the batch asks of it: 'sample_other' takes what it has and fills
          # the batch with other images of the cluster (reference command); 'duplicate' repeats its images.
          small_class_action="sample_other",
          # A cluster that cannot give one batch (fewer images than the batch or fewer than 2 classes) makes
          # the code crash; 'skip' trains on the other clusters until the next clustering, 'error' raises.
          small_cluster_action="skip",
      )),
  ))


# ----------------------------------------------------------------------------------------- clustering (host)


def clusters_are_balanced(assignments: np.ndarray, labels: np.ndarray, num_clusters: int) -> bool:
  """True when every cluster 0..K-1 holds at least 2 classes that have at least 2 images in it (the code's
  acceptance test of a k-means trial). assignments, labels: int [N]."""
  for c in range(num_clusters):
    _, counts = np.unique(labels[assignments == c], return_counts=True)
    if np.count_nonzero(counts >= 2) < 2:
      return False
  return True


def kmeans_with_trials(features: np.ndarray, labels: np.ndarray, num_clusters: int, *, niter: int = 100,
                       trials: int = 30, seed: int = 1234, backend: str = "auto") -> tuple[np.ndarray, int]:
  """k-means (nredo 1, no subsampling) with seeds seed, seed + 1, ... until `clusters_are_balanced`.

  Args:
    features: float32 [N, D].
    labels: int [N], the training classes (only the acceptance test reads them).
    num_clusters: K <= N.
    niter, trials, seed: the code's 100, 30, 1234.
    backend: dml_jax.eval.kmeans backend.

  Returns:
    (assignments int64 [N] in [0, K), trials run). When no trial passes, the last one's assignments.
  """
  assignments = None
  for trial in range(trials):
    assignments = kmeans_lib.kmeans(features, num_clusters, niter=niter, nredo=1, seed=seed + trial, backend=backend,
                                    max_points_per_centroid=10_000_000).assignments
    if clusters_are_balanced(assignments, labels, num_clusters):
      return assignments, trial + 1
  return assignments, trials


def relabel_to_previous(current: np.ndarray, previous: np.ndarray, *, inverse_bug: bool = True) -> np.ndarray:
  """Renames the clusters of `current` to match `previous` (minimum total symmetric difference, Hungarian).

  cost[i, j] = |{records in current cluster i} xor {records in previous cluster j}| over ids 0..n-1,
  n = max(previous) + 1 as in the code (-1 = unassigned, ignored); scipy's linear_sum_assignment gives the
  optimal matching i -> col[i]. The code then renames current label col[i] to i, i.e. applies the inverse
  permutation (`inverse_bug=True`, faithful); False renames i to col[i], the intended matching. Both agree
  when the optimal permutation is its own inverse (identity, swaps).

  Args:
    current: int [N], fresh k-means labels in [0, K).
    previous: int [N], the previous assignment (after cleanup, so with -1 entries).

  Returns:
    int64 [N], the renamed `current`.
  """
  current = np.asarray(current, np.int64)
  previous = np.asarray(previous, np.int64)
  n = int(previous.max()) + 1
  in_current = (current >= 0) & (current < n)
  in_previous = previous >= 0
  both = in_current & in_previous
  # |A xor B| = |A| + |B| - 2 |A and B|, from counts (no [n, N] membership matrices).
  overlap = np.bincount(current[both] * n + previous[both], minlength=n * n).reshape(n, n)
  current_sizes = np.bincount(current[in_current], minlength=n)
  previous_sizes = np.bincount(previous[in_previous], minlength=n)
  cost = (current_sizes[:, None] + previous_sizes[None, :] - 2 * overlap).astype(np.float64)
  rows, cols = scipy.optimize.linear_sum_assignment(cost)
  renamed = current.copy()
  for row, col in zip(rows, cols):
    if inverse_bug:
      renamed[current == col] = row
    else:
      renamed[current == row] = col
  return renamed


def split_clusters(features: np.ndarray, labels: np.ndarray, assignments: np.ndarray, *, niter: int = 100,
                   trials: int = 30, seed: int = 1234, backend: str = "auto") -> np.ndarray:
  """Splits every cluster c present in `assignments` by 2-means on its own rows into 2c and 2c + 1.

  Each split runs `kmeans_with_trials` (K = 2) on the cluster's features. A cluster of a single record
  cannot be split (faiss refuses fewer points than centroids and the code would crash): it becomes 2c.

  Args:
    features: float32 [N, D]; labels: int [N]; assignments: int [N] in [0, K).

  Returns:
    int64 [N] in [0, 2K).
  """
  divided = np.full(len(assignments), -1, np.int64)
  for c in np.unique(assignments):
    rows = np.flatnonzero(assignments == c)
    if len(rows) < 2:
      halves = np.zeros(len(rows), np.int64)
    else:
      halves, _ = kmeans_with_trials(features[rows], labels[rows], 2, niter=niter, trials=trials, seed=seed,
                                     backend=backend)
    divided[rows] = 2 * int(c) + halves
  return divided


def drop_single_image_classes(assignments: np.ndarray, labels: np.ndarray, num_clusters: int) -> np.ndarray:
  """The code's supervised cleanup: in every cluster, a class with exactly one image there loses it to -1."""
  out = np.asarray(assignments, np.int64).copy()
  for c in range(num_clusters):
    in_cluster = out == c
    classes, counts = np.unique(labels[in_cluster], return_counts=True)
    single = classes[counts == 1]
    out[in_cluster & np.isin(labels, single)] = -1
  return out


def split_masks(masks: np.ndarray, num_clusters: int, variant: str) -> np.ndarray:
  """Masks after K -> 2K: rows 2c and 2c + 1 derive from row c (rows >= 2K unchanged).

  'learn': both children are copies of the parent. 'fixed': the parent's block of ones (from its first
  non-zero entry, length sum/2 rounded down) goes to child 2c, the rest of the parent to 2c + 1.
  masks: float32 [K_final, E].
  """
  masks = np.asarray(masks, np.float32)
  out = masks.copy()
  parents = masks[:num_clusters]
  if variant == "learn":
    out[:2 * num_clusters] = np.repeat(parents, 2, axis=0)
    return out
  for c, parent in enumerate(parents):
    first = int(np.flatnonzero(parent)[0])
    length = int(parent.sum()) // 2
    child = np.zeros_like(parent)
    child[first:first + length] = parent[first:first + length]
    out[2 * c], out[2 * c + 1] = child, parent - child
  return out


def recluster(features: np.ndarray | None, labels: np.ndarray, previous: np.ndarray | None, num_clusters: int, *,
              split: bool, niter: int = 100, trials: int = 30, seed: int = 1234, backend: str = "auto",
              inverse_bug: bool = True, supervised: bool = True) -> tuple[np.ndarray, int, dict]:
  """One division step of the code (steps 1-4 of the module docstring).

  Args:
    features: float32 [N, D], or None when K = 1 and no split follows (nothing to cluster).
    labels: int [N].
    previous: int [N] (the last assignment, -1 allowed) or None before the first clustering.
    num_clusters: the current K.
    split: divide every cluster in two afterwards.

  Returns:
    (assignments int64 [N] in [-1, K'), K', info) with K' = 2K after a split; info: 'trials' of the k-means.
  """
  n = len(labels)
  trials_run = 0
  if num_clusters == 1:
    assignments = np.zeros(n, np.int64)  # what any k-means with one centroid gives
  else:
    assignments, trials_run = kmeans_with_trials(features, labels, num_clusters, niter=niter, trials=trials, seed=seed,
                                                 backend=backend)
  if previous is not None:
    assignments = relabel_to_previous(assignments, previous, inverse_bug=inverse_bug)
  if split:
    assignments = split_clusters(features, labels, assignments, niter=niter, trials=trials, seed=seed, backend=backend)
    num_clusters *= 2
  if supervised:
    assignments = drop_single_image_classes(assignments, labels, num_clusters)
  return assignments, num_clusters, {"trials": trials_run}


# --------------------------------------------------------------------------------------------- sampling (host)


class AdaptiveBalancedBatches:
  """The code's adaptive class-balanced batch sampler over one cluster (its `AdaptiveClassBalancedSampler`).

  Positions are local (0..n-1 over the cluster's records in index order). State that lives as long as the
  sampler (until the next clustering): every class's shuffled list of positions and a pointer into it. Each
  `new_pass()` is one pass of the code's sampler (`len(self)` = n // B batches):

    n_pc = samples_per_class, n_cls = B // n_pc; with fewer classes: n_pc = B // #classes, n_cls = #classes
    per batch: the B - n_pc n_cls "larger" classes (one image more) drawn among all classes, then n_cls
    distinct classes; each gives the next `take` positions of its list (take = n_pc [+1], capped at the
    class size for 'sample_other'), or `take` random ones (with replacement only if the class is smaller)
    when its list has fewer left; the list is reshuffled when used up; 'sample_other' fills a short batch
    with random positions of the cluster not yet in it.

  Every draw comes from `rng` (a numpy RandomState) in the code's order and with the code's argument types
  (the class list in the iteration order of a Python set, as the code builds it), so with the RandomState
  the code seeded globally it yields the code's batches.
  """

  def __init__(self, labels: Sequence[int], batch_size: int, samples_per_class: int, rng: np.random.RandomState,
               small_class_action: str = "sample_other"):
    if small_class_action not in SMALL_CLASS_ACTIONS:
      raise ValueError(f"small_class_action must be one of {SMALL_CLASS_ACTIONS}, got {small_class_action!r}")
    if samples_per_class < 1 or batch_size % samples_per_class:
      raise ValueError(f"samples_per_class ({samples_per_class}) must divide batch_size ({batch_size})")
    self.labels = np.asarray(labels, np.int64)
    self.batch_size = int(batch_size)
    self.samples_per_class = int(samples_per_class)
    self.small_class_action = small_class_action
    self.rng = rng
    # The code draws classes from list(set(labels)); the order of that list decides which class a draw picks.
    self.classes = list(set(self.labels.tolist()))
    self.class_positions = {c: np.flatnonzero(self.labels == c) for c in self.classes}
    for c in self.classes:
      rng.shuffle(self.class_positions[c])
    self.pointers = {c: 0 for c in self.classes}

  def __len__(self) -> int:
    return len(self.labels) // self.batch_size

  def can_sample(self) -> bool:
    """False where the code crashes: no full batch (an empty loader), or fewer than 2 classes (its assert)."""
    return len(self) > 0 and min(self.batch_size // self.samples_per_class, len(self.classes)) > 1

  def new_pass(self) -> Iterator[np.ndarray]:
    """Yields int64 [B] local positions, `len(self)` batches; the state advances only as batches are taken."""
    b, rng = self.batch_size, self.rng
    per_class, num_classes = self.samples_per_class, b // self.samples_per_class
    if len(self.classes) < num_classes:
      per_class, num_classes = b // len(self.classes), len(self.classes)
    if num_classes <= 1:
      raise ValueError(f"cannot sample batches from a cluster with {len(self.classes)} class(es)")
    count = 0
    while count + b <= len(self.labels):
      larger = set(rng.choice(self.classes, b - per_class * num_classes, replace=False).tolist())
      chosen = rng.choice(self.classes, num_classes, replace=False)
      batch: list[int] = []
      for c in chosen.tolist():
        positions = self.class_positions[c]
        take = per_class + int(c in larger)
        if self.small_class_action == "sample_other":
          take = min(take, len(positions))
        start = self.pointers[c]
        if start + take > len(positions):
          batch.extend(rng.choice(positions, take, replace=len(positions) < take).tolist())
        else:
          batch.extend(positions[start:start + take].tolist())
        self.pointers[c] = start + take
        if self.pointers[c] >= len(positions):
          rng.shuffle(positions)
          self.pointers[c] = 0
        count += take
      if self.small_class_action == "sample_other" and len(batch) < b:
        missing = b - len(batch)
        allowed = list(set(range(len(self.labels))) - set(batch))  # a set difference, ordered as the code's
        batch.extend(rng.choice(allowed, missing, replace=len(allowed) < missing).tolist())
        count += missing
      yield np.asarray(batch, np.int64)


def cluster_rng(seed: int, period_start: int, cluster: int) -> np.random.RandomState:
  """The RandomState of one cluster's sampler for the clustering made at epoch `period_start`."""
  state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(period_start), int(cluster)]).generate_state(1)[0]
  return np.random.RandomState(int(state))


class ClusterRoundRobinSampler:
  """An epoch of batches from the clusters in turn: the code's merge of its per-cluster loaders.

  Epoch = `rounds` rounds of one batch per cluster in id order, rounds = max over clusters of that cluster's
  batches per pass; each epoch starts a new pass of every cluster, a cluster whose pass runs out starts
  another, and a pass cut short by the epoch's end leaves its class pointers where they are (the code's
  loaders with num_workers = 0; its worker processes would draw a few batches ahead). Clusters that cannot
  give a batch are skipped (small_cluster_action='skip') or raise ('error').

  Pure in (clusters, period_start, seed): epoch e >= period_start replays the passes of the epochs before it,
  so a resumed run rebuilds the same batches. A BatchSampler (dml_jax.data.samplers).

  Args:
    labels: int [N], the training records' classes.
    clusters: int [N], cluster per record (-1 = unused), ids in [0, K).
    num_clusters: K.
    batch_size, samples_per_class: B and the images per class asked of each class.
    seed: the run's seed; period_start: the epoch of the clustering (each cluster's RandomState derives
      from (seed, period_start, cluster)).
    steps_per_epoch: a cap on the epoch's batches (None: all rounds).
  """

  def __init__(self, labels: Sequence[int], clusters: Sequence[int], num_clusters: int, *, batch_size: int,
               samples_per_class: int, seed: int, period_start: int, small_class_action: str = "sample_other",
               small_cluster_action: str = "skip", steps_per_epoch: int | None = None, log=None):
    if small_cluster_action not in SMALL_CLUSTER_ACTIONS:
      raise ValueError(f"small_cluster_action must be one of {SMALL_CLUSTER_ACTIONS}, got {small_cluster_action!r}")
    labels = np.asarray(labels, np.int64)
    clusters = np.asarray(clusters, np.int64)
    if labels.shape != clusters.shape:
      raise ValueError(f"labels {labels.shape} and clusters {clusters.shape} need one entry per record")
    self.batch_size = int(batch_size)
    self.period_start = int(period_start)
    self.cluster_ids, self.members, self.samplers, skipped = [], [], [], []
    for c in range(num_clusters):
      members = np.flatnonzero(clusters == c)
      rng = cluster_rng(seed, period_start, c)
      sampler = AdaptiveBalancedBatches(labels[members], batch_size, samples_per_class, rng, small_class_action)
      if not sampler.can_sample():
        skipped.append((c, len(members), len(sampler.classes)))
        continue
      self.cluster_ids.append(c)
      self.members.append(members)
      self.samplers.append(sampler)
    self.skipped = skipped
    if skipped:
      text = ", ".join(f"cluster {c} ({n} images, {k} classes)" for c, n, k in skipped)
      if small_cluster_action == "error" or not self.samplers:
        raise ValueError(f"clusters that cannot give a batch of {batch_size} from >= 2 classes: {text} (the "
                         f"authors' code crashes here; small_cluster_action='skip' trains on the others)")
      if log is not None:
        log(f"divide_and_conquer: skipping until the next clustering (fewer than {batch_size} images or 2 "
            f"classes): {text}")
    self.rounds = max(len(s) for s in self.samplers)
    full = self.rounds * len(self.samplers)
    self.steps = min(full, int(steps_per_epoch)) if steps_per_epoch else full
    self._epochs: list[np.ndarray] = []  # epochs period_start, period_start + 1, ... simulated so far

  def __len__(self) -> int:
    return self.steps

  def _next_epoch(self) -> np.ndarray:
    passes = [s.new_pass() for s in self.samplers]
    out = np.empty((self.steps, self.batch_size), np.int64)
    for step in range(self.steps):
      j = step % len(self.samplers)
      batch = next(passes[j], None)
      if batch is None:  # this cluster's pass is used up: start another
        passes[j] = self.samplers[j].new_pass()
        batch = next(passes[j])
      out[step] = self.members[j][batch]
    return out

  def epoch_indices(self, epoch: int) -> np.ndarray:
    """int64 [len(self), B] record indices of `epoch` (>= period_start)."""
    k = int(epoch) - self.period_start
    if k < 0:
      raise ValueError(f"this sampler serves epochs from {self.period_start} (its clustering) on, not {epoch}")
    while len(self._epochs) <= k:
      self._epochs.append(self._next_epoch())
    return self._epochs[k]


# --------------------------------------------------------------------------------------------------- model


def _torch_linear_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# torch nn.Linear's default: kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in)) for the weight, same for the bias.
_TORCH_LINEAR_KERNEL_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class DivideAndConquerNet(nnx.Module):
  """Backbone + embedding layer (Linear F -> E) + the masks float32 [K_final, E], all ones at the start."""

  def __init__(self, backbone: nnx.Module, embedding: nnx.Linear, num_masks: int):
    self.backbone = backbone
    self.embedding = embedding
    self.masks = nnx.Param(jnp.ones((num_masks, embedding.out_features), jnp.float32))

  def pooled(self, images: jax.Array) -> jax.Array:
    """images [B, S, S, 3] -> global-average-pooled features [B, F]."""
    return jnp.mean(self.backbone.forward_features(images), axis=(1, 2))


def normalize(x: jax.Array) -> jax.Array:
  """torch F.normalize: x / max(|x|, 1e-12) over the last axis."""
  return l2_normalize(x, clamp_norm=True)


def mask_overlap(masks: jax.Array, num_clusters: jax.Array, *, relu: bool = True) -> jax.Array:
  """Mean cosine similarity over ordered pairs i != j of the first K masks (the code's regulariser, unweighted).

  masks: float [K_final, E]; num_clusters: int [] (K, may be traced). Returns float32 []; 0 for K <= 1.
  cos(a, b) = a.b / (max(|a|, 1e-8) max(|b|, 1e-8)) (torch's CosineSimilarity, each norm clamped).
  """
  m = jax.nn.relu(masks) if relu else masks
  m = m.astype(jnp.float32)
  unit = m / jnp.maximum(jnp.linalg.norm(m, axis=1, keepdims=True), _COSINE_EPS)
  cos = jnp.matmul(unit, unit.T, precision=jax.lax.Precision.HIGHEST)
  active = jnp.arange(masks.shape[0]) < num_clusters
  pairs = active[:, None] & active[None, :] & ~jnp.eye(masks.shape[0], dtype=bool)
  k = num_clusters.astype(jnp.float32)
  return jnp.where(k > 1, jnp.sum(jnp.where(pairs, cos, 0.0)) / jnp.maximum(k * (k - 1.0), 1.0), 0.0)


class DivideAndConquerMethod(Method):
  """See the module docstring."""

  name = "divide_and_conquer"

  def __init__(self, config: Any, *, num_classes: int):
    o = config.method
    _require(o.variant in VARIANTS, "variant", o.variant, f"one of {VARIANTS}", "learn")
    k = int(o.num_clusters)
    _require(k >= 1 and not k & (k - 1), "num_clusters", k, "a power of two (K doubles from 1)", "32")
    _require(int(o.mod_epoch) >= 1, "mod_epoch", o.mod_epoch, ">= 1", "2")
    _require(0.0 <= float(o.features_dropout) < 1.0, "features_dropout", o.features_dropout, "in [0, 1)", "0.01")
    _require(o.clustering.features in CLUSTERING_FEATURES, "clustering.features", o.clustering.features,
             f"one of {CLUSTERING_FEATURES}", "penultimate")
    _require(o.sampler.small_class_action in SMALL_CLASS_ACTIONS, "sampler.small_class_action",
             o.sampler.small_class_action,
             f"one of {SMALL_CLASS_ACTIONS} (the code's 'smaller_batch' gives batches of varying size)", "sample_other")
    _require(o.sampler.small_cluster_action in SMALL_CLUSTER_ACTIONS, "sampler.small_cluster_action",
             o.sampler.small_cluster_action, f"one of {SMALL_CLUSTER_ACTIONS}", "skip")
    d = config.data
    if d.samples_per_class < 1 or d.batch_size % d.samples_per_class:
      raise InvalidValueError(f"config.data.samples_per_class ({d.samples_per_class}) must divide batch_size "
                              f"({d.batch_size})", "e.g. --config.data.samples_per_class=2")
    if o.variant == "fixed" and int(config.model.embedding_dim) < k:
      raise InvalidValueError(f"the fixed variant gives each of {k} clusters a block of the "
                              f"{config.model.embedding_dim} embedding dimensions: embedding_dim must be >= "
                              f"num_clusters", f"e.g. --config.model.embedding_dim={max(512, k)}")
    _check_mask_group(config)
    self.config = config
    self.options = o
    self.num_classes = int(num_classes)
    self.num_masks = k
    self.full_embedding_epoch = float(o.force_full_embedding_epoch)
    self.compute_dtype = modeling.compute_dtype(config.compute_dtype)
    self.model: modeling.SplitModel | None = None
    self._batchnorm: set[str] = set()
    self._sampler_key = None
    self._sampler = None

  # -- parameters --------------------------------------------------------------------------------------

  def init(self, rng: jax.Array) -> tuple[dict, dict]:
    backbone_rng, head_rng = jax.random.split(rng)
    m = self.config.model
    backbone = modeling.build_backbone(m, backbone_rng)
    if not hasattr(backbone, "forward_features"):
      raise ValueError(f"divide_and_conquer pools a CNN feature map; backbone {m.backbone!r} has no forward_features")
    self.pretrained_cfg = backbone.pretrained_cfg
    self.embedding_dim = int(m.embedding_dim)
    image = jax.ShapeDtypeStruct((2, self.config.dataset.image_size, self.config.dataset.image_size, 3), jnp.float32)
    graph, state = nnx.split(backbone)
    fmap = jax.eval_shape(lambda s, x: nnx.merge(graph, s).forward_features(x), state, image)
    self.feature_dim = int(fmap.shape[-1])
    embedding = nnx.Linear(self.feature_dim, self.embedding_dim, kernel_init=_TORCH_LINEAR_KERNEL_INIT,
                           bias_init=_torch_linear_bias_init(self.feature_dim), rngs=nnx.Rngs(head_rng))
    net = DivideAndConquerNet(backbone, embedding, self.num_masks)
    self._batchnorm = modeling.batchnorm_affine_paths(net, "model")
    modeling.set_batchnorm_frozen(net, True)  # the code pins every BatchNorm2d to eval mode
    self.model = modeling.SplitModel(net)
    method_state = {"model": self.model.other, "clusters": jnp.zeros((0,), jnp.int32),
                    "num_clusters": jnp.ones((), jnp.int32)}
    return {"model": self.model.params}, method_state

  def param_selectors(self, params: dict) -> dict[str, set[str]]:
    del params
    return {"batchnorm": set(self._batchnorm)}

  def step_variant(self, epoch: int) -> str:
    return FULL if epoch >= self.full_embedding_epoch else MASKED

  # -- forward -----------------------------------------------------------------------------------------

  def _net(self, params: dict, method_state: dict, train: bool) -> nnx.Module:
    if self.model is None:
      raise RuntimeError("call method.init(rng) before using the method")
    dtype = self.compute_dtype
    return self.model.merge(modeling.cast_floating(params["model"], dtype),
                            modeling.cast_floating(method_state["model"], dtype), train=train)

  def _pooled(self, net: nnx.Module, images: jax.Array) -> jax.Array:
    dtype = self.compute_dtype
    return net.pooled(images if dtype is None else images.astype(dtype))

  def embed_fn(self, params: dict, method_state: dict, images: jax.Array) -> jax.Array:
    net = self._net(params, method_state, train=False)
    return normalize(net.embedding(self._pooled(net, images)).astype(jnp.float32))

  def penultimate_fn(self, params: dict, method_state: dict, images: jax.Array) -> jax.Array:
    """Eval-mode pooled backbone features, L2-normalised: float32 [B, F]."""
    net = self._net(params, method_state, train=False)
    return normalize(self._pooled(net, images).astype(jnp.float32))

  def feature_fns(self):
    return {"penultimate": self.penultimate_fn}

  def train_embeddings(self, params: dict, method_state: dict, images: jax.Array, cluster: jax.Array | None,
                       rng: jax.Array | None) -> jax.Array:
    """Training-mode embeddings float32 [B, E]: dropout (with `rng`), the ReLU'd mask of `cluster` (int [] or
    None for the full embedding), normalised twice as the code."""
    net = self._net(params, method_state, train=True)
    pooled = self._pooled(net, images)
    p = float(self.options.features_dropout)
    if p > 0.0 and rng is not None:
      keep = jax.random.bernoulli(rng, 1.0 - p, pooled.shape)
      pooled = jnp.where(keep, pooled / (1.0 - p), 0.0).astype(pooled.dtype)
    z = net.embedding(pooled).astype(jnp.float32)
    if cluster is not None:
      mask = params["model"]["masks"][cluster]
      z = z * (jax.nn.relu(mask) if self.options.mask_relu else mask)
    return normalize(normalize(z))

  def loss_fn(self, params: dict, method_state: dict, batch: dict, rng: jax.Array,
              info: StepInfo) -> tuple[jax.Array, tuple[dict, dict]]:
    o = self.options
    masked = info.variant != FULL
    dropout_rng, sampling_rng = jax.random.split(rng)
    # Every batch comes from one cluster (ClusterRoundRobinSampler); its first record names it.
    cluster = method_state["clusters"][batch["index"][0]]
    emb = self.train_embeddings(params, method_state, batch["image"], cluster if masked else None, dropout_rng)
    metric = losses.margin_loss(emb, batch["label"], jnp.float32(o.beta), rng=sampling_rng, margin=float(o.margin),
                                cutoff=float(o.sampling_cutoff), nonzero_loss_cutoff=float(o.nonzero_loss_cutoff))
    metric = metric.astype(jnp.float32)
    overlap = mask_overlap(params["model"]["masks"], method_state["num_clusters"], relu=True)
    mask_loss = float(o.masking_lambda) * overlap if masked else jnp.zeros((), jnp.float32)
    metrics = {"metric_loss": metric, "mask_loss": mask_loss, "cluster": cluster.astype(jnp.float32)}
    return metric + mask_loss, (metrics, method_state)

  # -- between epochs ----------------------------------------------------------------------------------

  def on_epoch_start(self, epoch: int, state: dict, ctx: Any) -> dict:
    o = self.options
    if epoch % int(o.mod_epoch):
      return state
    ms = state["method_state"]
    k = int(ms["num_clusters"])
    previous = np.asarray(ms["clusters"]).astype(np.int64)
    previous = previous if previous.size else None
    labels = np.asarray(ctx.train_records.labels, np.int64)
    split = epoch > 0 and k < self.num_masks
    features = None
    if k > 1 or split:
      feature = "penultimate" if o.clustering.features == "penultimate" else None
      features, _ = ctx.embed_records(state, ctx.train_records, feature)
    c = o.clustering
    assignments, new_k, info = recluster(
        features, labels, previous, k, split=split, niter=int(c.niter), trials=int(c.trials), seed=int(c.seed),
        backend=c.backend, inverse_bug=bool(c.reassign_inverse_bug), supervised=bool(c.supervised))
    # Several processes: process 0's clustering for all (k-means on hosts of different CPUs may differ in a
    # tie, and every process must sample the same global batches).
    shared = ctx.share([assignments.tolist(), int(new_k), info])
    assignments, new_k, info = np.asarray(shared[0], np.int64), int(shared[1]), shared[2]
    if split:
      masks = split_masks(np.asarray(state["params"]["model"]["masks"]), k, o.variant)
      state = ctx.set_params(state, {"model/masks": masks})  # the masks' optimizer state restarts
    repl = jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec())
    method_state = {**state["method_state"],
                    "clusters": jax.device_put(jnp.asarray(assignments, jnp.int32), repl),
                    "num_clusters": jax.device_put(jnp.asarray(new_k, jnp.int32), repl)}
    sizes = np.bincount(assignments[assignments >= 0], minlength=new_k)
    ctx.log(f"epoch {epoch}: clustering into {new_k} cluster(s)" + (f" (split from {k})" if split else "")
            + (f", k-means trials {info['trials']}" if info["trials"] else "")
            + f"; sizes {sizes.tolist()}, {int(np.sum(assignments < 0))} image(s) unused")
    return {**state, "method_state": method_state}

  def train_sampler(self, epoch: int, state: dict, ctx: Any) -> ClusterRoundRobinSampler:
    clusters = np.asarray(state["method_state"]["clusters"]).astype(np.int64)
    if clusters.size == 0:
      raise RuntimeError("divide_and_conquer: no clustering yet (on_epoch_start of a clustering epoch runs first)")
    k = int(state["method_state"]["num_clusters"])
    period_start = epoch - epoch % int(self.options.mod_epoch)
    key = (period_start, k, hash(clusters.tobytes()))
    if key != self._sampler_key:
      d = self.config.data
      self._sampler = ClusterRoundRobinSampler(
          ctx.train_records.labels, clusters, k, batch_size=int(d.batch_size),
          samples_per_class=int(d.samples_per_class), seed=int(self.config.seed), period_start=period_start,
          small_class_action=self.options.sampler.small_class_action,
          small_cluster_action=self.options.sampler.small_cluster_action,
          steps_per_epoch=int(d.steps_per_epoch) or None, log=ctx.log)
      self._sampler_key = key
    return self._sampler


def _require(condition: bool, key: str, value: Any, rule: str, example: str) -> None:
  if not condition:
    raise InvalidValueError(f"config.method.{key} must be {rule}, got {value!r}",
                            f"e.g. --config.method.{key}={example}")


def _check_mask_group(config: Any) -> None:
  """The masks' group must stop training at the full-embedding epoch ('learn') or be frozen ('fixed'): the
  code removes them from its optimizer there, and never trains fixed masks."""
  o = config.method
  for i, rule in enumerate(config.optim.groups or ()):
    pattern, spec = rule
    spec = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    if pattern.startswith("@") or not re.fullmatch(pattern, "model/masks"):
      continue
    if o.variant == "fixed":
      if not spec.get("frozen", False):
        raise InvalidValueError(f"optim.groups[{i}] ({pattern!r}): the fixed variant's masks never train",
                                "give them frozen=True (the code sets their lr and weight decay to 0)")
      return
    stop = spec.get("stop_epoch")
    full = float(o.force_full_embedding_epoch)
    if (stop is None and math.isfinite(full)) or (stop is not None and float(stop) != full):
      raise InvalidValueError(f"optim.groups[{i}] ({pattern!r}): the masks stop training at the full-embedding epoch",
                              f"set stop_epoch={o.force_full_embedding_epoch} "
                              f"(config.method.force_full_embedding_epoch)")
    return
  raise InvalidValueError("config.optim.groups needs a rule for 'model/masks' (the code gives the masks their own "
                          "Adam group)", "e.g. ('model/masks', dict(name='masks', lr_mult=100.0, stop_epoch=80)); "
                          "the fixed variant: dict(name='masks', frozen=True)")


def build(config: Any, num_classes: int) -> DivideAndConquerMethod:
  return DivideAndConquerMethod(config, num_classes=num_classes)
