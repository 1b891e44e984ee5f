"""JAX k-means follows faiss.Kmeans: same iterates from the same initial centroids."""

from __future__ import annotations

import numpy as np
import pytest

from dml_jax.eval.faiss_check import faiss_available
from dml_jax.eval.kmeans import _split_empty_clusters, kmeans


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


@pytest.mark.parametrize("backend", ["jax", pytest.param("faiss", marks=pytest.mark.skipif(
    not faiss_available(), reason="faiss is not installed"))])
def test_restarts_return_the_best_restart_not_the_last(backend):
  # Two pairs far apart, K = 2, two Lloyd steps. A start with one centroid in each pair ends at the midpoints
  # 0.5 and 10.5 (objective 4 x 0.25 = 1, the global optimum); a start inside one pair (1 draw in 3) ends with
  # objective > 20. With 12 restarts a good start is all but certain (1 - 3^-12), and over these 8 seeds the
  # last restart is a bad one several times: returning the last restart instead of the best fails.
  x = np.array([[0.0], [1.0], [10.0], [11.0]], np.float32)
  for seed in range(8):
    result = kmeans(x, 2, niter=2, nredo=12, seed=seed, backend=backend)
    assert result.objective == pytest.approx(1.0, abs=1e-4), seed
    np.testing.assert_allclose(np.sort(result.centroids[:, 0]), [0.5, 10.5], atol=1e-5)
    assert result.assignments[0] == result.assignments[1] != result.assignments[2] == result.assignments[3]


def test_empty_cluster_source_is_drawn_by_size_not_the_largest():
  # faiss `split_clusters`: the cluster split to re-seed an empty one is drawn with probability proportional to
  # (size - 1), so every cluster with 2+ points can be chosen. Sizes 3, 4 and 9 (weights 2, 3, 8 of 13): the
  # largest is chosen 8/13 of the time, not always.
  counts_at_start = np.array([0.0, 3.0, 4.0, 9.0])
  centroids_at_start = np.array([[0.0, 0.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32)
  rng = np.random.default_rng(0)
  chosen = []
  for _ in range(2600):
    centroids, counts = centroids_at_start.copy(), counts_at_start.copy()
    _split_empty_clusters(centroids, counts, rng)
    source = int(np.argmin(counts[1:] - counts_at_start[1:])) + 1  # the one whose size was halved
    chosen.append(source)
    # The empty cluster sits a relative 1/1024 from its source, alternating per dimension; the source moved the
    # other way; the size is split evenly.
    eps = 1.0 / 1024.0
    np.testing.assert_allclose(centroids[0], centroids_at_start[source] * [1 + eps, 1 - eps], rtol=1e-6)
    np.testing.assert_allclose(centroids[source], centroids_at_start[source] * [1 - eps, 1 + eps], rtol=1e-6)
    assert counts[0] == counts[source] == counts_at_start[source] / 2
  share = np.bincount(chosen, minlength=4)[1:] / len(chosen)
  np.testing.assert_allclose(share, [2 / 13, 3 / 13, 8 / 13], atol=0.03)  # 3 standard deviations ~ 0.03
