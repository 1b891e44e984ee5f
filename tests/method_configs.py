"""Tiny configurations of every registered method, for the contract test (tests/test_methods_contract.py).

Each is the method's own recipe shrunk to the embedded digits (32 px), a random-init ViT of depth 2 and width
64 (or a two-stage ResNet), 16-image batches, 2 steps per epoch, no evaluation during training. A new method
adds its entry here; the contract test fails for a registered method without one.
"""

from __future__ import annotations

import ml_collections

from dml_jax import methods
from dml_jax.train.config import default_config

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
TINY_RESNET = dict(layers=(1, 1), channels=(8, 16), stem_width=8)
# DFML splits the heads and MLP units into 3 sub-blocks: width 48, 6 heads (DeiT-S's 2 heads per sub-block).
TINY_DEIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=6, distilled=True)


def _base(method: str) -> ml_collections.ConfigDict:
  c = default_config()
  c.seed = 0
  c.num_epochs = 2
  c.method = methods.method_config(method)
  c.dataset.name = "digits"
  c.dataset.image_size = 32
  c.dataset.resize_size = 32
  c.data.batch_size = 16
  c.data.eval_batch_size = 64
  c.data.steps_per_epoch = 2
  c.data.num_threads = 2
  c.data.flip = False
  c.model.backbone = "vit_small_patch16_224"
  c.model.backbone_overrides = ml_collections.ConfigDict(TINY_VIT)
  c.model.embedding_dim = 32
  c.optim.lr = 1e-3
  c.eval.every_epochs = 0
  c.eval.metrics = ("recall",)
  c.log.every_steps = 1
  c.log.progress = False
  c.log.tensorboard = False
  c.log.plots = False
  return c


def metric_loss() -> ml_collections.ConfigDict:
  """Proxy-Anchor on a tiny ResNet with BatchNorm in training mode; warm-up of one epoch for the backbone."""
  c = _base("metric_loss")
  c.method.head = "gap_gmp_linear"
  c.method.bn_freeze = False
  c.model.backbone = "resnet50"
  c.model.backbone_overrides = ml_collections.ConfigDict(TINY_RESNET)
  c.optim.clip_value = 10.0
  c.optim.groups = (("model/backbone/.*", dict(name="backbone", start_epoch=1)),
                    ("loss/.*", dict(name="proxies", lr_mult=100.0)))
  return c


def vptsp() -> ml_collections.ConfigDict:
  """VPTSP-G with the memory bank: frozen ViT but its biases, prompts, GRU, host tables."""
  c = _base("vptsp")
  c.method.update(dict(num_prompts=4, prompt_depth=2, prompt_block_step=1, num_class_prompts=2, class_prompt_depth=2,
                       class_prompt_block_step=0, proxy_bias_ratio=0.3, rnn_dropout=0.1, memory_bank=True))
  c.data.sampler = "m_per_class"
  c.data.samples_per_class = 4
  c.optim.optimizer = "adamw"
  c.optim.groups = (("model/backbone/(?!.*bias$).*", dict(name="frozen_vit", frozen=True)),
                    ("model/proxy_bias", dict(name="proxy_bias", lr=1e-2)))
  return c


def dfml() -> ml_collections.ConfigDict:
  """DFML on a tiny factorized DeiT: the ViT waits one epoch, the routers train from the start (the authors'
  DataParallel warm-up), proxies at 100x."""
  c = _base("dfml")
  c.model.backbone = "deit_small_distilled_patch16_224"
  c.model.backbone_overrides = ml_collections.ConfigDict(TINY_DEIT)
  c.model.embedding_dim = 48
  c.optim.optimizer = "adamw"
  c.optim.clip_value = 10.0
  c.optim.groups = (("@routers", dict(name="routers")),
                    ("loss/.*", dict(name="proxies", lr_mult=100.0)),
                    ("model/.*", dict(name="model", start_epoch=1)))
  return c


def divide_and_conquer() -> ml_collections.ConfigDict:
  """D&C's recipe on a tiny ResNet: Adam with coupled L2, backbone frozen on even epochs, masks x100."""
  c = _base("divide_and_conquer")
  c.method.num_clusters = 4
  c.method.mod_epoch = 1
  c.method.force_full_embedding_epoch = 2
  c.data.samples_per_class = 2
  c.model.backbone = "resnet50"
  c.model.backbone_overrides = ml_collections.ConfigDict(TINY_RESNET)
  c.optim.optimizer = "adam"
  c.optim.weight_decay = 1e-4
  c.optim.groups = (("model/masks", dict(name="masks", lr_mult=100.0, stop_epoch=2)),
                    ("model/backbone/.*", dict(name="backbone", lr_cycle=(0.0, 1.0))))
  return c


def proxy_isa() -> ml_collections.ConfigDict:
  """Proxy-ISA on a tiny ResNet (GAP + GMP head, BN frozen, BN scale/bias frozen as with --warm 0), a 32-row memory
  from epoch 0 and the outlier filter from epoch 1, Adam with coupled L2."""
  c = _base("proxy_isa")
  c.method.head = "gap_gmp_linear"
  c.method.bn_freeze = True
  c.method.memory_size = 32
  c.method.start_epoch = 0
  c.model.backbone = "resnet50"
  c.model.backbone_overrides = ml_collections.ConfigDict(TINY_RESNET)
  c.optim.optimizer = "adam"
  c.optim.clip_value = 10.0
  c.optim.groups = (("@batchnorm", dict(name="batchnorm", frozen=True)),
                    ("loss/.*", dict(name="proxies", lr_mult=100.0)))
  return c


def dada() -> ml_collections.ConfigDict:
  """DADA on a tiny ResNet with BatchNorm statistics in training mode (SOP / In-Shop arch), intra-class mixup,
  three optimizer groups; epoch 0 trains the discriminators alone, the backbone starts in epoch 2."""
  c = _base("dada")
  c.method.update(dict(bn_freeze=False, pos_class_mix=True, mix_alpha=2.0, mix_beta=1.0, fd_fc1_dim=16, fd2_bn=True,
                       fc_fc1_dim=24, fc_fc2_dim=20, fc2_bn=True, d_step=2, d_warmup=1))
  c.model.backbone = "resnet50"
  c.model.backbone_overrides = ml_collections.ConfigDict(TINY_RESNET)
  c.data.sampler = "m_per_class_replace"
  c.data.samples_per_class = 2
  c.optim.optimizer = "adam"
  c.optim.weight_decay = 1e-4
  c.optim.groups = (("model/backbone/.*", dict(name="backbone", start_epoch=2)),
                    ("loss/proxies", dict(name="proxies", lr=4e-2, weight_decay=0.0)),
                    ("discriminators/.*", dict(name="discriminators", lr=5e-4, weight_decay=1e-4)))
  return c


TINY_CONFIGS = {"dada": dada, "dfml": dfml, "divide_and_conquer": divide_and_conquer, "metric_loss": metric_loss,
                "proxy_isa": proxy_isa, "vptsp": vptsp}
