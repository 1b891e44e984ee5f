"""The one update step for every method: jitted, donated, data-parallel over a ('data',) mesh.

Parameters, optimizer state and method state are replicated; the batch is split along its first axis
over every device of the mesh. The method's loss sees the whole global batch (XLA gathers what the
pairwise terms need), so 1 and 8 devices compute the same loss and the seeds' single-GPU recipes carry
over unchanged.

The train state is a dict of arrays:
  step          int32 []            global step (number of updates done)
  params        nested dict         float32, trainable and frozen alike (see optim.ParamPlan)
  opt_state     {label: state}      one optax state per trainable group, nothing for frozen parameters
  method_state  nested dict         BN statistics, memory queues, ... (no gradient)
  rng           uint32 [2]          raw key data; the step's key is fold_in(rng, step)

Only the trainable parameters are differentiated: frozen ones enter the loss as constants, so their
gradients are never formed, they get no update and no weight decay, and they leave the step as the very
same buffers (bit-identical).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from dml_jax.methods import Method, StepInfo
from dml_jax.train import tree as tree_lib
from dml_jax.train.optim import Phase

DATA_AXIS = "data"


def make_mesh(devices: Any = None) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over `devices` (default: all), with Auto axis types.

  jax.make_mesh defaults to Explicit axes, under which a batch-sharded `e @ e.T` (every pairwise DML
  loss) raises a sharding type error; Auto lets XLA insert the gathers.
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's rows of the global batch -> global arrays split over the mesh's 'data' axis."""
  sharding = batch_sharded(mesh)
  n = mesh.shape[DATA_AXIS]
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    global_rows = value.shape[0] * jax.process_count()
    if global_rows % n:
      raise ValueError(f"global batch of {global_rows} rows ('{key}') does not split over {n} devices; "
                       f"choose a batch size divisible by {n}")
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def build_update_fn(method: Method, phase: Phase, param_keys: Mapping[str, tuple], *,
                    variant: Hashable = None) -> Callable:
  """update(state, batch, learning_rates, epoch) -> (state, metrics), not yet jitted.

  learning_rates: {group label: float32 []} for this epoch; epoch: int32 [].
  metrics: {'loss': float32 [], 'nonfinite': bool [], **method metrics}.
  """
  transforms = phase.transforms()
  trainable_paths = phase.trainable
  trainable_set = set(trainable_paths)

  def update(state, batch, learning_rates, epoch):
    flat = tree_lib.flatten(state["params"])
    trainable = {p: flat[p] for p in trainable_paths}
    frozen = {p: v for p, v in flat.items() if p not in trainable_set}
    step = state["step"]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    info = StepInfo(step=step, epoch=epoch, variant=variant)

    def objective(trainable_leaves):
      params = tree_lib.nest({**frozen, **trainable_leaves}, param_keys)
      return method.loss_fn(params, state["method_state"], batch, rng, info)

    (loss, (metrics, method_state)), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
    new_flat = dict(flat)
    opt_state = {}
    for label, _, paths in phase.groups:
      group_params = tree_lib.nest({p: trainable[p] for p in paths}, param_keys)
      group_grads = tree_lib.nest({p: grads[p] for p in paths}, param_keys)
      updates, opt_state[label] = transforms[label].update(
          group_grads, state["opt_state"][label], group_params, learning_rate=learning_rates[label])
      new_flat.update(tree_lib.flatten(optax.apply_updates(group_params, updates)))
    new_state = dict(step=step + 1, params=tree_lib.nest(new_flat, param_keys), opt_state=opt_state,
                     method_state=method_state, rng=state["rng"])
    metrics = {**metrics, "loss": loss, "nonfinite": ~jnp.isfinite(loss)}
    return new_state, metrics

  return update


class StepCache:
  """Jitted update steps, one per (trainable set, method variant), and the jitted eval embedding."""

  def __init__(self, method: Method, mesh: jax.sharding.Mesh, param_keys: Mapping[str, tuple], *,
               donate: bool = True):
    self.method = method
    self.mesh = mesh
    self.param_keys = dict(param_keys)
    self.donate = donate
    self._steps: dict[tuple, Callable] = {}
    repl, data = replicated(mesh), batch_sharded(mesh)
    self._embed = jax.jit(method.embed_fn, in_shardings=(repl, repl, data), out_shardings=data)

  def update_fn(self, phase: Phase, variant: Hashable = None) -> Callable:
    key = (phase, variant)
    if key not in self._steps:
      repl, data = replicated(self.mesh), batch_sharded(self.mesh)
      fn = build_update_fn(self.method, phase, self.param_keys, variant=variant)
      self._steps[key] = jax.jit(fn, in_shardings=(repl, data, repl, repl), out_shardings=(repl, repl),
                                 donate_argnums=(0,) if self.donate else ())
    return self._steps[key]

  def embed(self, params: Any, method_state: Any, images: jax.Array) -> jax.Array:
    return self._embed(params, method_state, images)


def learning_rate_args(phase: Phase, epoch: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """The host-computed (double precision, as torch) rates of `epoch` as float32 step arguments."""
  lrs = {label: np.float32(lr) for label, lr in phase.learning_rates(epoch).items()}
  return lrs, np.int32(epoch)


def init_train_state(params: Any, method_state: Any, opt_state: Any, rng: jax.Array, step: int = 0) -> dict:
  return dict(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state, method_state=method_state,
              rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng)
