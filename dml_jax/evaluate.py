"""Evaluates saved embeddings (from dml_jax or any other model).

  python -m dml_jax.evaluate --embeddings E.npy --labels L.npy [--query_mask Q.npy [--gallery_mask G.npy]]
      [--metrics recall@1 recall@2 r_precision map@r nmi ...] --json OUT.json

E.npy: float [N, D]; L.npy: [N] integer (or string) labels; Q.npy / G.npy: bool [N]. Without masks every
row queries all others (leave-one-out, the query itself excluded); with --query_mask the gallery is
--gallery_mask, or every row outside the query mask (In-Shop style). Without --metrics it computes
recall@1, recall@2, recall@4, recall@8, r_precision, map@r and nmi. The JSON maps metric names
(recall@K, precision@1, r_precision, map@r, marp, nmi, f1) to values; NaN is written as null.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence

import numpy as np

DEFAULT_METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "r_precision", "map@r", "nmi")


class InputError(ValueError):
  """A bad input file; the message names it."""


def _load_npy(path: str, what: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise InputError(f"{what} file {path!r} does not exist")
  try:
    return np.load(path, allow_pickle=False)
  except ValueError as error:
    raise InputError(f"{what} file {path!r} is not a plain .npy array (saved with np.save, no pickled "
                     f"objects): {error}") from error


def load_inputs(embeddings_path: str, labels_path: str, query_mask_path: str | None = None,
                gallery_mask_path: str | None = None):
  """Loads and checks the arrays; returns (embeddings float32 [N, D], labels int64 [N], query_mask, gallery_mask)."""
  embeddings = _load_npy(embeddings_path, "embeddings")
  if embeddings.ndim != 2:
    raise InputError(f"embeddings {embeddings_path!r} must be a 2-D [N, D] array, got shape {embeddings.shape}")
  if not np.issubdtype(embeddings.dtype, np.floating):
    raise InputError(f"embeddings {embeddings_path!r} must be floating point, got dtype {embeddings.dtype}")
  bad_rows = ~np.isfinite(embeddings).all(axis=1)
  if bad_rows.any():
    raise InputError(f"embeddings {embeddings_path!r} contain NaN or Inf in {int(bad_rows.sum())} of "
                     f"{len(embeddings)} rows (first: row {int(np.flatnonzero(bad_rows)[0])})")
  num_rows = embeddings.shape[0]

  labels = _load_npy(labels_path, "labels")
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.ndim != 1 or labels.shape[0] != num_rows:
    raise InputError(f"labels {labels_path!r} must be a 1-D array with one label per embedding row "
                     f"({num_rows}), got shape {labels.shape}")
  if np.issubdtype(labels.dtype, np.floating):
    if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
      raise InputError(f"labels {labels_path!r} must be integers (or strings), got non-integral floats")
    labels = labels.astype(np.int64)
  elif np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_:
    labels = labels.astype(np.int64)
  elif labels.dtype.kind in "US":
    labels = np.unique(labels, return_inverse=True)[1].astype(np.int64)
  else:
    raise InputError(f"labels {labels_path!r} must be integers or strings, got dtype {labels.dtype}")

  masks = []
  for path, what in ((query_mask_path, "query_mask"), (gallery_mask_path, "gallery_mask")):
    if path is None:
      masks.append(None)
      continue
    mask = _load_npy(path, what)
    if mask.shape != (num_rows,):
      raise InputError(f"{what} {path!r} must have shape ({num_rows},), one flag per embedding row, "
                       f"got {mask.shape}")
    if mask.dtype != np.bool_:
      if not np.issubdtype(mask.dtype, np.integer) or not np.isin(mask, (0, 1)).all():
        raise InputError(f"{what} {path!r} must be boolean (or 0/1 integers), got dtype {mask.dtype}")
      mask = mask.astype(bool)
    if not mask.any():
      raise InputError(f"{what} {path!r} selects no rows")
    masks.append(mask)
  if masks[1] is not None and masks[0] is None:
    raise InputError("--gallery_mask needs --query_mask")
  return embeddings.astype(np.float32, copy=False), labels, masks[0], masks[1]


def _parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
  parser = argparse.ArgumentParser(prog="python -m dml_jax.evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--embeddings", required=True, help="float [N, D] .npy")
  parser.add_argument("--labels", required=True, help="[N] integer or string labels .npy")
  parser.add_argument("--query_mask", help="bool [N] .npy: the query rows (default: all rows, leave-one-out)")
  parser.add_argument("--gallery_mask", help="bool [N] .npy: the gallery rows (default: the rows outside "
                      "--query_mask); a row in both is excluded from its own ranking")
  parser.add_argument("--metrics", nargs="+", default=None,
                      help="names, space or comma separated: recall@K, precision@1, r_precision, map@r, marp, "
                      f"nmi, f1 (default: {' '.join(DEFAULT_METRICS)})")
  parser.add_argument("--json", required=True, help="output JSON file")
  parser.add_argument("--distance", default="cosine", choices=("cosine", "euclidean"),
                      help="cosine: L2-normalise first (what the papers do); euclidean: raw embeddings")
  parser.add_argument("--map_r_variant", default="musgrave", choices=("musgrave", "class_size"),
                      help="musgrave: Musgrave et al. MAP@R; class_size: the VPTSP/DADA code's variant")
  parser.add_argument("--marp_max_rank", type=int, default=None, help="D&C mARP list depth (In-Shop: 50)")
  parser.add_argument("--backend", default="auto", choices=("auto", "jax", "faiss"), help="kNN backend")
  parser.add_argument("--kmeans_backend", default=None, choices=("auto", "jax", "faiss"),
                      help="k-means backend (default: --backend)")
  parser.add_argument("--kmeans_runs", type=int, default=1, help="NMI/F1 averaged over this many k-means runs")
  parser.add_argument("--kmeans_niter", type=int, default=20, help="k-means iterations")
  parser.add_argument("--kmeans_nredo", type=int, default=1, help="k-means restarts (best objective kept)")
  parser.add_argument("--max_points_per_centroid", type=int, default=256,
                      help="k-means subsamples above K x this many points (faiss default)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the first k-means run")
  parser.add_argument("--chunk_size", type=int, default=1024, help="queries per kNN chunk")
  return parser, parser.parse_args(argv)


def _json_value(value: float):
  return None if isinstance(value, float) and math.isnan(value) else value


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  parser, args = _parse_args(argv)
  # Import late: `--help` and input errors should not wait for jax.
  from dml_jax.eval import metrics as metrics_lib  # pylint: disable=import-outside-toplevel

  names = DEFAULT_METRICS if args.metrics is None else [
      part for item in args.metrics for part in item.split(",") if part.strip()]
  try:
    retrieval, _, clustering = metrics_lib.parse_metric_names(names)
    embeddings, labels, query_mask, gallery_mask = load_inputs(args.embeddings, args.labels, args.query_mask,
                                                               args.gallery_mask)
    retrieval_names = [n for n in names if n.strip().lower() not in metrics_lib.CLUSTERING_METRICS]
    results: dict[str, float] = {}
    if retrieval:
      results.update(metrics_lib.retrieval_metrics(
          embeddings, labels, query_mask=query_mask, gallery_mask=gallery_mask, metrics=retrieval_names,
          recall_ks=(), map_r_variant=args.map_r_variant, marp_max_rank=args.marp_max_rank,
          distance=args.distance, backend=args.backend, chunk_size=args.chunk_size))
    if clustering:
      rows = np.ones(len(labels), bool)
      if query_mask is not None:  # cluster the evaluated rows: queries and gallery together
        rows = query_mask | (~query_mask if gallery_mask is None else gallery_mask)
      results.update(metrics_lib.clustering_metrics(
          embeddings[rows], labels[rows], num_runs=args.kmeans_runs, seed=args.seed, niter=args.kmeans_niter,
          nredo=args.kmeans_nredo, max_points_per_centroid=args.max_points_per_centroid, distance=args.distance,
          backend=args.kmeans_backend or args.backend, metrics=clustering))
  except ValueError as error:  # bad input: stop with the message, not a traceback
    parser.error(str(error))

  with open(args.json, "w", encoding="utf-8") as file:
    json.dump({name: _json_value(value) for name, value in results.items()}, file, indent=2)
    file.write("\n")
  width = max(len(name) for name in results) if results else 0
  for name, value in results.items():
    print(f"{name:<{width}}  {value:.4f}")
  print(f"wrote {args.json}", file=sys.stderr)
  return results


if __name__ == "__main__":
  main()
