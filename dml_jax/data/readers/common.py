"""What every reader shares: locating a layout under a data root, listing class folders, checking files."""

from __future__ import annotations

import dataclasses
import logging
import os
from concurrent import futures
from typing import Callable, Sequence

import numpy as np

from dml_jax.data import decode
from dml_jax.data.errors import DatasetLayoutError, MissingFilesError
from dml_jax.data.records import DatasetSplits, FileStore, Records

log = logging.getLogger("dml_jax.data")


@dataclasses.dataclass(frozen=True)
class Published:
  """Counts of one split as published (None where no count is published)."""

  images: int | None
  classes: int | None
  note: str = ""


def locate(dataset: str, data_root: str, dir_names: Sequence[str],
           detect: Callable[[str], str | None], layouts: Sequence[str]) -> tuple[str, str]:
  """Finds the dataset folder under `data_root` and the layout it holds.

  Looks at `data_root/<name>` for each known folder name, then at `data_root` itself (a root that
  is the dataset folder). Returns (folder, layout id); raises DatasetLayoutError naming every path
  looked at and the layouts expected.
  """
  if data_root is None:
    raise DatasetLayoutError(dataset, "no data_root given", expected=layouts)
  root = os.path.abspath(os.path.expanduser(os.fspath(data_root)))
  if not os.path.isdir(root):
    raise DatasetLayoutError(dataset, f"data root {root} does not exist or is not a folder", expected=layouts)
  looked_at = []
  for candidate in [os.path.join(root, n) for n in dir_names] + [root]:
    if candidate in looked_at:
      continue
    looked_at.append(candidate)
    if os.path.isdir(candidate):
      layout = detect(candidate)
      if layout is not None:
        return candidate, layout
  raise DatasetLayoutError(dataset, f"no recognised layout under {root}", looked_at=looked_at,
                           expected=layouts)


def class_folders(images_dir: str, *, sort: str) -> list[str]:
  """Sub-folders of `images_dir`, sorted by 'int_prefix' ('001.Black_footed_Albatross') or 'string'."""
  names = [e.name for e in os.scandir(images_dir) if e.is_dir() and not e.name.startswith(".")]
  if sort == "int_prefix" and names and all(n.split(".", 1)[0].isdigit() for n in names):
    return sorted(names, key=lambda n: (int(n.split(".", 1)[0]), n))
  return sorted(names)


def image_files(folder: str, dataset: str) -> list[str]:
  """Image files of one class folder, sorted by name; other files are logged, not read."""
  names = sorted(e.name for e in os.scandir(folder) if e.is_file())
  images = [n for n in names if decode.is_image_file(n)]
  others = [n for n in names if n not in set(images) and not n.startswith("._")]
  if others:
    log.warning("dataset %r: ignoring %d non-image file(s) in %s, e.g. %s", dataset, len(others), folder,
                others[:3])
  return [os.path.join(folder, n) for n in images]


def folder_per_class(dataset: str, images_dir: str, *, num_train_classes: int | None,
                     sort: str) -> tuple[list[list[str]], list[str]]:
  """Reads `<images_dir>/<class>/<image>` into per-class file lists in class order.

  Returns (files per class, class folder names). Empty class folders are an error: they shift every
  later label.
  """
  names = class_folders(images_dir, sort=sort)
  files = [image_files(os.path.join(images_dir, n), dataset) for n in names]
  empty = [n for n, f in zip(names, files) if not f]
  if empty:
    raise DatasetLayoutError(dataset, f"class folder(s) without images in {images_dir}: {empty[:10]}")
  if num_train_classes is not None and len(names) <= num_train_classes:
    raise DatasetLayoutError(dataset, f"{images_dir} has {len(names)} class folders; the split needs more "
                             f"than {num_train_classes}")
  return files, names


def split_folder_classes(files: list[list[str]], names: list[str], num_train: int
                         ) -> tuple[tuple[list[str], np.ndarray, list[str]], tuple[list[str], np.ndarray, list[str]]]:
  """First `num_train` classes train, the rest test; labels re-indexed 0.. within each split."""

  def flat(part_files, part_names):
    paths = [p for f in part_files for p in f]
    labels = np.concatenate([np.full(len(f), i, np.int64) for i, f in enumerate(part_files)])
    return paths, labels, part_names

  return flat(files[:num_train], names[:num_train]), flat(files[num_train:], names[num_train:])


def find_file(folder: str, candidates: Sequence[str]) -> str | None:
  for c in candidates:
    p = os.path.join(folder, c)
    if os.path.isfile(p):
      return p
  return None


def resolve_base(dataset: str, first_relpath: str, bases: Sequence[str], listed_in: str) -> str:
  """The first folder under which the first listed image exists (split files list relative paths)."""
  for b in bases:
    if os.path.isfile(os.path.join(b, first_relpath)):
      return b
  raise DatasetLayoutError(
      dataset, f"the first image listed in {listed_in}, {first_relpath!r}, exists under none of the "
      "image folders tried", looked_at=[os.path.join(b, first_relpath) for b in bases])


def existing_mask(dataset: str, paths: Sequence[str], listed_in: str, *, skip_missing: bool) -> np.ndarray:
  """bool [N]: which listed files exist. Missing files stop the load unless skip_missing (then logged)."""
  with futures.ThreadPoolExecutor(8) as pool:
    exists = np.fromiter(pool.map(os.path.isfile, paths, chunksize=4096), dtype=bool, count=len(paths))
  if not exists.all():
    missing = [p for p, e in zip(paths, exists) if not e]
    if not skip_missing:
      raise MissingFilesError(dataset, missing, listed_in)
    log.warning("dataset %r: skipping %d missing image(s) listed in %s, e.g. %s", dataset, len(missing),
                listed_in, missing[:5])
  return exists


def drop_corrupt(dataset: str, records: Records, split: str, *, num_threads: int = 8) -> Records:
  """Decodes every image cheaply and drops the unreadable ones, logging how many and which."""
  def check(i):
    return decode.check_decodable(records.read_source(i), records.paths[i])

  with futures.ThreadPoolExecutor(num_threads) as pool:
    errors = list(pool.map(check, range(len(records)), chunksize=256))
  bad = [i for i, e in enumerate(errors) if e is not None]
  if not bad:
    log.info("dataset %r %s: all %d images decode", dataset, split, len(records))
    return records
  log.warning("dataset %r %s: skip_corrupt skipped %d unreadable image(s) of %d:\n%s", dataset, split, len(bad),
              len(records), "\n".join(f"  {records.paths[i]}: {errors[i]}" for i in bad[:20]))
  keep = np.setdiff1d(np.arange(len(records)), bad)
  return records.subset(keep, relabel=True)


def read_lines(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n\r") for line in f]


def read_class_folders(dataset: str, folder: str, layout: str, *, num_classes: int, sort: str) -> DatasetSplits:
  """Class folders in `sort` order (see folder_per_class); the first half of the classes train, the rest test.

  Labels are the class position within each split (0..), files within a class sorted by name, as the
  seeds read them (`._*` metadata files skipped).
  """
  images = os.path.join(folder, "images")
  files, names = folder_per_class(dataset, images, num_train_classes=None, sort=sort)
  if len(names) != num_classes:
    log.warning("dataset %r: %s has %d class folders, the published dataset %d; splitting the first "
                "half for training", dataset, images, len(names), num_classes)
  if len(names) < 2:
    raise DatasetLayoutError(dataset, f"{images} needs at least 2 class folders, found {len(names)}")
  (tr_paths, tr_labels, tr_names), (te_paths, te_labels, te_names) = split_folder_classes(
      files, names, len(names) // 2)
  train = Records(FileStore(tr_paths), labels=tr_labels, roles="train", paths=tr_paths, class_names=tr_names)
  test = Records(FileStore(te_paths), labels=te_labels, roles="test", paths=te_paths, class_names=te_names)
  return DatasetSplits(dataset, train, test, layout=layout, root=folder)
