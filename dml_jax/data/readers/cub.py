"""CUB-200-2011: classes 1-100 train, 101-200 test, by the number of their folder (NNN.Name), not by position.

(By class, not the official image-level train_test_split.txt.) A missing class folder is an error naming it.
"""

from __future__ import annotations

import os

from dml_jax.data.readers import common
from dml_jax.data.records import DatasetSplits

NAME = "cub200"
DIR_NAMES = ("cub200", "CUB_200_2011", "CUB_200_2011/CUB_200_2011", "cub-200-2011", "cub_200_2011", "CUB200",
             "cub")
LAYOUTS = (
    "cub200/images/<NNN.Class_Name>/<image>.jpg   (VPTSP / DADA, Confusezius tarball)",
    "CUB_200_2011/images/<NNN.Class_Name>/<image>.jpg   (official CUB_200_2011.tgz; Proxy-Anchor, DFML)",
    "cub-200-2011/images/<NNN.Class_Name>/<image>.jpg   (Divide & Conquer)",
)
NUM_CLASSES = 200
NUM_TRAIN = 100
RULE = common.ClassRule(identify=common.int_prefix_id, num_classes=NUM_CLASSES, num_train=NUM_TRAIN,
                        folder_pattern=lambda c: f"images/{c:03d}.*", naming="'NNN.Name' (001 to 200)",
                        sort="int_prefix")
PUBLISHED = {
    "train": common.Published(5864, 100),
    "eval": common.Published(5924, 100),
}


def detect(folder: str) -> str | None:
  images = os.path.join(folder, "images")
  if os.path.isdir(images) and any(e.is_dir() for e in os.scandir(images)):
    return "images/<class>/<image>"
  return None


def read(folder: str, layout: str, *, skip_missing: bool = False) -> DatasetSplits:
  del skip_missing  # files are listed from disk
  return common.read_class_folders(NAME, folder, layout, RULE)
