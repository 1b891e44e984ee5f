"""Raw-folder readers, one module per dataset, found by name.

Each module defines NAME, DIR_NAMES (folder names tried under a data root), LAYOUTS (human-readable,
for errors), PUBLISHED (split -> Published counts), `detect(folder) -> layout | None` and
`read(folder, layout, *, skip_missing, ...) -> DatasetSplits`.
"""

from __future__ import annotations

import types

from dml_jax.data.readers import cars, common, cub, digits, folder, inaturalist, inshop, sop, vehicleid
from dml_jax.data.records import DatasetSplits
from dml_jax.errors import unknown_name

READERS: dict[str, types.ModuleType] = {m.NAME: m for m in (cub, cars, sop, inshop, inaturalist, vehicleid, digits,
                                                             folder)}
DATASETS = tuple(READERS)


def get_reader(name: str) -> types.ModuleType:
  if name not in READERS:
    raise unknown_name("dataset", name, DATASETS)
  return READERS[name]


def read_raw(name: str, data_root: str, *, skip_corrupt: bool = False, vehicleid_test_size: str = "small",
             num_threads: int = 8, folder_split: folder.FolderSplit | None = None) -> DatasetSplits:
  """Reads dataset `name` from raw folders under `data_root` (see each reader's LAYOUTS).

  With skip_corrupt, listed-but-missing files and images that do not decode are dropped and counted
  in the log; otherwise the first missing file stops the load (undecodable images stop when read).
  folder_split: how the `folder` dataset is split by class (readers/folder.py); only for 'folder'.
  """
  reader = get_reader(name)
  if folder_split is not None and name != folder.NAME:
    raise ValueError(f"folder_split applies to the {folder.NAME!r} dataset only, not {name!r}")
  folder_path, layout = common.locate(name, data_root, reader.DIR_NAMES, reader.detect, reader.LAYOUTS)
  kwargs = {"test_size": vehicleid_test_size} if name == "vehicleid" else {}
  if name == folder.NAME:
    kwargs = {"split": folder_split}
  splits = reader.read(folder_path, layout, skip_missing=skip_corrupt, **kwargs)
  common.log.info("dataset %r: layout %r in %s: train %s, eval %s", name, layout, folder_path, splits.train,
                  splits.eval)
  if skip_corrupt:
    chosen_eval = splits.eval
    splits.train = common.drop_corrupt(name, splits.train, "train", num_threads=num_threads)
    splits.eval = common.drop_corrupt(name, splits.eval, "eval", num_threads=num_threads)
    splits.extra = {k: (splits.eval if v is chosen_eval else common.drop_corrupt(name, v, k))
                    for k, v in splits.extra.items()}
  return splits
