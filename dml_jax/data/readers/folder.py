"""`folder`: your own images, one subfolder per class, split by classes as DML does.

  <data_root>/<class>/<image>           any file names; images in deeper subfolders belong to <class>

The split is by class, so the test classes are never seen in training. Which classes train (`FolderSplit`):

  - default: a seeded random `train_fraction` of the classes (at least 2 classes on each side);
  - `classes_file`: a text file naming the test classes (or, with classes_file_split='train', the training
    classes), one class folder name per line; blank lines and lines starting with '#' are ignored;
  - `split_file`: a split manifest written by an earlier load (the trainer keeps it as `<workdir>/split.json`).
    It reproduces that split exactly and wins over the other settings: a resumed run or a later evaluation sees
    the same classes on each side even when the config's fraction or seed changed.

Every load returns the manifest of the split it made as `DatasetSplits.split_manifest` (JSON-able, see
`split_manifest`); `write_split_manifest(path, manifest)` writes it. The manifest records each class's image
count, so a folder whose classes or counts changed since is refused with the differences, not re-split.
A training run does

  split = split_for_run(config.dataset.folder, workdir)      # <workdir>/split.json when it exists
  splits = load_dataset('folder', data_root, folder_split=split)
  write_split_manifest(os.path.join(workdir, SPLIT_FILE), splits.split_manifest)

Classes are ordered by name ('001.x' folders by number); labels are the position within each split. A class
folder with fewer than 2 images cannot give a positive pair and stops the load, naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from dml_jax.data import decode
from dml_jax.data.errors import DatasetLayoutError
from dml_jax.data.readers import common
from dml_jax.data.records import DatasetSplits, FileStore, Records

NAME = "folder"
DIR_NAMES = ()  # the data root is the folder itself
LAYOUTS = ("<data_root>/<class>/<image>   (one subfolder per class; any image names, nested folders allowed)",)
PUBLISHED: dict[str, common.Published] = {}  # your own images: nothing to compare against
SPLIT_FILE = "split.json"  # a run's record of its split, in the workdir
MANIFEST_FORMAT = "dml_jax.folder_split"
MANIFEST_VERSION = 1
MIN_IMAGES_PER_CLASS = 2
MIN_CLASSES_PER_SPLIT = 2
_SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class FolderSplit:
  """How the `folder` dataset is split into training and test classes (see the module docstring).

  Attributes:
    train_fraction: share of the classes that train, in (0, 1); rounded, at least 2 classes per side.
    seed: seeds the random choice of training classes.
    classes_file: optional text file of class folder names (one per line) instead of the random choice.
    classes_file_split: which split `classes_file` names, 'test' or 'train'; the other classes form the other.
    split_file: optional split manifest (JSON written by `write_split_manifest`); reproduces that split.
  """

  train_fraction: float = 0.5
  seed: int = 0
  classes_file: str = ""
  classes_file_split: str = "test"
  split_file: str = ""

  def __post_init__(self):
    if not 0.0 < float(self.train_fraction) < 1.0:
      raise ValueError(f"folder split: train_fraction must lie in (0, 1), got {self.train_fraction}")
    if self.classes_file_split not in _SPLITS:
      raise ValueError(f"folder split: classes_file_split must be 'test' or 'train', got {self.classes_file_split!r}")

  @classmethod
  def from_mapping(cls, options: Mapping[str, Any] | None) -> FolderSplit:
    """From a config node (e.g. `config.dataset.folder`); unknown keys are an error naming the known ones."""
    options = dict(options or {})
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
      raise KeyError(f"folder split: unknown option(s) {unknown}; known: {known}")
    return cls(**options)


def split_for_run(options: Mapping[str, Any] | None, workdir: str | os.PathLike) -> FolderSplit:
  """The split of a run in `workdir`: the one recorded in `<workdir>/split.json` when an earlier start wrote it
  (a resume, an evaluation), else `options` (e.g. config.dataset.folder; see FolderSplit)."""
  split = FolderSplit.from_mapping(options)
  recorded = os.path.join(os.fspath(workdir), SPLIT_FILE)
  return dataclasses.replace(split, split_file=recorded) if os.path.isfile(recorded) else split


def detect(folder: str) -> str | None:
  if any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(folder)):
    return "<class>/<image>"
  return None


def images_under(folder: str) -> list[str]:
  """Image files anywhere under `folder`, sorted by relative path; hidden files and folders are not read."""
  found = []
  for parent, dirs, files in os.walk(folder, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    found.extend(os.path.join(parent, f) for f in files if decode.is_image_file(f) and not f.startswith("."))
  return sorted(found, key=lambda p: os.path.relpath(p, folder))


def list_class_images(root: str) -> tuple[list[str], list[list[str]], list[str]]:
  """Reads `<root>/<class>/...` without splitting.

  Returns (class names in label order, image paths per class, images lying directly in `root`, which belong
  to no class). Non-image files are logged, never read.
  """
  names = common.class_folders(root, sort="int_prefix")
  files = [images_under(os.path.join(root, n)) for n in names]
  loose = [os.path.join(root, e.name) for e in sorted(os.scandir(root), key=lambda e: e.name)
           if e.is_file() and decode.is_image_file(e.name)]
  return names, files, loose


def _read_classes_file(path: str, known: list[str]) -> list[str]:
  full = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(full):
    raise DatasetLayoutError(NAME, f"classes_file {full} does not exist",
                             expected=["a text file with one class folder name per line ('#' comments)"])
  names = [line.strip() for line in common.read_lines(full)]
  names = [n for n in names if n and not n.startswith("#")]
  repeated = sorted({n for n in names if names.count(n) > 1})
  unknown = [n for n in names if n not in set(known)]
  if repeated or unknown or not names:
    problem = ("names no class" if not names else
               f"names {len(unknown)} class(es) that are not folders of the data root: {unknown[:10]}" if unknown else
               f"repeats class(es) {repeated[:10]}")
    raise DatasetLayoutError(NAME, f"classes_file {full} {problem}; class folders found: {known[:20]}"
                             + (" ..." if len(known) > 20 else ""))
  return names


def _random_train_classes(names: list[str], fraction: float, seed: int) -> list[str]:
  num_train = int(round(fraction * len(names)))
  if num_train < MIN_CLASSES_PER_SPLIT or len(names) - num_train < MIN_CLASSES_PER_SPLIT:
    raise DatasetLayoutError(
        NAME, f"train_fraction {fraction} of {len(names)} classes gives {num_train} training and "
        f"{len(names) - num_train} test classes; each side needs at least {MIN_CLASSES_PER_SPLIT} "
        f"(add class folders or change train_fraction)")
  chosen = np.random.default_rng(seed).permutation(len(names))[:num_train]
  return [names[i] for i in sorted(chosen)]


def _read_manifest(path: str) -> dict[str, Any]:
  full = os.path.abspath(os.path.expanduser(path))
  expected = [f'JSON {{"format": "{MANIFEST_FORMAT}", "version": {MANIFEST_VERSION}, "train": {{class: '
              'num_images, ...}, "test": {class: num_images, ...}, ...}} (written by write_split_manifest)']
  if not os.path.isfile(full):
    raise DatasetLayoutError(NAME, f"split_file {full} does not exist", expected=expected)
  try:
    with open(full, encoding="utf-8") as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DatasetLayoutError(NAME, f"split_file {full} is not JSON: {e}", expected=expected) from e
  ok = (isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT
        and all(isinstance(manifest.get(s), dict) for s in _SPLITS))
  if not ok:
    raise DatasetLayoutError(NAME, f"split_file {full} is not a folder split manifest", expected=expected)
  if manifest.get("version") != MANIFEST_VERSION:
    raise DatasetLayoutError(NAME, f"split_file {full} has version {manifest.get('version')!r}; this dml_jax "
                             f"reads version {MANIFEST_VERSION}")
  return manifest


def _check_against_manifest(path: str, manifest: dict[str, Any], counts: dict[str, int]) -> None:
  recorded = {**manifest["train"], **manifest["test"]}
  added = sorted(set(counts) - set(recorded))
  removed = sorted(set(recorded) - set(counts))
  changed = sorted(f"{n}: {recorded[n]} -> {counts[n]} images" for n in set(counts) & set(recorded)
                   if int(recorded[n]) != counts[n])
  if added or removed or changed:
    lines = [f"the folder no longer matches the split recorded in {path}:"]
    if added:
      lines.append(f"  class folders not in the split: {added[:20]}")
    if removed:
      lines.append(f"  classes of the split that are gone: {removed[:20]}")
    if changed:
      lines.append(f"  classes whose image count changed: {changed[:20]}")
    lines.append("  restore the folder, or start a new run (a new workdir) to split it afresh")
    raise DatasetLayoutError(NAME, "\n".join(lines))


def split_manifest(root: str, train: Mapping[str, int], test: Mapping[str, int], rule: str,
                   split: FolderSplit) -> dict[str, Any]:
  """The JSON-able description of a class split: {format, version, root, rule, the settings, train, test}.

  train / test map each class folder name to its image count, in label order.
  """
  return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "root": root, "rule": rule,
          "train_fraction": float(split.train_fraction), "seed": int(split.seed),
          "classes_file": split.classes_file, "classes_file_split": split.classes_file_split,
          "num_classes": {"train": len(train), "test": len(test)},
          "num_images": {"train": int(sum(train.values())), "test": int(sum(test.values()))},
          "train": dict(train), "test": dict(test)}


def write_split_manifest(path: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
  """Writes a split manifest as JSON (atomically: a reader never sees half a file)."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(dict(manifest), f, indent=1)
    f.write("\n")
  os.replace(tmp, path)


def read(folder: str, layout: str, *, skip_missing: bool = False, split: FolderSplit | None = None) -> DatasetSplits:
  """Splits `<folder>/<class>/<image>` by class (see the module docstring); `.split_manifest` describes it."""
  del skip_missing  # files are listed from disk
  split = split or FolderSplit()
  names, files, loose = list_class_images(folder)
  if loose:
    common.log.warning("dataset %r: %d image(s) lie directly in %s and belong to no class; they are not used, "
                       "e.g. %s", NAME, len(loose), folder, [os.path.basename(p) for p in loose[:3]])
  counts = {n: len(f) for n, f in zip(names, files)}
  few = [f"{n} ({c})" for n, c in counts.items() if c < MIN_IMAGES_PER_CLASS]
  if few:
    raise DatasetLayoutError(
        NAME, f"class folder(s) in {folder} with fewer than {MIN_IMAGES_PER_CLASS} images (a class needs a "
        f"positive pair; add images or move the folder out): {few[:20]}" + (" ..." if len(few) > 20 else ""),
        expected=LAYOUTS)

  if split.split_file:
    manifest_path = os.path.abspath(os.path.expanduser(split.split_file))
    manifest = _read_manifest(manifest_path)
    _check_against_manifest(manifest_path, manifest, counts)
    train_names = [n for n in names if n in manifest["train"]]
    rule = manifest.get("rule", f"as recorded in {manifest_path}")
    recorded = FolderSplit(train_fraction=manifest.get("train_fraction", split.train_fraction),
                           seed=manifest.get("seed", split.seed), classes_file=manifest.get("classes_file", ""),
                           classes_file_split=manifest.get("classes_file_split", "test"))
    if dataclasses.replace(split, split_file="") != recorded:
      common.log.warning("dataset %r: using the split recorded in %s (%s); the split settings given now (%s) "
                         "are ignored", NAME, manifest_path, rule, dataclasses.replace(split, split_file=""))
    split = recorded
  elif split.classes_file:
    listed = _read_classes_file(split.classes_file, names)
    train_names = listed if split.classes_file_split == "train" else [n for n in names if n not in set(listed)]
    train_names = [n for n in names if n in set(train_names)]
    rule = f"{split.classes_file_split} classes listed in {os.path.abspath(os.path.expanduser(split.classes_file))}"
  else:
    train_names = _random_train_classes(names, float(split.train_fraction), int(split.seed))
    rule = f"seeded random {split.train_fraction:g} of the classes train (seed {split.seed})"

  test_names = [n for n in names if n not in set(train_names)]
  for side, side_names in (("training", train_names), ("test", test_names)):
    if len(side_names) < MIN_CLASSES_PER_SPLIT:
      raise DatasetLayoutError(NAME, f"the split ({rule}) leaves {len(side_names)} {side} class(es) of the "
                               f"{len(names)} in {folder}; each side needs at least {MIN_CLASSES_PER_SPLIT}")

  by_name = dict(zip(names, files))

  def records(part: list[str], role: str) -> Records:
    paths = [p for n in part for p in by_name[n]]
    labels = np.concatenate([np.full(len(by_name[n]), i, np.int64) for i, n in enumerate(part)])
    return Records(FileStore(paths), labels=labels, roles=role, paths=paths, class_names=part)

  splits = DatasetSplits(NAME, records(train_names, "train"), records(test_names, "test"), layout=layout,
                         root=folder)
  splits.split_manifest = split_manifest(folder, {n: counts[n] for n in train_names},
                                         {n: counts[n] for n in test_names}, rule, split)
  common.log.info("dataset %r: %s: %d training classes, %d test classes", NAME, rule, len(train_names),
                  len(test_names))
  return splits
