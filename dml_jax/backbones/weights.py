"""Loading a converted-weights directory: `params.npz` (flat NNX paths) + `model.json` (name, family, cfg).

Loading needs numpy only, never torch, and is strict: every parameter and BatchNorm statistic of the
model must be present with its shape, and nothing else. `dml_jax.convert` writes these directories; this
module only reads them, so backbones never import the converters.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dml_jax.errors import InvalidValueError, UserError, UserFileNotFoundError
from dml_jax.preprocessing import PretrainedCfg

FORMAT_VERSION = 1
PARAMS_FILE = "params.npz"
META_FILE = "model.json"
LOADED = (nnx.Param, nnx.BatchStat)  # what a weights directory holds: parameters and BN statistics

# family -> fn(flat_file, flat_model_shapes) -> flat_file; adapts weights to a differently configured
# model of the same family before the strict check (e.g. ViT position embeddings for a new image size).
_LOAD_ADAPTERS: dict[str, Callable[[dict[str, np.ndarray], dict[str, tuple[int, ...]]], dict[str, np.ndarray]]] = {}


class WeightsMismatchError(UserError, ValueError):
  """Weights do not fit a model: lists every missing, unexpected and mis-shaped key."""

  def __init__(self, source: str, *, missing=(), unexpected=(), misshaped=(), note: str = ""):
    self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
    headline = f"weights from {source} do not fit the model" + (f" ({note})" if note else "")
    lines = []
    if self.missing:
      lines.append(f"  missing keys ({len(self.missing)}): {_short(self.missing)}")
    if self.unexpected:
      lines.append(f"  unexpected keys ({len(self.unexpected)}): {_short(self.unexpected)}")
    if self.misshaped:
      lines.append(f"  mis-shaped keys ({len(self.misshaped)}): " +
                   _short([f"{k}: file {a} vs model {b}" for k, a, b in self.misshaped]))
    counts = [f"{len(v)} {k}" for k, v in (("missing", self.missing), ("unexpected", self.unexpected),
                                            ("mis-shaped", self.misshaped)) if v]
    super().__init__(f"{headline}: {', '.join(counts)} keys" if counts else headline,
                     "weights and model must be one architecture: convert the matching checkpoint "
                     "(convert_timm_weights.py --model NAME), or choose the model the weights were made for",
                     details=lines)


class WeightsNotFoundError(UserFileNotFoundError):
  """A weights directory (or checkpoint) the user named does not exist or is incomplete."""


def _short(items, limit: int = 40) -> str:
  items = list(items)
  more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(map(str, items[:limit])) + more


def register_load_adapter(family: str, fn) -> None:
  _LOAD_ADAPTERS[family] = fn


def path_key(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def model_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """{'blocks/0/attn/qkv/kernel': shape, ...} for every parameter and BN statistic of `model`."""
  flat = nnx.to_flat_state(nnx.state(model, LOADED))
  return {path_key(k): tuple(v.shape) for k, v in flat}


def _key_diff(expected: Mapping[str, tuple[int, ...]], flat: Mapping[str, np.ndarray]):
  """(missing, unexpected, mis-shaped) keys of `flat` against the model's {key: shape}."""
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  misshaped = sorted((k, tuple(np.shape(flat[k])), tuple(expected[k]))
                     for k in set(expected) & set(flat) if tuple(np.shape(flat[k])) != tuple(expected[k]))
  return missing, unexpected, misshaped


def strict_update(model: nnx.Module, flat: Mapping[str, np.ndarray], source: str, note: str = "") -> None:
  """Writes `flat` into `model`; any missing, unexpected or mis-shaped key stops with the full list."""
  state = nnx.to_flat_state(nnx.state(model, LOADED))
  missing, unexpected, misshaped = _key_diff({path_key(k): tuple(v.shape) for k, v in state}, flat)
  if missing or unexpected or misshaped:
    raise WeightsMismatchError(source, missing=missing, unexpected=unexpected, misshaped=misshaped, note=note)
  for path, var in state:
    var.set_value(jnp.asarray(flat[path_key(path)], dtype=var.dtype))
  nnx.update(model, nnx.from_flat_state(state))


def read_weights_dir(path: str | os.PathLike, *, model: str | None = None
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(model.json, {key: array}) of a weights directory, numpy only; `model` (the intended name) goes into
  the fix hint."""
  path = pathlib.Path(path)
  meta_path, params_path = path / META_FILE, path / PARAMS_FILE
  convert = (f"python convert_timm_weights.py --model {model or 'MODEL'} --out {path} (with --checkpoint FILE "
             "offline)")
  if not path.is_dir():
    raise WeightsNotFoundError(f"weights directory {path} does not exist", f"convert the weights once: {convert}")
  for p in (meta_path, params_path):
    if not p.is_file():
      raise WeightsNotFoundError(f"{p} not found: {path} is not a weights directory written by "
                                 f"convert_timm_weights.py ({META_FILE} + {PARAMS_FILE})",
                                 f"convert the weights once: {convert}")
  try:
    meta = json.loads(meta_path.read_text())
  except ValueError as e:
    raise InvalidValueError(f"{meta_path} is damaged ({e})", f"convert the weights again: {convert}") from None
  if meta.get("format_version") != FORMAT_VERSION:
    raise InvalidValueError(f"{meta_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}",
                            f"convert the weights again with this version: {convert}")
  try:
    with np.load(params_path, allow_pickle=False) as z:
      flat = {k: z[k] for k in z.files}
  except Exception as e:  # zipfile, EOF, CRC and pickle errors all mean a damaged file
    raise InvalidValueError(f"{params_path} is damaged ({type(e).__name__}: {e})",
                            f"convert the weights again: {convert}") from None
  return meta, flat


def load_weights_into(model: nnx.Module, path: str | os.PathLike, *, expected_model: str, family: str) -> PretrainedCfg:
  """Strictly loads a weights directory into `model`; returns the weights' preprocessing cfg."""
  meta, flat = read_weights_dir(path, model=expected_model)
  if meta["family"] != family or meta["model"] != expected_model:
    # The keys are listed too, so that the message shows how far apart the two architectures are.
    missing, unexpected, misshaped = _key_diff(model_shapes(model), flat)
    raise WeightsMismatchError(str(path), missing=missing, unexpected=unexpected, misshaped=misshaped,
                               note=f"the directory holds {meta['model']!r} ({meta['family']}), "
                                    f"the model is {expected_model!r} ({family})")
  adapter = _LOAD_ADAPTERS.get(family)
  if adapter is not None:
    flat = adapter(flat, model_shapes(model))
  strict_update(model, flat, source=str(path))
  return PretrainedCfg.from_json(meta["pretrained_cfg"])
