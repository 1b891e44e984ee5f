"""Writing a converted-weights directory (`params.npz` + `model.json`); reading it is the backbones' job
(dml_jax/backbones/weights.py), which this module re-exports for the converters.

Writing is atomic: a half-written directory is never left under the final name. An existing `out` is
replaced only when it is a weights directory (exactly these two files) or empty; anything else is refused
(check_out_dir), so a mistyped --out never deletes other files.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from dml_jax.backbones.weights import (  # noqa: F401 (re-exported)
  FORMAT_VERSION,
  LOADED,
  META_FILE,
  PARAMS_FILE,
  WeightsMismatchError,
  WeightsNotFoundError,
  load_weights_into,
  model_shapes,
  path_key,
  read_weights_dir,
  register_load_adapter,
  strict_update,
)
from dml_jax.convert.errors import OutDirError
from dml_jax.preprocessing import PretrainedCfg


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
