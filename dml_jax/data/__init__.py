"""Datasets, transforms, samplers and grain loaders for deep metric learning.

  splits = load_dataset('cub200', '/data')                  # raw folders, or prepared shards if present
  loader = make_train_loader(splits.train, batch_size=112, pretrained_cfg=model.pretrained_cfg)
  for batch in loader.epoch(0): ...                         # {'image': f32 [B,224,224,3], 'label': i32 [B]}
  for batch in make_eval_loader(splits.eval, batch_size=128, pretrained_cfg=cfg): ...

Datasets: cub200, cars196, sop, inshop, inaturalist, vehicleid (standard DML class splits), the
embedded `digits` demo and `folder` (your own images, one subfolder per class, split by class at load
time). Command line: `python -m dml_jax.data {verify,prepare} --dataset NAME ...`.
"""

from __future__ import annotations

from dml_jax.data import digits as _digits
from dml_jax.data.digits import ensure_digits_tree
from dml_jax.data.errors import CorruptImageError, DatasetLayoutError, MissingFilesError, UnreadableImagesError
from dml_jax.data.loaders import (
  EvalLoader,
  TrainEpochIterator,
  TrainLoader,
  make_eval_loader,
  make_sampler,
  make_train_loader,
)
from dml_jax.data.prepare import find_prepared, prepare, read_prepared
from dml_jax.data.readers import DATASETS, read_raw
from dml_jax.data.readers.common import require_decodable
from dml_jax.data.readers.folder import FolderSplit, write_split_manifest
from dml_jax.data.records import DatasetSplits, Records
from dml_jax.data.samplers import BatchSampler, GroupedSampler, MPerClassSampler, RandomSampler
from dml_jax.errors import InvalidValueError, unknown_name

SOURCES = ("auto", "raw", "prepared", "tfds")


def load_dataset(name: str, data_root: str | None = None, *, source: str = "auto", tfds_data_dir: str | None = None,
                 skip_corrupt: bool = False, vehicleid_test_size: str = "small", num_threads: int = 8,
                 folder_split: FolderSplit | None = None) -> DatasetSplits:
  """The DML splits of dataset `name`.

  Args:
    name: one of DATASETS.
    data_root: folder holding the dataset folder (e.g. `<root>/cub200/images/...`) or the dataset folder
      itself; for 'prepared', the `--out` folder of `prepare`. For 'digits', None means
      ~/.cache/dml_jax (the tree is written there on first use).
    source: 'raw' folders, 'prepared' ArrayRecord shards, 'tfds' (an array_record tfds dataset in
      tfds_data_dir), or 'auto': prepared shards when data_root holds them, else raw folders.
    skip_corrupt: drop (and log) missing or undecodable images instead of stopping.
    vehicleid_test_size: 'small' | 'medium' | 'large' test list of VehicleID as `.eval`.
    folder_split: for 'folder' (your own `<data_root>/<class>/<image>` tree), how its classes are split:
      FolderSplit(train_fraction, seed, classes_file, classes_file_split, split_file); default a seeded half.
      The result's `.split_manifest` describes the split; pass it back as `split_file` (after
      `write_split_manifest`) to reproduce it exactly.
  """
  if name not in DATASETS:
    raise unknown_name("dataset", name, DATASETS, hint="set dataset.name (train.py: --config.dataset.name=NAME)")
  if source not in SOURCES:
    raise unknown_name("dataset source", source, SOURCES, cls=InvalidValueError)
  if name == "vehicleid" and vehicleid_test_size not in ("small", "medium", "large"):
    raise InvalidValueError(f"vehicleid_test_size must be 'small', 'medium' or 'large', got {vehicleid_test_size!r}")
  if folder_split is not None and name != "folder":
    raise InvalidValueError(f"folder_split applies to the 'folder' dataset only, not {name!r}")
  if name == "folder" and source in ("tfds", "prepared"):
    raise InvalidValueError(f"the 'folder' dataset is read from its class folders (source 'raw' or 'auto'), "
                            f"not {source!r}", "set --config.dataset.source=auto")
  if source == "tfds":
    from dml_jax.data.tfds_source import read_tfds

    return read_tfds(name, tfds_data_dir, data_root=data_root, skip_corrupt=skip_corrupt, num_threads=num_threads)
  if source in ("auto", "prepared") and name != "folder":
    folder = find_prepared(data_root, name)
    if folder is not None:
      return read_prepared(folder, name, vehicleid_test_size=vehicleid_test_size)
    if source == "prepared":
      from dml_jax.data.prepare import MANIFEST

      raise DatasetLayoutError(name, f"no prepared shards of {name!r} under {data_root}",
                               expected=[f"<data_root>/{name}/{MANIFEST} (written by `python -m dml_jax.data "
                                         "prepare`)"])
  if name == "digits":
    data_root = _digits.default_root() if data_root is None else data_root
    ensure_digits_tree(data_root)
  return read_raw(name, data_root, skip_corrupt=skip_corrupt, vehicleid_test_size=vehicleid_test_size,
                  num_threads=num_threads, folder_split=folder_split)


__all__ = [
    "DATASETS", "SOURCES", "BatchSampler", "CorruptImageError", "DatasetLayoutError", "DatasetSplits", "EvalLoader",
    "FolderSplit", "GroupedSampler", "MPerClassSampler", "MissingFilesError", "RandomSampler", "Records",
    "TrainEpochIterator", "TrainLoader", "UnreadableImagesError", "ensure_digits_tree", "load_dataset",
    "make_eval_loader", "make_sampler", "make_train_loader", "prepare", "read_prepared", "read_raw",
    "require_decodable", "write_split_manifest",
]
