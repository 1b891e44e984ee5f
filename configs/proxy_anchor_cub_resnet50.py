"""Proxy-Anchor baseline: CUB-200-2011, ResNet-50, 512-d embedding.

  python convert_timm_weights.py --model resnet50.tv_in1k --out weights/resnet50   # torchvision weights via timm
  python train.py --config configs/proxy_anchor_cub_resnet50.py --workdir runs/pa_cub_resnet50 \
      --config.dataset.data_root=/path/to/datasets

Settings: the Proxy-Anchor README command for this dataset and backbone.
Batch 120 (random, drop_last), AdamW lr 0.0001 (proxies x100), weight decay 1e-4 on every group,
gradient clamp 10, StepLR step 5 gamma 0.5 per epoch, 5 warm-up epoch(s) training only the
embedding layer and the proxies, BN statistics frozen all run, BN scale/bias trainable after warm-up; GAP + GMP -> Linear(512) -> L2; alpha 32, margin 0.1; 60 epochs,
seed 1; evaluation on the test split every epoch, best R@1 ON THE TEST SPLIT kept (as the authors' code;
set eval.select_on='val' and dataset.val_fraction for a held-out choice). See docs/methods/metric_loss.md.

Paper (Kim et al., "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020, ResNet-50, 512-d):
R@1 69.7. Quoted from the paper; NOT reproduced here (no GPU or dataset was available when this
config was written).
"""

from dml_jax.methods import method_config
from dml_jax.train.config import default_config


def get_config():
  c = default_config()
  c.seed = 1
  c.num_epochs = 60
  c.method = method_config("metric_loss")
  c.method.head = "gap_gmp_linear"  # GAP + GMP summed -> Linear(512) -> L2
  c.method.bn_freeze = True  # BN statistics frozen all run (torch eval() on every BatchNorm2d)
  c.method.loss.name = "proxy_anchor"
  c.method.loss.hparams.alpha = 32.0
  c.method.loss.hparams.margin = 0.1

  c.dataset.name = "cub200"
  c.data.batch_size = 120
  c.data.sampler = "random"  # shuffled, drop_last
  c.model.backbone = "resnet50.tv_in1k"
  c.model.weights = "weights/resnet50"  # converted as above; loading is strict
  c.model.embedding_dim = 512

  c.optim.optimizer = "adamw"
  c.optim.lr = 0.0001
  c.optim.weight_decay = 1e-4  # on every group, proxies and BN included
  c.optim.clip_value = 10.0  # element-wise gradient clamp
  c.optim.schedule.name = "step"  # StepLR per epoch; warm-up epochs count
  c.optim.schedule.step_size = 5
  c.optim.schedule.gamma = 0.5
  c.optim.groups = (
      # Warm-up: only the embedding layer and the proxies train during the first 5 epoch(s); the code then
      # re-enables every backbone parameter, BN scale and bias included (fresh Adam state then).
      ("model/backbone/.*", dict(name="backbone", start_epoch=5)),
      ("loss/.*", dict(name="proxies", lr_mult=100.0)),
  )

  c.eval.every_epochs = 1
  c.eval.metrics = ("recall",)
  c.eval.select_on = "test"
  c.eval.select_metric = "recall@1"
  return c
