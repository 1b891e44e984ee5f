"""DADA on CUB-200-2011, ResNet-50 (torchvision weights), 512-d: the official `configs/cub200.yaml`.

  python convert_timm_weights.py --model resnet50.tv_in1k --out weights/resnet50
      (timm's `resnet50.tv_in1k` is torchvision's original ImageNet ResNet-50, the `pretrainedmodels` weights
       the authors load)
  python train.py --config configs/dada_cub_resnet50.py --workdir runs/dada_cub_resnet50 \
      --config.dataset.data_root=/data   (--config.model.weights=DIR if not converted to weights/resnet50)

Setting (the official YAML over parameters.py): arch resnet50_frozen_layernorm_double (BatchNorm statistics frozen,
BN scale and bias trainable); batch 90 = 45 classes x 2 drawn with replacement, 65 batches per epoch; 60 epochs;
Adam (coupled weight decay) for the network lr 0.00012, decay 0.0001, for the proxies lr 0.04 (no decay), for the
discriminators lr 0.0005, decay 0.0004; StepLR(4, gamma 0.45) on all three, stepping only after the warm-up; warm-up
1: no head-only generator step (epoch 0 trains the discriminators alone, the backbone trains from epoch 1).
Criterion: Proxy-Anchor (code variant) alpha_pos 40 / alpha_neg 100, delta 0.1, weight 0.0075; d_dis_ratio 0.005,
discrepancy NWD x 0.5; sample -> proxy mixup Beta(3, 0.5); intra-class mixup on; U 512 hidden, BN on its logits; D_c
512 / 128 hidden, BN on its logits; 3 discriminator steps per iteration.
Augmentation: RandomResizedCrop(224) -> flip. Evaluation: Recall@1/2/4, F1, MAP@R (class-size form) after every
epoch, best test R@1 kept (the code's checkpoint selection on the test split). YAML note: the YAML lists n_epochs
twice (80, then 60); the last one wins.
The global batch of 90 splits over 1, 2, 3, 5 or 6 devices (not 4 or 8).

Paper (Ren et al., AAAI 2024, Proxy-Anchor + DADA, ResNet-50, 512-d): R@1 72.9, as quoted from the paper's
results table by secondary sources; the table itself was not available when this config was written.
Nothing was reproduced here (no GPU and no dataset on the development machine).
"""

import ml_collections

from dml_jax.methods import method_config
from dml_jax.train.config import default_config


def get_config():
  c = default_config()
  c.seed = 0
  c.num_epochs = 60
  c.compute_dtype = "float32"  # the code trains in float32 (GradScaler without autocast)
  c.method = method_config("dada")
  c.method.bn_freeze = True  # arch 'resnet50_frozen_layernorm_double'
  c.method.proxy_init_scale = 0.125  # proxies ~ N(0, 1) / 8
  c.method.pos_class_mix = True
  c.method.mix_alpha = 3.0  # sample -> proxy mixup m ~ Beta(mix_alpha, mix_beta)
  c.method.mix_beta = 0.5
  c.method.shift_scale = 1.0
  c.method.normal = True  # discriminator inputs L2-normalised
  c.method.fd_fc1_dim = 512  # U
  c.method.fd2_bn = True
  c.method.fc_fc1_dim = 512  # D_c
  c.method.fc_fc2_dim = 128
  c.method.fc2_bn = True
  c.method.dropout = 0.5
  c.method.d_step = 3
  c.method.g_step = 1
  c.method.d_warmup = 1  # epoch 0: no generator step
  c.method.discriminator_group = "discriminators"
  c.method.oproxy_ratio = 0.0075
  c.method.d_dis_ratio = 0.005
  c.method.d_discrepancy_ratio = 0.5
  c.method.dis_gamma = 1.0
  c.method.dis_mode = "nwd"
  c.method.loss.pos_alpha = 40.0
  c.method.loss.neg_alpha = 100.0
  c.method.loss.pos_delta = 0.1
  c.method.loss.neg_delta = -0.1
  c.method.generator_dropout = True  # the code's quirks, kept (docs/methods/dada.md)
  c.method.proxy_pair_mix = True
  c.method.mix_unit_vectors = False

  c.dataset.name = "cub200"
  c.dataset.image_size = 224
  c.dataset.resize_size = 256
  c.data.batch_size = 90
  c.data.sampler = "m_per_class_replace"  # classes and images drawn with replacement, floor(N / B) batches
  c.data.samples_per_class = 2
  c.data.eval_batch_size = 90
  c.data.augment = "base"
  c.data.scale = (0.08, 1.0)
  c.data.ratio = (3 / 4, 4 / 3)
  c.data.flip = True
  c.data.interpolation = "bilinear"

  c.model.backbone = "resnet50.tv_in1k"
  c.model.weights = "weights/resnet50"  # converted as above; loading is strict
  c.model.embedding_dim = 512

  c.optim.optimizer = "adam"  # torch Adam: coupled L2
  c.optim.lr = 0.00012
  c.optim.weight_decay = 0.0001
  c.optim.clip_value = 0.0  # no clipping
  c.optim.schedule.name = "step"  # StepLR, stepped once per epoch once the warm-up is over
  c.optim.schedule.step_size = 4
  c.optim.schedule.gamma = 0.45
  c.optim.schedule.offset = 1  # the schedulers step only once the warm-up (and d_warmup) is over
  c.optim.groups = (
      # Warm-up: the backbone gets no gradient (no optimizer state, no weight decay) before this epoch.
      ("model/backbone/.*", dict(name="backbone", start_epoch=1)),
      # The proxies' own Adam (loss_adv_proxy_lr), no weight decay.
      ("loss/proxies", dict(name="proxies", lr=0.04, weight_decay=0.0)),
      # The discriminators' Adam (loss_adv_classifier_lr, dis_decay).
      ("discriminators/.*", dict(name="discriminators", lr=0.0005, weight_decay=0.0004)),
  )

  c.eval.metrics = ('recall', 'f1', 'map@r')
  c.eval.options = ml_collections.ConfigDict(dict(recall_ks=(1, 2, 4), map_r_variant="class_size"))
  c.eval.every_epochs = 1
  c.eval.start_epoch = 0
  c.eval.select_on = "test"
  c.eval.select_metric = "recall@1"
  return c
