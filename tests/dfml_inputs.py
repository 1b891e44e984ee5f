"""Shared by the DFML tests: seeded inputs of one step on a tiny distilled DeiT, and the method built on them.

The tiny DeiTs have the real one's structure (distilled, 6 heads = 3 sub-blocks of 2 heads, MLP ratio 4) at
32 px with 8 px patches (18 tokens), depth 2: width 48 (`TINY_DEIT`, the inputs of the golden numbers of
the authors' code) or 24 (`PARITY_DEIT`, whose torch references are committed whole). Weights are drawn
here (not timm's init, whose zero biases and unit norms would hide swapped tensors); routers get std 0.3 so
that the routes are decisive. Numpy only.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from dml_jax import methods
from dml_jax import pytree as tree_lib
from dml_jax.backbones import get_entry
from dml_jax.backbones.registry import get_pretrained_cfg
from dml_jax.convert import vit as convert_vit
from dml_jax.convert.state_dict_reader import StateDictReader
from dml_jax.convert.weights_dir import write_weights_dir
from dml_jax.train.config import default_config

DIM, HEADS, DEPTH, PATCH, IMG, CLASSES, GROUPS = 48, 6, 2, 8, 32, 5, 3
TINY_DEIT = dict(img_size=IMG, patch_size=PATCH, depth=DEPTH, embed_dim=DIM, num_heads=HEADS)
PARITY_DEIT = {**TINY_DEIT, "embed_dim": 24}
NAME = "deit_small_distilled_patch16_224"
LABELS = np.array([0, 0, 1, 1, 2, 3, 3, 1], np.int32)  # class 4 absent: it counts in the negative term only


def deit_state_dict(rs: np.random.RandomState, *, dim: int = DIM, depth: int = DEPTH, patch: int = PATCH,
                    img: int = IMG, distilled: bool = True, scale: float = 0.1) -> dict[str, np.ndarray]:
  """A plain timm-named (Distilled)VisionTransformer state dict without heads, drawn from `rs`: weights
  N(0, scale^2) (patch embedding scale / 2), biases N(0, scale^2), norms 1 + N(0, scale^2)."""
  d, m, n = dim, 4 * dim, (2 if distilled else 1) + (img // patch) ** 2
  f = lambda *shape, scale=scale: (rs.randn(*shape) * scale).astype(np.float32)
  sd = {"cls_token": f(1, 1, d)}
  if distilled:
    sd["dist_token"] = f(1, 1, d)
  sd.update({"pos_embed": f(1, n, d), "patch_embed.proj.weight": f(d, 3, patch, patch, scale=scale / 2),
             "patch_embed.proj.bias": f(d)})
  for i in range(depth):
    b = f"blocks.{i}."
    sd.update({b + "norm1.weight": 1 + f(d), b + "norm1.bias": f(d), b + "attn.qkv.weight": f(3 * d, d),
               b + "attn.qkv.bias": f(3 * d), b + "attn.proj.weight": f(d, d), b + "attn.proj.bias": f(d),
               b + "norm2.weight": 1 + f(d), b + "norm2.bias": f(d), b + "mlp.fc1.weight": f(m, d),
               b + "mlp.fc1.bias": f(m), b + "mlp.fc2.weight": f(d, m), b + "mlp.fc2.bias": f(d)})
  sd.update({"norm.weight": 1 + f(d), "norm.bias": f(d)})
  return sd


def reference_inputs(seed: int = 0, arch: dict = TINY_DEIT) -> dict:
  """Seeded numpy inputs of one DFML step: the plain timm-named DeiT state dict, routers ({path: kernel
  [D, G]}), images float32 [B, S, S, 3], labels int32 [B], proxies float32 [C, D]."""
  rs = np.random.RandomState(seed)
  d, depth, img = arch["embed_dim"], arch["depth"], arch["img_size"]
  sd = deit_state_dict(rs, dim=d, depth=depth, patch=arch["patch_size"], img=img)
  routers = {}
  for i in range(depth):
    routers[f"blocks/{i}/attn/gate/kernel"] = (rs.randn(d, GROUPS) * 0.3).astype(np.float32)
    routers[f"blocks/{i}/gate/kernel"] = (rs.randn(d, GROUPS) * 0.3).astype(np.float32)
  images = rs.randn(len(LABELS), img, img, 3).astype(np.float32)
  proxies = (rs.randn(CLASSES, d) * np.sqrt(2.0 / CLASSES)).astype(np.float32)
  return {"state_dict": sd, "routers": routers, "images": images, "labels": LABELS.copy(), "proxies": proxies}


def write_plain_weights(state_dict: dict, out, arch: dict = TINY_DEIT) -> str:
  """The plain DeiT state dict as convert_timm_weights.py writes it (a 'vit' weights directory)."""
  full_arch = {**get_entry(NAME).arch, **arch}
  flat = convert_vit.from_torch(StateDictReader(dict(state_dict), "test"), full_arch)
  write_weights_dir(out, model_name=NAME, family="vit", arch=full_arch, flat=flat,
                    pretrained_cfg=get_pretrained_cfg(NAME), source="test", dropped_keys=[])
  return str(out)


def tiny_config(weights: str = "", arch: dict = TINY_DEIT, **method) -> ml_collections.ConfigDict:
  c = default_config()
  c.method = methods.method_config("dfml")
  c.method.update(method)
  c.model.backbone = NAME
  c.model.backbone_overrides = ml_collections.ConfigDict(arch)
  c.model.weights = weights
  c.model.embedding_dim = arch["embed_dim"]
  c.data.batch_size = len(LABELS)
  return c


def build(inputs: dict, weights: str, arch: dict = TINY_DEIT, **method):
  """(method, params) with the inputs' weights, routers and proxies."""
  method_obj = methods.build(tiny_config(weights, arch, **method), num_classes=CLASSES)
  params, _ = method_obj.init(jax.random.key(0))
  flat = tree_lib.flatten(params)
  for path, kernel in inputs["routers"].items():
    assert flat[f"model/backbone/{path}"].shape == kernel.shape
    flat[f"model/backbone/{path}"] = kernel
  flat["loss/proxies"] = inputs["proxies"]
  return method_obj, tree_lib.nest({k: np.asarray(v) for k, v in flat.items()}, tree_lib.key_index(params))


def authors_names(flat: dict) -> dict[str, np.ndarray]:
  """Our flat backbone arrays ('model/backbone/...' and 'loss/proxies') -> the authors' torch names and layouts
  (`blocks.0.attn.qkv1.weight` [out, in], `blocks.0.mlp2.fc1.bias`, `blocks.0.gate.weight` [G, D], 'proxies')."""
  out = {}
  for path, value in flat.items():
    value = np.asarray(value)
    if path == "loss/proxies":
      out["proxies"] = value
      continue
    key = path.removeprefix("model/backbone/")
    parts = key.split("/")
    if parts[0] != "blocks" or parts[2] in ("norm1", "norm2"):
      torch_key = key.replace("/", ".").replace(".scale", ".weight")
      if key == "patch_embed/proj/kernel":
        value = value.transpose(3, 2, 0, 1)
      out[torch_key.replace(".kernel", ".weight")] = value
      continue
    i, rest = parts[1], "/".join(parts[2:])
    if rest in ("attn/gate/kernel", "gate/kernel"):
      out[f"blocks.{i}.{rest[:-len('/kernel')].replace('/', '.')}.weight"] = value.T
      continue
    layer, kind = rest.rsplit("/", 1)
    for j in range(value.shape[0]):
      name = {"attn/qkv": f"attn.qkv{j + 1}", "attn/proj": f"attn.proj{j + 1}", "mlp/fc1": f"mlp{j + 1}.fc1",
              "mlp/fc2": f"mlp{j + 1}.fc2"}[layer]
      if kind == "kernel":
        out[f"blocks.{i}.{name}.weight"] = value[j].T
      else:
        out[f"blocks.{i}.{name}.bias"] = value[j]
  return out
