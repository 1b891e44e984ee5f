"""In-Shop Clothes Retrieval: train / query / gallery rows of list_eval_partition.txt."""

from __future__ import annotations

import os

import numpy as np

from dml_jax.data.errors import DatasetLayoutError
from dml_jax.data.readers import common
from dml_jax.data.records import DatasetSplits, FileStore, Records, contiguous_labels

NAME = "inshop"
DIR_NAMES = ("inshop", "Inshop", "InShop", "in-shop", "Inshop_Clothes", "In-shop Clothes Retrieval Benchmark",
             "deepfashion_inshop", "DeepFashion_InShop")
LAYOUTS = (
    "inshop/list_eval_partition.txt + inshop/img/<...>.jpg   (VPTSP / DADA)",
    "Inshop_Clothes/Eval/list_eval_partition.txt + Inshop_Clothes/Img/img/<...>.jpg   (official archive; "
    "Proxy-Anchor)",
)
PUBLISHED = {
    "train": common.Published(25882, 3997),
    "query": common.Published(14218, 3985),
    "gallery": common.Published(12612, 3985),
    "eval": common.Published(26830, 3985, "query + gallery"),
}
_LIST_NAMES = ("list_eval_partition.txt", "Eval/list_eval_partition.txt", "Anno/list_eval_partition.txt")
_STATUSES = ("train", "query", "gallery")


def detect(folder: str) -> str | None:
  found = common.find_file(folder, _LIST_NAMES)
  return None if found is None else os.path.relpath(found, folder)


def parse_partition(path: str) -> tuple[list[str], list[int], list[str]]:
  """list_eval_partition.txt: line 1 the row count, line 2 the header, then 'image_name item_id status'.

  Returns (image names, numeric item ids, statuses) in file order.
  """
  lines = [line for line in common.read_lines(path) if line.strip()]
  if len(lines) < 2 or not lines[0].strip().isdigit():
    raise DatasetLayoutError(NAME, f"{path}: line 1 must be the number of rows, line 2 the header "
                             "'image_name item_id evaluation_status'")
  names, items, statuses = [], [], []
  for n, line in enumerate(lines[2:], start=3):
    parts = line.split()
    if len(parts) != 3 or parts[2] not in _STATUSES:
      raise DatasetLayoutError(NAME, f"{path} line {n}: expected 'image_name item_id train|query|gallery', "
                               f"got {line!r}")
    digits = parts[1].rsplit("_", 1)[-1]
    if not digits.isdigit():
      raise DatasetLayoutError(NAME, f"{path} line {n}: item id {parts[1]!r} does not end in a number")
    names.append(parts[0])
    items.append(int(digits))
    statuses.append(parts[2])
  if int(lines[0]) != len(names):
    raise DatasetLayoutError(NAME, f"{path}: line 1 announces {int(lines[0])} rows, the file has {len(names)}")
  return names, items, statuses


def read(folder: str, layout: str, *, skip_missing: bool = False) -> DatasetSplits:
  list_path = os.path.join(folder, layout)
  names, items, statuses = parse_partition(list_path)
  if not names:
    raise DatasetLayoutError(NAME, f"{list_path} lists no images")
  base = common.resolve_base(NAME, names[0], [folder, os.path.join(folder, "Img")], list_path)
  paths = [os.path.join(base, n) for n in names]
  keep = common.existing_mask(NAME, paths, list_path, skip_missing=skip_missing)
  items_arr, status_arr = np.asarray(items), np.asarray(statuses)
  common.check_disjoint(NAME, items_arr[status_arr == "train"].tolist(), items_arr[status_arr != "train"].tolist(),
                        f"{list_path} train rows", "its query / gallery rows")

  train_rows = np.flatnonzero(keep & (status_arr == "train"))
  tr_labels, tr_classes = contiguous_labels(items_arr[train_rows].tolist(), order="sorted")
  tr_paths = [paths[i] for i in train_rows]
  train = Records(FileStore(tr_paths), labels=tr_labels, roles="train", paths=tr_paths,
                  class_names=[f"id_{c:08d}" for c in tr_classes])

  # Query and gallery share one label map over the union of their item ids (docs/data.md).
  eval_rows = np.flatnonzero(keep & (status_arr != "train"))
  query_ids = set(items_arr[eval_rows][status_arr[eval_rows] == "query"].tolist())
  gallery_ids = set(items_arr[eval_rows][status_arr[eval_rows] == "gallery"].tolist())
  if query_ids != gallery_ids:
    common.log.warning("dataset %r: %d query item ids have no gallery image and %d gallery ids no query", NAME,
                       len(query_ids - gallery_ids), len(gallery_ids - query_ids))
  ev_labels, ev_classes = contiguous_labels(items_arr[eval_rows].tolist(), order="sorted")
  ev_paths = [paths[i] for i in eval_rows]
  evaluation = Records(FileStore(ev_paths), labels=ev_labels, roles=status_arr[eval_rows].tolist(),
                       paths=ev_paths, class_names=[f"id_{c:08d}" for c in ev_classes])
  return DatasetSplits(NAME, train, evaluation, layout=layout, root=folder)
