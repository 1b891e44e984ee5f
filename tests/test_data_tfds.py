"""tfds source: tiny array_record datasets written without TensorFlow, re-split by class."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dml_jax.data import DatasetLayoutError, load_dataset, make_eval_loader, synthetic
from dml_jax.data.tfds_source import read_tfds
from dml_jax.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PretrainedCfg

CFG = PretrainedCfg(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def test_cub_tfds_resplit_by_class(tmp_path):
  train = [dict(label=lab, **{"image/filename": f"{lab + 1:03d}.X/{n}.jpg"}) for lab, n in
           [(5, "b"), (0, "z"), (99, "a"), (100, "c"), (150, "d"), (5, "a")]]
  test = [dict(label=lab, **{"image/filename": f"{lab + 1:03d}.X/{n}.jpg"}) for lab, n in
          [(0, "a"), (99, "q"), (120, "e"), (199, "f")]]
  synthetic.tfds_dataset(str(tmp_path), "caltech_birds2011", {"train": train, "test": test})
  splits = read_tfds("cub200", str(tmp_path), cache_dir=str(tmp_path / "cache"))
  assert (len(splits.train), splits.train.num_classes) == (6, 3)
  assert (len(splits.eval), splits.eval.num_classes) == (4, 4)
  # Raw-reader order: by class, then file name; labels re-indexed within each split.
  assert splits.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
  assert [p.rsplit("/", 1)[-1] for p in splits.train.paths] == ["a.jpg", "z.jpg", "a.jpg", "b.jpg", "a.jpg", "q.jpg"]
  assert list(splits.eval.class_names) == ["100", "120", "150", "199"]  # the tfds label of each class
  assert (splits.train.roles == "train").all() and (splits.eval.roles == "test").all()
  image = splits.train[0]["image"]
  assert image.shape == (10, 12, 3) and image.dtype == np.uint8
  assert len(os.listdir(tmp_path / "cache")) == 1
  again = read_tfds("cub200", str(tmp_path), cache_dir=str(tmp_path / "cache"))  # from the cache
  np.testing.assert_array_equal(again.train.labels, splits.train.labels)
  batch = next(iter(make_eval_loader(splits.eval, batch_size=4, pretrained_cfg=CFG, image_size=8, resize_size=8,
                                     num_threads=1)))
  assert batch["valid"].all() and batch["image"].shape == (4, 8, 8, 3)


def test_cars_and_sop_tfds(tmp_path):
  synthetic.tfds_dataset(str(tmp_path), "cars196", {
      "train": [dict(label=lab, id=f"{i:05d}") for i, lab in enumerate([0, 97, 98, 195, 10])],
      "test": [dict(label=lab, id=f"{i:05d}") for i, lab in enumerate([0, 98, 100])]})  # ids repeat across splits
  cars = load_dataset("cars196", source="tfds", tfds_data_dir=str(tmp_path))
  assert (len(cars.train), cars.train.num_classes, len(cars.eval), cars.eval.num_classes) == (4, 3, 4, 3)
  assert len(set(cars.train.paths.tolist())) == 4  # (split, index) keeps duplicate ids apart
  synthetic.tfds_dataset(str(tmp_path), "stanford_online_products", {
      "train": [dict(class_id=c) for c in [0, 0, 3, 11317]],
      "test": [dict(class_id=c) for c in [11318, 20000, 20000]]})
  sop = load_dataset("sop", source="tfds", tfds_data_dir=str(tmp_path))
  assert sop.train.labels.tolist() == [0, 0, 1, 2] and sop.eval.labels.tolist() == [0, 1, 1]


def test_inaturalist_tfds_uses_split_lists(tmp_path):
  ids = [f"{i:032x}" for i in range(7)]
  synthetic.tfds_dataset(str(tmp_path / "tfds"), "i_naturalist2018", {
      "train": [dict(id=i, label=3) for i in ids[:5]], "validation": [dict(id=i, label=4) for i in ids[5:]]})
  lists = tmp_path / "data" / "inaturalist"
  lists.mkdir(parents=True)
  (lists / "Inaturalist_train_set1.txt").write_text("".join(
      f"train_val2018/{key}/{ids[i]}.jpg\n" for key, i in (("Plantae/7", 0), ("Fungi/2", 6), ("Plantae/7", 3))))
  (lists / "Inaturalist_test_set1.txt").write_text(f"train_val2018/Aves/9/{ids[1]}.jpg\n")
  splits = load_dataset("inaturalist", str(tmp_path / "data"), source="tfds", tfds_data_dir=str(tmp_path / "tfds"))
  assert splits.train.labels.tolist() == [0, 1, 0]
  assert list(splits.train.class_names) == ["Plantae/7", "Fungi/2"]
  assert len(splits.eval) == 1
  (lists / "Inaturalist_test_set1.txt").write_text("train_val2018/Aves/9/ffff.jpg\n")
  with pytest.raises(DatasetLayoutError, match="not in the tfds dataset"):
    load_dataset("inaturalist", str(tmp_path / "data"), source="tfds", tfds_data_dir=str(tmp_path / "tfds"))


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(DatasetLayoutError) as err:
    load_dataset("cars196", source="tfds", tfds_data_dir=str(tmp_path))
  message = str(err.value)
  assert "not prepared" in message and "tfds build cars196" in message and "manual_dir" in message
  assert not any(tmp_path.iterdir()) or not (tmp_path / "downloads").exists()  # nothing was downloaded
  with pytest.raises(DatasetLayoutError, match="tfds covers"):
    load_dataset("inshop", source="tfds", tfds_data_dir=str(tmp_path))
