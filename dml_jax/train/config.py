"""The full default config (every key declared, so a typo on the command line is an error with close
matches) and the Proxy-Anchor baseline recipe that the configs/ files specialise.

Keys:
  seed                      model init, sampling, augmentation (the loader derives its streams from it)
  num_epochs                epochs to train
  compute_dtype             'float32' | 'bfloat16' (forward/backward; parameters and optimizer stay float32)
  method.name               dml_jax.methods registry name ('metric_loss')
  dataset.*                 name, data_root ('' = the dataset's default; digits: ~/.cache/dml_jax), source,
                            image_size, resize_size (eval: Resize -> CenterCrop image_size),
                            val_fraction (> 0: hold out that fraction of the TRAINING classes as a
                            validation split for model selection), skip_corrupt
  data.*                    batch_size (global), sampler ('random' | 'm_per_class' | 'm_per_class_replace'),
                            samples_per_class, steps_per_epoch (0 = len(train) // batch), eval_batch_size,
                            num_threads, num_workers, augmentation (scale, ratio, flip, interpolation)
  model.*                   backbone (registry name, optionally 'name.tag' for the preprocessing of that
                            tag), weights (converted weights directory, '' = random init),
                            backbone_overrides (architecture kwargs), head, embedding_dim, bn_freeze,
                            bn_affine_trainable (see methods/metric_loss.py)
  loss.*                    name (dml_jax.losses), hparams (keyword arguments), param_options (initialisers)
  optim.*                   see dml_jax/train/optim.py
  eval.*                    every_epochs (0 = never), start_epoch (no evaluation, hence no selection, before
                            it except at the last epoch; VPTSP's eval_start), before_training, protocol
                            ('' = dataset.name), metrics, options (protocols.evaluate keywords), select_on
                            ('test' as the seeds, or 'val'),
                            select_metric ('recall@1', 'map@r', ...)
  checkpoint.*              keep_last, keep_best, every_steps (0 = at epoch ends only)
  log.*                     every_steps, tensorboard, progress (tqdm bars)
"""

from __future__ import annotations

import ml_collections

# Backbones -> (head, BN facts) as the Proxy-Anchor code builds them (specs/proxyisa_dfml.md §1.3).
_CNN_HEAD = "gap_gmp_linear"


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_epochs = 60
  c.compute_dtype = "float32"
  c.method = ml_collections.ConfigDict(dict(name="metric_loss"))
  c.dataset = ml_collections.ConfigDict(dict(
      name="cub200", data_root="", source="auto", image_size=224, resize_size=256, val_fraction=0.0,
      skip_corrupt=False))
  c.data = ml_collections.ConfigDict(dict(
      batch_size=120, sampler="random", samples_per_class=2, steps_per_epoch=0, eval_batch_size=128,
      num_threads=8, num_workers=0, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True, interpolation="bilinear"))
  c.model = ml_collections.ConfigDict(dict(
      backbone="resnet50", weights="", backbone_overrides=ml_collections.ConfigDict(), head=_CNN_HEAD,
      embedding_dim=512, bn_freeze=True, bn_affine_trainable=False))
  c.loss = ml_collections.ConfigDict(dict(
      name="proxy_anchor", hparams=ml_collections.ConfigDict(dict(alpha=32.0, margin=0.1)),
      param_options=ml_collections.ConfigDict()))
  c.optim = ml_collections.ConfigDict(dict(
      optimizer="adamw", lr=1e-4, weight_decay=1e-4, b1=0.9, b2=0.999, eps=1e-8, momentum=0.9, nesterov=False,
      clip_value=10.0,
      schedule=ml_collections.ConfigDict(dict(name="step", step_size=10, gamma=0.5, milestones=(), t_max=1,
                                              eta_min=0.0, offset=0)),
      warmup_epochs=0, warmup_trainable="model/head/.*|loss/.*", frozen="",
      groups=(("loss/.*", dict(name="loss_params", lr_mult=100.0)),)))
  c.eval = ml_collections.ConfigDict(dict(
      every_epochs=1, start_epoch=0, before_training=False, protocol="", metrics=("recall", "r_precision", "map@r"),
      options=ml_collections.ConfigDict(), select_on="test", select_metric="recall@1"))
  c.checkpoint = ml_collections.ConfigDict(dict(keep_last=1, keep_best=True, every_steps=0))
  c.log = ml_collections.ConfigDict(dict(every_steps=20, tensorboard=True, progress=True))
  return c


# Proxy-Anchor README commands (specs/proxyisa_dfml.md §2; defaults AdamW, wd 1e-4, gamma 0.5, 60 epochs,
# seed 1). ResNet-50 for SOP / In-Shop has no README command: see the configs' docstrings.
PROXY_ANCHOR_RECIPES = {
    ("cub200", "bn_inception"): dict(batch=180, lr=1e-4, warm=1, bn_freeze=True, step=10, gamma=0.5),
    ("cars196", "bn_inception"): dict(batch=180, lr=1e-4, warm=1, bn_freeze=True, step=20, gamma=0.5),
    ("sop", "bn_inception"): dict(batch=180, lr=6e-4, warm=1, bn_freeze=False, step=20, gamma=0.25),
    ("inshop", "bn_inception"): dict(batch=180, lr=6e-4, warm=1, bn_freeze=False, step=20, gamma=0.25),
    ("cub200", "resnet50"): dict(batch=120, lr=1e-4, warm=5, bn_freeze=True, step=5, gamma=0.5),
    ("cars196", "resnet50"): dict(batch=120, lr=1e-4, warm=5, bn_freeze=True, step=10, gamma=0.5),
    ("sop", "resnet50"): dict(batch=120, lr=6e-4, warm=1, bn_freeze=False, step=20, gamma=0.25),
    ("inshop", "resnet50"): dict(batch=120, lr=6e-4, warm=1, bn_freeze=False, step=20, gamma=0.25),
}


def proxy_anchor_config(dataset: str, backbone: str) -> ml_collections.ConfigDict:
  """The Proxy-Anchor code's recipe for (dataset, backbone), specs/proxyisa_dfml.md §1.2–1.6 and §2.

  Faithful details: AdamW (decoupled wd 1e-4 on every group incl. proxies and BN), proxies at 100x lr,
  element-wise gradient clamp at 10, StepLR per epoch (warm-up epochs count), warm-up epochs train only
  the embedding layer and the proxies, GAP+GMP summed -> Linear -> L2, random batches (drop_last),
  evaluation and best-R@1 selection on the test split every epoch. With bn_freeze the BN statistics are
  frozen all run and BN scale/bias train only after warm-up (their code re-enables them at the end of
  warm-up); without it BN trains normally (BN-Inception with torch momentum 0.9, as their net file builds it).
  """
  recipe = PROXY_ANCHOR_RECIPES[(dataset, backbone)]
  c = default_config()
  c.seed = 1
  c.num_epochs = 60
  c.dataset.name = dataset
  c.data.batch_size = recipe["batch"]
  c.data.sampler = "random"
  c.model.backbone = {"resnet50": "resnet50.tv_in1k", "bn_inception": "bn_inception"}[backbone]
  c.model.head = _CNN_HEAD
  c.model.embedding_dim = 512
  c.model.bn_freeze = recipe["bn_freeze"]
  # Their warm-up block sets requires_grad=True on every backbone parameter at epoch `warm`, BN affine
  # included; with warm = 0 the block never runs and bn_freeze keeps scale/bias frozen for good.
  c.model.bn_affine_trainable = (not recipe["bn_freeze"]) or recipe["warm"] > 0
  if backbone == "bn_inception" and not recipe["bn_freeze"]:
    c.model.backbone_overrides = ml_collections.ConfigDict(dict(bn_momentum=0.9))
  c.loss.name = "proxy_anchor"
  c.loss.hparams = ml_collections.ConfigDict(dict(alpha=32.0, margin=0.1))
  c.optim.optimizer = "adamw"
  c.optim.lr = recipe["lr"]
  c.optim.weight_decay = 1e-4
  c.optim.clip_value = 10.0
  c.optim.schedule.name = "step"
  c.optim.schedule.step_size = recipe["step"]
  c.optim.schedule.gamma = recipe["gamma"]
  c.optim.warmup_epochs = recipe["warm"]
  c.optim.warmup_trainable = "model/head/.*|loss/.*"
  c.optim.groups = (("loss/.*", dict(name="proxies", lr_mult=100.0)),)
  c.eval.every_epochs = 1
  c.eval.select_on = "test"
  c.eval.select_metric = "recall@1"
  c.eval.metrics = ("recall",)
  return c
