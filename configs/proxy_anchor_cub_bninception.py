"""Proxy-Anchor baseline: CUB-200-2011, BN-Inception, 512-d embedding.

  python convert_timm_weights.py --model bn_inception --checkpoint bn_inception-52deb4733.pth \
      --out weights/bn_inception      # pretrainedmodels' (Cadene's) BN-Inception .pth, local file
  python train.py --config configs/proxy_anchor_cub_bninception.py --workdir runs/pa_cub_bninception \
      --config.dataset.data_root=/path/to/datasets

Settings: the Proxy-Anchor README command for this dataset and backbone.
Batch 180 (random, drop_last), AdamW lr 0.0001 (proxies x100), weight decay 1e-4 on every group,
gradient clamp 10, StepLR step 10 gamma 0.5 per epoch, 1 warm-up epoch(s) training only the
embedding layer and the proxies, BN statistics frozen all run, BN scale/bias trainable after warm-up; GAP + GMP -> Linear(512) -> L2; alpha 32, margin 0.1; 60 epochs,
seed 1; evaluation on the test split every epoch, best R@1 ON THE TEST SPLIT kept (as the authors' code;
set eval.select_on='val' and dataset.val_fraction for a held-out choice). specs/proxyisa_dfml.md §1–2.

Paper (Kim et al., "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020, BN-Inception, 512-d):
R@1 68.4. Quoted from the paper; NOT reproduced here (no GPU or dataset was available when this
config was written).
"""

from dml_jax.train.config import proxy_anchor_config


def get_config():
  c = proxy_anchor_config("cub200", "bn_inception")
  c.model.weights = "weights/bn_inception"  # converted as above; loading is strict
  return c
