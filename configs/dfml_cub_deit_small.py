"""DFML on CUB-200-2011, factorized DeiT-S distilled, 384-d: the official README command.

  python convert_timm_weights.py --model deit_small_distilled_patch16_224.fb_in1k --out weights/deit_s_dist
      (offline: add --checkpoint deit_small_distilled_patch16_224-649709d9.pth, the file the README names)
  python train.py --config configs/dfml_cub_deit_small.py --workdir runs/dfml_cub \
      --config.dataset.data_root=/data   (--config.model.weights=DIR if not converted to weights/deit_s_dist)
  The authors' DataParallel path (--gpu-id -1), where the 24 routers also train during the warm-up:
      --config configs/dfml_cub_deit_small.py:dataparallel

The weights directory is the plain DeiT conversion; the method factorizes it while loading (the README's
convert.py re-layout, docs/methods/dfml.md), so no DFML-specific checkpoint is needed.

Settings: the README command (--batch-size 120 --lr 0.0001 --warm 5 --lr-decay-step 5
--embedding-size 384 --dataset cub; --bn-freeze is moot, a ViT has no BatchNorm) over train.py's
defaults: AdamW, weight decay 1e-4 on EVERY parameter (tokens, position embedding, norms, routers,
proxies: the code never asks timm's no_weight_decay), lr-decay-gamma 0.5, 60 epochs, seed 1, random
batches (drop_last), element-wise gradient clamp 10, proxies at 100x lr, StepLR per epoch counting the
warm-up epochs. Warm-up (single-GPU path of the README): during epochs 0-4 only the proxies train;
the whole ViT then starts with a fresh Adam state at the already-stepped rate (5e-05; proxies 0.005).
Objective: PA(m1) + 0.5 PA(m2) + 0.5 (0.1 sum ||m2 - sg(m1)|| + 1e-5 / 12 sum of the per-block matching
terms), Proxy-Anchor alpha 32, margin 0.1, one set of proxies; augmentation RandomResizedCrop(224) +
flip, evaluation Resize(256) + CenterCrop(224), ImageNet mean / std (the DeiT weights' own).
Evaluation every epoch on the test split, best R@1 kept (as the authors' code: selection on test).

README (DFML-PA; the table says ResNet-50, the command trains DeiT-S):
  R@1 79.1, R@2 86.8, NMI 80.2, RP 47.3, MAP@R 37.4.
Not reproduced here (no GPU and no datasets on the development machine): hardware, time and numbers of
a full run are unknown.
"""

import ml_collections

from dml_jax.methods import method_config
from dml_jax.train.config import default_config

VARIANTS = ("", "single_gpu", "dataparallel")


def get_config(variant: str = ""):
  """variant: '' / 'single_gpu' (the README's commands) or 'dataparallel' (routers train during warm-up)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of this config; known: {VARIANTS}")
  c = default_config()
  c.seed = 1
  c.num_epochs = 60
  c.compute_dtype = "float32"
  c.method = method_config("dfml")
  c.method.num_sub_blocks = 3  # 2 of DeiT-S's 6 heads and 512 of its 1536 MLP units per sub-block
  c.method.routed_loss_weight = 0.5  # PA(m2)
  c.method.distill_loss_weight = 0.5
  c.method.embedding_distill_weight = 0.1
  c.method.layer_distill_weight = 1e-5
  c.method.layer_distill_divisor = 12.0
  c.method.loss.alpha = 32.0
  c.method.loss.margin = 0.1

  c.dataset.name = "cub200"
  c.dataset.image_size = 224
  c.dataset.resize_size = 256
  c.data.batch_size = 120
  c.data.eval_batch_size = 120
  c.data.sampler = "random"  # shuffled, drop_last
  c.data.scale = (0.08, 1.0)
  c.data.ratio = (3 / 4, 4 / 3)
  c.data.flip = True
  c.data.interpolation = "bilinear"  # torchvision defaults of the code's transforms

  c.model.backbone = "deit_small_distilled_patch16_224.fb_in1k"
  c.model.backbone_overrides = ml_collections.ConfigDict(dict(
      img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, distilled=True))
  c.model.weights = "weights/deit_s_dist"  # the plain DeiT conversion above, factorized while loading
  c.model.embedding_dim = 384  # no embedding layer: (cls + dist) / 2 of the final norm

  c.optim.optimizer = "adamw"
  c.optim.lr = 0.0001
  c.optim.weight_decay = 1e-4  # on every group
  c.optim.clip_value = 10.0  # torch clip_grad_value_
  c.optim.schedule.name = "step"  # StepLR per epoch; the warm-up epochs count
  c.optim.schedule.step_size = 5
  c.optim.schedule.gamma = 0.5
  c.optim.schedule.offset = 0
  c.optim.groups = (
      ("loss/.*", dict(name="proxies", lr_mult=100.0)),
      # Warm-up: the ViT waits 5 epoch(s); its Adam state starts then, the proxies keep theirs.
      ("model/.*", dict(name="model", start_epoch=5)),
  )
  if variant == "dataparallel":  # the routers (in the model's optimizer group in torch) train from epoch 0
    c.optim.groups = (("@routers", dict(name="routers")),) + c.optim.groups

  c.eval.every_epochs = 1
  c.eval.metrics = ("recall", "nmi", "r_precision", "map@r")
  c.eval.options = ml_collections.ConfigDict(dict(recall_ks=(1, 2, 4, 8)))
  c.eval.select_on = "test"
  c.eval.select_metric = "recall@1"
  return c
