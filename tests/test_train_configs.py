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


# configs/demo.py and configs/folder_vits.py are this project's recipes, not a paper's: their values are the ones
# their docstrings state (written out here, not read from any table of the project), with the Proxy-Anchor code's
# loss settings (alpha 32, margin 0.1, proxies at 100x lr, element-wise gradient clamp 10, AdamW) and, for the
# folder recipe, timm's pretrained config of vit_small_patch16_224.augreg_in21k (bicubic, mean = std = 0.5).
DEMO = dict(seed=0, num_epochs=16, dataset="digits", image_size=32, resize_size=32, batch=64, eval_batch=128,
            sampler="random", scale=(0.6, 1.0), flip=False, patch=4, depth=2, width=64, heads=2, embedding=64,
            lr=1e-3, weight_decay=1e-4, t_max=16, eta_min=1e-5, eval_every=4)
FOLDER = dict(seed=0, num_epochs=30, image_size=224, resize_size=256, batch=32, scale=(0.25, 1.0), lr=2e-5,
              weight_decay=0.05, head_mult=10.0, warmup=1, eta_min=1e-7, embedding=384, train_fraction=0.5)


def _common_proxy_anchor_recipe(c):
  assert c.method.name == "metric_loss" and c.method.loss.name == "proxy_anchor"
  assert dict(c.method.loss.hparams) == dict(alpha=32.0, margin=0.1) and c.method.bn_freeze is False
  assert (c.optim.optimizer, c.optim.clip_value, c.optim.schedule.name) == ("adamw", 10.0, "cosine")
  assert c.data.sampler == "random" and c.eval.select_metric == "recall@1"
  assert tuple(c.eval.metrics) == ("recall", "map@r")


def test_demo_recipe_equals_its_stated_values():
  c, d = _load(os.path.join(CONFIG_DIR, "demo.py")), DEMO
  _common_proxy_anchor_recipe(c)
  assert (c.seed, c.num_epochs, c.dataset.name) == (d["seed"], d["num_epochs"], d["dataset"])
  assert (c.dataset.image_size, c.dataset.resize_size) == (d["image_size"], d["resize_size"])
  assert (c.data.batch_size, c.data.eval_batch_size, tuple(c.data.scale), c.data.flip) == (
      d["batch"], d["eval_batch"], d["scale"], d["flip"])
  o = c.model.backbone_overrides
  assert (o.img_size, o.patch_size, o.depth, o.embed_dim, o.num_heads) == (
      d["image_size"], d["patch"], d["depth"], d["width"], d["heads"])
  assert c.model.weights == "" and c.model.embedding_dim == d["embedding"] and c.method.head == "linear"
  assert (c.optim.lr, c.optim.weight_decay, c.optim.schedule.t_max, c.optim.schedule.eta_min) == (
      d["lr"], d["weight_decay"], d["t_max"], d["eta_min"])
  assert c.optim.groups == (("loss/.*", dict(name="proxies", lr_mult=100.0)),)
  assert c.eval.before_training is True and c.eval.every_epochs == d["eval_every"] and c.eval.protocol == ""
  doc = " ".join(open(os.path.join(CONFIG_DIR, "demo.py")).read().split('"""')[1].split())
  for stated in ("4x4 patches", "2 blocks of width 64", "64-d", "alpha 32, margin 0.1", "AdamW", "100x lr",
                 "Digits 0-4 train, 5-9 test", "every 4 epochs"):
    assert stated in doc, stated


def test_folder_recipe_equals_its_stated_values():
  c, f = _load(os.path.join(CONFIG_DIR, "folder_vits.py")), FOLDER
  _common_proxy_anchor_recipe(c)
  assert (c.seed, c.num_epochs, c.dataset.name, c.dataset.source) == (f["seed"], f["num_epochs"], "folder", "raw")
  assert (c.dataset.image_size, c.dataset.resize_size) == (f["image_size"], f["resize_size"])
  assert (c.dataset.folder.train_fraction, c.dataset.folder.classes_file_split) == (f["train_fraction"], "test")
  assert (c.data.batch_size, tuple(c.data.scale), c.data.flip) == (f["batch"], f["scale"], True)
  # timm's pretrained_cfg of the AugReg weights: bicubic resizing.
  assert c.data.interpolation == "bicubic" and c.model.backbone == "vit_small_patch16_224.augreg_in21k"
  from dml_jax.backbones.registry import get_pretrained_cfg

  cfg = get_pretrained_cfg(c.model.backbone)
  assert (tuple(cfg.mean), tuple(cfg.std), cfg.interpolation) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
  assert c.model.embedding_dim == f["embedding"] and c.method.head == "linear"
  assert (c.optim.lr, c.optim.weight_decay, c.optim.schedule.t_max, c.optim.schedule.eta_min) == (
      f["lr"], f["weight_decay"], f["num_epochs"], f["eta_min"])
  assert c.optim.groups == (("model/backbone/.*", dict(name="backbone", start_epoch=f["warmup"])),
                            ("loss/.*", dict(name="proxies", lr_mult=100.0, weight_decay=0.0)),
                            ("model/head/.*", dict(name="head", lr_mult=f["head_mult"])))
  assert (c.eval.protocol, c.eval.select_on, c.eval.every_epochs, c.eval.before_training) == ("folder", "test", 1, True)
  doc = " ".join(open(os.path.join(CONFIG_DIR, "folder_vits.py")).read().split('"""')[1].split())
  for stated in ("224 px, batch 32", "Linear(384 -> 384)", "alpha 32, margin 0.1", "AdamW lr 2e-5",
                 "weight decay 0.05", "head x10, proxies x100", "one warm-up epoch", "cosine decay over 30 epochs",
                 "gradient clamp 10", "scale 0.25-1"):
    assert stated in doc, stated
  check_config(c)


def test_demo_dnc_recipe_equals_its_stated_values():
  # D&C's code (CompVis/metric-learning-divide-and-conquer-improved): mod_epoch 2, masking lambda 0.01, feature
  # dropout 0.01, Adam (coupled L2) with weight decay 1e-4, the backbone frozen on alternate epochs; the demo's
  # docstring: K = 4 clusters, widths 16 / 32, Adam 1e-3 (masks x10), batches of 32, 16 epochs, full embedding
  # from epoch 12.
  c = _load(os.path.join(CONFIG_DIR, "demo_dnc.py"))
  o = c.method
  assert (o.name, o.variant, o.num_clusters, o.mod_epoch, o.force_full_embedding_epoch) == (
      "divide_and_conquer", "learn", 4, 2, 12)
  assert (o.masking_lambda, o.features_dropout) == (0.01, 0.01)
  assert (c.seed, c.num_epochs, c.dataset.name, c.data.batch_size, c.data.samples_per_class) == (0, 16, "digits", 32, 2)
  assert (c.dataset.image_size, tuple(c.data.scale), c.data.flip) == (32, (0.6, 1.0), False)
  assert dict(c.model.backbone_overrides) == dict(layers=(1, 1), channels=(16, 32), stem_width=16)
  assert (c.model.backbone, c.model.embedding_dim, c.model.weights) == ("resnet50", 64, "")
  assert (c.optim.optimizer, c.optim.lr, c.optim.weight_decay, c.optim.schedule.name) == ("adam", 1e-3, 1e-4,
                                                                                           "constant")
  assert c.optim.groups == (("model/masks", dict(name="masks", lr_mult=10.0, stop_epoch=12)),
                            ("model/backbone/.*", dict(name="backbone", lr_cycle=(0.0, 1.0))))
  assert (tuple(c.eval.metrics), c.eval.every_epochs, c.eval.select_metric) == (("recall", "marp"), 4, "recall@1")
  doc = " ".join(open(os.path.join(CONFIG_DIR, "demo_dnc.py")).read().split('"""')[1].split())
  for stated in ("K = 4 clusters", "every 2 epochs", "widths 16 / 32", "Adam at 1e-3 (masks x10)", "batches of 32",
                 "16 epochs", "from epoch 12"):
    assert stated in doc, stated
  check_config(c)


def test_demo_proxy_isa_recipe_equals_its_stated_values():
  # Proxy-ISA's code constants (ProxyISA/code/train.py and losses.py): alpha 32, delta 0.1, V 100, k 0.9,
  # lambda 0.1, h 0.15, tau 1.5, no ring buffer; the demo's docstring: T = 512 from epoch 2, AdamW as
  # configs/demo.py, proxies x100, batches of 32, best MAP@R kept.
  c = _load(os.path.join(CONFIG_DIR, "demo_proxy_isa.py"))
  o = c.method
  assert (o.name, o.alpha, o.margin, o.volume, o.eta_scale, o.eta_margin, o.hardness_scale, o.tau) == (
      "proxy_isa", 32.0, 0.1, 100.0, 0.9, 0.1, 0.15, 1.5)
  assert (o.memory_size, o.start_epoch, o.ring_buffer, o.head, o.bn_freeze) == (512, 2, False, "linear", False)
  d = DEMO
  assert (c.seed, c.num_epochs, c.dataset.name, c.data.batch_size, c.data.sampler) == (0, 16, "digits", 32, "random")
  ov = c.model.backbone_overrides
  assert (ov.img_size, ov.patch_size, ov.depth, ov.embed_dim, ov.num_heads, c.model.embedding_dim) == (
      d["image_size"], d["patch"], d["depth"], d["width"], d["heads"], d["embedding"])
  assert (c.optim.optimizer, c.optim.lr, c.optim.weight_decay, c.optim.clip_value) == ("adamw", d["lr"],
                                                                                        d["weight_decay"], 10.0)
  assert (c.optim.schedule.name, c.optim.schedule.t_max, c.optim.schedule.eta_min) == ("cosine", 16, d["eta_min"])
  assert c.optim.groups == (("loss/.*", dict(name="proxies", lr_mult=100.0)),)
  assert (tuple(c.eval.metrics), c.eval.every_epochs, c.eval.select_metric) == (("recall", "map@r"), 4, "map@r")
  doc = " ".join(open(os.path.join(CONFIG_DIR, "demo_proxy_isa.py")).read().split('"""')[1].split())
  for stated in ("alpha 32, delta 0.1, V 100, k 0.9, lambda 0.1, h 0.15, tau 1.5", "T = 512", "from epoch 2",
                 "proxies at 100x lr", "batches of 32", "the best MAP@R is kept"):
    assert stated in doc, stated
  check_config(c)


def test_demo_dfml_recipe_equals_its_stated_values():
  # DFML's code constants (wangck20/DFML train.py: PA(m1) + 0.5 PA(m2) + 0.5 (0.1 sum ||m2 - sg(m1)|| +
  # 0.00001 / 12 per block and term), alpha 32, mrg 0.1, 3 sub-blocks, AdamW with weight decay 1e-4, proxies at
  # 100x lr, clamp 10, StepLR); the demo's docstring: a distilled DeiT of width 48, depth 2, 6 heads, 4x4
  # patches on 32 px digits, lr 2e-3, batch 64, one warm-up epoch (proxies only), 16 epochs.
  c = _load(os.path.join(CONFIG_DIR, "demo_dfml.py"))
  assert c.method.to_dict() == dict(name="dfml", num_sub_blocks=3, routed_loss_weight=0.5, distill_loss_weight=0.5,
                                    embedding_distill_weight=0.1, layer_distill_weight=1e-5,
                                    layer_distill_divisor=12.0, loss=dict(alpha=32.0, margin=0.1))
  assert (c.seed, c.num_epochs, c.dataset.name, c.dataset.image_size, c.dataset.resize_size) == (
      0, 16, "digits", 32, 32)
  assert (c.data.batch_size, c.data.eval_batch_size, c.data.sampler, tuple(c.data.scale), c.data.flip) == (
      64, 128, "random", (0.6, 1.0), False)
  assert c.model.backbone == "deit_small_distilled_patch16_224" and c.model.weights == ""
  assert dict(c.model.backbone_overrides) == dict(img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=6)
  assert c.model.embedding_dim == 48
  assert (c.optim.optimizer, c.optim.lr, c.optim.weight_decay, c.optim.clip_value) == ("adamw", 2e-3, 1e-4, 10.0)
  assert (c.optim.schedule.name, c.optim.schedule.step_size, c.optim.schedule.gamma) == ("step", 8, 0.5)
  assert c.optim.groups == (("loss/.*", dict(name="proxies", lr_mult=100.0)),
                            ("model/.*", dict(name="model", start_epoch=1)))
  assert (tuple(c.eval.metrics), c.eval.every_epochs, c.eval.select_metric, c.eval.before_training) == (
      ("recall", "map@r"), 4, "recall@1", True)
  doc = " ".join(open(os.path.join(CONFIG_DIR, "demo_dfml.py")).read().split('"""')[1].split())
  for stated in ("width 48, depth 2, 6 heads, 4x4 patches", "3 attention and 3 MLP sub-blocks", "(48-d)",
                 "AdamW with decay on everything, proxies at 100x, clamp 10, StepLR",
                 "one warm-up epoch in which only the proxies train", "(2e-3) and batch 64"):
    assert stated in doc, stated
  check_config(c)


def test_demo_dada_recipe_equals_its_stated_values():
  # DADA's code (Noahsark/DADA, configs/cub200.yaml over parameters.py): intra-class mixup with Beta(3, 0.5),
  # Proxy-Anchor alpha 40 / 100 at oproxy_ratio 0.0075, d_dis_ratio 0.005, BN on both discriminators' logits,
  # dropout 0.5, d_step 3, one discriminator-only epoch, StepLR(4, 0.45), Adam, proxies at 0.04, discriminators at
  # 5e-4 with decay 4e-4; the demo's docstring: widths 16 / 32 in training mode, 16-d, discriminators 64 / 64-32,
  # network lr 1e-3, batches of 64 (2 per class), 16 epochs, evaluated before training and every 4 epochs.
  c = _load(os.path.join(CONFIG_DIR, "demo_dada.py"))
  o = c.method
  assert (o.name, o.bn_freeze, o.pos_class_mix, o.mix_alpha, o.mix_beta) == ("dada", False, True, 3.0, 0.5)
  assert (o.loss.pos_alpha, o.loss.neg_alpha, o.oproxy_ratio, o.d_dis_ratio) == (40.0, 100.0, 0.0075, 0.005)
  assert (o.fd_fc1_dim, o.fc_fc1_dim, o.fc_fc2_dim, o.fd2_bn, o.fc2_bn, o.dropout) == (64, 64, 32, True, True, 0.5)
  assert (o.d_step, o.g_step, o.d_warmup, o.dis_mode) == (3, 1, 1, "nwd")
  assert (c.seed, c.num_epochs, c.dataset.name, c.data.batch_size) == (0, 16, "digits", 64)
  assert (c.data.sampler, c.data.samples_per_class, c.data.augment) == ("m_per_class_replace", 2, "base")
  assert (c.dataset.image_size, tuple(c.data.scale), c.data.flip) == (32, (0.6, 1.0), False)
  assert dict(c.model.backbone_overrides) == dict(layers=(1, 1), channels=(16, 32), stem_width=16)
  assert (c.model.backbone, c.model.embedding_dim, c.model.weights) == ("resnet50", 16, "")
  assert (c.optim.optimizer, c.optim.lr, c.optim.weight_decay) == ("adam", 1e-3, 1e-4)
  s = c.optim.schedule
  assert (s.name, s.step_size, s.gamma, s.offset) == ("step", 4, 0.45, 1)
  assert c.optim.groups == (("model/backbone/.*", dict(name="backbone", start_epoch=1)),
                            ("loss/proxies", dict(name="proxies", lr=0.04, weight_decay=0.0)),
                            ("discriminators/.*", dict(name="discriminators", lr=5e-4, weight_decay=4e-4)))
  assert (tuple(c.eval.metrics), c.eval.before_training, c.eval.every_epochs) == (("recall", "map@r"), True, 4)
  doc = " ".join(open(os.path.join(CONFIG_DIR, "demo_dada.py")).read().split('"""')[1].split())
  for stated in ("widths 16 / 32", "16-d", "Beta(3, 0.5) mixing", "Proxy-Anchor alpha 40 / 100 at weight 0.0075",
                 "d_dis_ratio 0.005", "3 discriminator steps per iteration", "StepLR(4, 0.45)", "(64 / 64-32)",
                 "network rate of 1e-3", "every 4 epochs"):
    assert stated in doc, stated
  check_config(c)


# Every config under configs/ is checked value by value against literal values (the authors' code, README or
# paper, or the recipe its docstring states) by one of these tests. A pattern that matches no config yet is
# allowed (a method still on its branch); one that matches must name an existing test.
RECIPE_TESTS = {
    "proxy_anchor_*.py": "test_train_configs.py::test_proxy_anchor_configs_equal_the_readme_commands",
    "demo.py": "test_train_configs.py::test_demo_recipe_equals_its_stated_values",
    "folder_vits.py": "test_train_configs.py::test_folder_recipe_equals_its_stated_values",
    "vptsp_*.py": "test_vptsp_train.py::test_released_configs_equal_the_official_yaml_values",
    "cars_vitb.py": "test_vptsp_train.py::test_released_configs_equal_the_official_yaml_values",
    "dnc_*_resnet50.py": "test_divide_and_conquer_train.py::test_released_configs_follow_the_readme_command",
    "demo_dnc.py": "test_train_configs.py::test_demo_dnc_recipe_equals_its_stated_values",
    "proxy_isa_*.py": "test_proxy_isa_train.py::test_released_configs_follow_the_readme_commands",
    "demo_proxy_isa.py": "test_train_configs.py::test_demo_proxy_isa_recipe_equals_its_stated_values",
    "dada_*.py": "test_dada_train.py::test_released_configs_equal_the_official_yaml",
    "demo_dada.py": "test_train_configs.py::test_demo_dada_recipe_equals_its_stated_values",
    "dfml_*.py": "test_dfml_train.py::test_configs_equal_the_readme_commands",
    "demo_dfml.py": "test_train_configs.py::test_demo_dfml_recipe_equals_its_stated_values",
}


def test_every_config_has_a_literal_value_test():
  import fnmatch

  configs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")))
  uncovered = [c for c in configs if not any(fnmatch.fnmatch(c, pattern) for pattern in RECIPE_TESTS)]
  assert not uncovered, (f"configs without a literal-value recipe test (add one and list it in RECIPE_TESTS): "
                         f"{uncovered}")
  tests_dir = os.path.dirname(__file__)
  for pattern, target in RECIPE_TESTS.items():
    if not any(fnmatch.fnmatch(c, pattern) for c in configs):
      continue
    module, name = target.split("::")
    path = os.path.join(tests_dir, module)
    assert os.path.exists(path) and f"def {name}(" in open(path).read(), f"{pattern}: no test {target}"
