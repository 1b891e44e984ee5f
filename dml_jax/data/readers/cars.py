"""Cars196: official class ids 1-98 train, 99-196 test, from class folders or from cars_annos.mat.

Folders are mapped to their class id by name (cars_classes.NAMES, the devkit's class names), annotations carry
the id; either way the split is by id, never by position, and a missing class is an error naming it.
"""

from __future__ import annotations

import os

import numpy as np

from dml_jax.data.errors import DatasetLayoutError
from dml_jax.data.readers import cars_classes, common
from dml_jax.data.records import DatasetSplits, FileStore, Records

NAME = "cars196"
DIR_NAMES = ("cars196", "CARS196", "Cars196", "cars", "stanford_cars", "StanfordCars")
LAYOUTS = (
    "cars196/images/<Make Model Year>/<image>.jpg   (VPTSP / DADA, Confusezius tarball; classes in Python "
    "string order)",
    "cars196/car_ims/<NNNNNN>.jpg + cars196/cars_annos.mat   (official all-images tar; Proxy-Anchor, DFML, D&C)",
)
NUM_CLASSES = 196
NUM_TRAIN = 98


def folder_class_id(name: str) -> int | None:
  """A class folder's official id: by its class name ('Acura RL Sedan 2012' -> 2), or a numeric 'NNN' prefix."""
  class_id = cars_classes.IDS.get(cars_classes.class_key(name))
  if class_id is None:
    head = name.split(".", 1)[0].strip()
    class_id = int(head) if head.isdigit() else None
  return class_id


# Labels follow the folder names in Python string order, as Confusezius' loader numbers them; the first 98 of
# that order are exactly ids 1-98, so the labels equal the seeds' on a complete tree.
RULE = common.ClassRule(identify=folder_class_id, num_classes=NUM_CLASSES, num_train=NUM_TRAIN,
                        folder_pattern=lambda c: f"images/{cars_classes.folder_name(c)}",
                        naming="after the class ('Acura RL Sedan 2012')", sort="string")
PUBLISHED = {
    "train": common.Published(8054, 98),
    "eval": common.Published(8131, 98),
}
_FOLDERS = "images/<class>/<image>"
_ANNOS = "car_ims + cars_annos.mat"


def detect(folder: str) -> str | None:
  if os.path.isfile(os.path.join(folder, "cars_annos.mat")) and os.path.isdir(os.path.join(folder, "car_ims")):
    return _ANNOS
  images = os.path.join(folder, "images")
  if os.path.isdir(images) and any(e.is_dir() for e in os.scandir(images)):
    return _FOLDERS
  return None


def read(folder: str, layout: str, *, skip_missing: bool = False) -> DatasetSplits:
  if layout == _FOLDERS:
    return common.read_class_folders(NAME, folder, layout, RULE)
  return _read_annos(folder, layout, skip_missing=skip_missing)


def read_annotations(mat_path: str) -> tuple[list[str], np.ndarray]:
  """cars_annos.mat -> (relative image paths, 1-based class ids), in file order."""
  import scipy.io  # only this layout needs scipy

  try:
    mat = scipy.io.loadmat(mat_path)
    annos = mat["annotations"].reshape(-1)
    names = annos.dtype.names
    path_field = "relative_im_path" if "relative_im_path" in names else names[0]
    class_field = "class" if "class" in names else names[5]  # Proxy-Anchor reads field 6
    paths = [str(np.asarray(a[path_field]).reshape(-1)[0]) for a in annos]
    classes = np.asarray([int(np.asarray(a[class_field]).reshape(-1)[0]) for a in annos], np.int64)
  except Exception as e:
    raise DatasetLayoutError(NAME, f"cannot read annotations from {mat_path}: {e!r}; expected a struct array "
                             "'annotations' with fields relative_im_path and class (1-based)") from e
  return paths, classes


def _read_annos(folder: str, layout: str, *, skip_missing: bool) -> DatasetSplits:
  mat_path = os.path.join(folder, "cars_annos.mat")
  rel_paths, classes = read_annotations(mat_path)
  if classes.min() < 1 or classes.max() > NUM_CLASSES:
    raise DatasetLayoutError(NAME, f"{mat_path}: class ids must lie in 1..{NUM_CLASSES}, found "
                             f"{classes.min()}..{classes.max()}")
  subset = common.read_subset(NAME, folder, NUM_CLASSES)
  expected = subset if subset is not None else set(range(1, NUM_CLASSES + 1))
  present = set(np.unique(classes).tolist())
  missing = sorted(expected - present)
  if missing:
    raise common.missing_classes_error(NAME, missing, mat_path, lambda c: f"class {c} "
                                       f"{cars_classes.NAMES[c - 1]!r} (no annotation)", subset is not None)
  if present - expected:
    raise DatasetLayoutError(NAME, f"{mat_path} annotates classes {sorted(present - expected)[:5]} that "
                             f"{os.path.join(folder, common.SUBSET_FILE)} does not list")
  paths = [os.path.join(folder, p) for p in rel_paths]
  keep = common.existing_mask(NAME, paths, mat_path, skip_missing=skip_missing)
  gone = sorted(present - set(np.unique(classes[keep]).tolist()))
  if gone:
    common.log.warning("dataset %r: skip_corrupt dropped every image of class(es) %s", NAME, gone[:10])
  splits = []
  for role, in_split in (("train", classes <= NUM_TRAIN), ("test", classes > NUM_TRAIN)):
    rows = np.flatnonzero(in_split & keep)
    part_paths = [paths[i] for i in rows]
    # Labels within a split are the class id minus the split's first id, as Proxy-Anchor's 0..97 / 98..195
    # after re-indexing; the class name keeps the 1-based official id.
    labels, kept = _contiguous(classes[rows])
    splits.append(Records(FileStore(part_paths), labels=labels, roles=role, paths=part_paths,
                          class_names=[str(c) for c in kept]))
  return DatasetSplits(NAME, splits[0], splits[1], layout=layout, root=folder)


def _contiguous(class_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  kept, labels = np.unique(class_ids, return_inverse=True)
  return labels.astype(np.int64), kept
