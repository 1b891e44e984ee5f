"""Reads checkpoints into {key: numpy array}: torch `.pth`/`.bin`, `.safetensors`, Google `.npz`, timm names.

torch is imported only for `.pth`/`.bin` files and timm names; `.safetensors` and `.npz` are read with numpy.
Floating arrays come back as float32 (the parameter dtype of every dml_jax backbone), integer arrays
(e.g. BatchNorm's num_batches_tracked) unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import numpy as np

from dml_jax.convert.errors import (
  CheckpointReadError,
  HubUnavailableError,
  MissingDependencyError,
  WeightsNotFoundError,
)

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
    raise CheckpointReadError(f"{source}: expected a state dict (a mapping of names to tensors), got "
                              f"{type(obj).__name__}")
  for key in _WRAPPER_KEYS:
    if isinstance(obj.get(key), Mapping):
      notes.append(f"took the state dict under {key!r}")
      obj = obj[key]
  return obj


def _require(module: str, needed_for: str):
  """Imports an optional package of the `convert` extra, or stops with the install command."""
  import importlib

  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise MissingDependencyError(
        f"{needed_for} needs {module}, which is not installed",
        "pip install -e '.[convert]' (torch and timm), or convert a .safetensors / .npz file with --checkpoint "
        "(read without torch)") from e


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
    raise CheckpointReadError(f"{source}: entries that are not tensors: {bad}; expected a plain state dict "
                              f"(optionally wrapped under {list(_WRAPPER_KEYS)})")
  return out


def _read_torch_file(path: pathlib.Path) -> SourceWeights:
  torch = _require("torch", f"reading {path}")

  notes: list[str] = []
  try:
    # Weights-only unpickling: a checkpoint cannot run code on load.
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... depending on the damage
    raise CheckpointReadError(f"{path}: cannot be read as a torch checkpoint with weights_only=True: "
                              f"{_first_line(e)}") from e
  state_dict = _unwrap(obj, str(path), notes)
  return SourceWeights(torch_state_dict_to_numpy(state_dict, str(path)), "torch", str(path), notes)


def _read_safetensors(path: pathlib.Path) -> SourceWeights:
  from safetensors.numpy import load_file

  try:
    arrays = load_file(str(path))
  except Exception as e:
    raise CheckpointReadError(f"{path}: cannot be read as safetensors with numpy (bfloat16 files need the .pth "
                              f"route or a float32 export): {_first_line(e)}") from e
  return SourceWeights({k: _as_float32(v) for k, v in arrays.items()}, "torch", str(path))


def _read_npz(path: pathlib.Path) -> SourceWeights:
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: _as_float32(z[k]) for k in z.files}
  except Exception as e:
    raise CheckpointReadError(f"{path}: cannot be read as an .npz archive without pickles: {_first_line(e)}") from e
  return SourceWeights(arrays, "big_vision", str(path))


def read_checkpoint(path: str | os.PathLike) -> SourceWeights:
  """Reads a local checkpoint by its suffix: .pth/.pt/.bin (torch), .safetensors, .npz (vit_jax / AugReg)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise WeightsNotFoundError(f"checkpoint {path} not found", "check the --checkpoint path")
  suffix = path.suffix.lower()
  if suffix in TORCH_SUFFIXES:
    return _read_torch_file(path)
  if suffix == ".safetensors":
    return _read_safetensors(path)
  if suffix == ".npz":
    return _read_npz(path)
  raise CheckpointReadError(f"{path}: unknown checkpoint type {suffix!r}; expected one of "
                            f"{list(TORCH_SUFFIXES) + ['.safetensors', '.npz']}")


def _first_line(error: BaseException) -> str:
  # torch's unpickling errors run to dozens of lines of advice about weights_only; the first says what failed.
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _offline_env() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
  """Whether the Hugging Face hub answers within `timeout` seconds (any HTTP status counts as an answer).

  Without this, a machine without network spends about a minute in the hub client's retries before the
  download fails. Proxies from the environment are honoured (urllib reads HTTPS_PROXY).
  """
  endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
  try:
    urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
  except urllib.error.HTTPError:
    return True
  except (urllib.error.URLError, OSError, ValueError):
    return False
  return True


def _force_offline() -> None:
  """Makes the hub client use its cache only (no retries) for the rest of this process."""
  os.environ["HF_HUB_OFFLINE"] = "1"
  import sys  # pylint: disable=import-outside-toplevel

  constants = sys.modules.get("huggingface_hub.constants")
  if constants is not None:  # imported already: it read the variable at import time
    constants.HF_HUB_OFFLINE = True


def hub_cache_dir() -> str:
  if os.environ.get("HF_HUB_CACHE"):
    return os.environ["HF_HUB_CACHE"]
  home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                   os.path.expanduser("~/.cache"), "huggingface")
  return os.path.join(home, "hub")


def read_timm_pretrained(name: str, **timm_kwargs: Any) -> tuple[SourceWeights, dict[str, Any]]:
  """Creates timm model `name` ('arch.tag') with pretrained=True; returns its state dict and pretrained cfg.

  Downloads through the Hugging Face hub when the machine is online (or finds the hub cache). Offline,
  it reads the cache only and fails within seconds (hub_reachable), naming the cache it looked in.
  """
  offline = None  # why the hub is not used, if it is not
  if _offline_env():
    offline = "HF_HUB_OFFLINE is set"
  elif not hub_reachable():
    offline = f"no network: {os.environ.get('HF_ENDPOINT', 'https://huggingface.co')} did not answer"
    _force_offline()
  _require("torch", f"converting the timm model {name!r}")
  timm = _require("timm", f"converting the timm model {name!r}")

  try:
    model = timm.create_model(name, pretrained=True, **timm_kwargs)
  except Exception as e:  # hub errors, unknown tags and bad kwargs all end here
    fix = ("download the checkpoint on a machine with network and pass it with --checkpoint FILE "
           "(.pth / .bin / .safetensors / .npz)")
    if offline:
      raise HubUnavailableError(
          f"cannot get the pretrained weights of {name!r}: the Hugging Face hub is not used ({offline}) and "
          f"they are not in the hub cache {hub_cache_dir()} ({type(e).__name__})", fix) from e
    raise HubUnavailableError(f"timm could not create {name!r} with pretrained weights ({type(e).__name__}: "
                              f"{_first_line(e)})", fix) from e
  cfg = dict(model.pretrained_cfg)
  tag = cfg.get("tag")
  description = f"timm:{name.split('.', 1)[0]}" + (f".{tag}" if tag else "")
  arrays = torch_state_dict_to_numpy(model.state_dict(), description)
  return SourceWeights(arrays, "torch", description), cfg
