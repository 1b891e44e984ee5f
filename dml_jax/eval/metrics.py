"""Retrieval metrics (Recall@K, precision@1, R-Precision, MAP@R, D&C mARP) and clustering metrics (NMI, F1).

Retrieval metrics stream the kNN lists chunk by chunk (`knn.knn_chunks`) and keep only per-metric
running sums, so memory is O(chunk x k); k is the largest K / relevant-set size needed, never N.

Definitions (docs/evaluation.md). For a
query q with label y: the ranking runs over the gallery minus q itself (when q is in the gallery);
rel_i = 1[label of the i-th neighbour == y]; R = number of gallery items labelled y, q excluded
(leave-one-out: class size - 1; query/gallery: gallery count); P(i) = (1/i) sum_{j<=i} rel_j.
  recall@K      1[any rel_i, i <= K], averaged over ALL queries (a query with R = 0 is a miss): the
                DML "hit rate" of D&C / RDML / Proxy-Anchor. K larger than the gallery uses it all.
  precision@1   rel_1 averaged over queries with R > 0 (PML `precision_at_1`).
  r_precision   (1/R) sum_{i<=R} rel_i over queries with R > 0 (PML excludes "lone" queries; NaN if
                every query is lone).
  map@r         map_r_variant='musgrave': (1/R) sum_{i<=R} P(i) rel_i over queries with R > 0
                (Musgrave et al. 2020, PML `mean_average_precision_at_r`, DFML, Proxy-ISA).
                map_r_variant='class_size': the VPTSP / DADA code (`metrics/map_r.py`): window and
                divisor n = class size including the query (R + 1 in leave-one-out; R for a query
                outside the gallery), averaged over ALL queries (lone queries score 0). Perfect
                retrieval then scores (n - 1) / n; compare with those papers only.
  marp          D&C "mARP": sum_{i<=W} P(i) rel_i / (number of hits in the top W), 0 without hits,
                W = min(R, marp_max_rank); averaged over ALL queries. D&C truncates In-Shop at the
                top 50 (marp_max_rank=50); elsewhere W = R.

Queries without a positive (R = 0, "lone"): the sources above differ, so no_positive='seeds' (the
default) keeps each metric as its source computes it: recall@K, marp and the class-size MAP@R count a
lone query as a miss (0 in the mean over all queries); precision@1, r_precision and the Musgrave MAP@R
leave it out. no_positive='exclude' averages every metric over the queries with a positive,
'miss' every metric over all queries (a lone query scores 0). A lone query scores 0 in every sum, so
the three choices only change the divisor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from dml_jax.errors import InvalidValueError, unknown_name
from dml_jax.eval import knn as knn_lib
from dml_jax.eval.kmeans import kmeans
from dml_jax.losses.ops import l2_normalize

RETRIEVAL_METRICS = ("recall", "precision@1", "r_precision", "map@r", "marp")
CLUSTERING_METRICS = ("nmi", "f1")
MAP_R_VARIANTS = ("musgrave", "class_size")
DISTANCES = ("cosine", "euclidean")
NO_POSITIVE = ("seeds", "exclude", "miss")


def parse_metric_names(metrics: Sequence[str]) -> tuple[list[str], list[int], list[str]]:
  """Splits metric names into (retrieval names, recall Ks from 'recall@K' names, clustering names).

  'recall' (Ks given separately) and 'recall@K' are both accepted; names are case-insensitive.
  """
  retrieval, recall_ks, clustering = [], [], []
  known = RETRIEVAL_METRICS + CLUSTERING_METRICS + ("recall@K",)
  for name in metrics:
    key = name.strip().lower()
    if key.startswith("recall@"):
      try:
        value = int(key.split("@", 1)[1])
      except ValueError:
        raise InvalidValueError(f"bad metric name {name!r}: expected recall@K with an integer K",
                                "e.g. recall@1") from None
      if value < 1:
        raise InvalidValueError(f"bad metric name {name!r}: K must be >= 1", "e.g. recall@1")
      recall_ks.append(value)
      if "recall" not in retrieval:
        retrieval.append("recall")
    elif key in RETRIEVAL_METRICS:
      if key not in retrieval:
        retrieval.append(key)
    elif key in CLUSTERING_METRICS:
      if key not in clustering:
        clustering.append(key)
    else:
      # 'recal@1' should suggest 'recall@1', not the template 'recall@K'.
      suffix = key.rsplit("@", 1)[-1] if "@" in key else ""
      candidates = [f"recall@{suffix}" if k == "recall@K" and suffix.isdigit() else k for k in known]
      raise unknown_name("metric", name, candidates, cls=InvalidValueError)
  return retrieval, recall_ks, clustering


def no_positive_treatment(name: str, *, map_r_variant: str = "musgrave", no_positive: str = "seeds") -> str:
  """'miss' or 'exclude': how metric `name` treats queries without a positive (module docstring)."""
  if no_positive not in NO_POSITIVE:
    raise InvalidValueError(f"no_positive must be one of {NO_POSITIVE}, got {no_positive!r}")
  if no_positive != "seeds":
    return no_positive
  key = name.strip().lower()
  if key.startswith("recall") or key == "marp" or (key == "map@r" and map_r_variant == "class_size"):
    return "miss"
  return "exclude"


def count_without_positive(labels: np.ndarray, *, query_mask: np.ndarray | None = None,
                           gallery_mask: np.ndarray | None = None) -> tuple[int, int]:
  """(number of queries, number of queries without a positive) under retrieval_metrics' query/gallery rules."""
  labels = np.asarray(labels)
  num_rows = labels.shape[0]
  if query_mask is None and gallery_mask is None:
    query_mask = gallery_mask = np.ones(num_rows, bool)
  elif query_mask is None:
    query_mask = np.ones(num_rows, bool)
  query_mask = np.asarray(query_mask, bool)
  gallery_mask = ~query_mask if gallery_mask is None else np.asarray(gallery_mask, bool)
  query_rows = np.flatnonzero(query_mask)
  in_gallery = gallery_mask[query_rows].astype(np.int64)
  relevant_count = _same_label_counts(labels[query_rows], labels[gallery_mask]) - in_gallery
  return len(query_rows), int(np.sum(relevant_count <= 0))


def _check_embeddings_and_labels(embeddings, labels) -> tuple[np.ndarray, np.ndarray]:
  embeddings = np.asarray(embeddings)
  labels = np.asarray(labels)
  if embeddings.ndim != 2:
    raise ValueError(f"embeddings must be a 2-D [N, D] array, got shape {embeddings.shape}")
  if not np.issubdtype(embeddings.dtype, np.floating):
    raise ValueError(f"embeddings must be floating point, got dtype {embeddings.dtype}")
  if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
    raise ValueError(f"labels must be a 1-D array of length N={embeddings.shape[0]} (one per embedding row), "
                     f"got shape {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  bad_rows = ~np.isfinite(embeddings).all(axis=1)
  if bad_rows.any():
    raise ValueError(f"embeddings contain NaN or Inf in {int(bad_rows.sum())} rows "
                     f"(first: row {int(np.flatnonzero(bad_rows)[0])})")
  return embeddings.astype(np.float32, copy=False), labels.astype(np.int64, copy=False)


def _check_mask(mask, num_rows: int, name: str) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.dtype != np.bool_:
    raise ValueError(f"{name} must be a boolean array, got dtype {mask.dtype}")
  if mask.shape != (num_rows,):
    raise ValueError(f"{name} must have shape [{num_rows}] (one flag per embedding row), got {mask.shape}")
  if not mask.any():
    raise ValueError(f"{name} selects no rows")
  return mask


def _same_label_counts(query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
  """int64 [Q]: number of gallery items with each query's label."""
  classes, counts = np.unique(gallery_labels, return_counts=True)
  position = np.clip(np.searchsorted(classes, query_labels), 0, len(classes) - 1)
  return np.where(classes[position] == query_labels, counts[position], 0).astype(np.int64)


def _window_sums(relevant: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """relevant bool [c, k], window int [c] -> (hits in the top `window`, sum_{i<=window} P(i) rel_i), float64 [c]."""
  # Columns past the largest window add nothing: R is a class size (~12 on SOP) while k may be 1,000 (Recall@1000).
  relevant = relevant[:, :max(int(window.max(initial=0)), 0)]
  in_window = relevant & (np.arange(relevant.shape[1])[None, :] < window[:, None])
  cumulative = np.cumsum(in_window, axis=1, dtype=np.float64)
  precision_sum = np.sum(cumulative * in_window / np.arange(1, relevant.shape[1] + 1)[None, :], axis=1)
  return in_window.sum(axis=1).astype(np.float64), precision_sum


@dataclasses.dataclass(frozen=True)
class QuerySet:
  """Who queries whom, and what each query counts as relevant (all per query, int64 / bool [Q])."""

  query_rows: np.ndarray      # rows of the queries in the embedding matrix
  gallery_rows: np.ndarray    # rows of the gallery
  exclude: np.ndarray         # the query's own gallery position, -1 when it is not in the gallery
  query_labels: np.ndarray
  gallery_labels: np.ndarray
  relevant_count: np.ndarray  # R: gallery items of the query's class, the query itself excluded
  class_size: np.ndarray      # R + 1 in leave-one-out, R for a query outside the gallery

  @property
  def not_lone(self) -> np.ndarray:
    return self.relevant_count > 0


def query_set(labels: np.ndarray, query_mask: np.ndarray | None, gallery_mask: np.ndarray | None) -> QuerySet:
  """Queries and gallery from the masks (defaults: every row both; with only query_mask, the gallery is the
  rest, as In-Shop's query vs gallery)."""
  num_rows = labels.shape[0]
  if query_mask is None and gallery_mask is None:
    query_mask = gallery_mask = np.ones(num_rows, bool)
  elif query_mask is None:
    query_mask = np.ones(num_rows, bool)
  query_mask = _check_mask(query_mask, num_rows, "query_mask")
  gallery_mask = _check_mask(~query_mask if gallery_mask is None else gallery_mask, num_rows, "gallery_mask")
  query_rows, gallery_rows = np.flatnonzero(query_mask), np.flatnonzero(gallery_mask)
  gallery_position = np.full(num_rows, -1, np.int64)
  gallery_position[gallery_rows] = np.arange(len(gallery_rows))
  exclude = gallery_position[query_rows]
  query_labels, gallery_labels = labels[query_rows], labels[gallery_rows]
  in_gallery = (exclude >= 0).astype(np.int64)
  relevant_count = _same_label_counts(query_labels, gallery_labels) - in_gallery
  return QuerySet(query_rows, gallery_rows, exclude, query_labels, gallery_labels, relevant_count,
                  relevant_count + in_gallery)


# Per-metric sums over one chunk of ranked neighbour lists. relevant: bool [q, k], whether the i-th neighbour of
# each query of the chunk shares its label; rows: the chunk's slice of the query set. Lone queries add 0, so
# each metric's divisor alone decides how they count (`no_positive_treatment`).

def recall_hits(relevant: np.ndarray, recall_ks: Sequence[int]) -> np.ndarray:
  """int64 [len(recall_ks)]: queries with a hit within the first K, for each K."""
  # 0-based rank of the first hit; "never" beats every K, even a K beyond the list length.
  first_hit = np.where(relevant.any(axis=1), relevant.argmax(axis=1), np.iinfo(np.int64).max)
  return np.sum(first_hit[:, None] < np.asarray(recall_ks)[None, :], axis=0)


def precision_at_1_sum(relevant: np.ndarray, not_lone: np.ndarray) -> float:
  return float(np.sum(relevant[:, 0] & not_lone))


def r_precision_sum(relevant: np.ndarray, r: np.ndarray) -> float:
  """sum over queries of (hits in the first R) / R (0 for R = 0)."""
  hits, _ = _window_sums(relevant, r)
  return float(np.sum(np.where(r > 0, hits / np.maximum(r, 1), 0.0)))


def map_at_r_sum(relevant: np.ndarray, r: np.ndarray, class_size: np.ndarray, variant: str) -> float:
  """sum over queries of MAP@R: Musgrave's (window and divisor R) or the class-size form (window and divisor
  the class size including the query; see the module docstring)."""
  if variant == "musgrave":
    _, precision_sum = _window_sums(relevant, r)
    return float(np.sum(np.where(r > 0, precision_sum / np.maximum(r, 1), 0.0)))
  _, precision_sum = _window_sums(relevant, class_size)
  return float(np.sum(np.where(class_size > 0, precision_sum / np.maximum(class_size, 1), 0.0)))


def marp_sum(relevant: np.ndarray, window: np.ndarray) -> float:
  """sum over queries of D&C's mARP: precision sum in the first W over the hits there (0 without hits)."""
  hits, precision_sum = _window_sums(relevant, window)
  return float(np.sum(np.where(hits > 0, precision_sum / np.maximum(hits, 1.0), 0.0)))


def _check_retrieval_options(metrics, recall_ks, map_r_variant, distance, marp_max_rank, no_positive):
  """(metric names, sorted recall Ks) after checking every option."""
  names, named_ks, clustering = parse_metric_names(metrics)
  if clustering:
    raise ValueError(f"{clustering} are clustering metrics: use clustering_metrics()")
  if map_r_variant not in MAP_R_VARIANTS:
    raise ValueError(f"map_r_variant must be one of {MAP_R_VARIANTS}, got {map_r_variant!r}")
  if distance not in DISTANCES:
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
  if marp_max_rank is not None and marp_max_rank < 1:
    raise ValueError("marp_max_rank must be >= 1 or None")
  if no_positive not in NO_POSITIVE:
    raise InvalidValueError(f"no_positive must be one of {NO_POSITIVE}, got {no_positive!r}")
  # A bare 'recall' takes recall_ks; 'recall@K' names add their own K only.
  bare_recall = any(name.strip().lower() == "recall" for name in metrics)
  recall_ks = sorted(set(named_ks) | (set(int(k) for k in recall_ks) if bare_recall else set()))
  if "recall" in names and not recall_ks:
    raise ValueError("'recall' needs at least one K (recall_ks or 'recall@K')")
  if any(k < 1 for k in recall_ks):
    raise ValueError(f"recall Ks must be >= 1, got {recall_ks}")
  return names, recall_ks


def _search_depth(names: Sequence[str], recall_ks: Sequence[int], qs: QuerySet, map_r_variant: str,
                  marp_window: np.ndarray) -> int:
  """k of the kNN search: the largest K or relevant-set window any requested metric reads, within the gallery."""
  needed = [1]
  if "recall" in names:
    needed.append(max(recall_ks))
  if {"r_precision", "map@r"} & set(names):
    needed.append(int(qs.relevant_count.max()))
    if "map@r" in names and map_r_variant == "class_size":
      needed.append(int(qs.class_size.max()))
  if "marp" in names:
    needed.append(int(marp_window.max()))
  available = len(qs.gallery_rows) - int((qs.exclude >= 0).any())
  if available < 1:
    raise ValueError("the gallery has no item to retrieve besides the query itself")
  return min(max(needed), available)


def retrieval_metrics(embeddings: np.ndarray, labels: np.ndarray, *, query_mask: np.ndarray | None = None,
                      gallery_mask: np.ndarray | None = None,
                      metrics: Sequence[str] = ("recall", "r_precision", "map@r"),
                      recall_ks: Sequence[int] = (1, 2, 4, 8), map_r_variant: str = "musgrave",
                      marp_max_rank: int | None = None, distance: str = "cosine", backend: str = "auto",
                      chunk_size: int = 1024, gallery_chunk_size: int = 32768,
                      no_positive: str = "seeds") -> dict[str, float]:
  """Retrieval metrics of labelled embeddings (definitions in the module docstring).

  Args:
    embeddings: float [N, D], finite.
    labels: int [N].
    query_mask: bool [N], the queries; default all rows.
    gallery_mask: bool [N], the gallery; default all rows, or the rows outside query_mask when a
      query_mask is given (In-Shop query vs gallery). A row in both is excluded from its own ranking.
    metrics: names from RETRIEVAL_METRICS, or 'recall@K'.
    recall_ks: K values for 'recall' (added to those named 'recall@K').
    map_r_variant: 'musgrave' | 'class_size' (see module docstring).
    marp_max_rank: D&C mARP truncation (In-Shop: 50); None = no truncation.
    distance: 'cosine' (L2-normalise, then rank by inner product: every paper here) | 'euclidean'
      (raw embeddings, L2).
    backend: kNN backend, 'auto' | 'jax' | 'faiss'.
    chunk_size, gallery_chunk_size: kNN chunking (memory bound).
    no_positive: 'seeds' | 'exclude' | 'miss': how queries without a positive count (module docstring).

  Returns:
    {'recall@K': ..., 'precision@1': ..., 'r_precision': ..., 'map@r': ..., 'marp': ...} for the
    requested metrics, as Python floats (NaN where no query qualifies).
  """
  embeddings, labels = _check_embeddings_and_labels(embeddings, labels)
  names, recall_ks = _check_retrieval_options(metrics, recall_ks, map_r_variant, distance, marp_max_rank,
                                              no_positive)
  if not names:
    return {}
  qs = query_set(labels, query_mask, gallery_mask)
  not_lone = qs.not_lone
  marp_window = qs.relevant_count if marp_max_rank is None else np.minimum(qs.relevant_count, marp_max_rank)
  k = _search_depth(names, recall_ks, qs, map_r_variant, marp_window)

  totals = {name: 0.0 for name in ("precision@1", "r_precision", "map@r", "marp")}
  hits = np.zeros(len(recall_ks), np.int64)
  num_rows = embeddings.shape[0]
  # Whole-set selections use the array itself (no copies of a 60k x 512 matrix).
  queries = embeddings if len(qs.query_rows) == num_rows else embeddings[qs.query_rows]
  gallery = embeddings if len(qs.gallery_rows) == num_rows else embeddings[qs.gallery_rows]
  for start, _, indices in knn_lib.knn_chunks(
      queries, gallery, k, backend=backend, metric="cosine" if distance == "cosine" else "euclidean",
      exclude_indices=qs.exclude, chunk_size=chunk_size, gallery_chunk_size=gallery_chunk_size):
    rows = slice(start, start + indices.shape[0])
    relevant = qs.gallery_labels[indices] == qs.query_labels[rows, None]
    if "recall" in names:
      hits += recall_hits(relevant, recall_ks)
    if "precision@1" in names:
      totals["precision@1"] += precision_at_1_sum(relevant, not_lone[rows])
    if "r_precision" in names:
      totals["r_precision"] += r_precision_sum(relevant, qs.relevant_count[rows])
    if "map@r" in names:
      totals["map@r"] += map_at_r_sum(relevant, qs.relevant_count[rows], qs.class_size[rows], map_r_variant)
    if "marp" in names:
      totals["marp"] += marp_sum(relevant, marp_window[rows])

  num_queries, num_not_lone = len(qs.query_rows), int(not_lone.sum())

  def mean(name: str, total: float) -> float:
    # Lone queries add 0 to every total, so the treatment only picks the divisor.
    if no_positive_treatment(name, map_r_variant=map_r_variant, no_positive=no_positive) == "miss":
      return total / num_queries
    return total / num_not_lone if num_not_lone else math.nan

  results: dict[str, float] = {}
  for name in names:
    if name == "recall":
      results.update({f"recall@{kk}": mean("recall", float(h)) for kk, h in zip(recall_ks, hits)})
    else:
      results[name] = mean(name, totals[name])
  return results


# ------------------------------------------------------------------------------------------ clustering


def nmi_score(labels: np.ndarray, clusters: np.ndarray) -> float:
  """Normalised mutual information I(Y; C) / ((H(Y) + H(C)) / 2), natural log.

  Same value and limit cases as sklearn `normalized_mutual_info_score` (average_method='arithmetic'):
  1.0 when both labelings have a single group, 0.0 when the mutual information is 0.
  labels, clusters: int [N].
  """
  labels, clusters = np.asarray(labels).ravel(), np.asarray(clusters).ravel()
  if labels.shape != clusters.shape:
    raise ValueError(f"labels {labels.shape} and clusters {clusters.shape} differ in length")
  _, label_ids = np.unique(labels, return_inverse=True)
  _, cluster_ids = np.unique(clusters, return_inverse=True)
  num_labels, num_clusters = int(label_ids.max(initial=-1)) + 1, int(cluster_ids.max(initial=-1)) + 1
  if num_labels == num_clusters and num_labels <= 1:
    return 1.0
  if num_labels == 1 or num_clusters == 1:
    return 0.0
  n = float(len(labels))
  label_sizes = np.bincount(label_ids).astype(np.float64)
  cluster_sizes = np.bincount(cluster_ids).astype(np.float64)
  joint, joint_sizes = np.unique(label_ids.astype(np.int64) * num_clusters + cluster_ids, return_counts=True)
  joint_sizes = joint_sizes.astype(np.float64)
  outer = label_sizes[joint // num_clusters] * cluster_sizes[joint % num_clusters]
  mutual_information = max(float(np.sum(joint_sizes / n * np.log(joint_sizes * n / outer))), 0.0)
  if mutual_information <= np.finfo(np.float64).eps * len(joint):
    return 0.0

  def entropy(sizes: np.ndarray) -> float:
    p = sizes / n
    return float(-np.sum(p * np.log(p)))

  return mutual_information / ((entropy(label_sizes) + entropy(cluster_sizes)) / 2.0)


def pair_f1_score(labels: np.ndarray, clusters: np.ndarray) -> float:
  """Pair-counting clustering F1 (RDML `metrics/f1.py`), exact integer pair counts.

  TP = sum_{k,j} C(n_kj, 2) (same class, same cluster), S_class = sum_k C(n_k, 2),
  S_clust = sum_j C(m_j, 2); F1 = 2 TP / (S_class + S_clust) (= 2PR / (P + R)). RDML's formula gives
  0/0 = NaN when TP = 0; this returns 0.0 there (the limit), and NaN only if both pair sums are 0.
  """
  labels, clusters = np.asarray(labels).ravel(), np.asarray(clusters).ravel()
  if labels.shape != clusters.shape:
    raise ValueError(f"labels {labels.shape} and clusters {clusters.shape} differ in length")

  def pairs(sizes: np.ndarray) -> int:
    sizes = sizes.astype(np.int64)
    return int(np.sum(sizes * (sizes - 1) // 2))

  _, label_sizes = np.unique(labels, return_counts=True)
  _, cluster_sizes = np.unique(clusters, return_counts=True)
  _, joint_sizes = np.unique(np.stack([labels, clusters]), axis=1, return_counts=True)
  true_positive, class_pairs, cluster_pairs = pairs(joint_sizes), pairs(label_sizes), pairs(cluster_sizes)
  if class_pairs + cluster_pairs == 0:
    return math.nan
  return 2.0 * true_positive / (class_pairs + cluster_pairs)


def clustering_metrics(embeddings: np.ndarray, labels: np.ndarray, *, num_runs: int = 1, seed: int = 0,
                       niter: int = 20, nredo: int = 1, max_points_per_centroid: int = 256,
                       num_clusters: int | None = None, distance: str = "cosine", backend: str = "auto",
                       metrics: Sequence[str] = ("nmi", "f1")) -> dict[str, float]:
  """NMI and pair F1 of a k-means partition, averaged over `num_runs` k-means runs (seeds seed, seed+1, ...).

  Settings per source (docs/evaluation.md): PML / RDML / VPTSP / DADA niter=20, one run (their
  faiss seed is faiss's default 1234); D&C final numbers niter=100, num_runs=10, seed=0,
  max_points_per_centroid=10_000_000.

  Args:
    embeddings: float [N, D]; labels: int [N].
    num_clusters: K; default the number of distinct labels.
    distance: 'cosine' clusters L2-normalised embeddings (as evaluated), 'euclidean' raw ones.
    backend: k-means backend, 'auto' | 'jax' | 'faiss'.
  Returns:
    {'nmi': mean NMI, 'f1': mean F1} (the requested subset).
  """
  embeddings, labels = _check_embeddings_and_labels(embeddings, labels)
  _, _, names = parse_metric_names(metrics)
  if distance not in DISTANCES:
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
  if num_runs < 1:
    raise ValueError("num_runs must be >= 1")
  if not names:
    return {}
  if distance == "cosine":
    embeddings = l2_normalize(np.asarray(embeddings), clamp_norm=True)
  num_clusters = len(np.unique(labels)) if num_clusters is None else int(num_clusters)
  scores: dict[str, list[float]] = {name: [] for name in names}
  for run in range(num_runs):
    clusters = kmeans(embeddings, num_clusters, niter=niter, nredo=nredo, seed=seed + run, backend=backend,
                      max_points_per_centroid=max_points_per_centroid).assignments
    if "nmi" in scores:
      scores["nmi"].append(nmi_score(labels, clusters))
    if "f1" in scores:
      scores["f1"].append(pair_f1_score(labels, clusters))
  return {name: float(np.mean(values)) for name, values in scores.items()}
