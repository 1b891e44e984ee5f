"""Proxy-ISA: CUB-200-2011, BN-Inception, 512-d embedding.

  python convert_timm_weights.py --model bn_inception --checkpoint bn_inception-52deb4733.pth \
      --out weights/bn_inception      # pretrainedmodels' (Cadene's) BN-Inception .pth, local file
  python train.py --config configs/proxy_isa_cub_bninception.py --workdir runs/isa_cub_bninception \
      --config.dataset.data_root=/path/to/datasets

Settings: the Proxy-ISA README command for this dataset and backbone (--lr 1e-4 --lr_decay_step 10) over the
code's train.py defaults. Batch 128 (random, drop_last), Adam with coupled L2 (the code's default `--optimizer
adam`) lr 1e-4 (embedding layer x1, proxies x100), weight decay 1e-4 on every group, gradient clamp 10, StepLR
step 10 gamma 0.5 per epoch, 1 warm-up epoch (the code's default `--warm 1`; the command sets none) training
only the embedding layer and the proxies; from epoch 1 the whole backbone trains, BN scale and bias included;
BN statistics frozen all run (`--bn_freeze`, default True); GAP -> Linear(512) -> L2 (the Proxy-ISA
BN-Inception head: average pooling only); Proxy-ISA alpha 32, delta 0.1, V 100, k 0.9, lambda 0.1, h 0.15, tau
1.5; a memory of 55,000 embeddings from epoch 2, the outlier filter from epoch 3; 100 epochs, seed 67;
evaluation on the test split every epoch (Recall@1/2/4/8/16/32, MAP@R), best MAP@R ON THE TEST SPLIT kept, as
the authors' code (set eval.select_on='val' and dataset.val_fraction for a held-out choice). See
docs/methods/proxy_isa.md.

Paper (Li et al., "Informative Sample-Aware Proxy for Deep Metric Learning", MMAsia 2022): the paper's
tables were not available when this config was written; the authors' README carries, commented out, a
row for this setting: R@1 68.1, MAP@R 26.97. NOT reproduced here (no GPU or dataset was available).
"""

from dml_jax.methods import method_config
from dml_jax.train.config import default_config


def get_config():
  c = default_config()
  c.seed = 67  # the code's fixed seed
  c.num_epochs = 100  # --epochs default; the README sets none
  c.method = method_config("proxy_isa")
  c.method.head = "linear"  # the backbone's global average pool -> Linear(512) -> L2 (no GMP, unlike Proxy-Anchor)
  c.method.bn_freeze = True  # BN statistics frozen all run (torch eval() on every BatchNorm2d)
  c.method.alpha = 32.0
  c.method.margin = 0.1
  c.method.volume = 100.0  # V
  c.method.eta_scale = 0.9  # k (the code's default)
  c.method.eta_margin = 0.1  # lambda
  c.method.hardness_scale = 0.15  # h
  c.method.tau = 1.5
  c.method.memory_size = 55000  # T
  c.method.start_epoch = 2  # memory from epoch 2, outlier filter from epoch 3
  c.method.ring_buffer = False  # the code's queue (overflow into the last rows, class-0 fullness quirk)

  c.dataset.name = "cub200"
  c.data.batch_size = 128
  c.data.sampler = "random"  # shuffled, drop_last
  c.model.backbone = "bn_inception"
  c.model.weights = "weights/bn_inception"  # converted as above; loading is strict
  c.model.backbone_overrides.bn_momentum = 0.9  # their file's BN (torch momentum 0.9); acts with bn_freeze off
  c.model.embedding_dim = 512

  c.optim.optimizer = "adam"  # torch Adam: weight decay added to the gradient (coupled L2)
  c.optim.lr = 0.0001
  c.optim.weight_decay = 1e-4  # on every group, proxies and BN included
  c.optim.clip_value = 10.0  # element-wise gradient clamp, model and proxies
  c.optim.schedule.name = "step"  # StepLR per epoch; the warm-up epoch counts
  c.optim.schedule.step_size = 10
  c.optim.schedule.gamma = 0.5
  c.optim.groups = (
      # Warm-up (--warm 1): only the embedding layer and the proxies train in epoch 0; then the code re-enables
      # every backbone parameter, BN scale and bias included (a fresh Adam state then).
      ("model/backbone/.*", dict(name="backbone", start_epoch=1)),
      ("loss/.*", dict(name="proxies", lr_mult=100.0)),
  )

  c.eval.every_epochs = 1
  c.eval.metrics = ("recall", "map@r")  # MAP@R: R = relevant items (Musgrave et al.)
  c.eval.options.recall_ks = (1, 2, 4, 8, 16, 32)
  c.eval.select_on = "test"
  c.eval.select_metric = "map@r"  # the code keeps the best MAP@R (--eval_metric MLRC)
  return c
