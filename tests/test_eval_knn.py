"""kNN backends: JAX (chunked matmul + top-k) and FAISS agree with a numpy brute force."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest

from dml_jax.eval import faiss_check
from dml_jax.eval import knn as knn_lib

needs_faiss = pytest.mark.skipif(not faiss_check.faiss_available(), reason="faiss is not installed")
BACKENDS = ["jax", pytest.param("faiss", marks=needs_faiss)]


def _brute_force(queries, gallery, k, metric, exclude=None):
  """float64 numpy reference: full score matrix, stable sort (ties -> lower gallery index)."""
  q, g = queries.astype(np.float64), gallery.astype(np.float64)
  if metric == "cosine":
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
  if metric == "euclidean":
    cost = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
  else:
    cost = -(q @ g.T)
  if exclude is not None:
    rows = np.flatnonzero(exclude >= 0)
    cost[rows, exclude[rows]] = np.inf
  order = np.argsort(cost, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(cost, order, axis=1)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  return rng.standard_normal((300, 24)).astype(np.float32), rng.standard_normal((410, 24)).astype(np.float32)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "inner_product"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_brute_force_query_vs_gallery(data, metric, backend):
  queries, gallery = data
  # Small chunks: several query chunks (last one padded) and gallery blocks merged into the running top-k.
  scores, indices = knn_lib.knn(queries, gallery, 20, backend=backend, metric=metric, chunk_size=128,
                                gallery_chunk_size=100)
  expected, cost = _brute_force(queries, gallery, 20, metric)
  np.testing.assert_array_equal(indices, expected)
  expected_scores = cost if metric == "euclidean" else -cost
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-4)
  assert scores.dtype == np.float32 and indices.dtype == np.int64


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "inner_product"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_self_matches_brute_force(data, metric, backend):
  _, gallery = data
  _, indices = knn_lib.knn(gallery, gallery, 15, backend=backend, metric=metric, exclude_self=True,
                           chunk_size=128, gallery_chunk_size=64)
  expected, _ = _brute_force(gallery, gallery, 15, metric, exclude=np.arange(len(gallery)))
  np.testing.assert_array_equal(indices, expected)
  assert not np.any(indices == np.arange(len(gallery))[:, None])


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_indices_for_queries_inside_the_gallery(data, backend):
  queries, gallery = data
  # Half of the queries are gallery items (they must not find themselves), half are not.
  exclude = np.full(len(queries), -1, np.int64)
  exclude[::2] = np.arange(0, len(queries), 2)
  queries = queries.copy()
  queries[::2] = gallery[exclude[::2]]
  _, indices = knn_lib.knn(queries, gallery, 50, backend=backend, metric="euclidean", exclude_indices=exclude)
  expected, _ = _brute_force(queries, gallery, 50, "euclidean", exclude=exclude)
  np.testing.assert_array_equal(indices, expected)


def test_jax_orders_ties_by_gallery_index():
  gallery = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)  # rows 3j, 3j+1, 3j+2 identical
  queries = np.eye(4, dtype=np.float32)
  _, indices = knn_lib.knn(queries, gallery, 6, backend="jax", metric="euclidean", gallery_chunk_size=5)
  np.testing.assert_array_equal(indices[:, :3], np.arange(12).reshape(4, 3))
  # The other 9 rows tie at distance 2: the lowest indices come first.
  np.testing.assert_array_equal(indices[1, 3:], [0, 1, 2])
  # Self-exclusion of a duplicated row removes exactly that row, not its twins.
  _, indices = knn_lib.knn(gallery, gallery, 2, backend="jax", metric="euclidean", exclude_self=True)
  np.testing.assert_array_equal(indices[1], [0, 2])


def test_knn_chunks_stream_covers_all_queries(data):
  queries, gallery = data
  starts = [start for start, scores, indices in knn_lib.knn_chunks(queries, gallery, 3, backend="jax",
                                                                   chunk_size=128)]
  assert starts == [0, 128, 256]


def test_bad_input_is_rejected(data):
  queries, gallery = data
  with pytest.raises(ValueError, match="k=410 must be in"):
    knn_lib.knn(gallery, gallery, 410, backend="jax", exclude_self=True)
  with pytest.raises(ValueError, match="dimension"):
    knn_lib.knn(queries[:, :5], gallery, 3, backend="jax")
  bad = queries.copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    knn_lib.knn(bad, gallery, 3, backend="jax")
  with pytest.raises(ValueError, match="unknown kNN backend"):
    knn_lib.knn(queries, gallery, 3, backend="annoy")
  with pytest.raises(ValueError, match="unknown kNN metric"):
    knn_lib.knn(queries, gallery, 3, metric="manhattan")


@needs_faiss
def test_auto_backend_on_cpu_uses_faiss_when_installed():
  if knn_lib.jax.default_backend() == "cpu":
    assert knn_lib.resolve_backend("auto") == "faiss"


def test_faiss_cpu_and_gpu_side_by_side_is_refused(monkeypatch):
  real_distribution = importlib.metadata.distribution

  def fake_distribution(name):
    if name in ("faiss-cpu", "faiss-gpu"):
      return object()
    return real_distribution(name)

  monkeypatch.setattr(importlib.metadata, "distribution", fake_distribution)
  with pytest.raises(faiss_check.FaissConflictError, match="Uninstall one of them"):
    faiss_check.import_faiss()
  with pytest.raises(faiss_check.FaissConflictError):
    knn_lib.knn(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), 1, backend="auto")
