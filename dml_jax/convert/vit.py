"""ViT / DeiT checkpoints -> flat NNX params of dml_jax.backbones.vit.VisionTransformer.

Two source layouts:
  * timm / DeiT torch state dicts (`from_torch`): `blocks.0.attn.qkv.weight` ...; Linear weights are
    (out, in) and become kernels (in, out); the patch conv is OIHW and becomes HWIO.
  * Google vit_jax / AugReg `.npz` (`from_big_vision`): `Transformer/encoderblock_0/MultiHeadDotProductAttention_1/
    query/kernel` [D, H, hd] ...; kernels are already (in, out) / HWIO; query, key and value are fused into
    one qkv kernel [D, 3D] ([q; k; v] along the output axis, head-major), as timm's `_load_weights` does.

Both consume every key of the source (classifier heads are dropped on purpose and reported) and end with
`reader.finish()`, so a checkpoint of another architecture stops with the full list of missing and unexpected
keys. Transposes are applied only when the array has the rank the layout promises; otherwise the array passes
through unchanged and the strict shape check names it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dml_jax.convert.errors import CheckpointReadError
from dml_jax.convert.state_dict_reader import StateDictReader

# timm's checkpoint filter drops `pre_logits` (the old in21k representation layer) too; the pooled
# pre-logits features of current timm never pass through it.
TORCH_DROPPED = (r"head\.(weight|bias)", r"head_dist\.(weight|bias)", r"pre_logits\..*")
NPZ_DROPPED = (r"head/(kernel|bias)", r"pre_logits/(kernel|bias)")
_NPZ_PREFIXES = ("", "opt/target/")


def _transpose(w: np.ndarray | None, axes: tuple[int, ...]) -> np.ndarray | None:
  if w is None or w.ndim != len(axes):
    return w
  return np.ascontiguousarray(np.transpose(w, axes))


def _describe(arch: Mapping[str, Any]) -> str:
  keys = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "distilled")
  return "converting as ViT " + ", ".join(f"{k}={arch[k]}" for k in keys if k in arch)


def from_torch(reader: StateDictReader, arch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """timm-named torch state dict (as numpy) -> {'blocks/0/attn/qkv/kernel': array, ...}."""
  flat: dict[str, np.ndarray | None] = {}

  def linear(dst: str, src: str, use_bias: bool = True) -> None:
    flat[f"{dst}/kernel"] = _transpose(reader.take(f"{src}.weight"), (1, 0))
    if use_bias:
      flat[f"{dst}/bias"] = reader.take(f"{src}.bias")

  def norm(dst: str, src: str) -> None:
    flat[f"{dst}/scale"] = reader.take(f"{src}.weight")
    flat[f"{dst}/bias"] = reader.take(f"{src}.bias")

  flat["patch_embed/proj/kernel"] = _transpose(reader.take("patch_embed.proj.weight"), (2, 3, 1, 0))
  flat["patch_embed/proj/bias"] = reader.take("patch_embed.proj.bias")
  flat["cls_token"] = reader.take("cls_token")
  if arch.get("distilled", False):
    flat["dist_token"] = reader.take("dist_token")
  flat["pos_embed"] = reader.take("pos_embed")
  for i in range(int(arch.get("depth", 12))):
    src, dst = f"blocks.{i}", f"blocks/{i}"
    norm(f"{dst}/norm1", f"{src}.norm1")
    linear(f"{dst}/attn/qkv", f"{src}.attn.qkv", use_bias=arch.get("qkv_bias", True))
    linear(f"{dst}/attn/proj", f"{src}.attn.proj")
    norm(f"{dst}/norm2", f"{src}.norm2")
    linear(f"{dst}/mlp/fc1", f"{src}.mlp.fc1")
    linear(f"{dst}/mlp/fc2", f"{src}.mlp.fc2")
  norm("norm", "norm")
  reader.drop(TORCH_DROPPED)
  reader.finish(note=_describe(arch))
  return {k: v for k, v in flat.items() if v is not None}


def _npz_prefix(reader: StateDictReader) -> str:
  keys = set(reader.keys())
  for prefix in _NPZ_PREFIXES:
    if f"{prefix}embedding/kernel" in keys:
      if f"{prefix}pos_embedding" in keys or f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in keys:
        break  # big_vision layout, refused below
      return prefix
  if any(k.startswith("params/") for k in keys) or "pos_embedding" in keys or any(
      "Transformer/encoderblock/" in k for k in keys):
    raise CheckpointReadError(
        f"{reader.source}: this is a big_vision-layout ViT (top-level 'pos_embedding' without a class position, "
        f"'params/' prefix or scanned 'Transformer/encoderblock/' arrays); only the vit_jax / AugReg layout "
        f"('Transformer/posembed_input/pos_embedding', 'Transformer/encoderblock_{{i}}/...') is supported")
  raise CheckpointReadError(f"{reader.source}: no 'embedding/kernel' (nor 'opt/target/embedding/kernel'): not a "
                            f"vit_jax / AugReg ViT checkpoint; first keys: {sorted(keys)[:10]}")


def from_big_vision(reader: StateDictReader, arch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Google vit_jax / AugReg npz arrays -> {'blocks/0/attn/qkv/kernel': array, ...}.

  Per block i under 'Transformer/encoderblock_{i}/': LayerNorm_0 -> norm1, MultiHeadDotProductAttention_1
  {query,key,value}/kernel [D, H, hd] -> qkv kernel [D, 3*H*hd] and out/kernel [H, hd, D] -> proj kernel
  [H*hd, D], LayerNorm_2 -> norm2, MlpBlock_3/Dense_{0,1} -> fc1/fc2. 'embedding' is the HWIO patch conv,
  'cls' the class token, 'Transformer/posembed_input/pos_embedding' [1, 1 + g*g, D] the position embedding,
  'Transformer/encoder_norm' the final norm.
  """
  if arch.get("distilled", False):
    raise CheckpointReadError(f"{reader.source}: vit_jax / AugReg npz checkpoints have no distillation token; "
                              f"DeiT weights come as a torch checkpoint")
  p = _npz_prefix(reader)
  flat: dict[str, np.ndarray | None] = {}

  def dense(dst: str, src: str) -> None:
    flat[f"{dst}/kernel"] = reader.take(f"{src}/kernel")
    flat[f"{dst}/bias"] = reader.take(f"{src}/bias")

  def norm(dst: str, src: str) -> None:
    flat[f"{dst}/scale"] = reader.take(f"{src}/scale")
    flat[f"{dst}/bias"] = reader.take(f"{src}/bias")

  flat["patch_embed/proj/kernel"] = reader.take(f"{p}embedding/kernel")
  flat["patch_embed/proj/bias"] = reader.take(f"{p}embedding/bias")
  flat["cls_token"] = reader.take(f"{p}cls")
  flat["pos_embed"] = reader.take(f"{p}Transformer/posembed_input/pos_embedding")
  for i in range(int(arch.get("depth", 12))):
    src, dst = f"{p}Transformer/encoderblock_{i}", f"blocks/{i}"
    mha = f"{src}/MultiHeadDotProductAttention_1"
    norm(f"{dst}/norm1", f"{src}/LayerNorm_0")
    kernels = [reader.take(f"{mha}/{n}/kernel") for n in ("query", "key", "value")]
    if all(k is not None for k in kernels):
      flat[f"{dst}/attn/qkv/kernel"] = np.concatenate([k.reshape(k.shape[0], -1) for k in kernels], axis=1)
    if arch.get("qkv_bias", True):
      biases = [reader.take(f"{mha}/{n}/bias") for n in ("query", "key", "value")]
      if all(b is not None for b in biases):
        flat[f"{dst}/attn/qkv/bias"] = np.concatenate([b.reshape(-1) for b in biases])
    out = reader.take(f"{mha}/out/kernel")
    flat[f"{dst}/attn/proj/kernel"] = None if out is None else out.reshape(-1, out.shape[-1])
    flat[f"{dst}/attn/proj/bias"] = reader.take(f"{mha}/out/bias")
    norm(f"{dst}/norm2", f"{src}/LayerNorm_2")
    dense(f"{dst}/mlp/fc1", f"{src}/MlpBlock_3/Dense_0")
    dense(f"{dst}/mlp/fc2", f"{src}/MlpBlock_3/Dense_1")
  norm("norm", f"{p}Transformer/encoder_norm")
  reader.drop([re.escape(p) + pattern for pattern in NPZ_DROPPED])
  reader.finish(note=_describe(arch))
  return {k: v for k, v in flat.items() if v is not None}
