"""DFML through the trainer: the released configs equal the README commands and start, the warm-up is the
code's (only the proxies, then the ViT with a fresh Adam state at the already-stepped rate), and the digits
demo improves retrieval."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from dml_jax import methods
from dml_jax import pytree as tree_lib
from dml_jax.train import loop, optim
from dml_jax.train.config import check_config

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
TINY_DEIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=6, distilled=True)

# README commands (github.com/wangck20/DFML) over train.py's defaults (AdamW, wd 1e-4, gamma 0.5, 60 epochs,
# seed 1): dataset -> (lr, warm, lr-decay-step, lr-decay-gamma, README R@1).
README = {"cub": (1e-4, 5, 5, 0.5, "79.1"), "cars": (1e-4, 5, 10, 0.5, "89.5"), "sop": (6e-4, 1, 10, 0.25, "84.2")}
DATASETS = {"cub": "cub200", "cars": "cars196", "sop": "sop"}
# The objective's literals in the official train.py (wangck20/DFML, commit b08f2a8): loss = criterion(m1)
# + 0.5 * criterion(m2) + 0.5 * distillation_loss, distillation_loss = 0.1 * sum ||m2 - m1.detach()||
# + sum over range(12) of 0.00001 * (attention term) / 12 + 0.00001 * (MLP term) / 12; Proxy_Anchor with the
# parser's --alpha 32 and --mrg 0.1; its deit.py splits every block into 3 sub-blocks (qkv / proj / fc1 / fc2
# ModuleLists of 3, routers Linear(dim, 3)).
CODE_OBJECTIVE = dict(name="dfml", num_sub_blocks=3, routed_loss_weight=0.5, distill_loss_weight=0.5,
                      embedding_distill_weight=0.1, layer_distill_weight=1e-5, layer_distill_divisor=12.0,
                      loss=dict(alpha=32.0, margin=0.1))
# timm's deit_small_distilled_patch16_224 (the README's checkpoint): 224 px, 16 px patches, width 384, 12 blocks,
# 6 heads, cls + dist tokens. Transforms: the Proxy-Anchor code's dataset/utils.make_transform, which DFML's
# train.py calls with is_inception=False: RandomResizedCrop(224) (torchvision's default scale 0.08-1, ratio
# 3/4-4/3, bilinear) + RandomHorizontalFlip for training, Resize(256) + CenterCrop(224) for evaluation.
DEIT_S = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, distilled=True)


def _load(name: str, variant: str = "") -> ml_collections.ConfigDict:
  path = os.path.join(CONFIG_DIR, f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


@pytest.mark.parametrize("dataset", sorted(README))
def test_configs_equal_the_readme_commands(dataset):
  lr, warm, step, gamma, r1 = README[dataset]
  c = _load(f"dfml_{dataset}_deit_small")
  check_config(c)
  assert (c.dataset.name, c.data.batch_size, c.data.sampler, c.num_epochs, c.seed) == (
      DATASETS[dataset], 120, "random", 60, 1)
  assert (c.optim.optimizer, c.optim.lr, c.optim.weight_decay, c.optim.clip_value) == ("adamw", lr, 1e-4, 10.0)
  assert (c.optim.schedule.name, c.optim.schedule.step_size, c.optim.schedule.gamma, c.optim.schedule.offset) == (
      "step", step, gamma, 0)
  assert c.optim.groups == (("loss/.*", dict(name="proxies", lr_mult=100.0)),
                            ("model/.*", dict(name="model", start_epoch=warm)))
  assert c.model.backbone == "deit_small_distilled_patch16_224.fb_in1k" and c.model.embedding_dim == 384
  assert dict(c.model.backbone_overrides) == DEIT_S and c.model.weights and c.compute_dtype == "float32"
  assert c.method.to_dict() == CODE_OBJECTIVE
  assert (c.dataset.image_size, c.dataset.resize_size, tuple(c.data.scale), tuple(c.data.ratio)) == (
      224, 256, (0.08, 1.0), (3 / 4, 4 / 3))
  assert (c.data.flip, c.data.interpolation, c.data.eval_batch_size) == (True, "bilinear", 120)
  assert c.eval.every_epochs == 1 and c.eval.select_on == "test" and c.eval.select_metric == "recall@1"
  assert tuple(c.eval.metrics) == ("recall", "nmi", "r_precision", "map@r")
  assert tuple(c.eval.options.recall_ks) == ((1, 10, 100) if dataset == "sop" else (1, 2, 4, 8))
  doc = open(os.path.join(CONFIG_DIR, f"dfml_{dataset}_deit_small.py")).read()
  assert "convert_timm_weights.py" in doc and "python train.py --config configs/dfml_" in doc and r1 in doc
  assert "not reproduced here" in doc.lower()

  parallel = _load(f"dfml_{dataset}_deit_small", "dataparallel")
  assert parallel.optim.groups == (("@routers", dict(name="routers")),) + c.optim.groups
  with pytest.raises(ValueError, match="variant"):
    _load(f"dfml_{dataset}_deit_small", "multi_gpu")


def _tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A released recipe on the embedded digits with a tiny random-init factorized DeiT."""
  c = config
  c.dataset.name = "digits"
  c.dataset.image_size = c.dataset.resize_size = 32
  c.model.backbone_overrides = ml_collections.ConfigDict(TINY_DEIT)
  c.model.weights = ""
  c.model.embedding_dim = 48
  c.data.batch_size = c.data.eval_batch_size = 8
  c.data.num_threads = 2
  c.data.steps_per_epoch = 1
  c.eval.every_epochs = 0
  c.log.progress = c.log.tensorboard = c.log.plots = False
  return c


def test_warm_up_trains_the_proxies_then_the_vit_at_the_stepped_rate():
  """CUB: epochs 0-4 the proxies only (single-GPU path) or the proxies and the 24 routers (DataParallel path);
  from epoch 5 the whole ViT with its own, fresh optimizer state, at lr 1e-4 * 0.5 (StepLR stepped at 5)."""
  c = _tiny(_load("dfml_cub_deit_small"))
  method = methods.build(c, num_classes=5)
  params, _ = method.init(jax.random.key(0))
  paths = list(tree_lib.flatten(params))
  routers = method.param_selectors(params)["routers"]
  for variant in ("", "dataparallel"):
    cv = _tiny(_load("dfml_cub_deit_small", variant))
    plan = optim.ParamPlan(cv.optim, paths, selectors=method.param_selectors(params))
    warm, after = plan.groups(4), plan.groups(5)
    expected = {"loss/proxies"} | (routers if variant else set())
    assert set(warm.trainable) == expected
    assert set(after.trainable) == set(paths) and plan.change_epochs() == [5]
    assert "model_from_epoch5" in after.labels  # its optimizer state is created when epoch 5 starts
    rates = after.learning_rates(5)
    assert rates["proxies"] == pytest.approx(5e-3) and rates["model_from_epoch5"] == pytest.approx(5e-5)
    assert warm.learning_rates(4)["proxies"] == pytest.approx(1e-2)
    if variant:
      assert rates["routers"] == pytest.approx(5e-5)
    # Weight decay on every parameter, proxies and tokens included; element-wise clamp 10 everywhere.
    assert all(s.weight_decay == 1e-4 and s.clip_value == 10.0 and s.optimizer == "adamw" for _, s, _ in after.groups)


@pytest.mark.parametrize("dataset", ["cub", "sop"])
def test_released_configs_start(tmp_path, dataset):
  """The recipe trains on a tiny DeiT: warm-up steps move only the proxies; SOP's ViT then starts (epoch 1)."""
  c = _tiny(_load(f"dfml_{dataset}_deit_small"))
  c.num_epochs = 2
  loop.fit(c, tmp_path / dataset)
  records = [json.loads(line) for line in (tmp_path / dataset / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["kind"] == "train"]
  assert train and all(np.isfinite(r["loss"]) for r in train)
  labels = {k for r in train for k in r if k.startswith("lr/")}
  assert labels == ({"lr/proxies", "lr/model_from_epoch1"} if dataset == "sop" else {"lr/proxies"})


@pytest.mark.integration
def test_demo_recall_rises(tmp_path):
  """configs/demo_dfml.py, first half: Recall@1 and MAP@R on the unseen test digits rise."""
  c = _load("demo_dfml")
  c.num_epochs = 8
  c.eval.every_epochs = 8
  c.log.progress = False
  c.log.tensorboard = False
  c.log.plots = False
  summary = loop.fit(c, tmp_path)
  before = next(h for h in summary["history"] if h["epoch"] == "before")
  after = summary["history"][-1]
  assert after["epoch"] == 7
  assert after["recall@1"] >= before["recall@1"] + 0.1, (before, after)
  assert after["map@r"] >= before["map@r"] + 0.05, (before, after)
