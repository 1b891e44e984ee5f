"""The embedded digits demo dataset: written once into the CUB layout, read by the class-folder reader."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dml_jax.data import ensure_digits_tree, load_dataset


def test_digits_tree_and_splits(tmp_path, monkeypatch):
  monkeypatch.setenv("DML_JAX_CACHE_DIR", str(tmp_path / "cache"))
  splits = load_dataset("digits")  # data_root None: the cache folder, written on first use
  assert splits.root == str(tmp_path / "cache" / "digits")
  assert (len(splits.train), splits.num_train_classes) == (901, 5)
  assert (len(splits.eval), splits.eval.num_classes) == (896, 5)
  assert [n.split(".")[1] for n in splits.train.class_names] == [f"digit_{d}" for d in range(5)]
  assert [n.split(".")[1] for n in splits.eval.class_names] == [f"digit_{d}" for d in range(5, 10)]
  record = splits.eval[0]
  assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8
  assert (record["image"][..., 0] == record["image"][..., 2]).all()  # grayscale PNG -> RGB
  mtime = os.path.getmtime(splits.root)
  assert ensure_digits_tree(str(tmp_path / "cache")) == splits.root  # idempotent
  assert os.path.getmtime(splits.root) == mtime


def test_incomplete_digits_tree_is_refused(tmp_path):
  (tmp_path / "digits" / "images").mkdir(parents=True)
  with pytest.raises(FileExistsError, match="not a complete digits tree"):
    ensure_digits_tree(str(tmp_path))
