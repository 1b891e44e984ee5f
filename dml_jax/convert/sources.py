"""Reads checkpoints into {key: numpy array}: torch `.pth`/`.bin`, `.safetensors`, Google `.npz`, timm names.

torch is imported only for `.pth`/`.bin` files and timm names; `.safetensors` and `.npz` are read with numpy.
Floating arrays come back as float32 (the parameter dtype of every dml_jax backbone), integer arrays
(e.g. BatchNorm's num_batches_tracked) unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping

import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
# Keys under which training scripts wrap the state dict (DeiT: 'model'; Lightning and others: 'state_dict').
_WRAPPER_KEYS = ("model", "state_dict")


@dataclasses.dataclass
class SourceWeights:
  """Arrays of one checkpoint and how their keys are named.

  layout: 'torch' for timm / torchvision / pretrainedmodels state-dict names ('blocks.0.attn.qkv.weight'),
    'big_vision' for Google vit_jax npz names ('Transformer/encoderblock_0/...').
  description: where the arrays came from (a path or 'timm:<name>'), used in every error message.
  notes: what was done on reading (unwrapping) for the conversion summary.
  """

  arrays: dict[str, np.ndarray]
  layout: str
  description: str
  notes: list[str] = dataclasses.field(default_factory=list)


def _as_float32(a: np.ndarray) -> np.ndarray:
  return a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a


def _unwrap(obj: Any, source: str, notes: list[str]) -> Mapping[str, Any]:
  if not isinstance(obj, Mapping):
    raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
  for key in _WRAPPER_KEYS:
    if isinstance(obj.get(key), Mapping):
      notes.append(f"took the state dict under {key!r}")
      obj = obj[key]
  return obj


def torch_state_dict_to_numpy(state_dict: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
  """{name: torch.Tensor} -> {name: np.ndarray}; anything that is not a tensor stops with its key."""
  import torch

  out, bad = {}, []
  for key, value in state_dict.items():
    if not isinstance(value, torch.Tensor):
      bad.append(f"{key} ({type(value).__name__})")
      continue
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()  # bfloat16/float16 have no exact numpy counterpart, float32 is the param dtype
    out[key] = value.numpy()
  if bad:
    raise ValueError(f"{source}: entries that are not tensors: {bad}; expected a plain state dict "
                     f"(optionally wrapped under {list(_WRAPPER_KEYS)})")
  return out


def _read_torch_file(path: pathlib.Path) -> SourceWeights:
  import torch

  notes: list[str] = []
  try:
    # Weights-only unpickling: a checkpoint cannot run code on load.
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... depending on the damage
    raise ValueError(f"{path}: cannot be read as a torch checkpoint with weights_only=True: {e}") from e
  state_dict = _unwrap(obj, str(path), notes)
  return SourceWeights(torch_state_dict_to_numpy(state_dict, str(path)), "torch", str(path), notes)


def _read_safetensors(path: pathlib.Path) -> SourceWeights:
  from safetensors.numpy import load_file

  try:
    arrays = load_file(str(path))
  except Exception as e:
    raise ValueError(f"{path}: cannot be read as safetensors with numpy (bfloat16 files need the .pth route or "
                     f"a float32 export): {e}") from e
  return SourceWeights({k: _as_float32(v) for k, v in arrays.items()}, "torch", str(path))


def _read_npz(path: pathlib.Path) -> SourceWeights:
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: _as_float32(z[k]) for k in z.files}
  except Exception as e:
    raise ValueError(f"{path}: cannot be read as an .npz archive without pickles: {e}") from e
  return SourceWeights(arrays, "big_vision", str(path))


def read_checkpoint(path: str | os.PathLike) -> SourceWeights:
  """Reads a local checkpoint by its suffix: .pth/.pt/.bin (torch), .safetensors, .npz (vit_jax / AugReg)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint {path} not found")
  suffix = path.suffix.lower()
  if suffix in TORCH_SUFFIXES:
    return _read_torch_file(path)
  if suffix == ".safetensors":
    return _read_safetensors(path)
  if suffix == ".npz":
    return _read_npz(path)
  raise ValueError(f"{path}: unknown checkpoint type {suffix!r}; expected one of "
                   f"{list(TORCH_SUFFIXES) + ['.safetensors', '.npz']}")


def read_timm_pretrained(name: str, **timm_kwargs: Any) -> tuple[SourceWeights, dict[str, Any]]:
  """Creates timm model `name` ('arch.tag') with pretrained=True; returns its state dict and pretrained cfg.

  Downloads through the Hugging Face hub when the machine is online (or finds the hub cache).
  """
  import timm

  try:
    model = timm.create_model(name, pretrained=True, **timm_kwargs)
  except Exception as e:  # hub errors, unknown tags and bad kwargs all end here
    raise RuntimeError(
        f"timm could not create {name!r} with pretrained weights ({type(e).__name__}: {e}). Without network "
        f"(HF_HUB_OFFLINE=1) download the checkpoint elsewhere and pass it with --checkpoint FILE "
        f"(.pth / .bin / .safetensors / .npz)") from e
  cfg = dict(model.pretrained_cfg)
  tag = cfg.get("tag")
  description = f"timm:{name.split('.', 1)[0]}" + (f".{tag}" if tag else "")
  arrays = torch_state_dict_to_numpy(model.state_dict(), description)
  return SourceWeights(arrays, "torch", description), cfg
