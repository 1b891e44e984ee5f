"""Proxy-Anchor baseline: Stanford Online Products, ResNet-50, 512-d embedding.

  python convert_timm_weights.py --model resnet50.tv_in1k --out weights/resnet50   # torchvision weights via timm
  python train.py --config configs/proxy_anchor_sop_resnet50.py --workdir runs/pa_sop_resnet50 \
      --config.dataset.data_root=/path/to/datasets

The Proxy-Anchor README has no ResNet-50 command for this dataset: this config ASSUMES the
BN-Inception SOP / In-Shop settings (lr 6e-4, warm-up 1, BN not frozen, step 20, gamma 0.25) with
ResNet-50's batch 120 from its CUB / Cars commands.
Batch 120 (random, drop_last), AdamW lr 0.0006 (proxies x100), weight decay 1e-4 on every group,
gradient clamp 10, StepLR step 20 gamma 0.25 per epoch, 1 warm-up epoch(s) training only the
embedding layer and the proxies, BN trained normally; GAP + GMP -> Linear(512) -> L2; alpha 32, margin 0.1; 60 epochs,
seed 1; evaluation on the test split every epoch, best R@1 ON THE TEST SPLIT kept (as the authors' code;
set eval.select_on='val' and dataset.val_fraction for a held-out choice). specs/proxyisa_dfml.md §1–2.

Paper: the Proxy-Anchor paper reports no ResNet-50 512-d figure for this dataset that is quoted
here; nothing was reproduced here either (no GPU or dataset was available when this config was
written).
"""

from dml_jax.train.config import proxy_anchor_config


def get_config():
  c = proxy_anchor_config("sop", "resnet50")
  c.model.weights = "weights/resnet50"  # converted as above; loading is strict
  return c
