"""Evaluates saved embeddings (from dml_jax or any other model) and prints a table.

  python -m dml_jax.evaluate --embeddings E.npy --labels L.npy [--query_mask Q.npy [--gallery_mask G.npy]]
      [--metrics recall@1 recall@2 r_precision map@r nmi ...] [--json OUT.json]
  python -m dml_jax.evaluate --embeddings run.npz          # arrays 'embeddings' and 'labels' in one file

E.npy: float [N, D]; L.npy: [N] integer (or string) labels; Q.npy / G.npy: bool [N]. A .npz holds named
arrays: --embeddings_key / --labels_key / --query_mask_key / --gallery_mask_key name them (defaults
embeddings, labels, query_mask, gallery_mask); without --labels the labels come from the embeddings'
.npz, and so do its query / gallery masks when it holds them. Without masks every row queries all
others (leave-one-out, the query itself excluded); with --query_mask the gallery is --gallery_mask, or
every row outside the query mask (In-Shop style). Without --metrics it computes recall@1, recall@2,
recall@4, recall@8, r_precision, map@r and nmi. --json writes {metric: value} (NaN as null).

Labels where evaluation means nothing stop with a message: a single class, or no query with a positive
(another row of its class in the gallery). Queries without a positive are counted and the table says how
each metric treats them: --no_positive seeds (default) keeps each metric as its source computes it
(recall@K, marp and the class-size map@r count them as misses, precision@1, r_precision and map@r leave
them out); exclude / miss apply one rule to every metric.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zipfile
from collections.abc import Sequence

import numpy as np

from dml_jax import cli
from dml_jax.errors import InvalidValueError

DEFAULT_METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "r_precision", "map@r", "nmi")
NO_POSITIVE_CHOICES = ("seeds", "exclude", "miss")  # = metrics.NO_POSITIVE; metrics imports jax, this must not
_SAVE_HINT = "save arrays with np.save (.npy) or np.savez (.npz with named arrays), without pickled objects"


class InputError(InvalidValueError):
  """A bad input file; the message names it."""


def _open(path: str, what: str):
  """np.load(path) for a .npy (an array) or .npz (an NpzFile); every failure names the file."""
  if not os.path.exists(path):
    raise InputError(f"{what} file {path} does not exist", _SAVE_HINT)
  if os.path.isdir(path):
    raise InputError(f"{what} file {path} is a folder", "pass a .npy or .npz file")
  if os.path.getsize(path) == 0:
    raise InputError(f"{what} file {path} is empty (0 bytes): an interrupted save?", _SAVE_HINT)
  try:
    loaded = np.load(path, allow_pickle=False)
  except ValueError as error:
    if "allow_pickle" in str(error) or "pickle" in str(error):
      raise InputError(f"{what} file {path} holds pickled objects (an object array or not a .npy / .npz at all), "
                       "which are never loaded", _SAVE_HINT) from None
    raise InputError(f"{what} file {path} is not a readable .npy / .npz: {error}", _SAVE_HINT) from None
  except (EOFError, OSError, zipfile.BadZipFile) as error:
    raise InputError(f"{what} file {path} is truncated or not a .npy / .npz ({type(error).__name__}: "
                     f"{error})", _SAVE_HINT) from None
  return loaded


def _array(loaded, path: str, what: str, key: str, key_flag: str) -> np.ndarray:
  if isinstance(loaded, np.ndarray):
    return loaded
  try:
    names = list(loaded.files)
    if key not in names:
      raise InputError(f"{what}: {path} holds no array {key!r} (it holds: {', '.join(names) or 'nothing'})",
                       f"name the array with {key_flag} NAME")
    try:
      return loaded[key]
    except ValueError:
      raise InputError(f"{what}: array {key!r} of {path} holds pickled objects, which are never loaded",
                       _SAVE_HINT) from None
    except (EOFError, OSError, zipfile.BadZipFile) as error:
      raise InputError(f"{what}: array {key!r} of {path} is damaged ({type(error).__name__}: {error})",
                       _SAVE_HINT) from None
  finally:
    loaded.close()


def _load(path: str, what: str, key: str, key_flag: str) -> np.ndarray:
  return _array(_open(path, what), path, what, key, key_flag)


def _npz_names(path: str) -> list[str]:
  loaded = _open(path, "embeddings")
  if isinstance(loaded, np.ndarray):
    return []
  names = list(loaded.files)
  loaded.close()
  return names


def _check_embeddings(embeddings: np.ndarray, source: str) -> np.ndarray:
  if embeddings.ndim != 2:
    raise InputError(f"embeddings {source} must be a 2-D [N, D] array, got shape {embeddings.shape}")
  if embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
    raise InputError(f"embeddings {source} hold no data: shape {embeddings.shape}")
  if not np.issubdtype(embeddings.dtype, np.floating):
    raise InputError(f"embeddings {source} must be floating point, got dtype {embeddings.dtype}")
  bad_rows = ~np.isfinite(embeddings).all(axis=1)
  if bad_rows.any():
    raise InputError(f"embeddings {source} contain NaN or Inf in {int(bad_rows.sum())} of {len(embeddings)} rows "
                     f"(first: row {int(np.flatnonzero(bad_rows)[0])})")
  return embeddings.astype(np.float32, copy=False)


def _check_labels(labels: np.ndarray, source: str, num_rows: int) -> np.ndarray:
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.ndim != 1 or labels.shape[0] != num_rows:
    raise InputError(f"labels {source} must be a 1-D array with one label per embedding row ({num_rows}), "
                     f"got shape {labels.shape}")
  if np.issubdtype(labels.dtype, np.floating):
    if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
      raise InputError(f"labels {source} must be integers (or strings), got non-integral floats")
    return labels.astype(np.int64)
  if np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_:
    return labels.astype(np.int64)
  if labels.dtype.kind in "US":
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)
  raise InputError(f"labels {source} must be integers or strings, got dtype {labels.dtype}")


def _check_mask(mask: np.ndarray, source: str, what: str, num_rows: int) -> np.ndarray:
  if mask.shape != (num_rows,):
    raise InputError(f"{what} {source} must have shape ({num_rows},), one flag per embedding row, got {mask.shape}")
  if mask.dtype != np.bool_:
    if not np.issubdtype(mask.dtype, np.integer) or not np.isin(mask, (0, 1)).all():
      raise InputError(f"{what} {source} must be boolean (or 0/1 integers), got dtype {mask.dtype}")
    mask = mask.astype(bool)
  if not mask.any():
    raise InputError(f"{what} {source} selects no rows")
  return mask


def load_inputs(embeddings_path: str, labels_path: str | None = None, query_mask_path: str | None = None,
                gallery_mask_path: str | None = None, *, keys: dict[str, str] | None = None,
                sources: dict | None = None):
  """Loads and checks the arrays; returns (embeddings float32 [N, D], labels int64 [N], query_mask, gallery_mask).

  A path ending in .npz (or any zip) is read by array name, `keys` mapping embeddings / labels / query_mask /
  gallery_mask to the names (default: the same). Without labels_path the labels (and masks it holds, unless
  given) come from the embeddings' .npz. `sources`, if given, receives a description of each array's origin.
  """
  keys = {"embeddings": "embeddings", "labels": "labels", "query_mask": "query_mask",
          "gallery_mask": "gallery_mask", **(keys or {})}
  flags = {name: f"--{name}_key" for name in keys}
  sources = {} if sources is None else sources

  def describe(path: str, name: str) -> str:
    return f"{path}[{keys[name]}]" if path.lower().endswith(".npz") or zipfile.is_zipfile(path) else path

  embeddings = _load(embeddings_path, "embeddings", keys["embeddings"], flags["embeddings"])
  sources["embeddings"] = describe(embeddings_path, "embeddings")
  embeddings = _check_embeddings(embeddings, sources["embeddings"])
  num_rows = embeddings.shape[0]

  bundled = [] if labels_path is not None else _npz_names(embeddings_path)
  if labels_path is None:
    if not bundled:
      raise InputError(f"no labels: {embeddings_path} is a single array",
                       "pass --labels L.npy, or put embeddings and labels in one .npz")
    labels_path = embeddings_path
  labels = _load(labels_path, "labels", keys["labels"], flags["labels"])
  sources["labels"] = describe(labels_path, "labels")
  labels = _check_labels(labels, sources["labels"], num_rows)

  masks = []
  for path, name in ((query_mask_path, "query_mask"), (gallery_mask_path, "gallery_mask")):
    if path is None and keys[name] in bundled:
      path = embeddings_path  # the .npz of embeddings and labels holds this mask too
    if path is None:
      masks.append(None)
      continue
    sources[name] = describe(path, name)
    masks.append(_check_mask(_load(path, name, keys[name], flags[name]), sources[name], name, num_rows))
  if masks[1] is not None and masks[0] is None:
    raise InputError("a gallery mask needs a query mask", "pass --query_mask Q.npy as well")
  return embeddings, labels, masks[0], masks[1]


def check_labels_meaningful(labels: np.ndarray, query_mask: np.ndarray | None, gallery_mask: np.ndarray | None,
                            source: str) -> tuple[int, int]:
  """(queries, queries without a positive); refuses labels under which every score is trivial."""
  from dml_jax.eval import metrics as metrics_lib  # pylint: disable=import-outside-toplevel

  rows = np.ones(len(labels), bool)
  if query_mask is not None:
    rows = query_mask | (~query_mask if gallery_mask is None else gallery_mask)
  classes = np.unique(labels[rows])
  if len(classes) < 2:
    raise InputError(f"labels {source}: all {int(rows.sum())} evaluated rows have one class ({classes[0]}), so "
                     "every retrieval metric and NMI would be 1.0 whatever the embeddings",
                     "evaluate rows of two classes or more")
  num_queries, lone = metrics_lib.count_without_positive(labels, query_mask=query_mask, gallery_mask=gallery_mask)
  if lone == num_queries:
    raise InputError(f"labels {source}: none of the {num_queries} queries has a positive (another row of its "
                     "class in the gallery), so every retrieval score is 0 or undefined",
                     "check that the labels belong to these embeddings (and the masks, if any)")
  return num_queries, lone


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m dml_jax.evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--embeddings", required=True, help="float [N, D] .npy, or a .npz with named arrays")
  parser.add_argument("--labels", help="[N] integer or string labels .npy / .npz (default: from the "
                      "embeddings' .npz)")
  parser.add_argument("--query_mask", help="bool [N] .npy / .npz: the query rows (default: all rows, leave-one-out)")
  parser.add_argument("--gallery_mask", help="bool [N] .npy / .npz: the gallery rows (default: the rows outside "
                      "--query_mask); a row in both is excluded from its own ranking")
  for name in ("embeddings", "labels", "query_mask", "gallery_mask"):
    parser.add_argument(f"--{name}_key", default=name, help=f"array name of the {name} in a .npz (default {name})")
  parser.add_argument("--metrics", nargs="+", default=None,
                      help="names, space or comma separated: recall@K, precision@1, r_precision, map@r, marp, "
                      f"nmi, f1 (default: {' '.join(DEFAULT_METRICS)})")
  parser.add_argument("--json", default=None, help="also write {metric: value} to this JSON file")
  parser.add_argument("--no_positive", default="seeds", choices=NO_POSITIVE_CHOICES,
                      help="queries without a positive: 'seeds' (default) as each metric's source: recall@K, "
                      "marp and the class-size map@r count them as misses, precision@1, r_precision and map@r "
                      "leave them out; 'exclude': every metric leaves them out; 'miss': every metric counts "
                      "them as 0")
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
  parser.add_argument("--debug", action="store_true", help="show the traceback of input errors too")
  return parser.parse_args(argv)


def _json_value(value: float):
  return None if isinstance(value, float) and math.isnan(value) else value


def _treatment_lines(names: Sequence[str], lone: int, num_queries: int, args) -> list[str]:
  from dml_jax.eval import metrics as metrics_lib  # pylint: disable=import-outside-toplevel

  retrieval = [n for n in names if n not in metrics_lib.CLUSTERING_METRICS]
  if not retrieval:
    return []
  head = f"{lone} of {num_queries} queries have no positive (no other row of their class in the gallery)"
  if not lone:
    return ["every query has a positive (another row of its class in the gallery)"]
  groups: dict[str, list[str]] = {"miss": [], "exclude": []}
  for name in retrieval:
    groups[metrics_lib.no_positive_treatment(name, map_r_variant=args.map_r_variant,
                                             no_positive=args.no_positive)].append(name)
  parts = []
  if groups["miss"]:
    parts.append(f"{', '.join(groups['miss'])} count them as misses")
  if groups["exclude"]:
    parts.append(f"{', '.join(groups['exclude'])} leave them out")
  return [head, f"  {'; '.join(parts)} (--no_positive {args.no_positive})"]


def run(argv: Sequence[str] | None = None) -> dict[str, float]:
  """Parses `argv`, evaluates and prints the table; returns {metric: value}. Bad input raises InputError."""
  args = _parse_args(argv)
  # Import late: `--help` and input errors should not wait for jax.
  from dml_jax.eval import metrics as metrics_lib  # pylint: disable=import-outside-toplevel

  names = DEFAULT_METRICS if args.metrics is None else [
      part.strip() for item in args.metrics for part in item.split(",") if part.strip()]
  retrieval, _, clustering = metrics_lib.parse_metric_names(names)
  sources: dict[str, str] = {}
  embeddings, labels, query_mask, gallery_mask = load_inputs(
      args.embeddings, args.labels, args.query_mask, args.gallery_mask, sources=sources,
      keys={name: getattr(args, f"{name}_key") for name in ("embeddings", "labels", "query_mask", "gallery_mask")})
  num_queries, lone = check_labels_meaningful(labels, query_mask, gallery_mask, sources["labels"])

  retrieval_names = [n for n in names if n.lower() not in metrics_lib.CLUSTERING_METRICS]
  results: dict[str, float] = {}
  if retrieval:
    results.update(metrics_lib.retrieval_metrics(
        embeddings, labels, query_mask=query_mask, gallery_mask=gallery_mask, metrics=retrieval_names,
        recall_ks=(), map_r_variant=args.map_r_variant, marp_max_rank=args.marp_max_rank,
        distance=args.distance, backend=args.backend, chunk_size=args.chunk_size, no_positive=args.no_positive))
  if clustering:
    rows = np.ones(len(labels), bool)
    if query_mask is not None:  # cluster the evaluated rows: queries and gallery together
      rows = query_mask | (~query_mask if gallery_mask is None else gallery_mask)
    results.update(metrics_lib.clustering_metrics(
        embeddings[rows], labels[rows], num_runs=args.kmeans_runs, seed=args.seed, niter=args.kmeans_niter,
        nredo=args.kmeans_nredo, max_points_per_centroid=args.max_points_per_centroid, distance=args.distance,
        backend=args.kmeans_backend or args.backend, metrics=clustering))

  if args.json:
    try:
      with open(args.json, "w", encoding="utf-8") as file:
        json.dump({name: _json_value(value) for name, value in results.items()}, file, indent=2)
        file.write("\n")
    except OSError as error:
      if cli.environment_cause(error) is not None:  # disk full, permission: said as such by cli.run
        raise
      raise InputError(f"cannot write --json {args.json}: {error.strerror or error}") from None

  gallery = "the other rows (leave-one-out)" if query_mask is None else (
      f"{int(gallery_mask.sum())} gallery rows" if gallery_mask is not None else
      f"the {int((~query_mask).sum())} rows outside the query mask")
  num_classes = len(np.unique(labels))
  lines = [f"embeddings  {sources['embeddings']}: {embeddings.shape[0]} x {embeddings.shape[1]}, {args.distance}",
           f"labels      {sources['labels']}: {num_classes} classes",
           f"retrieval   {num_queries} queries against {gallery}"]
  lines += [f"            {line}" for line in _treatment_lines(names, lone, num_queries, args)]
  width = max([len(name) for name in results] + [6])
  lines += ["", f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
  lines += [f"{name:<{width}}  {value:.4f}" for name, value in results.items()]
  print("\n".join(lines))
  if args.json:
    print(f"wrote {args.json}", file=sys.stderr)
  return results


def main(argv: Sequence[str] | None = None) -> int:
  """The command line: the exit status (0, or 2 with one `error:` line for bad input)."""
  raw = sys.argv[1:] if argv is None else list(argv)
  return cli.run(lambda: run(argv), debug=cli.debug_requested(raw))


if __name__ == "__main__":
  sys.exit(main())
