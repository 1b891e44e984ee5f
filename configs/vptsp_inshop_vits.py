"""VPTSP-G on In-Shop, ViT-S/16 (AugReg in-21k): the official `config/inshop_small.yaml`.

  python convert_timm_weights.py --model vit_small_patch16_224.augreg_in21k --out weights/vit_s16_in21k
      (offline: add --checkpoint S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz,
       the AugReg file from gs://vit_models/augreg/)
  python train.py --config configs/vptsp_inshop_vits.py --workdir runs/vptsp_inshop_vits \
      --config.dataset.data_root=/data   (--config.model.weights=DIR if not converted to weights/vit_s16_in21k)

Setting (specs/vptsp_dada.md §1.7): E = 384; batch 32 = 32 classes x 1; AdamW lr 0.0001,
proxy bias O lr 0.05; weight decay 1e-07; 80 epochs; cosine T_max 100, eta_min 5e-06, per epoch;
task prompts N = 90 in 12 blocks (step 0); class prompts m = 80 in 12 blocks (step 0);
proxy bias ratio alpha 0.2; GRU dropout 0.1; BitFit.
Class prompts in host memory (memory bank, lazy row-sparse AdamW): the tables and their two
AdamW moments take about 17.7 GB of host RAM; only the batch's 32 classes go to the device.
Evaluation from epoch 40 on (eval.start_epoch, the code's eval_start), best test R@1 kept (best epoch
on the test split, as the code does).

Paper (Ren et al., ICLR 2024, Table 2; MAP@R from the README): R@1/10/20 91.2 / 97.6 / 98.4;
  MAP@R not reported. Query/gallery retrieval.
Nothing was reproduced here (no GPU and no datasets on the development machine): hardware, time and
numbers of a full run are unknown; the paper reports 260 ms per iteration for VPTSP (ViT-S, batch 64)
on Cars196.
"""

from dml_jax.train.vptsp_recipes import vptsp_config


def get_config():
  return vptsp_config("inshop", "vit_s16")
