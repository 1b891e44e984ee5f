"""Proxy-Anchor baseline: CUB-200-2011, ResNet-50, 512-d embedding.

  python convert_timm_weights.py --model resnet50.tv_in1k --out weights/resnet50   # torchvision weights via timm
  python train.py --config configs/proxy_anchor_cub_resnet50.py --workdir runs/pa_cub_resnet50 \
      --config.dataset.data_root=/path/to/datasets

Settings: the Proxy-Anchor README command for this dataset and backbone.
Batch 120 (random, drop_last), AdamW lr 0.0001 (proxies x100), weight decay 1e-4 on every group,
gradient clamp 10, StepLR step 5 gamma 0.5 per epoch, 5 warm-up epoch(s) training only the
embedding layer and the proxies, BN statistics frozen all run, BN scale/bias trainable after warm-up; GAP + GMP -> Linear(512) -> L2; alpha 32, margin 0.1; 60 epochs,
seed 1; evaluation on the test split every epoch, best R@1 ON THE TEST SPLIT kept (as the authors' code;
set eval.select_on='val' and dataset.val_fraction for a held-out choice). specs/proxyisa_dfml.md §1–2.

Paper (Kim et al., "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020, ResNet-50, 512-d):
R@1 69.7. Quoted from the paper; NOT reproduced here (no GPU or dataset was available when this
config was written).
"""

from dml_jax.train.config import proxy_anchor_config


def get_config():
  c = proxy_anchor_config("cub200", "resnet50")
  c.model.weights = "weights/resnet50"  # converted as above; loading is strict
  return c
