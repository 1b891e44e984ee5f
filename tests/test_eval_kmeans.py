"""JAX k-means follows faiss.Kmeans: same iterates from the same initial centroids."""

from __future__ import annotations

import numpy as np
import pytest

from dml_jax.eval.faiss_check import faiss_available
from dml_jax.eval.kmeans import kmeans


def _blobs(seed, num_clusters=40, per_cluster=12, dim=16, spread=3.0):
  rng = np.random.default_rng(seed)
  centers = rng.standard_normal((num_clusters, dim)) * spread
  labels = np.repeat(np.arange(num_clusters), per_cluster)
  return (centers[labels] + rng.standard_normal((len(labels), dim))).astype(np.float32), labels


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
def test_same_init_gives_faiss_partition_and_centroids():
  x, _ = _blobs(0)
  init = x[np.random.default_rng(1).permutation(len(x))[:40]]
  ours = kmeans(x, 40, niter=20, backend="jax", init_centroids=init)
  reference = kmeans(x, 40, niter=20, backend="faiss", init_centroids=init)
  np.testing.assert_array_equal(ours.assignments, reference.assignments)
  np.testing.assert_allclose(ours.centroids, reference.centroids, atol=1e-5)
  assert ours.objective == pytest.approx(reference.objective, rel=1e-5)


def test_empty_clusters_are_split_and_every_cluster_is_used():
  # Init with duplicated centroids: the twins lose every point to the lower index and must be re-seeded.
  x, _ = _blobs(2, num_clusters=10, per_cluster=30)
  init = np.repeat(x[::60][:5], 2, axis=0)
  result = kmeans(x, 10, niter=10, backend="jax", init_centroids=init)
  assert set(np.unique(result.assignments)) == set(range(10))
  assert result.assignments.dtype == np.int64 and result.centroids.shape == (10, 16)


def test_restarts_keep_the_best_objective_and_subsampling_runs():
  x, _ = _blobs(3, num_clusters=8, per_cluster=50)
  single = kmeans(x, 8, niter=5, nredo=1, seed=0, backend="jax")
  best_of_four = kmeans(x, 8, niter=5, nredo=4, seed=0, backend="jax")
  assert best_of_four.objective <= single.objective + 1e-3
  # 400 points > 8 clusters x 10: trains on 80 points, still assigns all 400.
  subsampled = kmeans(x, 8, niter=5, seed=0, backend="jax", max_points_per_centroid=10)
  assert subsampled.assignments.shape == (400,)


def test_bad_input_is_rejected():
  x, _ = _blobs(4)
  with pytest.raises(ValueError, match="num_clusters=481 must be in"):
    kmeans(x, 481, backend="jax")
  with pytest.raises(ValueError, match="init_centroids must have shape"):
    kmeans(x, 4, backend="jax", init_centroids=x[:3])
  bad = x.copy()
  bad[0, 0] = np.inf
  with pytest.raises(ValueError, match="NaN or Inf"):
    kmeans(bad, 4, backend="jax")
