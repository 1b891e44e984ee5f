"""The method interface: what a DML paper adds on top of a backbone, as the trainer sees it.

A method owns its model, objectives, learnable loss parameters, persistent state and configuration; the
trainer (`dml_jax.train`) owns gradients, optimizers, sharding, donation, checkpoints, logging and
evaluation and uses a method only through `Method` below. docs/design.md walks through adding one.

Parameters and state
  `init(rng) -> (params, method_state)`. params: nested dict of float32 arrays, everything that can
  receive a gradient, e.g. {'model': {'backbone': {...timm names...}, 'head': {...}}, 'loss': {'proxies':
  [C, E]}}. Which parameter trains, when, with which optimizer and learning rate is decided by the
  config's parameter groups (regexes on '/'-joined paths such as 'model/backbone/blocks/0/attn/qkv/kernel',
  or a method selector '@batchnorm' from `param_selectors`), never by the method. method_state: nested
  dict of arrays that change without a gradient (BatchNorm statistics, semantic-proxy containers, memory
  queues, per-record cluster ids); checkpointed with the parameters.

One update step, several phases
  `phases(epoch)` lists the ordered sub-steps of one update: `Phase(objective, groups, repeats)`. Each
  phase differentiates its objective with respect to the parameters of its groups only (group names of
  config.optim.groups; None = every group training this epoch), steps those groups' optimizers and hands
  the new parameters and method state to the next phase; repeat r gets the key fold_in(fold_in(key,
  phase index), r). The default is one phase, objective 'loss' (`loss_fn`). DADA's iteration is three
  discriminator phases then a generator phase that sees the updated discriminators: exactly the
  authors' alternation, inside one jitted step.

  An objective is `fn(params, method_state, batch, rng, info) -> (loss, (metrics, new_method_state))`,
  pure and jittable. batch: {'image': float32 [B, S, S, 3], 'label': int32 [B], 'index': int32 [B] (the
  record's row in the training records)} -- the GLOBAL batch, sharded over devices. info: StepInfo.
  `prepare(params, method_state, batch, rng, info) -> (prepared, method_state)` runs once per step before
  the phases, without gradient (e.g. DADA's no-grad forward whose embeddings every discriminator phase
  reuses); objectives read its output as `info.prepared`.

Evaluation and features
  `embed_fn(params, method_state, images) -> float32 [B, E]`: the evaluation embedding, L2-normalised.
  `feature_fns() -> {name: fn(params, method_state, images) -> float32 [B, F]}`: other eval-mode
  features hooks may request (D&C clusters the 2048-d penultimate features).

Between epochs (host side)
  `on_epoch_start(epoch, state, ctx)` / `on_epoch_end(epoch, state, ctx)` return the train state
  {'step', 'params', 'opt_state', 'method_state', 'rng'}. A mid-epoch resume does not run
  on_epoch_start again (the checkpoint holds its effects). ctx (train.loop.TrainContext) offers the
  config, the training records, `embed_records(state, records, feature=None)`, `set_params(state,
  {path: value})` (shapes may change; the groups holding those paths restart their optimizer state),
  `reset_optimizer(state, group_names)` and `share(value)` (process 0's JSON-able value on every process: a
  host-side decision, e.g. a clustering, that several processes must take alike).
  `train_sampler(epoch, state, ctx) -> BatchSampler | None`: the epoch's batches (None: the config's
  sampler). It must be a pure function of (epoch, state): a resumed epoch rebuilds it.

State kept in host memory
  `host_state() -> HostState | None`: tables too large for the accelerator (VPTSP's class-prompt bank)
  or numerics the device does not offer (float64 counters). The trainer calls its `before_step` /
  `after_step` around every update with the global batch's labels and record indices (the same on every
  process) and checkpoints its `state_dict()` with the run.

Configuration
  Each method module defines `config()`: the defaults of `config.method.*` (its `name` included). The
  engine's own keys live in dml_jax/train/config.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

Objective = Callable[..., tuple[jax.Array, tuple[dict, dict]]]


class StepInfo(NamedTuple):
  """Where the update is. step, epoch: int32 [] (traced); variant: `step_variant(epoch)` (static);
  prepared: the output of `Method.prepare` (a pytree, None by default)."""

  step: jax.Array
  epoch: jax.Array
  variant: Hashable = None
  prepared: Any = None


@dataclasses.dataclass(frozen=True)
class Phase:
  """One sub-step of the update: minimise `objective` over the parameters of `groups`, `repeats` times.

  objective: a key of `Method.objectives()`.  groups: names of config.optim parameter groups (None: every
  group training this epoch).  repeats: how often in a row (each with fresh randomness).
  """

  objective: str = "loss"
  groups: tuple[str, ...] | None = None
  repeats: int = 1

  def __post_init__(self):
    if self.repeats < 1:
      raise ValueError(f"Phase({self.objective!r}): repeats must be >= 1, got {self.repeats}")
    if self.groups is not None and not isinstance(self.groups, tuple):
      object.__setattr__(self, "groups", tuple(self.groups))


class HostBatch(NamedTuple):
  """The global batch as every process sees it on the host: labels and training-record rows, int64 [B]."""

  label: np.ndarray
  index: np.ndarray


class HostState:
  """State a method keeps in host memory; the trainer drives it around each update and saves it."""

  def before_step(self, state: dict, batch: HostBatch) -> dict:
    """The train state for the next update (e.g. with the batch's table rows loaded into buffers)."""
    del batch
    return state

  def after_step(self, state: dict, batch: HostBatch) -> None:
    """Reads what the finished update produced (it may block until the update is done)."""
    del state, batch

  def state_dict(self) -> dict[str, Any]:
    """Nested dict of numpy arrays, saved with every checkpoint."""
    return {}

  def load_state_dict(self, saved: Mapping[str, Any]) -> None:
    del saved

  def parameter_counts(self) -> dict[str, int]:
    """{device buffer path: parameters the host holds behind it} for the trainer's parameter count."""
    return {}


class Method:
  """Defaults of the interface (one phase, no state hooks, no host state); see the module docstring."""

  name: str = ""
  embedding_dim: int = 0
  pretrained_cfg: Any = None  # dml_jax.preprocessing.PretrainedCfg of the backbone weights

  def init(self, rng: jax.Array) -> tuple[dict, dict]:
    raise NotImplementedError

  def loss_fn(self, params: dict, method_state: dict, batch: dict, rng: jax.Array,
              info: StepInfo) -> tuple[jax.Array, tuple[dict, dict]]:
    raise NotImplementedError

  def objectives(self) -> dict[str, Objective]:
    return {"loss": self.loss_fn}

  def phases(self, epoch: int) -> tuple[Phase, ...]:
    del epoch
    return (Phase(),)

  def prepare(self, params: dict, method_state: dict, batch: dict, rng: jax.Array,
              info: StepInfo) -> tuple[Any, dict]:
    del params, batch, rng, info
    return None, method_state

  def embed_fn(self, params: dict, method_state: dict, images: jax.Array) -> jax.Array:
    raise NotImplementedError

  def feature_fns(self) -> dict[str, Callable[[dict, dict, jax.Array], jax.Array]]:
    return {}

  def param_selectors(self, params: dict) -> dict[str, set[str]]:
    """{name: parameter paths} that config group rules may name as '@name' (e.g. '@batchnorm')."""
    del params
    return {}

  def step_variant(self, epoch: int) -> Hashable:
    """Static switches of the objectives that change with the epoch (one compiled step per value)."""
    del epoch
    return None

  def on_epoch_start(self, epoch: int, state: dict, ctx: Any) -> dict:
    del epoch, ctx
    return state

  def on_epoch_end(self, epoch: int, state: dict, ctx: Any) -> dict:
    del epoch, ctx
    return state

  def train_sampler(self, epoch: int, state: dict, ctx: Any) -> Any:
    del epoch, state, ctx
    return None

  def host_state(self) -> HostState | None:
    return None
