"""Parameter tables in host memory with lazy (row-sparse) optimizer updates: VPTSP's prompt memory bank.

VPTSP's class-prompt tables on SOP, In-Shop and iNaturalist (C x prompts x D per layer, up to 2.2 B floats)
do not fit next to a ViT in accelerator memory; the authors keep them, and their AdamW moments, in CPU
memory. Here each table [num_rows, *row_shape] and its optimizer moments live in host memory as numpy
arrays, and `params` hold a small device buffer [R, *row_shape] per table, trained by an ordinary
optimizer group. `RowSparseTables` is a `HostState` (dml_jax/methods/base.py): around every update

  before_step: rows = rows_of(batch); table[rows] -> buffer; moments[rows] -> the group's optimizer state
  (the update step runs)
  after_step:  buffer -> table[rows]; moments -> moments[rows]

The group's optax chain updates the buffer exactly as it updates any parameter, so the table gets that
optimizer restricted to the present rows: rows absent from a batch keep values and moments (no moment
decay, no weight decay), and the group's step count (Adam's bias correction) is the global iteration
count, as torch's single per-parameter `step` in the official bank.

Moments are found by path: every leaf of the optimizer state whose '/'-joined path ends with the buffer's
path and has the buffer's shape (Adam's `mu` and `nu`, SGD's momentum `trace`). They start at zero, as
optax's and torch's states do. Every process holds the whole tables and applies the same rows of the same
global batch, so the tables stay identical across processes.

Cost per step: R rows x (1 + moments) copied each way; `after_step` waits for the step to finish (the
next batch may use the same rows), which removes the asynchronous-dispatch overlap of one step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from dml_jax import pytree as tree_lib
from dml_jax.methods.base import HostBatch, HostState

_SEP = "__"  # replaces '/' of moment keys in checkpoints (orbax keys are path components)


@dataclasses.dataclass(frozen=True)
class HostRowTable:
  """One host-resident table [num_rows, *row_shape] float32.

  buffer_path: '/'-joined path in params of the device buffer [rows_per_batch, *row_shape].
  num_rows: rows of the table (e.g. the number of training classes).
  row_shape: shape of one row (e.g. (prompts, D)).
  init: fn(numpy Generator) -> float32 [num_rows, *row_shape], the initial table (host memory).
  """

  buffer_path: str
  num_rows: int
  row_shape: tuple[int, ...]
  init: Callable[[np.random.Generator], np.ndarray]

  @property
  def num_parameters(self) -> int:
    return int(self.num_rows * np.prod(self.row_shape, dtype=np.int64))


def _put(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """Host rows -> a device array with `sharding` (replicated over the mesh, which may span processes).

  Every process holds the same rows (the tables follow the global batch), so each fills its own devices.
  jax.device_put would do the same but, for a sharding that spans processes, first checks with an all-gather
  that every process passes equal values: a collective per table and moment in every step.
  """
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


class RowSparseTables(HostState):
  """The host tables of a method and their optimizer moments; see the module docstring.

  Args:
    tables: {name: HostRowTable}.
    params: the method's initial params (to check the buffers exist).
    rows_of: fn(HostBatch) -> int [R], the distinct table rows of a batch in buffer order.
    seed: seeds the tables' initialisers (a numpy Generator per table, derived from (seed, table index)).
  """

  def __init__(self, tables: Mapping[str, HostRowTable], params: Any, rows_of: Callable[[HostBatch], np.ndarray],
               *, seed: int = 0):
    self.tables = dict(tables)
    self.rows_of = rows_of
    self.param_keys = tree_lib.key_index(params)
    for name, table in self.tables.items():
      if table.buffer_path not in self.param_keys:
        raise KeyError(f"host table {name!r}: buffer {table.buffer_path!r} is not a parameter path; paths look "
                       f"like {list(self.param_keys)[:4]}")
    self.values: dict[str, np.ndarray] = {}
    for i, (name, table) in enumerate(sorted(self.tables.items())):
      value = np.asarray(table.init(np.random.default_rng([int(seed) & 0xFFFFFFFF, 17, i])), np.float32)
      expected = (table.num_rows,) + tuple(table.row_shape)
      if value.shape != expected:
        raise ValueError(f"host table {name!r}: init returned shape {value.shape}, expected {expected}")
      self.values[name] = value
    # name -> {moment key ('base/0/mu'): [num_rows, *row_shape]}, created at the first load that sees them.
    self.moments: dict[str, dict[str, np.ndarray]] = {name: {} for name in self.tables}
    self._slot_cache: dict[tuple, tuple[dict, dict]] = {}

  def parameter_counts(self) -> dict[str, int]:
    return {t.buffer_path: t.num_parameters for t in self.tables.values()}

  # -- where the buffers and their moments sit in the train state ---------------------------------------

  def _slots(self, state: dict) -> tuple[list, Any, dict, list, Any, dict]:
    """Leaves of params and opt_state, their treedefs, and where the buffers and their moments sit."""
    p_leaves, p_def = jax.tree.flatten(state["params"])
    o_leaves, o_def = jax.tree.flatten(state["opt_state"])
    key = (p_def, o_def)
    if key not in self._slot_cache:  # the state's structure changes only between phases
      p_paths = list(tree_lib.flatten(state["params"]))  # same leaf order as jax.tree.flatten
      o_paths = list(tree_lib.flatten(state["opt_state"]))
      buffers, moments = {}, {}
      for name, table in self.tables.items():
        buffers[name] = p_paths.index(table.buffer_path)
        suffix = "/" + table.buffer_path
        shape = p_leaves[buffers[name]].shape
        moments[name] = {path[:-len(suffix)]: i for i, path in enumerate(o_paths)
                         if path.endswith(suffix) and getattr(o_leaves[i], "shape", None) == shape}
      self._slot_cache[key] = (buffers, moments)
    buffers, moments = self._slot_cache[key]
    return p_leaves, p_def, buffers, o_leaves, o_def, moments

  def _check_rows(self, name: str, rows: np.ndarray, buffer_rows: int) -> np.ndarray:
    rows = np.asarray(rows)
    table = self.tables[name]
    if rows.shape != (buffer_rows,):
      raise ValueError(f"host table {name!r}: batch_rows gave {rows.shape}, the buffer holds {buffer_rows} rows")
    if rows.min() < 0 or rows.max() >= table.num_rows:
      raise ValueError(f"host table {name!r}: rows outside [0, {table.num_rows})")
    if len(np.unique(rows)) != len(rows):
      raise ValueError(f"host table {name!r}: the batch uses a row twice ({rows.tolist()}); rows must be distinct "
                       f"(sample distinct classes per batch, sampler 'm_per_class')")
    return rows

  def before_step(self, state: dict, batch: HostBatch) -> dict:
    """The train state with the buffers holding table[rows] and their moments moments[rows]."""
    rows = self.rows_of(batch)
    p_leaves, p_def, buffers, o_leaves, o_def, moments = self._slots(state)
    for name in self.tables:
      old = p_leaves[buffers[name]]
      r = self._check_rows(name, rows, old.shape[0])
      p_leaves[buffers[name]] = _put(self.values[name][r], old.sharding)
      for key, i in moments[name].items():
        table = self.moments[name].get(key)
        if table is None:  # zeros, as a fresh optimizer state; untouched pages cost no memory
          table = self.moments[name][key] = np.zeros_like(self.values[name])
        o_leaves[i] = _put(table[r], o_leaves[i].sharding)
    return {**state, "params": jax.tree.unflatten(p_def, p_leaves),
            "opt_state": jax.tree.unflatten(o_def, o_leaves)}

  def after_step(self, state: dict, batch: HostBatch) -> None:
    """Writes the buffers' values and moments of the finished step back to table[rows]."""
    rows = self.rows_of(batch)
    p_leaves, _, buffers, o_leaves, _, moments = self._slots(state)
    # Buffers are replicated: every process reads its own copy (a multi-process array is not fully
    # addressable, so jax.device_get would refuse it).
    fetched = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),
                           {name: (p_leaves[buffers[name]], {k: o_leaves[i] for k, i in moments[name].items()})
                            for name in self.tables})
    for name, (value, moment_values) in fetched.items():
      r = self._check_rows(name, rows, value.shape[0])
      self.values[name][r] = value
      for key, m in moment_values.items():
        if key not in self.moments[name]:
          self.moments[name][key] = np.zeros_like(self.values[name])
        self.moments[name][key][r] = m

  # -- checkpoints ------------------------------------------------------------------------------------

  def state_dict(self) -> dict[str, dict[str, Any]]:
    """{table: {'value': [N, ...], 'moments': {'base__0__mu': [N, ...], ...}}} (numpy) for a checkpoint."""
    return {name: {"value": self.values[name],
                   "moments": {k.replace("/", _SEP): v for k, v in self.moments[name].items()}}
            for name in self.tables}

  def load_state_dict(self, saved: Mapping[str, Mapping[str, Any]]) -> None:
    if set(saved) != set(self.tables):
      raise ValueError(f"checkpoint holds host tables {sorted(saved)}, the method declares {sorted(self.tables)}")
    for name, entries in saved.items():
      value = np.asarray(entries["value"], np.float32)
      if value.shape != self.values[name].shape:
        raise ValueError(f"host table {name!r}: checkpoint shape {value.shape}, expected {self.values[name].shape}")
      self.values[name] = value.copy()
      self.moments[name] = {k.replace(_SEP, "/"): np.asarray(v, np.float32).copy()
                            for k, v in (entries.get("moments") or {}).items()}
