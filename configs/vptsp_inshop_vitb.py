"""VPTSP-G on In-Shop, ViT-B/16 (AugReg in-21k): the official `config/inshop_basic.yaml`.

  python convert_timm_weights.py --model vit_base_patch16_224.augreg_in21k --out weights/vit_b16_in21k
      (offline: add --checkpoint B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz,
       the AugReg file from gs://vit_models/augreg/)
  python train.py --config configs/vptsp_inshop_vitb.py --workdir runs/vptsp_inshop_vitb \
      --config.dataset.data_root=/data   (--config.model.weights=DIR if not converted to weights/vit_b16_in21k)

Setting (specs/vptsp_dada.md §1.7): E = 512; batch 32 = 32 classes x 1; AdamW lr 0.0001,
proxy bias O lr 0.05; weight decay 0; 75 epochs; cosine T_max 100, eta_min 1e-06, per epoch;
task prompts N = 90 in 12 blocks (step 0); class prompts m = 60 in 12 blocks (step 0);
proxy bias ratio alpha 0.3; GRU dropout 0; BitFit.
Class prompts in host memory (memory bank, lazy row-sparse AdamW): the tables and their two
AdamW moments take about 26.5 GB of host RAM; only the batch's 32 classes go to the device.
Evaluation from epoch 20 on (eval.start_epoch, the code's eval_start), best test R@1 kept (best epoch
on the test split, as the code does).

Paper (Ren et al., ICLR 2024, Table 2; MAP@R from the README): R@1/10/20 92.5 / 98.2 / 98.9;
  MAP@R not reported. Query/gallery retrieval.
Nothing was reproduced here (no GPU and no datasets on the development machine): hardware, time and
numbers of a full run are unknown; the paper reports 260 ms per iteration for VPTSP (ViT-S, batch 64)
on Cars196.
"""

from dml_jax.train.vptsp_recipes import vptsp_config


def get_config():
  return vptsp_config("inshop", "vit_b16")
