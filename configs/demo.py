"""Demo: a tiny ViT learns an embedding of handwritten digits with the Proxy-Anchor loss.

  python train.py --config configs/demo.py --workdir runs/demo

Data: the embedded `digits` dataset (scikit-learn's 1,797 8x8 digits as 32x32 PNGs, written once to
~/.cache/dml_jax; no download). Digits 0-4 train, 5-9 test, so the test classes are never seen in
training, as in CUB/Cars. Model: ViT with 4x4 patches (64 tokens), 2 blocks of width 64, random init,
Linear -> 64-d L2-normalised embedding. Loss: Proxy-Anchor (alpha 32, margin 0.1), AdamW, proxies at
100x lr. Evaluation: Recall@K and MAP@R on the test digits, leave-one-out (the CUB protocol), before
training and every 4 epochs; metrics go to runs/demo/metrics.jsonl.

What it prints on 2 CPU cores (test digits, leave-one-out; the whole command takes about 45 s, longer on
a loaded machine):

               Recall@1  Recall@2  Recall@4  Recall@8  MAP@R
  before          51.2      68.8      84.2      92.5    12.4   (random network)
  epoch 15        71.8      83.6      89.1      94.3    27.7

(also in docs/benchmarks/train_step.md).
"""

from dml_jax.methods import method_config
from dml_jax.train.config import default_config


def get_config():
  c = default_config()
  c.seed = 0
  c.num_epochs = 16
  c.method = method_config("metric_loss")
  c.method.head = "linear"
  c.method.bn_freeze = False  # a ViT has no BatchNorm
  c.method.loss.name = "proxy_anchor"
  c.method.loss.hparams.alpha = 32.0
  c.method.loss.hparams.margin = 0.1
  c.dataset.name = "digits"
  c.dataset.image_size = 32
  c.dataset.resize_size = 32
  c.data.batch_size = 64
  c.data.eval_batch_size = 128
  c.data.sampler = "random"  # shuffled, drop_last, as the Proxy-Anchor code
  c.data.num_threads = 4
  c.data.scale = (0.6, 1.0)
  c.data.flip = False  # mirrored digits are other shapes
  c.model.backbone = "vit_small_patch16_224"
  c.model.backbone_overrides.img_size = 32
  c.model.backbone_overrides.patch_size = 4
  c.model.backbone_overrides.depth = 2
  c.model.backbone_overrides.embed_dim = 64
  c.model.backbone_overrides.num_heads = 2
  c.model.embedding_dim = 64
  c.optim.optimizer = "adamw"
  c.optim.lr = 1e-3
  c.optim.weight_decay = 1e-4
  c.optim.clip_value = 10.0
  c.optim.schedule.name = "cosine"
  c.optim.schedule.t_max = 16
  c.optim.schedule.eta_min = 1e-5
  c.optim.groups = (("loss/.*", dict(name="proxies", lr_mult=100.0)),)
  c.eval.protocol = ""  # the dataset's own: digits = leave-one-out over the test digits, Recall@1/2/4/8
  c.eval.metrics = ("recall", "map@r")
  c.eval.before_training = True
  c.eval.every_epochs = 4
  c.eval.select_metric = "recall@1"
  c.log.every_steps = 5
  return c
