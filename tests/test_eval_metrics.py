"""Metrics against independent references: pytorch-metric-learning's AccuracyCalculator, sklearn's NMI
and numpy brute forces written from the papers' definitions (D&C, VPTSP/DADA). PML's results come
from tests/references (`ref` fixture, tests/reference.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from dml_jax.eval import metrics as metrics_lib
from dml_jax.eval.faiss_check import faiss_available
from dml_jax.eval.knn import l2_normalize

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
BACKENDS = ["jax", pytest.param("faiss", marks=needs_faiss)]


def _pml_knn():
  """PML's default kNN (faiss IndexFlatL2) when faiss is installed, else its exact torch kNN (L2)."""
  from pytorch_metric_learning.distances import LpDistance
  from pytorch_metric_learning.utils.inference import CustomKNN

  return None if faiss_available() else CustomKNN(LpDistance(normalize_embeddings=False))


def _calculator(**kwargs):
  import torch
  from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

  return AccuracyCalculator(device=torch.device("cpu"), **kwargs)


def _labelled_embeddings(seed=0, num=700, num_classes=90, dim=16, num_singletons=6):
  """Clustered random embeddings, class sizes 1..~15, a few one-sample ("lone") classes; tie-free."""
  rng = np.random.default_rng(seed)
  labels = np.concatenate([rng.integers(0, num_classes, num - num_singletons),
                           np.arange(num_classes, num_classes + num_singletons)])
  rng.shuffle(labels)
  centers = rng.standard_normal((num_classes + num_singletons, dim))
  embeddings = centers[labels] * 0.8 + rng.standard_normal((num, dim))
  return embeddings.astype(np.float32), labels.astype(np.int64)


def _pml(query, query_labels, reference=None, reference_labels=None, include=(), **kwargs):
  calculator = _calculator(include=include, k="max_bin_count", knn_func=_pml_knn(), **kwargs)
  return {k: np.asarray(v) for k, v in calculator.get_accuracy(query, query_labels, reference, reference_labels,
                                                               ref_includes_query=False).items()}


def _ranked_labels(queries, gallery, gallery_labels, exclude_self):
  """numpy brute force: every query's gallery labels in ascending cosine distance (float64, stable)."""
  q, g = l2_normalize(queries).astype(np.float64), l2_normalize(gallery).astype(np.float64)
  cost = -(q @ g.T)
  if exclude_self:
    np.fill_diagonal(cost, np.inf)
  order = np.argsort(cost, axis=1, kind="stable")
  if exclude_self:
    order = order[:, :-1]  # the query itself sorts last
  return gallery_labels[order]


PML_NAMES = {"precision@1": "precision_at_1", "r_precision": "r_precision",
             "map@r": "mean_average_precision_at_r"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_leave_one_out_matches_pml(ref, backend):
  embeddings, labels = _labelled_embeddings()
  ours = metrics_lib.retrieval_metrics(embeddings, labels, metrics=list(PML_NAMES), backend=backend,
                                       chunk_size=256)
  # PML's AccuracyCalculator does not normalise; its testers do (normalize_embeddings=True).
  reference = ref("eval_metrics/leave_one_out_pml",
                  lambda: _pml(l2_normalize(embeddings), labels, include=tuple(PML_NAMES.values())))
  for ours_name, pml_name in PML_NAMES.items():
    assert ours[ours_name] == pytest.approx(float(reference[pml_name]), abs=1e-6), ours_name


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_vs_gallery_matches_pml(ref, backend):
  embeddings, labels = _labelled_embeddings(seed=1)
  query_mask = np.zeros(len(labels), bool)
  query_mask[::3] = True  # some query labels have no gallery item: PML drops those ("lone") queries
  ours = metrics_lib.retrieval_metrics(embeddings, labels, query_mask=query_mask, metrics=list(PML_NAMES),
                                       backend=backend)
  normalized = l2_normalize(embeddings)
  reference = ref("eval_metrics/query_vs_gallery_pml",
                  lambda: _pml(normalized[query_mask], labels[query_mask], normalized[~query_mask],
                               labels[~query_mask], include=tuple(PML_NAMES.values())))
  for ours_name, pml_name in PML_NAMES.items():
    assert ours[ours_name] == pytest.approx(float(reference[pml_name]), abs=1e-6), ours_name


def test_recall_at_k_matches_numpy_brute_force():
  embeddings, labels = _labelled_embeddings(seed=2)
  ks = (1, 2, 4, 8, 16, 5000)  # 5000 > gallery: the whole gallery counts
  ours = metrics_lib.retrieval_metrics(embeddings, labels, metrics=["recall"], recall_ks=ks, backend="jax")
  ranked = _ranked_labels(embeddings, embeddings, labels, exclude_self=True)
  for k in ks:
    # Lone queries are misses, as in D&C / RDML (every query counts).
    expected = np.mean([labels[i] in ranked[i, :k] for i in range(len(labels))])
    assert ours[f"recall@{k}"] == pytest.approx(expected, abs=1e-12), k

  query_mask = np.arange(len(labels)) % 4 == 0
  ours = metrics_lib.retrieval_metrics(embeddings, labels, query_mask=query_mask, metrics=["recall@1", "recall@10"],
                                       backend="auto")
  ranked = _ranked_labels(embeddings[query_mask], embeddings[~query_mask], labels[~query_mask], exclude_self=False)
  for k in (1, 10):
    expected = np.mean([y in row[:k] for y, row in zip(labels[query_mask], ranked)])
    assert ours[f"recall@{k}"] == pytest.approx(expected, abs=1e-12)


def _average_precision_in_window(is_hit, window, divisor):
  is_hit = is_hit[:window]
  precision = np.cumsum(is_hit) / np.arange(1, len(is_hit) + 1)
  return float(np.sum(precision * is_hit) / divisor)


def test_class_size_map_r_matches_vptsp_formula():
  """VPTSP/DADA metrics/map_r.py: first n_c neighbours after self, divided by n_c, every query averaged."""
  embeddings, labels = _labelled_embeddings(seed=3)
  ours = metrics_lib.retrieval_metrics(embeddings, labels, metrics=["map@r"], map_r_variant="class_size",
                                       backend="jax")
  ranked = _ranked_labels(embeddings, embeddings, labels, exclude_self=True)
  class_size = np.bincount(labels)[labels]
  expected = np.mean([_average_precision_in_window(ranked[i] == labels[i], class_size[i], class_size[i])
                      for i in range(len(labels))])
  assert ours["map@r"] == pytest.approx(expected, abs=1e-9)
  musgrave = metrics_lib.retrieval_metrics(embeddings, labels, metrics=["map@r"], backend="jax")["map@r"]
  assert ours["map@r"] < musgrave  # the class-size divisor deflates the score


def test_marp_matches_dnc_definition():
  """D&C mean_avg_R_precision: top-R list, AP normalised by the hits inside it, 0 without hits."""
  embeddings, labels = _labelled_embeddings(seed=4)
  ranked = _ranked_labels(embeddings, embeddings, labels, exclude_self=True)
  relevant = np.bincount(labels)[labels] - 1

  def expected_marp(max_rank):
    values = []
    for i in range(len(labels)):
      window = relevant[i] if max_rank is None else min(relevant[i], max_rank)
      is_hit = ranked[i, :window] == labels[i]
      values.append(_average_precision_in_window(is_hit, window, is_hit.sum()) if is_hit.sum() else 0.0)
    return np.mean(values)

  for max_rank in (None, 3):
    ours = metrics_lib.retrieval_metrics(embeddings, labels, metrics=["marp", "map@r"], marp_max_rank=max_rank,
                                         backend="jax")
    assert ours["marp"] == pytest.approx(expected_marp(max_rank), abs=1e-9)
  assert ours["marp"] >= ours["map@r"]


def test_worked_example_from_spec():
  """spec B.3: R = 2, ranks [miss, hit] -> mARP 0.5, MAP@R 0.25, R-Precision 0.5."""
  embeddings = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.2, 0.95]], np.float32)
  labels = np.array([0, 1, 0, 0, 1])
  query_mask = np.array([True, False, False, False, False])
  # Gallery in cosine order from the query: row 1 (label 1), row 4 (1), row 2 (0), row 3 (0).
  # Use a 3-item gallery so the ranking is [miss, hit, hit] with R = 2.
  gallery_mask = np.array([False, True, True, True, False])
  ours = metrics_lib.retrieval_metrics(embeddings, labels, query_mask=query_mask, gallery_mask=gallery_mask,
                                       metrics=["map@r", "marp", "r_precision"], backend="jax")
  assert ours == pytest.approx({"map@r": 0.25, "marp": 0.5, "r_precision": 0.5})


def test_all_lone_queries_give_nan():
  embeddings = np.eye(4, dtype=np.float32)
  ours = metrics_lib.retrieval_metrics(embeddings, np.arange(4), metrics=["r_precision", "map@r", "recall@1"],
                                       backend="jax")
  assert np.isnan(ours["r_precision"]) and np.isnan(ours["map@r"]) and ours["recall@1"] == 0.0


def test_nmi_formula_matches_sklearn_on_fixed_assignments():
  rng = np.random.default_rng(5)
  for num, num_labels, num_clusters in ((500, 30, 30), (1000, 7, 50), (40, 40, 3)):
    labels = rng.integers(0, num_labels, num) * 7 - 3  # arbitrary label values
    clusters = rng.integers(0, num_clusters, num)
    assert metrics_lib.nmi_score(labels, clusters) == pytest.approx(
        normalized_mutual_info_score(labels, clusters), abs=1e-12)
  # Limit cases as sklearn: one group each -> 1, a single cluster -> 0, identical partitions -> 1.
  for labels, clusters in (([1, 1, 1], [0, 0, 0]), ([0, 1, 2], [5, 5, 5]), ([0, 0, 1, 1], [1, 1, 0, 0])):
    assert metrics_lib.nmi_score(labels, clusters) == normalized_mutual_info_score(labels, clusters)


def test_nmi_matches_pml_with_identical_clusters(ref):
  embeddings, labels = _labelled_embeddings(seed=6)
  clusters = np.random.default_rng(0).integers(0, 96, len(labels))

  def compute():
    import torch

    calculator = _calculator(include=("NMI",), knn_func=_pml_knn(), kmeans_func=lambda x, k: torch.as_tensor(clusters))
    return {"NMI": calculator.get_accuracy(embeddings, labels)["NMI"]}

  reference = ref("eval_metrics/nmi_of_fixed_clusters_pml", compute)
  assert metrics_lib.nmi_score(labels, clusters) == pytest.approx(float(reference["NMI"]), abs=1e-6)


@needs_faiss
def test_clustering_nmi_with_faiss_matches_pml_default_kmeans(ref):
  """PML: faiss.Kmeans(niter=20) with faiss's default seed 1234 -> identical partition and NMI."""
  embeddings, labels = _labelled_embeddings(seed=7)
  ours = metrics_lib.clustering_metrics(embeddings, labels, seed=1234, niter=20, backend="faiss")
  reference = ref("eval_metrics/faiss_kmeans_nmi_pml",
                  lambda: {"NMI": _calculator(include=("NMI",)).get_accuracy(l2_normalize(embeddings), labels)["NMI"]})
  assert ours["nmi"] == pytest.approx(float(reference["NMI"]), abs=1e-6)


@needs_faiss
def test_jax_kmeans_nmi_is_close_to_faiss_over_runs():
  embeddings, labels = _labelled_embeddings(seed=8)
  jax_nmi = metrics_lib.clustering_metrics(embeddings, labels, num_runs=3, backend="jax")
  faiss_nmi = metrics_lib.clustering_metrics(embeddings, labels, num_runs=3, backend="faiss")
  assert abs(jax_nmi["nmi"] - faiss_nmi["nmi"]) < 0.03  # different k-means RNGs: only close
  assert abs(jax_nmi["f1"] - faiss_nmi["f1"]) < 0.1


def test_pair_f1_matches_pair_enumeration():
  rng = np.random.default_rng(9)
  labels, clusters = rng.integers(0, 6, 80), rng.integers(0, 9, 80)
  pairs = list(itertools.combinations(range(80), 2))
  same_class = np.array([labels[i] == labels[j] for i, j in pairs])
  same_cluster = np.array([clusters[i] == clusters[j] for i, j in pairs])
  true_positive = np.sum(same_class & same_cluster)
  precision, recall = true_positive / same_cluster.sum(), true_positive / same_class.sum()
  assert metrics_lib.pair_f1_score(labels, clusters) == pytest.approx(2 * precision * recall / (precision + recall))
  assert metrics_lib.pair_f1_score([0, 0, 1, 1], [0, 1, 0, 1]) == 0.0


def test_metric_names_and_bad_input():
  assert metrics_lib.parse_metric_names(["Recall@1", "recall@10", "nmi", "map@r"]) == (["recall", "map@r"], [1, 10],
                                                                                      ["nmi"])
  with pytest.raises(ValueError, match="unknown metric"):
    metrics_lib.parse_metric_names(["mrr"])
  embeddings, labels = _labelled_embeddings()
  with pytest.raises(ValueError, match="labels must be a 1-D array of length N=700"):
    metrics_lib.retrieval_metrics(embeddings, labels[:-1])
  bad = embeddings.copy()
  bad[5] = np.nan
  with pytest.raises(ValueError, match="NaN or Inf in 1 rows"):
    metrics_lib.retrieval_metrics(bad, labels)
  with pytest.raises(ValueError, match="query_mask must have shape"):
    metrics_lib.retrieval_metrics(embeddings, labels, query_mask=np.ones(3, bool))
  with pytest.raises(ValueError, match="clustering metrics"):
    metrics_lib.retrieval_metrics(embeddings, labels, metrics=["nmi"])
