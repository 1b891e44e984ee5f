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

--out must be a new folder, an empty one, or a weights directory written before (replaced); anything
else (a folder with other files, the current folder or a parent of it) is refused, so a mistyped --out
deletes nothing. The directory is written beside it under a temporary name and moved into place.

Without network (or with HF_HUB_OFFLINE=1) a timm name is looked up in the hub cache only and fails within
seconds when it is not there; pass the checkpoint file instead. Mistakes end with one `error:` line and
exit status 2 (--debug adds the traceback).

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
from collections.abc import Sequence
from typing import Any

import numpy as np

from dml_jax import cli
from dml_jax.backbones.registry import get_entry, get_pretrained_cfg
from dml_jax.convert.families import convert
from dml_jax.convert.sources import SourceWeights, read_checkpoint, read_timm_pretrained
from dml_jax.convert.state_dict_reader import StateDictReader
from dml_jax.convert.weights_dir import check_out_dir, strict_update, write_weights_dir
from dml_jax.errors import InvalidValueError, UserError, close_matches
from dml_jax.preprocessing import PretrainedCfg

# Our architecture arguments that timm's model functions set themselves or do not know.
_NOT_FOR_TIMM = ("distilled", "dtype", "param_dtype")


def _parse_arch(items: Sequence[str]) -> dict[str, Any]:
  arch = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise InvalidValueError(f"--arch expects KEY=VALUE, got {item!r}", "e.g. --arch img_size=384")
    try:
      arch[key] = json.loads(value)
    except json.JSONDecodeError:
      arch[key] = value
  return arch


def _cfg_from_timm(cfg: dict[str, Any], name: str) -> PretrainedCfg:
  _, height, width = cfg["input_size"]
  if height != width:
    raise InvalidValueError(f"timm cfg of {name} has a non-square input_size {cfg['input_size']}",
                            "dml_jax backbones take square images")
  return PretrainedCfg(mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), input_size=int(height),
                       crop_pct=float(cfg["crop_pct"]), interpolation=cfg["interpolation"])


def _read_source(args, entry, arch_overrides: dict[str, Any]) -> tuple[SourceWeights, PretrainedCfg]:
  if args.checkpoint is not None:
    return read_checkpoint(args.checkpoint), get_pretrained_cfg(args.model)
  if entry.family == "bninception":
    raise UserError("timm has no BN-Inception, so it cannot be downloaded by name",
                    "pass pretrainedmodels' checkpoint with --checkpoint bn_inception-52deb4733.pth (the (d) source)")
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
  parser.add_argument("--out", required=True, help="output directory: new, empty, or a weights directory (replaced); "
                      "any other existing folder is refused")
  parser.add_argument("--arch", nargs="*", default=[], metavar="KEY=VALUE",
                      help="architecture overrides, e.g. img_size=384")
  parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
  return parser.parse_args(argv)


def _build_shapes(entry, arch: dict[str, Any], arch_overrides: dict[str, Any]):
  from flax import nnx

  try:
    # Shapes only: the check needs no random initialisation.
    return nnx.eval_shape(lambda: entry.build(rngs=nnx.Rngs(0), **arch))
  except TypeError as e:
    bad = [k for k in arch_overrides if f"'{k}'" in str(e)]
    if not bad or "keyword argument" not in str(e):
      raise
    close = close_matches(bad[0], list(entry.arch))
    guess = f"did you mean {' or '.join(close)}? " if close else ""
    raise InvalidValueError(f"--arch {bad[0]}: {entry.name} has no such argument",
                            f"{guess}its arguments: {', '.join(sorted(entry.arch))}") from None


def run(argv: Sequence[str] | None = None) -> int:
  """Converts as the command line says; user mistakes raise UserError (main() prints them)."""
  args = parse_args(argv)
  check_out_dir(args.out)  # before a minute of reading or downloading, not after
  arch_overrides = _parse_arch(args.arch)
  entry = get_entry(args.model)
  arch = {**entry.arch, **arch_overrides}
  get_pretrained_cfg(args.model)  # an unknown tag stops here, before any reading or download
  source, cfg = _read_source(args, entry, arch_overrides)
  reader = StateDictReader(source.arrays, source.description)
  flat = convert(entry.family, source.layout, reader, arch)
  flat = {k: np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating) else np.asarray(v)
          for k, v in flat.items()}
  model = _build_shapes(entry, arch, arch_overrides)
  strict_update(model, flat, source=source.description, note=f"as {entry.name} with arch {arch}")
  write_weights_dir(args.out, model_name=entry.name, family=entry.family, arch=arch, flat=flat,
                    pretrained_cfg=cfg, source=source.description, dropped_keys=reader.dropped)
  print(_summary(os.fspath(args.out), entry, arch, source, flat, reader.dropped, cfg))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line: 0, or 2 with one `error:` line (see dml_jax.cli)."""
  raw = sys.argv[1:] if argv is None else list(argv)
  return cli.run(lambda: run(argv), debug=cli.debug_requested(raw))


if __name__ == "__main__":
  sys.exit(main())
