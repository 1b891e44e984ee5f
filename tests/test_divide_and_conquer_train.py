"""Divide & Conquer through the trainer on the embedded digits: exact resume across re-clusterings, the demo,
and the released configs."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import orbax.checkpoint as ocp
import pytest

from dml_jax import methods
from dml_jax import pytree as tree_lib
from dml_jax.train import loop
from dml_jax.train.config import check_config

REPO = pathlib.Path(__file__).resolve().parents[1]
DATASET_CONFIGS = {"cub200": "dnc_cub_resnet50.py", "cars196": "dnc_cars_resnet50.py", "sop": "dnc_sop_resnet50.py",
                   "inshop": "dnc_inshop_resnet50.py", "vehicleid": "dnc_vehicleid_resnet50.py"}


def load_config(name, *args):
  spec = importlib.util.spec_from_file_location(name[:-3], REPO / "configs" / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def small_demo(num_epochs):
  c = load_config("demo_dnc.py")
  c.num_epochs = num_epochs
  c.model.backbone_overrides.channels = (8, 16)
  c.model.backbone_overrides.stem_width = 8
  c.data.batch_size = 16
  c.data.steps_per_epoch = 3
  c.data.num_threads = 2
  c.eval.every_epochs = 0
  c.eval.before_training = False
  c.log.every_steps = 1
  c.log.progress = False
  c.log.tensorboard = False
  return c


def train_losses(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [(r["step"], r["loss"], r["mask_loss"], r["cluster"]) for r in map(json.loads, lines) if r["kind"] == "train"]


def last_state(workdir):
  from dml_jax.train import checkpoint as ckpt_lib
  checkpoints = ckpt_lib.Checkpoints(workdir, read_only=True)
  step = checkpoints.latest_step()
  checkpoints.close()
  path = pathlib.Path(workdir).absolute() / "checkpoints" / "steps" / str(step) / "state"
  return step, ocp.StandardCheckpointer().restore(path)


@pytest.mark.integration
def test_resume_across_reclusterings_is_exact(tmp_path):
  # Epochs 0-4, re-clustering at 0, 2 (K 1 -> 2) and 4 (K 2 -> 4). The resumed run stops after epoch 2, then
  # rebuilds epoch 3's batches (the sampler replays epoch 2's passes) and re-clusters at epoch 4 from the
  # restored parameters: the losses, the clusters and every array of the state come out the same.
  loop.fit(small_demo(5), tmp_path / "full")
  loop.fit(small_demo(3), tmp_path / "resumed")
  loop.fit(small_demo(5), tmp_path / "resumed")
  full, resumed = train_losses(tmp_path / "full"), train_losses(tmp_path / "resumed")
  assert [s for s, *_ in full] == list(range(1, 16))
  assert full == resumed
  # K = 1 on epochs 0-1 (no regulariser), 2 clusters in turn on epochs 2-3, then 4 (or fewer, if skipped).
  assert {c for _, _, _, c in full[:6]} == {0.0} and all(m == 0 for _, _, m, _ in full[:6])
  assert [c for _, _, _, c in full[6:9]] == [0.0, 1.0, 0.0] and all(m > 0 for _, _, m, _ in full[6:])
  step_full, state_full = last_state(tmp_path / "full")
  step_resumed, state_resumed = last_state(tmp_path / "resumed")
  assert step_full == step_resumed == 15
  flat_full, flat_resumed = tree_lib.flatten(state_full), tree_lib.flatten(state_resumed)
  assert sorted(flat_full) == sorted(flat_resumed)
  for path, value in flat_full.items():
    assert np.asarray(value).tobytes() == np.asarray(flat_resumed[path]).tobytes(), path
  assert int(state_full["method_state"]["num_clusters"]) == 4
  clusters = np.asarray(state_full["method_state"]["clusters"])
  assert clusters.shape == (901,) and set(np.unique(clusters)) <= {-1, 0, 1, 2, 3}
  # The masks' Adam state restarted at the split of epoch 4: 3 steps since (its count), the backbone's runs on.
  counts = {p.split("/")[1]: int(v) for p, v in flat_full.items() if p.startswith("opt_state/") and
            p.endswith("/count")}
  assert counts == {"masks": 3, "backbone": 15, "base": 15}


@pytest.mark.integration
def test_demo_recall_rises(tmp_path):
  c = load_config("demo_dnc.py")
  c.num_epochs = 6  # K grows 1 -> 2 -> 4
  c.eval.every_epochs = 6
  c.log.progress = False
  c.log.tensorboard = False
  summary = loop.fit(c, tmp_path)
  before = next(h for h in summary["history"] if h["epoch"] == "before")
  after = summary["history"][-1]
  assert after["epoch"] == 5
  assert after["recall@1"] >= before["recall@1"] + 0.03, (before, after)
  assert after["marp"] >= before["marp"] + 0.05, (before, after)


@pytest.mark.parametrize("dataset", sorted(DATASET_CONFIGS))
def test_released_configs_follow_the_readme_command(dataset):
  for variant in ("learn", "fixed"):
    c = load_config(DATASET_CONFIGS[dataset], variant)
    check_config(c)
    assert c.dataset.name == dataset and c.method.name == "divide_and_conquer" and c.method.variant == variant
    o = c.method
    assert (o.num_clusters, o.mod_epoch, o.force_full_embedding_epoch, o.masking_lambda) == (32, 2, 80, 0.01)
    assert (o.margin, o.beta, o.features_dropout, o.clustering.niter, o.clustering.trials) == (0.2, 1.2, 0.01, 100, 30)
    assert o.sampler.small_class_action == "sample_other" and o.clustering.reassign_inverse_bug
    assert (c.num_epochs, c.data.batch_size, c.data.samples_per_class) == (180, 80, 2)
    assert (c.optim.optimizer, c.optim.lr, c.optim.weight_decay, c.optim.schedule.name) == ("adam", 1e-5, 1e-4,
                                                                                               "constant")
    masks = dict(name="masks", frozen=True) if variant == "fixed" else dict(name="masks", lr_mult=100.0,
                                                                               stop_epoch=80)
    assert c.optim.groups == (("model/masks", masks),
                              ("model/backbone/.*", dict(name="backbone", lr_cycle=(0.0, 1.0))))
    assert c.model.backbone == "resnet50.tv_in1k" and c.model.embedding_dim == 512 and c.model.weights
    assert "marp" in c.eval.metrics and c.eval.select_metric == "recall@1"
  doc = (REPO / "configs" / DATASET_CONFIGS[dataset]).read_text()
  assert "python train.py --config configs/" in doc and "convert_timm_weights.py" in doc
  assert "the paper alone" in doc.lower()


def test_released_config_starts_on_digits(tmp_path):
  # The SOP recipe as released, on the digits with a tiny random-init ResNet and small batches: its groups,
  # sampler and hooks build and take steps (epoch 0: backbone at lr 0; epoch 1: everything trains).
  c = load_config("dnc_sop_resnet50.py")
  c.dataset.name, c.dataset.data_root, c.dataset.image_size, c.dataset.resize_size = "digits", "", 32, 32
  c.model.weights = ""
  c.model.backbone = "resnet50"
  c.model.backbone_overrides = dict(layers=(1, 1), channels=(8, 16), stem_width=8)
  c.num_epochs = 2
  c.data.batch_size, c.data.steps_per_epoch, c.data.eval_batch_size, c.data.num_threads = 16, 2, 64, 2
  c.eval.every_epochs, c.eval.before_training = 0, False
  c.log.progress, c.log.tensorboard, c.log.every_steps = False, False, 1
  summary = loop.fit(c, tmp_path)
  assert summary["best"] is None and np.isfinite([r[1] for r in train_losses(tmp_path)]).all()
  assert len(train_losses(tmp_path)) == 4
  assert methods.build(c, num_classes=5).step_variant(80) == "full"


def test_vehicleid_test_list_reaches_the_reader(tmp_path, monkeypatch):
  # dataset.vehicleid_test_size (engine key) selects the VehicleID list the trainer evaluates.
  from dml_jax import data as data_lib
  seen, load = {}, data_lib.load_dataset

  def fake_load(name, data_root=None, **kwargs):
    seen.update(kwargs, name=name)
    return load("digits")

  monkeypatch.setattr(loop.data_lib, "load_dataset", fake_load)
  c = small_demo(1)
  c.dataset.name, c.dataset.vehicleid_test_size = "vehicleid", "large"
  loop.Trainer(c, tmp_path).close()
  assert seen["name"] == "vehicleid" and seen["vehicleid_test_size"] == "large"
