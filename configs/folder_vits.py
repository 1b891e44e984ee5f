"""Your own images: fine-tune a ViT-S/16 (AugReg in-21k) with Proxy-Anchor on a folder of class subfolders.

  python convert_timm_weights.py --model vit_small_patch16_224.augreg_in21k --out weights/vit_s16
      (offline: add --checkpoint S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz)
  python train.py --config configs/folder_vits.py --workdir runs/mine \
      --config.dataset.data_root=~/photos --config.model.weights=weights/vit_s16

Data: `~/photos/<class>/<image>` (any image names, nested folders allowed; at least 4 classes and 2 images per
class). DML splits by class: a seeded random half of the classes trains (dataset.folder.train_fraction,
dataset.folder.seed), the other half is the test split the model has never seen, on which Recall@K and MAP@R
are measured. dataset.folder.classes_file names the test classes instead (one folder name per line; with
classes_file_split='train' the training classes). The split is recorded in `<workdir>/split.json` and reused
when the run resumes.

Recipe for small collections (tens of classes, tens of images each): 224 px, batch 32 of random images;
Linear(384 -> 384) head, L2; Proxy-Anchor (alpha 32, margin 0.1); AdamW lr 2e-5 with weight decay 0.05 on
the backbone, head x10, proxies x100; one warm-up epoch training only the head and the proxies (the new
layers settle before the pretrained ones move); cosine decay over 30 epochs; gradient clamp 10. Milder
crops than ImageNet's (scale 0.25-1) keep the object in view on small photos. Evaluation on the test classes
every epoch; the best Recall@1 checkpoint is kept (selected on the test classes; set eval.select_on='val' and
dataset.val_fraction for a held-out choice when there are enough classes).

Not a paper's setting: no published numbers apply. On a CPU an epoch of a few hundred images takes minutes;
a GPU takes seconds.
"""

from dml_jax.methods import method_config
from dml_jax.train.config import default_config


def get_config():
  c = default_config()
  c.seed = 0
  c.num_epochs = 30
  c.method = method_config("metric_loss")
  c.method.head = "linear"  # Linear(384 -> 384) on the class token
  c.method.bn_freeze = False  # a ViT has no BatchNorm
  c.method.loss.name = "proxy_anchor"
  c.method.loss.hparams.alpha = 32.0
  c.method.loss.hparams.margin = 0.1
  c.dataset.name = "folder"
  c.dataset.data_root = ""  # required: --config.dataset.data_root=~/photos
  c.dataset.source = "raw"
  c.dataset.image_size = 224
  c.dataset.resize_size = 256
  # How the classes are split (dml_jax.data.FolderSplit); a workdir's split.json, when present, wins.
  c.dataset.folder.train_fraction = 0.5
  c.dataset.folder.seed = 0
  c.dataset.folder.classes_file = ""
  c.dataset.folder.classes_file_split = "test"
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  c.data.sampler = "random"  # Proxy-Anchor needs no pairs in the batch
  c.data.num_threads = 8
  c.data.scale = (0.25, 1.0)
  c.data.flip = True
  c.data.interpolation = "bicubic"  # the AugReg weights' own
  c.model.backbone = "vit_small_patch16_224.augreg_in21k"
  c.model.weights = "weights/vit_s16"  # converted as above; loading is strict
  c.model.embedding_dim = 384
  c.optim.optimizer = "adamw"
  c.optim.lr = 2e-5
  c.optim.weight_decay = 0.05
  c.optim.clip_value = 10.0
  c.optim.schedule.name = "cosine"
  c.optim.schedule.t_max = c.num_epochs
  c.optim.schedule.eta_min = 1e-7
  c.optim.groups = (
      # One warm-up epoch trains only the head and the proxies: the new layers settle before the
      # pretrained ones move.
      ("model/backbone/.*", dict(name="backbone", start_epoch=1)),
      ("loss/.*", dict(name="proxies", lr_mult=100.0, weight_decay=0.0)),
      ("model/head/.*", dict(name="head", lr_mult=10.0)))
  c.eval.protocol = "folder"
  c.eval.metrics = ("recall", "map@r")
  c.eval.every_epochs = 1
  c.eval.before_training = True  # the pretrained features' retrieval, for comparison
  c.eval.select_on = "test"
  c.eval.select_metric = "recall@1"
  c.log.every_steps = 5
  return c
