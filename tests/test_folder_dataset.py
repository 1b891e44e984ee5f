"""The `folder` dataset on generated class folders: split by class (seeded, list file, recorded manifest), refusals."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import shutil

import numpy as np
import pytest

from dml_jax import methods
from dml_jax.data import DatasetLayoutError, FolderSplit, load_dataset, synthetic, write_split_manifest
from dml_jax.data.__main__ import main as data_cli
from dml_jax.data.readers.folder import SPLIT_FILE, split_for_run
from dml_jax.eval import protocols
from dml_jax.train.config import check_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ["apple", "bicycle", "cat", "door", "eagle", "fern", "guitar", "harbour"]


@pytest.fixture
def photos(tmp_path):
  root = tmp_path / "photos"
  synthetic.picture_folder(str(root), CLASSES, lambda c: 2 + c % 3, size=(20, 16))
  return root


def _classes(records):
  return list(records.class_names)


def test_seeded_split_is_by_class_and_described(photos):
  splits = load_dataset("folder", str(photos))
  train, test = _classes(splits.train), _classes(splits.eval)
  assert len(train) == len(test) == 4 and sorted(train + test) == CLASSES
  assert train == sorted(train) and test == sorted(test)  # labels follow the class names' order
  for records, role in ((splits.train, "train"), (splits.eval, "test")):
    assert (records.roles == role).all()
    assert np.array_equal(np.unique(records.labels), np.arange(4))
    for path, label in zip(records.paths, records.labels):
      assert pathlib.Path(path).parent.name == records.class_names[label]
  m = splits.split_manifest
  assert m["train"] == {c: 2 + CLASSES.index(c) % 3 for c in train}
  assert list(m["test"]) == test and m["num_images"] == {"train": len(splits.train), "test": len(splits.eval)}
  assert json.loads(json.dumps(m)) == m
  # The same seed always splits alike; the fraction and the seed are the knobs.
  assert _classes(load_dataset("folder", str(photos)).train) == train
  quarter = load_dataset("folder", str(photos), folder_split=FolderSplit(train_fraction=0.25, seed=3))
  assert len(quarter.train.class_names) == 2 and len(quarter.eval.class_names) == 6
  seeds = {tuple(_classes(load_dataset("folder", str(photos), folder_split=FolderSplit(seed=s)).train))
           for s in range(4)}
  assert len(seeds) > 1


def test_split_file_reproduces_the_split_and_wins(photos, tmp_path, caplog):
  # What a run does: the config's options on the first start, its split.json on every later one.
  workdir = tmp_path / "run"
  assert split_for_run({"seed": 5}, workdir) == FolderSplit(seed=5)
  first = load_dataset("folder", str(photos), folder_split=split_for_run({"seed": 5}, workdir))
  path = workdir / SPLIT_FILE
  write_split_manifest(path, first.split_manifest)
  assert split_for_run({"seed": 9}, workdir) == FolderSplit(seed=9, split_file=str(path))
  with caplog.at_level(logging.WARNING, logger="dml_jax.data"):
    again = load_dataset("folder", str(photos), folder_split=split_for_run({"seed": 9}, workdir))
  assert _classes(again.train) == _classes(first.train) and _classes(again.eval) == _classes(first.eval)
  assert list(again.train.paths) == list(first.train.paths)
  assert again.split_manifest == first.split_manifest  # the recorded settings, not the ignored ones
  assert "split.json" in caplog.text and "ignored" in caplog.text

  # A folder that changed since is refused with the differences, never silently re-split.
  extra = photos / "zebra"
  shutil.copytree(photos / "apple", extra)
  shutil.copy(photos / "cat" / "cat_000.jpg", photos / "cat" / "cat_new.jpg")
  with pytest.raises(DatasetLayoutError, match=r"(?s)not in the split: \['zebra'\].*cat: 4 -> 5 images"):
    load_dataset("folder", str(photos), folder_split=FolderSplit(split_file=str(path)))

  path.write_text('{"format": "something else"}')
  with pytest.raises(DatasetLayoutError, match="not a folder split manifest"):
    load_dataset("folder", str(photos), folder_split=FolderSplit(split_file=str(path)))


def test_classes_file_names_the_test_or_the_training_classes(photos, tmp_path):
  listing = tmp_path / "classes.txt"
  listing.write_text("# held out\ncat\n\nfern \neagle\n")
  splits = load_dataset("folder", str(photos), folder_split=FolderSplit(classes_file=str(listing)))
  assert _classes(splits.eval) == ["cat", "eagle", "fern"]
  assert _classes(splits.train) == ["apple", "bicycle", "door", "guitar", "harbour"]
  assert "test classes listed in" in splits.split_manifest["rule"]
  as_train = load_dataset("folder", str(photos),
                          folder_split=FolderSplit(classes_file=str(listing), classes_file_split="train"))
  assert _classes(as_train.train) == ["cat", "eagle", "fern"]

  listing.write_text("cat\ncow\n")
  with pytest.raises(DatasetLayoutError, match=r"not folders of the data root: \['cow'\]"):
    load_dataset("folder", str(photos), folder_split=FolderSplit(classes_file=str(listing)))
  listing.write_text("cat\n")  # one test class cannot be evaluated
  with pytest.raises(DatasetLayoutError, match="leaves 1 test class"):
    load_dataset("folder", str(photos), folder_split=FolderSplit(classes_file=str(listing)))


def test_bad_folders_are_refused_naming_what_is_wrong(tmp_path, caplog):
  root = tmp_path / "few"
  synthetic.picture_folder(str(root), ["a", "b", "c", "d"], [3, 1, 3, 3].__getitem__, size=(20, 16))
  (root / "empty").mkdir()
  with pytest.raises(DatasetLayoutError, match=r"fewer than 2 images.*\['b \(1\)', 'empty \(0\)'\]"):
    load_dataset("folder", str(root))

  shutil.rmtree(root / "empty")
  shutil.copy(root / "a" / "a_000.jpg", root / "b" / "b_001.jpg")
  shutil.copy(root / "a" / "a_000.jpg", root / "loose.jpg")
  (root / "c" / "notes.txt").write_text("not an image")
  with caplog.at_level(logging.WARNING, logger="dml_jax.data"):
    splits = load_dataset("folder", str(root))  # 4 classes: the smallest folder that splits
  assert len(splits.train.class_names) == 2 and "loose.jpg" in caplog.text
  assert all(not p.endswith(".txt") for p in splits.eval.paths)
  with pytest.raises(DatasetLayoutError, match="gives 3 training and 1 test classes"):
    load_dataset("folder", str(root), folder_split=FolderSplit(train_fraction=0.75))

  shutil.rmtree(root / "d")
  with pytest.raises(DatasetLayoutError, match="each side needs at least 2"):
    load_dataset("folder", str(root))
  flat = tmp_path / "flat"
  flat.mkdir()
  shutil.copy(root / "loose.jpg", flat / "x.jpg")
  with pytest.raises(DatasetLayoutError, match=r"no recognised layout(?s:.*)<data_root>/<class>/<image>"):
    load_dataset("folder", str(flat))
  with pytest.raises(ValueError, match="train_fraction must lie in"):
    FolderSplit(train_fraction=1.0)
  with pytest.raises(KeyError, match="unknown option"):
    FolderSplit.from_mapping({"fraction": 0.5})
  with pytest.raises(ValueError, match="'folder' dataset only"):
    load_dataset("digits", None, folder_split=FolderSplit())


def test_nested_images_and_verify_cli(photos, capsys):
  nested = photos / "cat" / "2024" / "summer"
  nested.mkdir(parents=True)
  shutil.copy(photos / "cat" / "cat_000.jpg", nested / "beach.jpg")
  splits = load_dataset("folder", str(photos))
  everything = list(splits.train.paths) + list(splits.eval.paths)
  assert str(nested / "beach.jpg") in everything and len(everything) == sum(2 + c % 3 for c in range(8)) + 1
  assert data_cli(["verify", "--dataset", "folder", "--data_root", str(photos)]) == 0
  assert "dataset folder: <class>/<image>" in capsys.readouterr().out


def test_folder_config_loads_and_builds():
  spec = importlib.util.spec_from_file_location("folder_vits", REPO / "configs" / "folder_vits.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  assert c.dataset.name == "folder" and c.model.weights and c.method.loss.name == "proxy_anchor"
  split = FolderSplit.from_mapping(c.dataset.folder)
  assert dataclasses.replace(split, split_file="") == FolderSplit()  # today's loader default splits alike
  assert protocols.get_protocol(c.eval.protocol).recall_ks == (1, 2, 4, 8)
  doc = module.__doc__
  assert "convert_timm_weights.py" in doc and "python train.py --config configs/folder_vits.py" in doc
  check_config(c)
  methods.build(c, num_classes=4)
  assert os.path.basename(c.model.weights) == "vit_s16"
