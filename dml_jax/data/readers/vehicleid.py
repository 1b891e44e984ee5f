"""PKU VehicleID: train_list.txt; test_list_800 / 1600 / 2400.txt (small / medium / large)."""

from __future__ import annotations

import os

from dml_jax.data.errors import DatasetLayoutError
from dml_jax.data.readers import common
from dml_jax.data.records import DatasetSplits, FileStore, Records, contiguous_labels

NAME = "vehicleid"
DIR_NAMES = ("vehicleid", "VehicleID", "VehicleID_V1.0", "vid", "PKU-VehicleID", "pku_vehicleid")
LAYOUTS = (
    "VehicleID_V1.0/train_test_split/{train_list,test_list_800,test_list_1600,test_list_2400}.txt + "
    "VehicleID_V1.0/image/<image_id>.jpg   (official archive; D&C)",
)
TEST_LISTS = {"small": "test_list_800.txt", "medium": "test_list_1600.txt", "large": "test_list_2400.txt"}
PUBLISHED = {
    "train": common.Published(110178, 13134, "D&C's code uses 13,164 ids"),
    "test_small": common.Published(7332, 800, "image count commonly cited, not verified"),
    "test_medium": common.Published(12995, 1600, "image count commonly cited, not verified"),
    "test_large": common.Published(20038, 2400, "image count commonly cited, not verified"),
}
_LAYOUT = "train_test_split/*.txt + image/"


def detect(folder: str) -> str | None:
  if os.path.isfile(os.path.join(folder, "train_test_split", "train_list.txt")):
    return _LAYOUT
  return None


def _read_list(folder: str, list_name: str, role: str, *, skip_missing: bool) -> Records:
  path = os.path.join(folder, "train_test_split", list_name)
  image_ids, vehicle_ids = [], []
  for n, line in enumerate(common.read_lines(path), start=1):
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2 or not parts[1].isdigit():
      raise DatasetLayoutError(NAME, f"{path} line {n}: expected 'image_id vehicle_id', got {line!r}")
    image_ids.append(parts[0])
    vehicle_ids.append(int(parts[1]))
  if not image_ids:
    raise DatasetLayoutError(NAME, f"{path} lists no images")
  paths = [os.path.join(folder, "image", f"{i}.jpg") for i in image_ids]
  keep = common.existing_mask(NAME, paths, path, skip_missing=skip_missing)
  paths = [p for p, k in zip(paths, keep) if k]
  vehicle_ids = [v for v, k in zip(vehicle_ids, keep) if k]
  labels, classes = contiguous_labels(vehicle_ids, order="sorted")
  return Records(FileStore(paths), labels=labels, roles=role, paths=paths, class_names=[str(c) for c in classes])


def read(folder: str, layout: str, *, skip_missing: bool = False, test_size: str = "small") -> DatasetSplits:
  if test_size not in TEST_LISTS:
    raise ValueError(f"vehicleid_test_size must be one of {sorted(TEST_LISTS)}, got {test_size!r}")
  split_dir = os.path.join(folder, "train_test_split")
  if not os.path.isfile(os.path.join(split_dir, TEST_LISTS[test_size])):
    raise DatasetLayoutError(NAME, f"the {test_size} test list {TEST_LISTS[test_size]} is missing from "
                             f"{split_dir}", expected=LAYOUTS)
  train = _read_list(folder, "train_list.txt", "train", skip_missing=skip_missing)
  extra = {}
  for size, list_name in TEST_LISTS.items():
    if os.path.isfile(os.path.join(split_dir, list_name)):
      extra[f"test_{size}"] = _read_list(folder, list_name, "test", skip_missing=skip_missing)
      common.check_disjoint(NAME, train.class_names, extra[f"test_{size}"].class_names,
                            os.path.join(split_dir, "train_list.txt"), os.path.join(split_dir, list_name))
  return DatasetSplits(NAME, train, extra[f"test_{test_size}"], layout=layout, root=folder, extra=extra)
