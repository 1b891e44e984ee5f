r"""Converts a checkpoint once into a weights directory that `dml_jax.backbones.create` loads without torch.

Sources:
  (a) a timm name with a pretrained tag, downloaded through timm when the machine is online:
        python convert_timm_weights.py --model vit_base_patch16_224.augreg_in21k --out weights/vit_b16_in21k
  (b) a local torch state dict (.pth / .pt / .bin, optionally wrapped under 'model' or 'state_dict') or
      .safetensors file with timm / torchvision / pretrainedmodels names:
        python convert_timm_weights.py --model deit_small_distilled_patch16_224.fb_in1k \
          --checkpoint deit_small_distilled_patch16_224-649709d9.pth --out weights/deit_s_dist
  (c) a Google vit_jax / AugReg .npz (read with numpy only; torch is not imported):
        python convert_timm_weights.py --model vit_small_patch16_224.augreg_in21k \
          --checkpoint S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz --out weights/vit_s16_in21k
  (d) pretrainedmodels' BN-Inception .pth (timm has no BN-Inception, so only a local file works):
        python convert_timm_weights.py --model bn_inception --checkpoint bn_inception-52deb4733.pth --out weights/bni

The output directory holds params.npz (flat NNX parameter paths) and model.json (model name, family,
architecture, the weights' preprocessing cfg, source, keys dropped on purpose). Every parameter of the model
must come from the checkpoint and every checkpoint key must be used or dropped on purpose (classifier heads);
otherwise the conversion stops listing the missing, unexpected and mis-shaped keys.

--arch KEY=VALUE changes the architecture from the named variant's (e.g. a checkpoint trained at 384 px:
--arch img_size=384); values are JSON (numbers, true/false) or plain strings. With a timm name they are
passed to timm.create_model as well. `create(name, weights=DIR, **same_overrides)` then loads the directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from dml_jax.preprocessing import PretrainedCfg
from dml_jax.backbones.registry import get_entry, get_pretrained_cfg
from dml_jax.convert.errors import WeightsMismatchError
from dml_jax.convert.families import convert
from dml_jax.convert.sources import SourceWeights, read_checkpoint, read_timm_pretrained
from dml_jax.convert.state_dict_reader import StateDictReader
from dml_jax.convert.weights_dir import strict_update, write_weights_dir

# Our architecture arguments that timm's model functions set themselves or do not know.
_NOT_FOR_TIMM = ("distilled", "dtype", "param_dtype")


def _parse_arch(items: Sequence[str]) -> dict[str, Any]:
  arch = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--arch expects KEY=VALUE, got {item!r}")
    try:
      arch[key] = json.loads(value)
    except json.JSONDecodeError:
      arch[key] = value
  return arch


def _cfg_from_timm(cfg: dict[str, Any], name: str) -> PretrainedCfg:
  _, height, width = cfg["input_size"]
  if height != width:
    raise ValueError(f"timm cfg of {name} has a non-square input_size {cfg['input_size']}")
  return PretrainedCfg(mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), input_size=int(height),
                       crop_pct=float(cfg["crop_pct"]), interpolation=cfg["interpolation"])


def _read_source(args, entry, arch_overrides: dict[str, Any]) -> tuple[SourceWeights, PretrainedCfg]:
  if args.checkpoint is not None:
    return read_checkpoint(args.checkpoint), get_pretrained_cfg(args.model)
  if entry.family == "bninception":
    raise ValueError("timm has no BN-Inception, so it cannot be downloaded by name; pass pretrainedmodels' "
                     "checkpoint with --checkpoint bn_inception-52deb4733.pth (the (d) source)")
  timm_kwargs = {k: v for k, v in arch_overrides.items() if k not in _NOT_FOR_TIMM}
  source, timm_cfg = read_timm_pretrained(args.model, **timm_kwargs)
  return source, _cfg_from_timm(timm_cfg, source.description)


def _summary(out, entry, arch, source: SourceWeights, flat, dropped, cfg: PretrainedCfg) -> str:
  num = sum(int(np.size(v)) for v in flat.values())
  lines = [f"converted {source.description} -> {out}",
           f"  model: {entry.name} (family {entry.family}), arch {json.dumps(arch, sort_keys=True)}",
           f"  parameters: {num:,} in {len(flat)} arrays"]
  lines += [f"  note: {n}" for n in source.notes]
  lines.append(f"  dropped on purpose ({len(dropped)}): {', '.join(dropped) if dropped else 'none'}")
  lines.append(f"  pretrained cfg: mean {cfg.mean}, std {cfg.std}, input {cfg.input_size}, crop_pct {cfg.crop_pct}, "
               f"{cfg.interpolation}, {cfg.color_order}, pixel_scale {cfg.pixel_scale}")
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  summary, _, details = __doc__.partition("\n\n")
  parser = argparse.ArgumentParser(description=summary, epilog=details,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True,
                      help="registered variant, optionally with a pretrained tag: vit_base_patch16_224.augreg_in21k")
  parser.add_argument("--checkpoint", default=None,
                      help="local .pth / .pt / .bin / .safetensors / .npz; without it, timm downloads the weights")
  parser.add_argument("--out", required=True, help="output directory (replaced if it exists)")
  parser.add_argument("--arch", nargs="*", default=[], metavar="KEY=VALUE",
                      help="architecture overrides, e.g. img_size=384")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    arch_overrides = _parse_arch(args.arch)
    entry = get_entry(args.model)
    arch = {**entry.arch, **arch_overrides}
    source, cfg = _read_source(args, entry, arch_overrides)
    reader = StateDictReader(source.arrays, source.description)
    flat = convert(entry.family, source.layout, reader, arch)
    flat = {k: np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating) else np.asarray(v)
            for k, v in flat.items()}
    from flax import nnx

    # Shapes only: the check needs no random initialisation.
    model = nnx.eval_shape(lambda: entry.build(rngs=nnx.Rngs(0), **arch))
    strict_update(model, flat, source=source.description, note=f"as {entry.name} with arch {arch}")
    write_weights_dir(args.out, model_name=entry.name, family=entry.family, arch=arch, flat=flat,
                      pretrained_cfg=cfg, source=source.description, dropped_keys=reader.dropped)
  except (WeightsMismatchError, FileNotFoundError, KeyError, ValueError, RuntimeError, TypeError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {message}", file=sys.stderr)
    return 1
  print(_summary(os.fspath(args.out), entry, arch, source, flat, reader.dropped, cfg))
  return 0


if __name__ == "__main__":
  sys.exit(main())
