"""The one update step for every method: jitted, donated, data-parallel over a ('data',) mesh.

Parameters, optimizer state and method state are replicated; the batch is split along its first axis
over every device of the mesh. The method's objectives see the whole global batch (XLA gathers what the
pairwise terms need), so 1 and 8 devices compute the same loss and the seeds' single-GPU recipes carry
over unchanged.

The train state is a dict of arrays:
  step          int32 []            global step (number of updates done)
  params        nested dict         float32, trainable and frozen alike (see optim.ParamPlan)
  opt_state     {label: state}      one optax state per trainable group, nothing for frozen parameters
  method_state  nested dict         BN statistics, memory queues, ... (no gradient)
  rng           uint32 [2]          raw key data; the step's key is fold_in(rng, step)

An update runs the method's phases in order (dml_jax/methods/base.py): `prepare` once, then for every
phase and repeat, the phase's objective is differentiated with respect to the parameters of its groups
only, those groups' optimizers step, and the next phase sees the new parameters and method state.
Parameters outside a phase's groups enter its objective as constants, so their gradients are never
formed; frozen parameters leave the step as the very same buffers (bit-identical).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dml_jax import pytree as tree_lib
from dml_jax.methods.base import Method, Phase, StepInfo
from dml_jax.train import compile_options
from dml_jax.train.optim import EpochGroups

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


def _phase_key(rng: jax.Array, phase_index: int, repeat: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(rng, phase_index), repeat)


def build_update_fn(method: Method, groups: EpochGroups, phases: tuple[Phase, ...], param_keys: Mapping[str, tuple],
                    *, variant: Hashable = None) -> Callable:
  """update(state, batch, learning_rates, epoch) -> (state, metrics), not yet jitted.

  learning_rates: {group label: float32 []} for this epoch; epoch: int32 [].
  metrics: {'loss': float32 [] (the last phase's), 'nonfinite': bool [] (any phase), **method metrics};
  with several phases, also '<objective>/loss' per phase (the last repeat's).
  """
  transforms = groups.transforms()
  objectives = method.objectives()
  plans = []  # (phase index, phase, objective fn, labels, paths)
  for index, phase in enumerate(phases):
    if phase.objective not in objectives:
      raise KeyError(f"{method.name}: phase objective {phase.objective!r} is not among {sorted(objectives)}")
    labels = groups.labels_of(phase.groups)
    plans.append((index, phase, objectives[phase.objective], labels, groups.paths_of(labels)))

  def run_phase(flat, opt_state, method_state, batch, learning_rates, rng, info, objective, labels, paths):
    trainable = {p: flat[p] for p in paths}
    constants = {p: v for p, v in flat.items() if p not in trainable}

    def loss_of(trainable_leaves):
      params = tree_lib.nest({**constants, **trainable_leaves}, param_keys)
      return objective(params, method_state, batch, rng, info)

    if not paths:  # nothing of this phase trains this epoch (e.g. warm-up): the objective only runs
      loss, (metrics, method_state) = loss_of({})
      return flat, opt_state, method_state, loss, metrics
    (loss, (metrics, method_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
    flat, opt_state = dict(flat), dict(opt_state)
    for label in labels:
      label_paths = groups.paths_of((label,))
      group_params = tree_lib.nest({p: trainable[p] for p in label_paths}, param_keys)
      group_grads = tree_lib.nest({p: grads[p] for p in label_paths}, param_keys)
      updates, opt_state[label] = transforms[label].update(
          group_grads, opt_state[label], group_params, learning_rate=learning_rates[label])
      flat.update(tree_lib.flatten(optax.apply_updates(group_params, updates)))
    return flat, opt_state, method_state, loss, metrics

  def update(state, batch, learning_rates, epoch):
    flat = tree_lib.flatten(state["params"])
    opt_state, method_state = state["opt_state"], state["method_state"]
    step = state["step"]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    info = StepInfo(step=step, epoch=epoch, variant=variant)
    prepared, method_state = method.prepare(tree_lib.nest(flat, param_keys), method_state, batch,
                                            jax.random.fold_in(rng, len(phases)), info)
    info = info._replace(prepared=jax.lax.stop_gradient(prepared) if prepared is not None else None)
    metrics, nonfinite = {}, jnp.zeros((), bool)
    for index, phase, objective, labels, paths in plans:
      for repeat in range(phase.repeats):
        flat, opt_state, method_state, loss, phase_metrics = run_phase(
            flat, opt_state, method_state, batch, learning_rates, _phase_key(rng, index, repeat), info, objective,
            labels, paths)
        nonfinite = nonfinite | ~jnp.isfinite(loss)
      metrics.update(phase_metrics)
      if len(plans) > 1:
        metrics[f"{phase.objective}/loss"] = loss
    new_state = dict(step=step + 1, params=tree_lib.nest(flat, param_keys), opt_state=opt_state,
                     method_state=method_state, rng=state["rng"])
    return new_state, {**metrics, "loss": loss, "nonfinite": nonfinite}

  return update


class StepCache:
  """Jitted update steps, one per (trainable groups, phases, method variant), and the jitted embeddings."""

  def __init__(self, method: Method, mesh: jax.sharding.Mesh, param_keys: Mapping[str, tuple], *,
               donate: bool = True):
    self.method = method
    self.mesh = mesh
    self.param_keys = dict(param_keys)
    self.donate = donate
    self._steps: dict[tuple, Callable] = {}
    self.compiler_options = compile_options.for_mesh(mesh)
    repl, data = replicated(mesh), batch_sharded(mesh)
    features = {None: method.embed_fn, **method.feature_fns()}
    self._features = {name: jax.jit(fn, in_shardings=(repl, repl, data), out_shardings=data,
                                    compiler_options=self.compiler_options)
                      for name, fn in features.items()}

  def update_fn(self, groups: EpochGroups, epoch: int) -> Callable:
    phases = tuple(self.method.phases(epoch))
    variant = self.method.step_variant(epoch)
    key = (groups, phases, variant)
    if key not in self._steps:
      repl, data = replicated(self.mesh), batch_sharded(self.mesh)
      fn = build_update_fn(self.method, groups, phases, self.param_keys, variant=variant)
      self._steps[key] = jax.jit(fn, in_shardings=(repl, data, repl, repl), out_shardings=(repl, repl),
                                 donate_argnums=(0,) if self.donate else (),
                                 compiler_options=self.compiler_options)
    return self._steps[key]

  def embed(self, params: Any, method_state: Any, images: jax.Array, feature: str | None = None) -> jax.Array:
    if feature not in self._features:
      raise KeyError(f"{self.method.name} offers the features {sorted(k for k in self._features if k)} "
                     f"(None: the evaluation embedding), not {feature!r}")
    return self._features[feature](params, method_state, images)


def learning_rate_args(groups: EpochGroups, epoch: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """The host-computed (double precision, as torch) rates of `epoch` as float32 step arguments."""
  lrs = {label: np.float32(lr) for label, lr in groups.learning_rates(epoch).items()}
  return lrs, np.int32(epoch)


def init_train_state(params: Any, method_state: Any, opt_state: Any, rng: jax.Array, step: int = 0) -> dict:
  return dict(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state, method_state=method_state,
              rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng)
