"""The configs/ files load, follow the Proxy-Anchor recipes and build their method."""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest

from dml_jax.train.config import check_config, default_config

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# The Proxy-Anchor README commands (github.com/tjddus9597/Proxy-Anchor-CVPR2020, README "Train" section; train.py
# defaults: AdamW, weight decay 1e-4, lr decay gamma 0.5, 60 epochs, seed 1): (batch, lr, warm, bn-freeze,
# lr-decay-step, lr-decay-gamma). The README has no ResNet-50 SOP / In-Shop command: those configs take
# the BN-Inception SOP settings with ResNet-50's batch, and say so in their docstrings.
README_COMMANDS = {
    ("cub200", "bn_inception"): (180, 1e-4, 1, True, 10, 0.5),
    ("cars196", "bn_inception"): (180, 1e-4, 1, True, 20, 0.5),
    ("sop", "bn_inception"): (180, 6e-4, 1, False, 20, 0.25),
    ("inshop", "bn_inception"): (180, 6e-4, 1, False, 20, 0.25),
    ("cub200", "resnet50"): (120, 1e-4, 5, True, 5, 0.5),
    ("cars196", "resnet50"): (120, 1e-4, 5, True, 10, 0.5),
    ("sop", "resnet50"): (120, 6e-4, 1, False, 20, 0.25),
    ("inshop", "resnet50"): (120, 6e-4, 1, False, 20, 0.25),
}


def test_proxy_anchor_configs_equal_the_readme_commands():
  paths = sorted(glob.glob(os.path.join(CONFIG_DIR, "proxy_anchor_*.py")))
  assert len(paths) == 8
  seen = set()
  for path in paths:
    c = _load(path)
    backbone = "bn_inception" if "bninception" in path else "resnet50"
    batch, lr, warm, bn_freeze, step, gamma = README_COMMANDS[(c.dataset.name, backbone)]
    seen.add((c.dataset.name, backbone))
    assert (c.data.batch_size, c.optim.lr, c.method.bn_freeze) == (batch, lr, bn_freeze), path
    assert (c.optim.schedule.name, c.optim.schedule.step_size, c.optim.schedule.gamma) == ("step", step, gamma)
    assert c.optim.optimizer == "adamw" and c.optim.weight_decay == 1e-4 and c.optim.clip_value == 10.0
    # Warm-up trains the embedding layer and the proxies only; at its end the code re-enables the whole
    # backbone, BN scale/bias included. Proxies at 100x lr.
    assert c.optim.groups == (("model/backbone/.*", dict(name="backbone", start_epoch=warm)),
                              ("loss/.*", dict(name="proxies", lr_mult=100.0))), path
    assert c.method.head == "gap_gmp_linear" and c.model.embedding_dim == 512 and c.model.weights
    assert c.method.loss.name == "proxy_anchor" and dict(c.method.loss.hparams) == dict(alpha=32.0, margin=0.1)
    assert c.data.sampler == "random" and c.eval.select_on == "test" and c.num_epochs == 60 and c.seed == 1
    assert c.model.backbone == {"bn_inception": "bn_inception", "resnet50": "resnet50.tv_in1k"}[backbone]
    if backbone == "bn_inception" and not bn_freeze:  # their BN-Inception file: torch momentum 0.9
      assert c.model.backbone_overrides.bn_momentum == 0.9
    doc = open(path).read()
    assert "python train.py --config configs/" in doc and "convert_timm_weights.py" in doc
    assert "not reproduced here" in doc.lower() or "nothing was reproduced here" in doc.lower()
    check_config(c)
  assert seen == set(README_COMMANDS)


def test_demo_config_is_locked_and_complete():
  c = _load(os.path.join(CONFIG_DIR, "demo.py"))
  c.lock()
  with pytest.raises(AttributeError, match="lrr"):
    c.optim.lrr = 1.0
  assert set(default_config().keys()) == set(c.keys())
