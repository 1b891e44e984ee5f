"""Demo: DADA on the embedded handwritten digits, a tiny random-init ResNet, on a CPU in a few minutes.

  python train.py --config configs/demo_dada.py --workdir runs/demo_dada

Data: the embedded `digits` dataset (scikit-learn's 1,797 8x8 digits as 32x32 PNGs, written once to
~/.cache/dml_jax; no download); digits 0-4 train, 5-9 test (never seen in training). Model: a two-stage
bottleneck ResNet (widths 16 / 32, random init, BatchNorm in training mode as DADA's SOP / In-Shop arch), max +
average pooling, Linear -> LayerNorm, 16-d (a random 16-d projection starts well below the ceiling; random conv
features of wider embeddings already retrieve digits at ~91% R@1). DADA with the CUB recipe's criterion
(intra-class mixup, Beta(3, 0.5) mixing, Proxy-Anchor alpha 40 / 100 at weight 0.0075, d_dis_ratio 0.005, BN on
both discriminators' logits, 3 discriminator steps per iteration, epoch 0 for the discriminators alone, StepLR(4,
0.45) after it), smaller discriminators (64 / 64-32) and a network rate of 1e-3 for training from scratch.
Evaluation: Recall@K and MAP@R on the test digits, leave-one-out, before training and every 4 epochs.

Measured with the command above (2026-12-02, 2-core AMD EPYC CPU, with tests running beside it): Recall@1 69.6
before training -> 74.3 (epoch 3) -> 75.1 (7) -> 70.9 (11) -> 73.3 (epoch 15); MAP@R 18.7 -> 19.5 (3) -> 18.9 (7,
the best Recall@1 checkpoint) -> 16.5 (15); 4 min 11 s for the whole command (compilation, 5 evaluations and 16
checkpoints included). The adversarial game on a random-init network is sensitive to float rounding: changes
outside DADA's code that keep the values up to rounding (other XLA fusions, other CPU dot kernels) have moved
epoch 7 between 67.5 and 75.4 and epoch 15 between 73.2 and 79.2; MAP@R, which weighs whole rankings, does not
rise reliably on this demo.
tests/test_dada_train.py runs its first 12 epochs.
"""

import ml_collections

from dml_jax.methods import method_config
from dml_jax.train.config import default_config


def get_config():
  c = default_config()
  c.seed = 0
  c.num_epochs = 16
  c.method = method_config("dada")
  c.method.bn_freeze = False  # random init: BatchNorm statistics must be learned
  c.method.pos_class_mix = True
  c.method.mix_alpha = 3.0
  c.method.mix_beta = 0.5
  c.method.fd_fc1_dim = 64
  c.method.fd2_bn = True
  c.method.fc_fc1_dim = 64
  c.method.fc_fc2_dim = 32
  c.method.fc2_bn = True
  c.method.d_step = 3
  c.method.d_warmup = 1
  c.method.oproxy_ratio = 0.0075
  c.method.d_dis_ratio = 0.005
  c.method.loss.pos_alpha = 40.0
  c.method.loss.neg_alpha = 100.0

  c.dataset.name = "digits"
  c.dataset.image_size = 32
  c.dataset.resize_size = 32
  c.data.batch_size = 64
  c.data.eval_batch_size = 128
  c.data.sampler = "m_per_class_replace"
  c.data.samples_per_class = 2
  c.data.num_threads = 4
  c.data.scale = (0.6, 1.0)
  c.data.flip = False  # mirrored digits are other shapes

  c.model.backbone = "resnet50"
  c.model.backbone_overrides = ml_collections.ConfigDict(dict(layers=(1, 1), channels=(16, 32), stem_width=16))
  c.model.embedding_dim = 16

  c.optim.optimizer = "adam"
  c.optim.lr = 1e-3
  c.optim.weight_decay = 1e-4
  c.optim.schedule.name = "step"
  c.optim.schedule.step_size = 4
  c.optim.schedule.gamma = 0.45
  c.optim.schedule.offset = 1
  c.optim.groups = (
      ("model/backbone/.*", dict(name="backbone", start_epoch=1)),
      ("loss/proxies", dict(name="proxies", lr=0.04, weight_decay=0.0)),
      ("discriminators/.*", dict(name="discriminators", lr=5e-4, weight_decay=4e-4)),
  )

  c.eval.protocol = ""  # digits: leave-one-out over the test digits
  c.eval.metrics = ("recall", "map@r")
  c.eval.before_training = True
  c.eval.every_epochs = 4
  c.eval.select_metric = "recall@1"
  c.log.every_steps = 5
  return c
