"""Embedding extraction over all devices of all processes, with a progress bar showing images/s.

With several processes (jax.distributed), every process feeds its rows of each global batch (the loader
splits batches by process) and receives the embeddings, labels and indices of the WHOLE batch, in global
order: metrics are then computed identically on every process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_BATCH_KEYS = ("image", "label", "index", "valid")


def _check_batch(batch: dict, number: int) -> int:
  missing = [key for key in _BATCH_KEYS if key not in batch]
  if missing:
    raise KeyError(f"evaluation batch {number} lacks keys {missing}; expected {{'image': float32 [B,S,S,3], "
                   f"'label': int [B], 'index': int [B], 'valid': bool [B]}}, got keys {sorted(batch)}")
  size = np.shape(batch["image"])[0]
  for key in ("label", "index", "valid"):
    if np.shape(batch[key]) != (size,):
      raise ValueError(f"evaluation batch {number}: '{key}' has shape {np.shape(batch[key])}, expected ({size},) "
                       f"to match 'image' {np.shape(batch['image'])}")
  return size


def embed_dataset(embed_fn: Callable[[jax.Array], jax.Array], loader: Iterable[dict], *,
                  mesh: Mesh | None = None, desc: str = "embed", progress: bool = True
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Embeds every valid row the loader yields.

  Args:
    embed_fn: jitted function images float32 [B, S, S, 3] -> embeddings [B, D] (parameters closed over).
    loader: yields {'image': float32 [B,S,S,3], 'label': int [B], 'index': int [B], 'valid': bool [B]}
      with a fixed B; the last batch is padded and its padding rows have valid=False.
    mesh: a mesh with a 'data' axis (axis type Auto). Batches are split over it when B is divisible
      by its size; otherwise (and without a mesh) they go to the default device. Required with several
      processes (each process's loader yields its rows of every global batch).
    desc: progress-bar label.
    progress: show the progress bar (the trainer passes its `log.progress`).

  Returns:
    (embeddings float32 [N, D], labels int64 [N], indices int64 [N]) of the valid rows, loader order.
  """
  multi_process = jax.process_count() > 1
  if multi_process and mesh is None:
    raise ValueError("embed_dataset with several processes needs the global mesh (mesh=...)")
  sharding = None
  if mesh is not None:
    if "data" not in mesh.axis_names:
      raise ValueError(f"mesh must have a 'data' axis, got axes {mesh.axis_names}")
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    num_shards = mesh.shape["data"]

  try:
    total = len(loader)  # type: ignore[arg-type]
  except TypeError:
    total = None
  embeddings, labels, indices = [], [], []
  pending = None  # (device embeddings, valid, labels, indices) of the previous batch
  num_images, start = 0, time.perf_counter()

  def collect(entry):
    device_embeddings, valid, batch_labels, batch_indices = entry
    if multi_process:  # the whole global batch on every process, in process (= global row) order
      host = np.asarray(multihost_utils.process_allgather(device_embeddings, tiled=True))
      valid, batch_labels, batch_indices = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                                            for x in (valid, batch_labels, batch_indices))
    else:
      host = np.asarray(device_embeddings)
    if host.ndim != 2 or host.shape[0] != valid.shape[0]:
      raise ValueError(f"embed_fn must return [B, D] = [{valid.shape[0]}, D] embeddings, got shape {host.shape}")
    embeddings.append(host[valid].astype(np.float32))
    labels.append(batch_labels[valid])
    indices.append(batch_indices[valid])

  with tqdm.tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, disable=not progress) as bar:
    for number, batch in enumerate(loader):
      size = _check_batch(batch, number)
      images = batch["image"]
      if multi_process:
        images = jax.make_array_from_process_local_data(sharding, np.asarray(images))
      elif sharding is not None and size % num_shards == 0:
        images = jax.device_put(images, sharding)
      else:
        images = jax.device_put(images)
      # Dispatch this batch before pulling the previous one to the host, so the device never idles
      # on the transfer.
      entry = (embed_fn(images), np.asarray(batch["valid"], bool), np.asarray(batch["label"], np.int64),
               np.asarray(batch["index"], np.int64))
      if pending is not None:
        collect(pending)
      pending = entry
      num_images += int(entry[1].sum()) * jax.process_count()
      bar.update(1)
      bar.set_postfix(images_per_s=f"{num_images / max(time.perf_counter() - start, 1e-9):.1f}")
    if pending is not None:
      collect(pending)

  if not embeddings:
    raise ValueError("the loader yielded no batches")
  return np.concatenate(embeddings), np.concatenate(labels), np.concatenate(indices)
