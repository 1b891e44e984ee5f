"""Writing a converted-weights directory (`params.npz` + `model.json`); reading it is the backbones' job
(dml_jax/backbones/weights.py), which this module re-exports for the converters.

Writing is atomic: a half-written directory is never left under the final name.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np

from dml_jax.backbones.weights import (FORMAT_VERSION, LOADED, META_FILE, PARAMS_FILE,  # noqa: F401 (re-exported)
                                       WeightsMismatchError, load_weights_into, model_shapes, path_key,
                                       read_weights_dir, register_load_adapter, strict_update)
from dml_jax.preprocessing import PretrainedCfg


def write_weights_dir(out: str | os.PathLike, *, model_name: str, family: str, arch: Mapping[str, Any],
                      flat: Mapping[str, np.ndarray], pretrained_cfg: PretrainedCfg, source: str,
                      dropped_keys: list[str]) -> pathlib.Path:
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    np.savez(tmp / PARAMS_FILE, **{k: np.asarray(v) for k, v in flat.items()})
    meta = dict(format_version=FORMAT_VERSION, model=model_name, family=family, arch=dict(arch),
                pretrained_cfg=pretrained_cfg.to_json(), source=source, dropped_keys=list(dropped_keys),
                num_params=int(sum(np.size(v) for v in flat.values())))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if out.exists():
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out
