"""Checkpoints with orbax: the train state (arrays) plus JSON metadata, kept as 'last N' and 'best'.

Layout under the workdir:
  checkpoints/last/<step>/{state,meta[,host]}   the newest `keep_last` checkpoints (resume reads the newest)
  checkpoints/best/<step>/{state,meta[,host]}   the checkpoint with the best selection metric so far

`state` is the train-state dict (parameters, optimizer state per group, method state, step, RNG key
data); `meta` is JSON: the config, the epoch to run next, the data-iterator state, the selection metric,
the best value so far; `host` (only for methods with host state, `Method.host_state()`) holds that
state's `state_dict()` as numpy arrays. Orbax writes each checkpoint to a temporary
directory and renames it when complete, so a run killed while saving leaves the previous checkpoint
intact. Saves are synchronous: the state's buffers are donated to the next update step right after saving.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dml_jax import pytree as tree_lib

LAST = "last"
BEST = "best"


class Checkpoints:
  """Two orbax CheckpointManagers, 'last' (keep_last newest) and 'best' (one)."""

  def __init__(self, workdir: str | pathlib.Path, *, keep_last: int = 1, keep_best: bool = True):
    if keep_last < 1:
      raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
    root = pathlib.Path(workdir).absolute() / "checkpoints"
    self.root = root
    self._managers = {
        LAST: ocp.CheckpointManager(root / LAST, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, create=True, enable_async_checkpointing=False)),
    }
    if keep_best:
      self._managers[BEST] = ocp.CheckpointManager(root / BEST, options=ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True, enable_async_checkpointing=False))

  def _manager(self, which: str) -> ocp.CheckpointManager:
    if which not in self._managers:
      raise ValueError(f"no {which!r} checkpoints are kept (checkpoint.keep_best is off)")
    return self._managers[which]

  def latest_step(self, which: str = LAST) -> int | None:
    if which not in self._managers:
      return None
    return self._managers[which].latest_step()

  def save(self, step: int, state: Any, meta: dict, which: str = LAST, host: Any = None) -> None:
    """host: optional nested dict of numpy arrays kept in host memory (a method's host state)."""
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if host is not None:
      items["host"] = ocp.args.StandardSave(host)
    self._manager(which).save(int(step), args=ocp.args.Composite(**items), force=True)

  def restore_host(self, step: int, which: str = LAST) -> Any:
    """The `host` item of a checkpoint as numpy arrays (never placed on a device)."""
    return self._manager(which).restore(int(step), args=ocp.args.Composite(host=ocp.args.StandardRestore())).host

  def read_meta(self, step: int, which: str = LAST) -> dict:
    return self._manager(which).restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, step: int, abstract_state: Any, which: str = LAST) -> tuple[Any, dict]:
    """Restores into the structure, shapes, dtypes and shardings of `abstract_state`."""
    restored = self._manager(which).restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def close(self) -> None:
    for manager in self._managers.values():
      manager.wait_until_finished()
      manager.close()


def abstract_like(state: Any, sharding: jax.sharding.Sharding) -> Any:
  """ShapeDtypeStructs of `state` placed with `sharding` (what `restore` fills)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def array_shapes(state: Any) -> dict[str, list]:
  """{'/'-joined path: [shape, dtype name]} of every array of a train state, for the checkpoint's meta (a
  method may change parameter shapes between epochs; restore needs the saved ones)."""
  return {path: [list(np.shape(x)), str(np.dtype(x.dtype))] for path, x in tree_lib.flatten(state).items()}
