"""Samplers and grain loaders: batch structure, determinism, mid-epoch resume, per-process shards."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dml_jax.data import (
  CorruptImageError,
  GroupedSampler,
  MPerClassSampler,
  RandomSampler,
  load_dataset,
  make_eval_loader,
  make_train_loader,
  synthetic,
  transforms,
)
from dml_jax.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PretrainedCfg

CFG = PretrainedCfg(mean=IMAGENET_MEAN, std=IMAGENET_STD)
_SIZES = {0: 1}  # class 0 has a single image: the m-per-class sampler must repeat it


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
  root = tmp_path_factory.mktemp("cub")
  synthetic.cub_folders(str(root), "cub200", num_classes=16, size=(40, 30),
                        images_per_class=lambda c: _SIZES.get(c, 3 + c % 3))
  return load_dataset("cub200", str(root))


def _run(loader, epoch, **kw):
  return [dict(b) for b in loader.epoch(epoch, **kw)]


def test_m_per_class_batches(splits):
  labels = splits.train.labels
  sampler = MPerClassSampler(labels, batch_size=8, samples_per_class=2, seed=3)
  assert len(sampler) == len(labels) // 8
  idx = sampler.epoch_indices(0)
  assert idx.shape == (len(sampler), 8)
  for batch in idx:
    blocks = labels[batch].reshape(4, 2)
    assert (blocks == blocks[:, :1]).all()  # each class's images contiguous
    assert len(set(blocks[:, 0].tolist())) == 4  # distinct classes
    for block in batch.reshape(4, 2):
      if labels[block[0]] != 0:
        assert block[0] != block[1]  # distinct images where the class has enough
  np.testing.assert_array_equal(idx, MPerClassSampler(labels, 8, 2, seed=3).epoch_indices(0))
  assert not np.array_equal(idx, sampler.epoch_indices(1))
  small = MPerClassSampler(labels, 8, 4, seed=0, steps_per_epoch=200).epoch_indices(0)
  zero_blocks = small.reshape(-1, 4)[labels[small.reshape(-1, 4)[:, 0]] == 0]
  assert len(zero_blocks) and (zero_blocks == zero_blocks[:, :1]).all()  # the 1-image class repeated
  with pytest.raises(ValueError, match="distinct classes"):
    MPerClassSampler(labels, batch_size=40, samples_per_class=2)


def test_m_per_class_with_replacement(splits):
  labels = splits.train.labels
  idx = MPerClassSampler(labels, 8, 2, seed=0, replace=True, steps_per_epoch=300).epoch_indices(0)
  blocks = labels[idx].reshape(-1, 2)
  assert (blocks == blocks[:, :1]).all()
  # With replacement, some batches repeat a class and some blocks repeat an image.
  assert any(len(set(b.tolist())) < 4 for b in labels[idx][:, ::2])
  assert any(b[0] == b[1] for b in idx.reshape(-1, 2))


def test_random_sampler_is_a_drop_last_permutation(splits):
  n = len(splits.train)
  sampler = RandomSampler(n, 8, seed=1)
  idx = sampler.epoch_indices(2)
  assert idx.shape == (n // 8, 8) and len(np.unique(idx)) == idx.size
  long = RandomSampler(n, 8, seed=1, steps_per_epoch=3 * (n // 8)).epoch_indices(0)
  assert long.shape == (3 * (n // 8), 8)
  assert len(np.unique(long[: n // 8])) == (n // 8) * 8


def test_grouped_sampler_round_robin(splits):
  labels = splits.train.labels
  groups = np.where(labels < 4, 0, 1)
  groups[labels == 7] = -1
  sampler = GroupedSampler(labels, groups, batch_size=4, samples_per_class=2, seed=0)
  idx = sampler.epoch_indices(0)
  batch_groups = groups[idx]
  assert (batch_groups == batch_groups[:, :1]).all()
  assert batch_groups[:, 0].tolist() == [0, 1] * (len(idx) // 2)
  assert not (labels[idx] == 7).any()
  np.testing.assert_array_equal(idx, GroupedSampler(labels, groups, 4, samples_per_class=2, seed=0).epoch_indices(0))


def test_train_loader_batches_deterministic(splits):
  kw = dict(batch_size=8, pretrained_cfg=CFG, image_size=16, samples_per_class=2, seed=5, num_threads=2)
  loader = make_train_loader(splits.train, **kw)
  a = _run(loader, 0)
  assert len(a) == len(loader) == len(splits.train) // 8
  assert a[0]["image"].shape == (8, 16, 16, 3) and a[0]["image"].dtype == np.float32
  assert a[0]["label"].dtype == np.int32
  expected = loader.sampler.epoch_indices(0)
  np.testing.assert_array_equal(np.stack([b["label"] for b in a]), splits.train.labels[expected])
  b = _run(make_train_loader(splits.train, **kw), 0)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  c = _run(loader, 1)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_train_loader_resume_mid_epoch(splits):
  loader = make_train_loader(splits.train, batch_size=8, pretrained_cfg=CFG, image_size=16, sampler="random",
                             seed=2, num_threads=2)
  full = _run(loader, 3)
  it = loader.epoch(3)
  head = [next(it), next(it)]
  state = json.loads(json.dumps(it.get_state()))
  assert state["epoch"] == 3 and state["step"] == 2
  resumed = _run(make_train_loader(splits.train, batch_size=8, pretrained_cfg=CFG, image_size=16,
                                   sampler="random", seed=2, num_threads=1), 3, state=state)
  assert len(head) + len(resumed) == len(full)
  for x, y in zip(head + resumed, full):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  with pytest.raises(ValueError, match="seed"):
    make_train_loader(splits.train, batch_size=8, pretrained_cfg=CFG, image_size=16, sampler="random",
                      seed=9).epoch(3, state=state)


def test_train_loader_process_shards_form_the_global_batch(splits):
  kw = dict(batch_size=8, pretrained_cfg=CFG, image_size=16, seed=7, num_threads=2)
  whole = _run(make_train_loader(splits.train, **kw), 1)
  parts = [_run(make_train_loader(splits.train, process_index=p, process_count=2, **kw), 1) for p in range(2)]
  assert parts[0][0]["image"].shape[0] == 4
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(np.concatenate([parts[0][step]["image"], parts[1][step]["image"]]),
                                  batch["image"])
    np.testing.assert_array_equal(np.concatenate([parts[0][step]["label"], parts[1][step]["label"]]),
                                  batch["label"])
  with pytest.raises(ValueError, match="divide"):
    make_train_loader(splits.train, process_count=3, **kw)


def test_eval_loader_order_padding_and_shards(splits):
  records = splits.eval
  loader = make_eval_loader(records, batch_size=8, pretrained_cfg=CFG, image_size=16, resize_size=18, num_threads=2)
  batches = list(loader)
  assert len(batches) == len(loader) == -(-len(records) // 8)
  index = np.concatenate([b["index"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.sum() == len(records) and not valid[len(records):].any()
  np.testing.assert_array_equal(index[valid], np.arange(len(records)))
  assert (index[~valid] == -1).all()
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[valid], records.labels)
  first = transforms.Normalizer(CFG)(transforms.eval_transform(records.open_image(0), size=16, resize_size=18))
  np.testing.assert_array_equal(batches[0]["image"][0], first)
  halves = [list(make_eval_loader(records, batch_size=8, pretrained_cfg=CFG, image_size=16, resize_size=18,
                                  process_index=p, process_count=2, num_threads=1)) for p in range(2)]
  for step, batch in enumerate(batches):
    for key in ("image", "index", "valid"):
      np.testing.assert_array_equal(np.concatenate([halves[0][step][key], halves[1][step][key]]), batch[key])


def test_corrupt_image_stops_with_path_or_is_skipped(tmp_path, caplog):
  synthetic.cub_folders(str(tmp_path), "cub200", num_classes=4, size=(40, 30), images_per_class=lambda c: 4)
  victim = tmp_path / "cub200" / "images" / "002.Bird_2" / "img_001_2.jpg"
  victim.write_bytes(victim.read_bytes()[:50])
  splits = load_dataset("cub200", str(tmp_path))
  loader = make_train_loader(splits.train, batch_size=8, pretrained_cfg=CFG, image_size=16, sampler="random",
                             num_threads=2, steps_per_epoch=4)
  with pytest.raises(CorruptImageError, match="img_001_2.jpg"):
    _run(loader, 0)
  skipped = load_dataset("cub200", str(tmp_path), skip_corrupt=True)
  assert len(skipped.train) == len(splits.train) - 1
  assert str(victim) not in skipped.train.paths.tolist()
  assert "skipped 1 unreadable" in caplog.text and os.path.basename(str(victim)) in caplog.text
