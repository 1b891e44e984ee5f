"""k-means for the clustering metrics (NMI, F1): FAISS `Kmeans` or a JAX Lloyd k-means that follows it.

The JAX version follows faiss `Clustering::train` step by step, so both backends mean the same thing:
  - if N > K * max_points_per_centroid, train on a random subset of K * max_points_per_centroid
    points (faiss default 256; D&C passes 1e7, RDML 1e9, i.e. never subsample);
  - init: K distinct training points drawn at random;
  - `niter` times: assign every training point to its nearest centroid (squared L2), recompute
    each centroid as the mean of its points, then re-seed empty clusters by splitting a cluster
    chosen with probability proportional to (size - 1): the empty centroid becomes a copy of the
    chosen one, the two are pushed apart by a relative 1/1024 in alternating directions per dimension
    and the size is split in half (faiss `split_clusters`);
  - `nredo` restarts keep the centroids whose last assignment objective is lowest;
  - finally every point (the whole set, not the subset) is assigned to its nearest centroid, as PML
    `FaissKMeans` and D&C `compute_cluster_assignment` do.
faiss's random number generator is not reproduced, so the two backends give different (equally
valid) partitions for the same seed; with identical initial centroids they follow the same iterates.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dml_jax.eval import faiss_check
from dml_jax.eval.knn import resolve_backend

_SPLIT_EPS = 1.0 / 1024.0  # faiss Clustering.cpp EPS
_SCORE_BLOCK_ELEMENTS = 1 << 24  # points x centroids per assignment block (64 MB of float32)


@dataclasses.dataclass(frozen=True)
class KMeansResult:
  """assignments int64 [N] in [0, K); centroids float32 [K, D]; objective: sum of squared distances
  of the training points at the last assignment step (faiss `obj`)."""

  assignments: np.ndarray
  centroids: np.ndarray
  objective: float


def kmeans(x: np.ndarray, num_clusters: int, *, niter: int = 20, nredo: int = 1, seed: int = 0,
           backend: str = "auto", max_points_per_centroid: int = 256,
           init_centroids: np.ndarray | None = None) -> KMeansResult:
  """Clusters the rows of x.

  Args:
    x: float32 [N, D], finite, N >= num_clusters.
    num_clusters: K.
    niter: Lloyd iterations (PML / RDML / VPTSP 20, D&C 100, faiss default 25).
    nredo: restarts, best objective kept (D&C in-training 5, elsewhere 1).
    seed: random seed of the init and the empty-cluster splits (faiss default 1234).
    backend: 'auto' | 'jax' | 'faiss'.
    max_points_per_centroid: subsample the training set above K * this many points.
    init_centroids: float32 [K, D] starting centroids instead of random points (only with nredo=1).
  """
  x = np.ascontiguousarray(x, dtype=np.float32)
  if x.ndim != 2:
    raise ValueError(f"k-means input must be a 2-D [N, D] array, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("k-means input contains NaN or Inf values")
  if not 1 <= num_clusters <= x.shape[0]:
    raise ValueError(f"num_clusters={num_clusters} must be in [1, N={x.shape[0]}] "
                     "(faiss needs at least as many points as clusters)")
  if niter < 1 or nredo < 1:
    raise ValueError(f"niter ({niter}) and nredo ({nredo}) must be >= 1")
  if init_centroids is not None:
    init_centroids = np.ascontiguousarray(init_centroids, dtype=np.float32)
    if init_centroids.shape != (num_clusters, x.shape[1]):
      raise ValueError(f"init_centroids must have shape {(num_clusters, x.shape[1])}, got {init_centroids.shape}")
    if nredo != 1:
      raise ValueError("init_centroids fixes the start, so nredo must be 1")
  if resolve_backend(backend) == "faiss":
    return _faiss_kmeans(x, num_clusters, niter, nredo, seed, max_points_per_centroid, init_centroids)
  return _jax_kmeans(x, num_clusters, niter, nredo, seed, max_points_per_centroid, init_centroids)


# --------------------------------------------------------------------------------------------- FAISS


def _faiss_kmeans(x, num_clusters, niter, nredo, seed, max_points_per_centroid, init_centroids):
  faiss = faiss_check.import_faiss()
  # min_points_per_centroid only controls faiss's "too few points" warning, not the result.
  model = faiss.Kmeans(x.shape[1], num_clusters, niter=niter, nredo=nredo, seed=seed, verbose=False,
                       max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1,
                       gpu=faiss.get_num_gpus() > 0)
  model.train(x, init_centroids=init_centroids)
  distances, assignments = model.index.search(x, 1)
  del distances
  return KMeansResult(assignments[:, 0].astype(np.int64), np.asarray(model.centroids, np.float32),
                      float(model.obj[-1]))


# ----------------------------------------------------------------------------------------------- JAX


@jax.jit
def _assign(point_blocks: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Nearest centroid of every point. point_blocks float32 [B, c, D], centroids float32 [K, D] ->
  (assignments int32 [B * c], squared distances float32 [B * c]); ties go to the lower centroid."""
  centroid_sqnorms = jnp.sum(centroids * centroids, axis=1)

  def nearest(block):
    products = jnp.matmul(block, centroids.T, precision=lax.Precision.HIGHEST)
    distances = (jnp.sum(block * block, axis=1)[:, None] - 2.0 * products) + centroid_sqnorms[None, :]
    best = jnp.argmin(distances, axis=1)
    return best.astype(jnp.int32), jnp.take_along_axis(distances, best[:, None], axis=1)[:, 0]

  assignments, distances = lax.map(nearest, point_blocks)
  return assignments.reshape(-1), distances.reshape(-1)


@functools.partial(jax.jit, static_argnames=("num_clusters",))
def _cluster_sums(points: jax.Array, assignments: jax.Array, *, num_clusters: int):
  """points float32 [M, D], assignments int32 [M] (padding rows carry num_clusters and are dropped)
  -> (sums float32 [K, D], counts float32 [K])."""
  sums = jax.ops.segment_sum(points, assignments, num_segments=num_clusters)
  counts = jax.ops.segment_sum(jnp.ones_like(assignments, jnp.float32), assignments, num_segments=num_clusters)
  return sums, counts


class _BlockedPoints:
  """Points on the device, zero-padded into [B, c, D] blocks so one compiled assignment serves all."""

  def __init__(self, x: np.ndarray, num_clusters: int):
    self.num_points = x.shape[0]
    block = int(np.clip(_SCORE_BLOCK_ELEMENTS // num_clusters, 8, 4096))
    block = min(block, -(-self.num_points // 8) * 8)
    num_blocks = -(-self.num_points // block)
    padded = np.zeros((num_blocks * block, x.shape[1]), np.float32)
    padded[:self.num_points] = x
    self.flat = jnp.asarray(padded)
    self.blocks = self.flat.reshape(num_blocks, block, x.shape[1])

  def assign(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    assignments, distances = _assign(self.blocks, jnp.asarray(centroids))
    return (np.asarray(assignments)[:self.num_points].astype(np.int64),
            np.asarray(distances)[:self.num_points])


def _split_empty_clusters(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> None:
  """faiss `split_clusters`, in place: re-seeds every empty cluster from a populated one."""
  num_clusters = len(counts)
  for empty in np.flatnonzero(counts == 0):
    weights = np.maximum(counts - 1.0, 0.0)
    if weights.sum() <= 0:  # every cluster has <= 1 point: nothing can be split (N == K)
      break
    source = int(rng.choice(num_clusters, p=weights / weights.sum()))
    signs = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)
    centroids[empty] = centroids[source] * (1.0 + signs * _SPLIT_EPS)
    centroids[source] = centroids[source] * (1.0 - signs * _SPLIT_EPS)
    counts[empty] = counts[source] / 2.0  # faiss assumes an even split (float sizes)
    counts[source] -= counts[empty]


def _jax_kmeans(x, num_clusters, niter, nredo, seed, max_points_per_centroid, init_centroids):
  rng = np.random.default_rng(seed)
  train = x
  if x.shape[0] > num_clusters * max_points_per_centroid:
    train = x[np.sort(rng.permutation(x.shape[0])[:num_clusters * max_points_per_centroid])]
  points = _BlockedPoints(train, num_clusters)
  padding = np.full(points.flat.shape[0] - points.num_points, num_clusters, np.int64)

  best_centroids, best_objective = None, np.inf
  for _ in range(nredo):
    if init_centroids is not None:
      centroids = init_centroids.copy()
    else:
      centroids = train[rng.permutation(train.shape[0])[:num_clusters]].copy()
    for _ in range(niter):
      assignments, distances = points.assign(centroids)
      objective = float(np.sum(distances, dtype=np.float64))
      sums, counts = _cluster_sums(points.flat, jnp.asarray(np.concatenate([assignments, padding]), jnp.int32),
                                   num_clusters=num_clusters)
      sums, counts = np.asarray(sums), np.asarray(counts, np.float64)
      populated = counts > 0
      centroids = centroids.copy()
      centroids[populated] = sums[populated] / counts[populated, None].astype(np.float32)
      _split_empty_clusters(centroids, counts, rng)
    if objective < best_objective:
      best_centroids, best_objective = centroids, objective

  all_points = points if train is x else _BlockedPoints(x, num_clusters)
  assignments, _ = all_points.assign(best_centroids)
  return KMeansResult(assignments, best_centroids.astype(np.float32), best_objective)
