"""VPTSP-G on CUB-200-2011, ViT-S/16 (AugReg in-21k): the official `config/cub200_small.yaml`.

  python convert_timm_weights.py --model vit_small_patch16_224.augreg_in21k --out weights/vit_s16_in21k
      (offline: add --checkpoint S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz,
       the AugReg file from gs://vit_models/augreg/)
  python train.py --config configs/vptsp_cub_vits.py --workdir runs/vptsp_cub_vits \
      --config.dataset.data_root=/data   (--config.model.weights=DIR if not converted to weights/vit_s16_in21k)

Setting (specs/vptsp_dada.md §1.7): E = 384; batch 64 = 32 classes x 2; SGD (momentum 0.9) lr 0.005,
proxy bias O lr 0.1; weight decay 1e-06; 15 epochs; cosine T_max 50, eta_min 1e-08, per epoch;
task prompts N = 10 in 12 blocks (step 0); class prompts m = 3 in 12 blocks (step 0);
proxy bias ratio alpha 0.5; GRU dropout 0; BitFit.
Evaluation from epoch 5 on (eval.start_epoch, the code's eval_start), best test R@1 kept (best epoch
on the test split, as the code does).

Paper (Ren et al., ICLR 2024, Table 2; MAP@R from the README): R@1/2/4 86.6 / 91.7 / 94.8;
  MAP@R 52.7 (the code's class-size MAP@R, logged as map@r).
Nothing was reproduced here (no GPU and no datasets on the development machine): hardware, time and
numbers of a full run are unknown; the paper reports 260 ms per iteration for VPTSP (ViT-S, batch 64)
on Cars196.
"""

from dml_jax.train.vptsp_recipes import vptsp_config


def get_config():
  return vptsp_config("cub200", "vit_s16")
