"""Proxy-ISA: Cars-196, ResNet-50, 512-d embedding.

  python convert_timm_weights.py --model resnet50.tv_in1k --out weights/resnet50   # torchvision weights via timm
  python train.py --config configs/proxy_isa_cars_resnet50.py --workdir runs/isa_cars_resnet50 \
      --config.dataset.data_root=/path/to/datasets

Settings: the Proxy-ISA README command for this dataset and backbone (--lr 1e-4 --warm 0 --lr_decay_step 10
--k 0.4) over the code's train.py defaults. Batch 128 (random, drop_last), Adam with coupled L2 (the code's
default `--optimizer adam`) lr 1e-4 (embedding layer x1, proxies x100), weight decay 1e-4 on every group,
gradient clamp 10, StepLR step 10 gamma 0.5 per epoch, no warm-up (`--warm 0`): the backbone trains from the
start, BN scale and bias never; BN statistics frozen all run (`--bn_freeze`, default True); GAP + GMP ->
Linear(512) -> L2 (their resnet.py; the released train.py cannot build this model's parameter groups, see
docs/methods/proxy_isa.md); Proxy-ISA alpha 32, delta 0.1, V 100, k 0.4, lambda 0.1, h 0.15, tau 1.5; a memory
of 55,000 embeddings from epoch 2, the outlier filter from epoch 3; 100 epochs, seed 67; evaluation on the
test split every epoch (Recall@1/2/4/8/16/32, MAP@R), best MAP@R ON THE TEST SPLIT kept, as the authors' code
(set eval.select_on='val' and dataset.val_fraction for a held-out choice). See docs/methods/proxy_isa.md.

Paper (Li et al., "Informative Sample-Aware Proxy for Deep Metric Learning", MMAsia 2022): the paper's
tables were not available when this config was written, and the authors' README gives no number for
this setting. NOT reproduced here (no GPU or dataset was available).
"""

from dml_jax.methods import method_config
from dml_jax.train.config import default_config


def get_config():
  c = default_config()
  c.seed = 67  # the code's fixed seed
  c.num_epochs = 100  # --epochs default; the README sets none
  c.method = method_config("proxy_isa")
  c.method.head = "gap_gmp_linear"  # GAP + GMP summed -> Linear(512) -> L2
  c.method.bn_freeze = True  # BN statistics frozen all run (torch eval() on every BatchNorm2d)
  c.method.alpha = 32.0
  c.method.margin = 0.1
  c.method.volume = 100.0  # V
  c.method.eta_scale = 0.4  # k (README `--k`)
  c.method.eta_margin = 0.1  # lambda
  c.method.hardness_scale = 0.15  # h
  c.method.tau = 1.5
  c.method.memory_size = 55000  # T
  c.method.start_epoch = 2  # memory from epoch 2, outlier filter from epoch 3
  c.method.ring_buffer = False  # the code's queue (overflow into the last rows, class-0 fullness quirk)

  c.dataset.name = "cars196"
  c.data.batch_size = 128
  c.data.sampler = "random"  # shuffled, drop_last
  c.model.backbone = "resnet50.tv_in1k"
  c.model.weights = "weights/resnet50"  # converted as above; loading is strict
  c.model.embedding_dim = 512

  c.optim.optimizer = "adam"  # torch Adam: weight decay added to the gradient (coupled L2)
  c.optim.lr = 0.0001
  c.optim.weight_decay = 1e-4  # on every group, proxies and BN included
  c.optim.clip_value = 10.0  # element-wise gradient clamp, model and proxies
  c.optim.schedule.name = "step"  # StepLR per epoch; the warm-up epoch counts
  c.optim.schedule.step_size = 10
  c.optim.schedule.gamma = 0.5
  c.optim.groups = (
      # --warm 0 skips the warm-up block, so BN scale and bias keep the requires_grad=False of bn_freeze.
      ("@batchnorm", dict(name="batchnorm", frozen=True)),
      ("loss/.*", dict(name="proxies", lr_mult=100.0)),
  )

  c.eval.every_epochs = 1
  c.eval.metrics = ("recall", "map@r")  # MAP@R: R = relevant items (Musgrave et al.)
  c.eval.options.recall_ks = (1, 2, 4, 8, 16, 32)
  c.eval.select_on = "test"
  c.eval.select_metric = "map@r"  # the code keeps the best MAP@R (--eval_metric MLRC)
  return c
