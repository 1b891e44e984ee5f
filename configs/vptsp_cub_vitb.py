"""VPTSP-G on CUB-200-2011, ViT-B/16 (AugReg in-21k): the official `config/cub200_basic.yaml`.

  python convert_timm_weights.py --model vit_base_patch16_224.augreg_in21k --out weights/vit_b16_in21k
      (offline: add --checkpoint B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz,
       the AugReg file from gs://vit_models/augreg/)
  python train.py --config configs/vptsp_cub_vitb.py --workdir runs/vptsp_cub_vitb \
      --config.dataset.data_root=/data   (--config.model.weights=DIR if not converted to weights/vit_b16_in21k)

Setting (specs/vptsp_dada.md §1.7): E = 512; batch 64 = 32 classes x 2; SGD (momentum 0.9) lr 0.001,
proxy bias O lr 0.01; weight decay 1e-06; 60 epochs; cosine T_max 100, eta_min 1e-07, per epoch;
task prompts N = 20 in 12 blocks (step 0); class prompts m = 5 in 4 blocks (step 5);
proxy bias ratio alpha 0.4; GRU dropout 0; BitFit.
Evaluation from epoch 30 on (eval.start_epoch, the code's eval_start), best test R@1 kept (best epoch
on the test split, as the code does).

Paper (Ren et al., ICLR 2024, Table 2; MAP@R from the README): R@1/2/4 88.5 / 92.8 / 95.1;
  MAP@R 57.0 (the code's class-size MAP@R, logged as map@r).
Nothing was reproduced here (no GPU and no datasets on the development machine): hardware, time and
numbers of a full run are unknown; the paper reports 260 ms per iteration for VPTSP (ViT-S, batch 64)
on Cars196.
"""

from dml_jax.train.vptsp_recipes import vptsp_config


def get_config():
  return vptsp_config("cub200", "vit_b16")
