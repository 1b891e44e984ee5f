"""What every reader shares: locating a layout under a data root, listing class folders, checking files."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from concurrent import futures

import numpy as np

from dml_jax.data import decode
from dml_jax.data.errors import DatasetLayoutError, MissingFilesError, UnreadableImagesError
from dml_jax.data.records import DatasetSplits, FileStore, Records

log = logging.getLogger("dml_jax.data")
DATA_ROOT_HINT = ("set data_root to the folder that holds the dataset folder (train.py: "
                  "--config.dataset.data_root=DIR); `python -m dml_jax.data verify` checks a layout")


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
    raise DatasetLayoutError(dataset, "no data_root given", expected=layouts, hint=DATA_ROOT_HINT)
  root = os.path.abspath(os.path.expanduser(os.fspath(data_root)))
  if not os.path.isdir(root):
    raise DatasetLayoutError(dataset, f"data root {root} does not exist or is not a folder", expected=layouts,
                             hint=DATA_ROOT_HINT)
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
                           expected=layouts, hint=DATA_ROOT_HINT)


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


def decode_errors(records: Records, *, num_threads: int = 8) -> list[str | None]:
  """Per record, why its image does not decode (None when it does); cheap 1/8-scale JPEG decoding."""
  def check(i):
    return decode.check_decodable(records.read_source(i), records.paths[i])

  with futures.ThreadPoolExecutor(num_threads) as pool:
    return list(pool.map(check, range(len(records)), chunksize=256))


def require_decodable(dataset: str, records: Records, split: str, *, num_threads: int = 8) -> None:
  """Stops with UnreadableImagesError (every bad image listed) unless every image of `records` decodes.

  For a check before training: an unreadable evaluation image otherwise stops the run at its first
  evaluation, after an epoch of work.
  """
  errors = decode_errors(records, num_threads=num_threads)
  bad = [(str(records.paths[i]), str(e)) for i, e in enumerate(errors) if e is not None]
  if bad:
    raise UnreadableImagesError(dataset, split, bad, len(records))


def drop_corrupt(dataset: str, records: Records, split: str, *, num_threads: int = 8) -> Records:
  """Decodes every image cheaply and drops the unreadable ones, logging how many and which."""
  errors = decode_errors(records, num_threads=num_threads)
  bad = [i for i, e in enumerate(errors) if e is not None]
  if not bad:
    log.info("dataset %r %s: all %d images decode", dataset, split, len(records))
    return records
  log.warning("dataset %r %s: skip_corrupt skipped %d unreadable image(s) of %d:\n%s", dataset, split, len(bad),
              len(records), "\n".join(f"  {records.paths[i]}: {errors[i]}" for i in bad[:20]))
  keep = np.setdiff1d(np.arange(len(records)), bad)
  return records.subset(keep, relabel=True)


def check_disjoint(dataset: str, train_classes, test_classes, train_source: str, test_source: str) -> None:
  """DML splits are class-disjoint: a class in both is an error naming it (mixed or wrong split files)."""
  both = sorted(set(train_classes) & set(test_classes))
  if both:
    raise DatasetLayoutError(dataset, f"{len(both)} class(es) are in both the training split ({train_source}) and "
                             f"the test split ({test_source}), e.g. {both[:5]}; the splits must not share classes",
                             hint="restore the official split files")


def read_lines(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n\r") for line in f]


SUBSET_FILE = "dml_jax_subset.txt"


@dataclasses.dataclass(frozen=True)
class ClassRule:
  """How a class-folder dataset names its classes and which of them train (the official split, by class id).

  identify: folder name -> official class id (1-based), None for a name that is no class of the dataset.
  num_classes / num_train: ids 1..num_classes exist; ids 1..num_train train, the others test.
  folder_pattern: class id -> how its folder looks, for messages ('images/057.*').
  naming: the folder naming in words, for messages.
  sort: the label order within each split, as the seeds read the folders ('int_prefix' | 'string').
  """

  identify: Callable[[str], int | None]
  num_classes: int
  num_train: int
  folder_pattern: Callable[[int], str]
  naming: str
  sort: str


def int_prefix_id(name: str) -> int | None:
  """'057.Bird_Name' -> 57; None for a name without a 'NNN.' prefix."""
  head, dot, _ = name.partition(".")
  return int(head) if dot and head.isdigit() else None


def read_subset(dataset: str, folder: str, num_classes: int) -> set[int] | None:
  """The class ids listed in `<folder>/dml_jax_subset.txt`, or None without that file.

  The file declares a deliberately partial tree (the generated test trees of dml_jax.data.synthetic, or a
  user's sample): one class id per line, '#' comments. Without it every class of the dataset must be there.
  """
  path = os.path.join(folder, SUBSET_FILE)
  if not os.path.isfile(path):
    return None
  ids = set()
  for n, line in enumerate(read_lines(path), start=1):
    text = line.split("#", 1)[0].strip()
    if not text:
      continue
    if not text.isdigit() or not 1 <= int(text) <= num_classes:
      raise DatasetLayoutError(dataset, f"{path} line {n}: expected a class id in 1..{num_classes}, got {text!r}")
    ids.add(int(text))
  if not ids:
    raise DatasetLayoutError(dataset, f"{path} lists no class ids")
  return ids


def missing_classes_error(dataset: str, missing: Sequence[int], where: str, describe: Callable[[int], str],
                          subset: bool) -> DatasetLayoutError:
  """The error for classes of the official split (or of the subset file) that are not there, each named."""
  shown = "; ".join(describe(c) for c in missing[:5]) + (f"; ... ({len(missing)} in all)" if len(missing) > 5
                                                         else "")
  what = "class" if len(missing) == 1 else f"{len(missing)} classes"
  listed = f" listed in {SUBSET_FILE}" if subset else ""
  return DatasetLayoutError(
      dataset, f"{what}{listed} missing in {where}: {shown}. The split assigns classes by id, so a missing "
      "class is an error, never a shift", hint="restore the missing class folder(s) from the dataset archive")


def read_class_folders(dataset: str, folder: str, layout: str, rule: ClassRule) -> DatasetSplits:
  """`<folder>/images/<class>/<image>`: classes by id (rule.identify), ids 1..rule.num_train train, the rest test.

  Every class of the dataset must have its folder (or every class of the subset file, see read_subset);
  a missing class is an error naming it, a folder that is no class of the dataset too. Labels are the
  class position within each split (0..) in the seeds' folder order (rule.sort); files within a class are
  sorted by name (`._*` metadata files skipped).
  """
  images = os.path.join(folder, "images")
  names = class_folders(images, sort=rule.sort)
  by_id: dict[int, str] = {}
  unknown = []
  for name in names:
    class_id = rule.identify(name)
    if class_id is None or not 1 <= class_id <= rule.num_classes:
      unknown.append(name)
    elif class_id in by_id:
      raise DatasetLayoutError(dataset, f"folders {by_id[class_id]!r} and {name!r} in {images} are both class "
                               f"{class_id}", hint="keep one of them")
    else:
      by_id[class_id] = name
  if unknown:
    raise DatasetLayoutError(dataset, f"{len(unknown)} folder(s) in {images} are no {dataset} class: "
                             f"{unknown[:5]}; class folders are named {rule.naming}",
                             hint="move other folders out of images/")
  subset = read_subset(dataset, folder, rule.num_classes)
  expected = subset if subset is not None else set(range(1, rule.num_classes + 1))
  missing = sorted(expected - set(by_id))
  if missing:
    raise missing_classes_error(dataset, missing, images, lambda c: f"class {c} (no folder "
                                f"{rule.folder_pattern(c)})", subset is not None)
  extra = sorted(set(by_id) - expected)
  if extra:
    raise DatasetLayoutError(dataset, f"class folder(s) {[by_id[c] for c in extra[:5]]} in {images} are not "
                             f"listed in {os.path.join(folder, SUBSET_FILE)}", hint="list their class ids there")
  train_names = [n for n in names if rule.identify(n) <= rule.num_train]  # in the seeds' order
  test_names = [n for n in names if rule.identify(n) > rule.num_train]
  if not train_names or not test_names:
    raise DatasetLayoutError(dataset, f"{os.path.join(folder, SUBSET_FILE)} must list classes of both splits "
                             f"(ids 1-{rule.num_train} train, {rule.num_train + 1}-{rule.num_classes} test)")
  splits = []
  for role, part in (("train", train_names), ("test", test_names)):
    files = [image_files(os.path.join(images, n), dataset) for n in part]
    empty = [n for n, f in zip(part, files) if not f]
    if empty:
      raise DatasetLayoutError(dataset, f"class folder(s) without images in {images}: {empty[:10]}")
    paths = [p for f in files for p in f]
    labels = np.concatenate([np.full(len(f), i, np.int64) for i, f in enumerate(files)])
    splits.append(Records(FileStore(paths), labels=labels, roles=role, paths=paths, class_names=part))
  return DatasetSplits(dataset, splits[0], splits[1], layout=layout, root=folder)
