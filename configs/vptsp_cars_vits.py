"""VPTSP-G on Cars196, ViT-S/16 (AugReg in-21k): the official `config/cars_small.yaml`.

  python convert_timm_weights.py --model vit_small_patch16_224.augreg_in21k --out weights/vit_s16_in21k
      (offline: add --checkpoint S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz,
       the AugReg file from gs://vit_models/augreg/)
  python train.py --config configs/vptsp_cars_vits.py --workdir runs/vptsp_cars_vits \
      --config.dataset.data_root=/data   (--config.model.weights=DIR if not converted to weights/vit_s16_in21k)

Setting (the official YAML over params.py): E = 384; batch 64 = 32 classes x 2; AdamW lr 0.0005,
proxy bias O lr 0.01; weight decay 0; 50 epochs; cosine T_max 50, eta_min 1e-06, per epoch;
task prompts N = 80 in 11 blocks (step 2); class prompts m = 50 in 8 blocks (step 2);
proxy bias ratio alpha 0.7; GRU dropout 0; BitFit.
Evaluation from epoch 35 on (eval.start_epoch, the code's eval_start), best test R@1 kept (best epoch
on the test split, as the code does).

Paper (Ren et al., ICLR 2024, Table 2; MAP@R from the README): R@1/2/4 87.7 / 93.3 / 96.1;
  MAP@R 28.9 (the code's class-size MAP@R, logged as map@r).
Nothing was reproduced here (no GPU and no datasets on the development machine): hardware, time and
numbers of a full run are unknown; the paper reports 260 ms per iteration for VPTSP (ViT-S, batch 64)
on Cars196.
"""

import ml_collections

from dml_jax.methods import method_config
from dml_jax.train.config import default_config


def get_config():
  c = default_config()
  c.seed = 0
  c.num_epochs = 50
  c.compute_dtype = "auto"  # the code trains with fp16 autocast: bfloat16 on a GPU, float32 on a CPU
  c.method = method_config("vptsp")
  c.method.num_prompts = 80  # N task prompts per block, block i gets max(N - i * step, 0)
  c.method.prompt_depth = 11
  c.method.prompt_block_step = 2
  c.method.num_class_prompts = 50  # m class prompts per block
  c.method.class_prompt_depth = 8
  c.method.class_prompt_block_step = 2
  c.method.semantic_mix = "gru_relu"  # VPTSP-G
  c.method.proxy_bias_ratio = 0.7  # alpha: proxies = alpha * O + (1 - alpha) * S
  c.method.rnn_dropout = 0.0
  c.method.memory_bank = False
  c.method.loss.alpha = 32.0
  c.method.loss.margin = 0.1
  c.method.loss.pos_normalizer = "all"  # the code's `both_all`: positive term over all C classes

  c.dataset.name = "cars196"
  c.dataset.image_size = 224
  c.dataset.resize_size = 256
  c.data.batch_size = 64
  c.data.sampler = "m_per_class"  # class_random: B/k distinct classes, k images each, contiguous
  c.data.samples_per_class = 2
  c.data.eval_batch_size = 64
  c.data.scale = (0.08, 1.0)
  c.data.ratio = (3 / 4, 4 / 3)
  c.data.flip = True
  c.data.interpolation = "bilinear"  # torchvision defaults (the paper says bicubic; the code does not)

  c.model.backbone = "vit_small_patch16_224.augreg_in21k"
  # The architecture spelled out so that command-line overrides can change it (the config is locked).
  c.model.backbone_overrides = ml_collections.ConfigDict(dict(
      img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6))
  # The converted AugReg weights (command above); a missing directory stops with the expected layout
  # instead of training prompts on a random frozen ViT.
  c.model.weights = "weights/vit_s16_in21k"
  c.model.embedding_dim = 384

  c.optim.optimizer = "adamw"
  c.optim.lr = 0.0005
  c.optim.weight_decay = 0.0
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.clip_value = 0.0  # no clipping
  c.optim.schedule.name = "cosine"  # CosineAnnealingLR stepped once per epoch
  c.optim.schedule.t_max = 50
  c.optim.schedule.eta_min = 1e-06
  c.optim.groups = (
      # The frozen ViT: every weight except the biases (BitFit, the code's `'bias' in name`).
      ("model/backbone/(?!.*bias$).*", dict(name="frozen_vit", frozen=True)),
      # The proxy bias O has an optimizer of its own (same type, lr_proxy).
      ("model/proxy_bias", dict(name="proxy_bias", lr=0.01)),
  )

  c.eval.metrics = ('recall', 'nmi', 'f1', 'map@r')
  c.eval.options = ml_collections.ConfigDict(dict(recall_ks=(1, 2, 4, 8), map_r_variant="class_size"))
  c.eval.every_epochs = 1
  c.eval.start_epoch = 35  # the code's eval_start: no evaluation (so no selection) before it
  c.eval.select_on = "test"
  c.eval.select_metric = "recall@1"
  return c
