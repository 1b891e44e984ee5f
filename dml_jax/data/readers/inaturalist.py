"""iNaturalist 2018 with the split lists of Brown et al. (Smooth-AP): Inaturalist_{train,test}_set1.txt."""

from __future__ import annotations

import os

from dml_jax.data.errors import DatasetLayoutError
from dml_jax.data.readers import common
from dml_jax.data.records import DatasetSplits, FileStore, Records, contiguous_labels

NAME = "inaturalist"
DIR_NAMES = ("inaturalist", "iNaturalist", "inat", "inaturalist2018", "iNat2018", "inat2018")
LAYOUTS = (
    "inaturalist/Inaturalist_{train,test}_set1.txt + inaturalist/train_val2018/<Kingdom>/<id>/<hash>.jpg   "
    "(VPTSP)",
    "inaturalist/Inat_dataset_splits/Inaturalist_{train,test}_set1.txt + inaturalist/train_val2018/...   "
    "(Smooth-AP zip)",
)
PUBLISHED = {
    "train": common.Published(325846, 5690, "class count as reported, not re-derived"),
    "eval": common.Published(136093, 2452, "class count as reported, not re-derived"),
}
_LIST_DIRS = ("", "Inat_dataset_splits")


def detect(folder: str) -> str | None:
  for d in _LIST_DIRS:
    if all(os.path.isfile(os.path.join(folder, d, f"Inaturalist_{s}_set1.txt")) for s in ("train", "test")):
      return os.path.join(d, "Inaturalist_*_set1.txt") if d else "Inaturalist_*_set1.txt"
  return None


def class_key(rel_path: str) -> str:
  """'train_val2018/Plantae/7477/3b6a....jpg' -> 'Plantae/7477' (the 3rd- and 2nd-to-last components)."""
  parts = rel_path.replace("\\", "/").split("/")
  if len(parts) < 3:
    raise ValueError(rel_path)
  return f"{parts[-3]}/{parts[-2]}"


def read_split_list(path: str) -> tuple[list[str], list[str]]:
  """One relative image path per line -> (paths, class keys)."""
  rel_paths = [line.strip() for line in common.read_lines(path) if line.strip()]
  keys = []
  for n, p in enumerate(rel_paths, start=1):
    try:
      keys.append(class_key(p))
    except ValueError:
      raise DatasetLayoutError(NAME, f"{path} line {n}: expected '<...>/<Kingdom>/<class id>/<file>', "
                               f"got {p!r}") from None
  return rel_paths, keys


def list_path(folder: str, layout: str, split: str) -> str:
  return os.path.join(folder, layout.replace("*", split))


def read(folder: str, layout: str, *, skip_missing: bool = False) -> DatasetSplits:
  splits, all_keys, paths_read = [], [], []
  for split, role in (("train", "train"), ("test", "test")):
    path = list_path(folder, layout, split)
    rel_paths, keys = read_split_list(path)
    all_keys.append(keys)
    paths_read.append(path)
    if len(all_keys) == 2:
      common.check_disjoint(NAME, all_keys[0], all_keys[1], paths_read[0], paths_read[1])
    if not rel_paths:
      raise DatasetLayoutError(NAME, f"{path} lists no images")
    base = common.resolve_base(NAME, rel_paths[0], [folder, os.path.dirname(path),
                                                    os.path.dirname(os.path.dirname(path))], path)
    paths = [os.path.join(base, p) for p in rel_paths]
    keep = common.existing_mask(NAME, paths, path, skip_missing=skip_missing)
    paths = [p for p, k in zip(paths, keep) if k]
    keys = [c for c, k in zip(keys, keep) if k]
    # VPTSP numbers the classes of each split in order of first appearance in its list.
    labels, classes = contiguous_labels(keys, order="first")
    splits.append(Records(FileStore(paths), labels=labels, roles=role, paths=paths, class_names=classes))
  return DatasetSplits(NAME, splits[0], splits[1], layout=layout, root=folder)
