"""Prepared ArrayRecord shards: same records as the raw folders, shrunk images, CLI and auto-detection.

torchvision's resize comes from tests/references (`ref` fixture, tests/reference.py).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dml_jax.data import load_dataset, make_train_loader, prepare, synthetic
from dml_jax.data.__main__ import main as cli_main
from dml_jax.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PretrainedCfg

CFG = PretrainedCfg(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _same_records(raw, prepared):
  np.testing.assert_array_equal(raw.labels, prepared.labels)
  np.testing.assert_array_equal(raw.roles, prepared.roles)
  np.testing.assert_array_equal(raw.class_names, prepared.class_names)
  assert all(p.startswith(r + " [prepared ") for r, p in zip(raw.paths, prepared.paths))


def test_prepared_equals_raw_and_trains_identically(ref, tmp_path):
  root, out = tmp_path / "raw", tmp_path / "prepared"
  synthetic.cub_folders(str(root), "cub200", num_classes=6, size=(36, 30))
  # One PNG, one grayscale JPEG and one large image that must be shrunk.
  cls = root / "cub200" / "images" / "001.Bird_1"
  (cls / "gray.jpg").write_bytes(synthetic.image_bytes(9, (30, 40), "JPEG", "L"))
  (cls / "pal.png").write_bytes(synthetic.image_bytes(8, (33, 31), "PNG", "P"))
  (cls / "zz_big.jpg").write_bytes(synthetic.image_bytes(7, (120, 90)))
  folder = prepare("cub200", str(root), str(out), shorter_side=48, num_threads=2, records_per_shard=3)
  raw = load_dataset("cub200", str(root))
  prep = load_dataset("cub200", str(out))  # 'auto' finds the shards
  assert prep.layout.startswith("prepared") and raw.layout.startswith("images")
  for split in ("train", "eval"):
    r, p = getattr(raw, split), getattr(prep, split)
    _same_records(r, p)
    for i in range(len(r)):
      a, b = r[i], p[i]
      assert (a["label"], a["role"], a["index"]) == (b["label"], b["role"], b["index"])
      if not r.paths[i].endswith("zz_big.jpg"):
        np.testing.assert_array_equal(a["image"], b["image"])  # small images are stored byte for byte
  big = int(np.flatnonzero([p.endswith("zz_big.jpg") for p in raw.train.paths])[0])
  shrunk = prep.train[big]["image"]
  assert shrunk.shape == (48, 64, 3)
  original = raw.train[big]["image"]

  def compute():  # torchvision's resize of the shorter side: the reference for the shrunk image
    from torchvision import transforms as T

    return {"resized": np.asarray(T.Resize(48)(Image.fromarray(original)))}

  expected = ref("data_prepare/resize_shorter_side_48", compute)["resized"]
  assert np.abs(shrunk.astype(int) - expected.astype(int)).mean() < 2.0
  # Training from shards and from folders gives the same batches (no image was shrunk in this subset).
  keep = np.flatnonzero([not p.endswith("zz_big.jpg") for p in raw.train.paths])
  kw = dict(batch_size=4, pretrained_cfg=CFG, image_size=16, sampler="random", seed=1, num_threads=2)
  for a, b in zip(make_train_loader(raw.train.subset(keep), **kw).epoch(0),
                  make_train_loader(prep.train.subset(keep), **kw).epoch(0)):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert load_dataset("cub200", str(root), source="raw").layout == raw.layout
  with pytest.raises(FileExistsError):
    prepare("cub200", str(root), str(out))
  assert folder == str(out / "cub200")


def test_prepared_keeps_inshop_roles_and_vehicleid_lists(tmp_path):
  synthetic.inshop(str(tmp_path / "raw"), "inshop")
  synthetic.vehicleid(str(tmp_path / "raw"), "VehicleID_V1.0")
  for name in ("inshop", "vehicleid"):
    prepare(name, str(tmp_path / "raw"), str(tmp_path / "out"), num_threads=2)
  raw = load_dataset("inshop", str(tmp_path / "raw"))
  prep = load_dataset("inshop", str(tmp_path / "out"), source="prepared")
  _same_records(raw.eval, prep.eval)
  for size in ("small", "large"):
    r = load_dataset("vehicleid", str(tmp_path / "raw"), vehicleid_test_size=size)
    p = load_dataset("vehicleid", str(tmp_path / "out"), vehicleid_test_size=size)
    _same_records(r.eval, p.eval)
    assert set(p.extra) == set(r.extra)


def test_prepare_and_verify_cli(tmp_path, capsys):
  synthetic.sop(str(tmp_path / "raw"), "online_products")
  assert cli_main(["prepare", "--dataset", "sop", "--data_root", str(tmp_path / "raw"), "--out",
                   str(tmp_path / "out"), "--num_threads", "2"]) == 0
  assert cli_main(["verify", "--dataset", "sop", "--data_root", str(tmp_path / "out"), "--source", "prepared",
                   "--check_images"]) == 0
  out = capsys.readouterr().out
  assert "prepared" in out and "0 unreadable" in out
  assert cli_main(["verify", "--dataset", "cars196", "--data_root", str(tmp_path / "out"), "--source",
                   "prepared"]) == 2  # one `error:` line: no prepared cars196 there
  # A record decodes from the shard bytes alone.
  prep = load_dataset("sop", str(tmp_path / "out"))
  img = Image.open(io.BytesIO(prep.train.read_source(0)))
  assert img.format == "JPEG"
