"""VPTSP-G on Cars196, ViT-S/16 (AugReg in-21k): the official `config/cars_small.yaml`.

  python convert_timm_weights.py --model vit_small_patch16_224.augreg_in21k --out weights/vit_s16_in21k
      (offline: add --checkpoint S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz,
       the AugReg file from gs://vit_models/augreg/)
  python train.py --config configs/vptsp_cars_vits.py --workdir runs/vptsp_cars_vits \
      --config.dataset.data_root=/data   (--config.model.weights=DIR if not converted to weights/vit_s16_in21k)

Setting (specs/vptsp_dada.md §1.7): E = 384; batch 64 = 32 classes x 2; AdamW lr 0.0005,
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

from dml_jax.train.vptsp_recipes import vptsp_config


def get_config():
  return vptsp_config("cars196", "vit_s16")
