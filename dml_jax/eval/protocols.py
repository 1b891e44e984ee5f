"""Per-dataset evaluation protocols (docs/evaluation.md): which K values, which rows query which.

| dataset      | recall K                 | retrieval                                                  |
|--------------|--------------------------|------------------------------------------------------------|
| cub200       | 1, 2, 4, 8               | leave-one-out on the test set                              |
| cars196      | 1, 2, 4, 8               | leave-one-out on the test set                              |
| sop          | 1, 10, 100, 1000         | leave-one-out on the test set                              |
| inshop       | 1, 10, 20, 30, 40, 50    | query vs gallery (disjoint, no self-exclusion)             |
| vehicleid    | 1, 5                     | leave-one-out within ONE test list                         |
| inaturalist  | 1, 4, 16, 32             | leave-one-out on the test set (Brown et al. split)         |
| digits       | 1, 2, 4, 8               | leave-one-out (the embedded sklearn-digits demo, CUB rule) |
| folder       | 1, 2, 4, 8               | leave-one-out on the test classes of your own images       |

VehicleID: its small / medium / large test lists (800 / 1,600 / 2,400 ids) are evaluated separately.
The caller embeds the records of one list and calls `evaluate('vehicleid', ...)` once per list
(`vehicleid_small` / `_medium` / `_large` are accepted as names for the same protocol), e.g.
`{size: evaluate('vehicleid', emb[size], labels[size], roles[size]) for size in ('small', ...)}`.

Clustering metrics (NMI, F1) use k-means with K = the number of distinct labels among the evaluated
rows (In-Shop: query and gallery together, 3,985 classes), as D&C, PML and RDML do.
Paper-specific settings are options, set by each method's config: D&C reports SOP at K = 1, 10, 100
(`recall_ks=(1, 10, 100)`) and In-Shop at 1, 10, 20, 30, 50, its NMI as the mean of 10 k-means runs
(`num_runs=10, niter=100, max_points_per_centroid=10_000_000`); VPTSP / DADA report the class-size
MAP@R (`map_r_variant='class_size'`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from dml_jax.errors import InvalidValueError, UserError, close_matches
from dml_jax.eval import metrics as metrics_lib

ROLES = ("test", "query", "gallery")
DEFAULT_METRICS = ("recall", "r_precision", "map@r", "nmi")

_RETRIEVAL_OPTIONS = ("recall_ks", "map_r_variant", "marp_max_rank", "distance", "backend", "chunk_size",
                      "gallery_chunk_size", "no_positive")
_CLUSTERING_OPTIONS = ("num_runs", "seed", "niter", "nredo", "max_points_per_centroid", "distance", "backend",
                       "kmeans_backend")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """recall_ks: the K values reported; query_gallery: retrieval from 'query' rows into 'gallery' rows
  (otherwise leave-one-out over 'test' rows); marp_max_rank: D&C's mARP list depth."""

  name: str
  recall_ks: tuple[int, ...]
  query_gallery: bool = False
  marp_max_rank: int | None = None


PROTOCOLS = {
    "cub200": Protocol("cub200", (1, 2, 4, 8)),
    "cars196": Protocol("cars196", (1, 2, 4, 8)),
    "sop": Protocol("sop", (1, 10, 100, 1000)),
    # D&C ranks In-Shop with a top-50 list, so its mARP window is min(R, 50).
    "inshop": Protocol("inshop", (1, 10, 20, 30, 40, 50), query_gallery=True, marp_max_rank=50),
    "vehicleid": Protocol("vehicleid", (1, 5)),
    "inaturalist": Protocol("inaturalist", (1, 4, 16, 32)),
    "digits": Protocol("digits", (1, 2, 4, 8)),
    "folder": Protocol("folder", (1, 2, 4, 8)),
}

_ALIASES = {
    "cub": "cub200", "cub200_2011": "cub200", "cub_200_2011": "cub200", "caltech_birds2011": "cub200",
    "cars": "cars196", "cars_196": "cars196",
    "stanford_online_products": "sop", "online_products": "sop",
    "in_shop": "inshop", "deepfashion_inshop": "inshop",
    "vid": "vehicleid", "vehicle_id": "vehicleid", "pku_vehicleid": "vehicleid",
    "vehicleid_small": "vehicleid", "vehicleid_medium": "vehicleid", "vehicleid_large": "vehicleid",
    "inat": "inaturalist", "inaturalist2018": "inaturalist", "inat2018": "inaturalist",
}


def get_protocol(dataset: str) -> Protocol:
  key = dataset.strip().lower().replace("-", "_")
  key = _ALIASES.get(key, key)
  if key not in PROTOCOLS:
    close = close_matches(key, list(PROTOCOLS) + list(_ALIASES))
    guess = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise InvalidValueError(f"no evaluation protocol for dataset {dataset!r}; {guess}known: {sorted(PROTOCOLS)} "
                            f"(aliases: {sorted(_ALIASES)})")
  return PROTOCOLS[key]


def result_names(dataset: str, metrics: Sequence[str] | None = None, **options: Any) -> list[str]:
  """The keys `evaluate(dataset, ..., metrics=metrics, **options)` returns, without evaluating anything.

  Checks the metric names and options the way evaluate() does, so a typo stops a run before training.
  """
  protocol = get_protocol(dataset)
  _check_options(options)
  names = list(DEFAULT_METRICS if metrics is None else metrics)
  retrieval, named_ks, clustering = metrics_lib.parse_metric_names(names)
  bare_recall = any(n.strip().lower() == "recall" for n in names)
  ks = sorted(set(named_ks) | (set(int(k) for k in options.get("recall_ks", protocol.recall_ks))
                               if bare_recall else set()))
  out = []
  for name in retrieval:
    out.extend(f"recall@{k}" for k in ks) if name == "recall" else out.append(name)
  return out + list(clustering)


def check_metrics(dataset: str, metrics: Sequence[str] | None = None, select_metric: str | None = None,
                  **options: Any) -> list[str]:
  """result_names(), and that `select_metric` is one of them; UserErrors name the config key to fix."""
  try:
    _check_options(options)
  except UserError as error:
    raise type(error)(f"eval.options: {error.message}", "fix --config.eval.options") from None
  try:
    names = result_names(dataset, metrics, **options)
  except UserError as error:
    raise type(error)(f"eval.metrics: {error.message}", error.hint or "fix --config.eval.metrics") from None
  if select_metric is not None and select_metric not in names:
    close = close_matches(select_metric, names)
    guess = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise InvalidValueError(f"eval.select_metric {select_metric!r} is not among the evaluated metrics "
                            f"({', '.join(names)}){guess}",
                            "set --config.eval.select_metric to one of them, or add it to --config.eval.metrics")
  return names


def _check_options(options: dict[str, Any]) -> None:
  unknown = sorted(set(options) - set(_RETRIEVAL_OPTIONS) - set(_CLUSTERING_OPTIONS))
  if unknown:
    known = sorted(set(_RETRIEVAL_OPTIONS) | set(_CLUSTERING_OPTIONS))
    close = close_matches(unknown[0], known)
    guess = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise InvalidValueError(f"unknown evaluation options {unknown}; {guess}known: {', '.join(known)}")


def evaluate(dataset: str, embeddings: np.ndarray, labels: np.ndarray, roles: np.ndarray, *,
             metrics: Sequence[str] | None = None, **options: Any) -> dict[str, float]:
  """Evaluates embeddings with `dataset`'s protocol.

  Args:
    dataset: a name of PROTOCOLS or an alias.
    embeddings: float [N, D].
    labels: int [N].
    roles: str [N], each 'test' (leave-one-out datasets) or 'query' / 'gallery' (In-Shop).
    metrics: names ('recall' = the protocol's K values, 'recall@K', 'precision@1', 'r_precision',
      'map@r', 'marp', 'nmi', 'f1'); default recall, r_precision, map@r, nmi.
    **options: recall_ks (replaces the protocol's), map_r_variant, marp_max_rank, distance, backend
      (kNN and k-means), kmeans_backend (k-means only), chunk_size, gallery_chunk_size, no_positive,
      num_runs, seed, niter, nredo, max_points_per_centroid (see metrics.retrieval_metrics /
      metrics.clustering_metrics).

  Returns:
    {'recall@K': ..., 'r_precision': ..., 'map@r': ..., 'nmi': ..., ...}.
  """
  protocol = get_protocol(dataset)
  _check_options(options)
  embeddings = np.asarray(embeddings)
  roles = np.asarray(roles).astype(str)
  if roles.shape != (embeddings.shape[0],):
    raise ValueError(f"roles must have shape [{embeddings.shape[0]}] (one per embedding row), got {roles.shape}")
  bad = sorted(set(np.unique(roles)) - set(ROLES))
  if bad:
    raise ValueError(f"unknown roles {bad}; expected {ROLES}")

  if protocol.query_gallery:
    if np.any(roles == "test"):
      raise ValueError(f"{protocol.name} is evaluated query vs gallery: roles must be 'query' or 'gallery', "
                       f"found {int(np.sum(roles == 'test'))} 'test' rows")
    query_mask, gallery_mask = roles == "query", roles == "gallery"
    if not query_mask.any() or not gallery_mask.any():
      raise ValueError(f"{protocol.name} needs both 'query' and 'gallery' rows")
  else:
    if np.any(roles != "test"):
      raise ValueError(f"{protocol.name} is evaluated leave-one-out on the test set: every role must be 'test', "
                       f"found {sorted(set(np.unique(roles)) - {'test'})}")
    query_mask = gallery_mask = None

  names = list(DEFAULT_METRICS if metrics is None else metrics)
  retrieval_names = [n for n in names if n.strip().lower() not in metrics_lib.CLUSTERING_METRICS]
  clustering_names = [n for n in names if n.strip().lower() in metrics_lib.CLUSTERING_METRICS]

  results: dict[str, float] = {}
  if retrieval_names:
    retrieval_options = {key: options[key] for key in _RETRIEVAL_OPTIONS if key in options}
    retrieval_options.setdefault("recall_ks", protocol.recall_ks)
    retrieval_options.setdefault("marp_max_rank", protocol.marp_max_rank)
    results.update(metrics_lib.retrieval_metrics(embeddings, labels, query_mask=query_mask,
                                                 gallery_mask=gallery_mask, metrics=retrieval_names,
                                                 **retrieval_options))
  if clustering_names:
    clustering_options = {key: options[key] for key in _CLUSTERING_OPTIONS if key in options}
    if "kmeans_backend" in clustering_options:
      clustering_options["backend"] = clustering_options.pop("kmeans_backend")
    results.update(metrics_lib.clustering_metrics(embeddings, labels, metrics=clustering_names,
                                                  **clustering_options))
  return results
