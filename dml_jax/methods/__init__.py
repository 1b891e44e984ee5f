"""Methods: what a DML paper adds on top of a backbone, behind one interface the trainer drives.

A method owns the model, the loss, its learnable loss parameters and any persistent state; the trainer
(`dml_jax.train`) owns gradients, optimizers, sharding, donation, checkpoints, logging and evaluation, and
uses a method only through this interface:

  method = build(config, num_classes=C)

  method.init(rng) -> (params, method_state)
      params: nested dict of float32 arrays, everything that can receive a gradient, e.g.
        {'model': {'backbone': {...timm names...}, 'head': {'kernel', 'bias'}}, 'loss': {'proxies': [C, E]}}.
        Parameter-group rules (config.optim) are regexes on the '/'-joined paths of this tree
        ('model/backbone/blocks/0/attn/qkv/kernel', 'loss/proxies'). Whether a parameter trains, with
        which optimizer and learning rate, is decided by the config, never by the method's loss_fn.
      method_state: nested dict of arrays that change but receive no gradient: BatchNorm statistics
        ({'model': {...}}), semantic-proxy containers (VPTSP-G), memory queues and per-class counters
        (Proxy-ISA), cluster assignments and masks (D&C). Checkpointed with the parameters.

  method.loss_fn(params, method_state, batch, rng, step_info) -> (loss, (metrics, new_method_state))
      Pure and jittable; traced once per phase inside the trainer's single update step.
      batch: {'image': float32 [B, S, S, 3] (the GLOBAL batch, sharded over devices), 'label': int32 [B]}.
      rng: a PRNG key already folded with the step.  step_info: StepInfo (step, epoch as int32 scalars,
      variant = method.step_variant(epoch), a static Python value).
      loss: float32 scalar, differentiated w.r.t. the trainable part of `params` only.
      metrics: dict of float32 scalars to log.  new_method_state: same structure as method_state.
      Several objectives on disjoint parameter sets (DADA's discriminator vs. generator) are one loss
      whose terms are stop-gradient'ed so each group gets its own objective's gradient; each group then
      has its own optimizer and learning rate from config.optim.groups.

  method.embed_fn(params, method_state, images) -> float32 [B, E]
      The evaluation embedding (eval-mode model, e.g. BN with running statistics), L2-normalised.

  method.frozen_paths(params) -> set of paths
      Parameters the method itself keeps frozen for the whole run (e.g. BatchNorm affine parameters when
      config.model.bn_affine_trainable is False). Added to config.optim.frozen.

  method.step_variant(epoch) -> hashable
      Static switches of loss_fn that change with the epoch (Proxy-ISA: memory from epoch 2, filter from
      epoch 3). The trainer compiles one step per (variant, trainable set) and reuses it.

  method.on_epoch_start(epoch, train_state, ctx) -> train_state
  method.on_epoch_end(epoch, train_state, ctx) -> train_state
      Host-side hooks between epochs (D&C re-clustering, Proxy-ISA switches). train_state is the dict
      {'step', 'params', 'opt_state', 'method_state', 'rng'}; a hook may replace params or method_state
      (same structure and shapes). ctx: the trainer's context with `.config`, `.mesh`,
      `.embed_records(train_state, records) -> (embeddings float32 [N, E], labels int64 [N])` (eval-mode
      embedding of e.g. the training set, over all devices), `.steps_per_epoch`, `.log(text)`.

  method.host_row_tables() -> {name: HostRowTable}
  method.batch_rows(labels) -> int [R]
      Parameter tables kept in host memory (VPTSP's class-prompt memory bank, methods/host_tables.py):
      params hold a device buffer [R, ...] per table; before each step the trainer writes the rows
      `batch_rows(labels)` (labels: the global batch's int [B], numpy) and their optimizer moments into
      the buffer and its group's optimizer state, and writes them back after the step (lazy row-sparse
      updates, dml_jax/train/row_sparse.py). Default: no tables.

  method.pretrained_cfg: the backbone weights' preprocessing (PretrainedCfg), for the data loaders.
  method.embedding_dim: E.

`Method` below gives the defaults (no frozen paths, no variants, identity hooks, no host tables).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any, Callable, Hashable, NamedTuple

import jax
import jax.numpy as jnp


class StepInfo(NamedTuple):
  """Where the update step is: global step and epoch (int32 scalars, traced) and the static variant."""

  step: jax.Array
  epoch: jax.Array
  variant: Hashable = None


class Method:
  """Base class with the interface's defaults; see the module docstring."""

  name: str = ""
  embedding_dim: int = 0
  pretrained_cfg: Any = None

  def init(self, rng: jax.Array) -> tuple[dict, dict]:
    raise NotImplementedError

  def loss_fn(self, params: dict, method_state: dict, batch: dict, rng: jax.Array,
              step_info: StepInfo) -> tuple[jax.Array, tuple[dict, dict]]:
    raise NotImplementedError

  def embed_fn(self, params: dict, method_state: dict, images: jax.Array) -> jax.Array:
    raise NotImplementedError

  def frozen_paths(self, params: dict) -> set[str]:
    del params
    return set()

  def step_variant(self, epoch: int) -> Hashable:
    del epoch
    return None

  def on_epoch_start(self, epoch: int, train_state: dict, ctx: Any) -> dict:
    del epoch, ctx
    return train_state

  def on_epoch_end(self, epoch: int, train_state: dict, ctx: Any) -> dict:
    del epoch, ctx
    return train_state

  def host_row_tables(self) -> dict[str, Any]:
    return {}

  def batch_rows(self, labels: Any) -> Any:
    raise NotImplementedError(f"method {self.name!r} declares host row tables but no batch_rows(labels)")


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Casts the floating leaves of `tree` to `dtype` (None: unchanged); integer leaves stay as they are."""
  if dtype is None:
    return tree
  dtype = jnp.dtype(dtype)
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _metric_loss(config: Any, num_classes: int) -> Method:
  from dml_jax.methods.metric_loss import MetricLossMethod  # local: keeps `methods` import light
  return MetricLossMethod(config, num_classes=num_classes)


_NOT_METHODS = ("metric_loss", "host_tables")  # modules that are not a method name of their own
_BUILDERS: dict[str, Callable[[Any, int], Method]] = {
    "metric_loss": _metric_loss,
}


def register(name: str, builder: Callable[[Any, int], Method]) -> None:
  """Registers a method builder: builder(config, num_classes) -> Method."""
  if name in _BUILDERS:
    raise ValueError(f"method {name!r} is registered twice")
  _BUILDERS[name] = builder


def list_methods() -> list[str]:
  """Registered methods and method modules not yet imported (they register on import)."""
  modules = {m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_METHODS}
  return sorted(set(_BUILDERS) | modules)


def build(config: Any, *, num_classes: int) -> Method:
  """The method named by `config.method.name`, for `num_classes` training classes."""
  name = config.method.name
  if name not in _BUILDERS and isinstance(name, str) and name.isidentifier():
    # A method module registers itself on import (dml_jax/methods/<name>.py).
    try:
      importlib.import_module(f"dml_jax.methods.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"dml_jax.methods.{name}":
        raise
  if name not in _BUILDERS:
    close = difflib.get_close_matches(str(name), list_methods(), n=3)
    raise KeyError(f"unknown method {name!r} (config.method.name); close matches: {close}; known: {list_methods()}")
  return _BUILDERS[name](config, num_classes)
