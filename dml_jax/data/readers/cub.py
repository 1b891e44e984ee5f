"""CUB-200-2011: class folders 1-100 train, 101-200 test (by class, not the official image split)."""

from __future__ import annotations

import os

from dml_jax.data.errors import DatasetLayoutError
from dml_jax.data.readers import common
from dml_jax.data.records import DatasetSplits, FileStore, Records

NAME = "cub200"
DIR_NAMES = ("cub200", "CUB_200_2011", "CUB_200_2011/CUB_200_2011", "cub-200-2011", "cub_200_2011", "CUB200",
             "cub")
LAYOUTS = (
    "cub200/images/<NNN.Class_Name>/<image>.jpg   (VPTSP / DADA, Confusezius tarball)",
    "CUB_200_2011/images/<NNN.Class_Name>/<image>.jpg   (official CUB_200_2011.tgz; Proxy-Anchor, DFML)",
    "cub-200-2011/images/<NNN.Class_Name>/<image>.jpg   (Divide & Conquer)",
)
NUM_CLASSES = 200
PUBLISHED = {
    "train": common.Published(5864, 100),
    "eval": common.Published(5924, 100),
}


def detect(folder: str) -> str | None:
  images = os.path.join(folder, "images")
  if os.path.isdir(images) and any(e.is_dir() for e in os.scandir(images)):
    return "images/<class>/<image>"
  return None


def read_class_folders(dataset: str, folder: str, layout: str, *, num_classes: int) -> DatasetSplits:
  """Class folders sorted by their integer prefix; the first half of the classes train, the rest test.

  Labels are the class position within each split (0..), files within a class sorted by name, as the
  seeds read them (`._*` metadata files skipped).
  """
  images = os.path.join(folder, "images")
  files, names = common.folder_per_class(dataset, images, num_train_classes=None, sort="int_prefix")
  if len(names) != num_classes:
    common.log.warning("dataset %r: %s has %d class folders, the published dataset %d; splitting the first "
                       "half for training", dataset, images, len(names), num_classes)
  if len(names) < 2:
    raise DatasetLayoutError(dataset, f"{images} needs at least 2 class folders, found {len(names)}")
  (tr_paths, tr_labels, tr_names), (te_paths, te_labels, te_names) = common.split_folder_classes(
      files, names, len(names) // 2)
  train = Records(FileStore(tr_paths), labels=tr_labels, roles="train", paths=tr_paths, class_names=tr_names)
  test = Records(FileStore(te_paths), labels=te_labels, roles="test", paths=te_paths, class_names=te_names)
  return DatasetSplits(dataset, train, test, layout=layout, root=folder)


def read(folder: str, layout: str, *, skip_missing: bool = False) -> DatasetSplits:
  del skip_missing  # files are listed from disk
  return read_class_folders(NAME, folder, layout, num_classes=NUM_CLASSES)
