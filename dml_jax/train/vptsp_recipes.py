"""VPTSP-G's nine released settings (official `config/*.yaml` over `params.py`, specs/vptsp_dada.md §1.7).

`vptsp_config(dataset, backbone)` gives the full config of one setting; the configs/vptsp_*.py files are
one call each, with the command, the weights and the paper's numbers in their docstrings.

Common to all settings (the code): frozen AugReg in-21k ViT, BitFit, deep task prompts, class prompts with
the GRU-ReLU semantic proxies, Proxy-Anchor alpha 32 / delta 0.1 with the positive term over all C classes,
`class_random` batches (B/k distinct classes, k images each, contiguous; floor(N / B) batches per epoch),
RandomResizedCrop(224, bilinear) + flip for training, Resize(256) + CenterCrop(224) for evaluation,
mean = std = 0.5, one optimizer for everything but the proxy bias O and a second one (same type, lr_proxy)
for O, both with CosineAnnealingLR(T_max, eta_min) stepped per epoch and no warm-up or clipping,
evaluation on the test split with best-R@1 selection, MAP@R in the code's class-size form.
The code trains with fp16 autocast; here float32 by default (`--config.compute_dtype=bfloat16` on GPUs).
"""

from __future__ import annotations

import ml_collections

from dml_jax.train.config import default_config

BACKBONES = {"vit_s16": "vit_small_patch16_224.augreg_in21k", "vit_b16": "vit_base_patch16_224.augreg_in21k"}
# The variants' architecture, spelled out so that command-line overrides can change it (the config is locked).
ARCHS = {"vit_s16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
         "vit_b16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)}

# (dataset, backbone) -> the YAML values. prompts / class_prompts: (num, depth, block step).
VPTSP_RECIPES = {
    ("cub200", "vit_s16"): dict(embed=384, batch=64, k=2, optimizer="sgd", lr=5e-3, lr_proxy=0.1, decay=1e-6,
                                epochs=15, t_max=50, eta_min=1e-8, prompts=(10, 12, 0), class_prompts=(3, 12, 0),
                                alpha=0.5, rnn_dropout=0.0, bank=False, eval_start=5),
    ("cub200", "vit_b16"): dict(embed=512, batch=64, k=2, optimizer="sgd", lr=1e-3, lr_proxy=0.01, decay=1e-6,
                                epochs=60, t_max=100, eta_min=1e-7, prompts=(20, 12, 0), class_prompts=(5, 4, 5),
                                alpha=0.4, rnn_dropout=0.0, bank=False, eval_start=30),
    ("cars196", "vit_s16"): dict(embed=384, batch=64, k=2, optimizer="adamw", lr=5e-4, lr_proxy=0.01, decay=0.0,
                                 epochs=50, t_max=50, eta_min=1e-6, prompts=(80, 11, 2), class_prompts=(50, 8, 2),
                                 alpha=0.7, rnn_dropout=0.0, bank=False, eval_start=35),
    ("cars196", "vit_b16"): dict(embed=512, batch=64, k=2, optimizer="adamw", lr=5e-4, lr_proxy=0.01, decay=0.0,
                                 epochs=60, t_max=50, eta_min=1e-6, prompts=(80, 10, 2), class_prompts=(50, 8, 2),
                                 alpha=0.1, rnn_dropout=0.0, bank=False, eval_start=40),
    ("sop", "vit_s16"): dict(embed=384, batch=32, k=1, optimizer="adamw", lr=1e-4, lr_proxy=0.05, decay=1e-4,
                             epochs=120, t_max=120, eta_min=5e-5, prompts=(90, 12, 0), class_prompts=(5, 12, 0),
                             alpha=0.2, rnn_dropout=0.1, bank=True, eval_start=30),
    ("sop", "vit_b16"): dict(embed=512, batch=32, k=1, optimizer="adamw", lr=1e-4, lr_proxy=0.05, decay=1e-4,
                             epochs=120, t_max=120, eta_min=1e-7, prompts=(90, 12, 5), class_prompts=(5, 8, 0),
                             alpha=0.2, rnn_dropout=0.5, bank=True, eval_start=30),
    ("inshop", "vit_s16"): dict(embed=384, batch=32, k=1, optimizer="adamw", lr=1e-4, lr_proxy=0.05, decay=1e-7,
                                epochs=80, t_max=100, eta_min=5e-6, prompts=(90, 12, 0), class_prompts=(80, 12, 0),
                                alpha=0.2, rnn_dropout=0.1, bank=True, eval_start=40),
    ("inshop", "vit_b16"): dict(embed=512, batch=32, k=1, optimizer="adamw", lr=1e-4, lr_proxy=0.05, decay=0.0,
                                epochs=75, t_max=100, eta_min=1e-6, prompts=(90, 12, 0), class_prompts=(60, 12, 0),
                                alpha=0.3, rnn_dropout=0.0, bank=True, eval_start=20),
    ("inaturalist", "vit_b16"): dict(embed=512, batch=64, k=1, optimizer="adamw", lr=1e-4, lr_proxy=0.05,
                                     decay=0.0, epochs=40, t_max=50, eta_min=1e-6, prompts=(90, 12, 5),
                                     class_prompts=(10, 12, 0), alpha=0.2, rnn_dropout=0.0, bank=True,
                                     eval_start=5),
}

# The code's evaluation lists: default (R@1,2,4,8, NMI, F1, MAP@R); SOP R@1,10,100, F1, MAP@R; In-Shop
# query/gallery R@1,10,20,30,40,50. iNaturalist also gets R@16 and R@32, which the paper reports.
_EVAL = {
    "cub200": dict(metrics=("recall", "nmi", "f1", "map@r"), recall_ks=(1, 2, 4, 8)),
    "cars196": dict(metrics=("recall", "nmi", "f1", "map@r"), recall_ks=(1, 2, 4, 8)),
    "sop": dict(metrics=("recall", "f1", "map@r"), recall_ks=(1, 10, 100)),
    "inshop": dict(metrics=("recall",), recall_ks=(1, 10, 20, 30, 40, 50)),
    "inaturalist": dict(metrics=("recall", "nmi", "f1", "map@r"), recall_ks=(1, 2, 4, 8, 16, 32)),
}


def vptsp_config(dataset: str, backbone: str) -> ml_collections.ConfigDict:
  """The official VPTSP-G setting for (dataset, backbone), backbone 'vit_s16' or 'vit_b16'."""
  if (dataset, backbone) not in VPTSP_RECIPES:
    raise KeyError(f"no released VPTSP setting for ({dataset!r}, {backbone!r}); known: {sorted(VPTSP_RECIPES)}")
  r = VPTSP_RECIPES[(dataset, backbone)]
  c = default_config()
  c.seed = 0
  c.num_epochs = r["epochs"]
  c.compute_dtype = "float32"
  num, depth, step = r["prompts"]
  p_num, p_depth, p_step = r["class_prompts"]
  c.method = ml_collections.ConfigDict(dict(
      name="vptsp", num_prompts=num, prompt_depth=depth, prompt_block_step=step, num_class_prompts=p_num,
      class_prompt_depth=p_depth, class_prompt_block_step=p_step, semantic_mix="gru_relu", mix_keep_ratio=0.8,
      proxy_bias_ratio=r["alpha"], rnn_dropout=r["rnn_dropout"], bitfit=True, memory_bank=r["bank"]))
  c.dataset.name = dataset
  c.dataset.image_size = 224
  c.dataset.resize_size = 256
  c.data.batch_size = r["batch"]
  c.data.sampler = "m_per_class"
  c.data.samples_per_class = r["k"]
  c.data.eval_batch_size = r["batch"]
  c.data.scale = (0.08, 1.0)
  c.data.ratio = (3 / 4, 4 / 3)
  c.data.flip = True
  c.data.interpolation = "bilinear"  # torchvision defaults (the paper says bicubic; the code does not)
  c.model.backbone = BACKBONES[backbone]
  # The converted AugReg weights (the configs' docstrings give the command); a missing directory stops with
  # the expected layout instead of training prompts on a random frozen ViT.
  c.model.weights = f"weights/{backbone}_in21k"
  c.model.backbone_overrides = ml_collections.ConfigDict(ARCHS[backbone])
  c.model.embedding_dim = r["embed"]
  c.loss.name = "proxy_anchor"
  # pos_normalizer 'all': the positive term is divided by C, as the code's `both_all` mode (§1.5).
  c.loss.hparams = ml_collections.ConfigDict(dict(alpha=32.0, margin=0.1, pos_normalizer="all"))
  c.loss.param_options = ml_collections.ConfigDict()
  c.optim.optimizer = r["optimizer"]
  c.optim.lr = r["lr"]
  c.optim.weight_decay = r["decay"]
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.clip_value = 0.0
  c.optim.schedule.name = "cosine"
  c.optim.schedule.t_max = r["t_max"]
  c.optim.schedule.eta_min = r["eta_min"]
  c.optim.schedule.offset = 0
  c.optim.warmup_epochs = 0
  c.optim.warmup_trainable = ""
  c.optim.frozen = ""  # the method freezes every ViT weight but the biases itself (frozen_paths)
  c.optim.groups = (("model/proxy_bias", dict(name="proxy_bias", lr=r["lr_proxy"])),)
  ev = _EVAL[dataset]
  c.eval.metrics = ev["metrics"]
  c.eval.options = ml_collections.ConfigDict(dict(recall_ks=ev["recall_ks"], map_r_variant="class_size"))
  c.eval.every_epochs = 1
  c.eval.start_epoch = r["eval_start"]  # the code's eval_start: no evaluation (so no selection) before it
  c.eval.select_on = "test"
  c.eval.select_metric = "recall@1"
  return c
