"""The configs/ files load, follow the Proxy-Anchor recipes and build their method."""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest

from dml_jax import methods
from dml_jax.train.config import PROXY_ANCHOR_RECIPES, default_config

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_proxy_anchor_configs_follow_the_readme_recipes():
  paths = sorted(glob.glob(os.path.join(CONFIG_DIR, "proxy_anchor_*.py")))
  assert len(paths) == 8
  seen = set()
  for path in paths:
    c = _load(path)
    backbone = "bn_inception" if "bninception" in path else "resnet50"
    r = PROXY_ANCHOR_RECIPES[(c.dataset.name, backbone)]
    seen.add((c.dataset.name, backbone))
    assert (c.data.batch_size, c.optim.lr, c.optim.warmup_epochs, c.model.bn_freeze) == (
        r["batch"], r["lr"], r["warm"], r["bn_freeze"]), path
    assert (c.optim.schedule.name, c.optim.schedule.step_size, c.optim.schedule.gamma) == ("step", r["step"], r["gamma"])
    assert c.optim.optimizer == "adamw" and c.optim.weight_decay == 1e-4 and c.optim.clip_value == 10.0
    assert c.optim.groups == (("loss/.*", dict(name="proxies", lr_mult=100.0)),)
    assert c.model.head == "gap_gmp_linear" and c.model.embedding_dim == 512 and c.model.weights
    assert c.model.bn_affine_trainable  # every recipe has warm-up 1 or 5, which re-enables BN scale/bias
    assert c.eval.select_on == "test" and c.num_epochs == 60 and c.seed == 1
    doc = open(path).read()
    assert "python train.py --config configs/" in doc and "convert_timm_weights.py" in doc
    assert "not reproduced here" in doc.lower() or "nothing was reproduced here" in doc.lower()
    methods.build(c, num_classes=100)
  assert seen == set(PROXY_ANCHOR_RECIPES)


def test_demo_config_is_locked_and_complete():
  c = _load(os.path.join(CONFIG_DIR, "demo.py"))
  c.lock()
  with pytest.raises(AttributeError, match="lrr"):
    c.optim.lrr = 1.0
  assert set(default_config().keys()) == set(c.keys())
