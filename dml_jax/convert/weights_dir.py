"""The converted-weights directory: `params.npz` (flat NNX paths) + `model.json` (name, family, cfg).

Reading it needs numpy only, never torch. Writing is atomic: a half-written directory is never left
under the final name. An existing `out` is replaced only when it is a weights directory (exactly these two
files) or empty; anything else is refused (check_out_dir), so a mistyped --out never deletes other files.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dml_jax.backbones.pretrained import PretrainedCfg
from dml_jax.convert.errors import OutDirError, WeightsMismatchError, WeightsNotFoundError
from dml_jax.errors import InvalidValueError

FORMAT_VERSION = 1
PARAMS_FILE = "params.npz"
META_FILE = "model.json"
LOADED = (nnx.Param, nnx.BatchStat)  # what a weights directory holds: parameters and BN statistics

# family -> fn(flat_file, flat_model_shapes) -> flat_file; adapts weights to a differently configured
# model of the same family before the strict check (e.g. ViT position embeddings for a new image size).
_LOAD_ADAPTERS: dict[str, Callable[[dict[str, np.ndarray], dict[str, tuple[int, ...]]], dict[str, np.ndarray]]] = {}


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


def is_weights_dir(path: str | os.PathLike) -> bool:
  """True for a directory holding exactly model.json (of this format) and params.npz, as written here."""
  path = pathlib.Path(path)
  try:
    if not path.is_dir() or sorted(os.listdir(path)) != sorted([META_FILE, PARAMS_FILE]):
      return False
    meta = json.loads((path / META_FILE).read_text())
  except (OSError, ValueError):
    return False
  return isinstance(meta, dict) and "format_version" in meta and "model" in meta and "family" in meta


def check_out_dir(out: str | os.PathLike) -> pathlib.Path:
  """`out` as an absolute path when the converter may write there; OutDirError (naming it) otherwise.

  Allowed: a path that does not exist, an empty directory, or a weights directory (replaced). Refused:
  a file, any other directory, and the current directory, its parents, the home directory and `/`,
  whatever they hold.
  """
  given = os.fspath(out)
  path = pathlib.Path(os.path.abspath(os.path.expanduser(given)))
  cwd = pathlib.Path(os.getcwd()).resolve()
  resolved = path.resolve()
  protected = {pathlib.Path(resolved.anchor), pathlib.Path.home().resolve()}
  if resolved == cwd or resolved in cwd.parents or resolved in protected:
    what = ("the current directory" if resolved == cwd else "a parent of the current directory"
            if resolved in cwd.parents else "the home directory" if resolved == pathlib.Path.home().resolve()
            else "the file system root")
    raise OutDirError(f"refusing --out {given}: it is {what}, which the converter would replace",
                      f"name a new folder for these weights, e.g. --out {os.path.join('weights', 'MODEL_NAME')}")
  if path.is_symlink() or (path.exists() and not path.is_dir()):
    raise OutDirError(f"refusing --out {given}: it exists and is not a folder",
                      "name a new folder for the weights directory")
  if path.is_dir() and any(path.iterdir()) and not is_weights_dir(path):
    entries = sorted(os.listdir(path))
    shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
    raise OutDirError(f"refusing --out {given}: it holds other files ({shown}), not a weights directory "
                      f"({META_FILE} + {PARAMS_FILE}) that could be replaced",
                      f"name a new folder, e.g. --out {os.path.join(given, 'MODEL_NAME')}")
  return path


def _remove_weights_dir(path: pathlib.Path) -> None:
  # Deletes the two files it is known to hold and the folder, nothing else: never a recursive delete.
  for name in (PARAMS_FILE, META_FILE):
    try:
      (path / name).unlink()
    except FileNotFoundError:
      pass
  try:
    path.rmdir()
  except OSError:
    pass  # something else appeared in it meanwhile: leave it


def write_weights_dir(out: str | os.PathLike, *, model_name: str, family: str, arch: Mapping[str, Any],
                      flat: Mapping[str, np.ndarray], pretrained_cfg: PretrainedCfg, source: str,
                      dropped_keys: list[str]) -> pathlib.Path:
  """Writes a fresh weights directory beside `out` and moves it into place (see check_out_dir)."""
  out = check_out_dir(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    np.savez(tmp / PARAMS_FILE, **{k: np.asarray(v) for k, v in flat.items()})
    meta = dict(format_version=FORMAT_VERSION, model=model_name, family=family, arch=dict(arch),
                pretrained_cfg=pretrained_cfg.to_json(), source=source, dropped_keys=list(dropped_keys),
                num_params=int(sum(np.size(v) for v in flat.values())))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    check_out_dir(out)  # again: the conversion took a while, someone may have written into `out`
    if out.exists():
      # os.replace cannot overwrite a non-empty directory: move the old one aside (two renames apart
      # from the new one), and put it back if the second rename fails.
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
      old.rmdir()
      os.replace(out, old)
      try:
        os.replace(tmp, out)
      except BaseException:
        os.replace(old, out)
        raise
      _remove_weights_dir(old)
    else:
      os.replace(tmp, out)
  except BaseException:
    _remove_weights_dir(tmp)
    raise
  return out


def read_weights_dir(path: str | os.PathLike, *, model: str | None = None
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(model.json, {key: array}) of a weights directory; `model` (the intended name) goes into the fix hint."""
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
