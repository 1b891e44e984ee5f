"""Exact k-nearest-neighbour search: chunked JAX (matmul + top-k) and FAISS, behind one interface.

Both backends are exact (brute force, fp32). Memory is bounded by the chunk sizes: the JAX backend
holds one [chunk_size, gallery_chunk_size] score block at a time and merges it into a running top-k,
FAISS searches `chunk_size` queries per call. Nothing [Q, G] is ever materialised.

Conventions (shared by both backends):
  metric='cosine'         rows are L2-normalised (x / max(|x|, 1e-12), as torch F.normalize), then
                          ranked by inner product; returns similarities, largest first. For unit
                          vectors |a-b|^2 = 2 - 2 cos, so this ranks exactly as the papers' faiss
                          IndexFlatL2 on normalised embeddings.
  metric='euclidean'      returns squared L2 distances (as faiss IndexFlatL2), smallest first.
  metric='inner_product'  raw dot products, largest first.
  Ties: the JAX backend orders by (score, gallery index), lower index first; FAISS does not define
  a tie order. On tie-free data both return the same neighbours.
  Self-exclusion: the JAX backend masks the excluded gallery item before the top-k. FAISS searches
  k + 1 and removes the excluded index; when it is not among the k + 1 (exact duplicates at distance
  0), the last neighbour is dropped instead, the rule of D&C `faissext.find_nearest_neighbors` and
  PML `inference.return_results`. Both give the same list unless duplicates tie with the query.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dml_jax.eval import faiss_check
from dml_jax.losses.ops import l2_normalize

Metric = Literal["cosine", "euclidean", "inner_product"]
Backend = Literal["auto", "jax", "faiss"]
METRICS = ("cosine", "euclidean", "inner_product")
BACKENDS = ("auto", "jax", "faiss")

# FAISS GPU k-selection supports k <= 2048 (faiss/gpu/utils/DeviceDefs.cuh); PML falls back to CPU too.
_FAISS_GPU_MAX_K = 2048


def resolve_backend(backend: str) -> str:
  """'auto' -> 'faiss' or 'jax'.

  On a GPU/TPU JAX platform: FAISS only when faiss sees GPUs (faiss-gpu), else JAX. On CPU: FAISS
  when installed, else JAX.
  """
  if backend not in BACKENDS:
    raise ValueError(f"unknown kNN backend {backend!r}; expected one of {BACKENDS}")
  if backend != "auto":
    return backend
  if not faiss_check.faiss_available():
    return "jax"
  if jax.default_backend() == "cpu":
    return "faiss"
  faiss = faiss_check.import_faiss()
  return "faiss" if faiss.get_num_gpus() > 0 else "jax"


def _validate(queries: np.ndarray, gallery: np.ndarray, k: int, metric: str,
              exclude_indices: np.ndarray | None) -> None:
  if metric not in METRICS:
    raise ValueError(f"unknown kNN metric {metric!r}; expected one of {METRICS}")
  for name, array in (("queries", queries), ("gallery", gallery)):
    if array.ndim != 2:
      raise ValueError(f"{name} must be a 2-D [N, D] array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
      raise ValueError(f"{name} contain NaN or Inf values ({int((~np.isfinite(array)).any(1).sum())} rows)")
  if queries.shape[1] != gallery.shape[1]:
    raise ValueError(f"queries have dimension {queries.shape[1]} but gallery has {gallery.shape[1]}")
  if gallery.shape[0] == 0:
    raise ValueError("the gallery is empty")
  available = gallery.shape[0]
  if exclude_indices is not None:
    if exclude_indices.shape != (queries.shape[0],):
      raise ValueError(f"exclude_indices must have shape [{queries.shape[0]}], got {exclude_indices.shape}")
    if np.any(exclude_indices >= gallery.shape[0]) or np.any(exclude_indices < -1):
      raise ValueError("exclude_indices must be gallery indices in [0, G) or -1 (nothing excluded)")
    if np.any(exclude_indices >= 0):
      available -= 1
  if not 1 <= k <= available:
    raise ValueError(f"k={k} must be in [1, {available}] (gallery size {gallery.shape[0]}"
                     f"{', one item excluded per query' if available < gallery.shape[0] else ''})")


def knn_chunks(queries: np.ndarray, gallery: np.ndarray, k: int, *, backend: Backend = "auto",
               metric: Metric = "cosine", exclude_self: bool = False,
               exclude_indices: np.ndarray | None = None, chunk_size: int = 1024,
               gallery_chunk_size: int = 32768) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """Streams the k nearest gallery items of consecutive query chunks.

  Args:
    queries: float32 [Q, D].
    gallery: float32 [G, D].
    k: neighbours per query, 1 <= k <= G (G - 1 when an item is excluded).
    backend: 'auto' | 'jax' | 'faiss' (see `resolve_backend`).
    metric: 'cosine' | 'euclidean' | 'inner_product' (see module docstring).
    exclude_self: queries are the gallery (Q == G, same order); query i never retrieves item i.
    exclude_indices: int [Q], the gallery index each query must not retrieve, -1 for none
      (generalises exclude_self to queries that are a subset of the gallery).
    chunk_size: queries per chunk.
    gallery_chunk_size: gallery items per score block (JAX backend).

  Yields:
    (start, scores float32 [c, k], indices int64 [c, k]) for query rows start .. start + c.
  """
  same_array = queries is gallery  # normalise / copy a shared array once
  queries = np.asarray(queries, dtype=np.float32)
  gallery = queries if same_array else np.asarray(gallery, dtype=np.float32)
  if exclude_self:
    if exclude_indices is not None:
      raise ValueError("pass either exclude_self or exclude_indices, not both")
    if queries.shape != gallery.shape:
      raise ValueError(f"exclude_self needs queries == gallery, got shapes {queries.shape} and {gallery.shape}")
    exclude_indices = np.arange(queries.shape[0], dtype=np.int64)
  if exclude_indices is not None:
    exclude_indices = np.asarray(exclude_indices, dtype=np.int64)
  _validate(queries, gallery, k, metric, exclude_indices)
  if chunk_size < 1 or gallery_chunk_size < 1:
    raise ValueError("chunk sizes must be positive")
  if metric == "cosine":
    queries = l2_normalize(np.asarray(queries), clamp_norm=True)
    gallery = queries if same_array else l2_normalize(np.asarray(gallery), clamp_norm=True)
  if exclude_indices is None:
    exclude_indices = np.full(queries.shape[0], -1, dtype=np.int64)

  backend = resolve_backend(backend)
  if backend == "jax":
    yield from _jax_chunks(queries, gallery, k, metric, exclude_indices, chunk_size, gallery_chunk_size)
  else:
    yield from _faiss_chunks(queries, gallery, k, metric, exclude_indices, chunk_size)


def knn(queries: np.ndarray, gallery: np.ndarray, k: int, *, backend: Backend = "auto",
        metric: Metric = "cosine", exclude_self: bool = False, exclude_indices: np.ndarray | None = None,
        chunk_size: int = 1024, gallery_chunk_size: int = 32768) -> tuple[np.ndarray, np.ndarray]:
  """The k nearest gallery items of every query (all chunks of `knn_chunks` concatenated).

  Returns:
    (scores float32 [Q, k], indices int64 [Q, k]): squared L2 distances ascending for 'euclidean',
    similarities descending for 'cosine' / 'inner_product'.
  """
  scores, indices = [], []
  for _, chunk_scores, chunk_indices in knn_chunks(
      queries, gallery, k, backend=backend, metric=metric, exclude_self=exclude_self,
      exclude_indices=exclude_indices, chunk_size=chunk_size, gallery_chunk_size=gallery_chunk_size):
    scores.append(chunk_scores)
    indices.append(chunk_indices)
  return np.concatenate(scores), np.concatenate(indices)


# ----------------------------------------------------------------------------------------------- JAX


@functools.partial(jax.jit, static_argnames=("k", "euclidean"))
def _search_blocks(queries: jax.Array, exclude: jax.Array, gallery_blocks: jax.Array,
                   gallery_sqnorms: jax.Array, num_gallery: jax.Array, *, k: int,
                   euclidean: bool) -> tuple[jax.Array, jax.Array]:
  """Top-k over gallery blocks for one query chunk.

  Args:
    queries: float32 [c, D]; exclude: int32 [c] (gallery index to skip, -1 none);
    gallery_blocks: float32 [B, g, D] (zero-padded past num_gallery); gallery_sqnorms: float32 [B, g].
  Returns:
    (scores float32 [c, k], indices int32 [c, k]); scores are negated squared distances if euclidean.
  """
  num_blocks, block_size, _ = gallery_blocks.shape
  query_sqnorms = jnp.sum(queries * queries, axis=1)

  def merge_block(carry, block_inputs):
    best_scores, best_indices = carry
    block, block_sqnorms, offset = block_inputs
    # fp32 at full precision: TF32/bf16 matmuls (GPU defaults) reorder near-ties.
    scores = jnp.matmul(queries, block.T, precision=lax.Precision.HIGHEST)
    if euclidean:
      scores = -(query_sqnorms[:, None] - 2.0 * scores + block_sqnorms[None, :])
    indices = offset + jnp.arange(block_size, dtype=jnp.int32)
    invalid = (indices[None, :] >= num_gallery) | (indices[None, :] == exclude[:, None])
    scores = jnp.where(invalid, -jnp.inf, scores)
    block_scores, block_positions = lax.top_k(scores, min(k, block_size))
    # The running list holds lower gallery indices than this block and comes first, and lax.top_k
    # keeps the lower position on ties: the result is ordered by (score, gallery index).
    candidates = jnp.concatenate([best_scores, block_scores], axis=1)
    candidate_indices = jnp.concatenate([best_indices, offset + block_positions.astype(jnp.int32)], axis=1)
    top_scores, positions = lax.top_k(candidates, k)
    return (top_scores, jnp.take_along_axis(candidate_indices, positions, axis=1)), None

  init = (jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32),
          jnp.full((queries.shape[0], k), -1, jnp.int32))
  offsets = jnp.arange(num_blocks, dtype=jnp.int32) * block_size
  (scores, indices), _ = lax.scan(merge_block, init, (gallery_blocks, gallery_sqnorms, offsets))
  return (-scores if euclidean else scores), indices


def _jax_chunks(queries, gallery, k, metric, exclude_indices, chunk_size, gallery_chunk_size):
  num_queries, num_gallery = queries.shape[0], gallery.shape[0]
  num_blocks = math.ceil(num_gallery / gallery_chunk_size)
  # Equal blocks (rounded to 8 rows) waste less padding than fixed-size ones.
  block_size = -(-math.ceil(num_gallery / num_blocks) // 8) * 8
  padded = np.zeros((num_blocks * block_size, gallery.shape[1]), np.float32)
  padded[:num_gallery] = gallery
  gallery_blocks = jnp.asarray(padded.reshape(num_blocks, block_size, -1))
  del padded
  gallery_sqnorms = jnp.sum(gallery_blocks * gallery_blocks, axis=2)
  euclidean = metric == "euclidean"

  chunk = min(chunk_size, num_queries)
  for start in range(0, num_queries, chunk):
    stop = min(start + chunk, num_queries)
    query_chunk = np.zeros((chunk, queries.shape[1]), np.float32)
    query_chunk[:stop - start] = queries[start:stop]
    exclude_chunk = np.full(chunk, -1, np.int32)
    exclude_chunk[:stop - start] = exclude_indices[start:stop]
    scores, indices = _search_blocks(jnp.asarray(query_chunk), jnp.asarray(exclude_chunk), gallery_blocks,
                                     gallery_sqnorms, jnp.int32(num_gallery), k=k, euclidean=euclidean)
    yield (start, np.asarray(scores)[:stop - start],
           np.asarray(indices)[:stop - start].astype(np.int64))


# --------------------------------------------------------------------------------------------- FAISS


def _faiss_index(faiss, dim: int, metric: str, search_k: int):
  index = faiss.IndexFlatL2(dim) if metric == "euclidean" else faiss.IndexFlatIP(dim)
  if faiss.get_num_gpus() > 0 and search_k <= _FAISS_GPU_MAX_K:
    index = faiss.index_cpu_to_all_gpus(index)
  return index


_FAISS_MAX_CHUNK = 65536  # queries per FAISS call at most
_FAISS_RESULT_ENTRIES = 1 << 23  # (score, index) pairs per call: 8.4 M x 12 bytes = 100 MB


def _faiss_chunks(queries, gallery, k, metric, exclude_indices, chunk_size):
  faiss = faiss_check.import_faiss()
  any_excluded = bool(np.any(exclude_indices >= 0))
  search_k = k + int(any_excluded)
  index = _faiss_index(faiss, gallery.shape[1], metric, search_k)
  index.add(np.ascontiguousarray(gallery))
  # FAISS parallelises a search over its queries and multiplies them in blocks of 4096, so calls of ~1000 queries
  # leave cores idle (measured: 2x slower at k = 13 on 10,000 x 512). Larger calls, kept near 100 MB of results.
  chunk_size = max(chunk_size, min(_FAISS_MAX_CHUNK, _FAISS_RESULT_ENTRIES // search_k))
  for start in range(0, queries.shape[0], chunk_size):
    stop = min(start + chunk_size, queries.shape[0])
    scores, indices = index.search(np.ascontiguousarray(queries[start:stop]), search_k)
    if any_excluded:
      drop = indices == exclude_indices[start:stop, None]
      # Rows whose excluded item is not in the list (or that exclude nothing) drop their last entry.
      drop[~drop.any(axis=1), -1] = True
      keep = ~drop
      scores = scores[keep].reshape(stop - start, k)
      indices = indices[keep].reshape(stop - start, k)
    yield start, scores.astype(np.float32), indices.astype(np.int64)
