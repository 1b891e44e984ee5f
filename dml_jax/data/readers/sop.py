"""Stanford Online Products: Ebay_train.txt (11,318 classes) / Ebay_test.txt (11,316 classes)."""

from __future__ import annotations

import os

from dml_jax.data.errors import DatasetLayoutError
from dml_jax.data.readers import common
from dml_jax.data.records import DatasetSplits, FileStore, Records, contiguous_labels

NAME = "sop"
DIR_NAMES = ("sop", "online_products", "Stanford_Online_Products", "Standford_Online_Products",
             "stanford_online_products", "SOP")
LAYOUTS = (
    "sop/Info_Files/Ebay_{train,test}.txt + sop/images/<super>_final/<image>.JPG   (VPTSP)",
    "online_products/Info_Files/Ebay_{train,test}.txt + online_products/images/...   (DADA)",
    "Stanford_Online_Products/Ebay_{train,test}.txt + Stanford_Online_Products/<super>_final/<image>.JPG   "
    "(official zip; Proxy-Anchor, DFML, D&C)",
)
PUBLISHED = {
    "train": common.Published(59551, 11318),
    "eval": common.Published(60502, 11316),
}
_INFO_FILES = "Info_Files/Ebay_*.txt + images/"
_FLAT = "Ebay_*.txt + <super>_final/"


def detect(folder: str) -> str | None:
  if all(os.path.isfile(os.path.join(folder, "Info_Files", f"Ebay_{s}.txt")) for s in ("train", "test")):
    return _INFO_FILES
  if all(os.path.isfile(os.path.join(folder, f"Ebay_{s}.txt")) for s in ("train", "test")):
    return _FLAT
  return None


def parse_ebay_file(path: str) -> tuple[list[int], list[str]]:
  """Ebay_{train,test}.txt: header 'image_id class_id super_class_id path', space separated.

  Returns (class ids, relative image paths) in file order.
  """
  lines = [line for line in common.read_lines(path) if line.strip()]
  if not lines or lines[0].split()[:4] != ["image_id", "class_id", "super_class_id", "path"]:
    raise DatasetLayoutError(NAME, f"{path}: expected the header 'image_id class_id super_class_id path', "
                             f"got {lines[0] if lines else '(empty file)'!r}")
  class_ids, rel_paths = [], []
  for n, line in enumerate(lines[1:], start=2):
    parts = line.split()
    if len(parts) != 4 or not parts[1].isdigit():
      raise DatasetLayoutError(NAME, f"{path} line {n}: expected 'image_id class_id super_class_id path', "
                               f"got {line!r}")
    class_ids.append(int(parts[1]))
    rel_paths.append(parts[3])
  return class_ids, rel_paths


def read(folder: str, layout: str, *, skip_missing: bool = False) -> DatasetSplits:
  info_dir = os.path.join(folder, "Info_Files") if layout == _INFO_FILES else folder
  # Confusezius' loaders join the listed path to images/; the official zip keeps it beside the lists.
  bases = [os.path.join(folder, "images"), folder] if layout == _INFO_FILES else [folder,
                                                                                   os.path.join(folder, "images")]
  splits, ids, lists = [], [], []
  for split, role in (("train", "train"), ("test", "test")):
    list_path = os.path.join(info_dir, f"Ebay_{split}.txt")
    class_ids, rel_paths = parse_ebay_file(list_path)
    if not rel_paths:
      raise DatasetLayoutError(NAME, f"{list_path} lists no images")
    ids.append(class_ids)
    lists.append(list_path)
    if len(ids) == 2:  # before the (slow) file checks
      common.check_disjoint(NAME, ids[0], ids[1], lists[0], lists[1])
    base = common.resolve_base(NAME, rel_paths[0], bases, list_path)
    paths = [os.path.join(base, p) for p in rel_paths]
    keep = common.existing_mask(NAME, paths, list_path, skip_missing=skip_missing)
    paths = [p for p, k in zip(paths, keep) if k]
    class_ids = [c for c, k in zip(class_ids, keep) if k]
    labels, classes = contiguous_labels(class_ids, order="sorted")
    splits.append(Records(FileStore(paths), labels=labels, roles=role, paths=paths,
                          class_names=[str(c) for c in classes]))
  return DatasetSplits(NAME, splits[0], splits[1], layout=layout, root=folder)
