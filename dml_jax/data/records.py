"""`Records`: one split of a dataset as (image, label, role) rows over any image store.

A store gives random access to encoded images: files on disk (raw folders), ArrayRecord shards
(prepared) or tfds array_record data sources. `Records` adds per-row labels, roles and references
(paths, or shard positions) for error messages, and decodes on `__getitem__`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from dml_jax.data import decode

ROLES = ("train", "test", "query", "gallery")


class ImageStore(Protocol):
  """Random access to encoded images; `read(i)` returns a path or the encoded bytes of image i."""

  def __len__(self) -> int:
    ...

  def read(self, i: int) -> decode.ImageSource:
    ...


class FileStore:
  """Images as files on disk (the raw folder layouts)."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)

  def __len__(self) -> int:
    return len(self.paths)

  def read(self, i: int) -> decode.ImageSource:
    return self.paths[i]


class Records(collections.abc.Sequence):
  """One split: row i is (image i of the store, labels[i], roles[i]).

  Attributes:
    labels: int64 [N], contiguous 0..C-1 within the split (re-indexed as the seeds do).
    roles: str [N], one of 'train', 'test', 'query', 'gallery'.
    paths: str [N], the file path (raw) or a shard reference (prepared, tfds) of each row, for errors.
    class_names: str [C], the dataset's own name or id of each label (folder name, class id ...).
  """

  def __init__(self, store: ImageStore, *, labels: Sequence[int], roles: Sequence[str] | str,
               paths: Sequence[str], class_names: Sequence[str] | None = None,
               store_indices: Sequence[int] | None = None):
    self._store = store
    self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = len(self.labels)
    self.roles = np.asarray([roles] * n if isinstance(roles, str) else roles, dtype=str).reshape(-1)
    self.paths = np.asarray(paths, dtype=str).reshape(-1)
    self._store_indices = (np.arange(n, dtype=np.int64) if store_indices is None
                           else np.asarray(store_indices, dtype=np.int64).reshape(-1))
    if not (len(self.roles) == len(self.paths) == len(self._store_indices) == n):
      raise ValueError(f"Records: labels {n}, roles {len(self.roles)}, paths {len(self.paths)} and "
                       f"store indices {len(self._store_indices)} must have one entry per row")
    bad_roles = sorted(set(self.roles.tolist()) - set(ROLES))
    if bad_roles:
      raise ValueError(f"Records: unknown roles {bad_roles}; expected a subset of {ROLES}")
    if class_names is None:
      class_names = [str(c) for c in range(int(self.labels.max()) + 1 if n else 0)]
    self.class_names = np.asarray(class_names, dtype=str).reshape(-1)
    if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
      raise ValueError(f"Records: labels span [{self.labels.min()}, {self.labels.max()}] but there are "
                       f"{len(self.class_names)} class names")

  @property
  def num_classes(self) -> int:
    return int(len(np.unique(self.labels)))

  def __len__(self) -> int:
    return len(self.labels)

  def open_image(self, i: int) -> Image.Image:
    """Row i's image opened lazily (header parsed, pixels not decoded): transforms draft JPEGs first."""
    return decode.open_image(self._store.read(int(self._store_indices[i])), self.paths[i])

  def read_source(self, i: int) -> decode.ImageSource:
    """Row i's path or encoded bytes, as stored."""
    return self._store.read(int(self._store_indices[i]))

  def __getitem__(self, i: int) -> dict[str, Any]:
    """Returns dict(image=uint8 [H, W, 3] RGB, label=int, role=str, index=int)."""
    if isinstance(i, slice):
      raise TypeError("Records does not slice; use records.subset(indices)")
    i = int(i)
    if i < 0:
      i += len(self)
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} out of range for {len(self)} records")
    with self.open_image(i) as img:
      image = np.asarray(decode.to_rgb(img, self.paths[i]))
    return dict(image=image, label=int(self.labels[i]), role=str(self.roles[i]), index=i)

  def subset(self, indices: Sequence[int], *, relabel: bool = False) -> Records:
    """Rows `indices` in that order; with relabel, labels become contiguous in order of sorted old label."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    labels = self.labels[indices]
    class_names = self.class_names
    if relabel:
      kept, labels = np.unique(labels, return_inverse=True)
      class_names = class_names[kept]
    return Records(self._store, labels=labels, roles=self.roles[indices], paths=self.paths[indices],
                   class_names=class_names, store_indices=self._store_indices[indices])

  def __repr__(self) -> str:
    roles = ", ".join(f"{r}={int((self.roles == r).sum())}" for r in ROLES if (self.roles == r).any())
    return f"Records({len(self)} images, {self.num_classes} classes, {roles})"


@dataclasses.dataclass
class DatasetSplits:
  """A dataset's DML splits.

  Attributes:
    name: dataset name ('cub200', 'cars196', 'sop', 'inshop', 'inaturalist', 'vehicleid', 'digits', 'folder').
    train: the training classes; labels 0..num_train_classes-1.
    eval: the test classes (In-Shop: query + gallery with roles 'query' / 'gallery'; VehicleID: the
      chosen test list). Labels are contiguous within eval, unrelated to the training labels.
    layout: which on-disk layout (or source) was read, for logs.
    root: the dataset folder that was read.
    extra: further evaluation splits (VehicleID: every test list found), by name.
    split_manifest: for datasets split at load time (`folder`), the JSON-able description of the class split
      that reproduces it when passed back (readers/folder.py); None for the fixed published splits.
  """

  name: str
  train: Records
  eval: Records
  layout: str = ""
  root: str = ""
  extra: dict[str, Records] = dataclasses.field(default_factory=dict)
  split_manifest: dict[str, Any] | None = None

  @property
  def num_train_classes(self) -> int:
    return self.train.num_classes


def contiguous_labels(keys: Sequence[Any], *, order: str = "sorted") -> tuple[np.ndarray, list[Any]]:
  """Maps class keys to 0..C-1; order 'sorted' (by key) or 'first' (first appearance).

  Returns (labels int64 [N], class keys [C] in label order).
  """
  if order == "sorted":
    classes = sorted(set(keys))
  elif order == "first":
    classes = list(dict.fromkeys(keys))
  else:
    raise ValueError(f"order must be 'sorted' or 'first', got {order!r}")
  index = {c: i for i, c in enumerate(classes)}
  return np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys)), classes
